"""Firmware cache (`data.path/cache/<FILE_ID>`) and its publication to children as symlinks
(`data.path/file-transfer/<child>/firmware_update/<FILE_ID>` → the cache entry)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

class FirmwareCache:
    def __init__(self, cache_dir: Path, file_transfer_dir: Path) -> None:
        self.cache_dir = cache_dir
        self.file_transfer_dir = file_transfer_dir

    def entry(self, file_id: str) -> Path:
        return self.cache_dir / file_id

    def is_cached(self, file_id: str) -> bool:
        entry = self.entry(file_id)
        return entry.is_file() and not entry.is_symlink()

    def link_path(self, child_id: str, file_id: str) -> Path:
        return self.file_transfer_dir / child_id / "firmware_update" / file_id

    def relative_path(self, child_id: str, file_id: str) -> str:
        """The path under the file-transfer root, as it appears in the child's URL."""
        return f"{child_id}/firmware_update/{file_id}"

    def publish(self, child_id: str, file_id: str) -> Path:
        """Create (or replace) the child's symlink to the cache entry, atomically."""
        link = self.link_path(child_id, file_id)
        link.parent.mkdir(parents=True, exist_ok=True)
        target = self.entry(file_id).absolute()
        if link.is_symlink() and os.readlink(link) == str(target):
            return link
        temp = link.with_name(f".{file_id}.link")
        temp.unlink(missing_ok=True)
        os.symlink(target, temp)
        os.replace(temp, link)
        return link

    def unpublish(self, child_id: str, file_id: str) -> None:
        link = self.link_path(child_id, file_id)
        try:
            if link.is_symlink():
                link.unlink()
        except OSError as error:
            log.warning("cannot remove published firmware %s: %s", link, error)
