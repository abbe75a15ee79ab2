"""The commands as a user runs them: exit codes, one-line errors, --init, signals."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from brokers import Broker, free_port
from harness import observer, write_config

PLUGIN = [sys.executable, "-c", "from tedge_firmware.cli.main import plugin_main; plugin_main()"]
TEDGE_FIRMWARE = [sys.executable, "-m", "tedge_firmware"]


def run(args: list[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout)


def test_init_creates_the_directories(tmp_path: Path) -> None:
    write_config(tmp_path / "etc", tmp_path / "data", 1883, 8000)
    result = run([*PLUGIN, "--init", "--config-dir", str(tmp_path / "etc")])
    assert result.returncode == 0, result.stderr
    for name in ("cache", "firmware", "file-transfer"):
        assert (tmp_path / "data" / name).is_dir()


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ('[mqtt.client]\nport = "abc"\n', "mqtt.client.port"),
        ("[firmware.child.update]\ntimeout = -5\n", "firmware.child.update.timeout"),
        ("[mqtt\nport = 1\n", "tedge.toml"),
        ('[http.bind]\naddress = "0.0.0.0"\n[c8y]\nurl = "t.example.com"\n[device]\nid = "gw"\n', "http.client.host"),
        ('[device]\nid = "gw"\n', "c8y.url"),
        ('[c8y]\nurl = "t.example.com"\n', "device.id"),
    ],
)
def test_bad_configuration_is_one_line_and_exit_1(tmp_path: Path, toml: str, expected: str) -> None:
    (tmp_path / "tedge.toml").write_text(toml)
    result = run([*PLUGIN, "--config-dir", str(tmp_path)])
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and expected in lines[0]
    assert "Traceback" not in result.stderr


def test_without_a_tedge_toml_the_error_names_it_and_the_fix(tmp_path: Path) -> None:
    config_dir = tmp_path / "etc"
    config_dir.mkdir()
    result = run([*TEDGE_FIRMWARE, "--config-dir", str(config_dir), "run"])
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert f"'c8y.url' is missing in {config_dir / 'tedge.toml'} (the file does not exist)" in line
    # what the line says to do works as written
    fix = line.split("set it with '", 1)[1].split("'", 1)[0]
    command = fix.replace("<your tenant host>", "t.example.com").replace("tedge-firmware", " ".join(TEDGE_FIRMWARE), 1)
    assert subprocess.run(command, shell=True, capture_output=True, text=True, timeout=30).returncode == 0
    after = run([*TEDGE_FIRMWARE, "--config-dir", str(config_dir), "run"])
    assert "c8y.url" not in after.stderr  # the next thing missing is the device id
    assert "device.id" in after.stderr


@pytest.mark.parametrize(
    "command",
    [["run"], ["file-transfer"], ["registration"], ["cache", "list"], ["ops", "list"], ["c8y-sim", "serve"],
     ["connector", "--child-id", "c1", "--apply-command", "true"]],
    ids=lambda c: " ".join(c[:2]),
)
@pytest.mark.parametrize("before", [True, False], ids=["before", "after"])
def test_a_config_dir_that_does_not_exist_is_an_error_not_the_defaults(tmp_path: Path, command: list[str], before: bool) -> None:
    missing = tmp_path / "no-such-dir"
    option = ["--config-dir", str(missing)]
    args = [*option, *command] if before else [*command[:2 if command[0] in ("cache", "ops", "c8y-sim") else 1], *option, *command[2 if command[0] in ("cache", "ops", "c8y-sim") else 1:]]
    result = run([*TEDGE_FIRMWARE, *args], timeout=20)
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip() == (
        f"error: the configuration directory {missing} (--config-dir) does not exist: "
        f"create it (mkdir -p {missing}) or give the directory of your tedge.toml"
    )


def test_the_plugin_with_a_config_dir_that_does_not_exist(tmp_path: Path) -> None:
    result = run([*PLUGIN, "--config-dir", str(tmp_path / "nope")])
    assert result.returncode == 1 and "does not exist" in result.stderr


def test_bad_configuration_for_the_all_in_one_service(tmp_path: Path) -> None:
    (tmp_path / "tedge.toml").write_text("[http.bind]\nport = 70000\n")
    result = run([*TEDGE_FIRMWARE, "run", "--config-dir", str(tmp_path)])
    assert result.returncode == 1
    assert "http.bind.port" in result.stderr and "Traceback" not in result.stderr


def test_wrong_broker_credentials_exit_non_zero(tmp_path: Path) -> None:
    broker = Broker(tmp_path)
    passwords = tmp_path / "passwords"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwords), "user", "secret"], check=True)
    broker.conf.write_text(
        broker.conf.read_text().replace("allow_anonymous true", f"allow_anonymous false\npassword_file {passwords}")
    )
    broker.start()
    try:
        write_config(tmp_path / "etc", tmp_path / "data", broker.port, free_port())
        result = run([*TEDGE_FIRMWARE, "run", "--config-dir", str(tmp_path / "etc")], timeout=30)
    finally:
        broker.kill()
    assert result.returncode == 1
    assert "refused" in result.stderr and "Traceback" not in result.stderr


async def test_sigterm_stops_gracefully_and_reports_down(tmp_path: Path, broker: Broker) -> None:
    write_config(tmp_path / "etc", tmp_path / "data", broker.port, free_port())
    async with observer(broker.port, ["c8y/s/us", "tedge/health/c8y-firmware-plugin"]) as obs:
        process = subprocess.Popen([*TEDGE_FIRMWARE, "run", "--config-dir", str(tmp_path / "etc")], stderr=subprocess.PIPE)
        try:
            assert await obs.next("c8y/s/us", timeout=20) == b"500"
            assert json.loads(await obs.next("tedge/health/c8y-firmware-plugin"))["status"] == "up"
            started = time.monotonic()
            process.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(process.wait, 10)
            assert code == 0
            assert time.monotonic() - started < 5
            down = json.loads(await obs.next("tedge/health/c8y-firmware-plugin"))
            assert down == {"pid": process.pid, "status": "down"}
        finally:
            if process.poll() is None:
                process.kill()
            process.wait()
            assert process.stderr is not None
            process.stderr.close()


async def test_second_signal_exits_at_once(tmp_path: Path, broker: Broker) -> None:
    write_config(tmp_path / "etc", tmp_path / "data", broker.port, free_port())
    process = subprocess.Popen([*TEDGE_FIRMWARE, "run", "--config-dir", str(tmp_path / "etc")], stderr=subprocess.DEVNULL)
    try:
        async with observer(broker.port, ["c8y/s/us"]) as obs:
            assert await obs.next("c8y/s/us", timeout=20) == b"500"
        # with the broker frozen, the graceful shutdown waits to deliver the final health message
        assert broker.process is not None
        broker.process.send_signal(signal.SIGSTOP)
        process.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        assert process.poll() is None, "the graceful shutdown should still be waiting"
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(process.wait, 10)
        assert code == 130
        assert time.monotonic() - started < 1.0
    finally:
        if broker.process is not None:
            broker.process.send_signal(signal.SIGCONT)
        if process.poll() is None:
            process.kill()
        process.wait()


def test_make_run_says_which_broker_and_stops_the_one_it_started(tmp_path: Path) -> None:
    import os
    import re

    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "MQTT_PORT": str(free_port()), "HTTP_PORT": str(free_port())}
    process = subprocess.Popen(
        ["bash", str(repo / "scripts" / "run-local.sh"), str(tmp_path / "etc")],
        cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    assert process.stdout is not None
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 30
        while not any("firmware plugin started" in line for line in lines):
            assert time.monotonic() < deadline and process.poll() is None, "".join(lines)
            lines.append(process.stdout.readline())
        started = next(line for line in lines if line.startswith("started "))
        broker_pid = int(re.search(r"\(pid (\d+);", started)[1])  # type: ignore[index]
        assert Path(f"/proc/{broker_pid}").exists()
        os.killpg(process.pid, signal.SIGINT)  # Ctrl-C in the terminal
        rest, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert f"stopped mosquitto (pid {broker_pid})" in rest
    assert not Path(f"/proc/{broker_pid}").exists()  # nothing left running
    assert (tmp_path / "data" / "cache").is_dir()  # the data next to the config dir, not in the repo


def test_make_run_uses_a_broker_that_is_already_there(tmp_path: Path, broker: Broker) -> None:
    import os

    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "MQTT_PORT": str(broker.port), "HTTP_PORT": str(free_port())}
    process = subprocess.Popen(
        ["bash", str(repo / "scripts" / "run-local.sh"), str(tmp_path / "etc")],
        cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    assert process.stdout is not None
    try:
        first = [process.stdout.readline() for _ in range(2)]
        assert first[1].strip() == f"using the MQTT broker already listening on 127.0.0.1:{broker.port}", first
        os.killpg(process.pid, signal.SIGINT)
        process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert broker.process is not None and broker.process.poll() is None  # left as it was
