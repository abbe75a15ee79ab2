"""The plugin's orchestrator driven input by input, with recording fakes for its ports.

No broker, no clock that runs by itself: timers are recorded and fired by the test, the clock is
a number the test sets, downloads are answered with `FetchDone` inputs. The stores and the cache
are the real ones, on files in `tmp_path`. The same scenarios run end to end over a broker in
test_plugin_scenarios.py and test_gateway_resilience.py; here they take milliseconds.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
from collections.abc import AsyncIterator, Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tedge_firmware.core import smartrest
from tedge_firmware.core.freshness import CachedUrl
from tedge_firmware.core.operation import OperationRecord, file_id_for_url
from tedge_firmware.errors import StoreError
from tedge_firmware.gateway.fetches import FetchDone
from tedge_firmware.gateway.plugin import (
    BrokerSessionLost,
    DownstreamRecord,
    FirmwarePlugin,
    Incoming,
    Input,
    PluginOptions,
    PluginPorts,
    PluginSettings,
    ResendUnanswered,
    TimerFired,
)
from tedge_firmware.gateway.ports import RecordWriter
from tedge_firmware.shell.cache import FirmwareCache
from tedge_firmware.shell.partial_file import DownloadResult, NotModified
from tedge_firmware.shell.store import RecordStore, StoreWriter, fetch_store, operation_store

CLOUD_URL = "http://cloud.example/fw.bin"
SHA = hashlib.sha256(b"firmware").hexdigest()
FILE_ID = file_id_for_url(CLOUD_URL)
TIMEOUT = 3600  # never waited for: the test fires the timer
BASE_URL = "http://127.0.0.1:8000/tedge/file-transfer"
E501 = smartrest.set_executing()
E503 = smartrest.set_successful()
WAIT = 5.0  # bound for an input that a task of the plugin must produce


@dataclass
class Sent:
    topic: str
    payload: str
    when_done: Callable[[bool], None] | None


@dataclass
class RecordingPublisher:
    sent: list[Sent] = field(default_factory=list)

    def publish(
        self,
        topic: str,
        payload: bytes | str,
        *,
        qos: int = 1,
        retain: bool = False,
        when_done: Callable[[bool], None] | None = None,
    ) -> None:
        text = payload.decode() if isinstance(payload, bytes) else payload
        self.sent.append(Sent(topic, text, when_done))

    def on(self, topic: str) -> list[str]:
        return [sent.payload for sent in self.sent if sent.topic == topic]

    def acknowledge_all(self, acknowledged: bool = True) -> None:
        """The broker answers every message published so far (once each)."""
        for sent in self.sent:
            done, sent.when_done = sent.when_done, None
            if done is not None:
                done(acknowledged)


@dataclass
class RecordingTimers:
    armed: dict[str, tuple[float, Callable[[], None]]] = field(default_factory=dict)

    def arm(self, key: str, seconds: float, fire: Callable[[], None]) -> None:
        self.armed[key] = (seconds, fire)

    def cancel(self, key: str) -> None:
        self.armed.pop(key, None)

    def cancel_all(self) -> None:
        self.armed.clear()

    def fire(self, key: str) -> None:
        _, fire = self.armed.pop(key)
        fire()


class BlockedFetcher:
    """Downloads that never end by themselves: the test answers with FetchDone."""

    def __init__(self) -> None:
        self.urls: list[str] = []
        self.called = asyncio.Event()

    async def download(self, url: str, target: Path, *, token: str | None = None) -> DownloadResult:
        self.urls.append(url)
        self.called.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def revalidate(
        self, url: str, target: Path, conditions: Mapping[str, str], *, token: str | None = None
    ) -> DownloadResult | NotModified:
        return await self.download(url, target, token=token)


class InlineWriter:
    """Writes at once, on the caller's stack, and records what was written."""

    def __init__(self) -> None:
        self.writes = 0

    def submit(self, write: Callable[[], None], then: Callable[[StoreError | None], None] | None = None) -> None:
        self.writes += 1
        error = None
        try:
            write()
        except StoreError as failure:
            error = failure
        if then is not None:
            then(error)

    async def close(self) -> None:
        pass


class HeldWriter:
    """Keeps writes until the test releases them, in order (a disk that is behind)."""

    def __init__(self) -> None:
        self.held: list[tuple[Callable[[], None], Callable[[StoreError | None], None] | None]] = []

    def submit(self, write: Callable[[], None], then: Callable[[StoreError | None], None] | None = None) -> None:
        self.held.append((write, then))

    def release(self) -> None:
        while self.held:
            write, then = self.held.pop(0)
            write()
            if then is not None:
                then(None)

    async def close(self) -> None:
        self.release()


@dataclass
class Clock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


class CountingUpkeep:
    def __init__(self) -> None:
        self.requests = 0

    def start(self) -> None:
        pass

    def request(self) -> None:
        self.requests += 1

    def make_room(self, needed: int, pinned: Collection[str] = frozenset()) -> int:
        return 0

    async def close(self) -> None:
        pass


@dataclass
class Rig:
    plugin: FirmwarePlugin
    publisher: RecordingPublisher
    timers: RecordingTimers
    fetcher: BlockedFetcher
    clock: Clock
    cache: FirmwareCache
    firmware_dir: Path

    def handle(self, item: Input) -> None:
        self.plugin.handle(item)
        self.drain()

    def drain(self) -> None:
        """Handle what the plugin queued for itself (a 515 per record, a refused request)."""
        while not self.plugin.inputs.empty():
            self.plugin.handle(self.plugin.inputs.get_nowait())

    def new_operation(self, child: str = "child1", url: str = CLOUD_URL) -> None:
        self.handle(DownstreamRecord(f"515,{child},fw,1.0,{url}"))

    def firmware_ready(self, url: str = CLOUD_URL) -> None:
        """The cache holds the firmware and the fetch reports it."""
        file_id = file_id_for_url(url)
        cached(self.cache, url, b"firmware")
        self.handle(FetchDone(file_id, SHA, None))

    def requests(self, child: str = "child1") -> list[dict[str, object]]:
        return [json.loads(p) for p in self.publisher.on(f"tedge/{child}/commands/req/firmware_update")]

    def respond(self, op_id: str, status: str, child: str = "child1") -> None:
        payload = json.dumps({"id": op_id, "status": status}).encode()
        self.handle(Incoming(f"tedge/{child}/commands/res/firmware_update", payload))

    def to_cloud(self, child: str = "child1") -> list[str]:
        return self.publisher.on(f"c8y/s/us/{child}")

    def fire_timeout(self, op_id: str) -> None:
        self.timers.fire(op_id)
        self.drain()

    def operation_files(self) -> list[str]:
        return sorted(p.name for p in self.firmware_dir.iterdir() if p.is_file())


def cached(cache: FirmwareCache, url: str, content: bytes, cache_control: str | None = None) -> None:
    """`content` in the cache for `url`, as a fetch leaves it."""
    cache.make_directories()
    incoming = cache.incoming(file_id_for_url(url))
    incoming.write_bytes(content)
    digest = hashlib.sha256(content).hexdigest()
    record = CachedUrl(url, digest, len(content), cache_control=cache_control, confirmed_at=time.time())
    cache.store(file_id_for_url(url), record, incoming)


def make_rig(
    tmp_path: Path,
    writer: RecordWriter | None = None,
    operations: RecordStore[OperationRecord] | None = None,
) -> Rig:
    firmware_dir = tmp_path / "firmware"
    cache = FirmwareCache(tmp_path / "cache", tmp_path / "file-transfer")
    publisher, timers, fetcher, clock = RecordingPublisher(), RecordingTimers(), BlockedFetcher(), Clock()
    settings = PluginSettings(
        device_id="gateway",
        file_transfer_base_url=BASE_URL,
        tenant_host="tenant.example",
        child_update_timeout=TIMEOUT,
        options=PluginOptions(resend_after_session_loss=(5.0, 30.0)),
    )
    ports = PluginPorts(
        publisher=publisher,
        fetcher=fetcher,
        operations=operations or operation_store(firmware_dir),
        fetching=fetch_store(firmware_dir),
        writer=writer or InlineWriter(),
        cache=cache,
        cache_keeper=CountingUpkeep(),
        timers=timers,
        clock=clock,
    )
    plugin = FirmwarePlugin(settings, ports)
    return Rig(plugin, publisher, timers, fetcher, clock, cache, firmware_dir)


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    made = make_rig(tmp_path)
    yield made
    async with asyncio.timeout(WAIT):
        await made.plugin.close()


async def test_a_silent_child_fails_its_operation_when_the_timer_fires(rig: Rig) -> None:
    rig.new_operation()
    rig.firmware_ready()
    [request] = rig.requests()
    op_id = str(request["id"])
    assert request["url"] == f"{BASE_URL}/child1/firmware_update/{FILE_ID}"
    assert rig.timers.armed[op_id][0] == TIMEOUT
    assert rig.operation_files() == [op_id]

    rig.fire_timeout(op_id)

    reason = (
        f"Child device child1 did not respond within the timeout interval of {TIMEOUT}sec. "
        f"Operation ID={op_id}"
    )
    assert rig.to_cloud() == [E501, smartrest.set_failed(reason)]
    assert op_id not in rig.timers.armed
    rig.publisher.acknowledge_all()
    assert rig.operation_files() == []
    assert rig.plugin.operations == {}


async def test_executing_restarts_the_timeout_and_the_old_timer_is_ignored(rig: Rig) -> None:
    rig.new_operation()
    rig.firmware_ready()
    op_id = str(rig.requests()[0]["id"])
    _, first_timer = rig.timers.armed[op_id]

    rig.respond(op_id, "executing")
    assert rig.to_cloud() == [E501]
    assert rig.timers.armed[op_id][0] == TIMEOUT  # armed again, from now

    first_timer()  # the timer of the request, had it fired before being replaced
    rig.drain()
    assert rig.to_cloud() == [E501], "a replaced timer must not end the operation"

    rig.fire_timeout(op_id)
    assert rig.to_cloud()[-1].startswith('502,c8y_Firmware,"Child device child1 did not respond')


async def test_a_timer_that_fires_after_the_end_changes_nothing(rig: Rig) -> None:
    rig.new_operation()
    rig.firmware_ready()
    op_id = str(rig.requests()[0]["id"])
    generation = rig.plugin.operations[op_id].timer_generation
    rig.respond(op_id, "successful")
    assert rig.to_cloud() == [E501, smartrest.set_installed_firmware("fw", "1.0", CLOUD_URL), E503]
    assert op_id not in rig.timers.armed

    rig.handle(TimerFired(op_id, generation))
    assert len(rig.to_cloud()) == 3


async def test_one_fetch_for_every_operation_of_the_same_file_and_its_failure_fails_them_all(
    rig: Rig,
) -> None:
    rig.new_operation("child1")
    rig.new_operation("child2")
    async with asyncio.timeout(WAIT):
        await rig.fetcher.called.wait()
    assert rig.fetcher.urls == [CLOUD_URL]
    assert sorted(p.name for p in (rig.firmware_dir / ".fetching").iterdir()) == sorted(
        rig.plugin.operations
    )

    reason = "Download from the cloud failed: 404 Not Found"
    rig.handle(FetchDone(FILE_ID, None, reason))

    for child in ("child1", "child2"):
        assert rig.to_cloud(child) == [E501, smartrest.set_failed(reason)]
        assert rig.requests(child) == []
    rig.publisher.acknowledge_all()
    assert list((rig.firmware_dir / ".fetching").iterdir()) == []


async def test_a_request_the_broker_refuses_fails_only_its_operation(rig: Rig) -> None:
    rig.new_operation("child1")
    rig.new_operation("child2")
    rig.firmware_ready()
    refused = next(s for s in rig.publisher.sent if s.topic == "tedge/child1/commands/req/firmware_update")
    assert refused.when_done is not None
    refused.when_done(False)
    rig.drain()

    assert rig.to_cloud("child1")[-1].startswith('502,c8y_Firmware,"The MQTT broker refuses')
    assert rig.to_cloud("child2") == []
    assert not rig.plugin.operations[str(rig.requests("child2")[0]["id"])].state.ended


async def test_after_the_broker_lost_the_session_unanswered_requests_go_out_again(rig: Rig) -> None:
    rig.new_operation("child1")
    rig.new_operation("child2")
    rig.firmware_ready()
    assert [r["attempt"] for r in rig.requests("child1") + rig.requests("child2")] == [1, 1]

    rig.clock.now = 2000.0
    rig.handle(BrokerSessionLost())
    assert [r["attempt"] for r in rig.requests("child1")] == [1, 2]
    assert [r["attempt"] for r in rig.requests("child2")] == [1, 2]
    assert rig.publisher.on("c8y/s/us")[-1] == smartrest.get_pending_operations()
    assert {key: seconds for key, (seconds, _) in rig.timers.armed.items() if key.startswith("broker")} == {
        "broker-session-0": 5.0,
        "broker-session-1": 30.0,
    }

    # child1 answers after the loss; child2 stays silent
    rig.clock.now = 2003.0
    rig.respond(str(rig.requests("child1")[0]["id"]), "executing")
    rig.timers.fire("broker-session-0")
    rig.drain()
    assert [r["attempt"] for r in rig.requests("child1")] == [1, 2]
    assert [r["attempt"] for r in rig.requests("child2")] == [1, 2, 3]


async def test_resend_unanswered_counts_only_answers_since_the_loss(rig: Rig) -> None:
    rig.new_operation()
    rig.firmware_ready()
    op_id = str(rig.requests()[0]["id"])
    rig.clock.now = 1500.0
    rig.respond(op_id, "executing")  # heard before the loss: no proof it is still there

    rig.handle(ResendUnanswered(since=1600.0))
    assert [r["attempt"] for r in rig.requests()] == [1, 2]
    rig.handle(ResendUnanswered(since=1400.0))
    assert [r["attempt"] for r in rig.requests()] == [1, 2]


async def test_the_fetch_input_comes_from_the_fetch_task(rig: Rig, tmp_path: Path) -> None:
    """A cache hit (the origin declared it immutable): the fetch task answers by itself, with
    the cached file's digest, without asking the origin."""
    cached(rig.cache, CLOUD_URL, b"cached firmware", "immutable")
    rig.new_operation()
    async with asyncio.timeout(WAIT):
        done = await rig.plugin.inputs.get()
    assert isinstance(done, FetchDone) and done.file_id == FILE_ID and done.reason is None
    assert done.sha256 == hashlib.sha256(b"cached firmware").hexdigest()
    assert rig.fetcher.urls == []


class GatedStore(RecordStore[OperationRecord]):
    """An operation store whose writes wait until the test opens the gate (a slow disk)."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory, OperationRecord.from_json)
        self.gate = threading.Event()

    def save(self, record: OperationRecord) -> None:
        assert self.gate.wait(WAIT), "the gate was never opened"
        super().save(record)


async def test_the_request_goes_out_once_its_file_is_on_disk_and_the_loop_never_waits(
    tmp_path: Path,
) -> None:
    store = GatedStore(tmp_path / "firmware")
    writer = StoreWriter()
    rig = make_rig(tmp_path, writer=writer, operations=store)
    try:
        rig.new_operation()
        async with asyncio.timeout(WAIT):
            await writer.drain()  # the download record (not gated); the fetch starts after it
        async with asyncio.timeout(WAIT):
            await rig.fetcher.called.wait()
        assert rig.fetcher.urls == [CLOUD_URL]
        rig.firmware_ready()  # returns while the write waits for the disk
        assert rig.requests() == []
        assert rig.operation_files() == []
        rig.respond("unknown-op", "successful")  # inputs are still handled meanwhile
        store.gate.set()
        async with asyncio.timeout(WAIT):
            await writer.drain()
        [request] = rig.requests()
        assert rig.operation_files() == [request["id"]]
        assert list((rig.firmware_dir / ".fetching").iterdir()) == []
    finally:
        store.gate.set()
        async with asyncio.timeout(WAIT):
            await writer.close()
            await rig.plugin.close()


def sent_order(rig: Rig) -> list[str]:
    """Requests and 500s in the order they were published, as "req <child> <attempt>" / "500"."""
    order = []
    for sent in rig.publisher.sent:
        if sent.topic.endswith("/commands/req/firmware_update"):
            order.append(f"req {sent.topic.split('/')[1]} {json.loads(sent.payload)['attempt']}")
        elif sent.payload == smartrest.get_pending_operations():
            order.append("500")
    return order


async def test_after_a_session_loss_the_500_follows_the_requests_still_being_written(
    tmp_path: Path,
) -> None:
    # A child that subscribes once it sees the gateway back must get no request from before.
    writer = HeldWriter()
    rig = make_rig(tmp_path, writer=writer)
    rig.new_operation()
    writer.release()
    rig.firmware_ready()
    writer.release()
    rig.handle(BrokerSessionLost())
    assert sent_order(rig) == ["req child1 1"]  # nothing before the write is done
    writer.release()
    assert sent_order(rig) == ["req child1 1", "req child1 2", "500"]
    await rig.plugin.close()


async def test_after_a_restart_the_500_follows_the_requests_still_being_written(tmp_path: Path) -> None:
    first = make_rig(tmp_path)
    first.new_operation()
    first.firmware_ready()
    await first.plugin.close()
    writer = HeldWriter()
    rig = make_rig(tmp_path, writer=writer)
    rig.plugin.recover()
    assert sent_order(rig) == []
    writer.release()
    assert sent_order(rig) == ["req child1 2", "500"]
    await rig.plugin.close()


async def test_copies_left_from_before_a_restart_go_unless_something_uses_them(tmp_path: Path) -> None:
    first = make_rig(tmp_path)
    first.new_operation("child1")
    first.firmware_ready()  # child1's copy is published, its operation waits for the child
    await first.plugin.close()
    cache = FirmwareCache(tmp_path / "cache", tmp_path / "file-transfer")
    cache.publish("ghost", FILE_ID, SHA)  # a copy whose operation ended while the gateway was away
    rig = make_rig(tmp_path)
    rig.plugin.recover()
    assert "sweep-copies" in rig.timers.armed
    rig.timers.fire("sweep-copies")
    async with asyncio.timeout(WAIT):
        item = await rig.plugin.inputs.get()
    rig.handle(item)
    assert not cache.link_path("ghost", FILE_ID).exists()
    assert cache.link_path("child1", FILE_ID).is_symlink()  # its operation goes on
    await rig.plugin.close()
