"""The firmware cache keeps within `firmware.cache.max_size` / `max_age` (DESIGN "Our behaviour"
item 13): the pure policy, the cache on real files, and the gateway end to end over a real
broker, where an entry published to a child is never removed while its operation runs."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from brokers import Broker, free_port
from harness import FirmwareServer, Gateway, Observer, observer, req_topic, res_topic, write_config
from tedge_firmware.core.cache_policy import (
    CacheEntry,
    CacheLimits,
    EvictionReason,
    plan_clear,
    plan_eviction,
)
from tedge_firmware.core.freshness import CachedUrl
from tedge_firmware.core.operation import file_id_for_url
from tedge_firmware.gateway.cache_keeper import CacheKeeper
from tedge_firmware.shell.cache import FirmwareCache

HOUR = 3600.0
NOW = 1_800_000_000.0


def entry(name: str, size: int, age: float, *children: str) -> CacheEntry:
    return CacheEntry(name, size, NOW - age, tuple(children))


def planned(entries: list[CacheEntry], limits: CacheLimits, keep: frozenset[str] = frozenset()) -> list[tuple[str, str]]:
    return [(e.entry.sha256, e.reason.name) for e in plan_eviction(entries, limits, NOW, keep)]


# --- the policy ------------------------------------------------------------------------------


def test_no_limits_keep_everything() -> None:
    entries = [entry("a", 10**9, 100 * HOUR), entry("b", 10**9, 0)]
    assert planned(entries, CacheLimits()) == []


def test_size_limit_drops_least_recently_used_first_until_it_fits() -> None:
    entries = [entry("new", 40, 1), entry("old", 40, 3 * HOUR), entry("mid", 40, 2 * HOUR)]
    assert planned(entries, CacheLimits(max_size=100)) == [("old", "SIZE")]
    assert planned(entries, CacheLimits(max_size=40)) == [("old", "SIZE"), ("mid", "SIZE")]
    assert planned(entries, CacheLimits(max_size=120)) == []


def test_age_limit_drops_entries_not_used_for_longer() -> None:
    entries = [entry("stale", 1, 2 * HOUR), entry("fresh", 1, 0.5 * HOUR), entry("edge", 1, HOUR)]
    assert planned(entries, CacheLimits(max_age=HOUR)) == [("stale", "AGE")]


def test_entries_in_use_or_kept_are_never_planned_but_count_towards_the_size() -> None:
    entries = [entry("busy", 100, 5 * HOUR, "child1"), entry("a", 30, 2 * HOUR), entry("b", 30, 1)]
    # the busy one alone is above the limit: everything else goes, the busy one stays
    assert planned(entries, CacheLimits(max_size=50, max_age=HOUR)) == [("a", "AGE"), ("b", "SIZE")]
    assert planned(entries, CacheLimits(max_size=50), keep=frozenset({"b"})) == [("a", "SIZE")]
    cleared = plan_clear(entries, NOW)
    assert [(e.entry.sha256, e.reason) for e in cleared] == [
        ("a", EvictionReason.REQUESTED),
        ("b", EvictionReason.REQUESTED),
    ]


def test_limits_refuse_negative_values() -> None:
    with pytest.raises(ValueError):
        CacheLimits(max_size=-1)
    with pytest.raises(ValueError):
        CacheLimits(max_age=-1)


# --- the cache on real files -----------------------------------------------------------------


@pytest.fixture
def cache(tmp_path: Path) -> FirmwareCache:
    cache = FirmwareCache(tmp_path / "cache", tmp_path / "file-transfer")
    cache.make_directories()
    return cache


def put(cache: FirmwareCache, url: str, content: bytes) -> str:
    """Store `content` as downloaded from `url`; its SHA-256."""
    digest = hashlib.sha256(content).hexdigest()
    incoming = cache.incoming(file_id_for_url(url))
    incoming.write_bytes(content)
    cache.store(file_id_for_url(url), CachedUrl(url, digest, len(content), confirmed_at=NOW), incoming)
    return digest


def test_touch_records_a_use_and_keeps_the_etag_inputs(cache: FirmwareCache) -> None:
    digest = put(cache, "http://o/a", b"x" * 10)
    path = cache.content(digest)
    os.utime(path, (NOW - 10 * HOUR, NOW - 20 * HOUR))
    before = os.stat(path)
    cache.touch(digest)
    after = os.stat(path)
    assert after.st_mtime_ns == before.st_mtime_ns and after.st_ino == before.st_ino  # same ETag
    assert after.st_atime > time.time() - 60
    assert [e.last_used for e in cache.entries()] == [after.st_atime]


def test_entries_are_contents_with_the_children_and_urls_that_use_them(cache: FirmwareCache) -> None:
    a = put(cache, "http://o/a", b"aaaaa")
    put(cache, "http://mirror/a", b"aaaaa")  # the same bytes: no second copy
    b = put(cache, "http://o/b", b"bbbbb")
    for name in ("c.part", "c.part.json", "c.part.json.tmp"):
        (cache.incoming_dir / name).write_bytes(b"12345")  # a download in progress
    (cache.content_dir / ".hidden").write_bytes(b"x")
    (cache.content_dir / "subdir").mkdir()
    os.symlink(cache.content(a), cache.content_dir / ("f" * 64))
    cache.publish("child1", file_id_for_url("http://o/a"), a)
    cache.publish("child2", file_id_for_url("http://mirror/a"), a)
    found = {e.sha256: (e.size, e.children, e.urls) for e in cache.entries()}
    assert found == {
        a: (5, ("child1", "child2"), ("http://mirror/a", "http://o/a")),
        b: (5, (), ("http://o/b",)),
    }
    assert sorted(cache.copies()) == [("child1", file_id_for_url("http://o/a")), ("child2", file_id_for_url("http://mirror/a"))]


def test_evict_removes_only_what_no_child_is_linked_to_and_the_urls_leading_to_it(cache: FirmwareCache) -> None:
    a = put(cache, "http://o/a", b"1")
    b = put(cache, "http://o/b", b"2")
    cache.publish("child1", file_id_for_url("http://o/a"), a)
    assert not cache.evict(a) and cache.content(a).exists()
    assert cache.evict(b) and not cache.content(b).exists()
    assert cache.lookup(file_id_for_url("http://o/b")) is None
    assert not (cache.urls_dir / f"{file_id_for_url('http://o/b')}.json").exists()
    assert not cache.evict(b)  # already gone
    cache.unpublish("child1", file_id_for_url("http://o/a"))
    assert cache.evict(a) and not cache.content(a).exists()


def test_publishing_an_evicted_entry_fails_without_leaving_a_link(cache: FirmwareCache) -> None:
    with pytest.raises(FileNotFoundError):
        cache.publish("child1", "f" * 64, "0" * 64)
    assert not cache.link_path("child1", "f" * 64).is_symlink()


@pytest.mark.parametrize("damage", ["not json", "other size", "content gone"])
def test_a_url_whose_record_or_content_is_damaged_is_not_cached(cache: FirmwareCache, damage: str) -> None:
    digest = put(cache, "http://o/a", b"12345")
    record = cache.urls_dir / f"{file_id_for_url('http://o/a')}.json"
    if damage == "not json":
        record.write_bytes(b"\x00garbage")
    elif damage == "other size":
        cache.content(digest).write_bytes(b"123")
    else:
        cache.content(digest).unlink()
    assert cache.lookup(file_id_for_url("http://o/a")) is None


def test_the_earlier_layout_is_moved_keeping_inodes_links_and_partial_downloads(cache: FirmwareCache) -> None:
    old_id = file_id_for_url("http://o/old")
    old = cache.cache_dir / old_id
    old.write_bytes(b"old firmware")
    inode = old.stat().st_ino
    (cache.cache_dir / f"{'e' * 64}.part").write_bytes(b"half")
    (cache.cache_dir / f"{'e' * 64}.part.json").write_bytes(b"{}")
    link = cache.link_path("child1", old_id)
    link.parent.mkdir(parents=True)
    link.symlink_to(old.absolute())
    assert cache.migrate() == 1
    digest = hashlib.sha256(b"old firmware").hexdigest()
    assert not old.exists() and cache.content(digest).stat().st_ino == inode  # same ETag
    assert os.readlink(link) == str(cache.content(digest).absolute())
    record = cache.lookup(old_id)
    assert record is not None and (record.url, record.sha256, record.etag) == (None, digest, None)
    assert sorted(p.name for p in cache.incoming_dir.iterdir()) == [f"{'e' * 64}.part", f"{'e' * 64}.part.json"]
    assert cache.migrate() == 0  # nothing left to move


# --- the gateway -----------------------------------------------------------------------------


class KeeperLog(logging.Handler):
    """The keeper's log lines, awaitable: a removal is logged once it is done."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(logging.INFO)
        self.loop = loop
        self.lines: list[str] = []
        self.changed = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:  # called in the keeper's worker thread
        self.loop.call_soon_threadsafe(self._add, record.getMessage())

    def _add(self, line: str) -> None:
        self.lines.append(line)
        self.changed.set()

    async def wait_for(self, text: str, limit_s: float = 10.0) -> str:
        async with asyncio.timeout(limit_s):
            while True:
                found = [line for line in self.lines if text in line]
                if found:
                    return found[0]
                self.changed.clear()
                await self.changed.wait()


@pytest.fixture
async def keeper_log() -> AsyncIterator[KeeperLog]:
    handler = KeeperLog(asyncio.get_running_loop())
    logger = logging.getLogger("tedge_firmware.gateway.cache_keeper")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


class Stack:
    def __init__(self, tmp_path: Path, broker: Broker, cloud: FirmwareServer) -> None:
        self.data = tmp_path / "data"
        self.config_dir = tmp_path / "etc"
        self.broker = broker
        self.cloud = cloud
        self.http_port = free_port()
        self.gateway = Gateway(self.config_dir, self.data)

    def configure(self, limits: str) -> None:
        write_config(self.config_dir, self.data, self.broker.port, self.http_port, extra=limits)

    async def start(self, obs: Observer) -> None:
        """Start the gateway and wait for its 500: it is subscribed by then."""
        await self.gateway.start()
        assert await obs.next("c8y/s/us", timeout=15) == b"500"

    def cached(self, name: str) -> Path:
        return self.data / "cache" / "sha256" / hashlib.sha256(self.cloud.files[name]).hexdigest()

    async def operation(self, obs: Observer, child: str, name: str) -> dict[str, object]:
        await obs.publish("c8y/s/ds", f"515,{child},{name},1.0,{self.cloud.url(name)}")
        return json.loads(await obs.next(req_topic(child), timeout=15))  # type: ignore[no-any-return]

    async def succeed(self, obs: Observer, child: str, op_id: object) -> None:
        await obs.publish(res_topic(child), json.dumps({"id": op_id, "status": "successful"}))
        await obs.next(f"c8y/s/us/{child}", timeout=10)  # 501
        await obs.next(f"c8y/s/us/{child}", timeout=10)  # 115
        assert await obs.next(f"c8y/s/us/{child}", timeout=10) == b"503,c8y_Firmware,\n"


@pytest.fixture
async def stack(tmp_path: Path, broker: Broker) -> AsyncIterator[Stack]:
    cloud = FirmwareServer()
    cloud.files.update({"a.bin": b"A" * 100_000, "b.bin": b"B" * 100_000})
    await cloud.start()
    instance = Stack(tmp_path, broker, cloud)
    try:
        yield instance
    finally:
        await instance.gateway.stop()
        await cloud.stop()


async def test_above_max_size_the_least_recently_used_free_firmware_goes(stack: Stack, keeper_log: KeeperLog) -> None:
    stack.configure("[firmware.cache]\nmax_size = 150000\n")
    async with observer(stack.broker.port, [req_topic("c1"), req_topic("c2"), "c8y/s/us/+", "c8y/s/us"]) as obs:
        await stack.start(obs)
        first = await stack.operation(obs, "c1", "a.bin")
        await stack.succeed(obs, "c1", first["id"])
        await stack.operation(obs, "c2", "b.bin")  # 200 kB cached now, a.bin is free
        line = await keeper_log.wait_for(f"removed {stack.cached('a.bin').name}")
        assert "least recently used" in line
        assert not stack.cached("a.bin").exists()
        assert stack.cached("b.bin").stat().st_size == 100_000  # in use by c2: kept


async def test_firmware_in_use_stays_even_above_the_limit_and_goes_when_its_operation_ends(
    stack: Stack, keeper_log: KeeperLog
) -> None:
    stack.configure("[firmware.cache]\nmax_size = 1000\n")  # smaller than one firmware
    async with observer(stack.broker.port, [req_topic("c1"), "c8y/s/us/+", "c8y/s/us"]) as obs:
        await stack.start(obs)
        request = await stack.operation(obs, "c1", "a.bin")
        async with aiohttp.ClientSession() as client, client.get(str(request["url"])) as response:
            assert response.status == 200
            assert await response.read() == b"A" * 100_000  # still there for the child
        assert stack.cached("a.bin").exists()
        assert not any("removed" in line for line in keeper_log.lines)
        await stack.succeed(obs, "c1", request["id"])
        await keeper_log.wait_for(f"removed {stack.cached('a.bin').name}")
        assert not stack.cached("a.bin").exists()


async def test_at_start_firmware_unused_for_longer_than_max_age_goes(stack: Stack, keeper_log: KeeperLog) -> None:
    stack.configure("[firmware.cache]\nmax_age = 3600\n")
    cache = FirmwareCache(stack.data / "cache", stack.data / "file-transfer")
    cache.make_directories()
    stale = cache.content(put(cache, "http://o/stale", b"stale firmware"))
    fresh = cache.content(put(cache, "http://o/fresh", b"fresh firmware"))
    os.utime(stale, (time.time() - 2 * HOUR, time.time() - 2 * HOUR))
    async with observer(stack.broker.port, ["c8y/s/us"]) as obs:
        await stack.start(obs)
        line = await keeper_log.wait_for(f"removed {stale.name}")
        assert "max age" in line
        assert not stale.exists() and fresh.exists()


async def test_without_limits_the_cache_keeps_everything(stack: Stack, keeper_log: KeeperLog) -> None:
    stack.configure("")
    async with observer(stack.broker.port, [req_topic("c1"), "c8y/s/us/+", "c8y/s/us"]) as obs:
        await stack.start(obs)
        for name in ("a.bin", "b.bin"):
            request = await stack.operation(obs, "c1", name)
            await stack.succeed(obs, "c1", request["id"])
        assert stack.cached("a.bin").exists() and stack.cached("b.bin").exists()
        assert keeper_log.lines == []


async def test_the_age_limit_is_applied_now_and_then_without_other_reasons(
    cache: FirmwareCache, keeper_log: KeeperLog
) -> None:
    clock = [time.time()]
    keeper = CacheKeeper(cache, CacheLimits(max_age=HOUR), clock=lambda: clock[0], age_check_interval=0.05)
    digest = put(cache, "http://o/a", b"firmware")
    keeper.start()
    try:
        await keeper.idle()
        assert cache.content(digest).exists()  # used just now
        clock[0] += 2 * HOUR  # two hours later, with no download and no operation ending
        await keeper_log.wait_for(f"removed {digest}")
        assert not cache.content(digest).exists()
    finally:
        await keeper.close()
