"""The connector SDK end to end: a real broker, the real gateway (plugin + file-transfer service)
and the connector in-process, watched from Cumulocity's side and the child's topics."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from brokers import Broker
from faultproxy import Fault
from harness import E501, E503, f502, observer, req_topic, us
from tedge_firmware.connector import Command, Firmware, Phase, Progress
from test_connector_support import WATCH, Stack, connector, res, responses, serving


@pytest.fixture
async def stack(tmp_path: Path, broker: Broker) -> AsyncIterator[Stack]:
    instance = Stack(tmp_path, broker)
    try:
        yield instance
    finally:
        await instance.stop()


class Applied:
    """An apply callback that records what it was given (and the file's bytes at that time)."""

    def __init__(self, error: Exception | None = None) -> None:
        self.calls: list[tuple[Firmware, bytes]] = []
        self.error = error

    async def __call__(self, firmware: Firmware) -> None:
        self.calls.append((firmware, firmware.path.read_bytes()))
        if self.error is not None:
            raise self.error


async def test_success_end_to_end(tmp_path: Path, broker: Broker, stack: Stack) -> None:
    content = os.urandom(300_000)
    applied = Applied()
    progress: list[Progress] = []
    work = tmp_path / "work"
    async with observer(broker.port, WATCH) as obs:
        await stack.start(obs)
        async with serving(connector(broker, work, "child1", apply=applied, on_progress=progress.append)):
            request = await stack.operation(obs, "child1", "image", "1.0", content)
            assert await obs.sequence(us("child1"), 3) == [E501, stack.installed("child1", "image", "1.0"), E503]
            assert [r["status"] for r in await responses(obs, "child1", 2)] == ["executing", "successful"]
            await obs.silence(0.3, [us("child1"), res("child1")])
    [(firmware, seen)] = applied.calls
    assert seen == content
    assert (firmware.child_id, firmware.operation_id, firmware.attempt) == ("child1", request["id"], 1)
    assert (firmware.name, firmware.version, firmware.sha256) == ("image", "1.0", hashlib.sha256(content).hexdigest())
    assert not firmware.path.exists()  # the file is the connector's: removed once the operation ended
    phases = [p.phase for p in progress]
    assert phases[0] is Phase.RECEIVED and phases[-1] is Phase.SUCCESSFUL
    assert [p for p in dict.fromkeys(phases)] == [Phase.RECEIVED, Phase.DOWNLOADING, Phase.DOWNLOADED, Phase.APPLYING, Phase.SUCCESSFUL]
    assert max(p.downloaded for p in progress) == len(content)
    [record] = (work / "child1" / "operations").glob("*.json")
    assert json.loads(record.read_bytes())["phase"] == "successful"


async def test_apply_command_gets_the_environment_and_its_failure_reason_reaches_cumulocity(
    tmp_path: Path, broker: Broker, stack: Stack
) -> None:
    content = b"\x00\x01 firmware bytes \xff"
    seen = tmp_path / "seen"
    script = (
        f'{{ echo "$FIRMWARE_NAME|$FIRMWARE_VERSION|$FIRMWARE_SHA256|$OPERATION_ID|$ATTEMPT|$CHILD_ID"; '
        f'cat "$FIRMWARE_FILE"; }} > {seen}; echo "checking image" >&2; echo "flash error: bad block 7" >&2; exit 3'
    )
    async with observer(broker.port, WATCH) as obs:
        await stack.start(obs)
        async with serving(connector(broker, tmp_path / "work", "child1", apply=Command(script, timeout=10))):
            request = await stack.operation(obs, "child1", "image", "2.0", content)
            assert await obs.sequence(us("child1"), 2) == [E501, f502("flash error: bad block 7")]
            failed = (await responses(obs, "child1", 2))[1]
            assert failed == {"id": request["id"], "status": "failed", "reason": "flash error: bad block 7"}
    header, _, body = seen.read_bytes().partition(b"\n")
    sha = hashlib.sha256(content).hexdigest()
    assert header.decode() == f"image|2.0|{sha}|{request['id']}|1|child1"
    assert body == content


async def test_apply_callback_failure_reason_reaches_cumulocity(tmp_path: Path, broker: Broker, stack: Stack) -> None:
    applied = Applied(RuntimeError("battery too low:\n 12%"))
    async with observer(broker.port, WATCH) as obs:
        await stack.start(obs)
        async with serving(connector(broker, tmp_path / "work", "child1", apply=applied)):
            await stack.operation(obs, "child1", "image", "1.0", b"fw")
            assert await obs.sequence(us("child1"), 2) == [E501, f502("battery too low: 12%")]
    assert len(applied.calls) == 1


async def test_a_file_tampered_with_on_the_gateway_fails_the_sha256_check(
    tmp_path: Path, broker: Broker, stack: Stack
) -> None:
    applied = Applied()
    work = tmp_path / "work"
    async with observer(broker.port, WATCH) as obs:
        await stack.start(obs)
        async with serving(connector(broker, work, "child1", apply=applied)):
            pass  # the broker now keeps the connector's session: requests wait for it
        request = await stack.operation(obs, "child1", "image", "1.0", b"genuine firmware")
        # the served bytes change under the gateway (a disk fault, a person): the child checks
        (stack.data / "cache" / "sha256" / str(request["sha256"])).write_bytes(b"tampered firmware")
        async with serving(connector(broker, work, "child1", apply=applied)):
            assert await obs.next(us("child1")) == E501
            reason = (await obs.next(us("child1"))).decode()
    expected = hashlib.sha256(b"genuine firmware").hexdigest()
    actual = hashlib.sha256(b"tampered firmware").hexdigest()
    assert reason == f'502,c8y_Firmware,"SHA-256 mismatch: the request says {expected}, the downloaded file has {actual}"\n'
    assert request["sha256"] == expected
    assert applied.calls == []
    assert not list((work / "child1" / "downloads").iterdir())


async def test_a_cut_download_resumes(tmp_path: Path, broker: Broker, stack: Stack) -> None:
    content = os.urandom(4 << 20)
    applied = Applied()
    async with observer(broker.port, WATCH) as obs:
        await stack.start(obs, through_proxy=True)
        assert stack.proxy is not None
        stack.proxy.plan(Fault.cut(1 << 20))
        async with serving(connector(broker, tmp_path / "work", "child1", apply=applied)):
            await stack.operation(obs, "child1", "image", "1.0", content)
            assert await obs.sequence(us("child1"), 3) == [E501, stack.installed("child1", "image", "1.0"), E503]
    assert [seen for _, seen in applied.calls] == [content]
    assert stack.proxy.faults_applied == 1 and stack.proxy.connections == 2
    # the second connection fetched only what the first did not deliver (plus headers)
    assert stack.proxy.bytes_to_client <= len(content) + 4096, stack.proxy.bytes_to_client


async def test_a_re_sent_request_is_never_applied_twice(tmp_path: Path, broker: Broker, stack: Stack) -> None:
    gate, applying = asyncio.Event(), asyncio.Event()
    calls: list[Firmware] = []

    async def slow_apply(firmware: Firmware) -> None:
        calls.append(firmware)
        applying.set()
        await gate.wait()

    work = tmp_path / "work"
    async with observer(broker.port, WATCH) as obs:
        await stack.start(obs)
        async with serving(connector(broker, work, "child1", apply=slow_apply)):
            request = await stack.operation(obs, "child1", "image", "1.0", b"fw")
            assert (await responses(obs, "child1", 1))[0]["status"] == "executing"
            async with asyncio.timeout(10):
                await applying.wait()
            # while it runs: only acknowledged again
            await obs.publish(req_topic("child1"), json.dumps({**request, "attempt": 2}))
            assert await responses(obs, "child1", 1) == [{"id": request["id"], "status": "executing"}]
            gate.set()
            assert await obs.sequence(us("child1"), 3) == [E501, stack.installed("child1", "image", "1.0"), E503]
            assert (await responses(obs, "child1", 1))[0]["status"] == "successful"
            # after success: reported again, not applied again
            await obs.publish(req_topic("child1"), json.dumps({**request, "attempt": 3}))
            assert await responses(obs, "child1", 1) == [{"id": request["id"], "status": "successful"}]
        # and after a restart, from the persisted record
        async with serving(connector(broker, work, "child1", apply=slow_apply)):
            await obs.publish(req_topic("child1"), json.dumps({**request, "attempt": 4}))
            assert await responses(obs, "child1", 1) == [{"id": request["id"], "status": "successful"}]
            await obs.silence(0.3, [us("child1")])  # the gateway ignores a status for an ended operation
    assert len(calls) == 1 and calls[0].attempt == 1


async def test_two_children_are_served_concurrently_by_one_connector(tmp_path: Path, broker: Broker, stack: Stack) -> None:
    started = {"child-a": asyncio.Event(), "child-b": asyncio.Event()}
    got: dict[str, bytes] = {}

    async def apply(firmware: Firmware) -> None:
        got[firmware.child_id] = firmware.path.read_bytes()
        started[firmware.child_id].set()
        other = "child-b" if firmware.child_id == "child-a" else "child-a"
        async with asyncio.timeout(10):  # both applies run at the same time, or this times out
            await started[other].wait()

    async with observer(broker.port, WATCH) as obs:
        await stack.start(obs)
        async with serving(connector(broker, tmp_path / "work", "child-a", "child-b", apply=apply)):
            await stack.operation(obs, "child-a", "fw-a", "1", b"firmware for a")
            await stack.operation(obs, "child-b", "fw-b", "2", b"firmware for b")
            for child, name, version in (("child-a", "fw-a", "1"), ("child-b", "fw-b", "2")):
                assert await obs.sequence(us(child), 3) == [E501, stack.installed(child, name, version), E503]
    assert got == {"child-a": b"firmware for a", "child-b": b"firmware for b"}


async def test_the_reference_connector_sequence_still_works(broker: Broker, stack: Stack) -> None:
    """The published reference connector: executing, fetch the whole file, successful; no sha256
    check, no resume. Our gateway must keep serving such connectors unchanged."""
    async with observer(broker.port, WATCH) as obs:
        await stack.start(obs)
        request = await stack.operation(obs, "child1", "image", "1.0", b"reference firmware")
        await obs.publish(res("child1"), json.dumps({"id": request["id"], "status": "executing"}))
        async with aiohttp.ClientSession() as session, session.get(request["url"]) as answer:
            assert answer.status == 200
            assert await answer.read() == b"reference firmware"
        await obs.publish(res("child1"), json.dumps({"id": request["id"], "status": "successful"}))
        assert await obs.sequence(us("child1"), 3) == [E501, stack.installed("child1", "image", "1.0"), E503]


async def test_a_heartbeat_keeps_saying_executing_during_a_long_apply(tmp_path: Path, broker: Broker, stack: Stack) -> None:
    async def long_apply(firmware: Firmware) -> None:
        await asyncio.sleep(1.0)  # the long apply itself

    async with observer(broker.port, WATCH) as obs:
        await stack.start(obs)
        async with serving(connector(broker, tmp_path / "work", "child1", apply=long_apply, heartbeat=0.2)):
            await stack.operation(obs, "child1", "image", "1.0", b"fw")
            assert await obs.sequence(us("child1"), 3) == [E501, stack.installed("child1", "image", "1.0"), E503]
            statuses = [r["status"] for r in await responses(obs, "child1", obs.pending(res("child1")))]
    assert statuses[-1] == "successful"
    assert statuses.count("executing") >= 4 and set(statuses[:-1]) == {"executing"}
