"""The firmware operation: its persisted record and its state machine.

Theory of operation
-------------------
A `515` for a child creates an operation in FETCHING: the firmware is being downloaded (or looked
up in the cache). When the firmware is ready the operation file is written and the request is
published to the child: PENDING. The child's first response moves it to EXECUTING (the moment
Cumulocity hears `501`). `successful` and `failed` end it; so does the inactivity timeout, a
failed download, or any error of that one operation. Cumulocity must see `501` exactly once
before the final `503`/`502`, so whichever event ends an operation that is still FETCHING or
PENDING sends the `501` first. A re-send (duplicate 515 or restart) never moves an operation
backwards, so it never causes a second `501` (DESIGN.md item 11), except after a restart, where
the persisted record cannot tell whether `501` already went out and PENDING is assumed.

    FETCHING --ready--> PENDING --executing--> EXECUTING
       |                  |  \\_________successful/failed/timeout______
       |                  |                                            \\
       +--failed----------+--successful/failed/timeout--> (ended)  <---+

`step()` is the whole decision: state + event → next state + what to tell Cumulocity. It does
no I/O; the orchestrator executes the result.

What survives a restart. The operation file is written when the request goes out (PENDING,
thin-edge's eight fields, byte for byte). Once the broker has acknowledged the `501`, the file
says EXECUTING, so a restart does not announce the operation again (DESIGN.md item 11). When
the operation ends, the file says how it ended and lists, in `to_cloud`, the lines for
Cumulocity that the broker has not acknowledged yet; it is written before those lines are
published and deleted once the broker has acknowledged the last of them, so a restart sends
what may not have arrived and nothing else (a line the broker got just before a kill -9 may
arrive twice: MQTT QoS 1 is at least once). Only the last two kinds of file carry the fields
`state` and `to_cloud`. An operation that ends before its request went out (its download
failed) has no operation file: its download record stays until the broker has its lines, so a
restart meanwhile fetches again and reports anew.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tedge_firmware.core import smartrest
from tedge_firmware.errors import InvalidTransition, StoreError

NO_REASON = "No failure reason provided by child device."
_ID_ALPHABET = "_-0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
RECORD_FIELDS = (
    "operation_id",
    "child_id",
    "name",
    "version",
    "server_url",
    "file_transfer_url",
    "sha256",
    "attempt",
)
# Ours, after thin-edge's eight, present only once the operation is announced or ended.
PROGRESS_FIELDS = ("state", "to_cloud")
# Ours, present only for an operation taken by its Cumulocity id (`use_operation_id`).
C8Y_ID_FIELD = "c8y_operation_id"
# thin-edge's names on disk for the two URLs an operation has; ours in memory say which is which.
_ATTRIBUTE_OF_FIELD = {"server_url": "cloud_url", "file_transfer_url": "child_url"}
# A corrupt file must not make us publish a flood: an ended operation owes at most 3 lines.
_MAX_TO_CLOUD_LINES = 8
_MAX_TO_CLOUD_CHARS = 4096


@dataclass(frozen=True)
class OperationRecord:
    """The operation file `data.path/firmware/<op_id>`: thin-edge's 8 fields, in its order,
    then (once announced or ended) its state and the lines Cumulocity may not have yet.

    Two URLs: `cloud_url`, where the firmware comes from (the `515`'s, thin-edge's
    `server_url`), and `child_url`, where the child downloads it from the file-transfer service
    (thin-edge's `file_transfer_url`)."""

    operation_id: str
    child_id: str
    name: str
    version: str
    cloud_url: str
    child_url: str
    sha256: str
    attempt: int
    state: State = dataclasses.field(default_factory=lambda: State.PENDING)
    to_cloud: tuple[str, ...] = ()
    c8y_id: str | None = None  # the Cumulocity operation's id, when it came by id

    def to_json(self) -> str:
        document = _fields_of(self, RECORD_FIELDS)
        if self.c8y_id is not None:
            document[C8Y_ID_FIELD] = self.c8y_id
        if self.state is not State.PENDING or self.to_cloud:
            document["state"] = self.state.value
            document["to_cloud"] = list(self.to_cloud)
        return json.dumps(document, separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str | bytes) -> OperationRecord:
        """Parse an operation file; unknown or missing fields and wrong types are errors."""
        document = _parse_record(text, RECORD_FIELDS, optional=(*PROGRESS_FIELDS, C8Y_ID_FIELD))
        state = _recorded_state(document.pop("state", State.PENDING.value))
        to_cloud = _recorded_lines(document.pop("to_cloud", []))
        if to_cloud and not state.ended:
            raise StoreError(f"field 'to_cloud' is not empty while the state is {state.value}")
        c8y_id = _recorded_c8y_id(document.pop(C8Y_ID_FIELD, None))
        return cls(**_attributes(document), state=state, to_cloud=to_cloud, c8y_id=c8y_id)


FETCH_FIELDS = ("operation_id", "child_id", "name", "version", "server_url", "attempt")
ANNOUNCED_FIELD = "announced"


@dataclass(frozen=True)
class FetchRecord:
    """An operation still waiting for its firmware to be fetched (downloaded, or found in the
    cache), persisted so that a restart resumes the download and keeps the operation
    (`data.path/firmware/.fetching/<op_id>`)."""

    operation_id: str
    child_id: str
    name: str
    version: str
    cloud_url: str
    attempt: int
    c8y_id: str | None = None
    # Cumulocity has the 501 (the download waits for its window): not announced again
    announced: bool = False

    def to_json(self) -> str:
        document: dict[str, object] = _fields_of(self, FETCH_FIELDS)
        if self.c8y_id is not None:
            document[C8Y_ID_FIELD] = self.c8y_id
        if self.announced:
            document[ANNOUNCED_FIELD] = True
        return json.dumps(document, separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str | bytes) -> FetchRecord:
        optional = (C8Y_ID_FIELD, ANNOUNCED_FIELD)
        document = _parse_record(text, FETCH_FIELDS, optional=optional)
        c8y_id = _recorded_c8y_id(document.pop(C8Y_ID_FIELD, None))
        announced = document.pop(ANNOUNCED_FIELD, False)
        if not isinstance(announced, bool):
            raise StoreError(f"field '{ANNOUNCED_FIELD}' is not true or false")
        return cls(**_attributes(document), c8y_id=c8y_id, announced=announced)


def _fields_of(record: object, fields: tuple[str, ...]) -> dict[str, object]:
    """The file's fields, in order, under their names on disk."""
    return {field: getattr(record, _ATTRIBUTE_OF_FIELD.get(field, field)) for field in fields}


def _attributes(document: dict[str, Any]) -> dict[str, Any]:
    """A file's fields under the record's attribute names."""
    return {_ATTRIBUTE_OF_FIELD.get(key, key): value for key, value in document.items()}


def _parse_record(
    text: str | bytes, fields: tuple[str, ...], optional: tuple[str, ...] = ()
) -> dict[str, Any]:
    """A JSON object with exactly `fields` (and maybe `optional` ones, not checked here):
    strings, except a non-negative int `attempt`."""
    try:
        document = json.loads(text)
    except (ValueError, RecursionError) as error:
        raise StoreError(f"not JSON: {error}") from None
    if not isinstance(document, dict):
        raise StoreError("not a JSON object")
    unknown = set(document) - set(fields) - set(optional)
    missing = set(fields) - set(document)
    if unknown or missing:
        raise StoreError(f"unknown fields {sorted(unknown)}, missing fields {sorted(missing)}")
    for field in fields:
        if field != "attempt" and not isinstance(document[field], str):
            raise StoreError(f"field {field!r} is not a string")
    attempt = document["attempt"]
    if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 0:
        raise StoreError("field 'attempt' is not a non-negative integer")
    return document


def _recorded_state(value: object) -> State:
    if not isinstance(value, str) or value in (State.FETCHING.value, State.WAITING.value):
        raise StoreError(f"field 'state' {value!r} is not a state an operation file can have")
    try:
        return State(value)
    except ValueError:
        raise StoreError(f"field 'state' {value!r} is not a known state") from None


def _recorded_c8y_id(value: object) -> str | None:
    if value is None or (isinstance(value, str) and smartrest.is_operation_id(value)):
        return value
    raise StoreError(f"field {C8Y_ID_FIELD!r} is not a Cumulocity operation id")


def _recorded_lines(value: object) -> tuple[str, ...]:
    if (
        not isinstance(value, list)
        or len(value) > _MAX_TO_CLOUD_LINES
        or not all(isinstance(line, str) and len(line) <= _MAX_TO_CLOUD_CHARS for line in value)
    ):
        raise StoreError(
            f"field 'to_cloud' is not a list of at most {_MAX_TO_CLOUD_LINES} SmartREST lines"
        )
    return tuple(value)


class State(enum.Enum):
    FETCHING = "fetching"  # waiting for the firmware download (or cache lookup)
    # waiting for a download window (firmware.download.windows): Cumulocity has the 501
    WAITING = "waiting"
    PENDING = "pending"  # request sent to the child, no response yet (no 501 sent)
    EXECUTING = "executing"  # the child answered; Cumulocity has the 501
    SUCCESSFUL = "successful"
    FAILED = "failed"

    @property
    def ended(self) -> bool:
        return self in (State.SUCCESSFUL, State.FAILED)

    @property
    def announced(self) -> bool:
        """Whether Cumulocity already got the 501 for this operation."""
        return self in (State.EXECUTING, State.WAITING)

    @property
    def fetching(self) -> bool:
        """Whether the firmware is still being fetched (no request to the child yet)."""
        return self in (State.FETCHING, State.WAITING)


class Event(enum.Enum):
    READY = "ready"  # firmware available, request published
    RESENT = "resent"  # duplicate 515 or restart: the request goes out again
    EXECUTING = "executing"
    SUCCESSFUL = "successful"
    FAILED = "failed"  # the child failed it
    ABORTED = "aborted"  # timeout, download failure, local error
    WAITING = "waiting"  # the download waits for its window: Cumulocity hears EXECUTING now


@dataclass(frozen=True)
class Outcome:
    state: State
    to_cloud: tuple[str, ...]


def step(
    state: State,
    event: Event,
    *,
    reason: str | None = None,
    installed: str = "",
    c8y_id: str | None = None,
) -> Outcome:
    """Decide the next state and the SmartREST lines for Cumulocity.

    `reason` is the failure text (FAILED: the child's, ABORTED: ours); `installed` is the `115`
    line to send on success. With the Cumulocity operation's `c8y_id` (operations taken by id)
    the status lines name it (`504`/`505`/`506`); without, they name the operation type
    (`501`/`502`/`503`, which act on the device's oldest operation of that type).
    """
    if state.ended:
        raise InvalidTransition(f"operation already {state.value}, cannot take {event.value}")
    executing, successful, failed = _status_lines(c8y_id)
    announce = () if state.announced else (executing,)
    match event:
        case Event.READY if state.fetching:
            # announced while it waited for a download window: the request goes out EXECUTING
            return Outcome(State.EXECUTING if state.announced else State.PENDING, ())
        case Event.WAITING if state.fetching:
            return Outcome(State.WAITING, announce)
        case Event.RESENT:
            return Outcome(state, ())
        case Event.EXECUTING if not state.fetching:
            return Outcome(State.EXECUTING, announce)
        case Event.SUCCESSFUL if not state.fetching:
            return Outcome(State.SUCCESSFUL, (*announce, installed, successful))
        case Event.FAILED if not state.fetching:
            text = reason if reason and reason.strip() else NO_REASON
            return Outcome(State.FAILED, (*announce, failed(text)))
        case Event.ABORTED:
            return Outcome(State.FAILED, (*announce, failed(reason or "Failed")))
    raise InvalidTransition(f"{event.value} is not allowed while {state.value}")


def _status_lines(c8y_id: str | None) -> tuple[str, str, Callable[[str], str]]:
    if c8y_id is None:
        return smartrest.set_executing(), smartrest.set_successful(), smartrest.set_failed
    return (
        smartrest.set_executing_by_id(c8y_id),
        smartrest.set_successful_by_id(c8y_id),
        functools.partial(smartrest.set_failed_by_id, c8y_id),
    )


def timeout_reason(child_id: str, seconds: int, op_id: str) -> str:
    return (
        f"Child device {child_id} did not respond within the timeout interval of "
        f"{seconds}sec. Operation ID={op_id}"
    )


def new_operation_id() -> str:
    """21 random characters from the URL-safe alphabet, like thin-edge's nanoid ids."""
    # 64 characters: the low 6 bits of a random byte pick one uniformly (one system call for
    # the whole id, where secrets.choice made one per character)
    return "".join(_ID_ALPHABET[byte & 63] for byte in secrets.token_bytes(21))


def file_id_for_url(url: str) -> str:
    """The cache key of a firmware: lowercase hex SHA-256 of the url's UTF-8 bytes."""
    return hashlib.sha256(url.encode("utf-8", "surrogatepass")).hexdigest()
