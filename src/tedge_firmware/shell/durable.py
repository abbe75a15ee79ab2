"""Durability helpers shared by everything that writes files atomically (temp file, fsync,
rename): the rename itself only survives a power loss once its directory is fsynced."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def fsync_directory(directory: Path) -> None:
    """Make a rename in `directory` durable. Best effort: the file is already in place, and
    some file systems refuse fsync on a directory."""
    with contextlib.suppress(OSError):
        descriptor = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
