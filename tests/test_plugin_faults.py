"""Faults and hostile input against the real service: kill -9, broker restarts, bad payloads."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import aiomqtt

from brokers import Broker, free_port
from harness import (
    CHILD,
    E501,
    E503,
    S515,
    WATCHED,
    Gateway,
    GatewayProcess,
    U,
    f502,
    no_operation_files_left,
    observer,
    req_topic,
    res_topic,
    us,
    write_config,
)


async def test_kill_9_while_waiting_for_the_child_then_restart_completes(
    tmp_path: Path, broker: Broker, config_dir: Path
) -> None:
    process = GatewayProcess(config_dir, tmp_path / "gateway.log")
    async with observer(broker.port, [*WATCHED, "tedge/health/c8y-firmware-plugin"]) as obs:
        process.start()
        try:
            assert await obs.next("c8y/s/us", timeout=20) == b"500"
            assert json.loads(await obs.next("tedge/health/c8y-firmware-plugin"))["status"] == "up"
            await obs.publish("c8y/s/ds", S515)
            first = json.loads(await obs.next(req_topic()))
            process.kill()
            down = json.loads(await obs.next("tedge/health/c8y-firmware-plugin", timeout=20))
            assert down == {"pid": process.process.pid, "status": "down"}  # type: ignore[union-attr]
            process.start()
            again = json.loads(await obs.next(req_topic(), timeout=20))
            assert again["id"] == first["id"] and again["attempt"] == 2
            assert await obs.next("c8y/s/us") == b"500"
            await obs.publish(res_topic(), json.dumps({"id": first["id"], "status": "successful"}))
            assert await obs.sequence(us(), 3) == [E501, b"115,fw-name,fw-version," + U.encode(), E503]
            await obs.silence(1.0, [us()])
            assert process.terminate() == 0
        finally:
            process.kill_if_running()
    log = (tmp_path / "gateway.log").read_text()
    assert "Traceback" not in log


async def test_statuses_made_while_the_broker_is_down_are_not_lost(
    tmp_path: Path, broker: Broker, config_dir: Path
) -> None:
    write_config(config_dir, tmp_path / "data", broker.port, free_port(), timeout=1)
    gateway = Gateway(config_dir, tmp_path / "data")
    # a persistent observer session, so that the broker keeps what arrives while it is away
    identifier = "persistent-observer"

    async def connect() -> aiomqtt.Client:
        client = aiomqtt.Client("127.0.0.1", broker.port, identifier=identifier, clean_session=False)
        await client.__aenter__()
        return client

    client = await connect()
    await client.subscribe("c8y/s/us/+", qos=1)
    await client.subscribe("tedge/+/commands/req/firmware_update", qos=1)
    await client.subscribe("c8y/s/us", qos=1)
    try:
        await gateway.start()
        async with asyncio.timeout(10):
            async for message in client.messages:
                if message.topic.value == "c8y/s/us" and message.payload == b"500":
                    break
        await client.publish("c8y/s/ds", S515, qos=1)
        async with asyncio.timeout(10):
            async for message in client.messages:
                if message.topic.matches("tedge/+/commands/req/firmware_update"):
                    request = json.loads(message.payload)  # type: ignore[arg-type]
                    break
        await client.__aexit__(None, None, None)
        broker.stop()  # graceful: sessions persist; the timeout fires while it is away
        await asyncio.sleep(1.5)
        broker.start()
        client = await connect()
        received = []
        async with asyncio.timeout(15):
            async for message in client.messages:
                if message.topic.value == us():
                    received.append(message.payload)
                    if len(received) == 2:
                        break
        assert received[0] == E501
        assert received[1] == f502(
            f"Child device {CHILD} did not respond within the timeout interval of 1sec. Operation ID={request['id']}"
        )
    finally:
        await gateway.stop()
        await client.__aexit__(None, None, None)


async def test_broker_kill_and_restart_while_an_operation_is_live(
    broker: Broker, gateway: Gateway
) -> None:
    async with observer(broker.port) as obs:
        await gateway.start()
        assert await obs.next("c8y/s/us") == b"500"
        await obs.publish("c8y/s/ds", S515)
        request = json.loads(await obs.next(req_topic()))
    broker.kill()  # the broker loses every session: the plugin must subscribe again
    broker.start()
    async with observer(broker.port) as obs:
        await asyncio.sleep(0)
        # wait until the plugin is back: its health "up" is re-published on reconnect
        async with aiomqtt.Client("127.0.0.1", broker.port) as probe:
            await probe.subscribe("tedge/health/c8y-firmware-plugin", qos=1)
            async with asyncio.timeout(15):
                async for message in probe.messages:
                    if json.loads(message.payload)["status"] == "up":  # type: ignore[arg-type]
                        break
        await obs.publish(res_topic(), json.dumps({"id": request["id"], "status": "successful"}))
        assert await obs.sequence(us(), 3, timeout=15) == [E501, b"115,fw-name,fw-version," + U.encode(), E503]


HOSTILE_DS = [
    b"\xff\xfe\xfd not utf-8",
    b"515," + b"x" * 300_000,
    b"515,+,fw,1.0," + U.encode(),
    b"515,#,fw,1.0," + U.encode(),
    b"515,a/b,fw,1.0," + U.encode(),
    b"515,..,fw,1.0," + U.encode(),
    b"515,,fw,1.0," + U.encode(),
    b'515,"unterminated,fw,1.0,' + U.encode(),
    b"515,child\x00nul,fw,1.0," + U.encode(),
    b"",
    b"\n\n\n",
    b"515",
    b'515,child-x,fw,1.0,"' + b"\\" * 1000,
]

HOSTILE_RESPONSES = [
    ("tedge//commands/res/firmware_update", b'{"id":"x","status":"successful"}'),
    (res_topic(), b"\xff\xfe"),
    (res_topic(), b"[" * 50_000),
    (res_topic(), b'{"id":{"nested":1},"status":"successful"}'),
    (res_topic(), b'{"id":"x","status":null}'),
    (res_topic(), b"x" * 200_000),
    (res_topic(".."), b'{"id":"x","status":"successful"}'),
]


async def test_hostile_input_is_skipped_and_the_next_operation_works(
    tmp_path: Path, broker: Broker, gateway: Gateway
) -> None:
    async with observer(broker.port) as obs:
        await gateway.start()
        assert await obs.next("c8y/s/us") == b"500"
        for payload in HOSTILE_DS:
            await obs.publish("c8y/s/ds", payload)
        # the one well-formed operation among them fails on its URL, with a reason, at once
        executing, failed = await obs.sequence(us("child-x"), 2)
        assert executing == E501
        assert failed.startswith(b'502,c8y_Firmware,"Download from ') and b"invalid url" in failed
        for topic, payload in HOSTILE_RESPONSES:
            await obs.publish(topic, payload)
        await obs.silence(1.0)
        assert await no_operation_files_left(tmp_path / "data") == []
        assert sorted(p.name for p in (tmp_path / "data" / "file-transfer").iterdir()) == []
        await obs.publish("c8y/s/ds", S515)
        request = json.loads(await obs.next(req_topic()))
        await obs.publish(res_topic(), json.dumps({"id": request["id"], "status": "successful"}))
        assert await obs.sequence(us(), 3) == [E501, b"115,fw-name,fw-version," + U.encode(), E503]
    # nothing was written outside the data directory's own folders
    assert sorted(os.listdir(tmp_path / "data")) == ["cache", "file-transfer", "firmware"]
