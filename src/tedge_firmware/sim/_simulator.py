"""`C8ySimulator`: the tenant model, its MQTT side and its HTTP side, in one object.

Everything runs on the caller's event loop: messages from the broker are applied to the model
as they arrive, and every change wakes the `wait_*` methods (no polling).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TypeVar

from tedge_firmware.core import topics
from tedge_firmware.core.config import MqttAuth
from tedge_firmware.errors import SimulatorError
from tedge_firmware.shell.mqtt import Message, MqttSettings
from tedge_firmware.sim._cloud import DEFAULT_CLIENT_ID, CloudLink
from tedge_firmware.sim._control import control_routes
from tedge_firmware.sim._files import BinaryServer, FileFaults, FileStats
from tedge_firmware.sim._model import (
    FIRMWARE,
    BulkOperation,
    BulkProgress,
    Device,
    Operation,
    OperationStatus,
    Tenant,
    Violation,
)

log = logging.getLogger("tedge_firmware.sim")

T = TypeVar("T")
DEFAULT_GATEWAY_ID = "tedge-gateway"
DEFAULT_TIMEOUT = 10.0


@dataclass(frozen=True)
class SimStats:
    """What the simulator served: JWT answers and, per file, HTTP requests and bytes."""

    jwt_requests: int
    files: dict[str, FileStats] = field(default_factory=dict)

    @property
    def bytes_served(self) -> int:
        return sum(stats.bytes_served for stats in self.files.values())

    def to_json(self) -> dict[str, object]:
        return {
            "jwt_requests": self.jwt_requests,
            "bytes_served": self.bytes_served,
            "files": {
                name: {
                    "requests": stats.requests,
                    "bytes_served": stats.bytes_served,
                    "statuses": list(stats.statuses),
                    "complete": stats.complete,
                }
                for name, stats in self.files.items()
            },
        }


def make_token() -> str:
    """A fresh JWT-shaped token (three base64url parts); only the simulator checks it."""

    def part(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header = json.dumps({"alg": "HS256", "typ": "JWT"}).encode()
    claims = json.dumps({"sub": "c8y-sim", "jti": secrets.token_hex(8)}).encode()
    return ".".join([part(header), part(claims), part(secrets.token_bytes(32))])


class C8ySimulator:
    """A Cumulocity tenant on the local broker, for tests, demos and manual trials.

    `start()` serves binaries over HTTP and connects to the broker; then create operations
    and watch them: `operations`, `inventory`, `errors` (what Cumulocity would refuse), `stats`.
    """

    def __init__(
        self,
        *,
        mqtt_host: str = "127.0.0.1",
        mqtt_port: int = 1883,
        mqtt_auth: MqttAuth | None = None,
        client_id: str = DEFAULT_CLIENT_ID,
        clean_session: bool = True,
        gateway_id: str = DEFAULT_GATEWAY_ID,
        http_host: str = "127.0.0.1",
        http_port: int = 0,
        public_host: str | None = None,
        files_dir: Path | None = None,
        require_token: bool = False,
        token: str | None = None,
        answer_jwt: bool = True,
        control_api: bool = True,
        json_operations: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`json_operations`: deliver each operation in its JSON form too, as Cumulocity does
        (c8y/devicecontrol/notifications), and take statuses by id (504/505/506)."""
        self._tenant = Tenant(gateway_id, clock=clock, json_operations=json_operations)
        self.token = token or make_token()
        self.answer_jwt = answer_jwt  # False: JWT requests get no answer (the gateway times out)
        self._jwt_requests = 0
        self._files = BinaryServer(
            host=http_host,
            port=http_port,
            public_host=public_host,
            files_dir=files_dir,
            token=(lambda: self.token) if require_token else None,
            extra_routes=control_routes(self) if control_api else (),
        )
        # A fresh tenant by default: a persistent session would hand a new simulator the
        # statuses meant for the previous one.
        settings = MqttSettings(
            host=mqtt_host,
            port=mqtt_port,
            client_id=client_id,
            clean_session=clean_session,
            auth=mqtt_auth,
        )
        self._link = CloudLink(settings, self._on_message)
        self._change = asyncio.Event()
        self._bulk_tasks: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()
        self._violations_logged = 0

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self, *, connect_timeout: float | None = DEFAULT_TIMEOUT) -> None:
        """Serve HTTP and connect to the broker (waiting up to `connect_timeout`; None: not).

        ConfigError when the HTTP address cannot be bound, BrokerError when the broker is not
        reachable in time.
        """
        self._stopping.clear()
        await self._files.start()
        try:
            await self._link.start(connect_timeout)
        except BaseException:
            await self._files.stop()
            raise

    async def stop(self) -> None:
        """Stop creating operations, flush the MQTT outbox (bounded), stop serving."""
        self._stopping.set()
        for task in list(self._bulk_tasks):
            task.cancel()
        await asyncio.gather(*self._bulk_tasks, return_exceptions=True)
        await self._link.stop()
        await self._files.stop()

    async def __aenter__(self) -> C8ySimulator:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def connected(self) -> bool:
        """True while connected to the broker."""
        return self._link.connected

    @property
    def broker_address(self) -> str:
        return self._link.address

    # --- binaries --------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """`http://host:port` of the HTTP side (after start())."""
        return self._files.base_url

    def add_file(
        self,
        name: str,
        content: bytes | str | os.PathLike[str],
        *,
        faults: FileFaults | None = None,
        cache_control: str | None = None,
    ) -> str:
        """Serve `content` (bytes, or the path of a file) as `name`; returns its URL. Adding a
        name again changes the file behind the same URL (as a tenant updating a binary does).
        `cache_control`: the `Cache-Control` header the binary is served with.

        ValueError for a name that is not one safe path segment; RuntimeError before start().
        """
        source = content if isinstance(content, bytes) else Path(content)
        return self._files.add(name, source, faults, cache_control)

    def has_file(self, name: str) -> bool:
        return name in self._files.stats()

    def set_faults(self, name: str, faults: FileFaults) -> None:
        """Replace a file's faults; their counts start again."""
        self._files.set_faults(name, faults)

    def hold_file(self, name: str) -> asyncio.Event:
        """Requests for binary `name` wait, counted but unanswered, until the event is set."""
        return self._files.hold(name)

    def file_url(self, name: str) -> str:
        return self._files.url(name)

    # --- the tenant ------------------------------------------------------------------------

    @property
    def gateway_id(self) -> str:
        return self._tenant.gateway_id

    @property
    def operations(self) -> list[Operation]:
        """Every operation, oldest first."""
        return self._tenant.operations

    def operation(self, op_id: str) -> Operation:
        """KeyError for an unknown id."""
        return self._tenant.operation(op_id)

    @property
    def inventory(self) -> dict[str, Device]:
        """Every device by external id, the gateway included."""
        return self._tenant.devices

    def device(self, device_id: str) -> Device | None:
        return self._tenant.device(device_id)

    def operations_of(self, device_id: str) -> list[Operation]:
        """The device's operations, oldest first."""
        return self._tenant.operations_of(device_id)

    @property
    def errors(self) -> list[Violation]:
        """Everything Cumulocity would have refused, in order."""
        return self._tenant.violations

    @property
    def ignored(self) -> list[tuple[str, str]]:
        """(device, record) of upstream records the simulator does not judge."""
        return self._tenant.ignored

    @property
    def bulks(self) -> list[BulkOperation]:
        return self._tenant.bulks

    def bulk_progress(self, bulk_id: str) -> BulkProgress:
        return self._tenant.bulk_progress(bulk_id)

    @property
    def stats(self) -> SimStats:
        return SimStats(jwt_requests=self._jwt_requests, files=self._files.stats())

    @property
    def changes(self) -> int:
        """Grows with every change of the tenant or the JWT count (for live views)."""
        return self._tenant.changes + self._jwt_requests

    def add_device(
        self,
        device_id: str,
        *,
        operations: Iterable[str] = (FIRMWARE,),
        parent: str | None = None,
    ) -> Device:
        """Put a child into the inventory as if its `101` and `114` had come (no gateway needed)."""
        device = self._tenant.add_device(device_id, parent=parent, operations=operations)
        self._notify()
        return device

    def create_firmware_operation(self, child: str, name: str, version: str, url: str) -> Operation:
        """Create a c8y_Firmware operation and deliver it (`515` on `c8y/s/ds`).

        SimulatorError (also recorded in `errors`) when the device is unknown or did not
        declare c8y_Firmware.
        """
        try:
            operation = self._tenant.create_firmware_operation(child, name, version, url)
        finally:
            self._notify()
        self._deliver(operation)
        log.info("c8y-sim: operation %s: %s %s for %s", operation.id, name, version, child)
        return self._tenant.operation(operation.id)

    def bulk_firmware_operation(
        self,
        children: Iterable[str],
        name: str,
        version: str,
        url: str,
        *,
        ramp_seconds: float = 0.0,
    ) -> BulkOperation:
        """A bulk c8y_Firmware operation: one operation per child, `ramp_seconds` apart.

        Returns at once; the operations are created in the background. Children that cannot
        take the operation are refused (and recorded in `errors`), the others go ahead.
        """
        bulk = self._tenant.new_bulk(children, name, version, url, ramp_seconds)
        task = asyncio.create_task(self._run_bulk(bulk), name=f"c8y-sim {bulk.id}")
        self._bulk_tasks.add(task)
        task.add_done_callback(self._bulk_tasks.discard)
        self._notify()
        log.info("c8y-sim: %s: %d device(s), ramp %g s", bulk.id, len(bulk.devices), ramp_seconds)
        return bulk

    async def _run_bulk(self, bulk: BulkOperation) -> None:
        for index, device in enumerate(bulk.devices):
            if index and bulk.ramp_seconds > 0 and not await self._ramp(bulk.ramp_seconds):
                return
            operation = self._tenant.create_bulk_member(bulk.id, device)
            if operation is not None:
                self._deliver(operation)
            self._notify()

    async def _ramp(self, seconds: float) -> bool:
        """The creation ramp between two operations; False when the simulator stops."""
        try:
            async with asyncio.timeout(seconds):
                await self._stopping.wait()
        except TimeoutError:
            return True
        return False

    def _deliver(self, operation: Operation) -> None:
        for request in self._tenant.deliver(operation):
            self._link.publish(request.topic, request.payload)
        self._notify()

    # --- waiting ---------------------------------------------------------------------------

    async def wait_until(
        self,
        predicate: Callable[[], T | None],
        timeout: float = DEFAULT_TIMEOUT,  # noqa: ASYNC109 (waits are bounded for the caller)
    ) -> T:
        """Wait until `predicate()` returns something else than None (or False); return it.

        Re-evaluated after every change, never polled. TimeoutError after `timeout` seconds.
        """
        async with asyncio.timeout(timeout):
            while True:
                change = self._change
                result = predicate()
                if result is not None and result is not False:
                    return result
                await change.wait()

    async def wait_for(
        self,
        op_id: str,
        state: OperationStatus | str = OperationStatus.SUCCESSFUL,
        timeout: float = DEFAULT_TIMEOUT,  # noqa: ASYNC109 (the agreed interface)
    ) -> Operation:
        """Wait until operation `op_id` is in `state`; return it.

        SimulatorError as soon as it ended in another state (it cannot change any more),
        TimeoutError (naming its state) after `timeout` seconds, KeyError for an unknown id.
        """
        wanted = OperationStatus(state)

        def reached() -> Operation | None:
            operation = self._tenant.operation(op_id)
            if operation.status is wanted:
                return operation
            if operation.status.final:
                reason = f" ({operation.failure_reason!r})" if operation.failure_reason else ""
                raise SimulatorError(
                    f"operation {op_id} ended {operation.status.value}{reason}, not {wanted.value}"
                )
            return None

        try:
            return await self.wait_until(reached, timeout)
        except TimeoutError:
            current = self._tenant.operation(op_id).status.value
            raise TimeoutError(
                f"operation {op_id} is {current} after {timeout:g} s, not {wanted.value}"
            ) from None

    async def wait_finished(
        self,
        op_id: str,
        timeout: float = DEFAULT_TIMEOUT,  # noqa: ASYNC109
    ) -> Operation:
        """Wait until operation `op_id` is SUCCESSFUL or FAILED; return it."""

        def finished() -> Operation | None:
            operation = self._tenant.operation(op_id)
            return operation if operation.status.final else None

        return await self.wait_until(finished, timeout)

    async def wait_for_device(
        self,
        device_id: str,
        operation: str | None = FIRMWARE,
        timeout: float = DEFAULT_TIMEOUT,  # noqa: ASYNC109
    ) -> Device:
        """Wait until `device_id` is in the inventory (and supports `operation`, if given)."""

        def registered() -> Device | None:
            device = self._tenant.device(device_id)
            if device is None or (operation is not None and not device.supports(operation)):
                return None
            return device

        return await self.wait_until(registered, timeout)

    async def wait_for_bulk(
        self,
        bulk_id: str,
        timeout: float = DEFAULT_TIMEOUT,  # noqa: ASYNC109
    ) -> BulkProgress:
        """Wait until every operation of the bulk operation was created and has finished."""

        def done() -> BulkProgress | None:
            progress = self._tenant.bulk_progress(bulk_id)
            return progress if progress.done else None

        return await self.wait_until(done, timeout)

    # --- MQTT ------------------------------------------------------------------------------

    def _on_message(self, message: Message) -> None:
        log.debug("c8y-sim: <- %s %r", message.topic, message.payload[:200])
        if message.topic == topics.C8Y_JWT_REQUEST:
            self._jwt_requests += 1
            if self.answer_jwt:
                self._link.publish(topics.C8Y_JWT_RESPONSE, f"71,{self.token}")
        else:
            for answer in self._tenant.handle_upstream(message.topic, message.payload):
                self._link.publish(answer.topic, answer.payload)
        self._notify()

    def _notify(self) -> None:
        violations = self._tenant.violations
        for violation in violations[self._violations_logged :]:
            log.warning("c8y-sim: Cumulocity would refuse this: %s", violation)
        self._violations_logged = len(violations)
        change, self._change = self._change, asyncio.Event()
        change.set()
