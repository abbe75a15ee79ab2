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

from brokers import Broker
from harness import Gateway, write_config
from tedge_firmware.connector import BrokerSettings, Connector, DownloadSettings, Firmware
from tedge_firmware.sim import FIRMWARE, C8ySimulator, OperationStatus

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

            def all_registered() -> bool:
                return all((device := sim.device(xid(c))) is not None and device.supports(FIRMWARE) for c in CHILDREN)

            await sim.wait_until(all_registered, timeout=20)
            bulk = sim.bulk_firmware_operation([xid(c) for c in CHILDREN], "fleet", "2.0", url)
            progress = await sim.wait_for_bulk(bulk.id, timeout=30)
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
    assert files.statuses == (200,) and files.complete == 1  # one cloud download for 50 children
    assert sim.errors == []
