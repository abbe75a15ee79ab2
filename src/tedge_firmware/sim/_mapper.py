"""A MODEL of thin-edge's Cumulocity mapper, its `firmware_update` part only, for tests and the
demo. It is not thin-edge: it does what docs/thin-edge-te.md records of the real mapper, so
that tedge-firmware's `te/` participant can be tried as it is deployed beside thin-edge 1.x/2.x
(`c8y-firmware-plugin` for legacy children, the mapper for `te/` ones) without thin-edge.

What it models:

- registration: a child's capability `te/device/<name>///cmd/firmware_update` `{}` →
  `101,<gateway>:device:<name>,<name>,thin-edge.io-child` and `114,c8y_Firmware`;
- a `c8y_Firmware` operation in JSON form (`c8y/devicecontrol/notifications`) for
  `<gateway>:device:<name>` → the retained command
  `te/device/<name>///cmd/firmware_update/c8y-mapper-<id>` in `init`, with `remoteUrl`,
  `tedgeUrl` (the URL itself: the model has no proxy), `name`, `version`; re-delivered ids are
  ignored;
- the command's `executing` → `504,<id>`; `successful` → `506,<id>`, the twin
  `te/device/<name>///twin/firmware`, then the clear; `failed` → `505,<id>,<reason>`, then the
  clear; a state without `name`, `version` or `remoteUrl` → `505` and the clear, as the real
  mapper fails a payload it cannot parse; other states are left alone.

`ThinEdgeMapperModel.decide` is pure (message in, messages out); `MapperModelRunner` runs it on
the broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass, field

from tedge_firmware.core import smartrest, topics
from tedge_firmware.core.c8y_operations import (
    OPERATIONS_TOPIC,
    FirmwareOperation,
    firmware_operations,
)
from tedge_firmware.core.firmware_update import (
    TE_COMMAND_FILTER,
    TE_EXECUTING,
    TE_FAILED,
    TE_SUCCESSFUL,
    parse_te_command,
    parse_te_command_topic,
)
from tedge_firmware.errors import MessageError
from tedge_firmware.shell.mqtt import MqttSession, MqttSettings

log = logging.getLogger(__name__)

CMD_PREFIX = "c8y-mapper-"
CAPABILITIES = "te/device/+///cmd/firmware_update"


@dataclass(frozen=True)
class Out:
    topic: str
    payload: str
    retain: bool = False


@dataclass
class ThinEdgeMapperModel:
    gateway_id: str
    registered: set[str] = field(default_factory=set)
    seen_ids: set[str] = field(default_factory=set)

    def decide(self, topic: str, payload: bytes) -> list[Out]:
        if topic == OPERATIONS_TOPIC:
            return [out for op in firmware_operations(payload) for out in self._operation(op)]
        if topic.count("/") == 6:
            return self._capability(topic, payload)
        return self._command(topic, payload)

    def _capability(self, topic: str, payload: bytes) -> list[Out]:
        name = topic.split("/")[2]
        if not payload or name == "main" or topics.child_id_problem(name) is not None:
            return []
        xid = topics.te_child_external_id(self.gateway_id, name)
        if xid in self.registered:
            return []
        self.registered.add(xid)
        return [
            Out(topics.C8Y_UPSTREAM, smartrest.register_child(xid, name)),
            Out(topics.c8y_upstream(xid), smartrest.supported_operations(["c8y_Firmware"])),
        ]

    def _operation(self, op: FirmwareOperation | object) -> list[Out]:
        if not isinstance(op, FirmwareOperation) or op.c8y_id in self.seen_ids:
            return []
        name = topics.te_child_name(op.device, self.gateway_id)
        if name is None:
            return []  # not a te/ child: the legacy plugin's
        self.seen_ids.add(op.c8y_id)
        command = {
            "status": "init",
            "tedgeUrl": op.url,
            "remoteUrl": op.url,
            "name": op.name,
            "version": op.version,
        }
        where = topics.te_command_topic(name, f"{CMD_PREFIX}{op.c8y_id}")
        return [Out(where, json.dumps(command), retain=True)]

    def _command(self, topic: str, payload: bytes) -> list[Out]:
        try:
            where = parse_te_command_topic(topic)
            command = parse_te_command(payload)
        except MessageError:
            return []
        name = where.device_name
        if command is None or name is None or not where.cmd_id.startswith(CMD_PREFIX):
            return []
        c8y_id = where.cmd_id[len(CMD_PREFIX) :]
        upstream = topics.c8y_upstream(topics.te_child_external_id(self.gateway_id, name))
        clear = Out(topic, "", retain=True)
        try:
            download = command.download()
        except MessageError as error:  # the real mapper cannot parse such a state either
            return [Out(upstream, smartrest.set_failed_by_id(c8y_id, str(error))), clear]
        if command.status == TE_EXECUTING:
            return [Out(upstream, smartrest.set_executing_by_id(c8y_id))]
        if command.status == TE_SUCCESSFUL:
            twin = {"name": download.name, "version": download.version, "url": download.remote_url}
            return [
                Out(upstream, smartrest.set_successful_by_id(c8y_id)),
                Out(f"te/device/{name}///twin/firmware", json.dumps(twin), retain=True),
                clear,
            ]
        if command.status == TE_FAILED:
            reason = command.text("reason") or "Unknown reason"
            return [Out(upstream, smartrest.set_failed_by_id(c8y_id, reason)), clear]
        return []


class MapperModelRunner:
    """The model on the broker, with a session of its own."""

    def __init__(self, settings: MqttSettings, gateway_id: str) -> None:
        self.model = ThinEdgeMapperModel(gateway_id)
        subscriptions = (OPERATIONS_TOPIC, TE_COMMAND_FILTER, CAPABILITIES)
        self._session = MqttSession(settings, subscriptions)
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self, connect_timeout: float | None = 10.0) -> None:
        """Run; with a timeout, wait until connected (None: keep trying in the background)."""
        self._tasks = [
            asyncio.create_task(self._session.run(), name="mapper-model mqtt"),
            asyncio.create_task(self._pump(), name="mapper-model pump"),
        ]
        if connect_timeout is not None:
            async with asyncio.timeout(connect_timeout):
                await self._session.wait_connected()

    async def stop(self) -> None:
        await self._session.close(timeout=2.0)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _pump(self) -> None:
        while True:
            message = await self._session.messages.get()
            try:
                outs = self.model.decide(message.topic, message.payload)
            except Exception:  # the model must go on whatever it is sent
                log.exception("mapper model: failed on %s", message.topic[:200])
                continue
            for out in outs:
                self._session.publish(out.topic, out.payload, retain=out.retain)
