"""kill -9 of the gateway in the middle of a large download, then restart: the download resumes
where it stopped (bytes fetched stay close to the file size), the SHA-256 is right, and the
operation completes normally."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest
from aiohttp import web

from brokers import Broker, free_port
from faultproxy import Fault, FaultProxy
from harness import (
    CHILD,
    E501,
    E503,
    WATCHED,
    GatewayProcess,
    observer,
    req_topic,
    res_topic,
    sha256,
    us,
    write_config,
)
from tedge_firmware.core.operation import file_id_for_url

SIZE = 32 << 20
STALL_AFTER = 12 << 20


@pytest.fixture
async def origin(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A cloud server with Range, ETag and Last-Modified (aiohttp's FileResponse)."""
    firmware = tmp_path / "origin" / "big.bin"
    firmware.parent.mkdir()
    firmware.write_bytes(os.urandom(SIZE))

    async def serve(request: web.Request) -> web.FileResponse:
        return web.FileResponse(firmware)

    app = web.Application()
    app.router.add_get("/big.bin", serve)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield port, firmware.read_bytes()
    finally:
        await runner.cleanup()


async def wait_for_size(path: Path, size: int, seconds: float = 20) -> None:
    async with asyncio.timeout(seconds):
        while not (path.exists() and path.stat().st_size >= size):  # noqa: ASYNC110, ASYNC240
            await asyncio.sleep(0.05)  # a file growing on disk has no event to await


async def test_kill_9_during_download_resumes_after_restart(
    tmp_path: Path, broker: Broker, origin: tuple[int, bytes]
) -> None:
    port, content = origin
    config_dir = tmp_path / "etc"
    data = tmp_path / "data"
    write_config(config_dir, data, broker.port, free_port())
    process = GatewayProcess(config_dir, tmp_path / "gateway.log")
    async with FaultProxy(port) as proxy, observer(broker.port, WATCHED) as obs:
        proxy.plan(Fault.stall(STALL_AFTER))
        url = proxy.url("/big.bin")
        part = data / "cache" / "incoming" / f"{file_id_for_url(url)}.part"
        process.start()
        try:
            assert await obs.next("c8y/s/us", timeout=20) == b"500"
            await obs.publish("c8y/s/ds", f"515,{CHILD},big,2.0,{url}")
            await proxy.wait_faults(1)
            # all but the last chunk the downloader still holds in memory reached the disk
            await wait_for_size(part, STALL_AFTER - (2 << 20))
            process.kill()
            proxy.release_stalls()
            process.start()
            request = json.loads(await obs.next(req_topic(), timeout=60))
            assert await obs.next("c8y/s/us") == b"500"
            assert request["sha256"] == sha256(content)
            assert (data / "cache" / "sha256" / sha256(content)).read_bytes() == content
            assert not part.exists()
            assert proxy.bytes_to_client <= SIZE * 1.05, proxy.bytes_to_client
            # Cumulocity re-delivers the operation after the 500: the same operation, not a second one
            await obs.publish("c8y/s/ds", f"515,{CHILD},big,2.0,{url}")
            again = json.loads(await obs.next(req_topic()))
            assert again["id"] == request["id"]
            await obs.publish(res_topic(), json.dumps({"id": request["id"], "status": "successful"}))
            assert await obs.sequence(us(), 3) == [E501, f"115,big,2.0,{url}".encode(), E503]
            assert process.terminate() == 0
        finally:
            process.kill_if_running()


async def test_kill_9_during_a_te_download_resumes_and_completes_every_waiting_command(
    tmp_path: Path, broker: Broker, origin: tuple[int, bytes]
) -> None:
    port, content = origin
    config_dir = tmp_path / "etc"
    data = tmp_path / "data"
    write_config(config_dir, data, broker.port, free_port())
    process = GatewayProcess(config_dir, tmp_path / "gateway.log")
    children = ["te-a", "te-b", "te-c"]
    commands = {child: f"te/device/{child}///cmd/firmware_update/c8y-mapper-7" for child in children}
    async with FaultProxy(port) as proxy, observer(broker.port, ["te/+/+/+/+/cmd/firmware_update/+"]) as obs:
        proxy.plan(Fault.stall(STALL_AFTER))
        url = proxy.url("/big.bin")
        part = data / "cache" / "incoming" / f"{file_id_for_url(url)}.part"
        process.start()
        try:
            for where in commands.values():
                payload = {"status": "gateway_download", "remoteUrl": url, "name": "big", "version": "2.0"}
                await obs.publish(where, json.dumps(payload), retain=True)
            for where in commands.values():
                await obs.next(where)  # our own, retained
            await proxy.wait_faults(1)
            await wait_for_size(part, STALL_AFTER - (2 << 20))
            process.kill()
            proxy.release_stalls()
            process.start()  # the retained commands come back in our state
            moved = [json.loads(await obs.next(where, timeout=60)) for where in commands.values()]
            assert {m["status"] for m in moved} == {"gateway_downloaded"}
            assert {m["sha256"] for m in moved} == {sha256(content)}
            assert (data / "cache" / "sha256" / sha256(content)).read_bytes() == content
            assert proxy.bytes_to_client <= SIZE * 1.05, proxy.bytes_to_client
            assert process.terminate() == 0
        finally:
            process.kill_if_running()
    assert "Traceback" not in (tmp_path / "gateway.log").read_text()
