"""MqttSession against a real mosquitto: the `broker` fixture, or a private one started here
(password file, TLS). A plain aiomqtt client is the peer/observer; a small TCP proxy in front
of the broker cuts our connection for fault injection. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiomqtt
import pytest

from linkproxy import LinkProxy
from tedge_firmware.core.config import MqttAuth, config_from_document
from tedge_firmware.core.retry import reconnect_delay
from tedge_firmware.errors import BrokerAuthError, BrokerError, ConfigError
from tedge_firmware.shell.mqtt import (
    Message,
    MqttSession,
    MqttSettings,
    SessionState,
    Will,
    check_topic_filter,
    check_topic_name,
)

WAIT = 10.0  # upper bound of any single wait on the broker
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
# mosquitto started as root drops to user "mosquitto", which can neither read nor write our
# root-owned 0700 temp dirs (no persistence file, no password file); as non-root it has no effect.
KEEP_USER = "user root\n" if os.geteuid() == 0 else ""
T = TypeVar("T")


# --- helpers ---------------------------------------------------------------------------------


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def settings(port: int, client_id: str | None = None, **overrides: Any) -> MqttSettings:
    """Fast backoff so that reconnects happen within a test's time."""
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": port,
        "client_id": client_id or unique("session"),
        "backoff_initial": 0.02,
        "backoff_max": 0.2,
        "timeout": 5.0,
    }
    values.update(overrides)
    return MqttSettings(**values)


async def bounded(awaitable: Awaitable[T], seconds: float = WAIT) -> T:
    async with asyncio.timeout(seconds):
        return await awaitable


class Connects:
    """An on_connect hook that counts its calls; a test can await the n-th one."""

    def __init__(self, also: Callable[[], Awaitable[None]] | None = None) -> None:
        self.count = 0
        self.also = also
        self._changed = asyncio.Condition()

    async def __call__(self) -> None:
        if self.also is not None:
            await self.also()
        self.count += 1
        async with self._changed:
            self._changed.notify_all()

    async def wait_for(self, count: int) -> None:
        async with asyncio.timeout(WAIT), self._changed:
            await self._changed.wait_for(lambda: self.count >= count)


@contextlib.asynccontextmanager
async def running(session: MqttSession) -> AsyncIterator[asyncio.Task[None]]:
    """run() in a task; cancelled at the end (an error that ended run() early is re-raised)."""
    task = asyncio.create_task(session.run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@contextlib.asynccontextmanager
async def peer(
    port: int, *filters: str, client_id: str | None = None, clean: bool = True
) -> AsyncIterator[aiomqtt.Client]:
    async with aiomqtt.Client(
        "127.0.0.1", port, identifier=client_id, clean_session=clean
    ) as client:
        for topic_filter in filters:
            await client.subscribe(topic_filter, qos=1)
        yield client


async def receive(client: aiomqtt.Client, count: int) -> list[aiomqtt.Message]:
    received: list[aiomqtt.Message] = []
    async with asyncio.timeout(WAIT):
        async for message in client.messages:
            received.append(message)
            if len(received) == count:
                break
    return received


async def receive_until(client: aiomqtt.Client, last_payload: bytes) -> list[bytes]:
    payloads: list[bytes] = []
    async with asyncio.timeout(WAIT):
        async for message in client.messages:
            assert isinstance(message.payload, bytes)
            payloads.append(message.payload)
            if message.payload == last_payload:
                break
    return payloads


async def receive_distinct(client: aiomqtt.Client, count: int) -> list[bytes]:
    """Payloads in arrival order until `count` distinct ones came (duplicates are allowed)."""
    payloads: list[bytes] = []
    async with asyncio.timeout(WAIT):
        async for message in client.messages:
            assert isinstance(message.payload, bytes)
            payloads.append(message.payload)
            if len(set(payloads)) == count:
                break
    return payloads


def first_occurrences(payloads: list[bytes]) -> list[bytes]:
    return list(dict.fromkeys(payloads))


async def next_message(session: MqttSession) -> Message:
    return await bounded(session.messages.get())


async def session_receive_distinct(
    session: MqttSession, count: int, known: set[bytes] | None = None
) -> list[bytes]:
    """New payloads, in order of first arrival, until `count` distinct ones (with `known`)."""
    seen = set(known or ())
    new: list[bytes] = []
    while len(seen) < count:
        payload = (await next_message(session)).payload
        if payload not in seen:
            seen.add(payload)
            new.append(payload)
    return new


async def persisting(broker: Any) -> Any:
    """The fixture's broker, restarted (empty) with a config under which it can save sessions."""
    text = broker.conf.read_text()
    if KEEP_USER and KEEP_USER not in text:
        await asyncio.to_thread(broker.stop)
        broker.conf.write_text(text + KEEP_USER)
        await asyncio.to_thread(broker.start)
    return broker


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.asynccontextmanager
async def private_mosquitto(workdir: Path, listener_options: str) -> AsyncIterator[int]:
    """A mosquitto with its own listener options; yields its port once it logs "running"."""
    port = free_port()
    conf = workdir / "private-mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\n{KEEP_USER}{listener_options}")
    process = await asyncio.create_subprocess_exec(
        MOSQUITTO, "-c", str(conf), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    assert process.stderr is not None
    stdout = process.stderr  # mosquitto logs to stderr by default, unbuffered
    drain: asyncio.Task[bytes] | None = None
    try:
        async with asyncio.timeout(WAIT):
            while b" running" not in (line := await stdout.readline()):
                assert line, "mosquitto exited before it was running"
        drain = asyncio.create_task(stdout.read())  # keep the pipe from filling up
        yield port
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()
        if drain is not None:
            await drain


# --- pure parts: backoff, topic checks, settings ---------------------------------------------


@pytest.mark.parametrize(
    ("failures", "rand", "expected"),
    [
        (0, 0.0, 0.1),  # lower half of the first ceiling (0.2)
        (0, 1.0, 0.2),
        (1, 1.0, 0.4),  # doubles
        (5, 1.0, 6.4),
        (6, 1.0, 10.0),  # capped
        (6, 0.0, 5.0),
        (10_000, 0.5, 7.5),  # no overflow however long the broker is away
        (-3, 1.0, 0.2),
    ],
)
def test_backoff_doubles_up_to_the_cap_with_jitter(failures, rand, expected):
    assert reconnect_delay(failures, 0.2, 10.0, lambda: rand) == pytest.approx(expected)


def test_backoff_jitter_spreads_clients():
    delays = {reconnect_delay(3, 0.2, 10.0) for _ in range(50)}
    assert len(delays) > 1
    assert all(0.8 <= delay <= 1.6 for delay in delays)


@pytest.mark.parametrize(
    "topic_filter",
    ["#", "a/#", "+", "+/b/+", "c8y/s/ds", "tedge/+/commands/req/firmware_update", "a//b"],
)
def test_valid_topic_filters(topic_filter):
    check_topic_filter(topic_filter)


@pytest.mark.parametrize(
    "topic_filter",
    ["", "a/#/b", "a#", "#/", "a/b+", "+a/b", "a\0b", "x" * 65_536, "a/\udc80"],
)
def test_invalid_topic_filters(topic_filter):
    with pytest.raises(ValueError):
        check_topic_filter(topic_filter)


@pytest.mark.parametrize(
    "topic",
    # Mosquitto drops the connection of a client that publishes to a topic with a C0 or C1
    # control, a surrogate or a Unicode non-character: never queued, so never blocking
    ["", "a/+", "a/#", "#", "a\0b", "é" * 40_000, "a\tb", "a\x7fb", "a\x85b", "a\x9fb", "a\ud800b",
     "a\ufdd0b", "a\ufdefb", "a\ufffeb", "a\uffffb", "a\U0001fffeb", "a\U0010ffffb"],
)
def test_invalid_topic_names(topic):
    with pytest.raises(ValueError):
        check_topic_name(topic)


@pytest.mark.parametrize(
    ("topic", "payload", "qos", "error"),
    [
        ("a/#", b"x", 1, ValueError),
        ("a/+/b", b"x", 1, ValueError),
        ("", b"x", 1, ValueError),
        ("a\0b", b"x", 1, ValueError),
        (42, b"x", 1, TypeError),
        ("a/b", 42, 1, TypeError),
        ("a/b", None, 1, TypeError),
        ("a/b", b"x", 3, ValueError),
        ("a/b", b"x", -1, ValueError),
        ("a/b", b"x", True, ValueError),
    ],
)
async def test_publish_rejects_what_no_broker_would_take(topic, payload, qos, error):
    session = MqttSession(settings(1883), [])
    with pytest.raises(error):
        session.publish(topic, payload, qos=qos)
    with pytest.raises(error):
        await session.publish_now(topic, payload, qos=qos)
    assert session.outbox_size == 0  # nothing poisonous entered the outbox


@pytest.mark.parametrize(
    "overrides",
    [
        {"port": 0},
        {"port": 65_536},
        {"client_id": ""},
        {"client_id": "a\0b"},
        {"host": ""},
        {"keepalive": -1},
        {"backoff_initial": 0},
        {"backoff_initial": 1.0, "backoff_max": 0.5},
        {"timeout": 0},
        {"outbox_limit": 0},
        {"max_inflight": 0},
        {"password": "secret"},  # without a user name
        {"will": Will("a/#", b"down")},
        {"will": Will("a/b", b"down", qos=3)},
    ],
)
def test_settings_reject_invalid_values(overrides):
    values = {"host": "localhost", "port": 1883, "client_id": "me", **overrides}
    with pytest.raises(ValueError):
        MqttSettings(**values)


async def test_session_rejects_invalid_subscriptions():
    with pytest.raises(ValueError):
        MqttSession(settings(1883), ["ok/#", "bad/#/x"])
    with pytest.raises(TypeError):
        MqttSession(settings(1883), "a/b")


def test_settings_from_tedge_config():
    document = {"mqtt": {"client": {"host": "::1", "port": 1884, "auth": {"ca_file": "/x/ca.pem"}}}}
    config = config_from_document(document, {}, Path("/etc/tedge"), "tedge.toml")
    will = Will("te/device/main/service/x/status/health", b'{"status":"down"}')
    mqtt = MqttSettings.from_tedge_config(config, "c8y-firmware-plugin", will=will)
    assert (mqtt.host, mqtt.port, mqtt.client_id) == ("::1", 1884, "c8y-firmware-plugin")
    assert mqtt.auth == MqttAuth(ca_file=Path("/x/ca.pem"))
    assert mqtt.will == will
    assert mqtt.clean_session is False
    assert mqtt.address == "[::1]:1884"


# --- against the broker ----------------------------------------------------------------------


async def test_round_trip_qos1_and_retained_flag(broker):
    base = unique("rt")
    async with peer(broker.port, f"{base}/out/#") as observer:
        await observer.publish(f"{base}/in/kept", b"was here before", qos=1, retain=True)
        session = MqttSession(settings(broker.port), [f"{base}/in/#"])
        async with running(session):
            assert await next_message(session) == Message(
                f"{base}/in/kept", b"was here before", retain=True
            )
            await bounded(session.wait_connected())
            assert session.connected and session.state is SessionState.CONNECTED
            await observer.publish(f"{base}/in/live", b"hello", qos=1)
            assert await next_message(session) == Message(f"{base}/in/live", b"hello")

            session.publish(f"{base}/out/live", "text")
            session.publish(f"{base}/out/kept", b"kept", retain=True)
            got = await receive(observer, 2)
            assert await session.flush(WAIT)
            assert session.outbox_size == 0
    assert [(m.topic.value, m.payload, m.qos) for m in got] == [
        (f"{base}/out/live", b"text", 1),
        (f"{base}/out/kept", b"kept", 1),
    ]
    # A late subscriber gets the retained message, flagged so, and not the other one.
    async with peer(broker.port, f"{base}/out/#") as late:
        await late.publish(f"{base}/out/sentinel", b"sentinel", qos=1)
        payloads = await receive_until(late, b"sentinel")
    assert payloads == [b"kept", b"sentinel"]


async def test_payloads_arrive_byte_for_byte(broker):
    base = unique("bytes")
    big = bytes(range(256)) * 4096  # 1 MiB, every byte value
    session = MqttSession(settings(broker.port), [f"{base}/in"])
    async with peer(broker.port, f"{base}/out") as observer, running(session):
        await bounded(session.wait_connected())
        for payload in (b"", b"\x00\xff\xfe not utf-8", big, "ünïcode".encode()):
            await observer.publish(f"{base}/in", payload, qos=1)
            assert (await next_message(session)).payload == payload
        session.publish(f"{base}/out", big)
        session.publish(f"{base}/out", "ünïcode")
        got = await receive(observer, 2)
    assert [m.payload for m in got] == [big, "ünïcode".encode()]


def mqtt_packet(kind: int, body: bytes) -> bytes:
    length, encoded = len(body), bytearray()
    while True:
        length, digit = divmod(length, 128)
        encoded.append(digit | (0x80 if length else 0))
        if not length:
            return bytes([kind]) + bytes(encoded) + body


def mqtt_string(data: bytes) -> bytes:
    return len(data).to_bytes(2, "big") + data


async def test_hostile_publishers_do_not_disturb_the_session(broker):
    base = unique("hostile")
    connects = Connects()
    session = MqttSession(settings(broker.port), [f"{base}/#"], on_connect=connects)
    async with running(session):
        await connects.wait_for(1)
        for bad_topic in (b"/\xff\xfe", b"/a\x00b", b"/\xed\xa0\x80"):  # bad UTF-8, NUL, surrogate
            reader, writer = await asyncio.open_connection("127.0.0.1", broker.port)
            connect_body = mqtt_string(b"MQTT") + bytes([4, 0x02]) + (60).to_bytes(2, "big")
            writer.write(mqtt_packet(0x10, connect_body + mqtt_string(unique("evil").encode())))
            assert await bounded(reader.readexactly(4)) == b"\x20\x02\x00\x00"
            writer.write(mqtt_packet(0x30, mqtt_string(base.encode() + bad_topic) + b"evil"))
            assert await bounded(reader.read()) == b""  # the broker dropped the sender
            writer.close()
            await writer.wait_closed()
        async with peer(broker.port) as good:
            await good.publish(f"{base}/fine", b"fine", qos=1)
        assert await next_message(session) == Message(f"{base}/fine", b"fine")
        assert connects.count == 1 and session.connected


async def test_subscriptions_are_made_again_after_a_broker_crash(broker):
    topic = unique("crash")
    connects = Connects()
    session = MqttSession(settings(broker.port), [topic], on_connect=connects)
    async with running(session):
        await connects.wait_for(1)
        await asyncio.to_thread(broker.kill)  # SIGKILL: the broker forgets our session
        await asyncio.to_thread(broker.start)
        await connects.wait_for(2)
        async with peer(broker.port) as publisher:
            await publisher.publish(topic, b"after the crash", qos=1)
        assert await next_message(session) == Message(topic, b"after the crash")


async def test_persistent_session_keeps_messages_while_we_are_away(broker):
    broker = await persisting(broker)
    topic, client_id = unique("away"), unique("persistent")
    first = MqttSession(settings(broker.port, client_id), [topic])
    async with running(first):
        await bounded(first.wait_connected())
    # our process is gone (run() cancelled: clean disconnect, the session stays on the broker)
    async with peer(broker.port) as publisher:
        for payload in (b"m1", b"m2", b"m3"):
            await publisher.publish(topic, payload, qos=1)
    second = MqttSession(settings(broker.port, client_id), [topic])  # a restarted process
    async with running(second):
        assert await session_receive_distinct(second, 3) == [b"m1", b"m2", b"m3"]

    # The broker restarts gracefully (it saves sessions) while we are away; then the same
    # MqttSession instance runs again. (QoS 1 is at least once: the broker may send again
    # what it had not seen acknowledged when it stopped, so duplicates of m1-m3 are allowed.)
    await asyncio.to_thread(broker.stop)
    await asyncio.to_thread(broker.start)
    async with peer(broker.port) as publisher:
        await publisher.publish(topic, b"m4", qos=1)
    async with running(second):
        payloads = await session_receive_distinct(second, 4, known={b"m1", b"m2", b"m3"})
    assert payloads == [b"m4"]


async def test_outbox_filled_while_broker_is_down_is_delivered_in_order(broker):
    broker = await persisting(broker)
    topic, observer_id = unique("outbox"), unique("observer")
    async with peer(broker.port, topic, client_id=observer_id, clean=False):
        pass  # a persistent observer: the broker queues for it while it is away
    await asyncio.to_thread(broker.stop)
    session = MqttSession(settings(broker.port), [])
    expected = [str(i).encode() for i in range(200)]
    async with running(session):
        for payload in expected:
            session.publish(topic, payload)  # must not raise: the broker is away
        assert session.outbox_size == 200 and not session.connected
        assert not await session.flush(0.05)
        await asyncio.to_thread(broker.start)
        assert await session.flush(WAIT)
        assert session.outbox_size == 0
    async with peer(broker.port, client_id=observer_id, clean=False) as observer:
        payloads = await receive_distinct(observer, 200)
    assert first_occurrences(payloads) == expected


async def test_outbox_is_resent_when_the_link_drops_mid_way(broker):
    topic = unique("cut")
    connects = Connects()
    expected = [str(i).encode() for i in range(2000)]
    async with (
        LinkProxy(broker.port, cut_after=20_000) as proxy,
        peer(broker.port, topic) as observer,
    ):
        session = MqttSession(settings(proxy.port), [], on_connect=connects)
        async with running(session):
            await connects.wait_for(1)
            for payload in expected:
                session.publish(topic, payload)
            assert await session.flush(WAIT)
            assert proxy.cuts == 1 and connects.count >= 2  # the link did drop mid-way
        payloads = await receive_distinct(observer, len(expected))
    assert first_occurrences(payloads) == expected  # nothing lost, order kept


async def test_will_is_published_when_the_link_is_cut(broker):
    base = unique("will")
    connects = Connects()
    will = Will(f"{base}/health", b'{"status":"down"}', qos=1, retain=True)
    async with LinkProxy(broker.port) as proxy, peer(broker.port, f"{base}/health") as observer:
        session = MqttSession(settings(proxy.port, will=will), [], on_connect=connects)
        async with running(session):
            await connects.wait_for(1)
            proxy.cut()
            [message] = await receive(observer, 1)
            assert (message.topic.value, message.payload) == (will.topic, will.payload)
            await connects.wait_for(2)  # and the session came back by itself


async def test_on_connect_runs_before_the_outbox_on_every_connect(broker):
    topic = unique("status")
    session: MqttSession

    async def say_up() -> None:
        await session.publish_now(topic, b"up")

    connects = Connects(also=say_up)
    async with LinkProxy(broker.port) as proxy, peer(broker.port, topic) as observer:
        session = MqttSession(settings(proxy.port), [], on_connect=connects)
        async with running(session):
            await connects.wait_for(1)
            proxy.cut()
            for payload in ("q0", "q1", "q2"):
                session.publish(topic, payload)  # queued while the link is down
            await connects.wait_for(2)
            assert await session.flush(WAIT)
            payloads = [m.payload for m in await receive(observer, 5)]
    assert payloads == [b"up", b"up", b"q0", b"q1", b"q2"]


async def test_outbox_is_bounded_and_its_growth_is_logged(broker, caplog):
    topic = unique("bounded")
    session = MqttSession(settings(broker.port, outbox_limit=1_200), [])
    with caplog.at_level("WARNING", logger="tedge_firmware.shell.mqtt"):
        for i in range(1_205):
            session.publish(topic, str(i))
    assert session.outbox_size == 1_200  # the newest five were dropped
    assert any("outbox holds 1000 messages" in r.getMessage() for r in caplog.records)
    full = [r for r in caplog.records if "outbox is full" in r.getMessage()]
    assert len(full) == 1 and full[0].levelname == "ERROR"  # logged once, not per message
    async with peer(broker.port, topic) as observer, running(session):
        assert await session.flush(WAIT)
        payloads = await receive_distinct(observer, 1_200)
    assert first_occurrences(payloads) == [str(i).encode() for i in range(1_200)]


async def test_on_connect_failures(broker):
    calls = 0

    async def flaky() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise BrokerError("link trouble inside the hook")  # a retry will do

    session = MqttSession(settings(broker.port), [], on_connect=flaky)
    async with running(session):
        await bounded(session.wait_connected())
        assert calls == 2

    async def buggy() -> None:
        raise RuntimeError("bug in the hook")

    session = MqttSession(settings(broker.port), [], on_connect=buggy)
    with pytest.raises(RuntimeError, match="bug in the hook"):
        await bounded(session.run())  # a bug is not retried forever


async def test_publish_now_needs_a_connection(broker):
    session = MqttSession(settings(broker.port), [])
    with pytest.raises(BrokerError):
        await session.publish_now("a/b", b"x")


async def test_close_sends_the_outbox_and_final_message_then_disconnects_cleanly(broker):
    base = unique("close")
    status = f"{base}/status"
    will = Will(status, b"will", qos=1, retain=False)
    session = MqttSession(settings(broker.port, will=will), [])
    async with peer(broker.port, status) as observer, running(session) as task:
        await bounded(session.wait_connected())
        session.publish(status, b"last regular")
        await bounded(session.close(Message(status, b"down", retain=True), timeout=WAIT))
        await bounded(task)  # run() returned normally
        assert session.state is SessionState.CLOSED and not session.connected
        session.publish(status, b"after close")  # dropped (logged), does not raise
        assert session.outbox_size == 0
        await observer.publish(status, b"sentinel", qos=1)
        payloads = await receive_until(observer, b"sentinel")
    assert payloads == [b"last regular", b"down", b"sentinel"]  # no will: clean disconnect
    async with peer(broker.port, status) as late:
        [retained] = await receive(late, 1)
    assert (retained.payload, retained.retain) == (b"down", True)
    await bounded(session.run())  # a closed session does not connect again


async def test_close_is_bounded_when_the_broker_is_away(broker):
    await asyncio.to_thread(broker.kill)
    session = MqttSession(settings(broker.port), [])
    session.publish(unique("never"), b"x")
    async with running(session) as task:
        assert not await session.flush(0.2)  # meanwhile run() tries and backs off
        loop = asyncio.get_running_loop()
        started = loop.time()
        await bounded(session.close(timeout=0.3))
        assert loop.time() - started < 0.3 + 1.5
        await bounded(task)
    assert session.state is SessionState.CLOSED
    with pytest.raises(BrokerError):
        await bounded(session.wait_connected())


async def test_run_twice_at_once_is_refused(broker):
    session = MqttSession(settings(broker.port), [])
    async with running(session):
        await bounded(session.wait_connected())
        with pytest.raises(RuntimeError):
            await bounded(session.run())
        assert session.connected


async def test_refused_credentials_are_fatal(tmp_path):
    passwords = tmp_path / "passwords"
    maker = await asyncio.create_subprocess_exec(
        "mosquitto_passwd", "-b", "-c", str(passwords), "alice", "secret"
    )
    assert await bounded(maker.wait()) == 0
    options = f"allow_anonymous false\npassword_file {passwords}\n"
    async with private_mosquitto(tmp_path, options) as port:
        for username, password in ((None, None), ("alice", "wrong"), ("mallory", "secret")):
            session = MqttSession(
                settings(port, username=username, password=password), ["x/#"]
            )
            with pytest.raises(BrokerAuthError):
                await bounded(session.run(), 5.0)  # at once, not after retrying forever
            with pytest.raises(BrokerError):
                await bounded(session.wait_connected())
        topic = unique("auth")
        session = MqttSession(settings(port, username="alice", password="secret"), [topic])
        async with running(session):
            session.publish(topic, b"accepted")
            assert await next_message(session) == Message(topic, b"accepted")


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    directory = tmp_path_factory.mktemp("tls")
    files = {name: directory / name for name in ("ca.pem", "ca.key")}

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=directory)

    ec_key = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    openssl("req", "-x509", *ec_key, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=test-ca")
    (directory / "server.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name in ("server", "client"):
        openssl("req", *ec_key, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN={name}")
        extension = ("-extfile", "server.ext") if name == "server" else ()
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", *extension)
        files[f"{name}.pem"] = directory / f"{name}.pem"
        files[f"{name}.key"] = directory / f"{name}.key"
    return files


async def test_tls_with_a_client_certificate(tmp_path, tls_files):
    options = (
        f"cafile {tls_files['ca.pem']}\ncertfile {tls_files['server.pem']}\n"
        f"keyfile {tls_files['server.key']}\nrequire_certificate true\nallow_anonymous true\n"
    )
    auth = MqttAuth(
        ca_file=tls_files["ca.pem"],
        cert_file=tls_files["client.pem"],
        key_file=tls_files["client.key"],
    )
    topic = unique("tls")
    async with private_mosquitto(tmp_path, options) as port:
        session = MqttSession(settings(port, auth=auth), [topic])
        async with running(session):
            session.publish(topic, b"over tls")
            assert await next_message(session) == Message(topic, b"over tls")


@pytest.mark.parametrize(
    "auth_files",
    [
        {"ca_file": "missing.pem"},
        {"ca_file": "garbage.pem"},
        {"ca_file": "ca.pem", "cert_file": "garbage.pem"},
        {"ca_file": "ca.pem", "key_file": "client.key"},  # a key without a certificate
    ],
)
async def test_unusable_tls_files_are_a_config_error(tmp_path, tls_files, unused_port, auth_files):
    (tmp_path / "garbage.pem").write_text("-----BEGIN CERTIFICATE-----\nnonsense\n")
    known = {path.name: path for path in tls_files.values()}
    auth = MqttAuth(**{key: known.get(name, tmp_path / name) for key, name in auth_files.items()})
    session = MqttSession(settings(unused_port, auth=auth), [])
    with pytest.raises(ConfigError):
        await bounded(session.run(), 5.0)



# --- delivery receipts, refused messages, lost broker state (issue 12) ---------------------


class Receipts:
    """`when_done` callbacks, recorded in call order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bool]] = []
        self._changed = asyncio.Event()

    def for_(self, name: str) -> Callable[[bool], None]:
        def done(acknowledged: bool) -> None:
            self.calls.append((name, acknowledged))
            self._changed.set()

        return done

    async def wait_for(self, count: int) -> None:
        async with asyncio.timeout(WAIT):
            while len(self.calls) < count:
                self._changed.clear()
                await self._changed.wait()


async def test_when_done_reports_each_acknowledgement_in_order(broker):
    topic = unique("receipts")
    receipts = Receipts()
    session = MqttSession(settings(broker.port), [])
    for index in range(100):
        session.publish(topic, str(index), when_done=receipts.for_(str(index)))
    assert receipts.calls == []  # nothing is acknowledged before the broker saw it
    async with running(session):
        await receipts.wait_for(100)
    assert receipts.calls == [(str(index), True) for index in range(100)]


async def test_when_done_is_not_called_for_a_message_still_waiting_at_close(broker):
    await asyncio.to_thread(broker.kill)
    receipts = Receipts()
    session = MqttSession(settings(broker.port), [])
    session.publish(unique("never"), b"x", when_done=receipts.for_("x"))
    async with running(session):
        await bounded(session.close(timeout=0.2))
    assert receipts.calls == []  # the owner keeps what it still owes, for its next start


async def test_a_message_the_broker_refuses_is_set_aside_and_the_others_flow(tmp_path, caplog):
    # Mosquitto drops the connection of a client whose packet is over max_packet_size; our
    # checks cannot know a broker's setting, so the session must find out by itself.
    topic = unique("refused")
    receipts = Receipts()
    options = "allow_anonymous true\nmax_packet_size 2000\n"
    async with private_mosquitto(tmp_path, options) as port, peer(port, topic) as observer:
        session = MqttSession(settings(port, refusal_strikes=3), [])
        session.publish(topic, b"before", when_done=receipts.for_("before"))
        session.publish(topic, b"x" * 5000, when_done=receipts.for_("too big"))
        session.publish(topic, b"after", when_done=receipts.for_("after"))
        with caplog.at_level("ERROR", logger="tedge_firmware.shell.mqtt"):
            async with running(session):
                await receipts.wait_for(3)
                assert await session.flush(WAIT)
        payloads = await receive_distinct(observer, 2)
    assert ("too big", False) in receipts.calls
    assert [call for call in receipts.calls if call[1]] == [("before", True), ("after", True)]
    assert first_occurrences(payloads) == [b"before", b"after"]
    refusals = [r for r in caplog.records if "set aside" in r.getMessage()]
    assert len(refusals) == 1 and "5000 bytes" in refusals[0].getMessage()


async def test_a_message_in_flight_during_broker_restarts_is_not_set_aside(broker):
    # Lost connections while a message waits for its acknowledgement are bad luck, not a
    # refusal, when the broker did not answer (a frozen link): the message must get through.
    topic = unique("unlucky")
    receipts = Receipts()
    async with LinkProxy(broker.port) as proxy, peer(broker.port, topic) as observer:
        session = MqttSession(settings(proxy.port, timeout=0.3, refusal_strikes=2), [])
        async with running(session):
            await bounded(session.wait_connected())
            for _ in range(3):
                proxy.freeze()
                session.publish(topic, b"m", when_done=receipts.for_("m"))
                await asyncio.sleep(0.5)  # longer than the acknowledgement timeout, frozen
                proxy.cut()
                proxy.thaw()
                await receipts.wait_for(len(receipts.calls) + 1)
        payloads = await receive(observer, 1)
    assert receipts.calls == [("m", True)] * 3
    assert payloads[0].payload == b"m"


async def test_session_present_tells_a_broker_that_lost_our_session(broker):
    broker = await persisting(broker)
    connects = Connects()
    session = MqttSession(settings(broker.port, unique("present")), [unique("t")], on_connect=connects)
    seen: list[tuple[int, bool]] = []

    async def note() -> None:
        seen.append((session.connections, session.session_present))

    connects.also = note
    async with running(session):
        await connects.wait_for(1)
        await asyncio.to_thread(broker.kill)  # SIGKILL before any save: the session is gone
        await asyncio.to_thread(broker.start)
        await connects.wait_for(2)
        await asyncio.to_thread(broker.stop)  # graceful: mosquitto saves the session
        await asyncio.to_thread(broker.start)
        await connects.wait_for(3)
    assert seen == [(1, False), (2, False), (3, True)]


async def test_reconnects_quickly_after_each_of_many_short_outages(broker):
    # The backoff starts again after every successful connect: a run of short outages must
    # not add up to long ones (before, a link that held less than backoff_max kept the count).
    connects = Connects()
    session = MqttSession(settings(broker.port, backoff_initial=0.2, backoff_max=10.0), [], on_connect=connects)
    loop = asyncio.get_running_loop()
    gaps = []
    async with running(session):
        await connects.wait_for(1)
        for outage in range(2, 7):
            await asyncio.to_thread(broker.kill)
            await asyncio.sleep(0.6)  # an outage: several attempts fail meanwhile
            await asyncio.to_thread(broker.start)
            back = loop.time()
            await connects.wait_for(outage)
            gaps.append(loop.time() - back)
    # the ceiling after 0.6 s of failures is 0.8-1.6 s; without the reset it grows to 10 s
    assert max(gaps) < 2.5, gaps


async def test_timeouts_in_flight_leave_no_task_exception_unretrieved(broker):
    import gc

    reported: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    try:
        topic = unique("frozen")
        async with LinkProxy(broker.port) as proxy:
            session = MqttSession(settings(proxy.port, timeout=0.3), [])
            async with running(session):
                await bounded(session.wait_connected())
                proxy.freeze()  # every publish in flight times out
                for index in range(50):
                    session.publish(topic, str(index))
                await asyncio.sleep(0.6)
                proxy.cut()
                proxy.thaw()
                assert await session.flush(WAIT)
        gc.collect()
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(previous)
    assert [c.get("message") for c in reported] == []


async def test_a_broker_that_dies_while_we_close_leaves_no_exception_unretrieved(broker):
    import gc

    reported: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    try:
        for _ in range(5):  # the race is between paho's disconnect callback and our exit
            session = MqttSession(settings(broker.port), [unique("t")])
            async with running(session):
                await bounded(session.wait_connected())
                closing = asyncio.create_task(session.close(timeout=0.5))
                await asyncio.sleep(0)
                await asyncio.to_thread(broker.kill)
                await bounded(closing)
            await asyncio.to_thread(broker.start)
            del session
            gc.collect()
            await asyncio.sleep(0.05)
    finally:
        loop.set_exception_handler(None)
    assert [c.get("message") for c in reported] == []
