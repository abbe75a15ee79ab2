"""`c8y.smartrest.use_operation_id = true`: `c8y_Firmware` operations are taken from their JSON
form by operation id, reported with `504`/`505`/`506`, and acted on once whatever Cumulocity
re-delivers (its `515` copy, a re-delivery after `500`). Also: operations tedge-firmware cannot
carry out (patches, `$PROVIDED`) get a clear failure, by id or by type."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from brokers import Broker, free_port
from harness import (
    FirmwareServer,
    Gateway,
    no_operation_files_left,
    observer,
    req_topic,
    res_topic,
    us,
    write_config,
)
from test_connector_support import connector, serving

CONTENT = b"firmware by id" * 2000
BY_ID = "[c8y.smartrest]\nuse_operation_id = true\n"
OPS = "c8y/devicecontrol/notifications"
WATCHED = ["c8y/s/us", "c8y/s/us/+", "tedge/+/commands/req/firmware_update"]


def operation(c8y_id: str, device: str, url: str, **fragment: object) -> dict[str, object]:
    """What Cumulocity sends on devicecontrol/notifications (the fields tedge-firmware reads,
    and some it does not)."""
    return {
        "id": c8y_id,
        "status": "PENDING",
        "deviceId": "4711",
        "c8y_Firmware": {"name": "img", "version": "2.0", "url": url, **fragment},
        "externalSource": {"externalId": device, "type": "c8y_Serial"},
    }


@pytest.fixture
async def cloud() -> AsyncIterator[FirmwareServer]:
    async with FirmwareServer(files={"fw.bin": CONTENT}) as server:
        yield server


def gateway_for(tmp_path: Path, broker: Broker, extra: str) -> Gateway:
    config_dir = tmp_path / "etc"
    write_config(config_dir, tmp_path / "data", broker.port, free_port(), extra=extra)
    return Gateway(config_dir, tmp_path / "data")


@pytest.fixture
async def gateway(tmp_path: Path, broker: Broker) -> AsyncIterator[Gateway]:
    instance = gateway_for(tmp_path, broker, BY_ID)
    try:
        yield instance
    finally:
        await instance.stop()


async def started(gateway: Gateway, obs) -> None:  # type: ignore[no-untyped-def]
    await gateway.start()
    assert await obs.next("c8y/s/us", timeout=20) == b"500"


async def test_an_operation_by_id_is_reported_by_id_and_its_515_copy_is_ignored(
    broker: Broker, cloud: FirmwareServer, gateway: Gateway
) -> None:
    url = cloud.url("fw.bin")
    async with observer(broker.port, WATCHED) as obs:
        await started(gateway, obs)
        await obs.publish("c8y/s/ds", f"515,child1,img,2.0,{url}")  # the SmartREST copy, first
        await obs.publish(OPS, json.dumps(operation("1234", "child1", url)))
        await obs.publish("c8y/s/ds", f"515,child1,img,2.0,{url}")  # and after
        request = json.loads(await obs.next(req_topic("child1")))
        assert request["attempt"] == 1
        await obs.publish(res_topic("child1"), json.dumps({"id": request["id"], "status": "executing"}))
        await obs.publish(res_topic("child1"), json.dumps({"id": request["id"], "status": "successful"}))
        assert await obs.sequence(us("child1"), 3) == [b"504,1234\n", f"115,img,2.0,{url}".encode(), b"506,1234\n"]
        await obs.silence(0.5, [req_topic("child1"), us("child1")])


async def test_re_deliveries_re_send_while_running_and_are_ignored_after_the_end(
    broker: Broker, cloud: FirmwareServer, gateway: Gateway
) -> None:
    url = cloud.url("fw.bin")
    pending = json.dumps(operation("77", "child1", url))
    async with observer(broker.port, WATCHED) as obs:
        await started(gateway, obs)
        await obs.publish(OPS, pending)
        first = json.loads(await obs.next(req_topic("child1")))
        await obs.publish(OPS, pending)  # re-delivered (after a 500): the same operation
        again = json.loads(await obs.next(req_topic("child1")))
        assert (again["id"], again["attempt"]) == (first["id"], 2)
        await obs.publish(res_topic("child1"), json.dumps({"id": first["id"], "status": "failed", "reason": "no space"}))
        assert await obs.sequence(us("child1"), 2) == [b"504,77\n", b'505,77,"no space"\n']
        await obs.publish(OPS, pending)  # once more, after the end
        await obs.silence(0.5, [req_topic("child1"), us("child1")])


async def test_one_payload_with_several_operations_serves_each(
    broker: Broker, cloud: FirmwareServer, gateway: Gateway
) -> None:
    url = cloud.url("fw.bin")
    lines = [
        json.dumps(operation("1", "child1", url)),
        json.dumps({"id": "2", "c8y_Restart": {}, "externalSource": {"externalId": "child2", "type": "x"}}),
        json.dumps(operation("3", "child3", url)),
    ]
    async with observer(broker.port, WATCHED) as obs:
        await started(gateway, obs)
        await obs.publish(OPS, "\n".join(lines))
        for child in ("child1", "child3"):
            request = json.loads(await obs.next(req_topic(child)))
            await obs.publish(res_topic(child), json.dumps({"id": request["id"], "status": "successful"}))
        assert (await obs.sequence(us("child1"), 3))[2] == b"506,1\n"
        assert (await obs.sequence(us("child3"), 3))[2] == b"506,3\n"
        await obs.silence(0.3, [req_topic("child2")])


HOSTILE = [
    b"\xff\xfe",
    b"{not json",
    b"[" * 50_000 + b"]" * 50_000,
    b'{"id":"1","c8y_Firmware":{"name":"a","version":"1","url":"http://h/x"}}',  # no device
    json.dumps(operation("12a", "child1", "http://h/x")).encode(),  # not an id
    json.dumps(operation("", "child1", "http://h/x")).encode(),
    json.dumps({**operation("5", "child1", "http://h/x"), "c8y_Firmware": "x"}).encode(),
    json.dumps(operation("6", "child1", 42)).encode(),  # type: ignore[arg-type]
    json.dumps(operation("7", "bad/child", "http://h/x")).encode(),
    json.dumps(operation("8", "#", "http://h/x")).encode(),
    b"x" * 70_000,
]


async def test_hostile_json_operations_change_nothing(broker: Broker, cloud: FirmwareServer, gateway: Gateway) -> None:
    async with observer(broker.port, WATCHED) as obs:
        await started(gateway, obs)
        for payload in HOSTILE:
            await obs.publish(OPS, payload)
        await obs.publish(OPS, json.dumps(operation("9", "child1", cloud.url("fw.bin"))))
        request = json.loads(await obs.next(req_topic("child1")))
        assert request["name"] == "img"
        await obs.silence(0.3, [])
        assert [t for t, _ in obs.log if t.startswith("tedge/")] == [req_topic("child1")]
        assert [t for t, _ in obs.log if t.startswith("c8y/s/us/")] == []


@pytest.mark.parametrize(
    ("fragment", "url", "says"),
    [
        ({"dependency": "1.9", "isPatch": True}, "fw.bin", "Firmware patch img 2.0 to 1.9 is not supported"),
        ({"isPatch": True}, "fw.bin", "Firmware patch img 2.0 is not supported"),
        ({}, "$PROVIDED", "has no URL ($PROVIDED"),
    ],
)
async def test_what_cannot_be_done_fails_by_id_with_the_reason(
    broker: Broker, cloud: FirmwareServer, gateway: Gateway, fragment: dict[str, object], url: str, says: str
) -> None:
    full_url = url if url.startswith("$") else cloud.url(url)
    async with observer(broker.port, WATCHED) as obs:
        await started(gateway, obs)
        await obs.publish(OPS, json.dumps(operation("42", "child1", full_url, **fragment)))
        executing, failed = await obs.sequence(us("child1"), 2)
        assert executing == b"504,42\n"
        assert failed.startswith(b'505,42,"') and says.encode() in failed
    assert cloud.count("fw.bin") == 0


@pytest.mark.parametrize(
    ("record", "says"),
    [
        ("525,child1,img,2.0,{url},1.9", "Firmware patch img 2.0 to 1.9 is not supported"),
        ("515,child1,img,2.0,$PROVIDED", "has no URL ($PROVIDED"),
    ],
)
async def test_what_cannot_be_done_fails_by_type_without_operation_ids(
    tmp_path: Path, broker: Broker, cloud: FirmwareServer, record: str, says: str
) -> None:
    gateway = gateway_for(tmp_path, broker, "")
    try:
        async with observer(broker.port, WATCHED) as obs:
            await started(gateway, obs)
            await obs.publish("c8y/s/ds", record.format(url=cloud.url("fw.bin")))
            executing, failed = await obs.sequence(us("child1"), 2)
            assert executing == b"501,c8y_Firmware\n"
            assert failed.startswith(b'502,c8y_Firmware,"') and says.encode() in failed
            await obs.publish(OPS, json.dumps(operation("1", "child1", cloud.url("fw.bin"))))
            await obs.silence(0.3, [req_topic("child1")])  # JSON is not read without the key
    finally:
        await gateway.stop()


async def test_an_operation_by_id_survives_a_restart_and_still_reports_by_id(
    broker: Broker, cloud: FirmwareServer, gateway: Gateway
) -> None:
    url = cloud.url("fw.bin")
    async with observer(broker.port, WATCHED) as obs:
        await started(gateway, obs)
        await obs.publish(OPS, json.dumps(operation("555", "child1", url)))
        first = json.loads(await obs.next(req_topic("child1")))
        await gateway.stop()
        await started(gateway, obs)
        again = json.loads(await obs.next(req_topic("child1")))
        assert (again["id"], again["attempt"]) == (first["id"], 2)
        await obs.publish(res_topic("child1"), json.dumps({"id": first["id"], "status": "successful"}))
        assert await obs.sequence(us("child1"), 3) == [b"504,555\n", f"115,img,2.0,{url}".encode(), b"506,555\n"]
    assert await no_operation_files_left(gateway.data) == []  # once Cumulocity had every line


async def test_a_te_child_is_reported_by_id_too(
    tmp_path: Path, broker: Broker, cloud: FirmwareServer, gateway: Gateway
) -> None:
    xid = "parent-device:device:child1"
    contents: list[bytes] = []

    async def apply(firmware) -> None:  # type: ignore[no-untyped-def]
        contents.append(firmware.path.read_bytes())

    url = cloud.url("fw.bin")
    child = connector(broker, tmp_path / "work", "child1", apply=apply, protocol="te")
    async with observer(broker.port, [*WATCHED, f"c8y/s/us/{xid}"]) as obs, serving(child):
        await started(gateway, obs)
        while await obs.next(f"c8y/s/us/{xid}", timeout=20) != b"114,c8y_Firmware\n":
            pass
        await obs.publish(OPS, json.dumps(operation("900", xid, url)))
        assert await obs.sequence(f"c8y/s/us/{xid}", 3, timeout=20) == [
            b"504,900\n",
            f"115,img,2.0,{url}".encode(),
            b"506,900\n",
        ]
    assert contents == [CONTENT]
