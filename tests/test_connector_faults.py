"""The connector under hostile input, broker crashes, interrupted applies and restarts.

The gateway is played by the test (requests published directly), so each case is fast; the
end-to-end proofs with the real gateway are in test_connector_e2e.py / test_connector_cli.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from brokers import Broker
from harness import observer, req_topic
from tedge_firmware.connector import ConfigError, Firmware, TedgeFirmwareError
from tedge_firmware.connector._state import Phase, encode_record, file_key, new_record
from tedge_firmware.core.firmware_update import FirmwareUpdateRequest
from test_connector_support import RESPONSES, connector, file_server, res, responses, serving

FIRMWARE = b"firmware for the faults tests"
SHA = hashlib.sha256(FIRMWARE).hexdigest()


def request(base: str, op_id: str = "op-1", **changes: Any) -> str:
    document = {"id": op_id, "attempt": 1, "name": "image", "version": "1.0", "sha256": SHA, "url": f"{base}/fw.bin", **changes}
    return json.dumps(document)


class Applied:
    def __init__(self) -> None:
        self.calls: list[Firmware] = []

    async def __call__(self, firmware: Firmware) -> None:
        assert firmware.path.read_bytes() == FIRMWARE
        self.calls.append(firmware)


async def test_hostile_requests_never_stop_the_connector(tmp_path: Path, broker: Broker) -> None:
    applied = Applied()
    url = "http://127.0.0.1:1/fw.bin"
    hostile: list[bytes | str] = [
        b"\xff\xfe",
        b"not json",
        b"[1]",
        b"[" * 50_000,
        b"{" * 70_000,
        json.dumps({"id": 5, "sha256": SHA, "url": url}),
        json.dumps({"id": "x" * 5000, "sha256": SHA, "url": url}),
        json.dumps({"id": "bad-1", "sha256": SHA, "url": "ftp://host/fw"}),
        json.dumps({"id": "bad-2", "url": url}),
        json.dumps({"id": "bad-3", "attempt": "1", "sha256": SHA, "url": url}),
        json.dumps({"id": "bad-4", "name": "a\u0000b", "sha256": SHA, "url": url}),
        json.dumps({"id": "big", "padding": "x" * (1 << 20)}),
    ]
    async with file_server({"fw.bin": FIRMWARE}) as base, observer(broker.port, [RESPONSES]) as obs, serving(connector(broker, tmp_path / "work", "child1", apply=applied)) as instance:
        for payload in hostile:
            await obs.publish(req_topic("child1"), payload)
        await obs.publish(req_topic("other-child"), request(base))  # not ours: no answer
        await obs.publish(req_topic("child1"), request(base, "good"))
        answers = await responses(obs, "child1", 6)
        assert answers[:4] == [
            {"id": "bad-1", "status": "failed", "reason": "Invalid firmware_update request: 'url' is an invalid url: not an http or https url"},
            {"id": "bad-2", "status": "failed", "reason": "Invalid firmware_update request: 'sha256' is missing: the firmware cannot be verified"},
            {"id": "bad-3", "status": "failed", "reason": "Invalid firmware_update request: 'attempt' is not an integer"},
            {"id": "bad-4", "status": "failed", "reason": "Invalid firmware_update request: 'name' contains a NUL character"},
        ]
        assert answers[4:] == [{"id": "good", "status": "executing"}, {"id": "good", "status": "successful"}]
        # an invalid re-send of a known operation is ignored, not failed
        await obs.publish(req_topic("child1"), json.dumps({"id": "good", "sha256": "zz"}))
        await obs.silence(0.3)
        assert instance.child_ids == ("child1",)
    assert [f.operation_id for f in applied.calls] == ["good"]


async def test_a_sha256_mismatch_fails_without_applying(tmp_path: Path, broker: Broker) -> None:
    applied = Applied()
    async with file_server({"fw.bin": FIRMWARE}) as base, observer(broker.port, [RESPONSES]) as obs, serving(connector(broker, tmp_path / "work", "child1", apply=applied)):
        await obs.publish(req_topic("child1"), request(base, sha256="0" * 64))
        answers = await responses(obs, "child1", 2)
    assert answers[1] == {
        "id": "op-1",
        "status": "failed",
        "reason": f"SHA-256 mismatch: the request says {'0' * 64}, the downloaded file has {SHA}",
    }
    assert applied.calls == []


async def test_a_download_that_cannot_be_done_fails_with_the_downloaders_reason(tmp_path: Path, broker: Broker) -> None:
    async with file_server({}) as base, observer(broker.port, [RESPONSES]) as obs, serving(connector(broker, tmp_path / "work", "child1", apply=Applied())):
        await obs.publish(req_topic("child1"), request(base))
        answers = await responses(obs, "child1", 2)
    assert answers[1]["status"] == "failed"
    assert answers[1]["reason"].startswith(f"Download from {base}/fw.bin failed with ")
    assert "404" in answers[1]["reason"]


async def test_requests_keep_flowing_after_the_broker_crashed(tmp_path: Path, broker: Broker) -> None:
    applied = Applied()
    async with file_server({"fw.bin": FIRMWARE}) as base, serving(connector(broker, tmp_path / "work", "child1", apply=applied)):
        broker.kill()  # no persistence saved: the connector must subscribe again by itself
        broker.start()
        async with observer(broker.port, [RESPONSES]) as obs:
            async with asyncio.timeout(15):
                while True:  # until the connector is back and subscribed; re-sends are harmless
                    await obs.publish(req_topic("child1"), request(base))
                    try:
                        answer = json.loads(await obs.next(res("child1"), timeout=0.5))
                        break
                    except TimeoutError:
                        continue
            assert answer == {"id": "op-1", "status": "executing"}
            async with asyncio.timeout(10):
                while answer["status"] != "successful":
                    answer = json.loads(await obs.next(res("child1")))
    assert len(applied.calls) == 1


async def _verify_yes(firmware: Firmware) -> bool:
    return True


async def _verify_no(firmware: Firmware) -> bool:
    return False


async def _verify_raises(firmware: Firmware) -> bool:
    raise OSError("cannot read the boot partition")


@pytest.mark.parametrize(
    ("verify", "expected"),
    [
        (None, {"status": "failed", "reason": "interrupted during apply"}),
        (_verify_yes, {"status": "successful"}),
        (_verify_no, {"status": "failed", "reason": "interrupted during apply; the verify step did not confirm image 1.0"}),
        (_verify_raises, {"status": "failed", "reason": "interrupted during apply; verify step: cannot read the boot partition"}),
    ],
)
async def test_an_interrupted_apply_is_settled_by_the_verify_step_never_re_run(
    tmp_path: Path, broker: Broker, verify: Any, expected: dict[str, str]
) -> None:
    applying = asyncio.Event()
    calls: list[Firmware] = []

    async def hanging_apply(firmware: Firmware) -> None:
        calls.append(firmware)
        applying.set()
        await asyncio.Event().wait()  # the device reboots in the middle of this

    work = tmp_path / "work"
    async with file_server({"fw.bin": FIRMWARE}) as base, observer(broker.port, [RESPONSES]) as obs:
        async with serving(connector(broker, work, "child1", apply=hanging_apply)):
            await obs.publish(req_topic("child1"), request(base))
            async with asyncio.timeout(10):
                await applying.wait()
        seen: list[tuple[Firmware, bytes]] = []

        async def remembering_verify(firmware: Firmware) -> bool:
            seen.append((firmware, firmware.path.read_bytes()))  # the verified file is still there
            return await verify(firmware)  # type: ignore[no-any-return]

        restarted = connector(broker, work, "child1", apply=hanging_apply, verify=remembering_verify if verify else None)
        async with serving(restarted):
            answers = await responses(obs, "child1", 3)
    assert answers[0] == {"id": "op-1", "status": "executing"}  # first run
    assert answers[1] == {"id": "op-1", "status": "executing"}  # after the restart
    assert answers[2] == {"id": "op-1", **expected}
    assert len(calls) == 1  # never applied again
    if verify is not None:
        [(firmware, content)] = seen
        assert content == FIRMWARE and firmware.sha256 == SHA
        assert not firmware.path.exists()  # removed once the operation ended


async def test_start_up_resumes_reports_forgets_and_quarantines(tmp_path: Path, broker: Broker) -> None:
    work = tmp_path / "work"
    operations = work / "child1" / "operations"
    downloads = work / "child1" / "downloads"
    operations.mkdir(parents=True)
    downloads.mkdir(parents=True)
    applied = Applied()
    now = time.time()

    def write(op_id: str, phase: Phase, url: str, **changes: Any) -> None:
        record = new_record("child1", FirmwareUpdateRequest(op_id, 2, "image", "1.0", SHA, url), now)
        (operations / f"{file_key(op_id)}.json").write_bytes(encode_record(replace(record, phase=phase, **changes)))

    async with file_server({"fw.bin": FIRMWARE}) as base, observer(broker.port, [RESPONSES]) as obs:
        write("downloading", Phase.DOWNLOADING, f"{base}/fw.bin")
        write("unreported", Phase.FAILED, f"{base}/fw.bin", reason="earlier failure")
        write("reported", Phase.SUCCESSFUL, f"{base}/fw.bin", reported=True)
        write("expired", Phase.SUCCESSFUL, f"{base}/fw.bin", reported=True, updated_at=now - 100)
        (operations / "corrupt.json").write_bytes(b"{not a record")
        (downloads / "gone.firmware.part").write_bytes(b"left by an operation that is over")
        async with serving(connector(broker, work, "child1", apply=applied, retention=50)):
            answers = await responses(obs, "child1", 3)
            # the forgotten and the reported operations answer nothing; a re-send of the reported
            # one gets its status again
            await obs.publish(req_topic("child1"), request(base, "reported"))
            again = await responses(obs, "child1", 1)
    assert answers == [
        {"id": "unreported", "status": "failed", "reason": "earlier failure"},
        {"id": "downloading", "status": "executing"},
        {"id": "downloading", "status": "successful"},
    ]
    assert again == [{"id": "reported", "status": "successful"}]
    assert [f.operation_id for f in applied.calls] == ["downloading"]
    assert applied.calls[0].attempt == 2
    assert not (operations / "expired.json").exists()
    assert (operations / ".corrupt" / "corrupt.json").exists()
    assert not (downloads / "gone.firmware.part").exists()


async def test_an_unusable_work_directory_is_a_config_error(tmp_path: Path, broker: Broker) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    instance = connector(broker, blocker / "work", "child1", apply=Applied())
    waiter = asyncio.create_task(instance.wait_connected())
    with pytest.raises(ConfigError, match="cannot use the work directory"):
        async with asyncio.timeout(10):
            await instance.run()
    with pytest.raises(TedgeFirmwareError, match="not running"):
        async with asyncio.timeout(10):
            await waiter
    with pytest.raises(RuntimeError, match="runs only once"):
        await instance.run()


async def test_a_failing_progress_hook_is_logged_and_ignored(tmp_path: Path, broker: Broker, caplog: pytest.LogCaptureFixture) -> None:
    def hook(progress: object) -> None:
        raise ValueError("hook bug")

    async with file_server({"fw.bin": FIRMWARE}) as base, observer(broker.port, [RESPONSES]) as obs, serving(connector(broker, tmp_path / "work", "child1", apply=Applied(), on_progress=hook)):
        await obs.publish(req_topic("child1"), request(base))
        assert [a["status"] for a in await responses(obs, "child1", 2)] == ["executing", "successful"]
    assert "the progress hook failed" in caplog.text
