"""Firmware cache (`data.path/cache/<FILE_ID>`) and its publication to children as symlinks
(`data.path/file-transfer/<child>/firmware_update/<FILE_ID>` → the cache entry).

An entry's last use is its access time, set explicitly when it is downloaded or published
(mount options such as `noatime` only stop the kernel's own updates). The modification time is
left alone: the file-transfer service derives the entry's ETag from it, and a child resuming a
download with `If-Range` must keep getting the same ETag.

Publishing and evicting happen in different processes (the service, `tedge-firmware cache
prune`), so both lock the cache directory (`flock`): an entry is only removed when no link points to
it, and a link is only made to an entry that is there.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

from tedge_firmware.core.access import FIRMWARE_DIR
from tedge_firmware.core.cache_policy import CacheEntry
from tedge_firmware.shell.downloader import is_working_file

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
        return self.file_transfer_dir / child_id / FIRMWARE_DIR / file_id

    def relative_path(self, child_id: str, file_id: str) -> str:
        """The path under the file-transfer root, as it appears in the child's URL."""
        return f"{child_id}/{FIRMWARE_DIR}/{file_id}"

    def publish(self, child_id: str, file_id: str) -> Path:
        """Create (or replace) the child's symlink to the cache entry, atomically, and count it
        as a use. FileNotFoundError when the entry is gone (evicted meanwhile)."""
        link = self.link_path(child_id, file_id)
        link.parent.mkdir(parents=True, exist_ok=True)
        target = self.entry(file_id).absolute()
        with self._locked(fcntl.LOCK_SH):
            self.touch(file_id)  # raises FileNotFoundError when the entry is not there
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

    def touch(self, file_id: str) -> None:
        """Record a use now (the access time; the modification time, hence the ETag, stays)."""
        entry = self.entry(file_id)
        info = os.stat(entry, follow_symlinks=False)
        os.utime(entry, ns=(time.time_ns(), info.st_mtime_ns), follow_symlinks=False)

    def entries(self) -> list[CacheEntry]:
        """Every complete cached firmware, with the children it is published to."""
        users = self._published()
        found = []
        try:
            listing = list(os.scandir(self.cache_dir))
        except FileNotFoundError:
            return []
        for item in listing:
            if item.name.startswith(".") or is_working_file(item.name):
                continue
            try:
                info = item.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # removed meanwhile
            if not item.is_file(follow_symlinks=False):
                continue
            children = tuple(sorted(users.get(item.name, ())))
            found.append(CacheEntry(item.name, info.st_size, info.st_atime, children))
        return found

    def evict(self, file_id: str) -> bool:
        """Remove the entry unless a child's link points to it now; whether it was removed."""
        with self._locked(fcntl.LOCK_EX):
            if self._published().get(file_id):
                return False
            try:
                self.entry(file_id).unlink()
            except FileNotFoundError:
                return False
        return True

    def _published(self) -> dict[str, set[str]]:
        """FILE_ID → the children whose firmware_update link points into the cache at it."""
        users: dict[str, set[str]] = {}
        cache = self.cache_dir.absolute()
        try:
            children = list(os.scandir(self.file_transfer_dir))
        except FileNotFoundError:
            return users
        for child in children:
            folder = Path(child.path) / FIRMWARE_DIR
            try:
                links = list(os.scandir(folder))
            except (FileNotFoundError, NotADirectoryError):
                continue
            for link in links:
                if not link.is_symlink():
                    continue
                try:
                    target = Path(os.readlink(link.path))
                except OSError:
                    continue
                if target.parent == cache:
                    users.setdefault(target.name, set()).add(child.name)
        return users

    @contextlib.contextmanager
    def _locked(self, kind: int) -> Iterator[None]:
        """flock on the cache directory itself: no lock file to leave behind."""
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(self.cache_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(descriptor, kind)
            yield
        finally:
            os.close(descriptor)
