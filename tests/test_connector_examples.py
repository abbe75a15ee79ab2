"""The examples under examples/ work as documented (they are run, not just read)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from brokers import Broker
from harness import Observer, observer, req_topic
from tedge_firmware.cli.connector import connector_command
from test_connector_support import RESPONSES, ConnectorProcess, file_server, res

EXAMPLES = Path(__file__).parent.parent / "examples"


def request(base: str, name: str, content: bytes, op_id: str) -> str:
    sha = hashlib.sha256(content).hexdigest()
    return json.dumps({"id": op_id, "attempt": 1, "name": "image", "version": name, "sha256": sha, "url": f"{base}/{name}"})


async def outcome(obs: Observer, child: str, payload: str) -> dict[str, str]:
    """Publish a request until the connector (starting up) takes it; its final status."""
    async with asyncio.timeout(20):
        while True:  # until the connector has subscribed; re-sent requests are harmless
            await obs.publish(req_topic(child), payload)
            try:
                answer = json.loads(await obs.next(res(child), timeout=0.5))
                break
            except TimeoutError:
                continue
        while answer["status"] == "executing":
            answer = json.loads(await obs.next(res(child)))
    return answer  # type: ignore[no-any-return]


async def test_the_python_example(tmp_path: Path, broker: Broker) -> None:
    slot = tmp_path / "slot"
    slot.mkdir()
    env = {**os.environ, "GATEWAY": "127.0.0.1", "GATEWAY_PORT": str(broker.port), "CHILD_ID": "child1", "WORK_DIR": str(tmp_path / "work"), "SLOT_DIR": str(slot)}
    async with file_server({"1.0": b"image 1.0"}) as base, observer(broker.port, [RESPONSES]) as obs:
        with (tmp_path / "example.log").open("wb") as log:
            process = subprocess.Popen([sys.executable, str(EXAMPLES / "connector.py")], env=env, stdout=log, stderr=log)
        try:
            assert await outcome(obs, "child1", request(base, "1.0", b"image 1.0", "op-1")) == {"id": "op-1", "status": "successful"}
        finally:
            process.kill()
            process.wait(timeout=10)
    assert (slot / "firmware.img").read_bytes() == b"image 1.0"
    assert (slot / "version").read_text() == "1.0"


async def test_the_shell_scripts_with_the_cli(tmp_path: Path, broker: Broker, monkeypatch: pytest.MonkeyPatch) -> None:
    slot = tmp_path / "slot"
    args = [
        "--child-id", "child1",
        "--apply-command", str(EXAMPLES / "apply-firmware.sh"),
        "--verify-command", str(EXAMPLES / "verify-firmware.sh"),
        "--mqtt-host", "127.0.0.1", "--mqtt-port", str(broker.port),
        "--work-dir", str(tmp_path / "work"),
    ]
    process = ConnectorProcess(args, tmp_path / "connector.log")
    monkeypatch.setenv("SLOT_DIR", str(slot))  # inherited by the connector, then by the scripts
    try:
        async with file_server({"2.0": b"image 2.0", "3.0": b""}) as base, observer(broker.port, [RESPONSES]) as obs:
            process.start()
            assert await outcome(obs, "child1", request(base, "2.0", b"image 2.0", "op-2")) == {"id": "op-2", "status": "successful"}
            failed = await outcome(obs, "child1", request(base, "3.0", b"", "op-3"))
            assert process.terminate() == 0
    finally:
        process.ensure_stopped()
    assert failed == {"id": "op-3", "status": "failed", "reason": "firmware image 3.0 is empty"}
    assert (slot / "active.img").read_bytes() == b"image 2.0"
    assert (slot / "version").read_text() == "2.0\n"


def test_the_verify_script(tmp_path: Path) -> None:
    (tmp_path / "version").write_text("2.0\n")

    def verify(version: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "SLOT_DIR": str(tmp_path), "FIRMWARE_VERSION": version}
        return subprocess.run([str(EXAMPLES / "verify-firmware.sh")], env=env, capture_output=True, text=True, timeout=10)

    assert verify("2.0").returncode == 0
    wrong = verify("3.0")
    assert wrong.returncode == 1 and wrong.stderr.strip() == "version 2.0 is installed, not 3.0"


def test_the_systemd_unit_uses_only_real_options() -> None:
    unit = (EXAMPLES / "tedge-firmware-connector.service").read_text()
    command = unit.split("ExecStart=", 1)[1].split("\n# ", 1)[0]
    command = command.replace("\\\n", " ").splitlines()[0]
    argv = shlex.split(command)
    assert argv[0].endswith("/tedge-firmware") and argv[1] == "connector"
    context = connector_command.make_context("connector", argv[2:])  # raises for unknown options
    assert context.params["child_ids"] == ("child1",)
    assert context.params["verify_command"] == "/usr/local/bin/verify-firmware.sh"
    assert "KillMode=process" in unit and "StateDirectory=tedge-firmware-connector" in unit
