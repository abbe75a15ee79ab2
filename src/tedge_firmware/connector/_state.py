"""What the connector knows about each operation, and what to do with it: pure, no I/O.

Theory of operation. Every operation (one request id for one child) has one record, persisted
atomically in the work directory before anything is done about it, and its `phase` says how far
it got:

    RECEIVED ──▶ DOWNLOADING ──▶ DOWNLOADED ──▶ APPLYING ──▶ SUCCESSFUL
        │             │   ▲           │             │
        └─────────────┴───┼───────────┴─────────────┴──────▶ FAILED
                          └── DOWNLOADED: the verified file is gone or changed after a restart

- A request for an unknown id starts an operation (`on_request` → START); a re-sent request
  (any attempt) for a running one only gets `executing` again (ACKNOWLEDGE); for an ended one,
  its final status again (REPORT_AGAIN): an applied firmware is never applied twice.
- After a restart (`on_restart`): RECEIVED, DOWNLOADING and DOWNLOADED go on (the download
  resumes from its partial file, a downloaded file is checked again). APPLYING means the apply
  step was started and its end was never recorded, so it is SETTLEd: the apply command's own
  recorded exit status when it outlived the connector, else the user's verify step, else
  FAILED "interrupted during apply". It is never re-run and never assumed successful. An ended
  operation whose status may not have reached the broker is REPORTed again.
- Ended records are kept for `retention` seconds (a late re-send still finds them), then
  forgotten (`expired`).
"""

from __future__ import annotations

import enum
import hashlib
import json
import re
from dataclasses import asdict, dataclass, replace
from typing import Any

from tedge_firmware.core.firmware_update import FirmwareUpdateRequest
from tedge_firmware.errors import InvalidTransition

INTERRUPTED = "interrupted during apply"

_SAFE_KEY = re.compile(r"[A-Za-z0-9_-]{1,64}", re.ASCII)


class Phase(enum.Enum):
    """How far one operation got on this device (persisted, and reported to progress hooks)."""

    RECEIVED = "received"
    """The request is recorded and acknowledged with `executing`."""
    DOWNLOADING = "downloading"
    """The firmware is being downloaded (a partial file may be on disk)."""
    DOWNLOADED = "downloaded"
    """The firmware file is complete and its SHA-256 matches the request."""
    APPLYING = "applying"
    """The apply step was started and has not finished."""
    SUCCESSFUL = "successful"
    """The firmware is applied; `successful` is reported."""
    FAILED = "failed"
    """The operation failed; `failed` is reported with the reason."""

    @property
    def ended(self) -> bool:
        """Whether the operation is over (successful or failed)."""
        return self in (Phase.SUCCESSFUL, Phase.FAILED)


TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.RECEIVED: frozenset({Phase.DOWNLOADING, Phase.DOWNLOADED, Phase.FAILED}),
    Phase.DOWNLOADING: frozenset({Phase.DOWNLOADED, Phase.FAILED}),
    Phase.DOWNLOADED: frozenset({Phase.DOWNLOADING, Phase.APPLYING, Phase.FAILED}),
    Phase.APPLYING: frozenset({Phase.SUCCESSFUL, Phase.FAILED}),
    Phase.SUCCESSFUL: frozenset(),
    Phase.FAILED: frozenset(),
}


@dataclass(frozen=True)
class ProcessIdentity:
    """A detached apply command, told apart from a later process that reuses its pid.

    `start_ticks` is field 22 of /proc/<pid>/stat and `boot_id` the kernel's boot id (None when
    /proc could not tell); `started_at` is the wall-clock time it was started.
    """

    pid: int
    pgid: int
    start_ticks: int | None
    boot_id: str | None
    started_at: float


@dataclass(frozen=True)
class OperationRecord:
    """The persisted state of one operation."""

    child_id: str
    operation_id: str
    attempt: int
    name: str
    version: str
    sha256: str
    url: str
    phase: Phase
    reason: str | None = None
    reported: bool = False
    updated_at: float = 0.0
    process: ProcessIdentity | None = None
    # A `te/` command's whole payload as the gateway handed it over (None: a legacy request):
    # the final status re-publishes it with every field kept.
    command: dict[str, Any] | None = None
    # The `<address>` of `tedge/<address>/commands/req/...` the request came on, when it is
    # not the child id (the gateway's external id for a child registered over `te/`):
    # responses go back there.
    address: str | None = None


class RequestAction(enum.Enum):
    START = "start"  # a new operation (or one this device forgot): record it and work on it
    ACKNOWLEDGE = "acknowledge"  # running: say `executing` again, nothing else
    REPORT_AGAIN = "report-again"  # ended: send its final status again, never redo it


class RestartAction(enum.Enum):
    RESUME = "resume"  # download (again, or from the partial file), check, then apply
    SETTLE = "settle"  # the apply step was interrupted: decide without re-running it
    REPORT = "report"  # ended, but the status may not have reached the broker
    NOTHING = "nothing"


def new_record(
    child_id: str,
    request: FirmwareUpdateRequest,
    now: float,
    command: dict[str, Any] | None = None,
    address: str | None = None,
) -> OperationRecord:
    return OperationRecord(
        command=command,
        address=None if address == child_id else address,
        child_id=child_id,
        operation_id=request.operation_id,
        attempt=request.attempt,
        name=request.name,
        version=request.version,
        sha256=request.sha256,
        url=request.url,
        phase=Phase.RECEIVED,
        updated_at=now,
    )


def advance(
    record: OperationRecord,
    phase: Phase,
    *,
    now: float,
    reason: str | None = None,
    process: ProcessIdentity | None = None,
) -> OperationRecord:
    """The record in its next phase; InvalidTransition for a move the table does not allow."""
    if phase not in TRANSITIONS[record.phase]:
        raise InvalidTransition(
            f"operation {record.operation_id}: {record.phase.value} -> {phase.value}"
        )
    return replace(
        record,
        phase=phase,
        reason=reason if phase is Phase.FAILED else None,
        reported=False,
        updated_at=now,
        process=process if phase is Phase.APPLYING else None,
    )


def on_request(known: OperationRecord | None, running: bool) -> RequestAction:
    """What a (possibly re-sent) request for an operation calls for."""
    if known is not None and known.phase.ended:
        return RequestAction.REPORT_AGAIN
    if running:
        return RequestAction.ACKNOWLEDGE
    return RequestAction.START


def on_restart(record: OperationRecord) -> RestartAction:
    """What a record found at start-up calls for."""
    if record.phase.ended:
        return RestartAction.NOTHING if record.reported else RestartAction.REPORT
    if record.phase is Phase.APPLYING:
        return RestartAction.SETTLE
    return RestartAction.RESUME


def expired(record: OperationRecord, now: float, retention: float) -> bool:
    """Whether an ended, reported record is old enough to be forgotten. A `te/` command's
    record goes after `retention` even when its report was never acknowledged: the report is
    sent again only while the command is still in the gateway's state, and a command is not
    kept that long."""
    reported = record.reported or record.command is not None
    return record.phase.ended and reported and now - record.updated_at > retention


def file_key(operation_id: str) -> str:
    """A file name for an operation id: the id itself when safe, else a digest of it."""
    if _SAFE_KEY.fullmatch(operation_id):
        return operation_id
    return "x-" + hashlib.sha256(operation_id.encode("utf-8", "surrogatepass")).hexdigest()[:40]


def sha256_mismatch(expected: str, actual: str) -> str:
    return f"SHA-256 mismatch: the request says {expected}, the downloaded file has {actual}"


def not_confirmed(record: OperationRecord, detail: str | None) -> str:
    """The reason when the verify step does not confirm an interrupted apply."""
    if detail:
        return f"{INTERRUPTED}; verify step: {detail}"
    return f"{INTERRUPTED}; the verify step did not confirm {record.name} {record.version}"


# ---- persistence format -----------------------------------------------------------------------

_FIELDS: dict[str, tuple[type, ...]] = {
    "child_id": (str,),
    "operation_id": (str,),
    "attempt": (int,),
    "name": (str,),
    "version": (str,),
    "sha256": (str,),
    "url": (str,),
    "phase": (str,),
    "reason": (str, type(None)),
    "reported": (bool,),
    "updated_at": (int, float),
    "process": (dict, type(None)),
    "command": (dict, type(None)),
    "address": (str, type(None)),
}
_PROCESS_FIELDS: dict[str, tuple[type, ...]] = {
    "pid": (int,),
    "pgid": (int,),
    "start_ticks": (int, type(None)),
    "boot_id": (str, type(None)),
    "started_at": (int, float),
}


def encode_record(record: OperationRecord) -> bytes:
    document = asdict(record)
    document["phase"] = record.phase.value
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def decode_record(data: bytes) -> OperationRecord:
    """Parse a persisted record; ValueError says what is wrong. Unknown keys are ignored."""
    try:
        document = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise ValueError(f"not a JSON record: {error}") from None
    if isinstance(document, dict):
        document.setdefault("command", None)  # written before `te/` support
        document.setdefault("address", None)
    fields = _checked(document, _FIELDS, "record")
    try:
        phase = Phase(fields["phase"])
    except ValueError:
        raise ValueError(f"unknown phase {fields['phase']!r}") from None
    process = fields["process"]
    identity = None
    if process is not None:
        identity = ProcessIdentity(**_checked(process, _PROCESS_FIELDS, "process"))
    return OperationRecord(**{**fields, "phase": phase, "process": identity})


def _checked(document: object, spec: dict[str, tuple[type, ...]], what: str) -> dict[str, Any]:
    if not isinstance(document, dict):
        raise ValueError(f"{what} is not a JSON object")
    values: dict[str, Any] = {}
    for key, kinds in spec.items():
        if key not in document:
            raise ValueError(f"{what} has no {key!r}")
        value = document[key]
        if isinstance(value, bool) and bool not in kinds:
            raise ValueError(f"{what}: {key!r} has the wrong type")
        if not isinstance(value, kinds):
            raise ValueError(f"{what}: {key!r} has the wrong type")
        values[key] = value
    return values
