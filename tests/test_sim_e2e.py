"""The simulator with the real gateway (`tedge-firmware run` in-process) and a scripted child.

The simulator registers the child from the gateway's own `105`/`101`/`114`, sends the `515`,
answers the JWT request, serves the binary (cut once, so the gateway must resume), and records
the gateway's `501`/`115`/`503` (or `502`) in Cumulocity's terms, with no protocol mistake.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from brokers import Broker
from harness import (
    Gateway,
    Observer,
    observer,
    req_topic,
    res_topic,
    sha256,
    write_simulated_tenant_config,
)
from tedge_firmware.sim import C8ySimulator, FileFaults, Firmware, OperationStatus

CHILD = "child1"
FIRMWARE = bytes(range(256)) * 2048  # 512 KiB


@dataclass
class Stack:
    sim: C8ySimulator
    child: Observer
    gateway: Gateway


@pytest.fixture
async def stack(broker: Broker, tmp_path: Path, unused_port: int) -> AsyncIterator[Stack]:
    config_dir, data = tmp_path / "etc", tmp_path / "data"
    # the binaries are the tenant's own, so the gateway asks for a JWT and sends it
    write_simulated_tenant_config(config_dir, data, broker.port, unused_port, [CHILD])
    async with C8ySimulator(mqtt_port=broker.port, gateway_id="parent-device", require_token=True) as sim:
        gateway = Gateway(config_dir, data)
        await gateway.start()
        try:
            async with observer(broker.port, [req_topic(CHILD)]) as child:
                await sim.wait_for_device(CHILD)  # the gateway's 101 and 114 reached the tenant
                yield Stack(sim, child, gateway)
        finally:
            await gateway.stop()


async def receive_request(stack: Stack) -> dict[str, object]:
    request = json.loads(await stack.child.next(req_topic(CHILD), timeout=15))
    assert isinstance(request, dict)
    return request


async def respond(stack: Stack, op_id: object, status: str, **extra: str) -> None:
    await stack.child.publish(res_topic(CHILD), json.dumps({"id": op_id, "status": status, **extra}))


async def test_an_operation_the_simulator_sends_ends_successful(stack: Stack) -> None:
    sim = stack.sim
    assert sim.inventory[CHILD].parent == "parent-device"
    url = sim.add_file("image.bin", FIRMWARE, faults=FileFaults(cut_after=100_000))
    op = sim.create_firmware_operation(CHILD, "image", "1.0", url)
    request = await receive_request(stack)
    assert (request["name"], request["version"], request["sha256"]) == ("image", "1.0", sha256(FIRMWARE))
    async with aiohttp.ClientSession() as client, client.get(str(request["url"])) as response:
        assert sha256(await response.read()) == sha256(FIRMWARE)  # what the child got
    await respond(stack, request["id"], "executing")
    await sim.wait_for(op.id, OperationStatus.EXECUTING)
    await respond(stack, request["id"], "successful")
    done = await sim.wait_for(op.id, OperationStatus.SUCCESSFUL)
    assert [change.status for change in done.history] == [
        OperationStatus.PENDING,
        OperationStatus.EXECUTING,
        OperationStatus.SUCCESSFUL,
    ]
    assert sim.inventory[CHILD].firmware == Firmware("image", "1.0", url)
    assert sim.errors == []
    # the gateway fetched a JWT, was cut once and resumed where the cut was: one copy in all
    files = sim.stats.files["image.bin"]
    assert sim.stats.jwt_requests >= 1
    assert 401 not in files.statuses
    assert files.range_starts == (100_000,)
    assert files.bytes_served == len(FIRMWARE)


async def test_a_failure_reaches_the_tenant_with_its_reason(stack: Stack) -> None:
    sim = stack.sim
    url = sim.add_file("image.bin", FIRMWARE)
    op = sim.create_firmware_operation(CHILD, "image", "2.0", url)
    request = await receive_request(stack)
    await respond(stack, request["id"], "failed", reason="flash error")
    failed = await sim.wait_for(op.id, OperationStatus.FAILED)
    assert failed.failure_reason == "flash error"
    assert sim.inventory[CHILD].firmware is None
    assert sim.errors == []  # the gateway sent 501 before its 502, as Cumulocity needs
