"""Firmware cache, content-addressed, and its publication to children as symlinks.

    data.path/cache/
        sha256/<hex>            the bytes of a firmware, named by their SHA-256: one copy per
                                content, however many URLs serve it
        urls/<FILE_ID>.json     what the cache knows of one URL (`core.freshness.CachedUrl`):
                                its content's SHA-256 and size, the origin's validators and
                                freshness, when the origin last confirmed it
        incoming/<FILE_ID>      a download in progress (with the downloader's working files)
        <FILE_ID>               an entry of the layout before content addressing: moved into
                                `sha256/` by `migrate` at start

A child gets `file-transfer/<child>/firmware_update/<FILE_ID>` → `sha256/<hex>`: the link's name
is the URL's FILE_ID (the legacy protocol's URL says it), its target the bytes the child was
handed. A new version of a URL is new content under another name, so a link of a live operation
never changes under it; old content goes only when no link points to it.

An entry's last use is its content file's access time, set explicitly when it is stored,
confirmed or published (mount options such as `noatime` only stop the kernel's own updates).
The modification time is left alone: the file-transfer service derives the ETag from it, and a
child resuming with `If-Range` must keep getting the same ETag.

Publishing and evicting happen in different processes (the service, `tedge-firmware cache
prune`), so both lock the cache directory (`flock`): content is only removed when no link points
to it, and a link is only made to content that is there.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from tedge_firmware.core.access import FIRMWARE_DIR
from tedge_firmware.core.cache_policy import CacheEntry
from tedge_firmware.core.freshness import CachedUrl, parse_cached_url
from tedge_firmware.shell.downloader import is_working_file
from tedge_firmware.shell.durable import fsync_directory, sha256_of_file, write_atomically

log = logging.getLogger(__name__)

_HEX64 = re.compile(r"[0-9a-f]{64}")
RECORD_SUFFIX = ".json"


class FirmwareCache:
    def __init__(self, cache_dir: Path, file_transfer_dir: Path) -> None:
        self.cache_dir = cache_dir
        self.file_transfer_dir = file_transfer_dir
        self.content_dir = cache_dir / "sha256"
        self.urls_dir = cache_dir / "urls"
        self.incoming_dir = cache_dir / "incoming"

    def content(self, sha256: str) -> Path:
        return self.content_dir / sha256

    def incoming(self, file_id: str) -> Path:
        """Where the download of a URL goes before it is stored."""
        return self.incoming_dir / file_id

    def make_directories(self) -> None:
        for directory in (self.content_dir, self.urls_dir, self.incoming_dir):
            directory.mkdir(parents=True, exist_ok=True)

    # ---- URLs --------------------------------------------------------------------------------

    def lookup(self, file_id: str) -> CachedUrl | None:
        """What the cache knows of a URL, when its content is still there (whole); None
        otherwise (never fetched, evicted, or a damaged record)."""
        try:
            record = parse_cached_url(self._record_path(file_id).read_bytes())
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as error:
            log.warning("cache: cannot read the record of %s: %s", file_id, error)
            return None
        if record is None:
            log.warning("cache: the record of %s is damaged: fetched again", file_id)
            return None
        try:
            size = os.stat(self.content(record.sha256), follow_symlinks=False).st_size
        except FileNotFoundError:
            return None
        return record if size == record.size else None

    def store(self, file_id: str, record: CachedUrl, downloaded: Path) -> None:
        """Keep a completed download as the content of `record` (or drop it, when the same
        bytes are there already) and record the URL."""
        with self._locked(fcntl.LOCK_SH):
            self.make_directories()  # removed by hand meanwhile: a stored firmware still lands
            target = self.content(record.sha256)
            if target.is_file() and target.stat().st_size == record.size:
                downloaded.unlink()  # the same bytes under another URL, or again: one copy
            else:
                os.replace(downloaded, target)
                fsync_directory(self.content_dir)
            self._touch(target)
            self._write_record(file_id, record)

    def confirm(self, file_id: str, record: CachedUrl) -> None:
        """The origin confirmed `record`'s bytes (a `304`): record that, count it as a use."""
        with self._locked(fcntl.LOCK_SH):
            self.urls_dir.mkdir(exist_ok=True)
            self._touch(self.content(record.sha256))
            self._write_record(file_id, record)

    def pin(self, file_id: str, until: float) -> CachedUrl | None:
        """Keep the URL's firmware from eviction until `until` (a later pin wins); the
        record, None when the URL is not cached (any more)."""
        with self._locked(fcntl.LOCK_SH):
            record = self.lookup(file_id)
            if record is None:
                return None
            if record.pinned_until is None or record.pinned_until < until:
                record = replace(record, pinned_until=until)
                self._write_record(file_id, record)
            return record

    def _record_path(self, file_id: str) -> Path:
        return self.urls_dir / f"{file_id}{RECORD_SUFFIX}"

    def _write_record(self, file_id: str, record: CachedUrl) -> None:
        write_atomically(self._record_path(file_id), record.to_json())

    # ---- children ----------------------------------------------------------------------------

    def link_path(self, child_id: str, file_id: str) -> Path:
        return self.file_transfer_dir / child_id / FIRMWARE_DIR / file_id

    def relative_path(self, child_id: str, file_id: str) -> str:
        """The path under the file-transfer root, as it appears in the child's URL."""
        return f"{child_id}/{FIRMWARE_DIR}/{file_id}"

    def publish(self, child_id: str, file_id: str, sha256: str) -> Path:
        """Create (or replace) the child's symlink to the content, atomically, and count it as
        a use. FileNotFoundError when the content is gone (evicted meanwhile)."""
        link = self.link_path(child_id, file_id)
        target = self.content(sha256).absolute()
        with self._locked(fcntl.LOCK_SH):
            self._touch(target)  # raises FileNotFoundError when the content is not there
            try:
                _point(link, target)
            except FileNotFoundError:  # the child's first copy: its directory comes first
                link.parent.mkdir(parents=True, exist_ok=True)
                _point(link, target)
        return link

    def published(self, child_id: str, file_id: str) -> tuple[str, int] | None:
        """The SHA-256 and size of what `child_id` was handed for `file_id` (None: nothing)."""
        link = self.link_path(child_id, file_id)
        target = Path(os.readlink(link)) if link.is_symlink() else None
        if target is None or target.parent != self.content_dir.absolute():
            return None
        return target.name, target.stat().st_size

    def copies(self) -> list[tuple[str, str]]:
        """(child, FILE_ID) of every link into the cache's content."""
        content = self.content_dir.absolute()
        return [
            (link.parent.parent.name, link.name)
            for link, target in self._links()
            if target.parent == content
        ]

    def unpublish(self, child_id: str, file_id: str) -> None:
        link = self.link_path(child_id, file_id)
        try:
            if link.is_symlink():
                link.unlink()
        except OSError as error:
            log.warning("cannot remove published firmware %s: %s", link, error)

    # ---- what is there, and what goes ---------------------------------------------------------

    def entries(self) -> list[CacheEntry]:
        """Every firmware in the cache, with the children it is published to and the URLs
        known to serve it."""
        users = self._published()
        urls: dict[str, set[str]] = {}
        pins: dict[str, float] = {}
        for file_id, record in self._records():
            urls.setdefault(record.sha256, set()).add(record.url or f"(FILE_ID {file_id})")
            if record.pinned_until is not None:
                pins[record.sha256] = max(pins.get(record.sha256, 0.0), record.pinned_until)
        found = []
        try:
            listing = list(os.scandir(self.content_dir))
        except FileNotFoundError:
            return []
        for item in listing:
            if not _HEX64.fullmatch(item.name):
                continue
            try:
                info = item.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # removed meanwhile
            if not item.is_file(follow_symlinks=False):
                continue
            children = tuple(sorted(users.get(item.name, ())))
            known = tuple(sorted(urls.get(item.name, ())))
            entry = CacheEntry(item.name, info.st_size, info.st_atime, children, known)
            found.append(replace(entry, pinned_until=pins.get(item.name)))
        return found

    def evict(self, sha256: str) -> bool:
        """Remove the content (and the URLs that lead to it) unless a child's link points to
        it now; whether it was removed."""
        with self._locked(fcntl.LOCK_EX):
            if self._published().get(sha256):
                return False
            try:
                self.content(sha256).unlink()
            except FileNotFoundError:
                return False
            for file_id, record in self._records():
                if record.sha256 == sha256:
                    self._record_path(file_id).unlink(missing_ok=True)
        return True

    def touch(self, sha256: str) -> None:
        """Record a use now (the access time; the modification time, hence the ETag, stays)."""
        self._touch(self.content(sha256))

    # ---- the layout before content addressing -------------------------------------------------

    def migrate(self) -> int:
        """Move entries of the old layout (`cache/<FILE_ID>`) into `sha256/` (blocking: it
        hashes them), recording each URL without validators (the next operation asks the
        origin), and re-point children's links; partial downloads go to `incoming/` to be
        resumed. The content keeps its inode (a hard link), so a child resuming a download
        across the upgrade keeps its ETag. Returns how many entries were moved."""
        self.make_directories()
        moved = 0
        for item in _listing(self.cache_dir):
            if item.is_dir(follow_symlinks=False) or item.name.startswith("."):
                continue
            if is_working_file(item.name):
                os.replace(item.path, self.incoming_dir / item.name)
            elif _HEX64.fullmatch(item.name) and item.is_file(follow_symlinks=False):
                self._migrate_entry(Path(item.path))
                moved += 1
        if moved:
            log.info("cache: %d entries moved to the content-addressed layout", moved)
        return moved

    def _migrate_entry(self, old: Path) -> None:
        file_id = old.name
        info = old.stat()
        sha256 = sha256_of_file(old)
        target = self.content(sha256)
        with self._locked(fcntl.LOCK_EX):
            if not target.exists():
                os.link(old, target)
                fsync_directory(self.content_dir)
            if not self._record_path(file_id).exists():
                # confirmed when it was written; no validators: the next operation asks
                record = CachedUrl(None, sha256, info.st_size, confirmed_at=info.st_mtime)
                self._write_record(file_id, record)
            for link in self._links_to(old):
                _point(link, target.absolute())
            old.unlink()

    # ---- helpers --------------------------------------------------------------------------------

    def _published(self) -> dict[str, set[str]]:
        """Content name → the children whose firmware_update link points to it."""
        users: dict[str, set[str]] = {}
        content = self.content_dir.absolute()
        for link, target in self._links():
            if target.parent == content:
                users.setdefault(target.name, set()).add(link.parent.parent.name)
        return users

    def _links_to(self, entry: Path) -> list[Path]:
        wanted = entry.absolute()
        return [link for link, target in self._links() if target == wanted]

    def _links(self) -> Iterator[tuple[Path, Path]]:
        """Every `<child>/firmware_update/` symlink, with its target."""
        for child in _listing(self.file_transfer_dir):
            for link in _listing(Path(child.path) / FIRMWARE_DIR):
                if not link.is_symlink():
                    continue
                try:
                    yield Path(link.path), Path(os.readlink(link.path))
                except OSError:
                    continue

    def _records(self) -> Iterator[tuple[str, CachedUrl]]:
        for item in _listing(self.urls_dir):
            if not item.name.endswith(RECORD_SUFFIX):
                continue
            try:
                record = parse_cached_url(Path(item.path).read_bytes())
            except OSError:
                continue
            if record is not None:
                yield item.name.removesuffix(RECORD_SUFFIX), record

    @staticmethod
    def _touch(path: Path) -> None:
        info = os.stat(path, follow_symlinks=False)
        os.utime(path, ns=(time.time_ns(), info.st_mtime_ns), follow_symlinks=False)

    @contextlib.contextmanager
    def _locked(self, kind: int) -> Iterator[None]:
        """flock on the cache directory itself: no lock file to leave behind."""
        try:
            descriptor = os.open(self.cache_dir, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(self.cache_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(descriptor, kind)
            yield
        finally:
            os.close(descriptor)


def _point(link: Path, target: Path) -> None:
    """Make `link` a symlink to `target`, atomically (a reader sees the old or the new)."""
    if link.is_symlink() and os.readlink(link) == str(target):
        return
    temp = link.with_name(f".{link.name}.link")
    temp.unlink(missing_ok=True)
    os.symlink(target, temp)
    os.replace(temp, link)


def _listing(directory: Path) -> list[os.DirEntry[str]]:
    try:
        return list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return []
