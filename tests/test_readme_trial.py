"""The README's "A manual trial" block, run as written against a real gateway.

Only what ties it to one machine changes: the broker's port (the mosquitto clients get `-p`),
the cloud's port (8080) and `/tmp` (a directory of the test's own). The block must show the
firmware arriving at the child and the 501 / 115 / 503 for Cumulocity, and leave nothing running.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from brokers import Broker, free_port
from harness import Gateway, write_config

README = Path(__file__).resolve().parent.parent / "README.md"


def trial_block() -> str:
    section = README.read_text().split("## A manual trial", 1)[1]
    return section.split("```sh\n", 1)[1].split("```", 1)[0]


async def test_the_manual_trial_runs_as_written(tmp_path: Path, broker: Broker) -> None:
    http_port, cloud_port = free_port(), free_port()
    config_dir, data = tmp_path / "etc", tmp_path / "data"
    write_config(config_dir, data, broker.port, http_port)
    gateway = Gateway(config_dir, data)
    work = tmp_path / "work"
    work.mkdir()
    script = trial_block().replace("8080", str(cloud_port)).replace("/tmp/", f"{work}/")
    # the mosquitto clients, on the test's broker: wrappers that exec them (so that `$!` is the
    # client's own pid, as in a user's shell)
    wrappers = tmp_path / "bin"
    wrappers.mkdir()
    for client in ("mosquitto_sub", "mosquitto_pub"):
        real = shutil.which(client)
        assert real is not None, f"{client} is missing: make test installs mosquitto-clients"
        wrapper = wrappers / client
        wrapper.write_text(f'#!/bin/sh\nexec {real} -p {broker.port} "$@"\n')
        wrapper.chmod(0o755)
    env = {**os.environ, "PATH": f"{wrappers}:{os.environ['PATH']}"}
    await gateway.start()
    try:
        shell = await asyncio.create_subprocess_exec(
            "bash", "-c", script, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env
        )
        async with asyncio.timeout(60):
            output, _ = await shell.communicate()
    finally:
        await gateway.stop()
    text = output.decode(errors="replace")
    assert shell.returncode == 0, text
    assert "child1 got image.bin" in text
    lines = [line for line in text.splitlines() if line.startswith("c8y/s/us/child1 ")]
    assert lines == [
        "c8y/s/us/child1 501,c8y_Firmware",
        f"c8y/s/us/child1 115,image,1.0,http://127.0.0.1:{cloud_port}/image.bin",
        "c8y/s/us/child1 503,c8y_Firmware,",
    ], text
    # nothing the block started is left running
    pgrep = await asyncio.create_subprocess_exec("pgrep", "-f", f"http.server {cloud_port}", stdout=subprocess.PIPE)
    leftovers, _ = await pgrep.communicate()
    assert leftovers == b""


def test_the_block_is_found() -> None:
    block = trial_block()
    assert "mosquitto_pub -t c8y/s/ds -m '515,child1,image,1.0,http://127.0.0.1:8080/image.bin'" in block
    assert block.rstrip().endswith("kill $watching $cloud")


pytestmark = pytest.mark.timeout(120)
