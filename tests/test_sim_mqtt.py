"""The simulator against a real broker: registration, operations, 500, JWT, bulk, control API.

A plain aiomqtt client (`harness.observer`) plays the gateway: it publishes SmartREST on
`c8y/s/us[/<child>]` and watches `c8y/s/ds` and `c8y/s/dat`.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
from collections.abc import AsyncIterator

import aiohttp
import pytest

from brokers import Broker, free_port
from harness import Observer, observer
from tedge_firmware.errors import BrokerError
from tedge_firmware.sim import (
    BulkStatus,
    C8ySimulator,
    Firmware,
    OperationStatus,
    SimulatorError,
)

DS, DAT = "c8y/s/ds", "c8y/s/dat"
WATCH = (DS, DAT)
URL = "http://fw.example/image.bin"


@pytest.fixture
async def sim(broker: Broker) -> AsyncIterator[C8ySimulator]:
    simulator = C8ySimulator(mqtt_port=broker.port, gateway_id="gw")
    await simulator.start()
    try:
        yield simulator
    finally:
        await simulator.stop()


@pytest.fixture
async def gw(broker: Broker) -> AsyncIterator[Observer]:
    async with observer(broker.port, WATCH) as watcher:
        yield watcher


async def register(gw: Observer, sim: C8ySimulator, *children: str) -> None:
    for child in children:
        await gw.publish("c8y/s/us", f"101,{child},{child},thin-edge.io-child")
        await gw.publish(f"c8y/s/us/{child}", "114,c8y_Firmware,c8y_Restart\n")
    for child in children:
        await sim.wait_for_device(child)


async def test_registration_over_mqtt_and_105(sim: C8ySimulator, gw: Observer) -> None:
    await register(gw, sim, "child1", "child2")
    device = sim.inventory["child1"]
    assert (device.parent, device.supported_operations) == ("gw", ("c8y_Firmware", "c8y_Restart"))
    await gw.publish("c8y/s/us", "105")
    assert await gw.next(DS) == b"106,child1,child2"
    assert sim.errors == []


async def test_an_operation_from_515_to_successful(sim: C8ySimulator, gw: Observer) -> None:
    await register(gw, sim, "child1")
    op = sim.create_firmware_operation("child1", "image", "1.0", URL)
    assert op.status is OperationStatus.PENDING and op.deliveries == 1
    assert await gw.next(DS) == f"515,child1,image,1.0,{URL}".encode()
    await gw.publish("c8y/s/us/child1", "501,c8y_Firmware\n")
    assert (await sim.wait_for(op.id, "EXECUTING")).status is OperationStatus.EXECUTING
    await gw.publish("c8y/s/us/child1", f"115,image,1.0,{URL}")
    await gw.publish("c8y/s/us/child1", "503,c8y_Firmware,\n")
    done = await sim.wait_for(op.id, OperationStatus.SUCCESSFUL)
    assert [change.status.value for change in done.history] == ["PENDING", "EXECUTING", "SUCCESSFUL"]
    assert sim.inventory["child1"].firmware == Firmware("image", "1.0", URL)
    assert sim.errors == []


async def test_a_failure_keeps_its_reason_and_wait_for_success_says_so(sim: C8ySimulator, gw: Observer) -> None:
    await register(gw, sim, "child1")
    op = sim.create_firmware_operation("child1", "image", "1.0", URL)
    await gw.publish("c8y/s/us/child1", '501,c8y_Firmware\n502,c8y_Firmware,"flash error, bank 2"\n')
    with pytest.raises(SimulatorError, match=r"ended FAILED \('flash error, bank 2'\), not SUCCESSFUL"):
        await sim.wait_for(op.id, OperationStatus.SUCCESSFUL)
    assert sim.operation(op.id).failure_reason == "flash error, bank 2"


async def test_wait_for_times_out_naming_the_state(sim: C8ySimulator) -> None:
    sim.add_device("child1")
    op = sim.create_firmware_operation("child1", "image", "1.0", URL)
    with pytest.raises(TimeoutError, match=f"operation {op.id} is PENDING after 0.2 s, not SUCCESSFUL"):
        await sim.wait_for(op.id, OperationStatus.SUCCESSFUL, timeout=0.2)
    with pytest.raises(KeyError):
        await sim.wait_for("999", OperationStatus.SUCCESSFUL)


async def test_500_redelivers_the_pending_operations(sim: C8ySimulator, gw: Observer) -> None:
    await register(gw, sim, "child1", "child2")
    first = sim.create_firmware_operation("child1", "a", "1", URL)
    second = sim.create_firmware_operation("child2", "b", "2", URL)
    assert len(await gw.sequence(DS, 2)) == 2
    await gw.publish("c8y/s/us/child1", "501,c8y_Firmware")
    await gw.publish("c8y/s/us", "500")
    assert await gw.next(DS) == f"515,child2,b,2,{URL}".encode()
    await gw.publish("c8y/s/us", "105")  # answered after anything else 500 would have sent
    assert await gw.next(DS) == b"106,child1,child2"
    assert (sim.operation(first.id).deliveries, sim.operation(second.id).deliveries) == (1, 2)


async def test_protocol_mistakes_are_recorded(sim: C8ySimulator, gw: Observer) -> None:
    await register(gw, sim, "child1")
    op = sim.create_firmware_operation("child1", "image", "1.0", URL)
    assert (await gw.next(DS)).startswith(b"515,child1,")
    await gw.publish("c8y/s/us/stranger", "501,c8y_Firmware")  # unknown device
    await gw.publish("c8y/s/us/child1", '502,c8y_Firmware,"gave up"')  # no 501 first
    await gw.publish("c8y/s/us/child1", b"\xff\xfe")  # not UTF-8
    errors = await sim.wait_until(lambda: sim.errors if len(sim.errors) >= 3 else None)
    assert [error.device for error in errors] == ["stranger", "child1", "child1"]
    assert "unknown device 'stranger'" in errors[0].message
    assert "send 501 first" in errors[1].message
    assert "not UTF-8" in errors[2].message
    assert sim.operation(op.id).status is OperationStatus.PENDING  # as Cumulocity leaves it
    await gw.publish("c8y/s/us", "105")  # and the simulator goes on
    assert await gw.next(DS) == b"106,child1"


async def test_an_operation_for_a_device_without_c8y_firmware_is_refused(sim: C8ySimulator, gw: Observer) -> None:
    await gw.publish("c8y/s/us", "101,child1")
    await gw.publish("c8y/s/us/child1", "114,c8y_Restart")
    await sim.wait_for_device("child1", operation="c8y_Restart")
    with pytest.raises(SimulatorError, match="does not list c8y_Firmware"):
        sim.create_firmware_operation("child1", "image", "1.0", URL)
    with pytest.raises(SimulatorError, match="no device 'nobody'"):
        sim.create_firmware_operation("nobody", "image", "1.0", URL)
    assert sim.operations == [] and len(sim.errors) == 2
    await gw.publish("c8y/s/us", "105")
    assert await gw.next(DS) == b"106,child1"  # the first thing on c8y/s/ds: no 515 went out


async def test_jwt_requests_are_answered_with_71(sim: C8ySimulator, gw: Observer) -> None:
    await gw.publish("c8y/s/uat", "")
    assert await gw.next(DAT) == f"71,{sim.token}".encode()
    assert sim.token.count(".") == 2
    assert sim.stats.jwt_requests == 1


async def test_jwt_requests_can_go_unanswered(sim: C8ySimulator, gw: Observer) -> None:
    sim.answer_jwt = False
    await gw.publish("c8y/s/uat", "")
    await gw.publish("c8y/s/us", "105")
    assert await gw.next(DS) == b"106"  # handled in order: the 71 would have come first
    assert gw.pending(DAT) == 0
    assert sim.stats.jwt_requests == 1


async def test_the_token_from_the_jwt_opens_the_binaries(broker: Broker, gw: Observer) -> None:
    async with C8ySimulator(mqtt_port=broker.port, require_token=True) as sim:
        url = sim.add_file("image.bin", b"firmware bytes")
        await gw.publish("c8y/s/uat", "")
        token = (await gw.next(DAT)).decode().removeprefix("71,")
        async with aiohttp.ClientSession() as client:
            async with client.get(url) as response:
                assert response.status == 401
            async with client.get(url, headers={"Authorization": f"Bearer {token}"}) as response:
                assert (response.status, await response.read()) == (200, b"firmware bytes")
        assert sim.stats.files["image.bin"].statuses == (401, 200)
        assert sim.stats.bytes_served == len(b"firmware bytes")


async def test_a_bulk_operation_with_a_creation_ramp(sim: C8ySimulator, gw: Observer) -> None:
    for child in ("c1", "c2", "c3"):
        sim.add_device(child)
    bulk = sim.bulk_firmware_operation(["c1", "nobody", "c2", "c3"], "image", "2.0", URL, ramp_seconds=0.15)
    requests = await gw.sequence(DS, 3)
    assert requests == [f"515,{child},image,2.0,{URL}".encode() for child in ("c1", "c2", "c3")]
    ops = [op for op in sim.operations if op.bulk_id == bulk.id]
    gaps = [later.created - earlier.created for earlier, later in itertools.pairwise(ops)]
    assert len(ops) == 3
    assert gaps[0] >= 0.29 and gaps[1] >= 0.14  # "nobody" took its place in the ramp too
    assert sim.bulk_progress(bulk.id).status is BulkStatus.EXECUTING_WITH_ERRORS  # "nobody"
    for child in ("c1", "c2", "c3"):
        await gw.publish(f"c8y/s/us/{child}", "501,c8y_Firmware\n503,c8y_Firmware,\n")
    progress = await sim.wait_for_bulk(bulk.id)
    assert (progress.status, progress.successful, progress.refused, progress.total) == (BulkStatus.FAILED, 3, 1, 4)


async def test_a_bulk_operation_without_errors_is_successful(sim: C8ySimulator, gw: Observer) -> None:
    sim.add_device("c1")
    sim.add_device("c2")
    bulk = sim.bulk_firmware_operation(["c1", "c2"], "image", "2.0", URL)
    await gw.sequence(DS, 2)
    for child in ("c1", "c2"):
        await gw.publish(f"c8y/s/us/{child}", "501,c8y_Firmware\n503,c8y_Firmware,\n")
    assert (await sim.wait_for_bulk(bulk.id)).status is BulkStatus.SUCCESSFUL


async def test_stop_ends_a_long_ramp_at_once(broker: Broker) -> None:
    sim = C8ySimulator(mqtt_port=broker.port)
    await sim.start()
    sim.add_device("c1")
    sim.add_device("c2")
    bulk = sim.bulk_firmware_operation(["c1", "c2"], "image", "1.0", URL, ramp_seconds=60)
    await sim.wait_until(lambda: sim.operations or None)
    async with asyncio.timeout(5):
        await sim.stop()
    assert sim.bulks[0].operation_ids == (sim.operations[0].id,)
    assert sim.bulk_progress(bulk.id).status is BulkStatus.EXECUTING


async def test_start_without_a_broker_is_a_broker_error() -> None:
    port = free_port()
    sim = C8ySimulator(mqtt_port=port, http_port=0)
    with pytest.raises(BrokerError, match="no connection to the MQTT broker"):
        await sim.start(connect_timeout=0.5)
    with pytest.raises(RuntimeError):  # the HTTP side was stopped again
        sim.add_file("x", b"")


# --- the control API ----------------------------------------------------------------------------


async def test_control_api_creates_operations_and_reports(sim: C8ySimulator, gw: Observer, tmp_path) -> None:
    sim.add_device("child1")
    sim.add_device("child2")
    firmware = tmp_path / "image v1.bin"
    firmware.write_bytes(b"from a path")
    async with aiohttp.ClientSession(base_url=sim.base_url) as client:
        body = {"devices": ["child1"], "name": "image", "version": "1", "path": str(firmware)}
        async with client.post("/sim/operations", json=body) as response:
            assert response.status == 201
            [operation] = (await response.json())["operations"]
        assert operation["url"] == sim.file_url("image_v1.bin")
        assert await gw.next(DS) == f"515,child1,image,1,{operation['url']}".encode()
        async with client.get(operation["url"].removeprefix(sim.base_url)) as response:
            assert await response.read() == b"from a path"
        async with client.post("/sim/operations", json=body) as response:  # same file again
            assert (await response.json())["operations"][0]["url"] == sim.file_url("image_v1.bin-2")
        bulk_body = {"devices": ["child1", "child2"], "name": "image", "version": "2", "url": URL, "ramp": 0}
        async with client.post("/sim/operations", json=bulk_body) as response:
            assert response.status == 202
            assert (await response.json())["bulk"]["total"] == 2
        finishing = asyncio.create_task(client.get(f"/sim/operations/{operation['id']}?wait=10"))
        await gw.publish("c8y/s/us/child1", '501,c8y_Firmware\n502,c8y_Firmware,"no"')
        async with await finishing as response:
            assert (await response.json())["status"] == "FAILED"
        async with client.get("/sim/status") as response:
            status = await response.json()
        assert status["gateway"] == "gw" and len(status["operations"]) == 4
        assert {device["id"] for device in status["inventory"]} == {"gw", "child1", "child2"}


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ("not json", 400, "JSON object"),
        ([], 400, "JSON object"),
        ({"devices": [], "name": "n", "version": "v", "url": URL}, 400, "devices"),
        ({"devices": [1], "name": "n", "version": "v", "url": URL}, 400, "devices"),
        ({"devices": ["child1"], "name": "", "version": "v", "url": URL}, 400, "name and version"),
        ({"devices": ["child1"], "name": "n", "version": "v"}, 400, "either url or path"),
        ({"devices": ["child1"], "name": "n", "version": "v", "url": URL, "path": "/etc/hostname"}, 400, "either url or path"),
        ({"devices": ["child1"], "name": "n", "version": "v", "url": "file:///etc/passwd"}, 400, "http(s) URL"),
        ({"devices": ["child1"], "name": "n", "version": "v", "path": "relative"}, 400, "absolute"),
        ({"devices": ["child1"], "name": "n", "version": "v", "path": "/"}, 400, "not a file"),
        ({"devices": ["child1"], "name": "n", "version": "v", "url": URL, "ramp": -1}, 400, "ramp"),
        ({"devices": ["nobody"], "name": "n", "version": "v", "url": URL}, 409, "no device 'nobody'"),
    ],
)
async def test_control_api_refuses_bad_requests(sim: C8ySimulator, body: object, status: int, words: str) -> None:
    sim.add_device("child1")
    async with aiohttp.ClientSession(base_url=sim.base_url) as client:
        data = body if isinstance(body, str) else None
        kwargs = {"data": data} if data is not None else {"json": body}
        async with client.post("/sim/operations", **kwargs) as response:  # type: ignore[arg-type]
            assert response.status == status
            assert words in (await response.json())["error"]
        async with client.get("/sim/operations/42") as response:
            assert response.status == 404
        async with client.get("/sim/operations/42?wait=abc") as response:
            assert response.status == 400
    assert sim.operations == []


def _non_loopback_address() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # no packet is sent: this only picks a source address
        except OSError:
            return None
        address = probe.getsockname()[0]
    return None if address.startswith("127.") else str(address)


async def test_control_api_answers_local_clients_only(broker: Broker) -> None:
    address = _non_loopback_address()
    if address is None:
        pytest.skip("no non-loopback address on this machine")
    async with C8ySimulator(mqtt_port=broker.port, http_host="0.0.0.0") as sim:
        sim.add_file("image.bin", b"public")
        remote = f"http://{address}:{sim.base_url.rsplit(':', 1)[1]}"
        async with aiohttp.ClientSession(base_url=remote) as client:
            async with client.get("/inventory/binaries/image.bin") as response:
                assert (response.status, await response.read()) == (200, b"public")
            async with client.get("/sim/status") as response:
                assert response.status == 403
        local = sim.base_url.replace("0.0.0.0", "127.0.0.1")
        async with aiohttp.ClientSession(base_url=local) as client, client.get("/sim/status") as response:
            assert response.status == 200
