"""Child registration as a service: operations files → `101`/`114` to Cumulocity, and the
network API that lets a child declare its operations over MQTT.

Part of `tedge-firmware run`, or alone as `tedge-firmware registration` (for gateways that run
thin-edge's agent but not its mapper). It has its own persistent MQTT session (client id
`tedge-firmware-registration`), so it neither depends on nor disturbs the plugin's.

One loop consumes one queue of inputs: an MQTT message (the cloud's `106`, or a declaration on
`te/device/<child>///cmd/<command>`), a request to look at the operations directory again
(from the watcher, or shortly after a declaration changed a file), and the end of the wait for
the `106`. Decisions are `core.registration.Registrar`'s; this module only executes them. A
declaration only creates or removes the operation file: the next look at the directory sends
what a person's change would, so files and network stay one truth.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from tedge_firmware.core import topics
from tedge_firmware.core.config import TedgeConfig
from tedge_firmware.core.registration import (
    DECLARATION_FILTER,
    Declaration,
    Phase,
    Publish,
    Registrar,
    Snapshot,
    cloud_child_list,
    parse_declaration,
)
from tedge_firmware.errors import BrokerError, ConfigError, InputError, StoreError
from tedge_firmware.gateway.lifecycle import cancel_tasks, until_stopped
from tedge_firmware.shell.config_file import resolve_device_id
from tedge_firmware.shell.log_limits import LogLimiter
from tedge_firmware.shell.mqtt import Message, MqttSession, MqttSettings
from tedge_firmware.shell.ops_watch import OperationsDirectory, OperationsWatcher

log = logging.getLogger(__name__)

REGISTRATION_CLIENT_ID = "tedge-firmware-registration"
SUBSCRIPTIONS = (topics.C8Y_DOWNSTREAM, DECLARATION_FILTER)
_CLOSE_TIMEOUT = 2.0
_WATCH_READY_TIMEOUT = 5.0  # then the periodic look catches what the watch did not
_INPUTS_PER_TURN = 32


@dataclass(frozen=True)
class RegistrationOptions:
    """Knobs of the service; the defaults are what a gateway wants."""

    client_id: str = REGISTRATION_CLIENT_ID
    cloud_list_timeout: float | None = None  # None: firmware.registration.cloud_list_timeout
    force_polling: bool = False  # True: poll even where file-system notifications work
    poll_delay_ms: int = 300
    resync: float = 10.0  # seconds between full looks at the directory when nothing happens
    declaration_delay: float = 0.1  # declarations within this time give one look (one 114)


@dataclass(frozen=True)
class _Rescan:
    """Look at the operations directory again."""


@dataclass(frozen=True)
class _CloudSilent:
    """No 106 came in time."""


_Input = Message | _Rescan | _CloudSilent


class ChildRegistration:
    """The loop of the service; see the module docstring."""

    def __init__(
        self,
        session: MqttSession,
        directory: OperationsDirectory,
        watcher: OperationsWatcher,
        cloud_list_timeout: float,
        declaration_delay: float,
    ) -> None:
        self.session = session
        self.directory = directory
        self.watcher = watcher
        self.registrar = Registrar(directory.main_device_id)
        self._cloud_list_timeout = cloud_list_timeout
        self._declaration_delay = declaration_delay
        self._inputs: asyncio.Queue[_Input] = asyncio.Queue()
        self._rescan_soon: asyncio.Task[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._peer_errors = LogLimiter(log)

    async def run(self) -> None:
        """Register, then follow changes until cancelled."""
        self._tasks = [
            asyncio.create_task(self._pump(), name="registration-mqtt-pump"),
            asyncio.create_task(self._watch(), name="registration-watcher"),
        ]
        try:
            # The first look comes after the watch is in place, so no change falls between.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_WATCH_READY_TIMEOUT):
                    await self.watcher.ready.wait()
            self._send(self.registrar.start(await self._scan()))
            if self.registrar.phase is Phase.WAITING_FOR_CLOUD:
                timer = asyncio.create_task(self._cloud_timer(), name="registration-106")
                self._tasks.append(timer)
            await self._loop()
        finally:
            self.watcher.close()
            await cancel_tasks([*self._tasks, *([self._rescan_soon] if self._rescan_soon else [])])
            self._peer_errors.flush()

    async def _loop(self) -> None:
        handled = 0
        while True:
            item = await self._inputs.get()
            handled += 1
            if handled % _INPUTS_PER_TURN == 0:
                await asyncio.sleep(0)  # a flood of bad declarations must not starve the rest
            match item:
                case Message():
                    await self._on_message(item)
                case _Rescan():
                    self._send(self.registrar.on_snapshot(await self._scan()))
                case _CloudSilent():
                    if self.registrar.phase is Phase.WAITING_FOR_CLOUD:
                        # usual without a cloud bridge (a local trial): news, not a problem
                        log.info(
                            "no list of children (106) from the cloud within %g s: "
                            "registering every local child",
                            self._cloud_list_timeout,
                        )
                    self._send(self.registrar.on_cloud_silent())

    async def _on_message(self, message: Message) -> None:
        if message.topic == topics.C8Y_DOWNSTREAM:
            registered = cloud_child_list(message.payload)
            if registered is not None:
                log.info("the cloud knows %d child device(s)", len(registered))
                self._send(self.registrar.on_cloud_list(registered))
            return
        try:
            declaration = parse_declaration(
                message.topic, message.payload, self.directory.main_device_id
            )
        except InputError as error:
            self._peer_errors.log(
                logging.WARNING,
                ("declaration", type(error).__name__),
                "ignored a declaration on %s: %s",
                _printable(message.topic),
                error,
            )
            return
        await self._apply(declaration)

    async def _apply(self, declaration: Declaration) -> None:
        change = self.directory.declare if declaration.supported else self.directory.withdraw
        child = "main device" if declaration.device is None else declaration.device
        try:
            changed = await asyncio.to_thread(change, declaration.device, declaration.operation)
        except StoreError as error:
            log.error("declaring %s for child=%s failed: %s", declaration.operation, child, error)
            return
        if changed:
            log.info(
                "%s %s for child=%s over MQTT",
                "declared" if declaration.supported else "withdrew",
                declaration.operation,
                child,
            )
            self._schedule_rescan()

    def _schedule_rescan(self) -> None:
        """One look shortly after a burst of declarations (not one per declaration)."""
        if self._rescan_soon is None or self._rescan_soon.done():
            self._rescan_soon = asyncio.create_task(self._rescan_later())

    async def _rescan_later(self) -> None:
        await asyncio.sleep(self._declaration_delay)
        self._inputs.put_nowait(_Rescan())

    async def _scan(self) -> Snapshot:
        return await asyncio.to_thread(self.directory.scan)

    def _send(self, messages: Sequence[Publish]) -> None:
        for message in messages:
            log.info("to %s: %s", message.topic, message.payload.rstrip("\n"))
            self.session.publish(message.topic, message.payload)

    async def _pump(self) -> None:
        while True:
            self._inputs.put_nowait(await self.session.messages.get())

    async def _watch(self) -> None:
        try:
            async with contextlib.aclosing(self.watcher.changes()) as ticks:
                async for _ in ticks:
                    self._inputs.put_nowait(_Rescan())
        except StoreError as error:
            # Neither notifications nor polling: a look every resync period still works.
            log.error("%s: looking at the directory every %g s", error, self.watcher.resync)
            while not self.watcher.closed:
                await asyncio.sleep(self.watcher.resync)
                self._inputs.put_nowait(_Rescan())

    async def _cloud_timer(self) -> None:
        """Count the wait for the 106 from the moment the 105 can actually go out."""
        try:
            await self.session.wait_connected()
        except BrokerError:
            return  # the session ended; serve_registration reports why
        await asyncio.sleep(self._cloud_list_timeout)
        self._inputs.put_nowait(_CloudSilent())


def _printable(text: str) -> str:
    return text.encode("unicode_escape", "backslashreplace").decode("ascii")[:300]


def main_device_id(config: TedgeConfig) -> str | None:
    """The main device's id when it can be known (registration works without it)."""
    try:
        return resolve_device_id(config)
    except ConfigError as error:
        log.info("main device id unknown (%s): directories are not checked against it", error)
        return None


async def serve_registration(
    config: TedgeConfig, stop: asyncio.Event, options: RegistrationOptions
) -> None:
    """Run child registration until `stop` is set; raises when it cannot go on (broker auth)."""
    directory = OperationsDirectory(config.c8y_operations_dir, main_device_id(config))
    watcher = OperationsWatcher(
        directory,
        force_polling=options.force_polling,
        poll_delay_ms=options.poll_delay_ms,
        resync=options.resync,
    )
    session = MqttSession(MqttSettings.from_tedge_config(config, options.client_id), SUBSCRIPTIONS)
    timeout = options.cloud_list_timeout
    service = ChildRegistration(
        session,
        directory,
        watcher,
        config.registration_cloud_list_timeout if timeout is None else timeout,
        options.declaration_delay,
    )
    log.info("child registration started: watching %s", directory.root)
    loop = asyncio.create_task(service.run(), name="registration-loop")
    tasks = [asyncio.create_task(session.run(), name="registration-mqtt-session"), loop]
    try:
        await until_stopped(stop, tasks)
    finally:
        watcher.close()  # before cancelling: the watching thread checks this flag
        try:
            await cancel_tasks([loop])  # nothing more to send, then deliver what was sent
            await session.close(timeout=_CLOSE_TIMEOUT)
        finally:  # even when cancelled meanwhile (the all-in-one's bounded shutdown)
            await cancel_tasks(tasks)
            log.info("child registration stopped")
