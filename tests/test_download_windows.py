"""Download windows (`firmware.download.windows`): outside a window a download waits, its
operation is EXECUTING in Cumulocity meanwhile (one 501) and the log says why; when the window
opens the download runs and the operation goes on. Restarting while it waits does not announce
it again."""

from __future__ import annotations

import json
import logging
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from brokers import Broker, free_port
from harness import Gateway, eventually, observer, write_simulated_tenant_config
from tedge_firmware.core.operation import FetchRecord
from tedge_firmware.core.windows import Window, describe, parse_windows, seconds_until_open
from tedge_firmware.errors import StoreError
from tedge_firmware.sim import C8ySimulator, OperationStatus

H = 3600


@pytest.mark.parametrize(
    ("text", "second", "wait"),
    [
        ("22:00-06:00", 23 * H, 0),
        ("22:00-06:00", 5 * H + 3599, 0),
        ("22:00-06:00", 6 * H, 16 * H),  # closed from 06:00: opens at 22:00
        ("22:00-06:00", 21 * H + 1800, 1800),
        ("12:30-13:00,22:00-06:00", 7 * H, 5 * H + 1800),  # the next one to open
        ("00:00-00:00", 12 * H, 0),  # the whole day
        ("09:00:30-09:00:40", 9 * H + 10, 20),
    ],
)
def test_when_a_window_is_open(text: str, second: float, wait: float) -> None:
    assert seconds_until_open(parse_windows(text), second) == wait


def test_no_windows_means_any_time_and_the_text_round_trips() -> None:
    assert seconds_until_open((), 12 * H) == 0
    assert describe(parse_windows("22:00-06:00, 12:30:15-13:00")) == "22:00-06:00,12:30:15-13:00"
    assert parse_windows("7:05-8:00") == (Window(7 * H + 300, 8 * H),)


@pytest.mark.parametrize("text", ["", "22:00", "22-06", "24:00-01:00", "22:60-23:00", "22:00-06:00,", "nightly"])
def test_what_is_not_a_window(text: str) -> None:
    with pytest.raises(ValueError, match="not a window"):
        parse_windows(text)


def test_a_fetch_record_says_whether_cumulocity_was_told() -> None:
    record = FetchRecord("op1", "child1", "fw", "1.0", "http://x/fw", 1, announced=True)
    assert FetchRecord.from_json(record.to_json()) == record
    plain = FetchRecord("op1", "child1", "fw", "1.0", "http://x/fw", 1)
    assert "announced" not in plain.to_json()  # the files of earlier versions, byte for byte
    with pytest.raises(StoreError, match="announced"):
        FetchRecord.from_json(plain.to_json()[:-1] + ',"announced":"yes"}')


def window_opening_in(seconds: int) -> str:
    """A window that opens `seconds` from now (local time) and lasts an hour."""
    opens = datetime.now() + timedelta(seconds=seconds)
    closes = opens + timedelta(hours=1)
    return f"{opens:%H:%M:%S}-{closes:%H:%M:%S}"


async def test_outside_its_window_a_download_waits_executing_then_runs(
    tmp_path: Path, broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    config_dir, data = tmp_path / "etc", tmp_path / "data"
    write_simulated_tenant_config(config_dir, data, broker.port, free_port(), ["child1"])
    with (config_dir / "tedge.toml").open("a") as toml:
        toml.write(f'[firmware.download]\nwindows = "{window_opening_in(4)}"\n')
    caplog.set_level(logging.INFO)
    gateway = Gateway(config_dir, data)
    async with C8ySimulator(mqtt_port=broker.port, gateway_id="parent-device") as sim:
        await gateway.start()
        try:
            await sim.wait_for_device("child1", timeout=20)
            url = sim.add_file("fw.bin", b"night firmware" * 1000)
            async with observer(broker.port, ["tedge/child1/commands/req/firmware_update", "c8y/s/us/child1"]) as obs:
                operation = sim.create_firmware_operation("child1", "fw", "1", url)
                await sim.wait_for(operation.id, OperationStatus.EXECUTING, timeout=10)
                assert "fw.bin" not in sim.stats.files or sim.stats.files["fw.bin"].requests == 0
                assert any("waiting for the download window" in r.getMessage() for r in caplog.records)
                request = json.loads(await obs.next("tedge/child1/commands/req/firmware_update", timeout=20))
                await obs.publish(
                    "tedge/child1/commands/res/firmware_update",
                    json.dumps({"id": request["id"], "status": "executing"}),
                )
                await obs.publish(
                    "tedge/child1/commands/res/firmware_update",
                    json.dumps({"id": request["id"], "status": "successful"}),
                )
                await sim.wait_for(operation.id, OperationStatus.SUCCESSFUL, timeout=10)
            lines = [p for t, p in obs.log if t == "c8y/s/us/child1"]
            assert lines.count(b"501,c8y_Firmware\n") == 1  # announced while waiting, once
        finally:
            await gateway.stop()
    history = [change.status for change in sim.operation(operation.id).history]
    assert history == [OperationStatus.PENDING, OperationStatus.EXECUTING, OperationStatus.SUCCESSFUL]
    assert sim.errors == []


async def test_a_restart_while_waiting_does_not_announce_again(tmp_path: Path, broker: Broker) -> None:
    config_dir, data = tmp_path / "etc", tmp_path / "data"
    write_simulated_tenant_config(config_dir, data, broker.port, free_port(), ["child1"])
    with (config_dir / "tedge.toml").open("a") as toml:
        toml.write(f'[firmware.download]\nwindows = "{window_opening_in(3 * H)}"\n')
    async with C8ySimulator(mqtt_port=broker.port, gateway_id="parent-device") as sim:
        gateway = Gateway(config_dir, data)
        await gateway.start()
        try:
            await sim.wait_for_device("child1", timeout=20)
            url = sim.add_file("fw.bin", b"later")
            async with observer(broker.port, ["c8y/s/us/child1"]) as obs:
                operation = sim.create_firmware_operation("child1", "fw", "1", url)
                await sim.wait_for(operation.id, OperationStatus.EXECUTING, timeout=10)
                fetching = data / "firmware" / ".fetching"
                # written once the broker has the 501
                assert await eventually(lambda: any(b'"announced":true' in f.read_bytes() for f in fetching.iterdir()), 10)
                await gateway.stop()
                gateway = Gateway(config_dir, data)
                await gateway.start()  # Cumulocity re-delivers the operation after the 500
                await obs.silence(1.0, [])  # what the restarted gateway says meanwhile, checked next
            statuses = [p for t, p in obs.log if t == "c8y/s/us/child1" and p.startswith(b"50")]
            assert statuses == [b"501,c8y_Firmware\n"]
            assert sim.operation(operation.id).status is OperationStatus.EXECUTING
        finally:
            await gateway.stop()
    assert sim.errors == []
