"""A fleet end to end: the real gateway, the simulator and 50 children served by one SDK connector.

One bulk operation for 50 children: every child's operation must end SUCCESSFUL in the
simulator, every child must have applied exactly the firmware's bytes once, the inventory must
show the new firmware for each, and the cloud must have been asked for the binary once.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import pytest

from brokers import Broker
from harness import Gateway, assert_each_updated_once, bulk_rollout, observer, write_config
from tedge_firmware.connector import BrokerSettings, Connector, DownloadSettings, Firmware
from tedge_firmware.sim import C8ySimulator, OperationStatus

CHILDREN = [f"fleet-{index:02d}" for index in range(50)]
CONTENT = os.urandom(256 * 1024)


async def test_fifty_children_one_cloud_download(broker: Broker, tmp_path: Path, unused_port: int) -> None:
    config_dir, data = tmp_path / "etc", tmp_path / "data"
    write_config(config_dir, data, broker.port, unused_port)
    (config_dir / "operations" / "c8y").mkdir(parents=True)
    applied: dict[str, list[str]] = {child: [] for child in CHILDREN}

    async def apply(firmware: Firmware) -> None:
        digest = await asyncio.to_thread(lambda: hashlib.sha256(firmware.path.read_bytes()).hexdigest())
        applied[firmware.child_id].append(digest)

    def xid(child: str) -> str:
        """Declared over te/, a child has thin-edge's external id in Cumulocity."""
        return f"parent-device:device:{child}"

    connector = Connector(
        *CHILDREN,
        apply=apply,
        work_dir=tmp_path / "children",
        broker=BrokerSettings(host="127.0.0.1", port=broker.port, client_id="fleet-children"),
        download=DownloadSettings(parallel=8),
        register=True,  # the children declare c8y_Firmware over MQTT; the gateway registers them
    )
    gateway = Gateway(config_dir, data)
    async with C8ySimulator(mqtt_port=broker.port, gateway_id="parent-device") as sim:
        await gateway.start()
        serving = asyncio.create_task(connector.run())
        try:
            url = sim.add_file("fleet.bin", CONTENT)
            progress = await bulk_rollout(sim, [xid(c) for c in CHILDREN], "fleet", "2.0", url, timeout=30)
        finally:
            connector.stop()
            async with asyncio.timeout(10):
                await serving
            await gateway.stop()
    assert (progress.successful, progress.failed, progress.total) == (50, 0, 50)
    assert all(sim.operations_of(xid(child))[-1].status is OperationStatus.SUCCESSFUL for child in CHILDREN)
    expected = hashlib.sha256(CONTENT).hexdigest()
    assert applied == {child: [expected] for child in CHILDREN}  # each applied once, the right bytes
    for child in CHILDREN:
        firmware = sim.inventory[xid(child)].firmware
        assert firmware is not None and (firmware.name, firmware.version, firmware.url) == ("fleet", "2.0", url)
    files = sim.stats.files["fleet.bin"]
    # one cloud download for 50 children; later operations only had the origin confirm the copy
    assert files.statuses[0] == 200 and set(files.statuses[1:]) <= {304} and files.complete == 1
    assert sim.errors == []


TE_CHILDREN = [f"te-{index:02d}" for index in range(50)]
LEGACY_CHILDREN = [f"legacy-{index:02d}" for index in range(50)]


@pytest.mark.parametrize("by_id", [False, True], ids=["515 and 501-503", "JSON and 504-506"])
async def test_fifty_te_and_fifty_legacy_children_update_from_one_cloud_download(
    broker: Broker, tmp_path: Path, unused_port: int, by_id: bool
) -> None:
    """`tedge-firmware run` plays thin-edge's mapper for the te/ children (their commands, the
    gateway's download step) and the legacy plugin for the others, from one cached download;
    operations taken from `515` and reported by type, or taken from JSON and reported by id."""
    config_dir, data = tmp_path / "etc", tmp_path / "data"
    extra = "[c8y.smartrest]\nuse_operation_id = true\n" if by_id else ""
    write_config(config_dir, data, broker.port, unused_port, extra=extra)
    for child in LEGACY_CHILDREN:  # registered by operation files: their ids are their names
        (config_dir / "operations" / "c8y" / child).mkdir(parents=True)
        (config_dir / "operations" / "c8y" / child / "c8y_Firmware").touch()
    applied: dict[str, list[str]] = {child: [] for child in [*TE_CHILDREN, *LEGACY_CHILDREN]}

    async def apply(firmware: Firmware) -> None:
        digest = await asyncio.to_thread(lambda: hashlib.sha256(firmware.path.read_bytes()).hexdigest())
        applied[firmware.child_id].append(digest)

    def xid(child: str) -> str:
        return f"parent-device:device:{child}"

    te_connector = Connector(
        *TE_CHILDREN,
        apply=apply,
        work_dir=tmp_path / "te-children",
        broker=BrokerSettings(host="127.0.0.1", port=broker.port, client_id="te-children"),
        download=DownloadSettings(parallel=8),
        protocol="te",  # registers over te/, takes te/ commands
    )
    legacy_connector = Connector(
        *LEGACY_CHILDREN,
        apply=apply,
        work_dir=tmp_path / "legacy-children",
        broker=BrokerSettings(host="127.0.0.1", port=broker.port, client_id="legacy-children"),
        download=DownloadSettings(parallel=8),
    )
    devices = [xid(child) for child in TE_CHILDREN] + LEGACY_CHILDREN
    gateway = Gateway(config_dir, data)
    sim = C8ySimulator(mqtt_port=broker.port, gateway_id="parent-device", json_operations=by_id)
    async with sim, observer(broker.port, ["c8y/s/us/+"]) as cloud:
        await gateway.start()
        tasks = [asyncio.create_task(c.run()) for c in (te_connector, legacy_connector)]
        try:
            url = sim.add_file("mixed.bin", CONTENT)
            progress = await bulk_rollout(sim, devices, "mixed", "3.0", url, timeout=60)
        finally:
            for instance in (te_connector, legacy_connector):
                instance.stop()
            async with asyncio.timeout(15):
                await asyncio.gather(*tasks)
            await gateway.stop()
    assert_each_updated_once(sim, devices, progress, applied, CONTENT)  # once each, the right bytes
    statuses = {payload[:3] for _, payload in cloud.log if payload[:3] in (b"501", b"503", b"504", b"506")}
    assert statuses == ({b"504", b"506"} if by_id else {b"501", b"503"})
    files = sim.stats.files["mixed.bin"]
    # one cloud download for all 100; later operations only had the origin confirm the copy
    assert files.statuses[0] == 200 and set(files.statuses[1:]) <= {304} and files.complete == 1
    assert sim.errors == []
