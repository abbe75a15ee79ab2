"""File helpers shared by everything that keeps state on disk: atomic writes (temp file,
fsync, rename: the rename itself only survives a power loss once its directory is fsynced),
moving an unusable file aside instead of deleting evidence, and hashing a file."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)

# The directories whose fsync `write_atomically` leaves to the end of a `grouped_commit()`
# block of this thread (None: fsync each at once).
_group = threading.local()

# Where unusable state files go, beside the directory they were found in.
CORRUPT_DIR = ".corrupt"


def fsync_directory(directory: Path) -> None:
    """Make a rename in `directory` durable. Best effort: the file is already in place, and
    some file systems refuse fsync on a directory."""
    with contextlib.suppress(OSError):
        descriptor = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


@contextlib.contextmanager
def grouped_commit() -> Iterator[None]:
    """Within the block, `write_atomically` in this thread leaves the fsync of each directory
    to the end, where each directory is fsynced once: n records written together cost n + 1
    fsyncs instead of 2n (group commit). Nothing written in the block is durable before the
    block ends: tell no one about it before."""
    directories: set[Path] = set()
    _group.directories = directories
    try:
        yield
    finally:
        _group.directories = None
        for directory in directories:
            fsync_directory(directory)


def write_atomically(
    target: Path,
    data: bytes,
    *,
    mode: int = 0o644,
    temp: Path | None = None,
    prepare: Callable[[int], None] | None = None,
) -> None:
    """Replace `target` with `data` so that a crash leaves the old file or the new one, never
    a part: a temp file beside it (`temp`, default `.<name>.tmp`), written with `mode`, given
    to `prepare(fd)` (e.g. to copy an owner), fsynced, renamed over `target`, then the
    directory fsynced (at the end of the enclosing `grouped_commit()`, if any). OSError as
    raised; the temp file is removed then."""
    temp = temp or target.with_name(f".{target.name}.tmp")
    try:
        # never through a link someone put in the temp file's place
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
        try:
            os.fchmod(fd, mode)  # whatever the umask
            if prepare is not None:
                prepare(fd)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
    grouped: set[Path] | None = getattr(_group, "directories", None)
    if grouped is None:
        fsync_directory(target.parent)
    else:
        grouped.add(target.parent)


def quarantine(path: Path, why: str) -> None:
    """Move an unusable state file to `.corrupt/` beside it (kept for a post-mortem, never
    read again); one error line either way, since the caller carries on without it."""
    corrupt = path.parent / CORRUPT_DIR
    try:
        corrupt.mkdir(exist_ok=True)
        os.replace(path, corrupt / path.name)
        log.error("unusable state file %s (%s): moved to %s", path, why, corrupt)
    except OSError as error:
        log.error("unusable state file %s (%s), cannot move it aside: %s", path, why, error)


def sha256_of_file(path: Path) -> str:
    """Lowercase hex SHA-256 of a file (constant memory; blocking: run it in a thread)."""
    with path.open("rb") as source:
        return hashlib.file_digest(source, "sha256").hexdigest()
