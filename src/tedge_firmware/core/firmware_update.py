"""The `firmware_update` messages between the gateway and a child, both ways, pure: the one
wire format the gateway and the connector SDK share (reference §1.4, §1.5).

The gateway sends a request on `tedge/<child>/commands/req/firmware_update`:
`{"id","attempt","name","version","sha256","url"}` (key order is the wire order). The child
answers on `tedge/<child>/commands/res/firmware_update` with `{"id","status"[,"reason"]}`.

Everything read here comes from the broker, so nothing is trusted: `parse_request` never raises
(it returns a `BadRequest` that says what is wrong and, when the payload has a usable `id`,
which operation to fail); `parse_response` raises only MessageError.

Decisions a device maker may want to know about:

- `sha256` is required in a request (64 hex digits): a child never applies a file it cannot
  check.
- The `url` may name any http(s) host, not only the gateway's file-transfer service: the
  SHA-256 check protects against corrupted and tampered transfers, a host allow-list would add
  nothing against whoever can publish requests, and would break gateways behind NAT.
- `attempt` defaults to 1, `name` and `version` to "" when missing (they are informative).
- Unknown extra keys are ignored both ways, as thin-edge does.

thin-edge 1.x/2.x commands (`te/`, reference "thin-edge-te-firmware" §2-§3) are the second half
of this module: a retained `te/<entity>/cmd/firmware_update/<cmd-id>` whose payload is the whole
command, `{"status", "remoteUrl", "tedgeUrl"?, "name", "version", ...}`. Whoever moves the
command re-publishes the whole payload with a new `status`: `TeCommand.moved_to` keeps every
field it was given, in order, and changes only the ones named. An empty payload clears it.
"""

from __future__ import annotations

import enum
import json
import math
import re
from dataclasses import dataclass

from tedge_firmware.core.text import one_line
from tedge_firmware.core.urls import firmware_url_problem, is_proxy_url_for
from tedge_firmware.errors import MessageError

MAX_PAYLOAD_BYTES = 64 * 1024
MAX_ID_CHARS = 256
MAX_ATTEMPT = 2**31 - 1

_SHA256 = re.compile(r"[0-9a-fA-F]{64}", re.ASCII)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class ChildStatus(enum.Enum):
    EXECUTING = "executing"
    SUCCESSFUL = "successful"
    FAILED = "failed"


@dataclass(frozen=True)
class FirmwareUpdateRequest:
    """What the gateway asks a child to install (sha256 in lowercase once parsed)."""

    operation_id: str
    attempt: int
    name: str
    version: str
    sha256: str
    url: str

    def to_json(self) -> str:
        return json.dumps(
            {
                "id": self.operation_id,
                "attempt": self.attempt,
                "name": self.name,
                "version": self.version,
                "sha256": self.sha256,
                "url": self.url,
            },
            separators=(",", ":"),
            ensure_ascii=False,
        )


@dataclass(frozen=True)
class BadRequest:
    """A request that cannot be carried out; `operation_id` is None when it has no usable id."""

    operation_id: str | None
    problem: str


@dataclass(frozen=True)
class FirmwareUpdateResponse:
    """A child's status for one operation."""

    operation_id: str
    status: ChildStatus
    reason: str | None = None

    def to_json(self) -> str:
        """The compact JSON; a failure carries a one-line `reason`."""
        document: dict[str, str] = {"id": self.operation_id, "status": self.status.value}
        if self.status is ChildStatus.FAILED:
            document["reason"] = one_line(self.reason or "failed")
        return json.dumps(document, separators=(",", ":"), ensure_ascii=False)


def parse_request(payload: bytes) -> FirmwareUpdateRequest | BadRequest:
    """Parse a request payload; never raises."""
    document = _json_object(payload)
    if isinstance(document, str):
        return BadRequest(None, document)
    op_id = document.get("id")
    if not isinstance(op_id, str) or not is_usable_id(op_id):
        return BadRequest(None, "'id' is missing or not a short printable string")
    request = _request(op_id, document)
    return BadRequest(op_id, request) if isinstance(request, str) else request


def parse_response(payload: bytes) -> FirmwareUpdateResponse:
    """Parse a response payload; MessageError says precisely what is wrong."""
    document = _json_object(payload)
    if isinstance(document, str):
        raise MessageError(document)
    op_id = document.get("id")
    if not isinstance(op_id, str) or not op_id:
        raise MessageError("'id' is missing or not a non-empty string")
    status = document.get("status")
    try:
        child_status = ChildStatus(status) if isinstance(status, str) else None
    except ValueError:
        child_status = None
    if child_status is None:
        raise MessageError(f"'status' {status!r} is not executing, successful or failed")
    reason = document.get("reason")
    if reason is not None and not isinstance(reason, str):
        raise MessageError("'reason' is not a string")
    return FirmwareUpdateResponse(operation_id=op_id, status=child_status, reason=reason)


def _json_object(payload: bytes, *, strict_numbers: bool = False) -> dict[str, object] | str:
    """The payload's JSON object, or what is wrong with it. `strict_numbers` refuses NaN and
    Infinity, which could not be written back as JSON."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        return f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD_BYTES}"
    try:
        text = payload.decode("utf-8")
        document = (
            json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
            if strict_numbers
            else json.loads(text)
        )
    except UnicodeDecodeError:
        return "payload is not UTF-8"
    except (ValueError, RecursionError) as error:  # ValueError: also a 5,000-digit number
        return f"payload is not JSON: {one_line(str(error), 200)}"
    if not isinstance(document, dict):
        return "payload is not a JSON object"
    return document


def _refuse_constant(name: str) -> object:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:50]} is out of range")
    return value


def is_usable_id(value: str) -> bool:
    return 0 < len(value) <= MAX_ID_CHARS and value.strip() == value and not _CONTROL.search(value)


def _request(op_id: str, document: dict[str, object]) -> FirmwareUpdateRequest | str:
    """The request an identified payload makes, or what makes it unusable."""
    attempt = document.get("attempt", 1)
    if isinstance(attempt, bool) or not isinstance(attempt, int):
        return "'attempt' is not an integer"
    if not 1 <= attempt <= MAX_ATTEMPT:
        return f"'attempt' {attempt} is out of range"
    name, version = document.get("name", ""), document.get("version", "")
    for key, value in (("name", name), ("version", version)):
        if not isinstance(value, str):
            return f"'{key}' is not a string"
        if "\x00" in value:
            return f"'{key}' contains a NUL character"
    assert isinstance(name, str) and isinstance(version, str)
    sha256 = document.get("sha256")
    if sha256 is None:
        return "'sha256' is missing: the firmware cannot be verified"
    if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
        return "'sha256' is not 64 hexadecimal digits"
    url = document.get("url")
    if not isinstance(url, str) or not url:
        return "'url' is missing or not a string"
    problem = _url_problem(url)
    if problem is not None:
        return problem
    return FirmwareUpdateRequest(op_id, attempt, name, version, sha256.lower(), url)


def _url_problem(url: str) -> str | None:
    if " " in url:
        return "'url' contains spaces"
    problem = firmware_url_problem(url)
    return None if problem is None else f"'url' is an {problem}"


# ---- thin-edge 1.x/2.x `te/` commands ------------------------------------------------------

TE_COMMAND_FILTER = "te/+/+/+/+/cmd/firmware_update/+"
TE_INIT, TE_EXECUTING, TE_SUCCESSFUL, TE_FAILED = "init", "executing", "successful", "failed"
# States with a meaning to thin-edge itself: a participant's own state must be none of them.
TE_RESERVED_STATES = frozenset({TE_INIT, "scheduled", TE_EXECUTING, TE_SUCCESSFUL, TE_FAILED})
TE_FINAL_STATES = frozenset({TE_SUCCESSFUL, TE_FAILED})
_TE_STATE = re.compile(r"[a-z][a-z0-9_-]{0,63}", re.ASCII)


@dataclass(frozen=True)
class TeCommandTopic:
    """`te/<entity>/cmd/firmware_update/<cmd_id>`, with `entity` the four-level topic id of
    the device (`device/<name>//` for thin-edge's default scheme)."""

    entity: str
    cmd_id: str

    @property
    def topic(self) -> str:
        return f"te/{self.entity}/cmd/firmware_update/{self.cmd_id}"

    @property
    def device_name(self) -> str | None:
        """`<name>` of a `device/<name>//` entity; None for any other entity."""
        parts = self.entity.split("/")
        if parts[0] == "device" and parts[1] and parts[2:] == ["", ""]:
            return parts[1]
        return None


def parse_te_command_topic(topic: str) -> TeCommandTopic:
    """The entity and command id of a `te/` firmware_update command topic; MessageError when
    the topic is not one (wrong shape, empty or path-like command id)."""
    parts = topic.split("/")
    if len(parts) != 8 or parts[0] != "te" or parts[5:7] != ["cmd", "firmware_update"]:
        raise MessageError(f"not a te/<entity>/cmd/firmware_update/<id> topic: {topic[:200]!r}")
    cmd_id = parts[7]
    if not is_usable_id(cmd_id) or cmd_id in (".", ".."):
        raise MessageError(f"unusable command id in {topic[:200]!r}")
    return TeCommandTopic("/".join(parts[1:5]), cmd_id)


def te_state_problem(state: str) -> str | None:
    """Why `state` cannot be a participant's own state of the command, or None."""
    if not _TE_STATE.fullmatch(state):
        return f"{state!r} is not a state name (lowercase letters, digits, '_' and '-')"
    if state in TE_RESERVED_STATES:
        return f"{state!r} is a state thin-edge itself gives a meaning to"
    return None


@dataclass(frozen=True)
class TeCommand:
    """One state of a `te/` firmware_update command: the whole payload, order kept.

    Only `status` is required to read one; `download()` checks what a download needs.
    """

    fields: dict[str, object]

    @property
    def status(self) -> str:
        status = self.fields["status"]
        assert isinstance(status, str)
        return status

    def text(self, key: str) -> str | None:
        value = self.fields.get(key)
        return value if isinstance(value, str) else None

    def download(self) -> TeDownload:
        """What to fetch for this command; MessageError names the field that is wrong."""
        for key in ("remoteUrl", "name", "version"):
            if not isinstance(self.fields.get(key), str):
                raise MessageError(f"'{key}' is missing or not a string")
        remote_url = self.text("remoteUrl") or ""
        problem = _url_problem(remote_url)
        if problem is not None:
            raise MessageError(problem.replace("'url'", "'remoteUrl'"))
        tedge_url = self.fields.get("tedgeUrl")
        if tedge_url is not None and not isinstance(tedge_url, str):
            raise MessageError("'tedgeUrl' is not a string")
        return TeDownload(
            remote_url=remote_url,
            tedge_url=tedge_url,
            name=self.text("name") or "",
            version=self.text("version") or "",
        )

    def moved_to(self, status: str, **changes: object) -> str:
        """The whole payload in its next state, as JSON: every field kept, `status` and the
        `changes` set (new keys at the end)."""
        document = {**self.fields, "status": status, **changes}
        text = json.dumps(document, separators=(",", ":"), ensure_ascii=False)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate from a "\ud800" escape: keep it escaped
            text = json.dumps(document, separators=(",", ":"))
        return text

    def failed(self, reason: str) -> str:
        return self.moved_to(TE_FAILED, reason=one_line(reason))


@dataclass(frozen=True)
class TeDownload:
    """The firmware a command asks for, cached under `remote_url`."""

    remote_url: str
    tedge_url: str | None
    name: str
    version: str

    def source_url(self, proxy_host: str, proxy_port: int) -> str:
        """Where to fetch it: `tedge_url` when it is thin-edge's Cumulocity proxy (at
        `proxy_host:proxy_port`) for `remote_url`, else `remote_url` itself."""
        if self.tedge_url is not None and is_proxy_url_for(
            self.tedge_url, self.remote_url, proxy_host, proxy_port
        ):
            return self.tedge_url
        return self.remote_url


def parse_te_command(payload: bytes) -> TeCommand | None:
    """A command payload; None for the empty payload that clears the command. MessageError
    says what is wrong (not JSON, no `status`, NaN, ...)."""
    if not payload:
        return None
    document = _json_object(payload, strict_numbers=True)
    if isinstance(document, str):
        raise MessageError(document)
    status = document.get("status")
    if not isinstance(status, str) or not status or _CONTROL.search(status):
        raise MessageError("'status' is missing or not a printable string")
    return TeCommand(document)
