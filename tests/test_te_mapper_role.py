"""`tedge-firmware run` plays thin-edge's mapper for children registered over te/: a `515` for
`<main>:device:<child>` is offered both as a legacy request and as a te/ command, and the
first answer decides (gateway/te_mapper). `c8y-firmware-plugin`, which runs beside thin-edge's
own mapper, leaves such operations to it."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from brokers import Broker, free_port
from harness import FirmwareServer, Gateway, gateway_ready, load, observer, write_config
from tedge_firmware.gateway.service import ServiceOptions, serve_plugin
from test_connector_support import connector, serving

CONTENT = b"firmware for a te/ child" * 3000
XID = "parent-device:device:child1"
CAPABILITY = "te/device/child1///cmd/firmware_update"
COMMANDS = "te/device/child1///cmd/firmware_update/+"
E501, E503 = b"501,c8y_Firmware\n", b"503,c8y_Firmware,\n"


class Applied:
    def __init__(self) -> None:
        self.contents: list[bytes] = []

    async def __call__(self, firmware) -> None:  # type: ignore[no-untyped-def]
        self.contents.append(firmware.path.read_bytes())


@pytest.fixture
async def cloud() -> AsyncIterator[FirmwareServer]:
    async with FirmwareServer(files={"fw.bin": CONTENT}) as server:
        yield server


@pytest.fixture
async def gateway(tmp_path: Path, broker: Broker) -> AsyncIterator[Gateway]:
    config_dir = tmp_path / "etc"
    write_config(config_dir, tmp_path / "data", broker.port, free_port())
    instance = Gateway(config_dir, tmp_path / "data")
    await instance.start()
    try:
        yield instance
    finally:
        await instance.stop()


async def registered(obs, port: int) -> None:  # type: ignore[no-untyped-def]
    """The child declared itself over te/, the gateway registered it and listens."""
    assert await obs.next(f"c8y/s/us/{XID}", timeout=20) == b"114,c8y_Firmware\n"
    await gateway_ready(port)


async def test_a_child_running_a_te_agent_is_served_through_the_command_the_gateway_creates(
    tmp_path: Path, broker: Broker, cloud: FirmwareServer, gateway: Gateway
) -> None:
    applied = Applied()
    url = cloud.url("fw.bin")
    child = connector(broker, tmp_path / "work", "child1", apply=applied, protocol="te")
    watched = ["c8y/s/us", f"c8y/s/us/{XID}", COMMANDS, "te/device/child1///twin/firmware", f"tedge/{XID}/commands/req/firmware_update"]
    async with observer(broker.port, watched) as obs, serving(child):
        await registered(obs, broker.port)
        await obs.publish("c8y/s/ds", f"515,{XID},img,7,{url}")
        assert await obs.sequence(f"c8y/s/us/{XID}", 3, timeout=20) == [E501, f"115,img,7,{url}".encode(), E503]
        twin = json.loads(await obs.next("te/device/child1///twin/firmware"))
        assert twin == {"name": "img", "version": "7", "url": url}
        await obs.silence(0.3, [])
    command_topics = {t for t, _ in obs.log if t.startswith("te/device/child1///cmd/firmware_update/")}
    [command_topic] = command_topics
    assert command_topic.rsplit("/", 1)[1].startswith("tedge-firmware-")
    states = [json.loads(p)["status"] if p else "cleared" for t, p in obs.log if t == command_topic]
    assert states == ["init", "executing", "gateway_download", "gateway_downloaded", "successful", "cleared"]
    assert applied.contents == [CONTENT]
    # the legacy request went out too; nobody answered it, and the operation ended once
    assert sum(t == f"tedge/{XID}/commands/req/firmware_update" for t, _ in obs.log) == 1
    assert cloud.count("fw.bin") == 1


async def test_a_child_that_answers_the_legacy_request_gets_the_command_cleared_at_once(
    tmp_path: Path, broker: Broker, cloud: FirmwareServer, gateway: Gateway
) -> None:
    applied = Applied()
    url = cloud.url("fw.bin")
    child = connector(broker, tmp_path / "work", "child1", apply=applied, register=True)
    async with observer(broker.port, ["c8y/s/us", f"c8y/s/us/{XID}", COMMANDS]) as obs, serving(child):
        await registered(obs, broker.port)
        await obs.publish("c8y/s/ds", f"515,{XID},img,7,{url}")
        assert await obs.sequence(f"c8y/s/us/{XID}", 3, timeout=20) == [E501, f"115,img,7,{url}".encode(), E503]
        await obs.silence(0.3, [])
    [command_topic] = {t for t, _ in obs.log if t.startswith("te/device/child1///cmd/firmware_update/")}
    states = [json.loads(p)["status"] if p else "cleared" for t, p in obs.log if t == command_topic]
    assert states == ["init", "cleared"]
    assert applied.contents == [CONTENT]


async def test_an_operation_no_one_answers_clears_its_command_when_it_times_out(
    tmp_path: Path, broker: Broker, cloud: FirmwareServer
) -> None:
    config_dir = tmp_path / "etc"
    write_config(config_dir, tmp_path / "data", broker.port, free_port(), timeout=1)
    (config_dir / "operations" / "c8y" / XID).mkdir(parents=True)
    (config_dir / "operations" / "c8y" / XID / "c8y_Firmware").touch()
    gateway = Gateway(config_dir, tmp_path / "data")
    await gateway.start()
    try:
        async with observer(broker.port, ["c8y/s/us", f"c8y/s/us/{XID}", COMMANDS]) as obs:
            while await obs.next("c8y/s/us", timeout=20) != b"500":  # (105 and 101 too)
                pass
            await obs.publish("c8y/s/ds", f"515,{XID},img,7,{cloud.url('fw.bin')}")
            failed = await obs.next(f"c8y/s/us/{XID}", timeout=20)
            while failed.startswith((b"114", b"501")):
                failed = await obs.next(f"c8y/s/us/{XID}", timeout=20)
            assert failed.startswith(b"502,c8y_Firmware,")
            await obs.silence(0.3, [])
    finally:
        await gateway.stop()
    [command_topic] = {t for t, _ in obs.log if t.startswith("te/device/child1///cmd/firmware_update/")}
    assert [p for t, p in obs.log if t == command_topic][-1] == b""  # cleared


async def test_beside_thin_edges_mapper_the_plugin_leaves_te_children_to_it(
    tmp_path: Path, broker: Broker, cloud: FirmwareServer
) -> None:
    config_dir = tmp_path / "etc"
    write_config(config_dir, tmp_path / "data", broker.port, free_port())
    stop = asyncio.Event()
    plugin = asyncio.create_task(serve_plugin(load(config_dir), stop, ServiceOptions(with_file_transfer=False)))
    try:
        watched = ["c8y/s/us", f"c8y/s/us/{XID}", COMMANDS, "tedge/+/commands/req/firmware_update"]
        async with observer(broker.port, watched) as obs:
            await gateway_ready(broker.port)  # connected and subscribed
            await obs.publish("c8y/s/ds", f"515,{XID},img,7,{cloud.url('fw.bin')}")
            await obs.publish("c8y/s/ds", f"515,legacy-child,img,7,{cloud.url('fw.bin')}")
            request = await obs.next("tedge/legacy-child/commands/req/firmware_update", timeout=20)
            assert json.loads(request)["name"] == "img"  # the legacy child is ours
            await obs.silence(0.5, [])
        assert [t for t, _ in obs.log if XID in t or "child1" in t] == []  # the te/ child is not
    finally:
        stop.set()
        async with asyncio.timeout(10):
            await plugin


async def test_a_client_like_thin_edges_python_agent_completes_an_update(
    tmp_path: Path, broker: Broker, cloud: FirmwareServer, gateway: Gateway
) -> None:
    """What thin-edge's python-tedge-agent does (docs/thin-edge-te.md): declare on te/, take
    legacy requests whose address ends with `:<its id>`, download the url, answer on the
    request's address with the request's fields and a status, QoS 0, not retained."""
    import aiohttp
    import aiomqtt

    url = cloud.url("fw.bin")
    received: list[bytes] = []

    async def python_agent_like() -> None:
        async with aiomqtt.Client("127.0.0.1", broker.port, identifier="py-agent-child1") as client:
            await client.publish(CAPABILITY, "{}", qos=1, retain=True)
            await client.subscribe("tedge/+/commands/req/firmware_update")
            async for message in client.messages:
                address = message.topic.value.split("/")[1]
                if not address.endswith(":child1"):
                    continue
                request = json.loads(message.payload)  # type: ignore[arg-type]
                response_topic = message.topic.value.replace("/req/", "/res/")
                await client.publish(response_topic, json.dumps({**request, "status": "executing"}), qos=0)
                async with aiohttp.ClientSession() as http, http.get(request["url"]) as response:
                    received.append(await response.read())
                await client.publish(response_topic, json.dumps({**request, "status": "successful"}), qos=0)

    agent = asyncio.create_task(python_agent_like())
    try:
        async with observer(broker.port, ["c8y/s/us", f"c8y/s/us/{XID}"]) as obs:
            await registered(obs, broker.port)
            await obs.publish("c8y/s/ds", f"515,{XID},img,7,{url}")
            assert await obs.sequence(f"c8y/s/us/{XID}", 3, timeout=20) == [E501, f"115,img,7,{url}".encode(), E503]
    finally:
        agent.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await agent
    assert received == [CONTENT]
