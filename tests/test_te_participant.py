"""The `te/` participant end to end: the real gateway service, a real Mosquitto, a real cloud
server over HTTP, the file-transfer service the children fetch from.

The test plays thin-edge's mapper and the child's agent: it publishes the retained command and
moves it to our state; the gateway must download once, hand each child its local copy in the
follow-up state, and publish nothing that is not its own.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path

import aiohttp
import pytest

from brokers import Broker, free_port
from harness import (
    CHILD,
    FirmwareServer,
    Gateway,
    eventually,
    gateway_ready,
    observer,
    req_topic,
    res_topic,
    sha256,
    us,
    write_config,
)
from tedge_firmware.core.operation import file_id_for_url

FIRMWARE = b"\x7fELF te firmware \x00\xff" * 1000
COMMANDS = "te/+/+/+/+/cmd/firmware_update/+"
OWN_STATES = {"gateway_downloaded", "failed"}


def topic(child: str, cmd_id: str = "c8y-mapper-1") -> str:
    return f"te/device/{child}///cmd/firmware_update/{cmd_id}"


def command(url: str, status: str = "gateway_download", **extra: object) -> dict[str, object]:
    """The mapper's payload as the child's workflow hands it to us."""
    return {"status": status, "remoteUrl": url, "name": "te-fw", "version": "2.0", **extra}


@pytest.fixture
async def cloud() -> asyncio.AsyncIterator[FirmwareServer]:  # type: ignore[name-defined]
    async with FirmwareServer(files={"fw.bin": FIRMWARE}) as server:
        yield server


@pytest.fixture
async def gateway(tmp_path: Path, broker: Broker) -> asyncio.AsyncIterator[Gateway]:  # type: ignore[name-defined]
    config_dir = tmp_path / "etc"
    write_config(config_dir, tmp_path / "data", broker.port, free_port())
    instance = Gateway(config_dir, tmp_path / "data")
    await instance.start()
    try:
        yield instance
    finally:
        await instance.stop()


class TeWatcher:
    """Publishes as the mapper and the child would, and tells the gateway's messages apart
    from its own by what it published itself."""

    def __init__(self, obs) -> None:  # type: ignore[no-untyped-def]
        self.obs = obs
        self.mine: Counter[tuple[str, bytes]] = Counter()  # everything published here
        self._unread: Counter[tuple[str, bytes]] = Counter()  # of which `next` has not skipped

    async def publish(self, topic: str, payload: dict[str, object] | bytes) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.mine[(topic, data)] += 1
        self._unread[(topic, data)] += 1
        await self.obs.publish(topic, data, retain=True)

    async def next(self, topic: str, timeout: float = 10.0) -> dict[str, object]:
        """The next message on `topic` that this watcher did not publish."""
        async with asyncio.timeout(timeout):
            while True:
                data = await self.obs.next(topic)
                if self._unread[(topic, data)] > 0:
                    self._unread[(topic, data)] -= 1
                    continue
                return json.loads(data)  # type: ignore[no-any-return]

    def from_others(self) -> list[tuple[str, bytes]]:
        """Every message seen that this watcher did not publish."""
        left = Counter(self.mine)
        others = []
        for seen in self.obs.log:
            if left[seen] > 0:
                left[seen] -= 1
            else:
                others.append(seen)
        return others


async def fetch(url: str) -> bytes:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        assert response.status == 200, response.status
        return await response.read()


async def test_a_command_in_our_state_gets_the_gateways_copy_with_every_field_kept(
    gateway: Gateway, broker: Broker, cloud: FirmwareServer
) -> None:
    url = cloud.url("fw.bin")
    async with observer(broker.port, [COMMANDS]) as obs:
        te = TeWatcher(obs)
        payload = command(url, logPath="/var/log/fw.log", custom={"keep": [1, "two"]})
        await te.publish(topic("child1"), payload)
        moved = await te.next(topic("child1"))
    file_id = file_id_for_url(url)
    assert moved["status"] == "gateway_downloaded"
    # the 1.x route, which thin-edge 1.x/2.x's own file transfer serves too
    assert str(moved["tedgeUrl"]).endswith(f"/te/v1/files/child1/firmware_update/{file_id}")
    assert (moved["sha256"], moved["size"]) == (sha256(FIRMWARE), len(FIRMWARE))
    assert {k: v for k, v in moved.items() if k not in ("status", "tedgeUrl", "sha256", "size")} == {
        k: v for k, v in payload.items() if k != "status"
    }
    assert await fetch(str(moved["tedgeUrl"])) == FIRMWARE  # what the child downloads
    async with observer(broker.port, [topic("child1")]) as late:  # it is retained
        assert json.loads(await late.next(topic("child1"))) == moved


async def test_commands_of_many_children_and_a_legacy_operation_share_one_download(
    gateway: Gateway, broker: Broker, cloud: FirmwareServer
) -> None:
    cloud.gates["fw.bin"] = asyncio.Event()
    url = cloud.url("fw.bin")
    children = [f"te-child-{n}" for n in range(20)]
    async with observer(broker.port, [COMMANDS, "c8y/s/us", "tedge/+/commands/req/firmware_update"]) as obs:
        te = TeWatcher(obs)
        await gateway_ready(broker.port)  # connected and subscribed
        for child in children:
            await te.publish(topic(child), command(url))
        await obs.publish("c8y/s/ds", f"515,{CHILD},te-fw,2.0,{url}")
        async with asyncio.timeout(10):
            await cloud.arrivals["fw.bin"].wait()
        cloud.gates["fw.bin"].set()
        request = json.loads(await obs.next(req_topic(), timeout=10))
        moved = [await te.next(topic(child)) for child in children]
    assert cloud.count("fw.bin") == 1
    assert request["sha256"] == sha256(FIRMWARE)
    assert {m["status"] for m in moved} == {"gateway_downloaded"}
    assert {m["sha256"] for m in moved} == {sha256(FIRMWARE)}
    assert len({m["tedgeUrl"] for m in moved}) == len(children)  # a copy per child
    assert all((gateway.file_transfer / child / "firmware_update" / file_id_for_url(url)).exists() for child in children)


async def test_a_failed_download_fails_the_command_with_the_reason_and_its_fields(
    gateway: Gateway, broker: Broker, cloud: FirmwareServer
) -> None:
    async with observer(broker.port, [COMMANDS]) as obs:
        te = TeWatcher(obs)
        await te.publish(topic("child1"), command(cloud.url("missing.bin"), extra="kept"))
        failed = await te.next(topic("child1"))
    assert failed["status"] == "failed"
    assert "404" in str(failed["reason"]) and cloud.url("missing.bin") in str(failed["reason"])
    assert (failed["extra"], failed["name"], failed["version"]) == ("kept", "te-fw", "2.0")


@pytest.mark.parametrize("change", ["cleared by the mapper", "moved on by someone else"])
async def test_a_command_that_goes_during_its_download_releases_it(
    gateway: Gateway, broker: Broker, cloud: FirmwareServer, change: str
) -> None:
    cloud.gates["fw.bin"] = asyncio.Event()
    url = cloud.url("fw.bin")
    gone = b"" if change.startswith("cleared") else command(url, status="failed", reason="cancelled by the user")
    async with observer(broker.port, [COMMANDS]) as obs:
        te = TeWatcher(obs)
        await te.publish(topic("child1"), command(url))
        async with asyncio.timeout(10):
            await cloud.arrivals["fw.bin"].wait()
        await te.publish(topic("child1"), gone)
        # the download stopped: a new command for the same file starts a new one
        cloud.arrivals["fw.bin"].clear()
        await te.publish(topic("child2"), command(url))
        async with asyncio.timeout(10):
            await cloud.arrivals["fw.bin"].wait()
        assert cloud.count("fw.bin") == 2
        cloud.gates["fw.bin"].set()
        assert (await te.next(topic("child2")))["status"] == "gateway_downloaded"
        await obs.silence(0.5)
        assert [t for t, _ in te.from_others()] == [topic("child2")]  # nothing for child1
    assert not (gateway.file_transfer / "child1").exists()


async def test_the_copy_goes_when_the_command_ends_and_the_participant_publishes_only_its_states(
    gateway: Gateway, broker: Broker, cloud: FirmwareServer
) -> None:
    url = cloud.url("fw.bin")
    link = gateway.file_transfer / "child1" / "firmware_update" / file_id_for_url(url)
    async with observer(broker.port, [COMMANDS]) as obs:
        te = TeWatcher(obs)
        # the whole life of a command, as the mapper and the child's agent move it
        await te.publish(topic("child1"), command(url, status="init"))
        await te.publish(topic("child1"), command(url, status="executing"))
        await te.publish(topic("child1"), command(url))
        moved = await te.next(topic("child1"))
        assert link.is_symlink()
        downloaded = {**moved, "downloadedPath": "/tmp/firmware_update_c8y-mapper-1"}
        await te.publish(topic("child1"), {**downloaded, "status": "install"})
        await te.publish(topic("child1"), {**downloaded, "status": "successful"})
        assert await eventually(lambda: not link.exists())
        await te.publish(topic("child1"), b"")  # cleared by the mapper
        await obs.silence(0.5)
        others = te.from_others()
    assert [t for t, _ in others] == [topic("child1")]
    for _, data in others:
        assert json.loads(data)["status"] in OWN_STATES


async def test_a_copy_still_used_by_another_command_of_the_child_stays(
    gateway: Gateway, broker: Broker, cloud: FirmwareServer
) -> None:
    url = cloud.url("fw.bin")
    link = gateway.file_transfer / "child1" / "firmware_update" / file_id_for_url(url)
    async with observer(broker.port, [COMMANDS]) as obs:
        te = TeWatcher(obs)
        await te.publish(topic("child1", "a"), command(url))
        await te.publish(topic("child1", "b"), command(url))
        first, second = await te.next(topic("child1", "a")), await te.next(topic("child1", "b"))
        await te.publish(topic("child1", "a"), {**first, "status": "failed", "reason": "x"})
        await te.publish(topic("child1", "a"), b"")
        await obs.silence(0.5)
        assert link.is_symlink()  # "b" still needs it
        await te.publish(topic("child1", "b"), {**second, "status": "successful"})
        assert await eventually(lambda: not link.exists())


HOSTILE: list[tuple[str, bytes]] = [
    (topic("child1", "h1"), b"\xff\xfe not utf-8"),
    (topic("child1", "h2"), b"{not json"),
    (topic("child1", "h3"), b"[]"),
    (topic("child1", "h4"), b'{"status": 5}'),
    (topic("child1", "h5"), b'{"status":"gateway_download","x":NaN}'),
    (topic("child1", "h6"), b'{"status":"gateway_download","pad":"' + b"x" * 70_000 + b'"}'),
    (topic("child1", "h7"), b"[" * 50_000 + b"]" * 50_000),
    ("te/device/child1///cmd/firmware_update", b'{"status":"gateway_download"}'),
    ("te/device/child1//cmd/firmware_update/x", b'{"status":"gateway_download"}'),
]


async def test_hostile_messages_on_te_topics_change_nothing_and_the_next_command_is_served(
    gateway: Gateway, broker: Broker, cloud: FirmwareServer
) -> None:
    async with observer(broker.port, [COMMANDS]) as obs:
        te = TeWatcher(obs)
        for where, data in HOSTILE:
            await te.publish(where, data)
        await te.publish(topic("child1"), command(cloud.url("fw.bin")))
        moved = await te.next(topic("child1"))
        await obs.silence(0.5)
        assert moved["status"] == "gateway_downloaded"
        assert [t for t, _ in te.from_others()] == [topic("child1")]


@pytest.mark.parametrize(
    ("where", "payload", "says"),
    [
        (topic("child1", "m1"), {"status": "gateway_download", "name": "a", "version": "1"}, "'remoteUrl' is missing"),
        (topic("child1", "m2"), {"status": "gateway_download", "remoteUrl": "http://h/x", "version": "1"}, "'name' is missing"),
        (topic("child1", "m3"), {"status": "gateway_download", "remoteUrl": "$PROVIDED", "name": "a", "version": "1"}, "'remoteUrl'"),
        ("te/device/..///cmd/firmware_update/m4", None, "path component"),
        ("te/device/child1/service/agent/cmd/firmware_update/m5", None, "not a device/<name>// entity"),
    ],
)
async def test_a_command_in_our_state_that_cannot_be_served_fails_with_a_reason(
    gateway: Gateway, broker: Broker, cloud: FirmwareServer, where: str, payload: dict[str, object] | None, says: str
) -> None:
    async with observer(broker.port, [COMMANDS]) as obs:
        te = TeWatcher(obs)
        await te.publish(where, payload if payload is not None else command(cloud.url("fw.bin")))
        failed = await te.next(where)
    assert failed["status"] == "failed"
    assert says in str(failed["reason"])


async def test_legacy_operations_go_on_beside_te_commands(
    gateway: Gateway, broker: Broker, cloud: FirmwareServer
) -> None:
    url = cloud.url("fw.bin")
    async with observer(broker.port, [COMMANDS, "c8y/s/us", "c8y/s/us/+", "tedge/+/commands/req/firmware_update"]) as obs:
        te = TeWatcher(obs)
        await gateway_ready(broker.port)  # connected and subscribed
        await te.publish(topic("child1"), command(url))
        await obs.publish("c8y/s/ds", f"515,{CHILD},te-fw,2.0,{url}")
        request = json.loads(await obs.next(req_topic(), timeout=10))
        moved = await te.next(topic("child1"))
        await te.publish(topic("child1"), {**moved, "status": "successful"})
        await obs.publish(res_topic(), json.dumps({"id": request["id"], "status": "successful"}))
        assert (await obs.sequence(us(), 3))[2] == b"503,c8y_Firmware,\n"
    assert await eventually(lambda: not (gateway.file_transfer / CHILD / "firmware_update").exists() or not any((gateway.file_transfer / CHILD / "firmware_update").iterdir()))
