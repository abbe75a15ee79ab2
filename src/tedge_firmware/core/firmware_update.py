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
"""

from __future__ import annotations

import enum
import json
import re
from dataclasses import dataclass

from tedge_firmware.core.text import one_line
from tedge_firmware.core.urls import firmware_url_problem
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
    if not isinstance(op_id, str) or not _is_usable_id(op_id):
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


def _json_object(payload: bytes) -> dict[str, object] | str:
    """The payload's JSON object, or what is wrong with it."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        return f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD_BYTES}"
    try:
        document = json.loads(payload.decode("utf-8"))
    except UnicodeDecodeError:
        return "payload is not UTF-8"
    except (ValueError, RecursionError) as error:  # ValueError: also a 5,000-digit number
        return f"payload is not JSON: {one_line(str(error), 200)}"
    if not isinstance(document, dict):
        return "payload is not a JSON object"
    return document


def _is_usable_id(value: str) -> bool:
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
