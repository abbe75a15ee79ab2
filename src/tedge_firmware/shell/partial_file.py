"""The durable partial file of one download, and the writer thread that fills it.

`<target>.part` receives the body, `<target>.part.json` (the resume record) says which version
of which url those bytes are. Every `PartFile` method but the constructor runs in a worker
thread; `WritePipeline` runs them in order, in a thread of the transfer's own, with a bounded
number of chunks in flight. Names ending in `.part`, `.part.json` and `.part.json.tmp` beside
a target are working files, never cache entries (`is_working_file`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import functools
import hashlib
import logging
import os
import shutil
import stat
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from tedge_firmware.core.http import OriginHeaders
from tedge_firmware.core.resume import (
    MAX_RESUME_RECORD_BYTES,
    RestartPlan,
    ResumeState,
    encode_resume_state,
    plan_restart,
)
from tedge_firmware.core.text import one_line
from tedge_firmware.shell.download_failures import AttemptFailed, Failure
from tedge_firmware.shell.durable import fsync_directory, write_atomically

# Its lines are the downloader's, under the downloader's logger name.
logger = logging.getLogger("tedge_firmware.shell.downloader")

PART_SUFFIX = ".part"
RECORD_SUFFIX = ".part.json"
RECORD_TEMP_SUFFIX = ".part.json.tmp"

# The default free-space reserve: 5% of the filesystem, at most 64 MiB.
RESERVE_FRACTION = 0.05
RESERVE_CAP = 64 << 20

_REHASH_CHUNK = 1 << 20

# Start the disk writing every this many new bytes. Measured on the benchmark machine (1 GiB
# from nginx, see docs/benchmarks.md): 1 to 16 MiB performed the same within noise, 64 MiB left
# more for the final fsync (20 ms instead of 2 ms).
WRITEBACK_STEP = 4 << 20

FreeSpace = Callable[[Path], int]

# sync_file_range(fd, offset, nbytes, flags) -> 0 or -1; in the shape of the libc function.
StartWriteback = Callable[[int, int, int, int], int]
SYNC_FILE_RANGE_WRITE = 2  # <fcntl.h>: start writing dirty pages in the range, do not wait


@functools.cache
def _libc_sync_file_range() -> StartWriteback | None:
    """The C library's sync_file_range (Linux only; Python's os module does not offer it)."""
    import ctypes  # at the first download: an idle daemon does without its ~0.4 MiB

    try:
        # CDLL(None): the symbols already loaded into the process, which include the C
        # library's (glibc and musl alike), without searching for its file.
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    # glibc and musl both declare the offsets as 64-bit on every architecture.
    function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    function.restype = ctypes.c_int
    result: StartWriteback = function
    return result


def _sync_file_range(descriptor: int, offset: int, count: int, flags: int) -> int:
    """sync_file_range, found in the C library at the first call; -1 where there is none."""
    function = _libc_sync_file_range()
    return -1 if function is None else function(descriptor, offset, count, flags)


def _last_c_error() -> int:
    import ctypes

    return ctypes.get_errno()


SYNC_FILE_RANGE: StartWriteback | None = (
    _sync_file_range if sys.platform.startswith("linux") else None
)


def is_working_file(name: str) -> bool:
    """Whether a file name is one of the downloader's working files (not a cache entry)."""
    return name.endswith((PART_SUFFIX, RECORD_SUFFIX, RECORD_TEMP_SUFFIX))


def free_bytes(directory: Path) -> int:
    """Bytes an unprivileged process may still write in `directory`'s filesystem."""
    return shutil.disk_usage(directory).free


@dataclass(frozen=True)
class DownloadResult:
    """A completed download: where it is, its lowercase hex SHA-256, its size in bytes and
    what the origin said about caching it."""

    path: Path
    sha256: str
    size: int
    origin: OriginHeaders = field(default_factory=OriginHeaders, compare=False)


@dataclass(frozen=True)
class NotModified:
    """A conditional download answered `304`: the caller's copy is still the origin's."""

    origin: OriginHeaders


@dataclass(frozen=True)
class Space:
    """The free-space check: how to read free bytes, and the reserve (None: the default)."""

    free_space: FreeSpace
    reserve_bytes: int | None

    def reserve(self, directory: Path) -> int:
        if self.reserve_bytes is not None:
            return self.reserve_bytes
        return min(RESERVE_CAP, int(shutil.disk_usage(directory).total * RESERVE_FRACTION))


# ---------------------------------------------------------------------------------------------
# Writing off the event loop, in order, with a bounded number of chunks in flight.


class WritePipeline:
    """Runs file steps (writes, truncation, checks) in a thread of its own, in order.

    At most `depth` steps wait in the queue. A step's failure is kept and raised by the next
    put() or by finish(); later steps are then skipped, so that put() never blocks on a dead
    writer.

    One thread per pipeline rather than the event loop's shared pool: with the pool, a step
    could start before the thread that ran the previous one was back in the pool, so the pool
    grew and consecutive steps ran in different threads (more wake-ups and context switches:
    measured about 5700 voluntary and 1600 involuntary switches per GiB against 4100 and 700).
    """

    def __init__(self, depth: int, *, name: str) -> None:
        self._queue: asyncio.Queue[Callable[[], None] | None] = asyncio.Queue(depth)
        self._error: AttemptFailed | None = None
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="download")
        self._worker = asyncio.create_task(self._run(), name=f"write {name}")

    async def put(self, step: Callable[[], None]) -> None:
        self._raise_if_failed()
        await self._queue.put(step)

    async def finish(self, last: Callable[[], None] | None = None) -> None:
        """Queue a last step (if any), wait until all steps have run, raise a failure."""
        if last is not None and self._error is None:
            await self._queue.put(last)
        await self._queue.put(None)
        await self._worker
        self._raise_if_failed()

    def abandon(self) -> None:
        """Stop (on cancellation); a step already running in its thread still completes."""
        self._worker.cancel()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            finished = False
            while not finished:
                # Whatever is queued goes to the thread in one hop (each hop wakes two threads):
                # a small download's first steps and its data, or the steps that queued up
                # while the disk was busy.
                queued = [await self._queue.get()]
                while not self._queue.empty():
                    queued.append(self._queue.get_nowait())
                steps = [step for step in queued if step is not None]
                finished = len(steps) < len(queued)  # finish() puts None last, then nothing
                if steps and self._error is None:
                    try:
                        await loop.run_in_executor(self._thread, _run_in_order, steps)
                    except AttemptFailed as error:
                        self._error = error
        finally:
            # Without waiting: a step still running (we are being cancelled) completes in
            # its thread, which then ends.
            self._thread.shutdown(wait=False)

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error


def _run_in_order(steps: list[Callable[[], None]]) -> None:
    """Run the steps one after the other; the first failure stops the rest."""
    for step in steps:
        step()


# ---------------------------------------------------------------------------------------------
# The partial file and its resume record. Every method but the constructor runs in a worker
# thread; the lock makes a release wait for a write still in progress, and steps that come
# after a release (a cancellation cut the pipeline short) do nothing. Since the steps run in
# order (truncate, then record, then data), a release between any two of them leaves a
# consistent pair: an empty file, or a record with bytes of the version it describes.


class Writeback:
    """Asks the kernel to start writing a file's new pages every `step` bytes, without waiting.

    A head start for the final fsync, never a guarantee of its own: when the call is missing
    or fails (a filesystem may refuse it), it is not tried again and nothing else changes.
    """

    def __init__(self, start: StartWriteback | None, step: int = WRITEBACK_STEP) -> None:
        self._start = start
        self._step = step
        self._begin = 0  # the bytes before this offset were already handed to the kernel

    def advance(self, descriptor: int, end: int) -> None:
        """The file now holds `end` bytes: start writing the new ones once a step gathered."""
        start = self._start
        if start is None or end - self._begin < self._step:
            return
        if start(descriptor, self._begin, end - self._begin, SYNC_FILE_RANGE_WRITE) != 0:
            reason = os.strerror(_last_c_error() or errno.ENOSYS)
            logger.debug("No early writeback (sync_file_range: %s); fsync does it all", reason)
            self._start = None
        self._begin = end

    def restart(self) -> None:
        """The file was emptied: count from its start again."""
        self._begin = 0


class PartFile:
    def __init__(self, target: Path, space: Space, writeback: Writeback) -> None:
        self.target = target
        self.path = target.with_name(target.name + PART_SUFFIX)
        self.record_path = target.with_name(target.name + RECORD_SUFFIX)
        self.record_temp = target.with_name(target.name + RECORD_TEMP_SUFFIX)
        self.size = 0
        self.committed = False
        self._released = False
        self._space = space
        self._writeback = writeback
        self._file: BinaryIO | None = None
        self._hash = hashlib.sha256()
        self._recorded: ResumeState | None = None  # the record on disk, as far as we know
        self._lock = threading.Lock()
        self._stopping = threading.Event()

    def open(self, url: str) -> RestartPlan:
        """Open the partial file; keep (and hash again) what an earlier run left, if usable."""
        with self._lock, self._mapped("open"):
            plan = plan_restart(self._read_record(), url=url, part_size=self._part_size())
            if plan.keep:
                self._file = _open_file(self.path, os.O_RDWR)
                self._rehash(plan.keep)
                self._recorded = plan.state
            else:
                # Empty the partial file first, then drop the record: killed in between, the
                # next run finds an empty file, which it cannot mistake for a resumable one.
                self.path.unlink(missing_ok=True)  # also a symlink put there: never follow it
                self._file = _open_file(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
                self._remove_record()
        return plan

    def reset(self) -> None:
        with self._lock, self._mapped("truncate"):
            if self._released:
                return
            file = self._opened()
            file.seek(0)
            file.truncate()
            # Durable before a new resume record can be: after a power loss, a record of the
            # new version must not sit beside bytes of the old one. Rare, so cheap.
            os.fsync(file.fileno())
            self._hash = hashlib.sha256()
            self.size = 0
            self._writeback.restart()

    def write(self, pieces: Iterable[bytes | bytearray]) -> None:
        """Append the pieces, in order (each one as it is: no gathering copy)."""
        with self._lock, self._mapped("write"):
            if self._released:
                return
            file = self._opened()
            for piece in pieces:
                # Hash, then write: the write copies the piece while the hash has just pulled
                # it into this core's cache (measured slightly faster than the other order,
                # see docs/benchmarks.md). A failed write fails the download or, on a stop,
                # leaves a partial file that the next run hashes again from disk: the hash of
                # bytes that did not reach the file is never used.
                self._hash.update(piece)
                file.write(piece)
                self.size += len(piece)
            self._writeback.advance(file.fileno(), self.size)

    def record(self, state: ResumeState) -> None:
        """Write the resume record atomically (temp file, fsync, rename, fsync directory)."""
        with self._lock, self._mapped("write the resume record of"):
            if self._released:
                return
            write_atomically(self.record_path, encode_resume_state(state), temp=self.record_temp)
            self._recorded = state

    def ensure_space(self, needed: int) -> None:
        directory = self.target.parent
        with self._mapped("inspect"):
            available = self._space.free_space(directory)
            reserve = self._space.reserve(directory)
        if needed + reserve > available:
            detail = (
                f"not enough disk space in {directory}: "
                f"need {needed} bytes (+{reserve} reserve), {available} available"
            )
            short = needed + reserve - available
            raise AttemptFailed(Failure(detail, transient=False, space_short=short))

    def commit(self, expected_sha256: str | None) -> DownloadResult:
        """Check the digest, make the file durable and rename it to the target."""
        with self._lock, self._mapped("save"):
            digest = self._hash.hexdigest()
            if expected_sha256 is not None and digest != expected_sha256:
                detail = f"digest mismatch: server says {expected_sha256}, got {digest}"
                raise AttemptFailed(Failure(detail, transient=False))
            file = self._opened()
            file.flush()
            # Waits for the writeback started during the download, and writes the rest.
            os.fsync(file.fileno())
            file.close()
            self._file = None
            os.replace(self.path, self.target)
            self.committed = True
            # Only now: a record without its partial file is dropped by the next run.
            self._remove_record(quietly=True)
            fsync_directory(self.target.parent)
        return DownloadResult(self.target, digest, self.size)

    def release(self, *, keep: bool) -> None:
        """Close; remove the partial file and its record unless `keep` and resumable."""
        self._stopping.set()  # a re-hash in progress stops at its next chunk
        with self._lock:
            if self.committed or self._released:
                return
            self._released = True
            if self._file is not None:
                self._close_quietly(self._file)
                self._file = None
            if keep and self._resumable():
                logger.info("Keeping %s (%d bytes) to resume later", self.path, self._disk_size())
                return
            for path in (self.path, self.record_path, self.record_temp):
                try:
                    path.unlink(missing_ok=True)
                except OSError as exc:
                    logger.warning("Cannot remove %s: %s", path, exc.strerror)

    def _resumable(self) -> bool:
        state = self._recorded
        return state is not None and state.validator is not None and self._disk_size() > 0

    def _disk_size(self) -> int:
        return self._part_size() or 0

    def _part_size(self) -> int | None:
        """Size of the partial file if it is a regular file, None if there is none."""
        try:
            info = os.lstat(self.path)
        except FileNotFoundError:
            return None
        return info.st_size if stat.S_ISREG(info.st_mode) else None

    def _read_record(self) -> bytes | None:
        try:
            with _open_file(self.record_path, os.O_RDONLY) as source:
                return source.read(MAX_RESUME_RECORD_BYTES + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:  # a directory or a symlink in its place: not our record
            logger.warning("Cannot read %s: %s", self.record_path, exc.strerror or exc)
            return b""

    def _remove_record(self, *, quietly: bool = False) -> None:
        try:
            self.record_path.unlink(missing_ok=True)
        except OSError as exc:
            if not quietly:
                raise
            logger.warning("Cannot remove %s: %s", self.record_path, exc.strerror)

    def _rehash(self, keep: int) -> None:
        """Hash the first `keep` bytes again (constant memory) and cut the file there."""
        file = self._opened()
        remaining = keep
        while remaining and not self._stopping.is_set():
            chunk = file.read(min(_REHASH_CHUNK, remaining))
            if not chunk:
                break  # shorter than it was a moment ago: keep what is there
            self._hash.update(chunk)
            remaining -= len(chunk)
        if self._stopping.is_set():
            return  # released while hashing: leave the file as it was
        self.size = keep - remaining
        file.seek(self.size)
        file.truncate()

    def _opened(self) -> BinaryIO:
        if self._file is None:
            raise RuntimeError(f"{self.path} is not open")  # a bug in the downloader
        return self._file

    def _close_quietly(self, file: BinaryIO) -> None:
        try:
            file.close()
        except OSError as exc:
            logger.warning("Cannot close %s: %s", self.path, exc.strerror)

    @contextmanager
    def _mapped(self, action: str) -> Iterator[None]:
        try:
            yield
        except FileNotFoundError as exc:
            directory = self.target.parent
            if not directory.is_dir():
                detail = f"target directory {directory} does not exist"
                raise AttemptFailed(Failure(detail, transient=False)) from exc
            raise AttemptFailed(
                Failure(f"cannot {action} {self.path}: file vanished", False)
            ) from exc
        except OSError as exc:
            reason = one_line(exc.strerror or str(exc), limit=120)
            raise AttemptFailed(Failure(f"cannot {action} {self.path}: {reason}", False)) from exc


def _open_file(path: Path, flags: int) -> BinaryIO:
    """Open without following a symlink: our working files are never links to elsewhere."""
    descriptor = os.open(path, flags | os.O_NOFOLLOW, 0o644)
    modes = {os.O_RDONLY: "rb", os.O_WRONLY: "wb", os.O_RDWR: "r+b"}
    return os.fdopen(descriptor, modes[flags & os.O_ACCMODE])  # type: ignore[return-value]
