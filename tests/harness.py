"""Black-box harness: the real gateway service against a real broker, watched over MQTT.

`Observer` is a plain aiomqtt client playing Cumulocity and the children; `Gateway` runs
`tedge-firmware run` in-process (or as a subprocess for kill -9 tests) with a temp config.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import aiomqtt
from aiohttp import web

from tedge_firmware.core.config import config_from_document
from tedge_firmware.core.freshness import CachedUrl
from tedge_firmware.core.operation import file_id_for_url
from tedge_firmware.gateway.plugin import PluginOptions
from tedge_firmware.gateway.service import ServiceOptions, serve_plugin
from tedge_firmware.shell.cache import FirmwareCache
from tedge_firmware.shell.config_edit import write_local_config
from tedge_firmware.sim import FIRMWARE, BulkProgress, C8ySimulator, OperationStatus

CHILD = "child-device"
U = "http://test.domain.com"
K = "f6a5105230c19daee36d739d678ecc59ee0d5c99749138aedc65934a7f31cbf4"
EMPTY_SHA = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
S515 = f"515,{CHILD},fw-name,fw-version,{U}"
WATCHED = ("c8y/s/us", "c8y/s/us/+", "tedge/+/commands/req/firmware_update", "c8y/s/uat")

E501 = b"501,c8y_Firmware\n"
E503 = b"503,c8y_Firmware,\n"


def f502(reason: str) -> bytes:
    return f'502,c8y_Firmware,"{reason}"\n'.encode()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def operation_files(data: Path) -> list[Path]:
    """Every persisted operation: request sent (firmware/<id>) or waiting for its download."""
    firmware = data / "firmware"
    return sorted(
        p for p in [*firmware.glob("*"), *firmware.glob(".fetching/*")] if p.is_file() and not p.name.startswith(".")
    )


async def eventually(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Wait until `condition()` holds (False when `timeout` passes first). For state kept by
    another task or process, files above all: there is no event to await, so look every 10 ms."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition() and loop.time() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    return condition()


async def no_operation_files_left(data: Path, timeout: float = 5.0) -> list[Path]:
    """Wait until every operation file is gone (an ended operation keeps its file until the
    broker acknowledged its last status, a moment after a subscriber sees that status);
    returns what is left when `timeout` passes first."""
    await eventually(lambda: not operation_files(data), timeout)
    return operation_files(data)


def recorded_state(data: Path, op_id: str) -> str | None:
    """The `state` an operation file records (None: none recorded, or no file)."""
    try:
        return json.loads((data / "firmware" / op_id).read_text()).get("state")  # type: ignore[no-any-return]
    except (OSError, ValueError):
        return None


def req_topic(child: str = CHILD) -> str:
    return f"tedge/{child}/commands/req/firmware_update"


def res_topic(child: str = CHILD) -> str:
    return f"tedge/{child}/commands/res/firmware_update"


def us(child: str = CHILD) -> str:
    return f"c8y/s/us/{child}"


_observer_ids = itertools.count()


class Observer:
    """Records every message on the watched topics, one FIFO per topic."""

    def __init__(self, client: aiomqtt.Client) -> None:
        self.client = client
        self.queues: dict[str, asyncio.Queue[aiomqtt.Message]] = defaultdict(asyncio.Queue)
        self.log: list[tuple[str, bytes]] = []

    async def _collect(self) -> None:
        async for message in self.client.messages:
            payload = message.payload if isinstance(message.payload, bytes) else str(message.payload).encode()
            self.log.append((message.topic.value, payload))
            self.queues[message.topic.value].put_nowait(message)

    async def next(self, topic: str, timeout: float = 10.0) -> bytes:
        async with asyncio.timeout(timeout):
            message = await self.queues[topic].get()
        payload = message.payload
        return payload if isinstance(payload, bytes) else str(payload).encode()

    async def next_message(self, topic: str, timeout: float = 10.0) -> aiomqtt.Message:
        async with asyncio.timeout(timeout):
            return await self.queues[topic].get()

    async def sequence(self, topic: str, count: int, timeout: float = 10.0) -> list[bytes]:
        return [await self.next(topic, timeout) for _ in range(count)]

    async def silence(self, seconds: float = 1.0, topics: Iterable[str] | None = None) -> None:
        """Assert that nothing arrives on `topics` (default: all watched) for `seconds`."""
        start = len(self.log)
        await asyncio.sleep(seconds)  # waiting for the absence of an event has no event to await
        new = [(t, p) for t, p in self.log[start:] if topics is None or t in set(topics)]
        assert not new, f"unexpected messages: {new}"

    def pending(self, topic: str) -> int:
        return self.queues[topic].qsize()

    async def publish(self, topic: str, payload: bytes | str, retain: bool = False) -> None:
        await self.client.publish(topic, payload, qos=1, retain=retain)


@contextlib.asynccontextmanager
async def observer(port: int, topics: Iterable[str] = WATCHED) -> AsyncIterator[Observer]:
    identifier = f"observer-{os.getpid()}-{next(_observer_ids)}"
    async with aiomqtt.Client("127.0.0.1", port, identifier=identifier) as client:
        for topic in topics:
            await client.subscribe(topic, qos=1)
        watcher = Observer(client)
        task = asyncio.create_task(watcher._collect())
        try:
            yield watcher
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await task


def write_config(
    config_dir: Path,
    data_path: Path,
    mqtt_port: int,
    http_port: int,
    *,
    timeout: int = 3600,
    extra: str = "",
    tenant: str = "c8y.tenant.io",
) -> None:
    write_local_config(
        config_dir,
        device_id="parent-device",
        tenant=tenant,
        mqtt_port=mqtt_port,
        http_port=http_port,
        data_path=data_path,
        child_timeout=timeout,
        extra=extra,
    )


def write_simulated_tenant_config(
    config_dir: Path, data_path: Path, mqtt_port: int, http_port: int, children: Iterable[str]
) -> None:
    """A gateway whose tenant is the simulator on 127.0.0.1 (so its binaries get the JWT),
    with `children` declaring c8y_Firmware in operation files."""
    write_config(config_dir, data_path, mqtt_port, http_port, tenant="127.0.0.1")
    for child in children:
        operations = config_dir / "operations" / "c8y" / child
        operations.mkdir(parents=True)
        (operations / "c8y_Firmware").touch()


def load(config_dir: Path):  # type: ignore[no-untyped-def]
    import tomllib

    document = tomllib.loads((config_dir / "tedge.toml").read_text())
    return config_from_document(document, {}, config_dir, str(config_dir / "tedge.toml"))


@dataclass
class Gateway:
    """`tedge-firmware run` in-process, started and stopped by the test."""

    config_dir: Path
    data: Path
    options: PluginOptions = field(default_factory=lambda: PluginOptions(jwt_timeout=1.0, jwt_attempts=2))
    task: asyncio.Task[None] | None = None
    stop_event: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self) -> None:
        self.stop_event = asyncio.Event()
        config = load(self.config_dir)
        options = ServiceOptions(with_file_transfer=True, plugin=self.options)
        self.task = asyncio.create_task(serve_plugin(config, self.stop_event, options))

    async def stop(self) -> None:
        if self.task is None:
            return
        self.stop_event.set()
        async with asyncio.timeout(10):
            await self.task
        self.task = None

    async def __aenter__(self) -> Gateway:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def cache(self) -> Path:
        return self.data / "cache"

    @property
    def firmware(self) -> Path:
        return self.data / "firmware"

    @property
    def file_transfer(self) -> Path:
        return self.data / "file-transfer"


class GatewayProcess:
    """`tedge-firmware run` as a real process (for kill -9)."""

    def __init__(self, config_dir: Path, log_path: Path) -> None:
        self.config_dir = config_dir
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tedge_firmware", "run", "--config-dir", str(self.config_dir), "--debug"],
                stdout=log,
                stderr=log,
            )

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=10)

    def terminate(self) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=15)

    def kill_if_running(self) -> None:
        """The last resort of a test's clean-up: kill -9 unless it has ended already."""
        if self.process is not None and self.process.poll() is None:
            self.kill()


@dataclass
class FirmwareServer:
    """A cloud-side HTTP server serving binaries; records every request it got."""

    files: dict[str, bytes] = field(default_factory=dict)
    requests: list[web.Request] = field(default_factory=list)
    statuses: dict[str, list[int]] = field(default_factory=dict)  # path → statuses to answer first
    stall: set[str] = field(default_factory=set)
    gates: dict[str, asyncio.Event] = field(default_factory=dict)  # path → answer once set
    arrivals: defaultdict[str, asyncio.Event] = field(default_factory=lambda: defaultdict(asyncio.Event))
    port: int = 0
    runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/{name:.*}", self._serve)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def __aenter__(self) -> FirmwareServer:
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.stop()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def count(self, name: str) -> int:
        return sum(1 for request in self.requests if request.path == f"/{name}")

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(request)
        name = request.match_info["name"]
        self.arrivals[name].set()
        if name in self.stall:
            await asyncio.Event().wait()
        if name in self.gates:
            await self.gates[name].wait()
        queued = self.statuses.get(name)
        if queued:
            return web.Response(status=queued.pop(0))
        if name not in self.files:
            return web.Response(status=404)
        # a strong validator, as origins have: a cached copy is confirmed with a 304
        etag = f'"{hashlib.sha256(self.files[name]).hexdigest()[:32]}"'
        if etag in request.headers.get("If-None-Match", ""):
            return web.Response(status=304, headers={"ETag": etag})
        return web.Response(
            body=self.files[name], content_type="application/octet-stream", headers={"ETag": etag}
        )


def seed_cache(data: Path, url: str, content: bytes, cache_control: str = "immutable") -> Path:
    """A firmware already in the gateway's cache for `url`, fresh for as long as
    `cache_control` says (by default for ever: no request to the origin). Its content file."""
    cache = FirmwareCache(data / "cache", data / "file-transfer")
    cache.make_directories()
    sha256 = hashlib.sha256(content).hexdigest()
    incoming = cache.incoming(file_id_for_url(url))
    incoming.write_bytes(content)
    record = CachedUrl(url, sha256, len(content), cache_control=cache_control, confirmed_at=time.time())
    cache.store(file_id_for_url(url), record, incoming)
    return cache.content(sha256)


async def bulk_rollout(
    sim: C8ySimulator, devices: list[str], name: str, version: str, url: str, *, timeout: float
) -> BulkProgress:
    """Once every device is in the inventory with c8y_Firmware: one bulk operation for all of
    them; its progress once every operation has ended. `timeout` for each of the two waits."""

    def all_registered() -> bool:
        return all((device := sim.device(d)) is not None and device.supports(FIRMWARE) for d in devices)

    await sim.wait_until(all_registered, timeout=timeout)
    bulk = sim.bulk_firmware_operation(devices, name, version, url)
    return await sim.wait_for_bulk(bulk.id, timeout=timeout)


def assert_each_updated_once(
    sim: C8ySimulator, devices: list[str], progress: BulkProgress, applied: dict[str, list[str]], content: bytes
) -> None:
    """The bulk ended with every operation successful, each one PENDING → EXECUTING →
    SUCCESSFUL and nothing more, and each child applied exactly these bytes, once."""
    assert (progress.successful, progress.failed, progress.total) == (len(devices), 0, len(devices))
    for device in devices:
        [operation] = sim.operations_of(device)
        assert [change.status for change in operation.history] == [
            OperationStatus.PENDING,
            OperationStatus.EXECUTING,
            OperationStatus.SUCCESSFUL,
        ]
    expected = hashlib.sha256(content).hexdigest()
    assert applied == {child: [expected] for child in applied}


def cache_files(data: Path) -> list[str]:
    """Every file in the gateway's cache, as paths relative to it."""
    root = data / "cache"
    return sorted(str(path.relative_to(root)) for path in root.rglob("*") if path.is_file())


async def gateway_ready(port: int, timeout: float = 20.0) -> None:
    """Wait until the gateway is connected and subscribed: its retained health "up" (published
    after it subscribed) is there, whenever this is called."""
    async with observer(port, ["tedge/health/c8y-firmware-plugin"]) as health:
        async with asyncio.timeout(timeout):
            while b'"up"' not in await health.next("tedge/health/c8y-firmware-plugin", timeout=timeout):
                pass
