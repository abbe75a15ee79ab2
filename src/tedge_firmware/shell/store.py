"""Operation store: one JSON file per operation, written atomically.

`data.path/firmware/<op_id>` holds thin-edge's operation file (request sent to the child);
`data.path/firmware/.fetching/<op_id>` holds an operation still waiting for its download, so a
restart resumes the download instead of losing the operation. A corrupt file never stops the
service: it is moved aside to `.corrupt/` and logged, so an operator can look at it.
`scan()` reads the same files without changing anything, for `tedge-firmware ops list`.
`StoreWriter` runs the writes of a service in a thread of their own, so that the event loop
never waits for a disk.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, Protocol, TypeVar

from tedge_firmware.core.operation import FetchRecord, OperationRecord
from tedge_firmware.errors import StoreError
from tedge_firmware.shell.durable import grouped_commit, quarantine, write_atomically

log = logging.getLogger(__name__)

FETCHING_DIR = ".fetching"


class _Record(Protocol):
    @property
    def operation_id(self) -> str: ...

    def to_json(self) -> str: ...


R = TypeVar("R", bound=_Record)


@dataclass(frozen=True)
class StoredFile(Generic[R]):
    """One file of a store as found on disk: its record, or why it cannot be used."""

    path: Path
    record: R | None
    problem: str | None  # None exactly when `record` is set
    modified: float | None  # mtime, seconds since the epoch; None when it cannot be read


class RecordStore(Generic[R]):
    def __init__(self, directory: Path, parse: Callable[[bytes], R]) -> None:
        self.directory = directory
        self._parse = parse

    def path(self, op_id: str) -> Path:
        return self.directory / op_id

    def save(self, record: R) -> None:
        """Write the record atomically (temp file, fsync, rename), mode 0644."""
        target = self.path(record.operation_id)
        data = record.to_json().encode()
        try:
            try:
                write_atomically(target, data)
            except FileNotFoundError:  # the first record, or the directory was removed
                self.directory.mkdir(parents=True, exist_ok=True)
                write_atomically(target, data)
        except OSError as error:
            raise StoreError(
                f"Creating the file failed: {str(target)!r}: {error.strerror}"
            ) from error

    def delete(self, op_id: str) -> None:
        try:
            self.path(op_id).unlink(missing_ok=True)
        except OSError as error:
            log.warning("cannot delete operation file %s: %s", self.path(op_id), error)

    def load_all(self) -> list[R]:
        """Every valid record; corrupt ones are quarantined. Sorted by name for a stable order.

        A temporary file left by a write that a crash interrupted is removed: its record was
        never written, the file it was to replace (if any) is whole."""
        self._remove_interrupted_writes()
        records = []
        for found in self.scan():
            if found.record is None:
                self.quarantine(found.path, found.problem or "unreadable")
            else:
                records.append(found.record)
        return records

    def _remove_interrupted_writes(self) -> None:
        if not self.directory.is_dir():
            return
        for leftover in self.directory.glob(".*.tmp"):
            try:
                leftover.unlink()
            except OSError as error:
                log.warning("cannot remove %s, left by an interrupted write: %s", leftover, error)
            else:
                log.info("removed %s, left by an interrupted write", leftover)

    def scan(self) -> list[StoredFile[R]]:
        """Every operation file, read but left as it is (corrupt ones too), sorted by name.

        A file removed between listing and reading (its operation ended meanwhile) is left out.
        OSError when the directory itself cannot be listed."""
        if not self.directory.is_dir():
            return []
        found: list[StoredFile[R]] = []
        for entry in sorted(self.directory.iterdir()):
            if entry.name.startswith(".") or not entry.is_file() or entry.is_symlink():
                continue
            stored = self._read(entry)
            if stored is not None:
                found.append(stored)
        return found

    def _read(self, entry: Path) -> StoredFile[R] | None:
        """The file's record, or why it is unusable; None when the file is gone."""
        modified = None
        try:
            modified = entry.stat().st_mtime
            record = self._parse(entry.read_bytes())
            if record.operation_id != entry.name:
                raise StoreError(f"operation_id {record.operation_id!r} differs from the file name")
        except FileNotFoundError:
            return None
        except (StoreError, OSError) as error:
            return StoredFile(entry, None, str(error), modified)
        return StoredFile(entry, record, None, modified)

    def quarantine(self, entry: Path, why: str) -> None:
        quarantine(entry, f"operation file: {why}")


def operation_store(firmware_dir: Path) -> RecordStore[OperationRecord]:
    return RecordStore(firmware_dir, OperationRecord.from_json)


def fetch_store(firmware_dir: Path) -> RecordStore[FetchRecord]:
    return RecordStore(firmware_dir / FETCHING_DIR, FetchRecord.from_json)


Written = Callable[[StoreError | None], None]
_Done = Callable[[Exception | None], None]


class StoreWriter:
    """Runs store writes in one thread of its own, in the order they were submitted, in groups.

    `submit(write, then)` returns at once; `then(error)` runs on the event loop once `write`
    has finished (durable, for a `RecordStore.save`), with its StoreError or None. Callbacks
    run in the order of the writes, so whoever publishes in `then` announces only what is on
    disk, and a later write (a delete) never overtakes an earlier one (a save). `await
    write(w)` is the same for a coroutine: it returns once `w` is durable, or raises its error.

    Group commit: the writes submitted while a group is on disk form the next group, written
    one after the other with one fsync per directory at the end (`grouped_commit`), and come
    back to the event loop in one hop. Under load groups grow, so a fleet's records cost about
    one fsync each and the loop is woken once per group, not once per write.
    """

    def __init__(self) -> None:
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="store")
        self._queued: list[tuple[Callable[[], None], _Done]] = []
        self._group: asyncio.Future[list[Exception | None]] | None = None

    def submit(self, write: Callable[[], None], then: Written | None = None) -> None:
        self._enqueue(write, functools.partial(_as_store_error, then))

    async def write(self, write: Callable[[], None]) -> None:
        """Run `write` in the next group; return once its group is durable, or raise what
        it raised."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def written(error: Exception | None) -> None:
            if done.done():
                return  # the waiter was cancelled
            if error is None:
                done.set_result(None)
            else:
                done.set_exception(error)

        self._enqueue(write, written)
        await done

    def _enqueue(self, write: Callable[[], None], done: _Done) -> None:
        self._queued.append((write, done))
        if self._group is None:
            self._start_group()

    def _start_group(self) -> None:
        group, self._queued = self._queued, []
        writes = [write for write, _ in group]
        future = asyncio.get_running_loop().run_in_executor(self._thread, _write_group, writes)
        self._group = future
        future.add_done_callback(functools.partial(self._group_done, group))

    def _group_done(
        self,
        group: list[tuple[Callable[[], None], _Done]],
        future: asyncio.Future[list[Exception | None]],
    ) -> None:
        self._group = None
        if future.cancelled():
            return
        if self._queued:
            self._start_group()  # what came meanwhile goes to disk while we report
        for (_, done), error in zip(group, future.result(), strict=True):
            done(error)

    async def drain(self) -> None:
        """Wait for every write submitted so far, and for those their callbacks submit."""
        # `_group_done` is the future's first done callback: it has run (and started the next
        # group, if any) by the time this task resumes.
        while self._group is not None:
            await asyncio.shield(self._group)

    async def close(self) -> None:
        """Wait for every write, then stop the thread (a later submit() is an error)."""
        await self.drain()
        self._thread.shutdown(wait=False)


def _write_group(writes: list[Callable[[], None]]) -> list[Exception | None]:
    """Run the writes in order, one directory fsync each at the end: each one's error or None."""
    errors: list[Exception | None] = []
    with grouped_commit():
        for write in writes:
            try:
                write()
            except Exception as error:  # handed to whoever waits for this write
                errors.append(error)
            else:
                errors.append(None)
    return errors


def _as_store_error(then: Written | None, error: Exception | None) -> None:
    if error is not None and not isinstance(error, StoreError):
        log.error("unexpected error while writing", exc_info=error)
        error = StoreError(f"unexpected error while writing: {error}")
    if then is not None:
        then(error)
