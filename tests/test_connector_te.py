"""The connector in `te` mode (thin-edge 1.x/2.x commands) with the real gateway as the download
participant, over a real broker: the test plays thin-edge's mapper (creates the command with
`init`, reads the final state)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from brokers import Broker, free_port
from harness import FirmwareServer, Gateway, eventually, gateway_ready, observer, write_config
from tedge_firmware.connector import Firmware
from test_connector_support import connector, serving

CONTENT = b"\x00te firmware\xff" * 5000
SHA = hashlib.sha256(CONTENT).hexdigest()


def topic(child: str, cmd: str = "c8y-mapper-5") -> str:
    return f"te/device/{child}///cmd/firmware_update/{cmd}"


class Applied:
    def __init__(self) -> None:
        self.calls: list[tuple[Firmware, bytes]] = []

    async def __call__(self, firmware: Firmware) -> None:
        self.calls.append((firmware, firmware.path.read_bytes()))


@pytest.fixture
async def cloud() -> AsyncIterator[FirmwareServer]:
    async with FirmwareServer(files={"fw.bin": CONTENT}) as server:
        yield server


@pytest.fixture
def gateway(tmp_path: Path, broker: Broker) -> Gateway:
    config_dir = tmp_path / "etc"
    write_config(config_dir, tmp_path / "data", broker.port, free_port())
    return Gateway(config_dir, tmp_path / "data")


async def states_until_final(obs: Any, where: str, timeout: float = 20.0) -> list[dict[str, Any]]:
    states: list[dict[str, Any]] = []
    while not states or states[-1]["status"] not in ("successful", "failed"):
        states.append(json.loads(await obs.next(where, timeout=timeout)))
    return states


async def test_a_te_child_updates_through_the_gateways_download_step(
    tmp_path: Path, broker: Broker, cloud: FirmwareServer, gateway: Gateway
) -> None:
    applied = Applied()
    capability = "te/device/child1///cmd/firmware_update"
    await gateway.start()
    try:
        child = connector(broker, tmp_path / "work", "child1", apply=applied, protocol="te")
        async with observer(broker.port, [topic("child1"), capability]) as obs, serving(child):
            assert await obs.next(capability) == b"{}"  # registered over te/
            init = {"status": "init", "remoteUrl": cloud.url("fw.bin"), "name": "img", "version": "4", "x": [1]}
            await obs.publish(topic("child1"), json.dumps(init), retain=True)
            states = await states_until_final(obs, topic("child1"))
            await obs.publish(topic("child1"), b"", retain=True)  # the mapper clears it
            await obs.silence(0.5, [topic("child1")])
    finally:
        await gateway.stop()
    statuses = [s["status"] for s in states]
    assert statuses == ["init", "executing", "gateway_download", "gateway_downloaded", "successful"]
    final = states[-1]
    assert {k: final[k] for k in ("remoteUrl", "name", "version", "x", "sha256")} == {
        "remoteUrl": init["remoteUrl"],
        "name": "img",
        "version": "4",
        "x": [1],
        "sha256": SHA,
    }
    [(firmware, seen)] = applied.calls
    assert seen == CONTENT
    assert (firmware.operation_id, firmware.sha256, firmware.url) == ("c8y-mapper-5", SHA, states[3]["tedgeUrl"])
    assert cloud.count("fw.bin") == 1


async def test_a_te_child_survives_a_restart_while_the_gateway_downloads(
    tmp_path: Path, broker: Broker, cloud: FirmwareServer, gateway: Gateway
) -> None:
    applied = Applied()
    work = tmp_path / "work"
    async with observer(broker.port, [topic("child1")]) as obs:
        async with serving(connector(broker, work, "child1", apply=applied, protocol="te")):
            init = {"status": "init", "remoteUrl": cloud.url("fw.bin"), "name": "img", "version": "4"}
            await obs.publish(topic("child1"), json.dumps(init), retain=True)
            [_, executing, handed] = [json.loads(await obs.next(topic("child1"))) for _ in range(3)]
            assert (executing["status"], handed["status"]) == ("executing", "gateway_download")
        # the child is away while the gateway does its step
        await gateway.start()
        try:
            assert json.loads(await obs.next(topic("child1")))["status"] == "gateway_downloaded"
            async with serving(connector(broker, work, "child1", apply=applied, protocol="te")):
                assert json.loads(await obs.next(topic("child1")))["status"] == "successful"
                await obs.publish(topic("child1"), b"", retain=True)
        finally:
            await gateway.stop()
    assert len(applied.calls) == 1


async def test_a_stale_handed_over_command_after_the_end_is_neither_applied_nor_answered(
    tmp_path: Path, broker: Broker
) -> None:
    applied = Applied()
    async with observer(broker.port, [topic("child1")]) as obs:
        # the gateway's step, played by the test: a copy on a local server
        server = FirmwareServer(files={"fw.bin": CONTENT})
        await server.start()
        handed = {
            "status": "gateway_downloaded",
            "remoteUrl": "https://t1.example/inventory/binaries/9",
            "tedgeUrl": server.url("fw.bin"),
            "name": "img",
            "version": "4",
            "sha256": SHA,
            "size": len(CONTENT),
        }
        try:
            async with serving(connector(broker, tmp_path / "work", "child1", apply=applied, protocol="te")):
                await obs.publish(topic("child1"), json.dumps(handed), retain=True)
                assert await obs.next(topic("child1")) == json.dumps(handed).encode()
                assert json.loads(await obs.next(topic("child1")))["status"] == "successful"
                [record] = (tmp_path / "work" / "child1" / "operations").glob("*.json")
                assert await eventually(lambda: json.loads(record.read_bytes())["reported"])
            async with serving(connector(broker, tmp_path / "work", "child1", apply=applied, protocol="te")):
                await obs.publish(topic("child1"), b"", retain=True)  # the mapper clears it
                await obs.publish(topic("child1"), json.dumps(handed), retain=False)  # a stale copy
                await obs.silence(1.0, [])  # (only to let it arrive: nothing must answer it)
        finally:
            await server.stop()
    assert len(applied.calls) == 1
    published_after = [p for t, p in obs.log if t == topic("child1")][2:]
    assert [json.loads(p)["status"] if p else "" for p in published_after] == ["", "gateway_downloaded"]


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"sha256": None}, "'sha256' is missing"),
        ({"sha256": "xyz"}, "'sha256' is not 64 hexadecimal digits"),
        ({"tedgeUrl": None}, "'tedgeUrl'"),
        ({"tedgeUrl": "ftp://gw/fw"}, "'tedgeUrl'"),
    ],
)
async def test_an_unusable_hand_over_fails_the_command_with_the_reason(
    tmp_path: Path, broker: Broker, change: dict[str, object], says: str
) -> None:
    handed = {
        "status": "gateway_downloaded",
        "remoteUrl": "https://t1.example/inventory/binaries/9",
        "tedgeUrl": "http://127.0.0.1:1/fw.bin",
        "name": "img",
        "version": "4",
        "sha256": SHA,
        "keep": True,
    }
    payload = {k: v for k, v in {**handed, **change}.items() if v is not None}
    child = connector(broker, tmp_path / "work", "child1", apply=Applied(), protocol="te")
    async with observer(broker.port, [topic("child1")]) as obs, serving(child):
        await obs.publish(topic("child1"), json.dumps(payload), retain=True)
        await obs.next(topic("child1"))
        failed = json.loads(await obs.next(topic("child1")))
    assert failed["status"] == "failed" and says in failed["reason"]
    assert failed["keep"] is True


@pytest.mark.parametrize("bad", [b"\xff", b"{", b"[]", b'{"status":1}', b"{" * 10_000])
async def test_hostile_te_messages_do_not_stop_the_connector(tmp_path: Path, broker: Broker, bad: bytes) -> None:
    child = connector(broker, tmp_path / "work", "child1", apply=Applied(), protocol="te")
    init = {"status": "init", "remoteUrl": "http://h/x", "name": "a", "version": "1"}
    async with observer(broker.port, [topic("child1")]) as obs, serving(child):
        await obs.publish(topic("child1", "bad"), bad, retain=True)
        await obs.publish(topic("child1"), json.dumps(init), retain=True)
        await obs.next(topic("child1"))
        assert json.loads(await obs.next(topic("child1")))["status"] == "executing"


def test_unknown_protocols_and_te_states_are_refused(tmp_path: Path) -> None:
    from tedge_firmware.connector import Connector, TeStates

    with pytest.raises(ValueError, match="protocol"):
        Connector("c1", apply=Applied(), work_dir=tmp_path, protocol="mqtt")
    with pytest.raises(ValueError, match="thin-edge itself"):
        TeStates(download_state="executing")
    with pytest.raises(ValueError, match="differ"):
        TeStates("x", "x")


async def test_the_cli_in_te_mode_updates_a_child_and_a_kill_9_before_the_hand_over_loses_nothing(
    tmp_path: Path, broker: Broker, cloud: FirmwareServer, gateway: Gateway
) -> None:
    from test_connector_support import ConnectorProcess

    applied = tmp_path / "applied"
    args = [
        "--child-id", "child1",
        "--apply-command", f'sha256sum < "$FIRMWARE_FILE" >> {applied}',
        "--mqtt-host", "127.0.0.1",
        "--mqtt-port", str(broker.port),
        "--work-dir", str(tmp_path / "work"),
        "--protocol", "te",
    ]  # fmt: skip
    process = ConnectorProcess(args, tmp_path / "connector.log")
    try:
        async with observer(broker.port, [topic("child1"), "te/device/child1///cmd/firmware_update"]) as obs:
            process.start()
            assert await obs.next("te/device/child1///cmd/firmware_update", timeout=20) == b"{}"
            init = {"status": "init", "remoteUrl": cloud.url("fw.bin"), "name": "img", "version": "4"}
            await obs.publish(topic("child1"), json.dumps(init), retain=True)
            statuses = [json.loads(await obs.next(topic("child1")))["status"] for _ in range(3)]
            assert statuses == ["init", "executing", "gateway_download"]
            process.kill()  # the gateway is not there yet: the command waits in its state
            await gateway.start()
            assert json.loads(await obs.next(topic("child1")))["status"] == "gateway_downloaded"
            process.start()
            final = json.loads(await obs.next(topic("child1"), timeout=20))
            assert final["status"] == "successful"
            assert process.terminate() == 0
    finally:
        process.ensure_stopped()
        await gateway.stop()
    assert applied.read_text().split() == [SHA, "-"]
    assert "Traceback" not in process.log()


async def test_a_legacy_connector_registered_over_te_gets_its_requests_at_its_external_id(
    tmp_path: Path, broker: Broker, cloud: FirmwareServer, gateway: Gateway
) -> None:
    # As thin-edge's python-tedge-agent: it declares itself on te/, the gateway registers it
    # as <main>:device:<child> and addresses its legacy requests there.
    xid = "parent-device:device:child1"
    applied = Applied()
    url = cloud.url("fw.bin")
    watched = ["c8y/s/us", f"c8y/s/us/{xid}", f"tedge/{xid}/commands/res/firmware_update"]
    await gateway.start()
    try:
        child = connector(broker, tmp_path / "work", "child1", apply=applied, register=True)
        async with observer(broker.port, watched) as obs, serving(child):
            assert await obs.next(f"c8y/s/us/{xid}", timeout=20) == b"114,c8y_Firmware\n"
            assert ("c8y/s/us", f"101,{xid},child1,thin-edge.io-child".encode()) in obs.log
            await gateway_ready(broker.port)
            await obs.publish("c8y/s/ds", f"515,{xid},img,4,{url}")
            answers = [json.loads(await obs.next(f"tedge/{xid}/commands/res/firmware_update")) for _ in range(2)]
            assert [a["status"] for a in answers] == ["executing", "successful"]
            assert await obs.sequence(f"c8y/s/us/{xid}", 3) == [
                b"501,c8y_Firmware\n",
                f"115,img,4,{url}".encode(),
                b"503,c8y_Firmware,\n",
            ]
    finally:
        await gateway.stop()
    [(firmware, seen)] = applied.calls
    assert (firmware.child_id, seen) == ("child1", CONTENT)


async def test_an_apply_interrupted_in_te_mode_is_settled_after_the_restart_never_re_run(
    tmp_path: Path, broker: Broker
) -> None:
    import asyncio

    server = FirmwareServer(files={"fw.bin": CONTENT})
    await server.start()
    applying = asyncio.Event()
    calls: list[Firmware] = []

    async def hanging_apply(firmware: Firmware) -> None:
        calls.append(firmware)
        applying.set()
        await asyncio.Event().wait()  # the device reboots in the middle of this

    async def verify(firmware: Firmware) -> bool:
        return firmware.path.read_bytes() == CONTENT

    handed = {
        "status": "gateway_downloaded",
        "remoteUrl": "https://t1.example/inventory/binaries/9",
        "tedgeUrl": server.url("fw.bin"),
        "name": "img",
        "version": "4",
        "sha256": SHA,
        "size": len(CONTENT),
        "keep": "me",
    }
    work = tmp_path / "work"
    try:
        async with observer(broker.port, [topic("child1")]) as obs:
            async with serving(connector(broker, work, "child1", apply=hanging_apply, protocol="te")):
                await obs.publish(topic("child1"), json.dumps(handed), retain=True)
                async with asyncio.timeout(10):
                    await applying.wait()
            restarted = connector(broker, work, "child1", apply=hanging_apply, verify=verify, protocol="te")
            async with serving(restarted):
                await obs.next(topic("child1"))  # the hand-over
                final = json.loads(await obs.next(topic("child1"), timeout=15))
    finally:
        await server.stop()
    assert final == {**handed, "status": "successful"}  # settled by the verify step, fields kept
    assert len(calls) == 1  # never applied again
