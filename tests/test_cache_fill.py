"""Filling the cache ahead of time: the `cache_fill` command on the gateway's service topic and
`tedge-firmware cache fill`, over a real broker with the real gateway; pins that keep a firmware
through eviction pressure; a fill that survives kill -9; hostile commands."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from brokers import Broker, free_port
from faultproxy import Fault, FaultProxy
from harness import (
    FirmwareServer,
    Gateway,
    GatewayProcess,
    eventually,
    gateway_ready,
    observer,
    sha256,
    write_config,
)
from tedge_firmware.core.cache_fill import (
    CACHE_FILL_FILTER,
    cache_fill_id,
    cache_fill_topic,
    fill_request,
)
from tedge_firmware.core.firmware_update import parse_te_command
from tedge_firmware.core.operation import file_id_for_url
from tedge_firmware.core.units import parse_duration
from tedge_firmware.errors import MessageError
from test_plugin_download_restart import SIZE, STALL_AFTER, origin, wait_for_size  # noqa: F401 (fixture)

A = os.urandom(100_000)
B = os.urandom(100_000)

# ---- the protocol (pure) --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "says"),
    [
        ({"status": "init"}, "'url' is missing"),
        ({"status": "init", "url": 5}, "'url' is missing"),
        ({"status": "init", "url": "ftp://x/y"}, "'url'"),
        ({"status": "init", "url": "http://x/" + "a" * 10_000}, "'url'"),
        ({"status": "init", "url": "http://x/y", "pin": "soon"}, "'pin': not a duration"),
        ({"status": "init", "url": "http://x/y", "pin": 0}, "'pin' must be between"),
        ({"status": "init", "url": "http://x/y", "pin": True}, "'pin' must be seconds"),
        ({"status": "init", "url": "http://x/y", "pin": [1]}, "'pin' must be seconds"),
        ({"status": "init", "url": "http://x/y", "pin": "99999999999d"}, "'pin'"),
    ],
)
def test_what_a_fill_command_must_say(payload: dict[str, object], says: str) -> None:
    command = parse_te_command(json.dumps(payload).encode())
    assert command is not None
    with pytest.raises(MessageError, match=says):
        fill_request(command)


def test_a_good_fill_command() -> None:
    command = parse_te_command(b'{"status":"init","url":"https://o/fw.bin","pin":"7d","note":"x"}')
    assert command is not None
    request = fill_request(command)
    assert (request.url, request.pin_seconds) == ("https://o/fw.bin", 7 * 86400)
    assert cache_fill_id(cache_fill_topic("abc-1")) == "abc-1"


@pytest.mark.parametrize("topic", [cache_fill_topic(""), cache_fill_topic("a/b"), cache_fill_topic(" x"), "te/x"])
def test_unusable_command_topics(topic: str) -> None:
    with pytest.raises(MessageError):
        cache_fill_id(topic)


@pytest.mark.parametrize(("text", "seconds"), [("90", 90), ("90s", 90), ("15min", 900), ("12h", 43200), ("7d", 604800), ("2w", 1209600)])
def test_durations(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "-5", "1.5h", "5m", "h", "10 years", "9" * 13])
def test_not_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


# ---- the gateway ----------------------------------------------------------------------------


@pytest.fixture
async def cloud() -> AsyncIterator[FirmwareServer]:
    async with FirmwareServer(files={"a.bin": A, "b.bin": B}) as server:
        yield server


async def fill(obs, topic: str, url: str, **extra: object) -> dict[str, object]:  # type: ignore[no-untyped-def]
    """Publish a fill command; its end (successful or failed), after `executing`."""
    await obs.publish(topic, json.dumps({"status": "init", "url": url, **extra}), retain=True)
    states = []
    while True:
        state = json.loads(await obs.next(topic, timeout=20))
        states.append(state["status"])
        if state["status"] in ("successful", "failed"):
            assert states[:2] == ["init", "executing"] or state["status"] == "failed", states
            return state  # type: ignore[no-any-return]


async def test_a_fill_puts_the_firmware_in_the_cache_and_says_what_it_is(
    tmp_path: Path, broker: Broker, cloud: FirmwareServer
) -> None:
    config_dir, data = tmp_path / "etc", tmp_path / "data"
    write_config(config_dir, data, broker.port, free_port())
    async with Gateway(config_dir, data), observer(broker.port, [CACHE_FILL_FILTER]) as obs:
        await gateway_ready(broker.port)
        topic = cache_fill_topic("night-1")
        done = await fill(obs, topic, cloud.url("a.bin"), note="kept")
        assert done == {"status": "successful", "url": cloud.url("a.bin"), "note": "kept", "sha256": sha256(A), "size": len(A)}
        assert (data / "cache" / "sha256" / sha256(A)).read_bytes() == A
        # an operation needing it later only asks whether it is current (ETag: 304)
        bad = await fill(obs, cache_fill_topic("bad-1"), "file:///etc/passwd")
        assert bad["status"] == "failed" and "'url'" in str(bad["reason"])
        await obs.publish(topic, b"", retain=True)  # the requester clears it
        await obs.publish(cache_fill_topic("junk"), b"\xff not json", retain=True)
        await obs.silence(0.5, [cache_fill_topic("junk")])  # ignored: no answer to junk
    assert cloud.count("a.bin") == 1


async def test_a_pinned_firmware_stays_through_eviction_pressure(
    tmp_path: Path, broker: Broker, cloud: FirmwareServer
) -> None:
    config_dir, data = tmp_path / "etc", tmp_path / "data"
    write_config(config_dir, data, broker.port, free_port(), extra="[firmware.cache]\nmax_size = 1\n")
    async with Gateway(config_dir, data), observer(broker.port, [CACHE_FILL_FILTER]) as obs:
        await gateway_ready(broker.port)
        pinned = await fill(obs, cache_fill_topic("p"), cloud.url("a.bin"), pin="1h")
        assert isinstance(pinned["pinnedUntil"], int)
        await fill(obs, cache_fill_topic("q"), cloud.url("b.bin"))
        # above max_size: the unpinned one goes (nothing uses it), the pinned one stays
        assert await eventually(lambda: not (data / "cache" / "sha256" / sha256(B)).exists(), 10)
        assert (data / "cache" / "sha256" / sha256(A)).read_bytes() == A


async def test_the_command_line_fills_and_clears_its_command(
    tmp_path: Path, broker: Broker, cloud: FirmwareServer
) -> None:
    config_dir, data = tmp_path / "etc", tmp_path / "data"
    write_config(config_dir, data, broker.port, free_port())
    async with Gateway(config_dir, data):
        await gateway_ready(broker.port)
        cli = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tedge_firmware", "cache", "fill", cloud.url("b.bin"), "--pin", "2h",
            "--config-dir", str(config_dir),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        async with asyncio.timeout(60):
            out, err = await cli.communicate()
        assert cli.returncode == 0, err
        text = out.decode()
        assert f"in the cache: sha256 {sha256(B)}, 97.7 KiB, pinned until " in text
        assert (data / "cache" / "sha256" / sha256(B)).exists()
        async with observer(broker.port, [CACHE_FILL_FILTER]) as obs:
            await obs.silence(0.5)  # nothing retained: the command was cleared
        assert obs.log == []


def test_the_command_line_refuses_bad_input_in_one_line(tmp_path: Path) -> None:
    import subprocess

    for args, says in ((["ftp://x/y"], "URL"), (["http://x/y", "--pin", "soon"], "not a duration")):
        result = subprocess.run(
            [sys.executable, "-m", "tedge_firmware", "cache", "fill", *args, "--config-dir", str(tmp_path)],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert result.returncode == 2 and says in result.stderr and "Traceback" not in result.stderr


async def test_a_fill_survives_kill_9_and_resumes(tmp_path: Path, broker: Broker, origin: tuple[int, bytes]) -> None:  # noqa: F811 (the fixture)
    port, content = origin
    config_dir, data = tmp_path / "etc", tmp_path / "data"
    write_config(config_dir, data, broker.port, free_port())
    process = GatewayProcess(config_dir, tmp_path / "gateway.log")
    topic = cache_fill_topic("after-hours")
    async with FaultProxy(port) as proxy, observer(broker.port, [CACHE_FILL_FILTER]) as obs:
        proxy.plan(Fault.stall(STALL_AFTER))
        url = proxy.url("/big.bin")
        part = data / "cache" / "incoming" / f"{file_id_for_url(url)}.part"
        process.start()
        try:
            await obs.publish(topic, json.dumps({"status": "init", "url": url}), retain=True)
            await obs.next(topic)  # init
            assert json.loads(await obs.next(topic, timeout=20))["status"] == "executing"
            await proxy.wait_faults(1)
            await wait_for_size(part, STALL_AFTER - (2 << 20))
            process.kill()
            proxy.release_stalls()
            process.start()  # the retained command comes back in `executing`: taken again
            while (state := json.loads(await obs.next(topic, timeout=60)))["status"] == "executing":
                pass
            assert state["status"] == "successful" and state["sha256"] == sha256(content)
            assert (data / "cache" / "sha256" / sha256(content)).read_bytes() == content
            assert proxy.bytes_to_client <= SIZE * 1.05, proxy.bytes_to_client
            assert process.terminate() == 0
        finally:
            process.kill_if_running()
    assert "Traceback" not in (tmp_path / "gateway.log").read_text()
