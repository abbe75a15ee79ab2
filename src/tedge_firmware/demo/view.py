"""What the demo shows: the live table while the rollout runs, the summary at the end."""

from __future__ import annotations

import asyncio
import contextlib
import time

from rich.console import Console
from rich.live import Live
from rich.table import Table

from tedge_firmware.core.units import format_size
from tedge_firmware.demo.options import (
    FIRMWARE_NAME,
    FIRMWARE_VERSION,
    MAX_LIVE_ROWS,
    REFRESH_S,
    cloud_id,
)
from tedge_firmware.demo.processes import (
    ChildProcess,
)
from tedge_firmware.demo.rollout import ChildResult, DemoResult, Rollout
from tedge_firmware.errors import TedgeFirmwareError


def live_table(rollout: Rollout, size: int, started: float) -> Table:
    views = list(rollout.fleet.views.values())
    finished = sum(1 for view in views if rollout.settled(view.child_id))
    table = Table(
        title=f"firmware {FIRMWARE_NAME} {FIRMWARE_VERSION} ({format_size(size)}) to "
        f"{len(views)} children: {finished} done, {time.monotonic() - started:.1f} s",
        title_justify="left",
    )
    columns = ("child", "protocol", "role", "Cumulocity", "connector", "downloaded", "attempts")
    for column in (*columns, "time"):
        numeric = column in ("downloaded", "attempts")
        table.add_column(column, justify="right" if numeric else "left")
    # the unfinished children first: with many children those are the interesting ones
    ordered = sorted(views, key=lambda view: rollout.settled(view.child_id))
    for view in ordered[:MAX_LIVE_ROWS]:
        result = rollout.result_of(view.child_id)
        percent = f"{min(view.downloaded, size) * 100 // size}%" if size else "-"
        table.add_row(
            view.child_id,
            view.protocol,
            view.role,
            _colour(result.status),
            view.phase,
            percent,
            str(result.attempts),
            _elapsed(rollout, view.child_id, result),
        )
    if len(views) > MAX_LIVE_ROWS:
        table.caption = f"(+{len(views) - MAX_LIVE_ROWS} more children)"
    return table


def _elapsed(rollout: Rollout, child: str, result: ChildResult) -> str:
    """The time an ended child took; for a running one, the time so far (dimmed)."""
    if result.seconds is not None:
        return f"{result.seconds:.1f} s"
    operations = rollout.sim.operations_of(cloud_id(child))
    if not operations:
        return ""
    return f"[dim]{time.time() - operations[0].created:.1f} s[/]"  # the simulator's clock


def _colour(status: str) -> str:
    colour = {"SUCCESSFUL": "green", "FAILED": "red", "EXECUTING": "yellow"}.get(status)
    return f"[{colour}]{status}[/]" if colour else status


class PlainReporter:
    """Without a terminal: one line per status change of a child, in the order they happen."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.seen: dict[str, tuple[str, int]] = {}

    def update(self, rollout: Rollout) -> None:
        for child in rollout.fleet.views:
            result = rollout.result_of(child)
            state = (result.status, result.attempts)
            if self.seen.get(child) == state or result.status == "NOT CREATED":
                continue
            self.seen[child] = state
            detail = f" ({result.reason})" if result.reason and result.status == "FAILED" else ""
            took = f" after {result.seconds:.1f} s" if result.seconds is not None else ""
            self.console.print(
                f"{child}: {result.status}{took}, attempt {result.attempts}{detail}",
                highlight=False,
                markup=False,
            )


async def follow(
    rollout: Rollout,
    gateway: ChildProcess,
    console: Console,
    live: bool,
    size: int,
    limit_s: float,
) -> bool:
    """Show progress until every child settled (True) or the timeout (False)."""
    started = time.monotonic()
    plain = PlainReporter(console)

    async def loop(refresh: Live | None) -> bool:
        try:
            async with asyncio.timeout(limit_s):
                while True:
                    if not gateway.running:
                        raise TedgeFirmwareError(f"the gateway exited:\n{gateway.tail()}")
                    if refresh is not None:
                        refresh.update(live_table(rollout, size, started))
                    else:
                        plain.update(rollout)  # before the retry: its failure is shown too
                    rollout.retry_flaky()
                    if rollout.done():
                        return True
                    with contextlib.suppress(TimeoutError):  # a change, or a display refresh
                        await rollout.sim.wait_until(lambda: False, REFRESH_S)
        except TimeoutError:
            return False

    if not live:
        return await loop(None)
    with Live(live_table(rollout, size, started), console=console, refresh_per_second=8) as view:
        return await loop(view)


def summary_table(result: DemoResult) -> Table:
    table = Table(title="summary", title_justify="left")
    columns = ("child", "protocol", "role", "status", "time", "attempts", "bytes", "reason")
    for column in columns:
        numeric = column in ("time", "attempts", "bytes")
        table.add_column(column, justify="right" if numeric else "left")
    for child in result.children:
        mark = "" if child.as_expected else " (unexpected)"
        table.add_row(
            child.child_id,
            child.protocol,
            child.role,
            _colour(child.status) + mark,
            f"{child.seconds:.1f} s" if child.seconds is not None else "-",
            str(child.attempts),
            format_size(child.bytes),
            child.reason or "",
        )
    return table


def print_summary(console: Console, result: DemoResult) -> None:
    console.print(summary_table(result))
    should = sum(1 for child in result.children if child.role != "fail")
    succeeded = sum(1 for c in result.children if c.role != "fail" and c.status == "SUCCESSFUL")
    failed_on_purpose = sum(1 for c in result.children if c.role == "fail" and c.as_expected)
    rss = f"{result.gateway_peak_rss_kib / 1024:.0f} MiB" if result.gateway_peak_rss_kib else "?"
    lines = [
        f"successful: {succeeded} of {should} that should succeed; "
        f"failed on purpose: {failed_on_purpose} of {len(result.children) - should}",
        f"firmware installed (Cumulocity inventory): {result.installed} children",
        f"cloud downloads: {result.cloud_downloads} ({result.cloud_requests} requests, "
        f"{format_size(result.cloud_bytes)} from the cloud for a {format_size(result.size)} "
        f"firmware); the cached copy confirmed by the cloud {result.cloud_confirmations} times "
        "(304, no body)",
        f"bytes served to children: {format_size(result.bytes_to_children)}",
        f"protocol errors (what Cumulocity would refuse): {len(result.protocol_errors)}",
        f"gateway peak RSS: {rss}; rollout took {result.seconds:.1f} s",
    ]
    for text in lines:
        console.print(text, highlight=False, markup=False)
    for error in result.protocol_errors:
        console.print(f"  {error}", highlight=False, markup=False)
    verdict = "demo OK" if result.ok else "demo FAILED: see above"
    console.print(f"[bold {'green' if result.ok else 'red'}]{verdict}[/]")
