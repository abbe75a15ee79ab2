"""The child side of the legacy `firmware_update` protocol, pure: requests in, statuses out.

A request arrives on `tedge/<child>/commands/req/firmware_update` (reference §1.4):
`{"id","attempt","name","version","sha256","url"}`. The child answers on
`tedge/<child>/commands/res/firmware_update` with `{"id","status"[,"reason"]}` (§1.5).

Everything here comes from the broker, so nothing is trusted: `parse_request` never raises, it
returns either a `Request` or a `BadRequest` that says what is wrong and, when the payload has a
usable `id`, which operation to fail.

Decisions a device maker may want to know about:

- `sha256` is required (64 hex digits): the connector never applies a file it cannot check.
- The `url` may name any http(s) host, not only the gateway's file-transfer service. Whoever can
  publish on the request topic can already name any file, since the gateway's file-transfer
  service accepts uploads without authentication; a host allow-list would add no protection,
  while gateways behind NAT or with several addresses would break. The SHA-256 check protects
  against corrupted and tampered transfers, not against a hostile broker.
- `attempt` defaults to 1, `name` and `version` to "" when missing (they are informative).
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from tedge_firmware.core import topics
from tedge_firmware.core.text import one_line

MAX_REQUEST_BYTES = 64 * 1024
MAX_ID_CHARS = 256
MAX_ATTEMPT = 2**31 - 1

Status = Literal["executing", "successful", "failed"]

_SHA256 = re.compile(r"[0-9a-fA-F]{64}", re.ASCII)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_REQUEST_SUFFIX = "/commands/req/firmware_update"


@dataclass(frozen=True)
class Request:
    """A well-formed firmware_update request (sha256 in lowercase)."""

    operation_id: str
    attempt: int
    name: str
    version: str
    sha256: str
    url: str


@dataclass(frozen=True)
class BadRequest:
    """A request that cannot be carried out; `operation_id` is None when it has no usable id."""

    operation_id: str | None
    problem: str


def request_topic(child_id: str) -> str:
    """The topic on which the gateway sends `child_id` its firmware_update requests."""
    return topics.firmware_request_topic(child_id)


def response_topic(child_id: str) -> str:
    """The topic on which `child_id` answers."""
    return topics.firmware_response_topic(child_id)


def registration_topic(child_id: str) -> str:
    """Where a retained `{}` declares that `child_id` supports firmware_update (thin-edge 1.x
    style capability; an empty retained payload removes it)."""
    return f"te/device/{child_id}///cmd/firmware_update"


def child_of_request_topic(topic: str, children: Collection[str]) -> str | None:
    """The child a request topic is for, when it is one of `children`; None otherwise."""
    if not topic.startswith("tedge/") or not topic.endswith(_REQUEST_SUFFIX):
        return None
    child = topic[len("tedge/") : -len(_REQUEST_SUFFIX)]
    return child if child in children else None


def parse_request(payload: bytes) -> Request | BadRequest:
    """Parse a request payload; never raises."""
    if len(payload) > MAX_REQUEST_BYTES:
        return BadRequest(None, f"payload of {len(payload)} bytes exceeds {MAX_REQUEST_BYTES}")
    try:
        document = json.loads(payload.decode("utf-8"))
    except UnicodeDecodeError:
        return BadRequest(None, "payload is not UTF-8")
    except (ValueError, RecursionError):  # ValueError: also a 5,000-digit number
        return BadRequest(None, "payload is not JSON")
    if not isinstance(document, dict):
        return BadRequest(None, "payload is not a JSON object")
    op_id = document.get("id")
    if not _is_usable_id(op_id):
        return BadRequest(None, "'id' is missing or not a short printable string")
    assert isinstance(op_id, str)
    problem = _field_problem(document)
    if problem is not None:
        return BadRequest(op_id, problem)
    return Request(
        operation_id=op_id,
        attempt=document.get("attempt", 1),
        name=document.get("name", ""),
        version=document.get("version", ""),
        sha256=document["sha256"].lower(),
        url=document["url"],
    )


def _is_usable_id(value: object) -> bool:
    return (
        isinstance(value, str)
        and 0 < len(value) <= MAX_ID_CHARS
        and value.strip() == value
        and not _CONTROL.search(value)
    )


def _field_problem(document: dict[str, object]) -> str | None:
    """What makes an otherwise identified request unusable, or None."""
    attempt = document.get("attempt", 1)
    if isinstance(attempt, bool) or not isinstance(attempt, int):
        return "'attempt' is not an integer"
    if not 1 <= attempt <= MAX_ATTEMPT:
        return f"'attempt' {attempt} is out of range"
    for key in ("name", "version"):
        value = document.get(key, "")
        if not isinstance(value, str):
            return f"'{key}' is not a string"
        if "\x00" in value:
            return f"'{key}' contains a NUL character"
    sha256 = document.get("sha256")
    if sha256 is None:
        return "'sha256' is missing: the firmware cannot be verified"
    if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
        return "'sha256' is not 64 hexadecimal digits"
    return _url_problem(document.get("url"))


def _url_problem(url: object) -> str | None:
    if not isinstance(url, str) or not url:
        return "'url' is missing or not a string"
    if _CONTROL.search(url) or " " in url:
        return "'url' contains spaces or control characters"
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 (raises ValueError for a bad port)
    except ValueError:
        return "'url' is not a valid url"
    if parts.scheme not in ("http", "https") or not host:
        return "'url' is not an http(s) url with a host"
    return None


def status_message(operation_id: str, status: Status, reason: str | None = None) -> str:
    """The compact JSON response for one operation; a failure carries a one-line `reason`."""
    document: dict[str, str] = {"id": operation_id, "status": status}
    if status == "failed":
        document["reason"] = one_line(reason or "failed")
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False)


