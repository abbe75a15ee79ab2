"""Child registration, the pure part: supported operations → Cumulocity `101`/`105`/`114`.

A device declares the Cumulocity operations it supports with files under
`<config-dir>/operations/c8y/`: a file directly in that directory is an operation of the main
device, a file in `<child-id>/` one of that child (reference §5). This module decides which
names and contents count, and what to tell Cumulocity about them; reading the directory is the
shell's job (`shell/ops_watch.py`), sending the lines the gateway's (`gateway/registration.py`).

Theory of operation. The app hands the `Registrar` snapshots of the directory: one at start,
then one after every (debounced) change. At start the main device's `114` goes out at once;
when there are local children, `105` asks the cloud which children it already knows, and the
registrar waits (WAITING_FOR_CLOUD). The cloud's `106,<ids…>` answer, or its silence for a
while, ends the wait: `101` for every local child the cloud did not list, then `114` for every
local child (RUNNING). From then on each new snapshot is compared with the previous one, device
by device, on a fingerprint of its counted operation files (name, inode, size, mtime): a new
child gets `101` and, once it has operations, its `114`; a child whose operations changed gets
its full `114` again, one per snapshot however many files changed; a child whose directory
went away gets an empty `114`. A child's `101` always precedes its first `114`. Changes seen
while waiting for the cloud are covered by the full registration that ends the wait.

The network API (a thin-edge 1.x style declaration): a retained `{}` (any JSON object) on
`te/device/<child>///cmd/<command>` declares that `<child>` supports `<command>`; an empty
payload withdraws it. `parse_declaration` validates topic and payload into a `Declaration`; the
app turns it into the same operation file a person would create, so both paths share one truth.
"""

from __future__ import annotations

import enum
import json
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from tedge_firmware.core import smartrest, topics
from tedge_firmware.errors import InputError, SmartRestError, TopicError

REQUEST_CHILD_LIST = "105"
# thin-edge 1.x calls the main device `device/main//`.
MAIN_ENTITY = "main"
DECLARATION_FILTER = "te/device/+///cmd/+"

MAX_OPERATION_NAME_LENGTH = 128
MAX_OPERATION_FILE_BYTES = 1024 * 1024
MAX_DECLARATION_BYTES = 16 * 1024

# An operation name is used verbatim as a file name and in a SmartREST 114 line.
_OPERATION_NAME = re.compile(r"[A-Za-z0-9_]+")
_C8Y_OPERATION = re.compile(r"c8y_[A-Za-z0-9_]+")

# thin-edge command names and the Cumulocity operations they stand for.
COMMAND_OPERATIONS: Mapping[str, str] = {
    "firmware_update": "c8y_Firmware",
    "software_update": "c8y_SoftwareUpdate",
    "restart": "c8y_Restart",
    "config_snapshot": "c8y_UploadConfigFile",
    "config_update": "c8y_DownloadConfigFile",
    "log_upload": "c8y_LogfileRequest",
}

Device = str | None
"""A child id, or None for the main device."""


# --- what counts ---------------------------------------------------------------------------


def operation_name_problem(name: str) -> str | None:
    """Why `name` is not an operation name (`[A-Za-z0-9_]+`, bounded), or None when it is."""
    if not _OPERATION_NAME.fullmatch(name):
        return f"the operation name {name!r} is not made of A-Z, a-z, 0-9 and _ only"
    if len(name) > MAX_OPERATION_NAME_LENGTH:
        return f"the operation name is longer than {MAX_OPERATION_NAME_LENGTH} characters"
    return None


def child_dir_problem(name: str, main_device_id: str | None = None) -> str | None:
    """Why a directory name under `operations/c8y/` is not usable as a child id, or None.

    Names that are not UTF-8 (surrogate-escaped by the OS layer) are refused as well as
    everything `topics.child_id_problem` refuses, and the main device's own id: a gateway
    registered as its own child makes no sense to Cumulocity.
    """
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return f"the directory name {name!r} is not UTF-8"
    problem = topics.child_id_problem(name)
    if problem is None and name == main_device_id:
        problem = f"{name!r} is the main device's own id"
    return problem


def operation_file_problem(content: bytes) -> str | None:
    """Why the content of an operation file does not count (it must be TOML), or None."""
    if len(content) > MAX_OPERATION_FILE_BYTES:
        return f"larger than {MAX_OPERATION_FILE_BYTES} bytes"
    try:
        tomllib.loads(content.decode("utf-8"))
    except UnicodeDecodeError:
        return "not UTF-8"
    except tomllib.TOMLDecodeError as error:
        return f"not valid TOML ({error})"
    return None


# --- snapshots of the operations directory ---------------------------------------------------

FileFingerprint = tuple[str, int, int, int]
"""(operation name, inode, size, mtime in ns) of one counted operation file."""


@dataclass(frozen=True)
class DeviceOperations:
    """The counted operation files of one device."""

    files: frozenset[FileFingerprint] = frozenset()

    @property
    def operations(self) -> list[str]:
        """The operation names, sorted."""
        return sorted(name for name, *_ in self.files)


@dataclass(frozen=True)
class Snapshot:
    """What the operations directory declared at one moment."""

    main: DeviceOperations = field(default_factory=DeviceOperations)
    children: Mapping[str, DeviceOperations] = field(default_factory=dict)


# --- outgoing messages ----------------------------------------------------------------------


@dataclass(frozen=True)
class Publish:
    """One SmartREST message to publish (QoS 1, not retained)."""

    topic: str
    payload: str


def request_child_list() -> Publish:
    return Publish(topics.C8Y_UPSTREAM, REQUEST_CHILD_LIST)


def register_child(child_id: str, main_device_id: str | None = None) -> Publish:
    """`101` for a child; one registered over `te/` (`<main>:device:<name>`) is named `<name>`,
    as thin-edge's mapper names it."""
    name = topics.te_child_name(child_id, main_device_id)
    return Publish(topics.C8Y_UPSTREAM, smartrest.register_child(child_id, name))


def declare_operations(device: Device, operations: list[str]) -> Publish:
    return Publish(topics.c8y_upstream(device), smartrest.supported_operations(operations))


def cloud_child_list(payload: bytes) -> list[str] | None:
    """The ids of a `106,<ids…>` record in a `c8y/s/ds` payload, or None when there is none
    (or the payload is too large to be Cumulocity's)."""
    if len(payload) > smartrest.MAX_DOWNSTREAM_BYTES:
        return None
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        return None
    for record in smartrest.split_records(text):
        if smartrest.template_id(record) == "106":
            try:
                return smartrest.parse_child_list(record)
            except SmartRestError:
                return None
    return None


# --- decisions --------------------------------------------------------------------------------


class Phase(enum.Enum):
    IDLE = "idle"  # start() not called yet
    WAITING_FOR_CLOUD = "waiting for the cloud"  # 105 sent, no 106 and no timeout yet
    RUNNING = "running"  # children registered; changes are reported as they come


class Registrar:
    """Decides which SmartREST messages to send; see the module docstring."""

    def __init__(self, main_device_id: str | None = None) -> None:
        self.main_device_id = main_device_id
        self.phase = Phase.IDLE
        self._snapshot = Snapshot()
        self._announced: set[str] = set()  # children the cloud knows (listed, or 101 sent)

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    def start(self, snapshot: Snapshot) -> list[Publish]:
        """The start-up messages: the main device's 114 and, with local children, the 105."""
        self._snapshot = snapshot
        out: list[Publish] = []
        if snapshot.main.files:
            out.append(declare_operations(None, snapshot.main.operations))
        if snapshot.children:
            out.append(request_child_list())
            self.phase = Phase.WAITING_FOR_CLOUD
        else:
            self.phase = Phase.RUNNING  # nothing to ask the cloud about
        return out

    def on_cloud_list(self, registered: Iterable[str]) -> list[Publish]:
        """The cloud's `106` answer; ignored unless we are waiting for it."""
        if self.phase is not Phase.WAITING_FOR_CLOUD:
            return []
        return self._register_all(set(registered))

    def on_cloud_silent(self) -> list[Publish]:
        """No `106` in time: register every local child anyway (101 is harmless when known)."""
        if self.phase is not Phase.WAITING_FOR_CLOUD:
            return []
        return self._register_all(set())

    def on_snapshot(self, snapshot: Snapshot) -> list[Publish]:
        """A fresh look at the directory: messages for every device that changed."""
        old, self._snapshot = self._snapshot, snapshot
        out: list[Publish] = []
        if old.main != snapshot.main:
            out.append(declare_operations(None, snapshot.main.operations))
        if self.phase is not Phase.RUNNING:
            return out
        for child in sorted({*old.children, *snapshot.children}):
            out.extend(self._child_changes(child, old.children.get(child), snapshot))
        return out

    def _child_changes(
        self, child: str, before: DeviceOperations | None, snapshot: Snapshot
    ) -> list[Publish]:
        after = snapshot.children.get(child)
        if after is None:
            self._announced.discard(child)  # re-created later, it is registered again
            return [declare_operations(child, [])] if before and before.files else []
        out: list[Publish] = []
        if child not in self._announced:
            self._announced.add(child)
            out.append(register_child(child, self.main_device_id))
            if after.files:
                out.append(declare_operations(child, after.operations))
        elif before != after:
            out.append(declare_operations(child, after.operations))
        return out

    def _register_all(self, registered: set[str]) -> list[Publish]:
        self.phase = Phase.RUNNING
        children = sorted(self._snapshot.children)
        out = [
            register_child(child, self.main_device_id)
            for child in children
            if child not in registered
        ]
        out += [
            declare_operations(child, self._snapshot.children[child].operations)
            for child in children
        ]
        self._announced = set(children)
        return out


# --- the network API ------------------------------------------------------------------------


@dataclass(frozen=True)
class Declaration:
    """A device declares (or withdraws) support for one Cumulocity operation."""

    device: Device
    operation: str
    supported: bool


def operation_for_command(command: str) -> str:
    """A thin-edge command name (or a `c8y_…` operation name) → the Cumulocity operation."""
    operation = COMMAND_OPERATIONS.get(command)
    if operation is not None:
        return operation
    if _C8Y_OPERATION.fullmatch(command):
        problem = operation_name_problem(command)
        if problem is not None:
            raise InputError(problem)
        return command
    raise InputError(
        f"unknown command {command!r}: expected one of {', '.join(COMMAND_OPERATIONS)} "
        "or a Cumulocity operation name c8y_<A-Za-z0-9_>"
    )


def declaration_device(topic: str, main_device_id: str | None = None) -> tuple[Device, str]:
    """`te/device/<name>///cmd/<command>` → (device, command); TopicError otherwise. A child
    is named by the external id thin-edge's mapper gives it, `<main_device_id>:device:<name>`
    (its operations directory has that name)."""
    parts = topic.split("/")
    if len(parts) != 7 or parts[:2] != ["te", "device"] or parts[3:6] != ["", "", "cmd"]:
        raise TopicError(f"not a te/device/<child>///cmd/<command> topic: {topic!r}")
    name, command = parts[2], parts[6]
    if name == MAIN_ENTITY:
        return None, command
    problem = child_dir_problem(name, main_device_id)
    if problem is not None:
        raise TopicError(problem)
    if main_device_id is None:
        return name, command  # without the main device's id there is no thin-edge external id
    external_id = topics.te_child_external_id(main_device_id, name)
    problem = topics.child_id_problem(external_id)
    if problem is not None:
        raise TopicError(problem)
    return external_id, command


def parse_declaration(topic: str, payload: bytes, main_device_id: str | None = None) -> Declaration:
    """Validate one message of the network API; TopicError or InputError when it is unusable.

    The payload is empty (withdraw) or a JSON object of at most MAX_DECLARATION_BYTES
    (declare; its content is not used, as with thin-edge's `{}`).
    """
    device, command = declaration_device(topic, main_device_id)
    operation = operation_for_command(command)
    if not payload:
        return Declaration(device, operation, supported=False)
    _check_declaration_payload(payload)
    return Declaration(device, operation, supported=True)


_EXPECTED = "expected {} (declare) or an empty payload (withdraw)"


def _check_declaration_payload(payload: bytes) -> None:
    if len(payload) > MAX_DECLARATION_BYTES:
        raise InputError(f"payload of {len(payload)} bytes is over {MAX_DECLARATION_BYTES}")
    try:
        document = json.loads(payload.decode("utf-8"))
    except UnicodeDecodeError:
        raise InputError("payload is not UTF-8") from None
    except (ValueError, RecursionError):  # deep nesting ends in RecursionError
        raise InputError(f"payload is not JSON: {_EXPECTED}") from None
    if not isinstance(document, dict):
        raise InputError(f"payload is not a JSON object: {_EXPECTED}")
