"""`tedge-firmware demo` as a user runs it (a subprocess), in a small configuration.

Checks the exit code and the summary (who succeeded, who failed with which reason, one cloud
download, no protocol error), with Mosquitto and with the embedded broker (amqtt, the fallback
for machines without Mosquitto), that SIGTERM stops every process the demo started and removes
its directory, which broker `--broker` picks and what it says when there is none, and the pure
pieces (sizes, roles, what counts as expected).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from tedge_firmware.core.units import parse_size
from tedge_firmware.demo import broker as demo_broker
from tedge_firmware.demo import stack as demo
from tedge_firmware.demo.broker import choose_broker
from tedge_firmware.demo.children import child_roles
from tedge_firmware.demo.options import FAIL_REASON, DemoOptions
from tedge_firmware.demo.rollout import ChildResult
from tedge_firmware.errors import ConfigError

DEMO = [sys.executable, "-m", "tedge_firmware", "demo"]


def run_demo(*args: str, limit_s: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*DEMO, *args], capture_output=True, text=True, timeout=limit_s)


def processes_mentioning(text: str) -> list[str]:
    """Command lines of running processes that mention `text` (e.g. the demo's directory)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(cmdline)
    return found


BROKER_LINES = {"mosquitto": "mosquitto on 127.0.0.1:", "embedded": "embedded broker (amqtt) on 127.0.0.1:"}


@pytest.mark.parametrize(
    ("broker", "protocol"),
    [("mosquitto", "mixed"), ("mosquitto", "te"), ("mosquitto", "legacy"), ("embedded", "mixed")],
)
def test_the_demo_with_five_children_ends_as_planned(tmp_path: Path, broker: str, protocol: str) -> None:
    result = run_demo(
        "--children", "5", "--size", "1MiB", "--fail", "1", "--flaky", "1",
        "--apply-seconds", "0.2", "--ramp", "0.05", "--plain", "--workdir", str(tmp_path),
        "--broker", broker, "--protocol", protocol,
    )  # fmt: skip
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert BROKER_LINES[broker] in out
    assert "successful: 4 of 4 that should succeed; failed on purpose: 1 of 1" in out
    assert "firmware installed (Cumulocity inventory): 4 children" in out
    assert re.search(r"cloud downloads: 1 \(2 requests", out)  # cut once, resumed: one download
    assert "protocol errors (what Cumulocity would refuse): 0" in out
    assert FAIL_REASON in out
    # the summary row of the flaky child: successful at its second operation
    c04 = "te" if protocol in ("te", "mixed") else "legacy"  # mixed: every other child is te
    assert re.search(rf"c04\s+│\s+{c04}\s+│\s+flaky\s+│\s+SUCCESSFUL\s+│[^│]+│\s+2\s+│", out), out
    if protocol == "mixed":
        assert re.search(r"c01\s+│\s+legacy\s+│", out), out
    assert "demo OK" in out
    assert list(tmp_path.iterdir()) == []  # its directory is removed


def test_the_secure_demo_rolls_out_over_tls_with_client_certificates(tmp_path: Path) -> None:
    result = run_demo(
        "--secure", "--children", "4", "--size", "1MiB", "--fail", "1", "--flaky", "0",
        "--apply-seconds", "0.1", "--ramp", "0.05", "--plain", "--workdir", str(tmp_path), "--keep",
    )  # fmt: skip
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "(TLS listener: client certificates, ACL)" in out
    assert "firmware over HTTPS, client certificates required; certificates in " in out
    assert "successful: 3 of 3 that should succeed; failed on purpose: 1 of 1" in out
    assert "protocol errors (what Cumulocity would refuse): 0" in out
    [home] = tmp_path.iterdir()  # kept: what ran is on disk
    assert "require_certificate true" in (home / "mosquitto.conf").read_text()
    tls_port = re.search(r"mosquitto on 127\.0\.0\.1:(\d+) \(TLS listener", out)
    assert tls_port is not None and f"listener {tls_port[1]} 127.0.0.1" in (home / "mosquitto.conf").read_text()
    gateway_log = (home / "gateway.log").read_text()
    assert re.search(r"File transfer: serving .* on https://", gateway_log), gateway_log[-2000:]
    assert "Traceback" not in gateway_log
    assert len(list((home / "certs" / "children").glob("*.crt"))) == 4  # one certificate per child


def test_the_secure_demo_needs_mosquitto(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result = run_demo("--secure", "--broker", "embedded", limit_s=20)
    assert result.returncode == 2 and "--secure needs mosquitto" in result.stderr
    monkeypatch.setattr(demo_broker, "find_mosquitto", lambda path=None: None)
    monkeypatch.setattr(demo_broker, "embedded_broker_installed", lambda: True)
    console = Console(record=True, width=80)
    assert demo.main(DemoOptions(workdir=tmp_path, secure=True), console) == 2
    [line] = console.export_text().splitlines()
    assert line.startswith("demo error: --secure needs mosquitto") and "apt-get install mosquitto" in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("broker", "broker_argv"), [("mosquitto", "mosquitto.conf"), ("embedded", "tedge_firmware.demo.embedded_broker")])
def test_sigterm_stops_every_process_the_demo_started(tmp_path: Path, broker: str, broker_argv: str) -> None:
    process = subprocess.Popen(
        [*DEMO, "--children", "3", "--size", "1MiB", "--apply-seconds", "60", "--plain",
         "--workdir", str(tmp_path), "--broker", broker],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    assert process.stdout is not None
    try:
        lines = []
        for line in process.stdout:  # ends when the demo applies (60 s each): stopped there
            lines.append(line)
            if "EXECUTING" in line:
                break
        directory = next(line.split(": ", 1)[1].strip() for line in lines if line.startswith("demo directory"))
        running = processes_mentioning(directory)
        assert len(running) >= 2  # the broker and the gateway run
        assert any(broker_argv in cmdline for cmdline in running), running
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 143
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()
    deadline = time.monotonic() + 5  # killed process groups are reaped by the kernel right away
    while processes_mentioning(directory) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_mentioning(directory) == []
    assert not os.path.exists(directory)


def test_impossible_options_are_a_usage_error() -> None:
    result = run_demo("--children", "2", "--fail", "2", "--flaky", "1", limit_s=20)
    assert result.returncode == 2
    assert "add up to at most --children" in result.stderr
    assert run_demo("--size", "lots", limit_s=20).returncode == 2


@pytest.mark.parametrize(
    ("text", "size"),
    [("64MiB", 64 * 2**20), ("1MB", 10**6), ("500KiB", 500 * 1024), ("1.5GiB", 3 * 2**29), ("10", 10)],
)
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "0", "MiB", "-1MiB", "1 PiB", "1e9"])
def test_sizes_that_are_not(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_roles_put_the_failing_children_last() -> None:
    roles = child_roles(DemoOptions(children=12, fail=2, flaky=3))
    assert list(roles)[:2] == ["c01", "c02"] and len(roles) == 12
    assert [roles[c] for c in ("c07", "c08", "c10", "c11", "c12")] == ["ok", "flaky", "flaky", "fail", "fail"]


def test_a_failing_child_is_expected_only_with_its_reason() -> None:
    def result(role: str, status: str, reason: str | None = None) -> ChildResult:
        return ChildResult("c1", role, status, 1.0, 1, 0, reason)

    assert result("fail", "FAILED", FAIL_REASON).as_expected
    assert not result("fail", "FAILED", "something else").as_expected
    assert not result("fail", "SUCCESSFUL").as_expected
    assert result("flaky", "SUCCESSFUL").as_expected
    assert not result("ok", "EXECUTING").as_expected


# --- which broker ---------------------------------------------------------------------------

MOSQUITTO = "/usr/sbin/mosquitto"


@pytest.mark.parametrize(
    ("choice", "mosquitto", "embedded", "kind"),
    [
        ("auto", MOSQUITTO, True, "mosquitto"),  # Mosquitto first: the embedded one is a fallback
        ("auto", MOSQUITTO, False, "mosquitto"),
        ("auto", None, True, "embedded"),
        ("mosquitto", MOSQUITTO, True, "mosquitto"),
        ("mosquitto", MOSQUITTO, False, "mosquitto"),
        ("embedded", MOSQUITTO, True, "embedded"),
        ("embedded", None, True, "embedded"),
    ],
)
def test_the_broker_choice(choice, mosquitto, embedded, kind) -> None:
    chosen = choose_broker(choice, mosquitto, embedded)
    assert chosen.kind == kind
    assert chosen.mosquitto == (MOSQUITTO if kind == "mosquitto" else None)


@pytest.mark.parametrize(
    ("choice", "mosquitto", "embedded", "says"),
    [
        ("auto", None, False, ["apt-get install mosquitto", "pip install 'tedge-firmware[demo-broker]'", "make demo"]),
        ("mosquitto", None, True, ["--broker mosquitto", "mosquitto was not found", "apt-get install mosquitto"]),
        ("embedded", MOSQUITTO, False, ["--broker embedded", "not installed", "pip install 'tedge-firmware[demo-broker]'"]),
    ],
)
def test_no_usable_broker_is_a_one_line_config_error(choice, mosquitto, embedded, says) -> None:
    with pytest.raises(ConfigError) as raised:
        choose_broker(choice, mosquitto, embedded)
    message = str(raised.value)
    assert "\n" not in message
    for text in says:
        assert text in message


def test_mosquitto_is_looked_up_on_path_and_in_sbin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty, sbin = tmp_path / "empty", tmp_path / "sbin"
    empty.mkdir()
    sbin.mkdir()
    binary = sbin / "mosquitto"
    binary.write_text("#!/bin/sh\n")
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setattr(demo_broker, "MOSQUITTO_DIRS", (str(sbin),))
    binary.chmod(0o644)  # not executable: not a mosquitto
    assert demo_broker.find_mosquitto() is None
    binary.chmod(0o755)
    assert demo_broker.find_mosquitto() == str(binary)  # not on PATH, found in the sbin directory
    assert demo_broker.find_mosquitto(path=str(empty)) is None


def test_the_embedded_broker_is_found_without_importing_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "amqtt", None)  # what the import system says of a missing module
    assert not demo_broker.embedded_broker_installed()
    monkeypatch.delitem(sys.modules, "amqtt")
    package = tmp_path / "amqtt"
    package.mkdir()
    (package / "__init__.py").write_text("raise RuntimeError('the demo must not import amqtt')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert demo_broker.embedded_broker_installed()
    assert "amqtt" not in sys.modules


def test_without_any_broker_the_demo_says_how_to_get_one_and_starts_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(demo_broker, "MOSQUITTO_DIRS", ())
    monkeypatch.setitem(sys.modules, "amqtt", None)
    console = Console(record=True, width=80)  # the message is longer: still one line
    assert demo.main(DemoOptions(workdir=tmp_path), console) == 2
    lines = console.export_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith("demo error: no MQTT broker: "), lines
    assert "apt-get install mosquitto" in lines[0] and "tedge-firmware[demo-broker]" in lines[0]
    assert list(tmp_path.iterdir()) == []  # no demo directory: nothing was started


def test_an_unknown_broker_is_a_usage_error() -> None:
    result = run_demo("--broker", "nanomq", limit_s=20)
    assert result.returncode == 2
    assert "'nanomq' is not one of" in result.stderr
    with pytest.raises(ValueError, match="--broker"):
        DemoOptions(broker="nanomq")  # type: ignore[arg-type]
