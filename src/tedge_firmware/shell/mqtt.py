"""MQTT session: one persistent connection to the local broker that survives broker restarts.

Built on aiomqtt 2.5 (paho-mqtt 2.x), which has no reconnect of its own. This module adds:

- a reconnect loop with capped exponential backoff and jitter. A CONNACK that refuses our
  credentials (bad user name or password, not authorised) is fatal: `BrokerAuthError`;
- the subscriptions (QoS 1) made again on every connect: a broker that crashed has lost
  our persistent session, and no client library subscribes again on its own;
- an outbox: `publish()` only enqueues and never fails because the broker is away. A sender
  delivers the outbox in order while connected; a message leaves it only when the broker
  acknowledged it (PUBACK for QoS 1), so a message cut off mid-way is sent again after the
  reconnect: at least once, in order. Whoever needs to know (an operation that must not end
  before its last status is safe with the broker) passes `when_done` and is told;
- a message the broker refuses never blocks the ones behind it. Topics are checked before
  they are queued, but a broker may still drop the connection on a message (Mosquitto does
  for a packet over its `max_packet_size`). So the messages in flight when a connection is
  lost are sent one at a time on the next connections; one that loses the connection within
  a second, alone, `refusal_strikes` times in a row, is set aside (logged; `when_done(False)`);
- the broker's memory of us: `session_present` says whether the last CONNACK found our
  session; `connections > 1` without it means the broker restarted and lost what it held
  for us (subscriptions are made again anyway; the owner re-sends what it needs);
- one queue of incoming messages (`MqttSession.messages`) for the whole life of the session.

Theory of operation. `run()` loops over connections. Each connection is a fresh
`aiomqtt.Client`: a reused client whose link the broker dropped does not wait for the next
CONNACK (its connected future is still done; measured with aiomqtt 2.5.1), so a refusal
would go unnoticed. On every connection: CONNECT (clean_session=False, will) → SUBSCRIBE →
the `on_connect` hook (which may `publish_now()` ahead of the outbox) → state CONNECTED →
the sender drains the outbox, up to `max_inflight` publishes in flight. A watcher ends the
connection as soon as aiomqtt reports the link lost, so no await hangs on a dead link. A
successful CONNACK resets the backoff, so a short outage costs about its own length.

States: IDLE → CONNECTING → CONNECTED → (link lost) BACKOFF → CONNECTING → ...;
`close()` → CLOSED.

aiomqtt and paho exceptions are mapped to `tedge_firmware.errors` here and nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import math
import socket
import ssl
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import aiomqtt
import paho.mqtt.client as mqtt
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from tedge_firmware.core import topics
from tedge_firmware.core.config import MqttAuth, TedgeConfig, format_host
from tedge_firmware.core.retry import reconnect_delay
from tedge_firmware.errors import BrokerAuthError, BrokerError, ConfigError
from tedge_firmware.shell.log_limits import LogLimiter

log = logging.getLogger(__name__)
T = TypeVar("T")

# CONNACK refusals that a retry will not fix: MQTT 3.1.1 return codes 4 (bad user name or
# password) and 5 (not authorised), and the reason codes paho 2.x reports them as (134, 135).
_AUTH_REFUSALS = frozenset({4, 5, 134, 135})
# MQTT's largest packet; topic length, topic and packet id take part of it.
_MAX_PACKET_BODY = 268_435_455
# close(): time left for a clean DISCONNECT even when flushing used the whole budget.
_STOP_GRACE = 1.0
# _cancel_all(): how long to wait before cancelling again a task that swallowed it.
_CANCEL_RETRY = 1.0
_OUTBOX_WARNING_START = 1_000
_DROP_LOG_EVERY = 1_000
# A broker that refuses a message drops the connection at once: a loss later than this after
# the message went out is not counted against it.
_REFUSAL_WINDOW_S = 1.0


@dataclass(frozen=True)
class Message:
    """One message received on a subscription (or the final message handed to `close()`)."""

    topic: str
    payload: bytes
    retain: bool = False


@dataclass(frozen=True)
class Will:
    """The last will the broker publishes when our connection ends without a DISCONNECT."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True)
class MqttSettings:
    """Everything needed to reach the broker. Invalid values raise ValueError at once."""

    host: str
    port: int
    client_id: str
    clean_session: bool = False
    auth: MqttAuth | None = None
    will: Will | None = None
    keepalive: int = 60
    backoff_initial: float = 0.2
    backoff_max: float = 10.0
    username: str | None = None
    password: str | None = None
    timeout: float = 10.0  # longest wait for a CONNACK, SUBACK or PUBACK
    outbox_limit: int = 100_000  # messages beyond it are dropped (and logged)
    max_inflight: int = 64  # QoS 1/2 publishes awaiting their acknowledgement at once
    refusal_strikes: int = 3  # lost connections, alone in flight, before a message is set aside

    def __post_init__(self) -> None:
        _check_text(self.host, "host")
        _check_text(self.client_id, "client_id")
        _require(1 <= self.port <= 65_535, f"port {self.port} is not in 1-65535")
        _require(0 <= self.keepalive <= 65_535, f"keepalive {self.keepalive} is not in 0-65535")
        _require(self.backoff_initial > 0, "backoff_initial must be positive")
        _require(self.backoff_max >= self.backoff_initial, "backoff_max < backoff_initial")
        _require(self.timeout > 0, "timeout must be positive")
        _require(self.outbox_limit >= 1, "outbox_limit must be at least 1")
        _require(1 <= self.max_inflight <= 65_535, "max_inflight is not in 1-65535")
        _require(self.refusal_strikes >= 1, "refusal_strikes must be at least 1")
        _require(
            self.password is None or self.username is not None,
            "MQTT 3.1.1 allows a password only with a user name",
        )
        if self.will is not None:
            check_topic_name(self.will.topic)
            _check_qos(self.will.qos)

    @property
    def address(self) -> str:
        """`host:port`, as used in log lines and error messages."""
        return f"{format_host(self.host)}:{self.port}"

    @classmethod
    def from_tedge_config(
        cls, config: TedgeConfig, client_id: str, *, will: Will | None = None
    ) -> MqttSettings:
        """Settings for the broker named by `mqtt.client.*` in tedge.toml."""
        return cls(
            host=config.mqtt_host,
            port=config.mqtt_port,
            client_id=client_id,
            auth=config.mqtt_auth,
            will=will,
        )


class SessionState(enum.Enum):
    """Where the session stands; `MqttSession.state`."""

    IDLE = "idle"  # run() is not running (not started yet, or cancelled)
    CONNECTING = "connecting"  # connect, CONNACK, SUBSCRIBE and the on_connect hook
    CONNECTED = "connected"  # ready: subscribed, hook done, outbox flowing
    BACKOFF = "backoff"  # the link failed; waiting before the next attempt
    CLOSED = "closed"  # close() was called; run() will not connect again


@dataclass(slots=True)
class _Outgoing:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    when_done: Callable[[bool], None] | None = None
    suspect: bool = False  # in flight when a connection was lost: sent alone from then on
    strikes: int = 0  # connections lost right after it was sent alone
    sent_at: float = 0.0  # loop time of the last time it went out


def check_topic_name(topic: str) -> None:
    """ValueError unless `topic` can be published to (no wildcards, not empty, UTF-8)."""
    _check_topic_text(topic)
    if "+" in topic or "#" in topic:
        raise ValueError(f"topic {topic!r} contains a wildcard; publish needs a topic name")


def check_topic_filter(topic_filter: str) -> None:
    """ValueError unless `topic_filter` is a valid subscription (`+` a whole level, `#` last)."""
    _check_topic_text(topic_filter)
    levels = topic_filter.split("/")
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != len(levels) - 1):
            raise ValueError(f"topic filter {topic_filter!r}: '#' must be the whole last level")
        if "+" in level and level != "+":
            raise ValueError(f"topic filter {topic_filter!r}: '+' must be a whole level")


def tls_context(auth: MqttAuth) -> ssl.SSLContext:
    """An SSL context that trusts `auth`'s CA and presents its client certificate, if any.

    Reads files (call it off the event loop). ConfigError when a file is unusable.
    """
    if auth.key_file is not None and auth.cert_file is None:
        raise ConfigError("mqtt.client.auth.key_file is set but mqtt.client.auth.cert_file is not")
    try:
        context = ssl.create_default_context(cafile=auth.ca_file, capath=auth.ca_dir)
        if auth.cert_file is not None:
            context.load_cert_chain(auth.cert_file, auth.key_file)
    except OSError as error:  # ssl.SSLError is an OSError too
        files = ", ".join(
            str(path)
            for path in (auth.ca_file, auth.ca_dir, auth.cert_file, auth.key_file)
            if path is not None
        )
        raise ConfigError(f"cannot use the MQTT TLS files ({files}): {error}") from error
    return context


class MqttSession:
    """A persistent MQTT session to one broker; see the module docstring.

    Incoming messages: `messages`, one `asyncio.Queue[Message]` for the session's lifetime
    (the consumer calls `get()`; nothing is dropped between reconnects).
    """

    def __init__(
        self,
        settings: MqttSettings,
        subscriptions: Sequence[str],
        *,
        on_connect: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        if isinstance(subscriptions, str):
            raise TypeError("subscriptions must be a sequence of topic filters, not one string")
        for topic_filter in subscriptions:
            check_topic_filter(topic_filter)
        self._settings = settings
        self._filters = tuple(dict.fromkeys(subscriptions))
        self._on_connect = on_connect
        self._messages: asyncio.Queue[Message] = asyncio.Queue()
        self._outbox: deque[_Outgoing] = deque()
        self._outbox_changed = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()
        self._ready = asyncio.Event()  # set while CONNECTED
        self._finished = asyncio.Event()  # set when run() has ended
        self._stopping = asyncio.Event()  # set by close()
        self._state = SessionState.IDLE
        self._client: aiomqtt.Client | None = None  # while the link is up
        self._loop_task: asyncio.Task[None] | None = None
        self._connected_at: float | None = None
        self._next_outbox_warning = _OUTBOX_WARNING_START
        self._dropped = 0
        self._in_flight = 0  # outbox entries (from the head) sent and not yet acknowledged
        self._connections = 0
        self._session_present = False
        self._failures_log = LogLimiter(log)

    # --- public interface -------------------------------------------------------------------

    @property
    def messages(self) -> asyncio.Queue[Message]:
        """Every message received on the subscriptions, in arrival order."""
        return self._messages

    @property
    def connected(self) -> bool:
        return self._state is SessionState.CONNECTED

    @property
    def state(self) -> SessionState:
        return self._state

    @property
    def outbox_size(self) -> int:
        """Messages published but not yet acknowledged by the broker."""
        return len(self._outbox)

    @property
    def connections(self) -> int:
        """Successful connects so far (the current one included)."""
        return self._connections

    @property
    def session_present(self) -> bool:
        """Whether the broker still had our session at the last connect (CONNACK flag).

        Read it in the `on_connect` hook: False with `connections > 1` means the broker lost
        our session (restarted without saving it) and with it what it held for us.
        """
        return self._session_present

    async def run(self) -> None:
        """Connect and keep connected until cancelled or `close()`.

        Raises BrokerAuthError when the broker refuses our credentials, ConfigError when the
        TLS files are unusable, RuntimeError when already running. May run again after it
        was cancelled; returns at once after `close()`. Cancelled, it disconnects cleanly (the
        broker keeps the session, the will is not sent); a connection attempt in flight is
        finished first (on loopback at once; at most paho's 5 s plus `timeout` otherwise).
        """
        if self._state is SessionState.CLOSED:
            self._finished.set()
            return
        if self._loop_task is not None:
            raise RuntimeError("MqttSession.run() is already running")
        self._finished.clear()
        task = asyncio.create_task(
            self._connection_loop(), name=f"mqtt-session {self._settings.client_id}"
        )
        self._loop_task = task
        try:
            await asyncio.wait((task,))  # unlike `await task`, leaves the stopping to us
        except asyncio.CancelledError:
            await asyncio.shield(_cancel_all((task,)))
            if task.done() and not task.cancelled():
                task.exception()  # retrieved (and dropped): the cancellation wins
            raise
        finally:
            self._loop_task = None
            self._set_state(SessionState.IDLE)  # close() moves on to CLOSED afterwards
            self._finished.set()
        if not task.cancelled():  # cancelled: close() ran out of time and stopped it, a normal end
            task.result()  # BrokerAuthError, ConfigError, or a bug in the on_connect hook

    def publish(
        self,
        topic: str,
        payload: bytes | str,
        *,
        qos: int = 1,
        retain: bool = False,
        when_done: Callable[[bool], None] | None = None,
    ) -> None:
        """Queue a message for the broker; it is sent as soon as (and whenever) connected.

        Never fails because the broker is away. ValueError/TypeError for a topic, payload or
        QoS that no broker would take (they would block the outbox otherwise).
        `when_done(True)` is called once the broker acknowledged the message, `when_done(False)`
        if it was set aside as refused by the broker; never when the message is still waiting
        as the session closes (or was dropped from a full outbox).
        """
        entry = _outgoing(topic, payload, qos, retain)
        entry.when_done = when_done
        if self._state is SessionState.CLOSED:
            log.warning("MQTT session is closed: dropped a message to %s", topic)
            return
        if len(self._outbox) >= self._settings.outbox_limit:
            self._drop(entry)
            return
        self._outbox.append(entry)
        self._drained.clear()
        self._outbox_changed.set()
        if len(self._outbox) >= self._next_outbox_warning:
            log.warning(
                "MQTT outbox holds %d messages waiting for the broker at %s",
                len(self._outbox),
                self._settings.address,
            )
            self._next_outbox_warning *= 10

    async def publish_now(
        self, topic: str, payload: bytes | str, *, qos: int = 1, retain: bool = False
    ) -> None:
        """Publish on the current connection at once, ahead of the outbox; wait for the ack.

        Meant for the `on_connect` hook (health "up", re-sends). BrokerError when not
        connected or when the link fails before the acknowledgement.
        """
        entry = _outgoing(topic, payload, qos, retain)
        client = self._client
        if client is None:
            raise BrokerError(f"not connected to the MQTT broker at {self._settings.address}")
        with _broker_errors(self._settings.address):
            await self._acknowledged(
                client.publish(
                    entry.topic, entry.payload, qos=entry.qos, retain=entry.retain, timeout=math.inf
                )
            )

    async def wait_connected(self) -> None:
        """Return once CONNECTED; BrokerError if run() ends first (closed, refused, cancelled).

        Before run() has started it simply waits; bound it with asyncio.timeout.
        """
        waiters = [
            asyncio.create_task(self._ready.wait()),
            asyncio.create_task(self._finished.wait()),
        ]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await _cancel_all(waiters)
        if not self._ready.is_set():
            raise BrokerError(f"MQTT session to {self._settings.address} is not running")

    async def flush(self, timeout: float) -> bool:  # noqa: ASYNC109 (the agreed interface)
        """Wait until the outbox is empty; False when `timeout` seconds pass first."""
        try:
            async with asyncio.timeout(timeout):
                await self._drained.wait()
        except TimeoutError:
            return False
        return True

    async def close(
        self,
        final: Message | None = None,
        timeout: float = 5.0,  # noqa: ASYNC109 (agreed API)
    ) -> None:
        """Flush the outbox (and then `final`, e.g. health "down"), then disconnect cleanly.

        Takes at most about `timeout` + 1 s; undelivered messages are logged and dropped.
        The clean DISCONNECT means the broker discards the will. run() then returns.
        """
        if self._state is SessionState.CLOSED:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if final is not None:
            self.publish(final.topic, final.payload, qos=1, retain=final.retain)
        if self._loop_task is not None:
            await self.flush(timeout)
        if self._outbox:
            log.warning(
                "closing the MQTT session with %d message(s) not delivered to %s",
                len(self._outbox),
                self._settings.address,
            )
        self._stopping.set()
        await self._wait_run_ended(max(deadline, loop.time() + _STOP_GRACE))
        self._set_state(SessionState.CLOSED)
        self._finished.set()  # wake wait_connected() callers: this session will not connect

    # --- connection loop --------------------------------------------------------------------

    async def _connection_loop(self) -> None:
        context = await self._load_tls()
        failures = 0
        while not self._stopping.is_set():
            self._set_state(SessionState.CONNECTING)
            self._connected_at = None
            try:
                await self._one_connection(context, failures)
            except BrokerAuthError:
                raise
            except BrokerError as error:
                reason = str(error)
                self._blame_in_flight(error)
            else:
                return  # stop requested; disconnected cleanly
            if self._stopping.is_set():
                return
            if self._connected_at is not None:
                failures = 0  # the broker is back: retry at once, whatever the last outage
            delay = reconnect_delay(
                failures, self._settings.backoff_initial, self._settings.backoff_max
            )
            self._log_failure(reason, delay, first=failures == 0)
            failures += 1
            self._set_state(SessionState.BACKOFF)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._stopping.wait()

    async def _one_connection(self, context: ssl.SSLContext | None, failures: int) -> None:
        """Connect, set up, serve: returns when stopped, raises BrokerError when the link ends."""
        client = self._new_client(context)
        with _broker_errors(self._settings.address):
            async with contextlib.AsyncExitStack() as stack:
                await _connect(stack, client)
                self._connected_at = asyncio.get_running_loop().time()
                self._connections += 1
                self._session_present = client.session_present
                self._client = client
                log.info(
                    "connected to the MQTT broker at %s as %s%s",
                    self._settings.address,
                    self._settings.client_id,
                    f" after {failures} failed attempt(s)" if failures else "",
                )
                try:
                    await self._serve(client)
                finally:
                    self._client = None
                    self._ready.clear()

    async def _serve(self, client: _Client) -> None:
        """Run set-up and sender until stop is requested (return) or the link fails (raise)."""
        watcher = asyncio.create_task(_watch_link(client), name="mqtt-link-watcher")
        worker = asyncio.create_task(self._set_up_and_send(client), name="mqtt-sender")
        stop = asyncio.create_task(self._stopping.wait(), name="mqtt-stop")
        try:
            done, _ = await asyncio.wait(
                (watcher, worker, stop), return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            await _cancel_all((watcher, worker, stop))
        for task in (watcher, worker):
            error = task.exception() if task in done and not task.cancelled() else None
            if error is not None:
                raise error

    async def _set_up_and_send(self, client: aiomqtt.Client) -> None:
        await self._subscribe(client)
        if self._on_connect is not None:
            await self._on_connect()
        self._set_state(SessionState.CONNECTED)
        self._ready.set()
        await self._send_outbox(client)

    async def _subscribe(self, client: aiomqtt.Client) -> None:
        if not self._filters:
            return
        granted: Sequence[int | ReasonCode] = await self._acknowledged(
            client.subscribe([(name, 1) for name in self._filters], timeout=math.inf)
        )
        for topic_filter, code in zip(self._filters, granted, strict=False):
            value = _code_value(code)
            if value >= 0x80:
                log.error("the broker refused the subscription to %s (%s)", topic_filter, value)
            elif value < 1:
                log.warning("the broker granted only QoS 0 for %s", topic_filter)

    async def _send_outbox(self, client: aiomqtt.Client) -> None:
        """Deliver the outbox head first, keeping up to `max_inflight` publishes in flight.

        paho writes packets in the order the publish calls start (tasks start in creation
        order), and an entry leaves the outbox only when its own publish completed.
        """
        window: deque[asyncio.Task[None]] = deque()
        try:
            while True:
                self._fill_window(client, window)
                self._in_flight = len(window)
                if not window:
                    self._outbox_changed.clear()
                    await self._outbox_changed.wait()
                    continue
                await window[0]
                window.popleft()
                self._in_flight = len(window)
                self._settle(self._outbox.popleft(), acknowledged=True)
        finally:
            await _cancel_all(window)

    def _fill_window(self, client: aiomqtt.Client, window: deque[asyncio.Task[None]]) -> None:
        # Suspects (in flight when a connection was lost) go out alone, so that a refusal
        # can be told apart from bad luck.
        suspect = bool(self._outbox) and self._outbox[0].suspect
        limit = 1 if suspect else self._settings.max_inflight
        now = asyncio.get_running_loop().time()
        while len(window) < min(limit, len(self._outbox)):
            entry = self._outbox[len(window)]
            entry.sent_at = now
            publish = client.publish(
                entry.topic, entry.payload, qos=entry.qos, retain=entry.retain, timeout=math.inf
            )
            window.append(asyncio.create_task(self._acknowledged(publish)))

    def _settle(self, entry: _Outgoing, *, acknowledged: bool) -> None:
        """`entry` has left the outbox: acknowledged, or set aside as refused."""
        if not self._outbox:
            self._drained.set()
            self._next_outbox_warning = _OUTBOX_WARNING_START
        if entry.when_done is None:
            return
        try:
            entry.when_done(acknowledged)
        except Exception:  # the owner's bug must not stop the sender
            log.exception("error in the delivery callback of a message to %s", entry.topic)

    def _blame_in_flight(self, error: BrokerError) -> None:
        """The connection was lost: count it against a message that was sent alone just
        before, and send every message that was in flight alone from now on."""
        count = min(self._in_flight, len(self._outbox))
        in_flight = [self._outbox[index] for index in range(count)]
        self._in_flight = 0
        if in_flight:
            # QoS 1 is at least once: the broker may have some of them already
            log.info(
                "%d message(s) were waiting for the broker's acknowledgement when the "
                "connection was lost: they go out again",
                len(in_flight),
            )
        timed_out = isinstance(error.__cause__, TimeoutError)  # no answer: not a refusal
        now = asyncio.get_running_loop().time()
        if len(in_flight) == 1 and in_flight[0].suspect and not timed_out:
            entry = in_flight[0]
            if now - entry.sent_at <= _REFUSAL_WINDOW_S:
                entry.strikes += 1
                if entry.strikes >= self._settings.refusal_strikes:
                    self._set_aside(entry)
                    return
            else:
                entry.strikes = 0
        for entry in in_flight:
            entry.suspect = True

    def _set_aside(self, entry: _Outgoing) -> None:
        log.error(
            "the MQTT broker at %s closed the connection %d times in a row right after a "
            "message to %s (%d bytes): it refuses that message, which is set aside "
            "(see the broker's log, e.g. max_packet_size)",
            self._settings.address,
            entry.strikes,
            entry.topic,
            len(entry.payload),
        )
        self._outbox.remove(entry)
        self._settle(entry, acknowledged=False)

    # --- helpers ----------------------------------------------------------------------------

    async def _acknowledged(self, call: Awaitable[T]) -> T:
        """Await an aiomqtt call bounded by our timeout.

        The call itself gets `timeout=math.inf`: aiomqtt then awaits plainly instead of using
        Python 3.11's asyncio.wait_for, which can swallow a cancellation that arrives together
        with the acknowledgement (and a swallowed cancellation hangs shutdown).
        """
        async with asyncio.timeout(self._settings.timeout):
            return await call

    def _new_client(self, context: ssl.SSLContext | None) -> _Client:
        settings = self._settings
        will = None
        if settings.will is not None:
            topic, payload, qos, retain = (
                settings.will.topic,
                settings.will.payload,
                settings.will.qos,
                settings.will.retain,
            )
            will = aiomqtt.Will(topic, payload, qos, retain)
        client = _Client(
            settings.host,
            settings.port,
            identifier=settings.client_id,
            clean_session=settings.clean_session,
            protocol=aiomqtt.ProtocolVersion.V311,
            username=settings.username,
            password=settings.password,
            will=will,
            keepalive=settings.keepalive,
            timeout=settings.timeout,
            tls_context=context,
            max_inflight_messages=settings.max_inflight,
            queue_type=_forwarding_queue(self._deliver),
            # a status right after an acknowledgement must not wait for a delayed ACK (~40 ms)
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
        )
        # We pipeline up to max_inflight publishes; aiomqtt warns above 10 pending calls.
        client.pending_calls_threshold = settings.max_inflight + len(self._filters) + 8
        return client

    def _deliver(self, incoming: aiomqtt.Message) -> None:
        """Runs inside paho's read callback, before paho acknowledges the message."""
        if not any(incoming.topic.matches(topic_filter) for topic_filter in self._filters):
            # Only a faulty broker does this (amqtt, the demo's fallback, hands a new client
            # retained messages of other clients' subscriptions); no consumer expects them.
            log.debug("ignored a message on %r: none of our subscriptions", incoming.topic.value)
            return
        try:
            message = Message(
                topic=incoming.topic.value,
                payload=_payload_bytes(incoming.payload),
                retain=bool(incoming.retain),
            )
        except Exception:  # raising into paho would drop the link and loop on redelivery
            log.exception("dropped an MQTT message that could not be converted")
            return
        self._messages.put_nowait(message)

    async def _load_tls(self) -> ssl.SSLContext | None:
        auth = self._settings.auth
        if auth is None or not auth.uses_tls:
            return None
        return await asyncio.to_thread(tls_context, auth)

    async def _wait_run_ended(self, deadline: float) -> None:
        task = self._loop_task
        if task is None:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(deadline):
                await self._finished.wait()
                return
        log.warning("MQTT session did not stop in time; cancelling it")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_STOP_GRACE):
                await _cancel_all((task,))
                await self._finished.wait()

    def _log_failure(self, reason: str, delay: float, *, first: bool) -> None:
        was_connected = self._connected_at is not None
        what = "lost the connection to" if was_connected else "cannot connect to"
        if not (first or was_connected):
            log.debug("%s the MQTT broker at %s: %s", what, self._settings.address, reason)
            return
        # a link that keeps dropping right after each connect is summed up, not repeated
        self._failures_log.log(
            logging.WARNING,
            what,
            "%s the MQTT broker at %s: %s; retrying in %.2f s",
            what,
            self._settings.address,
            reason,
            delay,
        )

    def _set_state(self, state: SessionState) -> None:
        if state is self._state:
            return
        log.debug("MQTT session %s: %s -> %s", self._settings.client_id, self._state, state)
        self._state = state
        if state is SessionState.CLOSED:
            log.info("MQTT session to %s closed", self._settings.address)

    def _drop(self, entry: _Outgoing) -> None:
        self._dropped += 1
        if self._dropped % _DROP_LOG_EVERY == 1:
            log.error(
                "MQTT outbox is full (%d messages): dropped a message to %s (%d dropped so far)",
                self._settings.outbox_limit,
                entry.topic,
                self._dropped,
            )


# --- module helpers -----------------------------------------------------------------------------


class _Client(aiomqtt.Client):
    """aiomqtt's client, keeping the CONNACK's session-present flag (aiomqtt 2.5 drops it)."""

    session_present = False

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None = None,
    ) -> None:
        self.session_present = bool(flags.session_present)
        super()._on_connect(client, userdata, flags, reason_code, properties)

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None = None,
    ) -> None:
        """aiomqtt sets the link's end as the outcome of a future that nobody awaits when the
        broker goes away while we are already leaving: retrieved here, so it is not reported
        as "never retrieved" (the watcher reports a lost link as a BrokerError)."""
        super()._on_disconnect(client, userdata, flags, reason_code, properties)
        if self._disconnected.done() and not self._disconnected.cancelled():
            self._disconnected.exception()

    def _on_socket_register_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        """aiomqtt asks the loop to watch the socket from a callback that runs later; by then
        paho may have closed it (the broker went away) and its number may belong to another
        file or socket of this process, whose watch it would take over. Watch only the socket
        paho still uses (same as aiomqtt otherwise)."""

        def write() -> None:
            try:
                client.loop_write()
            except Exception as exc:  # a broken link; the watcher ends the connection
                if not self._disconnected.done():
                    self._disconnected.set_exception(exc)

        def watch() -> None:
            current = client.socket()
            if current is not None and current is sock and current.fileno() != -1:
                self._loop.add_writer(current.fileno(), write)

        self._loop.call_soon_threadsafe(watch)


@contextlib.contextmanager
def _broker_errors(address: str) -> Iterator[None]:
    """The one place where aiomqtt/paho errors become tedge_firmware errors."""
    try:
        yield
    except MqttConnectError as error:
        if _code_value(error.rc) in _AUTH_REFUSALS:
            raise BrokerAuthError(f"the MQTT broker at {address} refused us: {error}") from error
        raise BrokerError(f"the MQTT broker at {address} refused to connect: {error}") from error
    except aiomqtt.MqttError as error:
        raise BrokerError(f"MQTT connection to {address}: {error}") from error
    except TimeoutError as error:  # from _acknowledged(): no SUBACK/PUBACK in time
        raise BrokerError(f"the MQTT broker at {address} did not acknowledge in time") from error
    except OSError as error:
        raise BrokerError(f"MQTT connection to {address}: {error}") from error


async def _connect(stack: contextlib.AsyncExitStack, client: aiomqtt.Client) -> None:
    """Enter `client` (connect, CONNACK) on `stack`; a cancellation waits for the attempt.

    aiomqtt does not clean up when its __aenter__ is cancelled: the connection stays open
    with our client id (measured with aiomqtt 2.5.1). So the attempt, bounded by paho's connect
    timeout (5 s) and our CONNACK timeout, always finishes; a cancellation is raised afterwards,
    and the stack then disconnects cleanly.
    """
    attempt = asyncio.ensure_future(stack.enter_async_context(client))
    cancellation: asyncio.CancelledError | None = None
    while not attempt.done():
        try:
            await asyncio.shield(attempt)
        except asyncio.CancelledError as error:
            cancellation = error
    if cancellation is not None:
        if not attempt.cancelled():
            attempt.exception()  # the cancellation wins over a failed attempt
        raise cancellation
    attempt.result()


async def _watch_link(client: aiomqtt.Client) -> None:
    """Raise MqttError when the link is lost.

    Our forwarding queue keeps aiomqtt's own queue empty, so this iterator yields nothing
    and only ends, loudly, on disconnect.
    """
    async for _ in client.messages:
        pass


def _forwarding_queue(
    deliver: Callable[[aiomqtt.Message], None],
) -> type[asyncio.Queue[aiomqtt.Message]]:
    """A queue class for aiomqtt's `queue_type` that hands every message to `deliver` at once.

    aiomqtt keeps a queue per Client and we use a Client per connection: messages left in a
    dropped client's queue would be lost although paho had acknowledged them.
    """

    class ForwardingQueue(asyncio.Queue[aiomqtt.Message]):
        def put_nowait(self, item: aiomqtt.Message) -> None:
            deliver(item)

    return ForwardingQueue


async def _cancel_all(tasks: Iterable[asyncio.Future[Any]]) -> None:
    """Cancel `tasks` and wait until all are done, cancelling again if one swallowed it.

    aiomqtt's CONNACK wait uses asyncio.wait_for, which on Python 3.11 loses a cancellation
    that arrives together with the result; the task then goes on to its next await. The
    exceptions of tasks that failed are retrieved (the caller reads them if it needs them), so
    that none is reported as "never retrieved".
    """
    tasks = list(tasks)
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=_CANCEL_RETRY)
    for task in tasks:
        if not task.cancelled():
            task.exception()


def _outgoing(topic: str, payload: bytes | str, qos: int, retain: bool) -> _Outgoing:
    check_topic_name(topic)
    _check_qos(qos)
    if isinstance(payload, str):
        data = payload.encode("utf-8")
    elif isinstance(payload, bytes | bytearray | memoryview):
        data = bytes(payload)
    else:
        raise TypeError(f"MQTT payload must be bytes or str, not {type(payload).__name__}")
    if len(data) + len(topic.encode("utf-8")) + 4 > _MAX_PACKET_BODY:
        raise ValueError(f"MQTT payload of {len(data)} bytes is larger than a packet can hold")
    return _Outgoing(topic, data, qos, bool(retain))


def _code_value(code: int | ReasonCode | None) -> int:
    if isinstance(code, ReasonCode):
        return int(code.value)
    return -1 if code is None else int(code)


def _payload_bytes(payload: object) -> bytes:
    if isinstance(payload, bytes | bytearray):
        return bytes(payload)
    if payload is None:
        return b""
    return str(payload).encode("utf-8")


def _check_topic_text(topic: object) -> None:
    if not isinstance(topic, str):
        raise TypeError(f"MQTT topic must be a str, not {type(topic).__name__}")
    if not topic:
        raise ValueError("MQTT topic must not be empty")
    problem = topics.mqtt_text_problem(topic)
    if problem is not None:
        raise ValueError(f"MQTT topic {problem}")


def _check_text(value: object, name: str) -> None:
    if not isinstance(value, str) or not value or "\0" in value:
        raise ValueError(f"{name} must be a non-empty string without NUL, got {value!r}")


def _check_qos(qos: object) -> None:
    if isinstance(qos, bool) or qos not in (0, 1, 2):
        raise ValueError(f"MQTT QoS must be 0, 1 or 2, got {qos!r}")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)
