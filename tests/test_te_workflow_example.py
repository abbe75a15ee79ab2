"""examples/firmware_update.toml, walked against the real gateway.

tedge-agent does not run here, so a small model of its workflow engine plays each child: it
follows the example file state by state with the rules thin-edge's source gives
(docs/thin-edge-te.md): `proceed`, the built-in `download`, `script`, `cleanup`, and a state the
file does not declare means "wait for another component". The test plays the mapper (creates
the command, clears it at the end). The gateway must serve the state the file leaves to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shlex
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt
import pytest

from brokers import Broker, free_port
from harness import FirmwareServer, Gateway, observer, sha256, write_config

EXAMPLE = Path(__file__).parent.parent / "examples" / "firmware_update.toml"
FIRMWARE = b"firmware for te/ children " * 4000
COMMANDS = "te/+/+/+/+/cmd/firmware_update/+"


def workflow() -> dict[str, Any]:
    return tomllib.loads(EXAMPLE.read_text())


def test_the_example_follows_thin_edges_rules_for_workflow_files() -> None:
    flow = workflow()
    assert flow["operation"] == "firmware_update"
    assert "init" in flow  # required
    for final in ("successful", "failed"):
        assert flow[final] == {"action": "cleanup"}  # the only action allowed there
    assert "gateway_download" not in flow  # left out: the agent waits for the gateway
    assert flow["gateway_downloaded"]["action"] == "download"  # tedge-agent 2.0.0 or later
    states = {name for name, value in flow.items() if isinstance(value, dict)}
    targets = {
        handler if isinstance(handler, str) else handler["status"]
        for state in flow.values()
        if isinstance(state, dict)
        for key, handler in state.items()
        if key in ("on_success", "on_error")
    }
    assert targets <= states | {"gateway_download"}


class AgentModel:
    """One child's tedge-agent, as far as the example file needs it."""

    def __init__(self, child: str, flow: dict[str, Any], port: int, tmp: Path) -> None:
        self.child, self.flow, self.port, self.tmp = child, flow, port, tmp
        self.filter = f"te/device/{child}///cmd/firmware_update/+"

    async def run(self, ready: asyncio.Event) -> None:
        async with aiomqtt.Client("127.0.0.1", self.port, identifier=f"agent-{self.child}") as client:
            await client.subscribe(self.filter, qos=1)
            ready.set()
            async for message in client.messages:
                payload = message.payload
                if not isinstance(payload, bytes) or not payload:
                    continue  # cleared
                command = json.loads(payload)
                moved = await self.step(message.topic.value, command)
                if moved is not None:
                    await client.publish(message.topic.value, json.dumps(moved), qos=1, retain=True)

    async def step(self, topic: str, command: dict[str, Any]) -> dict[str, Any] | None:
        state = self.flow.get(command["status"])
        if not isinstance(state, dict):
            return None  # not declared: another component owns it
        action, script = state.get("action"), state.get("script")
        if action == "cleanup":
            return None  # the mapper clears it
        if action == "proceed":
            return {**command, "status": state["on_success"]}
        if action == "download":
            return await self._download(topic, command, state)
        if script is not None:
            return await self._script(command, state, script)
        raise AssertionError(f"the model does not know {state}")

    async def _download(self, topic: str, command: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
        url = command.get("tedgeUrl") or command["remoteUrl"]
        target = self.tmp / f"firmware_update_{topic.rsplit('/', 1)[1]}"
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            if response.status != 200:
                return _handler(command, state["on_error"])
            target.write_bytes(await response.read())
        return {**command, "downloadedPath": str(target), "status": state["on_success"]}

    async def _script(self, command: dict[str, Any], state: dict[str, Any], script: str) -> dict[str, Any]:
        line = re.sub(r"\$\{\.payload\.(\w+)\}", lambda m: str(command.get(m[1], "")), script)
        process = await asyncio.create_subprocess_exec(*shlex.split(line))
        code = await process.wait()
        return _handler(command, state["on_success"] if code == 0 else state["on_error"])


def _handler(command: dict[str, Any], handler: str | dict[str, str]) -> dict[str, Any]:
    if isinstance(handler, str):
        return {**command, "status": handler}
    return {**command, **handler}


INSTALL = """#!/bin/sh
# name version path sha256: check the file, then "flash" it
set -e
echo "$4  $3" | sha256sum -c - >/dev/null
cp "$3" "{installed}/$(basename "$(dirname "$3")")-$1-$2.bin"  # one file per child
"""


@contextlib.asynccontextmanager
async def agents(children: list[str], flow: dict[str, Any], port: int, tmp: Path) -> AsyncIterator[None]:
    tasks, ready = [], []
    for child in children:
        event = asyncio.Event()
        work = tmp / child
        work.mkdir()
        tasks.append(asyncio.create_task(AgentModel(child, flow, port, work).run(event)))
        ready.append(event)
    try:
        async with asyncio.timeout(10):
            for event in ready:
                await event.wait()
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def walk(obs: Any, topic: str, until: tuple[str, ...] = ("successful", "failed"), states: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The states of one command until a final one; then the test, as the mapper, clears it.
    With `until` other states: stops there (and clears nothing)."""
    states = [] if states is None else states
    while not states or states[-1]["status"] not in until:
        states.append(json.loads(await obs.next(topic, timeout=20)))
    if states[-1]["status"] in ("successful", "failed"):
        await obs.publish(topic, b"", retain=True)
    return states


@pytest.mark.parametrize("firmware", ["fw.bin", "missing.bin"])
async def test_children_following_the_example_update_from_one_gateway_download(
    tmp_path: Path, broker: Broker, firmware: str
) -> None:
    installed = tmp_path / "installed"
    installed.mkdir()
    script = tmp_path / "install-firmware.sh"
    script.write_text(INSTALL.replace("{installed}", str(installed)))
    script.chmod(0o755)
    flow = workflow()  # the user's one change: their install script
    flow["install"]["script"] = flow["install"]["script"].replace("/usr/local/bin/install-firmware.sh", str(script))

    cloud = FirmwareServer(files={"fw.bin": FIRMWARE})
    gate = cloud.gates[firmware] = asyncio.Event()  # the origin answers once all three ask
    await cloud.start()
    config_dir = tmp_path / "etc"
    write_config(config_dir, tmp_path / "data", broker.port, free_port())
    gateway = Gateway(config_dir, tmp_path / "data")
    await gateway.start()
    children = ["child-a", "child-b", "child-c"]
    topics = {child: f"te/device/{child}///cmd/firmware_update/c8y-mapper-9" for child in children}
    try:
        async with agents(children, flow, broker.port, tmp_path), observer(broker.port, list(topics.values())) as obs:
            init = {"status": "init", "remoteUrl": cloud.url(firmware), "name": "image", "version": "3.1"}
            for topic in topics.values():  # the mapper creates the commands
                await obs.publish(topic, json.dumps(init), retain=True)
            # every child hands its command to the gateway while the cloud has not answered
            walks = [await walk(obs, topic, until=("gateway_download",)) for topic in topics.values()]
            gate.set()
            walks = [await walk(obs, topic, states=states) for topic, states in zip(topics.values(), walks, strict=True)]
    finally:
        await gateway.stop()
        await cloud.stop()
    assert cloud.count(firmware) == 1  # one cloud download for the three children
    for states in walks:
        statuses = [state["status"] for state in states]
        if firmware == "fw.bin":
            assert statuses == ["init", "executing", "gateway_download", "gateway_downloaded", "install", "successful"]
            downloaded = states[3]
            assert downloaded["sha256"] == sha256(FIRMWARE) and downloaded["size"] == len(FIRMWARE)
            assert "/te/v1/files/" in downloaded["tedgeUrl"]
            assert all(state["name"] == "image" and state["remoteUrl"] == init["remoteUrl"] for state in states)
        else:
            assert statuses == ["init", "executing", "gateway_download", "failed"]
            assert "404" in states[-1]["reason"]
    if firmware == "fw.bin":
        for child in children:
            assert (installed / f"{child}-image-3.1.bin").read_bytes() == FIRMWARE
