"""`tedge-firmware c8y-sim serve | update | status` as a user runs them, against a real broker."""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from brokers import Broker, free_port
from harness import Observer, observer

SIM = [sys.executable, "-m", "tedge_firmware", "c8y-sim"]
DS = "c8y/s/ds"


@dataclass
class Served:
    process: asyncio.subprocess.Process
    control: str
    gw: Observer

    async def line(self, stream: str, containing: str, timeout: float = 10) -> str:
        """The next line of the simulator's stdout/stderr that contains `containing`."""
        reader = self.process.stdout if stream == "stdout" else self.process.stderr
        assert reader is not None
        async with asyncio.timeout(timeout):
            while True:
                raw = await reader.readline()
                assert raw, f"the simulator ended before printing {containing!r}"
                if containing in raw.decode():
                    return raw.decode().strip()


async def cli(*args: str, timeout: float = 30) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *SIM, *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    async with asyncio.timeout(timeout):
        out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@pytest.fixture
async def served(broker: Broker) -> AsyncIterator[Served]:
    http_port = free_port()
    process = await asyncio.create_subprocess_exec(
        *SIM, "serve", "--mqtt-host", "127.0.0.1", "--mqtt-port", str(broker.port),
        "--http-port", str(http_port), "--gateway-id", "gw", "--no-live",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        async with observer(broker.port, [DS]) as gw:
            served = Served(process, f"http://127.0.0.1:{http_port}", gw)
            await served.line("stderr", "c8y-sim: listening on")  # subscribed: nothing is missed
            yield served
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_serve_update_and_status(served: Served, tmp_path: Path) -> None:
    gw = served.gw
    firmware = tmp_path / "image.bin"
    firmware.write_bytes(b"firmware from the command line")
    version = hashlib.sha256(firmware.read_bytes()).hexdigest()[:12]
    await gw.publish("c8y/s/us", "101,child1,child1,thin-edge.io-child")
    await gw.publish("c8y/s/us/child1", "114,c8y_Firmware\n")
    await served.line("stdout", "device child1 (parent gw): operations c8y_Firmware")

    code, out, err = await cli("update", "--child", "child1", "--file", str(firmware), "--control", served.control)
    assert code == 0, err
    url = f"{served.control}/inventory/binaries/image.bin"
    assert out.strip() == f"operation 1 child1 image {version}: PENDING ({url})"
    assert await gw.next(DS) == f"515,child1,image,{version},{url}".encode()
    async with aiohttp.ClientSession() as client, client.get(url) as response:
        assert await response.read() == b"firmware from the command line"
    await gw.publish("c8y/s/us/child1", f"501,c8y_Firmware\n115,image,{version},{url}\n503,c8y_Firmware,\n")
    await served.line("stdout", f"operation 1 child1 image {version}: SUCCESSFUL")

    waiting = asyncio.create_task(
        cli("update", "--child", "child1", "--url", "http://fw.example/v2.bin", "--version", "2.0", "--wait", "20", "--control", served.control)
    )
    assert await gw.next(DS, timeout=15) == b"515,child1,v2,2.0,http://fw.example/v2.bin"
    await gw.publish("c8y/s/us/child1", '501,c8y_Firmware\n502,c8y_Firmware,"no space left"\n')
    code, out, _ = await waiting
    assert code == 1
    assert out.splitlines()[-1] == "operation 2 child1 v2 2.0: FAILED 'no space left' (http://fw.example/v2.bin)"

    await gw.publish("c8y/s/us/child1", "503,c8y_Firmware,")  # nothing is executing: a mistake
    await served.line("stdout", "error: child1: no EXECUTING c8y_Firmware operation")

    code, out, _ = await cli("status", "--control", served.control)
    assert code == 0
    assert f"device child1: operations c8y_Firmware; firmware image {version}" in out
    assert f"operation 1 child1 image {version}: SUCCESSFUL" in out
    assert "error: child1: no EXECUTING c8y_Firmware operation" in out
    code, out, _ = await cli("status", "--json", "--control", served.control)
    status = json.loads(out)
    assert [op["status"] for op in status["operations"]] == ["SUCCESSFUL", "FAILED"]
    assert status["stats"]["files"]["image.bin"]["complete"] == 1

    served.process.send_signal(signal.SIGTERM)
    async with asyncio.timeout(10):
        assert await served.process.wait() == 0


async def test_update_for_several_children_is_a_bulk_operation(served: Served) -> None:
    for child in ("c1", "c2"):
        await served.gw.publish("c8y/s/us", f"101,{child}")
        await served.gw.publish(f"c8y/s/us/{child}", "114,c8y_Firmware")
        await served.line("stdout", f"device {child} (parent gw): operations c8y_Firmware")
    code, out, err = await cli(
        "update", "--child", "c1", "--child", "c2", "--child", "ghost", "--url", "http://fw.example/x.bin",
        "--version", "3", "--ramp", "0.1", "--control", served.control,
    )
    assert (code, out.strip()) == (0, "bulk-1: 3 device(s), x 3"), err
    assert sorted(await served.gw.sequence(DS, 2)) == [b"515,c1,x,3,http://fw.example/x.bin", b"515,c2,x,3,http://fw.example/x.bin"]
    await served.line("stdout", "error: ghost: no such device in the inventory")


async def test_update_refused_by_the_simulator_is_one_line(served: Served) -> None:
    code, _, err = await cli("update", "--child", "ghost", "--url", "http://x/y", "--version", "1", "--control", served.control)
    assert code == 1
    assert err.strip() == "error: no device 'ghost' in the inventory"


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--child", "c1"], "either --file or --url"),
        (["--child", "c1", "--url", "http://x/y"], "--url needs --version"),
        (["--child", "a/b", "--url", "http://x/y", "--version", "1"], "'/'"),
        (["--child", "c1", "--child", "c2", "--url", "http://x/y", "--version", "1", "--wait", "5"], "--wait works with one --child"),
    ],
)
async def test_update_usage_errors(args: list[str], words: str) -> None:
    code, _, err = await cli("update", *args, "--control", f"http://127.0.0.1:{free_port()}")
    assert code == 2
    assert words in err


async def test_without_a_running_simulator_update_and_status_say_so() -> None:
    control = f"http://127.0.0.1:{free_port()}"
    for args in (["status"], ["update", "--child", "c1", "--url", "http://x/y", "--version", "1"]):
        code, _, err = await cli(*args, "--control", control)
        assert code == 1
        assert err.startswith(f"error: no simulator answers at {control}")
        assert "Traceback" not in err


async def test_serve_on_a_taken_port_is_one_line_and_exit_1(broker: Broker) -> None:
    code, _, err = await cli("serve", "--mqtt-port", str(broker.port), "--http-port", str(broker.port), "--no-live")
    assert code == 1
    assert "cannot bind" in err and "Traceback" not in err


async def test_serve_with_the_mapper_model_turns_a_json_operation_into_a_te_command(broker: Broker) -> None:
    http_port = free_port()
    process = await asyncio.create_subprocess_exec(
        *SIM, "serve", "--mqtt-host", "127.0.0.1", "--mqtt-port", str(broker.port),
        "--http-port", str(http_port), "--gateway-id", "gw", "--no-live", "--model-thin-edge-mapper",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    commands = "te/device/c1///cmd/firmware_update/+"
    try:
        async with observer(broker.port, ["c8y/s/us", "c8y/devicecontrol/notifications", commands]) as obs:
            served = Served(process, f"http://127.0.0.1:{http_port}", obs)
            await served.line("stderr", "c8y-sim: listening on")
            # retained: the model gets it whenever its own session is up
            await obs.publish("te/device/c1///cmd/firmware_update", "{}", retain=True)
            assert await obs.next("c8y/s/us", timeout=20) == b"101,gw:device:c1,c1,thin-edge.io-child"
            await served.line("stdout", "device gw:device:c1 (parent gw): operations c8y_Firmware")
            code, _, err = await cli(
                "update", "--child", "gw:device:c1", "--url", "http://fw.example/a.bin", "--version", "2.0",
                "--control", served.control,
            )  # fmt: skip
            assert code == 0, err
            operation = json.loads(await obs.next("c8y/devicecontrol/notifications"))
            assert operation["externalSource"]["externalId"] == "gw:device:c1"
            created = await obs.next(f"te/device/c1///cmd/firmware_update/c8y-mapper-{operation['id']}")
            assert json.loads(created)["status"] == "init"
            await obs.publish("te/device/c1///cmd/firmware_update", b"", retain=True)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
