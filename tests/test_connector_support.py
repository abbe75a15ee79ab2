"""Helpers shared by the connector tests (no tests here): the real gateway stack, a connector
in-process or as a process, a cloud and a plain file server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from aiohttp import web

from brokers import Broker, free_port
from faultproxy import FaultProxy
from harness import WATCHED, FirmwareServer, Observer, load, req_topic, us, write_config
from tedge_firmware.connector import BrokerSettings, Connector, DownloadSettings
from tedge_firmware.gateway.plugin import PluginOptions
from tedge_firmware.gateway.service import ServiceOptions, serve_file_transfer, serve_plugin

RESPONSES = "tedge/+/commands/res/firmware_update"
WATCH = (*WATCHED, RESPONSES)
FAST_DOWNLOADS = DownloadSettings(
    stall_timeout=5.0, retry_budget=10.0, retry_initial=0.05, retry_max_interval=0.5, progress_interval=0.05
)


def res(child: str) -> str:
    return f"tedge/{child}/commands/res/firmware_update"


async def responses(obs: Observer, child: str, count: int, timeout: float = 15.0) -> list[dict[str, Any]]:
    return [json.loads(payload) for payload in await obs.sequence(res(child), count, timeout)]


def _registration(payload: bytes) -> bool:
    return payload.startswith(b"114,")


async def to_cloud(obs: Observer, child: str, count: int, timeout: float = 30.0) -> list[bytes]:
    """The next `count` messages for `child` to Cumulocity, leaving out its registration (114:
    the gateway's registrar answers a connector's --register)."""
    found: list[bytes] = []
    async with asyncio.timeout(timeout):
        while len(found) < count:
            payload = await obs.next(us(child), timeout)
            if not _registration(payload):
                found.append(payload)
    return found


async def no_more_to_cloud(obs: Observer, child: str, seconds: float) -> None:
    """Nothing but registration reaches Cumulocity for `child` within `seconds`."""
    start = len(obs.log)
    await asyncio.sleep(seconds)  # waiting for the absence of an event has no event to await
    extra = [p for t, p in obs.log[start:] if t == us(child) and not _registration(p)]
    assert extra == []


class Stack:
    """A real broker, the real gateway (plugin + file-transfer service, in-process) and a cloud.

    With `through_proxy`, the plugin and the file-transfer service run as two services (as with
    thin-edge's own agent) and the URLs handed to children lead through a fault-injecting proxy.
    """

    def __init__(self, tmp_path: Path, broker: Broker) -> None:
        self.tmp_path = tmp_path
        self.broker = broker
        self.config_dir = tmp_path / "etc"
        self.data = tmp_path / "data"
        self.cloud = FirmwareServer()
        self.proxy: FaultProxy | None = None
        self.stop_event = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []

    async def start(self, obs: Observer, *, through_proxy: bool = False) -> None:
        await self.cloud.start()
        http_port = free_port()
        options = PluginOptions(jwt_timeout=1.0, jwt_attempts=2)
        if through_proxy:
            self.proxy = FaultProxy(http_port)
            await self.proxy.start()
            write_config(self.config_dir, self.data, self.broker.port, self.proxy.port)
            transfer_dir = self.tmp_path / "etc-file-transfer"
            write_config(transfer_dir, self.data, self.broker.port, http_port)
            self._spawn(serve_file_transfer(load(transfer_dir), self.stop_event))
            self._spawn(serve_plugin(load(self.config_dir), self.stop_event, ServiceOptions(plugin=options)))
        else:
            write_config(self.config_dir, self.data, self.broker.port, http_port)
            service = ServiceOptions(with_file_transfer=True, plugin=options)
            self._spawn(serve_plugin(load(self.config_dir), self.stop_event, service))
        assert await obs.next("c8y/s/us", timeout=15) == b"500"

    def _spawn(self, coroutine: Any) -> None:
        self.tasks.append(asyncio.create_task(coroutine))

    async def stop(self) -> None:
        self.stop_event.set()
        async with asyncio.timeout(15):
            await asyncio.gather(*self.tasks)
        if self.proxy is not None:
            await self.proxy.stop()
        await self.cloud.stop()

    async def operation(self, obs: Observer, child: str, name: str, version: str, content: bytes) -> dict[str, Any]:
        """A c8y_Firmware operation from the cloud; the request the child receives."""
        path = f"{child}-{name}-{version}.bin"
        self.cloud.files[path] = content
        await obs.publish("c8y/s/ds", f"515,{child},{name},{version},{self.cloud.url(path)}")
        return json.loads(await obs.next(req_topic(child), timeout=15))  # type: ignore[no-any-return]

    def installed(self, child: str, name: str, version: str) -> bytes:
        return f"115,{name},{version},{self.cloud.url(f'{child}-{name}-{version}.bin')}".encode()


def connector(broker: Broker, work_dir: Path, *children: str, **options: Any) -> Connector:
    """A connector with test-friendly timings (override any keyword)."""
    settings: dict[str, Any] = {
        "work_dir": work_dir,
        "broker": BrokerSettings(host="127.0.0.1", port=broker.port),
        "download": FAST_DOWNLOADS,
        "heartbeat": None,
        **options,
    }
    return Connector(*children, **settings)


@contextlib.asynccontextmanager
async def serving(instance: Connector) -> AsyncIterator[Connector]:
    """Run a connector until the block ends; connected and subscribed inside the block."""
    task = asyncio.create_task(instance.run())
    try:
        async with asyncio.timeout(10):
            await instance.wait_connected()
        yield instance
    finally:
        instance.stop()
        async with asyncio.timeout(15):
            await task


@contextlib.asynccontextmanager
async def file_server(files: dict[str, bytes]) -> AsyncIterator[str]:
    """A plain HTTP server with Range support (aiohttp's FileResponse); yields its base url."""
    async def serve(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name not in files:
            return web.Response(status=404)
        return web.Response(body=files[name])

    app = web.Application()
    app.router.add_get("/{name}", serve)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


class ConnectorProcess:
    """`tedge-firmware connector` as a real process (for kill -9)."""

    def __init__(self, args: Sequence[str], log_path: Path) -> None:
        self.args = list(args)
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tedge_firmware", "connector", *self.args, "--debug"],
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

    def ensure_stopped(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.kill()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")
