"""The child-device `firmware_update` JSON messages (request to the child, response from it)."""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass

from tedge_firmware.errors import MessageError

MAX_RESPONSE_BYTES = 64 * 1024


@dataclass(frozen=True)
class FirmwareUpdateRequest:
    """What the plugin asks a child to install (key order is the wire order)."""

    id: str
    attempt: int
    name: str
    version: str
    sha256: str
    url: str

    def to_json(self) -> str:
        return json.dumps(
            {
                "id": self.id,
                "attempt": self.attempt,
                "name": self.name,
                "version": self.version,
                "sha256": self.sha256,
                "url": self.url,
            },
            separators=(",", ":"),
            ensure_ascii=False,
        )


class ChildStatus(enum.Enum):
    EXECUTING = "executing"
    SUCCESSFUL = "successful"
    FAILED = "failed"


@dataclass(frozen=True)
class FirmwareUpdateResponse:
    """A child's status for one operation. Unknown extra keys are ignored, as thin-edge does."""

    id: str
    status: ChildStatus
    reason: str | None = None


def parse_response(payload: bytes) -> FirmwareUpdateResponse:
    """Parse a response payload; MessageError says precisely what is wrong."""
    if len(payload) > MAX_RESPONSE_BYTES:
        raise MessageError(f"payload of {len(payload)} bytes exceeds {MAX_RESPONSE_BYTES}")
    try:
        document = json.loads(payload.decode("utf-8"))
    except UnicodeDecodeError:
        raise MessageError("payload is not UTF-8") from None
    except (ValueError, RecursionError) as error:  # ValueError: also a 5,000-digit number
        raise MessageError(f"payload is not JSON: {error}") from None
    if not isinstance(document, dict):
        raise MessageError("payload is not a JSON object")
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
    return FirmwareUpdateResponse(id=op_id, status=child_status, reason=reason)
