"""The supported-operations directory on disk, `<config-dir>/operations/c8y/`, and its watcher.

`OperationsDirectory` scans the directory into a `core.registration.Snapshot` (only regular
files with valid names and TOML content count; hostile directory names are refused and logged
once) and creates or removes the file of one declared operation without ever writing outside
the directory (no following of symlinks, paths built from validated names only).

`OperationsWatcher` tells when to look again. It uses watchfiles (file-system notifications:
inotify on Linux), falls back to polling when notifications cannot be had (inotify limits,
some network file systems) or when asked to, and also ticks every `resync` seconds without a
change, so that an event missed for any reason is caught by the next scan. watchfiles groups
a burst of changes (until `step` ms pass quietly, at most `debounce` ms): one tick per burst.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import re
import stat
import threading
import time
from collections.abc import AsyncGenerator, Callable, Iterator
from pathlib import Path

from watchfiles import awatch

from tedge_firmware.core.registration import (
    MAX_OPERATION_FILE_BYTES,
    Device,
    DeviceOperations,
    FileFingerprint,
    Snapshot,
    child_dir_problem,
    operation_file_problem,
    operation_name_problem,
)
from tedge_firmware.errors import StoreError

log = logging.getLogger(__name__)

_RESTART_DELAY = 0.5  # seconds between the end of a failed watch and the next one
# A child directory changed this recently is listed again whatever its stat says: file times
# are coarse (a clock tick), so an entry added within the tick of the last listing would
# leave the directory's times as they were.
_RACY_S = 2.0
_DIR_MODE = 0o755
_FILE_MODE = 0o644
_StatKey = tuple[int, int, int]  # inode, size, mtime_ns


class OperationsDirectory:
    """`<config-dir>/operations/c8y/`: scanning, and the files of declared operations."""

    def __init__(
        self,
        root: Path,
        main_device_id: str | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.root = root
        self.main_device_id = main_device_id
        self._clock = clock  # the wall clock, to compare with file times
        # path → (stat key, problem or None): a file is read again only when it changed
        self._checked: dict[str, tuple[_StatKey, str | None]] = {}
        self._refused: set[str] = set()  # directory names already logged as refused
        self._ignored: set[str] = set()  # file paths already logged as ignored
        self._unreadable: set[str] = set()  # directory problems already logged
        # child directory name → (its stat key, what it declared) when its last listing had
        # nothing to ignore: unchanged since, it is not listed again (10,000 children)
        self._listed: dict[str, tuple[_StatKey, DeviceOperations]] = {}

    def ensure_exists(self) -> None:
        """Create the directory and its parent (`operations/`) when missing.

        Not further up: a config directory that does not exist is a mistake to report, not
        to paper over. StoreError when impossible.
        """
        for directory in (self.root.parent, self.root):
            try:
                directory.mkdir(mode=_DIR_MODE, exist_ok=True)
            except OSError as error:
                raise StoreError(f"cannot create {directory}: {error.strerror}") from error

    # --- scanning ---------------------------------------------------------------------------

    def scan(self) -> Snapshot:
        """What the directory declares now (blocking: run it in a thread)."""
        checked, self._checked = self._checked, {}
        listed, self._listed = self._listed, {}
        refused: set[str] = set()
        ignored: set[str] = set()
        main: set[FileFingerprint] = set()
        children: dict[str, DeviceOperations] = {}
        for entry in _entries(self.root, self._unreadable):
            if _is_dir(entry):
                problem = child_dir_problem(entry.name, self.main_device_id)
                if problem is None:
                    children[entry.name] = self._device(entry, checked, listed, ignored)
                else:
                    refused.add(entry.name)
                    if entry.name not in self._refused:
                        log.warning("ignored child directory %s: %s", _shown(entry.path), problem)
            else:
                counted = self._operation(entry, checked, ignored)
                if counted is not None:
                    main.add(counted)
        self._refused, self._ignored = refused, ignored
        return Snapshot(main=DeviceOperations(frozenset(main)), children=children)

    def _device(
        self,
        entry: os.DirEntry[str],
        checked: dict[str, tuple[_StatKey, str | None]],
        listed: dict[str, tuple[_StatKey, DeviceOperations]],
        ignored: set[str],
    ) -> DeviceOperations:
        key = _directory_key(entry, self._clock())
        known = listed.get(entry.name)
        unchanged = key is not None and known is not None and known[0] == key
        if unchanged and known is not None and self._still_there(entry.path, known[1], checked):
            self._listed[entry.name] = known
            return known[1]
        files = set()
        ignored_before = len(ignored)
        for item in _entries(Path(entry.path), self._unreadable):
            counted = self._operation(item, checked, ignored)
            if counted is not None:
                files.add(counted)
        operations = DeviceOperations(frozenset(files))
        if key is not None and len(ignored) == ignored_before:
            self._listed[entry.name] = (key, operations)
        return operations

    def _still_there(
        self,
        directory: str,
        operations: DeviceOperations,
        checked: dict[str, tuple[_StatKey, str | None]],
    ) -> bool:
        """Whether every file of an unchanged directory is as it was (content checks kept)."""
        for name, *key in operations.files:
            path = os.path.join(directory, name)
            try:
                info = os.stat(path)  # follows a symlink, as the listing does
            except OSError:
                return False
            previous = checked.get(path)
            if previous is None or [info.st_ino, info.st_size, info.st_mtime_ns] != key:
                return False
            self._checked[path] = previous
        return True

    def _operation(
        self,
        entry: os.DirEntry[str],
        checked: dict[str, tuple[_StatKey, str | None]],
        ignored: set[str],
    ) -> FileFingerprint | None:
        """The fingerprint of an operation file that counts, else None (logged once)."""
        name = entry.name
        if name.startswith("."):
            return None  # editors' and tools' temporary files
        problem = operation_name_problem(name)
        key: _StatKey | None = None
        if problem is None:
            key, problem = self._checked_file(entry, checked)
        if problem is None and key is not None:
            return (name, *key)
        ignored.add(entry.path)
        if entry.path not in self._ignored and problem:
            log.warning("ignored operation file %s: %s", _shown(entry.path), problem)
        return None

    def _checked_file(
        self, entry: os.DirEntry[str], checked: dict[str, tuple[_StatKey, str | None]]
    ) -> tuple[_StatKey | None, str | None]:
        try:
            info = entry.stat()  # follows a symlink, as thin-edge's is_file() does
        except OSError:
            return None, ""  # gone meanwhile, or a dangling symlink: quietly not an operation
        if not stat.S_ISREG(info.st_mode):
            return None, "not a regular file"
        key = (info.st_ino, info.st_size, info.st_mtime_ns)
        previous = checked.get(entry.path)
        problem = previous[1] if previous is not None and previous[0] == key else _content(entry)
        self._checked[entry.path] = (key, problem)
        return key, problem

    # --- declaring --------------------------------------------------------------------------

    def declare(self, device: Device, operation: str) -> bool:
        """Create the empty operation file; False when it is there already.

        StoreError when the names are invalid or the file cannot be created. A child
        directory that is a symlink is refused: nothing is ever created outside the root.
        """
        self._check(device, operation)
        self.ensure_exists()
        try:
            with self._device_fd(device, create=True) as directory:
                fd = os.open(
                    operation,
                    os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                    _FILE_MODE,
                    dir_fd=directory,
                )
                os.close(fd)
        except FileExistsError:
            return False
        except OSError as error:
            where = self._path(device, operation)
            raise StoreError(f"cannot create {where}: {_why(error)}") from None
        return True

    def withdraw(self, device: Device, operation: str) -> bool:
        """Remove the operation file; False when there was none. StoreError otherwise."""
        self._check(device, operation)
        try:
            with self._device_fd(device, create=False) as directory:
                os.unlink(operation, dir_fd=directory)
        except FileNotFoundError:
            return False
        except OSError as error:
            where = self._path(device, operation)
            raise StoreError(f"cannot remove {where}: {_why(error)}") from None
        return True

    def _check(self, device: Device, operation: str) -> None:
        problem = operation_name_problem(operation)
        if problem is None and device is not None:
            problem = child_dir_problem(device, self.main_device_id)
        if problem is not None:
            raise StoreError(problem)

    @contextlib.contextmanager
    def _device_fd(self, device: Device, *, create: bool) -> Iterator[int]:
        """An open descriptor of the device's directory (the root for the main device)."""
        root = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if device is None:
                yield root
                return
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(device, _DIR_MODE, dir_fd=root)
            if stat.S_ISLNK(os.lstat(device, dir_fd=root).st_mode):
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), device)
            # O_NOFOLLOW: a symlink swapped in after the check fails here (ENOTDIR) all the same
            child = os.open(device, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=root)
            try:
                yield child
            finally:
                os.close(child)
        finally:
            os.close(root)

    def _path(self, device: Device, operation: str) -> str:
        directory = self.root if device is None else self.root / device
        return _shown(str(directory / operation))


def _entries(directory: Path, unreadable: set[str]) -> list[os.DirEntry[str]]:
    """The entries of `directory`; none when it is missing or unreadable (logged once)."""
    try:
        with os.scandir(directory) as entries:
            return list(entries)
    except FileNotFoundError:
        return []
    except OSError as error:
        text = f"cannot read {_shown(str(directory))}: {error.strerror}"
        if text not in unreadable:
            log.warning("%s", text)
        unreadable.add(text)
        return []


def _directory_key(entry: os.DirEntry[str], now: float) -> _StatKey | None:
    """The directory's stat key, or None when it changed too lately to be trusted (or is gone).

    The change time is in the key: unlike the modification time, no tool can set it back (an
    archive extracted over the directory restores its mtime)."""
    try:
        info = entry.stat()
    except OSError:
        return None
    if now - info.st_ctime < _RACY_S:
        return None
    return (info.st_ino, info.st_ctime_ns, info.st_mtime_ns)


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def _content(entry: os.DirEntry[str]) -> str | None:
    """Why the file's content does not count, or None. Never blocks on a FIFO swapped in."""
    try:
        fd = os.open(entry.path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as error:
        return f"cannot be read ({error.strerror})"
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return "not a regular file"
        with os.fdopen(fd, "rb", closefd=False) as file:
            content = file.read(MAX_OPERATION_FILE_BYTES + 1)
    except OSError as error:
        return f"cannot be read ({error.strerror})"
    finally:
        os.close(fd)
    return operation_file_problem(content)


def _why(error: OSError) -> str:
    if error.errno == errno.ELOOP:
        return "the child directory is a symlink, which is never written through"
    if error.errno == errno.ENOTDIR:
        return "the child's entry is not a directory"
    return error.strerror or str(error)


_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f]")


def _shown(path: str) -> str:
    """A path fit for one log line: control characters escaped, surrogates shown."""
    text = path.encode("utf-8", "backslashreplace").decode("utf-8")
    return _UNPRINTABLE.sub(lambda match: f"\\x{ord(match.group()):02x}", text)


class OperationsWatcher:
    """Ticks when `directory` may have changed; see the module docstring.

    `changes()` is meant for one consumer. `close()` ends it within `step` ms (the watching
    thread checks a flag); call it before cancelling the consuming task, which otherwise
    waits for that thread for up to `resync` seconds.
    """

    def __init__(
        self,
        directory: OperationsDirectory,
        *,
        force_polling: bool = False,
        poll_delay_ms: int = 300,
        step_ms: int = 50,
        debounce_ms: int = 1_600,
        resync: float = 10.0,
    ) -> None:
        self.directory = directory
        self.polling = force_polling
        self._poll_delay_ms = poll_delay_ms
        self._step_ms = step_ms
        self._debounce_ms = debounce_ms
        self.resync = resync
        self._resync_ms = max(1, int(resync * 1000))
        self._stop = threading.Event()  # read by watchfiles' thread
        # Set once the watch is in place: a change from then on is seen. Look at the directory
        # after it, and nothing done meanwhile is missed.
        self.ready = asyncio.Event()
        self._watching = False  # the current watch was set up (a failure is not a start-up one)
        self._failures: set[str] = set()  # failures already logged

    def close(self) -> None:
        self._stop.set()

    @property
    def closed(self) -> bool:
        return self._stop.is_set()

    async def changes(self) -> AsyncGenerator[None, None]:
        """One tick per burst of changes and per quiet `resync` period, until `close()`.

        StoreError when the directory can be watched neither with notifications nor by polling.
        """
        while not self._stop.is_set():
            if not await self._prepared():
                self.ready.set()  # as ready as it gets: callers go on, ticks keep coming
                yield  # the directory cannot be created: scan again later anyway
                continue
            self._watching = False
            try:
                async for _ in self._watch():
                    yield
                    if not self.directory.root.is_dir():
                        log.warning("%s was removed: creating it again", self.directory.root)
                        break
            except FileNotFoundError:
                continue  # removed just before the watch started
            except Exception as error:  # watchfiles raises RuntimeError, OSError, ExceptionGroup
                if self._watching:
                    await self._after_failure(_innermost(error))
                    yield  # something changed: look again
                    continue
                if self.polling:
                    raise StoreError(f"cannot watch {self.directory.root}: {error}") from error
                log.warning(
                    "no file-system notifications for %s (%s): polling every %d ms instead",
                    self.directory.root,
                    _innermost(error),
                    self._poll_delay_ms,
                )
                self.polling = True

    async def _after_failure(self, error: BaseException) -> None:
        """A running watch failed (e.g. on a name that is not UTF-8): start it again, not too
        often, and say so once per kind of failure."""
        text = f"{type(error).__name__}: {error}"
        if text not in self._failures:
            self._failures.add(text)
            log.warning("watching %s failed (%s): watching again", self.directory.root, text)
        await asyncio.sleep(_RESTART_DELAY)

    async def _prepared(self) -> bool:
        try:
            self.directory.ensure_exists()
        except StoreError as error:
            text = str(error)
            level = logging.DEBUG if text in self._failures else logging.ERROR
            self._failures.add(text)
            log.log(level, "%s; trying again every %g s", text, self.resync)
            await asyncio.to_thread(self._stop.wait, self.resync)
            return False
        return True

    def _watch_started(self) -> None:
        self._watching = True
        self.ready.set()

    async def _watch(self) -> AsyncGenerator[object, None]:
        watch = awatch(
            self.directory.root,
            watch_filter=None,  # every change is a reason to look; the scan decides
            debounce=self._debounce_ms,
            step=self._step_ms,
            stop_event=self._stop,
            rust_timeout=self._resync_ms,
            yield_on_timeout=True,
            force_polling=self.polling,
            poll_delay_ms=self._poll_delay_ms,
            recursive=True,
            ignore_permission_denied=True,
        )
        async with contextlib.aclosing(watch) as batches:
            # Runs at the first suspension of the first __anext__, which comes after awatch
            # has set up its watches (synchronously, before it waits for the first batch).
            asyncio.get_running_loop().call_soon(self._watch_started)
            async for batch in batches:
                yield batch


def _innermost(error: BaseException) -> BaseException:
    """The first leaf of an exception group (anyio wraps watchfiles' errors in one)."""
    while isinstance(error, BaseExceptionGroup) and error.exceptions:
        error = error.exceptions[0]
    return error
