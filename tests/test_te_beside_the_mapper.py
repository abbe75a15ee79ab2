"""thin-edge 1.x/2.x as deployed: its mapper (here the simulator's MODEL of it) turns JSON
operations into `te/` commands for te/ children, `c8y-firmware-plugin` serves the legacy
children from their `515`s and plays only the `gateway_download` step for the te/ ones; the
file-transfer service runs on its own. One bulk operation, both kinds of children, one cloud
download; every operation ends once, by id for te/ children and by type for legacy ones."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from pathlib import Path

from brokers import Broker, free_port
from harness import load, observer, write_config
from tedge_firmware.connector import BrokerSettings, Connector, DownloadSettings, Firmware
from tedge_firmware.gateway.service import ServiceOptions, serve_file_transfer, serve_plugin
from tedge_firmware.shell.mqtt import MqttSettings
from tedge_firmware.sim import FIRMWARE, C8ySimulator, MapperModelRunner, OperationStatus

CONTENT = os.urandom(200 * 1024)
TE = [f"te-{n}" for n in range(10)]
LEGACY = [f"legacy-{n}" for n in range(10)]
GW = "parent-device"


def xid(child: str) -> str:
    return f"{GW}:device:{child}"


async def test_te_children_through_the_mapper_and_legacy_children_through_the_plugin(
    tmp_path: Path, broker: Broker
) -> None:
    config_dir = tmp_path / "etc"
    write_config(config_dir, tmp_path / "data", broker.port, free_port())
    config = load(config_dir)
    applied: dict[str, list[str]] = {child: [] for child in [*TE, *LEGACY]}

    async def apply(firmware: Firmware) -> None:
        applied[firmware.child_id].append(hashlib.sha256(firmware.path.read_bytes()).hexdigest())

    def children(names: list[str], **options: object) -> Connector:
        return Connector(
            *names,
            apply=apply,
            work_dir=tmp_path / str(options.get("protocol", "legacy")),
            broker=BrokerSettings(host="127.0.0.1", port=broker.port, client_id=f"children-{names[0]}"),
            download=DownloadSettings(parallel=8),
            **options,  # type: ignore[arg-type]
        )

    te_children, legacy_children = children(TE, protocol="te"), children(LEGACY)
    stop = asyncio.Event()
    mapper = MapperModelRunner(MqttSettings(host="127.0.0.1", port=broker.port, client_id="mapper-model"), GW)
    devices = [xid(child) for child in TE] + LEGACY
    async with C8ySimulator(mqtt_port=broker.port, gateway_id=GW, json_operations=True) as sim, observer(
        broker.port, ["te/+/+/+/+/cmd/firmware_update/+"]
    ) as obs:
        for child in LEGACY:  # thin-edge's mapper registers them from their operation files
            sim.add_device(child, parent=GW, operations=(FIRMWARE,))
        await mapper.start()
        services = [
            asyncio.create_task(serve_plugin(config, stop, ServiceOptions(with_file_transfer=False))),
            asyncio.create_task(serve_file_transfer(config, stop)),
            asyncio.create_task(te_children.run()),
            asyncio.create_task(legacy_children.run()),
        ]
        try:

            def all_registered() -> bool:
                return all((d := sim.device(device)) is not None and d.supports(FIRMWARE) for device in devices)

            await sim.wait_until(all_registered, timeout=20)
            url = sim.add_file("both.bin", CONTENT)
            bulk = sim.bulk_firmware_operation(devices, "both", "4.0", url)
            progress = await sim.wait_for_bulk(bulk.id, timeout=60)
            await obs.silence(0.5, [])
        finally:
            stop.set()
            for connector in (te_children, legacy_children):
                connector.stop()
            async with asyncio.timeout(15):
                await asyncio.gather(*services)
            await mapper.stop()
    assert (progress.successful, progress.failed, progress.total) == (20, 0, 20)
    for device in devices:
        [operation] = sim.operations_of(device)
        statuses = [change.status for change in operation.history]
        assert statuses == [OperationStatus.PENDING, OperationStatus.EXECUTING, OperationStatus.SUCCESSFUL]
    expected = hashlib.sha256(CONTENT).hexdigest()
    assert applied == {child: [expected] for child in applied}
    assert sim.stats.files["both.bin"].complete == 1  # one cloud download for both kinds
    assert sim.errors == []
    for child in TE:  # each command went through every state once, ours among them, and was cleared
        command_topics = {t for t, _ in obs.log if t.startswith(f"te/device/{child}///cmd/")}
        [topic] = command_topics
        states = [json.loads(p)["status"] if p else "cleared" for t, p in obs.log if t == topic]
        assert states == ["init", "executing", "gateway_download", "gateway_downloaded", "successful", "cleared"]
