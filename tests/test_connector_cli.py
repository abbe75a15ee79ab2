"""`tedge-firmware connector` as a real process against the real gateway: kill -9 during the
download and during the apply, registration, and the command line's own errors."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from brokers import Broker
from faultproxy import Fault
from harness import E501, E503, f502, load, observer, write_config
from tedge_firmware.cli.connector import operations_dir, register_by_file
from tedge_firmware.cli.main import main_group
from test_connector_support import WATCH, ConnectorProcess, Stack, no_more_to_cloud, to_cloud

REGISTRATION = "te/device/child1///cmd/firmware_update"


@pytest.fixture
async def stack(tmp_path: Path, broker: Broker) -> AsyncIterator[Stack]:
    instance = Stack(tmp_path, broker)
    try:
        yield instance
    finally:
        await instance.stop()


def cli_args(broker: Broker, work: Path, apply: str, *extra: str) -> list[str]:
    return [
        "--child-id", "child1",
        "--apply-command", apply,
        "--mqtt-host", "127.0.0.1",
        "--mqtt-port", str(broker.port),
        "--work-dir", str(work),
        "--register",
        *extra,
    ]


async def until(condition, seconds: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    """Wait for something that only shows on disk (no event to await), bounded."""
    async with asyncio.timeout(seconds):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.02)


def applying_record(work: Path) -> dict[str, object] | None:
    """The operation record once the apply command is started and its identity is recorded."""
    for path in (work / "child1" / "operations").glob("*.json"):
        record = json.loads(path.read_bytes())
        if record["phase"] == "applying" and record["process"] is not None:
            return record  # type: ignore[no-any-return]
    return None


async def start_connector(process: ConnectorProcess, obs) -> None:  # type: ignore[no-untyped-def]
    """Start the process; it is subscribed once its registration (sent after subscribing) arrives."""
    process.start()
    assert await obs.next(REGISTRATION, timeout=20) == b"{}"


async def test_kill_9_during_the_download_resumes_after_restart_and_applies_once(
    tmp_path: Path, broker: Broker, stack: Stack
) -> None:
    size, stall_after = 24 << 20, 8 << 20
    content = os.urandom(size)
    applied, work = tmp_path / "applied", tmp_path / "work"
    process = ConnectorProcess(cli_args(broker, work, f'sha256sum < "$FIRMWARE_FILE" >> {applied}'), tmp_path / "connector.log")
    async with observer(broker.port, [*WATCH, REGISTRATION]) as obs:
        await stack.start(obs, through_proxy=True)
        assert stack.proxy is not None
        stack.proxy.plan(Fault.stall(stall_after))
        try:
            await start_connector(process, obs)
            async with observer(broker.port, [REGISTRATION]) as late:  # the declaration is retained
                declaration = await late.next_message(REGISTRATION)
                assert declaration.payload == b"{}" and declaration.retain
            request = await stack.operation(obs, "child1", "big", "2.0", content)
            assert await to_cloud(obs, "child1", 1) == [E501]
            part = work / "child1" / "downloads" / f"{request['id']}.firmware.part"
            await stack.proxy.wait_faults(1)
            # everything but the last chunk the downloader still held in memory is on disk
            await until(lambda: part.exists() and part.stat().st_size >= stall_after - (1 << 20))
            process.kill()
            stack.proxy.release_stalls()
            process.start()
            assert await to_cloud(obs, "child1", 2) == [stack.installed("child1", "big", "2.0"), E503]
            await no_more_to_cloud(obs, "child1", 0.5)
            assert process.terminate() == 0
        finally:
            process.ensure_stopped()
    assert applied.read_text().split() == [hashlib.sha256(content).hexdigest(), "-"]
    assert stack.proxy.bytes_to_client <= size + (1 << 20) + 65536, stack.proxy.bytes_to_client
    assert "Traceback" not in process.log()


@pytest.mark.parametrize("with_verify", [True, False])
async def test_kill_9_during_the_apply_is_settled_after_restart_never_re_run(
    tmp_path: Path, broker: Broker, stack: Stack, with_verify: bool
) -> None:
    applied, installed, work = tmp_path / "applied", tmp_path / "installed", tmp_path / "work"
    # the apply writes the new version, then "reboots" (hangs until everything is killed)
    apply = f'echo started >> {applied}; echo "$FIRMWARE_VERSION" > {installed}; exec sleep 60'
    verify = ["--verify-command", f'grep -qx "$FIRMWARE_VERSION" {installed}'] if with_verify else []
    process = ConnectorProcess(cli_args(broker, work, apply, *verify), tmp_path / "connector.log")
    async with observer(broker.port, [*WATCH, REGISTRATION]) as obs:
        await stack.start(obs)
        try:
            await start_connector(process, obs)
            await stack.operation(obs, "child1", "image", "2.0", b"firmware 2.0")
            assert await to_cloud(obs, "child1", 1) == [E501]
            await until(lambda: applying_record(work) is not None and applied.exists())
            record = applying_record(work)
            assert record is not None
            # a reboot: the connector and its apply command die together
            process.kill()
            os.killpg(record["process"]["pgid"], signal.SIGKILL)  # type: ignore[index]
            process.start()
            if with_verify:
                assert await to_cloud(obs, "child1", 2) == [stack.installed("child1", "image", "2.0"), E503]
            else:
                assert await to_cloud(obs, "child1", 1) == [f502("interrupted during apply")]
            await no_more_to_cloud(obs, "child1", 0.3)
            assert process.terminate() == 0
        finally:
            process.ensure_stopped()
    assert applied.read_text() == "started\n"  # never re-run


@pytest.mark.parametrize(
    ("ending", "expected"),
    [("echo done >> {applied}", None), ('echo "flash verify failed" >&2; exit 5', "flash verify failed")],
)
async def test_an_apply_command_that_outlives_the_connector_decides_the_outcome(
    tmp_path: Path, broker: Broker, stack: Stack, ending: str, expected: str | None
) -> None:
    applied, work = tmp_path / "applied", tmp_path / "work"
    apply = f"echo started >> {applied}; sleep 2; " + ending.format(applied=applied)
    process = ConnectorProcess(cli_args(broker, work, apply), tmp_path / "connector.log")
    async with observer(broker.port, [*WATCH, REGISTRATION]) as obs:
        await stack.start(obs)
        try:
            await start_connector(process, obs)
            await stack.operation(obs, "child1", "image", "3.0", b"firmware 3.0")
            assert await to_cloud(obs, "child1", 1) == [E501]
            await until(lambda: applying_record(work) is not None and applied.exists())
            process.kill()  # the connector alone: its apply command goes on
            process.start()
            if expected is None:
                assert await to_cloud(obs, "child1", 2) == [stack.installed("child1", "image", "3.0"), E503]
            else:
                assert await to_cloud(obs, "child1", 1) == [f502(expected)]
            assert process.terminate() == 0
        finally:
            process.ensure_stopped()
    assert applied.read_text().splitlines()[0] == "started"
    assert applied.read_text().count("started") == 1
    # restarted while the command ran: it was waited for, its exit status decided
    assert "the apply command is still running: waiting for it" in process.log()


# ---- registration --------------------------------------------------------------------------


def test_register_by_file_on_the_gateway(tmp_path: Path, broker: Broker) -> None:
    config_dir = tmp_path / "etc"
    write_config(config_dir, tmp_path / "data", broker.port, 8000)
    assert operations_dir(load(config_dir)) is None  # no operations directory: network API
    assert operations_dir(None) is None
    directory = config_dir / "operations" / "c8y"
    directory.mkdir(parents=True)
    (directory / "child2").mkdir()
    (directory / "child2" / "c8y_Firmware").write_text("[exec]\n")  # an existing file is kept
    assert operations_dir(load(config_dir)) == directory
    register_by_file(directory, ["child1", "child2"])
    assert (directory / "child1" / "c8y_Firmware").read_bytes() == b""
    assert (directory / "child2" / "c8y_Firmware").read_text() == "[exec]\n"


async def test_the_cli_registers_by_file_when_it_runs_on_the_gateway_and_stops_on_sigterm(
    tmp_path: Path, broker: Broker
) -> None:
    config_dir = tmp_path / "etc"
    write_config(config_dir, tmp_path / "data", broker.port, 8000)
    operations = config_dir / "operations" / "c8y"
    operations.mkdir(parents=True)
    args = ["--child-id", "child1", "--child-id", "child2", "--apply-command", "true", "--config-dir", str(config_dir), "--work-dir", str(tmp_path / "work"), "--register"]
    process = ConnectorProcess(args, tmp_path / "connector.log")
    async with observer(broker.port, ["te/device/+///cmd/+"]) as obs:
        try:
            process.start()
            await until(lambda: (operations / "child2" / "c8y_Firmware").exists())
            assert (operations / "child1" / "c8y_Firmware").exists()
            await until(lambda: "connected to the MQTT broker" in process.log())
            assert process.terminate() == 0
        finally:
            process.ensure_stopped()
        assert obs.log == []  # the file did it: no network declaration
    assert "connector stopped" in process.log()


# ---- command line errors --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--apply-command", "true"], 2, "Missing option '--child-id'"),
        (["--child-id", "c1"], 2, "Missing option '--apply-command'"),
        (["--child-id", "a/b", "--apply-command", "true"], 2, "contains '/'"),
        (["--child-id", "c1", "--apply-command", "true", "--mqtt-port", "0"], 2, "--mqtt-port"),
        (["--child-id", "c1", "--apply-command", "", "--mqtt-host", "127.0.0.1"], 1, "error: the command line is empty"),
    ],
)
def test_command_line_errors(args: list[str], code: int, message: str) -> None:
    result = CliRunner().invoke(main_group, ["connector", *args], obj={})
    assert result.exit_code == code, result.output
    assert message in result.output


def test_a_broken_configuration_file_is_one_line_and_exit_1(tmp_path: Path) -> None:
    (tmp_path / "tedge.toml").write_text("[mqtt\n")
    result = CliRunner().invoke(main_group, ["connector", "--child-id", "c1", "--apply-command", "true", "--config-dir", str(tmp_path)], obj={})
    assert result.exit_code == 1
    assert result.output.startswith("error: cannot read") and "TOML syntax error" in result.output


def test_an_unusable_work_directory_is_one_line_and_exit_1(tmp_path: Path, broker: Broker) -> None:
    (tmp_path / "file").write_text("")
    args = ["connector", "--child-id", "c1", "--apply-command", "true", "--mqtt-host", "127.0.0.1", "--mqtt-port", str(broker.port), "--work-dir", str(tmp_path / "file" / "work")]
    result = CliRunner().invoke(main_group, args, obj={})
    assert result.exit_code == 1
    assert "error: cannot use the work directory" in result.output
