"""The demo's embedded broker (`python -m tedge_firmware.demo.embedded_broker`) as the demo runs it.

A subprocess on a free port: it relays QoS 1 messages between clients, the demo's listen probe
does not fill its log with errors, SIGTERM stops it cleanly, a port in use is a one-line error,
and the amqtt fault the README names (a client receives retained messages on topics it did not
subscribe to) is real, so the README's limits stay true. amqtt comes with the `test` extra.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import pytest

from brokers import free_port
from tedge_firmware.demo.processes import HOST
from tedge_firmware.shell.mqtt import MqttSession, MqttSettings

MODULE = [sys.executable, "-m", "tedge_firmware.demo.embedded_broker"]


class EmbeddedBroker:
    def __init__(self, log_file: Path) -> None:
        self.port = free_port()
        self.log_file = log_file
        self.process = subprocess.Popen(
            [*MODULE, "--host", HOST, "--port", str(self.port), "--log-file", str(log_file)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def wait_listening(self, limit_s: float = 15.0) -> None:
        """Poll: a TCP listener has no event to await (the demo probes the same way)."""
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.process.communicate()
            try:
                socket.create_connection((HOST, self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.02)
        raise AssertionError(f"the embedded broker did not listen within {limit_s} s")

    def stop(self, limit_s: float = 10.0) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=limit_s)


@pytest.fixture
def embedded(tmp_path: Path) -> Iterator[EmbeddedBroker]:
    broker = EmbeddedBroker(tmp_path / "embedded-broker.log")
    try:
        broker.wait_listening()
        yield broker
    finally:
        if broker.process.poll() is None:
            broker.process.kill()
        broker.process.communicate()


async def first_message(client: aiomqtt.Client, limit_s: float = 5.0) -> aiomqtt.Message:
    async with asyncio.timeout(limit_s):
        async for message in client.messages:
            return message
    raise AssertionError("the message stream ended")


async def test_it_relays_qos1_messages_and_stops_cleanly_on_sigterm(embedded: EmbeddedBroker) -> None:
    async with (
        aiomqtt.Client(HOST, embedded.port, identifier="gateway") as gateway,
        aiomqtt.Client(HOST, embedded.port, identifier="child") as child,
    ):
        await gateway.subscribe("tedge/+/commands/res/firmware_update", qos=1)
        await child.publish("tedge/c1/commands/res/firmware_update", b'{"status":"executing"}', qos=1)
        message = await first_message(gateway)
    assert message.topic.value == "tedge/c1/commands/res/firmware_update"
    assert message.payload == b'{"status":"executing"}'
    assert message.qos == 1
    assert embedded.stop() == 0
    log = embedded.log_file.read_text()
    assert "listening on" in log and "stopped" in log  # amqtt's shutdown, not the time limit
    # the listen probe (connect, close) is no error, and nothing else went wrong
    assert "ERROR" not in log and "No data" not in log, log


async def test_a_client_receives_retained_messages_it_did_not_subscribe_to(embedded: EmbeddedBroker) -> None:
    """The amqtt fault the README warns about; the demo's clients ignore such messages."""
    async with aiomqtt.Client(HOST, embedded.port, identifier="registration") as registration:
        await registration.subscribe("te/+/+/+/+/cmd/+", qos=1)
        async with aiomqtt.Client(HOST, embedded.port, identifier="children") as children:
            await children.publish("te/device/c1///cmd/firmware_update", b"{}", qos=1, retain=True)
        assert (await first_message(registration)).topic.value == "te/device/c1///cmd/firmware_update"
        async with aiomqtt.Client(HOST, embedded.port, identifier="simulator") as simulator:
            await simulator.subscribe("c8y/s/us/+", qos=1)
            leaked = await first_message(simulator)
    assert leaked.topic.value == "te/device/c1///cmd/firmware_update"  # not c8y/s/us/+
    assert leaked.retain


async def test_our_sessions_pass_on_only_what_they_subscribed_to(embedded: EmbeddedBroker) -> None:
    """The leak above reaches MqttSession too; it hands its consumers only their own topics."""
    async with aiomqtt.Client(HOST, embedded.port, identifier="declarer") as declarer:
        await declarer.subscribe("te/device/+///cmd/+", qos=1)
        await declarer.publish("te/device/c1///cmd/firmware_update", b"{}", qos=1, retain=True)
        settings = MqttSettings(host=HOST, port=embedded.port, client_id="cloud-side")
        session = MqttSession(settings, ["c8y/s/us/+"])
        runner = asyncio.create_task(session.run())
        try:
            async with asyncio.timeout(10):
                await session.wait_connected()
            await declarer.publish("c8y/s/us/c1", b"114,c8y_Firmware", qos=1)
            async with asyncio.timeout(5):
                first = await session.messages.get()
        finally:
            await session.close(timeout=5)
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner
    # without the filter the retained declaration, sent at subscribe time, would come first
    assert (first.topic, first.payload) == ("c8y/s/us/c1", b"114,c8y_Firmware")
    assert session.messages.empty()


def test_a_port_in_use_is_a_one_line_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [*MODULE, "--host", HOST, "--port", str(port)], capture_output=True, text=True, timeout=30
        )
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"embedded broker: cannot listen on {HOST}:{port}: ")
    assert "Traceback" not in result.stderr


def test_a_bad_port_is_a_usage_error() -> None:
    result = subprocess.run([*MODULE, "--port", "70000"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "--port 70000 is not in 1-65535" in result.stderr
