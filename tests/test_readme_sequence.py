"""The message sequence in the README's "How it works" is what the code does.

The test reads the sequence block from README.md, runs the real gateway (`tedge-firmware run`
in-process) with the Cumulocity simulator and a child played by this test, records every
message on the broker, and checks that

- every recorded message is a line of the README, and every line was recorded: nothing is
  missing from the diagram and nothing in it is made up;
- within each lane of the diagram (one MQTT session's story), the order is the recorded one.

What the child sends is taken from the README itself, so the child's side cannot drift either.
Placeholders in angle brackets (`<op id>`) stand for any text, except `<empty…>`, which stands
for an empty payload; a trailing newline of a SmartREST line is not shown in the README.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from brokers import Broker
from harness import Gateway, Observer, observer, req_topic, res_topic, write_simulated_tenant_config
from tedge_firmware.sim import C8ySimulator, OperationStatus

README = Path(__file__).resolve().parent.parent / "README.md"
CHILD = "child1"
ARROW = " → "
PLACEHOLDER = re.compile(r"<[^<>]+>")
EMPTY = "<empty"  # a placeholder that says the payload is empty matches only that


@dataclass(frozen=True)
class Line:
    lane: str
    sender: str
    topic: str
    payload: str

    def pattern(self) -> re.Pattern[str]:
        if self.payload.startswith(EMPTY):
            return re.compile("")
        parts = PLACEHOLDER.split(self.payload)
        return re.compile(".*?".join(re.escape(part) for part in parts), re.DOTALL)

    def matches(self, topic: str, payload: str) -> bool:
        return topic == self.topic and self.pattern().fullmatch(payload) is not None

    def filled(self, **values: str) -> str:
        """The payload with its placeholders filled in (for what this test sends)."""
        return PLACEHOLDER.sub(lambda found: values[found.group(0)[1:-1].replace(" ", "_")], self.payload)


def readme_sequence() -> list[Line]:
    """The first ```text block under "## How it works": lanes ("name:") and message lines."""
    text = README.read_text()
    section = text.split("## How it works", 1)[1]
    block = section.split("```text\n", 1)[1].split("```", 1)[0]
    lines, lane = [], ""
    for raw in block.splitlines():
        if raw and not raw.startswith(" ") and raw.endswith(":"):
            lane = raw[:-1]
        elif ARROW in raw:
            fields = raw.strip().split(None, 3)  # sender, "→", receiver, "topic payload"
            topic, _, payload = fields[3].partition(" ")
            lines.append(Line(lane, fields[0], topic, payload.strip()))
    assert lines, "no sequence found in the README"
    return lines


def recorded(watch: Observer) -> list[tuple[str, str]]:
    return [(topic, payload.decode().removesuffix("\n")) for topic, payload in watch.log]


def check(lines: list[Line], log: list[tuple[str, str]]) -> None:
    unmatched = list(range(len(log)))
    position: dict[str, int] = {}
    for line in lines:
        index = next((i for i in unmatched if line.matches(*log[i])), None)
        assert index is not None, f"README line not seen on the broker: {line}\nrecorded: {log}"
        assert index > position.get(line.lane, -1), f"out of order in lane {line.lane!r}: {line}"
        position[line.lane] = index
        unmatched.remove(index)
    extra = [log[i] for i in unmatched]
    assert not extra, f"messages on the broker that the README does not show: {extra}"


async def health_down(watch: Observer) -> None:
    """Wait until the gateway's health "down" has reached the observer."""
    while b'"status":"down"' not in await watch.next("tedge/health/c8y-firmware-plugin", timeout=10):
        pass


def child_says(lines: list[Line], status: str) -> Line:
    """The README's line for what the child sends with this status (there is one of each)."""
    said = [line for line in lines if line.sender == CHILD and f'"status":"{status}"' in line.payload]
    assert len(said) == 1, f"the README should show the child sending {status!r} once"
    return said[0]


async def test_the_readme_sequence_is_what_happens(broker: Broker, tmp_path: Path, unused_port: int) -> None:
    lines = readme_sequence()
    config_dir, data = tmp_path / "etc", tmp_path / "data"
    # the binaries are the tenant's own, so the gateway asks for a JWT and sends it
    write_simulated_tenant_config(config_dir, data, broker.port, unused_port, [CHILD])
    async with observer(broker.port, ["#"]) as watch, C8ySimulator(
        mqtt_port=broker.port, gateway_id="parent-device", require_token=True
    ) as sim:
        gateway = Gateway(config_dir, data)
        await gateway.start()
        try:
            await sim.wait_for_device(CHILD)
            url = sim.add_file("image.bin", bytes(range(256)) * 400)
            # the first operation: downloaded, served to the child, successful
            first = sim.create_firmware_operation(CHILD, "image", "1.0", url)
            request = json.loads(await watch.next(req_topic(CHILD), timeout=15))
            async with aiohttp.ClientSession() as client, client.get(request["url"]) as response:
                assert response.status == 200
                await response.read()
            for status, state in (("executing", OperationStatus.EXECUTING), ("successful", OperationStatus.SUCCESSFUL)):
                message = child_says(lines, status).filled(op_id=request["id"])
                await watch.publish(res_topic(CHILD), message)
                await sim.wait_for(first.id, state)
            # the second: the origin confirms the cached copy (304, no download), failed by the child
            second = sim.create_firmware_operation(CHILD, "image", "1.0", url)
            request = json.loads(await watch.next(req_topic(CHILD), timeout=15))
            message = child_says(lines, "failed").filled(op_id=request["id"])
            await watch.publish(res_topic(CHILD), message)
            await sim.wait_for(second.id, OperationStatus.FAILED)
            await gateway.stop()
            await health_down(watch)  # recorded before the observer goes
        finally:
            await gateway.stop()
        assert not sim.errors
        assert sim.stats.files["image.bin"].statuses == (200, 304)
    check(lines, recorded(watch))
