"""The broker side of the local hop: `tedge-firmware cert broker-config` writes a Mosquitto
fragment and ACL; a real Mosquitto with them (a TLS listener requiring client certificates made
by `tedge-firmware cert`) lets child A read only its own requests and publish only its own
statuses, on the legacy and the te/ topics, while the gateway's local clients keep full access."""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiomqtt
import pytest

from brokers import MOSQUITTO, _wait_listening, free_port
from harness import observer

CLI = [sys.executable, "-m", "tedge_firmware"]
REQ = "tedge/{}/commands/req/firmware_update"
RES = "tedge/{}/commands/res/firmware_update"
CMD = "te/device/{}///cmd/firmware_update/1"


def cli(config_dir: Path, *args: str) -> None:
    result = subprocess.run([*CLI, "--config-dir", str(config_dir), "cert", *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


@pytest.fixture
def site(tmp_path: Path) -> tuple[Path, Path, int]:
    config_dir = tmp_path / "etc"
    config_dir.mkdir()
    (config_dir / "tedge.toml").write_text('[device]\nid = "gw"\n')
    tls_port = free_port()
    cli(config_dir, "create-ca")
    cli(config_dir, "create-server", "--name", "127.0.0.1")
    for child in ("child-a", "child-b"):
        cli(config_dir, "create-child", child)
    cli(config_dir, "broker-config", "--bind", "127.0.0.1", "--port", str(tls_port))
    return config_dir, config_dir / "device-local-certs", tls_port


@pytest.fixture
def broker(tmp_path: Path, site: tuple[Path, Path, int]) -> Iterator[tuple[int, int]]:
    config_dir, _, tls_port = site
    local_port = free_port()
    fragment = (config_dir / "mosquitto-conf" / "tedge-firmware-mosquitto.conf").read_text()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(
        f"listener {local_port} 127.0.0.1\nallow_anonymous true\n"
        + ("user root\n" if os.geteuid() == 0 else "")
        + fragment
    )
    process = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_listening(local_port)
        _wait_listening(tls_port)
        yield local_port, tls_port
    finally:
        process.kill()
        process.wait()


def tls(certs: Path, child: str | None, ca: Path | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca or certs / "ca.crt"))
    if child is not None:
        context.load_cert_chain(certs / "children" / f"{child}.crt", certs / "children" / f"{child}.key")
    return context


@contextlib.asynccontextmanager
async def child_client(port: int, context: ssl.SSLContext, name: str) -> AsyncIterator[aiomqtt.Client]:
    async with aiomqtt.Client("127.0.0.1", port, identifier=name, tls_context=context) as client:
        yield client


async def test_a_child_reads_only_its_own_requests_and_publishes_only_its_own_statuses(
    site: tuple[Path, Path, int], broker: tuple[int, int]
) -> None:
    _, certs, _ = site
    local, tls_port = broker
    received: list[str] = []
    watched = [RES.format("+"), "te/device/+///cmd/firmware_update/+"]
    async with observer(local, watched) as gateway, child_client(tls_port, tls(certs, "child-a"), "a") as child:
        await child.subscribe(REQ.format("+"), qos=1)  # the connector's wildcard subscription
        await child.subscribe("te/device/+///cmd/firmware_update/+", qos=1)

        async def collect() -> None:
            async for message in child.messages:
                received.append(message.topic.value)

        collector = asyncio.create_task(collect())
        try:
            for address in ("child-a", "child-b", "gw:device:child-a", "gw:device:child-b"):
                await gateway.publish(REQ.format(address), "{}")
            for name in ("child-a", "child-b"):
                await gateway.publish(CMD.format(name), '{"status":"init"}')
            for topic in (RES.format("child-b"), CMD.format("child-b"), RES.format("child-a"), CMD.format("child-a")):
                await child.publish(topic, '{"status":"executing"}', qos=1)
            assert await gateway.next(RES.format("child-a")) == b'{"status":"executing"}'
            await gateway.silence(0.5, [RES.format("child-b"), CMD.format("child-b")])
        finally:
            collector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await collector
    assert sorted(set(received)) == sorted(
        {REQ.format("child-a"), REQ.format("gw:device:child-a"), CMD.format("child-a")}
    )


@pytest.mark.parametrize("who", ["nobody", "another CA"])
async def test_without_a_certificate_of_the_site_no_connection(
    tmp_path: Path, site: tuple[Path, Path, int], broker: tuple[int, int], who: str
) -> None:
    config_dir, certs, _ = site
    _, tls_port = broker
    if who == "nobody":
        context = tls(certs, None)
    else:
        other = tmp_path / "other"
        cli(config_dir, "create-ca", "--dir", str(other))
        cli(config_dir, "create-child", "child-a", "--dir", str(other))
        context = tls(other, "child-a", ca=certs / "ca.crt")
    # refused in the handshake: with TLS 1.3 the client hears it as an alert after its own
    # side finished, so the connection never gets its CONNACK
    with pytest.raises((aiomqtt.MqttError, TimeoutError)):
        async with asyncio.timeout(3), child_client(tls_port, context, "intruder") as client:
            await client.subscribe("#")
            await client.publish(RES.format("child-a"), "x", qos=1)


async def test_the_connector_works_through_the_locked_broker(
    tmp_path: Path, site: tuple[Path, Path, int], broker: tuple[int, int]
) -> None:
    """The SDK connector as a child on the TLS listener, with its certificate: it gets its
    request, downloads, applies and answers, and the gateway's local side hears the answer."""
    import hashlib
    import json

    from aiohttp import web

    from tedge_firmware.connector import BrokerSettings, Connector, Firmware
    from test_connector_support import FAST_DOWNLOADS, serving

    _, certs, _ = site
    local, tls_port = broker
    firmware = b"locked-down firmware" * 100

    async def serve(request: web.Request) -> web.Response:
        return web.Response(body=firmware)

    app = web.Application()
    app.router.add_get("/fw.bin", serve)
    runner = web.AppRunner(app)
    await runner.setup()
    site_http = web.TCPSite(runner, "127.0.0.1", 0)
    await site_http.start()
    http_port = site_http._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    applied: list[bytes] = []

    async def apply(fw: Firmware) -> None:
        applied.append(fw.path.read_bytes())

    child = Connector(
        "child-a",
        apply=apply,
        work_dir=tmp_path / "work",
        broker=BrokerSettings(
            host="127.0.0.1",
            port=tls_port,
            ca_file=certs / "ca.crt",
            cert_file=certs / "children" / "child-a.crt",
            key_file=certs / "children" / "child-a.key",
        ),
        download=FAST_DOWNLOADS,
        heartbeat=None,
    )
    request = {
        "id": "op-1",
        "attempt": 1,
        "name": "fw",
        "version": "1",
        "sha256": hashlib.sha256(firmware).hexdigest(),
        "url": f"http://127.0.0.1:{http_port}/fw.bin",
    }
    try:
        async with observer(local, [RES.format("child-a")]) as gateway, serving(child):
            await gateway.publish(REQ.format("child-a"), json.dumps(request))
            answers = [json.loads(await gateway.next(RES.format("child-a"), timeout=15)) for _ in range(2)]
    finally:
        await runner.cleanup()
    assert [a["status"] for a in answers] == ["executing", "successful"]
    assert applied == [firmware]


@pytest.mark.parametrize("device_id", ["", "gw 1", "gw\n#", "a/b", "gw+", "#"])
def test_a_device_id_that_cannot_name_a_broker_user_is_refused(device_id: str) -> None:
    from tedge_firmware.core.broker_acl import mosquitto_acl
    from tedge_firmware.errors import ConfigError

    with pytest.raises(ConfigError, match="cannot name a broker user"):
        mosquitto_acl(device_id)
