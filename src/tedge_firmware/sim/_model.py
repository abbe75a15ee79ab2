"""The Cumulocity tenant as the simulator models it: inventory, operations, bulk operations.

Pure: no asyncio, no I/O. Upstream SmartREST messages go in (`Tenant.handle_upstream`), the
messages Cumulocity would answer with come out (`Downstream`), and everything a real tenant
would refuse is recorded as a `Violation` instead of raising, so one test sees every mistake.

Theory of operation. The gateway (`gateway_id`) exists from the start. A device is known once
a `101` created it; only known devices may send anything on `c8y/s/us/<device>`. Operations
get increasing ids ("1", "2", ...) and start PENDING; Cumulocity delivers them to the device
in creation order (a `515` on `c8y/s/ds`). The static "set operation status" templates act on
the device of the topic and a fragment, never on an operation id:

    501,<fragment>            the oldest PENDING operation of that fragment  → EXECUTING
    502,<fragment>[,reason]   the oldest EXECUTING operation of that fragment → FAILED
    503,<fragment>[,...]      the oldest EXECUTING operation of that fragment → SUCCESSFUL

That is what Cumulocity's SmartREST 2.0 reference says (502 and 503 name the oldest EXECUTING
operation), and why thin-edge always sends `501` before a `502`: a `502` or `503` while the
operation is still PENDING changes nothing in Cumulocity and leaves it PENDING. The simulator
does the same and records a Violation, so a gateway that skips the `501` is caught.

Rules enforced (each breach is a Violation; the record then changes nothing):

* a message on `c8y/s/us/<device>` for a device no `101` created (Cumulocity would create an
  unrelated "MQTT Device" instead), or on a topic that names no valid device;
* a payload that is not UTF-8, a record that is not CSV;
* `101` without a valid external id, or for an id that exists under another parent;
* `114` replaces the device's supported operations (an empty `114` clears them);
* `115,<name>,<version>[,<url>]` sets the device's c8y_Firmware; name and version are required;
* `501`/`502`/`503` without a fragment, or with no operation in the state the template needs;
* creating a `c8y_Firmware` operation for a device that is unknown or does not list
  `c8y_Firmware` among its supported operations (Cumulocity's UI offers the firmware tab only
  then): recorded and refused with SimulatorError; a bulk operation skips such devices and
  counts them as refused.

With `json_operations`, every delivery also carries the operation's JSON form on
`c8y/devicecontrol/notifications`, as Cumulocity sends it to MQTT devices, and the "by id"
templates act on the operation they name, which must belong to the device of the topic:

    504,<id>                  PENDING → EXECUTING
    505,<id>[,reason]         EXECUTING → FAILED
    506,<id>[,...]            EXECUTING → SUCCESSFUL

`105` is answered with `106,<children…>` (the device's children, in creation order); `500` on
`c8y/s/us` re-delivers every PENDING operation of the gateway and its descendants, `500` on
`c8y/s/us/<device>` those of that device and its descendants. Other templates (measurements,
events, ...) are kept in `ignored`, not judged.

A bulk operation creates one operation per device, `ramp_seconds` apart (the waiting is the
caller's job). Its status follows Cumulocity's bulk operations: SCHEDULED before the first
operation exists, EXECUTING (EXECUTING_WITH_ERRORS once one failed or was refused) until every
operation finished, then SUCCESSFUL when all succeeded, else FAILED.
"""

from __future__ import annotations

import datetime
import enum
import itertools
import json
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace

from tedge_firmware.core import smartrest, topics
from tedge_firmware.core.c8y_operations import OPERATIONS_TOPIC
from tedge_firmware.errors import SimulatorError, SmartRestError

FIRMWARE = smartrest.FIRMWARE_OPERATION
DEFAULT_CHILD_TYPE = "c8y_Device"


class OperationStatus(enum.Enum):
    """Cumulocity's operation statuses."""

    PENDING = "PENDING"
    EXECUTING = "EXECUTING"
    SUCCESSFUL = "SUCCESSFUL"
    FAILED = "FAILED"

    @property
    def final(self) -> bool:
        return self in (OperationStatus.SUCCESSFUL, OperationStatus.FAILED)


class BulkStatus(enum.Enum):
    """Cumulocity's general status of a bulk operation."""

    SCHEDULED = "SCHEDULED"
    EXECUTING = "EXECUTING"
    EXECUTING_WITH_ERRORS = "EXECUTING_WITH_ERRORS"
    SUCCESSFUL = "SUCCESSFUL"
    FAILED = "FAILED"


@dataclass(frozen=True)
class StatusChange:
    at: float
    status: OperationStatus


@dataclass(frozen=True)
class Operation:
    """One operation in the tenant (a snapshot: the tenant replaces it on every change)."""

    id: str
    device: str
    fragment: str
    name: str
    version: str
    url: str
    created: float
    status: OperationStatus = OperationStatus.PENDING
    failure_reason: str | None = None
    bulk_id: str | None = None
    deliveries: int = 0  # 515s sent for it (creation and every re-delivery after a 500)
    history: tuple[StatusChange, ...] = ()

    def to_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "device": self.device,
            "fragment": self.fragment,
            "name": self.name,
            "version": self.version,
            "url": self.url,
            "status": self.status.value,
            "failure_reason": self.failure_reason,
            "bulk_id": self.bulk_id,
            "deliveries": self.deliveries,
            "created": self.created,
            "history": [[change.at, change.status.value] for change in self.history],
        }


@dataclass(frozen=True)
class Firmware:
    """A device's c8y_Firmware fragment, as set by `115`."""

    name: str
    version: str
    url: str | None = None


@dataclass(frozen=True)
class Device:
    """A managed object: the gateway or a child created by `101`."""

    id: str
    name: str
    type: str
    parent: str | None  # None for the gateway
    supported_operations: tuple[str, ...] = ()
    firmware: Firmware | None = None

    def supports(self, operation: str) -> bool:
        return operation in self.supported_operations

    def to_json(self) -> dict[str, object]:
        firmware = self.firmware
        return {
            "id": self.id,
            "name": self.name,
            "type": self.type,
            "parent": self.parent,
            "supported_operations": list(self.supported_operations),
            "firmware": None
            if firmware is None
            else {"name": firmware.name, "version": firmware.version, "url": firmware.url},
        }


@dataclass(frozen=True)
class Violation:
    """Something Cumulocity would refuse, recorded with the record that caused it."""

    at: float
    device: str | None
    record: str
    message: str

    def __str__(self) -> str:
        where = f"{self.device}: " if self.device is not None else ""
        return f"{where}{self.message} [{self.record!r}]"

    def to_json(self) -> dict[str, object]:
        return {
            "at": self.at,
            "device": self.device,
            "record": self.record,
            "message": self.message,
        }


@dataclass(frozen=True)
class Downstream:
    """A message the tenant sends to the gateway (through the cloud bridge)."""

    topic: str
    payload: str


@dataclass(frozen=True)
class BulkOperation:
    """A c8y_Firmware operation for a group of devices, created `ramp_seconds` apart."""

    id: str
    devices: tuple[str, ...]
    name: str
    version: str
    url: str
    ramp_seconds: float
    operation_ids: tuple[str, ...] = ()
    refused: tuple[str, ...] = ()

    @property
    def created_all(self) -> bool:
        return len(self.operation_ids) + len(self.refused) == len(self.devices)


@dataclass(frozen=True)
class BulkProgress:
    """Where a bulk operation stands: Cumulocity's general status and the counts."""

    bulk_id: str
    status: BulkStatus
    total: int
    pending: int
    executing: int
    successful: int
    failed: int
    refused: int

    @property
    def done(self) -> bool:
        return self.status in (BulkStatus.SUCCESSFUL, BulkStatus.FAILED)

    def to_json(self) -> dict[str, object]:
        return {
            "id": self.bulk_id,
            "status": self.status.value,
            "total": self.total,
            "pending": self.pending,
            "executing": self.executing,
            "successful": self.successful,
            "failed": self.failed,
            "refused": self.refused,
        }


_Handler = Callable[[Device, list[str], str], list[Downstream]]


class Tenant:
    """The state of the simulated tenant; see the module docstring for the rules."""

    def __init__(
        self,
        gateway_id: str,
        *,
        clock: Callable[[], float] = time.time,
        json_operations: bool = False,
    ) -> None:
        self.json_operations = json_operations
        problem = topics.child_id_problem(gateway_id)
        if problem is not None:
            raise ValueError(f"gateway id: {problem}")
        self.gateway_id = gateway_id
        self._clock = clock
        self._devices: dict[str, Device] = {
            gateway_id: Device(gateway_id, gateway_id, "thin-edge.io", None)
        }
        self._operations: dict[str, Operation] = {}
        self._operations_of: dict[str, list[str]] = {}  # device → its operation ids, oldest first
        self._bulks: dict[str, BulkOperation] = {}
        # bulk id → how many of its operations are in each status (progress in O(1))
        self._bulk_counts: dict[str, Counter[OperationStatus]] = {}
        self._violations: list[Violation] = []
        self._ignored: list[tuple[str, str]] = []
        self._operation_ids = itertools.count(1)
        self._bulk_ids = itertools.count(1)
        self._changes = 0
        self._handlers: dict[str, _Handler] = {
            "101": self._create_child,
            "105": self._list_children,
            "114": self._set_supported_operations,
            "115": self._set_firmware,
            "500": self._redeliver_pending,
        }
        pending, executing = OperationStatus.PENDING, OperationStatus.EXECUTING
        moves = [
            (pending, executing),
            (executing, OperationStatus.FAILED),
            (executing, OperationStatus.SUCCESSFUL),
        ]
        for offset, by_id in ((501, False), (504, True)):  # 501-503 by type, 504-506 by id
            for index, (source, target) in enumerate(moves):
                self._handlers[str(offset + index)] = self._status(by_id, source, target)

    # --- reading ---------------------------------------------------------------------------

    @property
    def changes(self) -> int:
        """A counter that grows with every change (for waiters and live views)."""
        return self._changes

    @property
    def devices(self) -> dict[str, Device]:
        return dict(self._devices)

    @property
    def operations(self) -> list[Operation]:
        """Every operation, oldest first."""
        return list(self._operations.values())

    @property
    def violations(self) -> list[Violation]:
        return list(self._violations)

    @property
    def ignored(self) -> list[tuple[str, str]]:
        """(device, record) of upstream records with templates the simulator does not judge."""
        return list(self._ignored)

    @property
    def bulks(self) -> list[BulkOperation]:
        return list(self._bulks.values())

    def operation(self, op_id: str) -> Operation:
        """The operation with this id; KeyError when there is none."""
        return self._operations[op_id]

    def device(self, device_id: str) -> Device | None:
        return self._devices.get(device_id)

    def operations_of(self, device_id: str) -> list[Operation]:
        """The device's operations, oldest first."""
        return [self._operations[op_id] for op_id in self._operations_of.get(device_id, ())]

    def bulk(self, bulk_id: str) -> BulkOperation:
        return self._bulks[bulk_id]

    def children_of(self, device_id: str) -> list[str]:
        return [device.id for device in self._devices.values() if device.parent == device_id]

    # --- operations ------------------------------------------------------------------------

    def add_device(
        self, device_id: str, *, parent: str | None = None, operations: Iterable[str] = ()
    ) -> Device:
        """Put a child into the inventory directly, as if its `101` and `114` had come."""
        owner = self.gateway_id if parent is None else parent
        if owner not in self._devices:
            raise SimulatorError(f"no device {owner!r} to be the parent of {device_id!r}")
        problem = topics.child_id_problem(device_id)
        if problem is not None:
            raise SimulatorError(problem)
        existing = self._devices.get(device_id)
        device = existing or Device(device_id, device_id, DEFAULT_CHILD_TYPE, owner)
        names = _operation_names(operations)
        self._devices[device_id] = replace(device, supported_operations=names)
        self._changed()
        return self._devices[device_id]

    def create_firmware_operation(
        self, device_id: str, name: str, version: str, url: str
    ) -> Operation:
        """A PENDING c8y_Firmware operation; publish `deliver(op)` to deliver it.

        SimulatorError (and a Violation) when the device is unknown or does not support it.
        """
        return self._create(device_id, name, version, url, bulk_id=None)

    def deliver(self, operation: Operation) -> list[Downstream]:
        """What delivers `operation` (to publish): its `515`, and its JSON form when the
        tenant sends that too; counts one more delivery."""
        current = self._operations[operation.id]
        self._operations[operation.id] = replace(current, deliveries=current.deliveries + 1)
        self._changed()
        fields = (current.device, current.name, current.version, current.url)
        line = ",".join(["515", *(smartrest.quote_field(field) for field in fields)])
        out = [Downstream(topics.C8Y_DOWNSTREAM, line)]
        if self.json_operations:
            out.append(Downstream(OPERATIONS_TOPIC, json.dumps(_json_form(current))))
        return out

    def new_bulk(
        self, devices: Iterable[str], name: str, version: str, url: str, ramp_seconds: float
    ) -> BulkOperation:
        """A SCHEDULED bulk operation; create its operations with `create_bulk_member`."""
        targets = tuple(dict.fromkeys(devices))
        if not targets:
            raise SimulatorError("a bulk operation needs at least one device")
        if ramp_seconds < 0:
            raise ValueError("ramp_seconds must not be negative")
        bulk = BulkOperation(
            f"bulk-{next(self._bulk_ids)}", targets, name, version, url, ramp_seconds
        )
        self._bulks[bulk.id] = bulk
        self._changed()
        return bulk

    def create_bulk_member(self, bulk_id: str, device_id: str) -> Operation | None:
        """The bulk operation's operation for `device_id`, or None when it was refused."""
        bulk = self._bulks[bulk_id]
        try:
            operation = self._create(device_id, bulk.name, bulk.version, bulk.url, bulk_id=bulk_id)
        except SimulatorError:
            self._bulks[bulk_id] = replace(bulk, refused=(*bulk.refused, device_id))
            return None
        self._bulks[bulk_id] = replace(bulk, operation_ids=(*bulk.operation_ids, operation.id))
        return operation

    def bulk_progress(self, bulk_id: str) -> BulkProgress:
        bulk = self._bulks[bulk_id]
        counts = self._bulk_counts.get(bulk_id, Counter())
        return BulkProgress(
            bulk_id=bulk_id,
            status=_bulk_status(bulk, counts),
            total=len(bulk.devices),
            pending=counts[OperationStatus.PENDING],
            executing=counts[OperationStatus.EXECUTING],
            successful=counts[OperationStatus.SUCCESSFUL],
            failed=counts[OperationStatus.FAILED],
            refused=len(bulk.refused),
        )

    def _create(
        self, device_id: str, name: str, version: str, url: str, *, bulk_id: str | None
    ) -> Operation:
        device = self._devices.get(device_id)
        record = f"(create {FIRMWARE} operation {name} {version})"
        if device is None:
            self._violate(device_id, record, "no such device in the inventory")
            raise SimulatorError(f"no device {device_id!r} in the inventory")
        if not device.supports(FIRMWARE):
            self._violate(device_id, record, f"the device does not support {FIRMWARE}")
            raise SimulatorError(
                f"device {device_id!r} does not list {FIRMWARE} among its supported operations"
            )
        now = self._clock()
        operation = Operation(
            id=str(next(self._operation_ids)),
            device=device_id,
            fragment=FIRMWARE,
            name=name,
            version=version,
            url=url,
            created=now,
            bulk_id=bulk_id,
            history=(StatusChange(now, OperationStatus.PENDING),),
        )
        self._operations[operation.id] = operation
        self._operations_of.setdefault(device_id, []).append(operation.id)
        if bulk_id is not None:
            self._bulk_counts.setdefault(bulk_id, Counter())[operation.status] += 1
        self._changed()
        return operation

    # --- upstream messages -----------------------------------------------------------------

    def handle_upstream(self, topic: str, payload: bytes) -> list[Downstream]:
        """Apply one message from `c8y/s/us[/<device>]`; returns what Cumulocity answers."""
        self._changed()
        device_id = self._device_of_topic(topic)
        if device_id is None:
            return []
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError:
            self._violate(device_id, payload[:80].decode("utf-8", "replace"), "not UTF-8")
            return []
        answers: list[Downstream] = []
        for record in smartrest.split_records(text):
            answers.extend(self._handle_record(device_id, record))
        return answers

    def _device_of_topic(self, topic: str) -> str | None:
        if topic == topics.C8Y_UPSTREAM:
            return self.gateway_id
        device_id = topic.removeprefix(topics.C8Y_UPSTREAM + "/")
        problem = topics.child_id_problem(device_id) if device_id != topic else "not c8y/s/us"
        if problem is not None:
            self._violate(None, topic, f"topic names no device: {problem}")
            return None
        return device_id

    def _handle_record(self, device_id: str, record: str) -> list[Downstream]:
        try:
            fields = smartrest.parse_fields(record)
        except SmartRestError as error:
            self._violate(device_id, record, str(error))
            return []
        handler = self._handlers.get(fields[0].strip() if fields else "")
        if handler is None:
            self._ignored.append((device_id, record))
            return []
        device = self._devices.get(device_id)
        if device is None:
            self._violate(
                device_id,
                record,
                f"unknown device {device_id!r}: create it with 101 on {topics.C8Y_UPSTREAM} first "
                "(Cumulocity would create an unrelated 'MQTT Device')",
            )
            return []
        return handler(device, fields, record)

    def _create_child(self, parent: Device, fields: list[str], record: str) -> list[Downstream]:
        child_id = _field(fields, 1)
        problem = topics.child_id_problem(child_id)
        if problem is not None:
            self._violate(parent.id, record, f"101 needs a valid external id: {problem}")
            return []
        existing = self._devices.get(child_id)
        if existing is not None:
            if existing.parent != parent.id:
                self._violate(
                    parent.id, record, f"{child_id!r} already exists under {existing.parent!r}"
                )
            return []  # Cumulocity answers with the existing device: harmless
        name = _field(fields, 2) or child_id
        kind = _field(fields, 3) or DEFAULT_CHILD_TYPE
        self._devices[child_id] = Device(child_id, name, kind, parent.id)
        return []

    def _list_children(self, device: Device, fields: list[str], record: str) -> list[Downstream]:
        ids = [smartrest.quote_field(child) for child in self.children_of(device.id)]
        return [Downstream(topics.C8Y_DOWNSTREAM, ",".join(["106", *ids]))]

    def _set_supported_operations(
        self, device: Device, fields: list[str], record: str
    ) -> list[Downstream]:
        self._devices[device.id] = replace(
            device, supported_operations=_operation_names(fields[1:])
        )
        return []

    def _set_firmware(self, device: Device, fields: list[str], record: str) -> list[Downstream]:
        name, version, url = _field(fields, 1), _field(fields, 2), _field(fields, 3)
        if not name or not version:
            self._violate(device.id, record, "115 needs a firmware name and version")
            return []
        self._devices[device.id] = replace(device, firmware=Firmware(name, version, url or None))
        return []

    def _redeliver_pending(
        self, device: Device, fields: list[str], record: str
    ) -> list[Downstream]:
        scope = set(self._descendants(device.id))
        pending = [
            operation
            for operation in self.operations  # in creation order, across devices
            if operation.device in scope and operation.status is OperationStatus.PENDING
        ]
        return [message for operation in pending for message in self.deliver(operation)]

    def _status(self, by_id: bool, source: OperationStatus, target: OperationStatus) -> _Handler:
        """The handler of a "set operation status" template: by type (501-503) or by id
        (504-506); a failure's reason is the third field."""
        move = self._by_id if by_id else self._transition

        def handle(device: Device, fields: list[str], record: str) -> list[Downstream]:
            reason = _field(fields, 2) if target is OperationStatus.FAILED else None
            move(device, fields, record, source, target, reason)
            return []

        return handle

    def _by_id(
        self,
        device: Device,
        fields: list[str],
        record: str,
        source: OperationStatus,
        target: OperationStatus,
        reason: str | None = None,
    ) -> None:
        operation = self._operations.get(_field(fields, 1).strip())
        if operation is None or operation.device != device.id:
            self._violate(device.id, record, f"no operation {_field(fields, 1)!r} of this device")
        elif operation.status is not source:
            self._violate(
                device.id,
                record,
                f"operation {operation.id} is {operation.status.value}, not {source.value}",
            )
        else:
            self._move(operation, target, reason)

    def _transition(
        self,
        device: Device,
        fields: list[str],
        record: str,
        source: OperationStatus,
        target: OperationStatus,
        reason: str | None = None,
    ) -> None:
        fragment = _field(fields, 1).strip()
        if not fragment:
            self._violate(device.id, record, f"{fields[0]} needs an operation fragment")
            return
        candidates = [op for op in self.operations_of(device.id) if op.fragment == fragment]
        chosen = next((op for op in candidates if op.status is source), None)
        if chosen is None:
            self._violate(device.id, record, _no_operation_in(source, target, fragment, candidates))
            return
        self._move(chosen, target, reason)

    def _move(self, chosen: Operation, target: OperationStatus, reason: str | None) -> None:
        now = self._clock()
        if chosen.bulk_id is not None:
            counts = self._bulk_counts[chosen.bulk_id]
            counts[chosen.status] -= 1
            counts[target] += 1
        self._operations[chosen.id] = replace(
            chosen,
            status=target,
            failure_reason=reason if target is OperationStatus.FAILED else chosen.failure_reason,
            history=(*chosen.history, StatusChange(now, target)),
        )

    def _descendants(self, device_id: str) -> Iterator[str]:
        yield device_id
        for child in self.children_of(device_id):
            yield from self._descendants(child)

    def _violate(self, device_id: str | None, record: str, message: str) -> None:
        self._violations.append(Violation(self._clock(), device_id, record, message))
        self._changed()

    def _changed(self) -> None:
        self._changes += 1


def _json_form(operation: Operation) -> dict[str, object]:
    """The operation as Cumulocity sends it on `devicecontrol/notifications`."""
    return {
        "id": operation.id,
        "status": operation.status.value,
        "creationTime": datetime.datetime.fromtimestamp(
            operation.created, datetime.UTC
        ).isoformat(),
        "c8y_Firmware": {
            "name": operation.name,
            "version": operation.version,
            "url": operation.url,
        },
        "externalSource": {"externalId": operation.device, "type": "c8y_Serial"},
    }


def _field(fields: list[str], index: int) -> str:
    return fields[index] if len(fields) > index else ""


def _operation_names(names: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(name.strip() for name in names if name.strip()))


def _no_operation_in(
    source: OperationStatus, target: OperationStatus, fragment: str, candidates: list[Operation]
) -> str:
    message = (
        f"no {source.value} {fragment} operation to set {target.value} "
        f"(Cumulocity takes the oldest {source.value} one)"
    )
    unfinished = [op for op in candidates if not op.status.final]
    if unfinished:
        oldest = unfinished[0]
        message += f"; operation {oldest.id} is {oldest.status.value}"
        if oldest.status is OperationStatus.PENDING and target.final:
            message += ": send 501 first"
    elif candidates:
        message += f"; operation {candidates[-1].id} already ended {candidates[-1].status.value}"
    return message


def _bulk_status(bulk: BulkOperation, counts: dict[OperationStatus, int]) -> BulkStatus:
    if not bulk.operation_ids and not bulk.refused:
        return BulkStatus.SCHEDULED
    errors = counts[OperationStatus.FAILED] + len(bulk.refused)
    unfinished = counts[OperationStatus.PENDING] + counts[OperationStatus.EXECUTING]
    if not bulk.created_all or unfinished:
        return BulkStatus.EXECUTING_WITH_ERRORS if errors else BulkStatus.EXECUTING
    return BulkStatus.FAILED if errors else BulkStatus.SUCCESSFUL
