"""File helpers shared by everything that keeps state on disk: atomic writes (temp file,
fsync, rename: the rename itself only survives a power loss once its directory is fsynced),
moving an unusable file aside instead of deleting evidence, and hashing a file."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

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
