"""`tedge-firmware cache list/prune` and `ops list`: what the gateway keeps on disk, for people.

They read `data.path` as the service leaves it and are safe to run while it runs. `cache list`
and `ops list` change nothing (a corrupt operation file is shown, never moved). `cache prune`
removes entries only through `FirmwareCache.evict`, which holds the cache lock and refuses an
entry that a child's link points to; it also keeps the firmware that a stored operation is
waiting for, which is not linked yet.

Errors are one `error: ...` line on stderr: exit code 2 for a bad option value (as click's
own usage errors), 1 for an unusable configuration or an unreadable directory.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import cast

import click
from rich import box
from rich.console import Console
from rich.table import Table

from tedge_firmware.cli.support import fail, load_for
from tedge_firmware.core import topics
from tedge_firmware.core.cache_policy import (
    CacheEntry,
    CacheLimits,
    Eviction,
    EvictionReason,
    plan_clear,
    plan_eviction,
)
from tedge_firmware.core.config import DEFAULT_CONFIG_DIR, find_key
from tedge_firmware.core.operation import FetchRecord, OperationRecord, State, file_id_for_url
from tedge_firmware.core.units import format_size, parse_size
from tedge_firmware.errors import TedgeFirmwareError
from tedge_firmware.shell.cache import FirmwareCache
from tedge_firmware.shell.durable import CORRUPT_DIR
from tedge_firmware.shell.store import FETCHING_DIR, fetch_store, operation_store

USAGE_ERROR = 2  # what click exits with for its own usage errors
SHORT_ID = 12  # FILE_IDs are 64 hex digits; 12 are plenty to tell a cache's entries apart
UNBOUNDED_WIDTH = 100_000  # columns when the output is not a terminal: no folding
MAX_SIZE_KEY = "firmware.cache.max_size"
MAX_AGE_KEY = "firmware.cache.max_age"

config_dir_option = click.option(
    "--config-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help=f"Directory of tedge.toml (default: tedge-firmware's --config-dir, {DEFAULT_CONFIG_DIR}).",
)


# --- shared ----------------------------------------------------------------------------------


@contextmanager
def _one_line_errors() -> Iterator[None]:
    try:
        yield
    except OSError as error:
        where = f"{error.filename}: " if error.filename else ""
        fail(f"cannot read {where}{error.strerror or error}")
    except TedgeFirmwareError as error:
        fail(str(error))


def _console() -> Console:
    # Markup off: file names, child ids and URLs are shown as they are, never as rich markup.
    # Without a terminal (a pipe, a log) rich would fit tables into 80 columns and fold URLs;
    # there, and for lines of text (soft wrap), every line stays whole, so grep finds it.
    return Console(
        width=None if sys.stdout.isatty() else UNBOUNDED_WIDTH,
        soft_wrap=True,
        markup=False,
        highlight=False,
        emoji=False,
    )


def _shown(text: str) -> str:
    """Text from disk made safe for a terminal: control and format characters (ESC, bidi
    overrides) and undecodable bytes are shown escaped, never sent to the terminal."""
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


def format_age(seconds: float) -> str:
    """45 s, 12 min, 3 h 5 min, 9 d 4 h."""
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min"
    if seconds < 86400:
        hours, minutes = divmod(seconds // 60, 60)
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(seconds // 3600, 24)
    return f"{days} d {hours} h" if hours else f"{days} d"


def _when(timestamp: float, now: float) -> str:
    stamp = datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S")
    return f"{stamp} ({format_age(now - timestamp)} ago)"


def short_ids(names: Sequence[str]) -> dict[str, str]:
    """Each name cut to SHORT_ID characters, or longer where that is needed to tell them apart."""
    length = SHORT_ID
    longest = max((len(name) for name in names), default=0)
    while length < longest and len({name[:length] for name in names}) < len(set(names)):
        length += 1
    return {name: name[:length] for name in names}


def _counted(count: int, thing: str) -> str:
    return f"{count} {thing}" if count == 1 else f"{count} {thing}s"


def describe_limits(limits: CacheLimits) -> str:
    size = "none" if limits.max_size is None else format_size(limits.max_size)
    age = "none"
    if limits.max_age is not None:
        age = f"{limits.max_age:g} s ({format_age(limits.max_age)})"
    return f"{MAX_SIZE_KEY} {size}, {MAX_AGE_KEY} {age}"


# --- stored operations -----------------------------------------------------------------------


@dataclass(frozen=True)
class StoredOperation:
    """An operation the gateway has in progress, as its store file says."""

    op_id: str
    child_id: str
    name: str
    version: str
    url: str
    attempt: int
    waiting_for_download: bool
    written: float | None  # the file's mtime
    state: str = "request sent"  # what the STATE column says


@dataclass(frozen=True)
class UnusableFile:
    path: Path
    problem: str


def stored_operations(firmware_dir: Path) -> tuple[list[StoredOperation], list[UnusableFile]]:
    """Every operation file under `firmware_dir`, read without changing anything, oldest first.

    An operation with both files (its request went out just before a stop; the service drops
    the leftover download file at its next start) is shown once, as request sent."""
    operations: dict[str, StoredOperation] = {}
    unusable: list[UnusableFile] = []
    sent, waiting = operation_store(firmware_dir).scan(), fetch_store(firmware_dir).scan()
    for is_waiting, files in ((False, sent), (True, waiting)):
        for found in files:
            record = found.record
            if record is None:
                unusable.append(UnusableFile(found.path, found.problem or "unreadable"))
            elif child_problem := topics.child_id_problem(record.child_id):
                # the service sets such a file aside at its next start
                unusable.append(UnusableFile(found.path, f"not usable: {child_problem}"))
            elif record.operation_id not in operations:
                operations[record.operation_id] = StoredOperation(
                    record.operation_id, record.child_id, record.name, record.version,
                    record.cloud_url, record.attempt, is_waiting, found.modified,
                    _state_shown(record),
                )  # fmt: skip
    ordered = sorted(operations.values(), key=lambda op: (op.written or 0.0, op.op_id))
    return ordered, unusable


def _state_shown(record: OperationRecord | FetchRecord) -> str:
    if isinstance(record, FetchRecord):
        return "waiting for download" + (" (EXECUTING in Cumulocity)" if record.announced else "")
    if record.state.ended:  # its file stays until the broker has its last lines
        return f"{record.state.value}, telling Cumulocity"
    return "executing" if record.state is State.EXECUTING else "request sent"


def awaited_contents(cache: FirmwareCache, firmware_dir: Path) -> set[str]:
    """The cached firmware (SHA-256) that stored operations wait for: downloaded (or found in
    the cache) but not linked for their child yet. The service links them next, so they must
    stay."""
    operations, _ = stored_operations(firmware_dir)
    file_ids = {file_id_for_url(op.url) for op in operations if op.waiting_for_download}
    records = (cache.lookup(file_id) for file_id in file_ids)
    return {record.sha256 for record in records if record is not None}


def _set_aside(firmware_dir: Path) -> int:
    """How many unusable files the service moved to `.corrupt/` before (kept for a look)."""
    count = 0
    for folder in (firmware_dir / CORRUPT_DIR, firmware_dir / FETCHING_DIR / CORRUPT_DIR):
        if folder.is_dir():
            count += sum(1 for item in folder.iterdir() if item.is_file())
    return count


# --- cache -----------------------------------------------------------------------------------


@click.group("cache", short_help="List or prune the firmware cache.")
def cache_group() -> None:
    """The firmware cache (data.path/cache): list it, fill it ahead of time, or remove entries
    by hand."""


@cache_group.command("list", short_help="Cached firmware, least recently used first.")
@config_dir_option
@click.pass_context
def cache_list_command(ctx: click.Context, config_dir: Path | None) -> None:
    """Cached firmware, least recently used first, with the children it is published to."""
    config = load_for(ctx, config_dir)
    cache = FirmwareCache(config.cache_dir, config.file_transfer_dir)
    with _one_line_errors():
        entries = sorted(cache.entries(), key=lambda entry: (entry.last_used, entry.sha256))
        awaited = awaited_contents(cache, config.firmware_dir) if entries else set()
    console = _console()
    where = _shown(str(config.cache_dir))
    limits = config.cache_limits
    if not entries:
        console.print(f"no cached firmware in {where}")
        console.print(f"limits: {describe_limits(limits)}")
        return
    now = time.time()
    console.print(_entries_table(entries, awaited, now))
    total = format_size(sum(entry.size for entry in entries))
    in_use = sum(1 for e in entries if e.in_use or e.sha256 in awaited or e.pinned(now))
    console.print(f"{len(entries)} cached firmware, {total} in {where}; {in_use} in use")
    console.print(f"limits: {describe_limits(limits)}")
    plan = [] if limits.unlimited else plan_eviction(entries, limits, now)
    plan = [eviction for eviction in plan if eviction.entry.sha256 not in awaited]
    if plan:
        freed = format_size(sum(eviction.entry.size for eviction in plan))
        prune = "`tedge-firmware cache prune`"
        console.print(f"over the limits: {prune} would remove {len(plan)} ({freed})")


def _entries_table(entries: Sequence[CacheEntry], awaited: set[str], now: float) -> Table:
    ids = short_ids([entry.sha256 for entry in entries])
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    table.add_column("SHA-256", no_wrap=True)
    table.add_column("SIZE", justify="right", no_wrap=True)
    table.add_column("LAST USED", no_wrap=True)
    table.add_column("IN USE BY", overflow="fold")
    table.add_column("URLS", overflow="fold")
    for entry in entries:
        users = ", ".join(_shown(child) for child in entry.children)
        if entry.sha256 in awaited:
            users = ", ".join(filter(None, (users, "(an operation waiting for it)")))
        if entry.pinned(now) and entry.pinned_until is not None:
            until = datetime.fromtimestamp(entry.pinned_until).strftime("%Y-%m-%d %H:%M:%S")
            pinned = f"(pinned until {until})"
            users = ", ".join(filter(None, (users, pinned)))
        last_used = _when(entry.last_used, now)
        urls = " ".join(_shown(url) for url in entry.urls) or "-"
        short = _shown(ids[entry.sha256])
        table.add_row(short, format_size(entry.size), last_used, users or "-", urls)
    return table


def _max_size(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return parse_size(value)
    except ValueError as error:
        fail(f"invalid value for '--max-size': {_shown(str(error))}", USAGE_ERROR)
    except OverflowError:  # more digits than a float holds
        fail(f"invalid value for '--max-size': {_shown(value[:20])}... is too big", USAGE_ERROR)


def _max_age(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        # The same rules as the firmware.cache.max_age key: whole seconds, ASCII digits.
        return cast(int, find_key(MAX_AGE_KEY).parse("--max-age", value))
    except TedgeFirmwareError as error:
        fail(_shown(str(error)), USAGE_ERROR)
    except ValueError:  # more digits than int() takes
        fail(f"invalid value for '--max-age': {_shown(value[:20])}... is too big", USAGE_ERROR)


@cache_group.command("fill", short_help="Download a firmware into the cache now.")
@config_dir_option
@click.argument("url")
@click.option(
    "--pin",
    metavar="DURATION",
    help="Keep it from eviction this long (3600, 90s, 15min, 12h, 7d, 2w).",
)
@click.option(
    "--wait",
    "wait_s",
    type=click.FloatRange(min=0, min_open=True),
    default=3600.0,
    show_default=True,
    help="Seconds to follow the download; after that it goes on without you.",
)
@click.pass_context
def cache_fill_command(
    ctx: click.Context, config_dir: Path | None, url: str, pin: str | None, wait_s: float
) -> None:
    """Ask the running gateway to download URL into its cache now (the cache_fill command on
    te/device/main/service/tedge-firmware/cmd/cache_fill/<id>), and follow it: exit 0 once it
    is in the cache (its SHA-256 and size shown), 1 when the gateway failed it, 2 when the
    broker cannot be reached, 3 when it is still going after --wait (the gateway finishes it,
    also after a restart). The same download, resume and freshness rules as operations."""
    from tedge_firmware.cli.cache_fill import fill
    from tedge_firmware.core.units import parse_duration
    from tedge_firmware.core.urls import firmware_url_problem

    problem = firmware_url_problem(url)
    if problem is not None:
        raise click.BadParameter(problem, param_hint="URL")
    try:
        pin_seconds = None if pin is None else parse_duration(pin)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="'--pin'") from None
    config = load_for(ctx, config_dir)
    sys.exit(asyncio.run(fill(config, url, pin_seconds, wait_s)))


@cache_group.command("prune", short_help="Apply the cache limits now.")
@config_dir_option
@click.option("--max-size", metavar="SIZE", help="Instead of firmware.cache.max_size (e.g. 2GiB).")
@click.option("--max-age", metavar="SECONDS", help="Instead of firmware.cache.max_age.")
@click.option("--all", "remove_all", is_flag=True, help="Remove every entry not in use.")
@click.option("--dry-run", is_flag=True, help="Only show what would be removed.")
@click.pass_context
def cache_prune_command(
    ctx: click.Context,
    config_dir: Path | None,
    max_size: str | None,
    max_age: str | None,
    remove_all: bool,
    dry_run: bool,
) -> None:
    """Apply the cache limits now (the configured ones, or those given here), least recently
    used first. Entries published to a child, or awaited by a stored operation, always stay.
    Safe while the service runs."""
    size_limit, age_limit = _max_size(max_size), _max_age(max_age)
    if remove_all and (max_size is not None or max_age is not None):
        fail("--all removes every entry not in use: give no --max-size/--max-age", USAGE_ERROR)
    config = load_for(ctx, config_dir)
    configured = config.cache_limits
    limits = CacheLimits(
        max_size=configured.max_size if size_limit is None else size_limit,
        max_age=configured.max_age if age_limit is None else age_limit,
    )
    console = _console()
    if limits.unlimited and not remove_all:
        console.print(
            f"no cache limits configured ({MAX_SIZE_KEY}, {MAX_AGE_KEY}) and none given"
            " (--max-size, --max-age, --all): nothing removed"
        )
        return
    cache = FirmwareCache(config.cache_dir, config.file_transfer_dir)
    with _one_line_errors():
        pruner = _Pruner(cache, config.firmware_dir, console, dry_run)
        pruner.run(limits, remove_all)


class _Pruner:
    """One `cache prune` run: plan, remove (or only show), count."""

    def __init__(self, cache: FirmwareCache, firmware_dir: Path, console: Console, dry_run: bool):
        self.cache = cache
        self.console = console
        self.dry_run = dry_run
        self.now = time.time()
        self.entries = cache.entries()
        self.ids = short_ids([entry.sha256 for entry in self.entries])
        self.awaited = awaited_contents(cache, firmware_dir) if self.entries else set()

    def run(self, limits: CacheLimits, remove_all: bool) -> None:
        if remove_all:
            self.console.print("removing every entry not in use (--all)")
            plan = plan_clear(self.entries, self.now)
        else:
            self.console.print(f"limits: {describe_limits(limits)}")
            plan = plan_eviction(self.entries, limits, self.now)
        removed: list[CacheEntry] = []
        kept = {e.sha256 for e in self.entries if e.in_use or e.pinned(self.now)}
        kept |= self.awaited & {entry.sha256 for entry in self.entries}
        for eviction in plan:
            entry = eviction.entry
            if entry.sha256 in self.awaited:
                self._say("kept", entry, "a stored operation is waiting for it")
            elif self.dry_run:
                removed.append(entry)
                self._say("would remove", entry, self._reason(eviction, limits))
            elif self.cache.evict(entry.sha256):
                removed.append(entry)
                self._say("removed", entry, self._reason(eviction, limits))
            elif self.cache.content(entry.sha256).is_file():
                kept.add(entry.sha256)
                self._say("kept", entry, "published to a child meanwhile")
            else:
                self._say("gone", entry, "removed by someone else meanwhile")
        self._summary(removed, len(kept))

    def _say(self, what: str, entry: CacheEntry, why: str) -> None:
        short = _shown(self.ids[entry.sha256])
        self.console.print(f"{what} {short} {format_size(entry.size)}: {why}")

    def _reason(self, eviction: Eviction, limits: CacheLimits) -> str:
        idle = format_age(self.now - eviction.entry.last_used)
        match eviction.reason:
            case EvictionReason.AGE:
                return f"not used for {idle}, max age {format_age(limits.max_age or 0)}"
            case EvictionReason.SIZE:
                size = format_size(limits.max_size or 0)
                return f"least recently used (last used {idle} ago), cache above {size}"
            case EvictionReason.REQUESTED:
                return "--all"

    def _summary(self, removed: list[CacheEntry], kept: int) -> None:
        freed = format_size(sum(entry.size for entry in removed))
        if self.dry_run:
            self.console.print(
                f"dry run: would remove {len(removed)} ({freed}), keep {kept} in use;"
                " nothing was removed"
            )
        else:
            self.console.print(f"removed {len(removed)}, freed {freed}, kept {kept} in use")


# --- operations ------------------------------------------------------------------------------


@click.group("ops", short_help="Firmware operations in progress.")
def ops_group() -> None:
    """Firmware operations the gateway has in progress (data.path/firmware)."""


@ops_group.command("list", short_help="Operations in progress, oldest first.")
@config_dir_option
@click.pass_context
def ops_list_command(ctx: click.Context, config_dir: Path | None) -> None:
    """Operations in progress, oldest first, read from their files (which stay as they are)."""
    config = load_for(ctx, config_dir)
    with _one_line_errors():
        operations, unusable = stored_operations(config.firmware_dir)
        set_aside = _set_aside(config.firmware_dir)
    console = _console()
    where = _shown(str(config.firmware_dir))
    if operations:
        console.print(_operations_table(operations, time.time()))
        waiting = sum(1 for op in operations if op.waiting_for_download)
        count = _counted(len(operations), "operation")
        console.print(f"{count} in progress ({waiting} waiting for their download) in {where}")
    else:
        console.print(f"no firmware operations in progress in {where}")
    for bad in unusable:
        console.print(f"unreadable: {_shown(str(bad.path))}: {_shown(bad.problem)} (left as it is)")
    if set_aside:
        files = _counted(set_aside, "unusable file")
        console.print(f"{files} moved aside earlier by the service, kept in {CORRUPT_DIR}/")


def _operations_table(operations: Sequence[StoredOperation], now: float) -> Table:
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for column in ("OPERATION", "CHILD", "FIRMWARE", "STATE", "ATTEMPT", "AGE", "URL"):
        table.add_column(column, overflow="fold")
    for op in operations:
        age = "-" if op.written is None else format_age(now - op.written)
        table.add_row(
            _shown(op.op_id), _shown(op.child_id), _shown(f"{op.name} {op.version}"),
            op.state, str(op.attempt), age, _shown(op.url),
        )  # fmt: skip
    return table
