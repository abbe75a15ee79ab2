"""Resuming a download: how an answer continues the bytes we hold, and the resume record kept
beside a partial file (what a later run needs to resume it). Pure, like `core.retry`.

- The first request has no Range. A 200 streams the whole body into `<target>.part`.
- A broken transfer keeps the bytes received so far. If the first answer carried a usable
  validator (a strong ETag, else Last-Modified), the next request asks for `bytes=<size>-` with
  `If-Range: <validator>`; `resume_decision` then says whether the answer continues the file
  (206 for the same offset and the same validator), replaces it (200) or cannot be used (a 206
  for another offset or of a changed file, a 416), in which case the partial file is dropped.
- The partial file survives restarts: beside it, a small JSON resume record
  (`encode_resume_state`) keeps the url, the validator, the total size and the digest the
  server declared. `plan_restart` decides from that record and the partial file's size how
  much of it a new run keeps; everything it does not trust starts from zero.
- When the server declares a digest of the whole file (`core.http.declared_sha256`), the
  finished file must have it.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Literal

from tedge_firmware.core.http import (
    lower_keys,
    parse_content_length,
    parse_content_range,
    resume_validator,
)


class ResumeAction(enum.Enum):
    """What to do with an answer to a (possibly ranged) download request."""

    CONTINUE = "continue"  # a 206 for our offset: append the body to the partial file
    RESTART = "restart"  # a 200: the body is the whole file; truncate and write from zero
    REFETCH = "refetch"  # an unusable partial answer: drop the partial file and ask again
    NOT_A_BODY = "not_a_body"  # an error or unexpected status: classify it as a failure


@dataclass(frozen=True)
class ResumeDecision:
    """The verdict of `resume_decision`.

    `offset` is where the body starts in the file; `body_end` is where the file should end
    after this body (None when unknown) and `total` the full size of the file when known.
    `reason` says why for REFETCH.
    """

    action: ResumeAction
    offset: int = 0
    body_end: int | None = None
    total: int | None = None
    reason: str = ""


def resume_decision(
    status: int,
    headers: Mapping[str, str],
    offset: int,
    *,
    validator: str | None = None,
    expected_total: int | None = None,
) -> ResumeDecision:
    """Decide how an answer continues a download that already holds `offset` bytes.

    `validator` is what we sent in If-Range. When the 206 itself names a different ETag (or
    Last-Modified) the file changed on the server: some servers (aiohttp <= 3.14.5) ignore an
    entity-tag If-Range and would hand us the tail of the new file. `expected_total` is the
    file size an earlier answer announced; a 206 naming another size is of another file too.
    """
    fields = lower_keys(headers)
    if status == HTTPStatus.OK:
        length = parse_content_length(fields.get("content-length"))
        return ResumeDecision(ResumeAction.RESTART, 0, length, length)
    if status == HTTPStatus.PARTIAL_CONTENT:
        return _partial_decision(fields, offset, validator, expected_total)
    if status == HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE and offset > 0:
        return _refetch(f"the server cannot serve bytes {offset}- (HTTP 416)")
    return ResumeDecision(ResumeAction.NOT_A_BODY, offset)


def _partial_decision(
    fields: Mapping[str, str], offset: int, validator: str | None, expected_total: int | None
) -> ResumeDecision:
    content_range = parse_content_range(fields.get("content-range"))
    if content_range is None:
        return _refetch("HTTP 206 without a valid Content-Range")
    start, end, total = content_range
    if start != offset:
        return _refetch(f"HTTP 206 for bytes {start}- instead of {offset}-")
    if validator is not None and _validator_changed(fields, validator):
        return _refetch("the file changed on the server")
    if expected_total is not None and total is not None and total != expected_total:
        return _refetch(f"the file size changed on the server ({expected_total} to {total})")
    body_end = None if end is None else end + 1
    length = parse_content_length(fields.get("content-length"))
    if length is not None and body_end is not None and length != body_end - start:
        return _refetch("HTTP 206 whose Content-Length does not match its Content-Range")
    return ResumeDecision(ResumeAction.CONTINUE, offset, body_end, total)


def _validator_changed(fields: Mapping[str, str], validator: str) -> bool:
    name = "etag" if validator.startswith('"') else "last-modified"
    current = fields.get(name)
    return current is not None and current.strip() != validator


def _refetch(reason: str) -> ResumeDecision:
    return ResumeDecision(ResumeAction.REFETCH, 0, None, None, reason)


ValidatorKind = Literal["etag", "last-modified"]

RESUME_RECORD_VERSION = 1


# A resume record is a few hundred bytes; a bigger file is not ours and is not parsed.
MAX_RESUME_RECORD_BYTES = 64 * 1024

_RECORD_FIELDS = frozenset({"version", "url", "validator", "validator_kind", "total", "sha256"})


_HEX_SHA256 = re.compile(r"[0-9a-f]{64}", re.ASCII)

_MAX_SIZE = 10**19 - 1  # what parse_content_length and parse_content_range accept


@dataclass(frozen=True)
class ResumeState:
    """What a later run needs to resume a partial file: the url it is a download of, the
    validator to send in If-Range (None: not resumable), the file's total size and the
    SHA-256 (hex) the server declared for it, when known. The bytes already written are the
    partial file's size; they are not recorded, since the file itself is the truth."""

    url: str
    validator: str | None = None
    total: int | None = None
    sha256: str | None = None

    @property
    def validator_kind(self) -> ValidatorKind | None:
        if self.validator is None:
            return None
        return "etag" if self.validator.startswith('"') else "last-modified"


def encode_resume_state(state: ResumeState) -> bytes:
    """The resume record as UTF-8 JSON (what `decode_resume_state` reads back)."""
    record = {
        "version": RESUME_RECORD_VERSION,
        "url": state.url,
        "validator": state.validator,
        "validator_kind": state.validator_kind,
        "total": state.total,
        "sha256": state.sha256,
    }
    return json.dumps(record, indent=1).encode()


def decode_resume_state(raw: bytes) -> ResumeState | None:
    """A resume record read back, or None when it is not one we wrote (any doubt: None).

    The validator goes into a request header, so it is checked as strictly as when it came
    from the server: a record edited to carry `"x"\\r\\nX-Evil: 1` is refused.
    """
    if len(raw) > MAX_RESUME_RECORD_BYTES:
        return None
    try:
        record = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    if not isinstance(record, dict) or set(record) != _RECORD_FIELDS:
        return None
    if not (_is_int(record["version"]) and record["version"] == RESUME_RECORD_VERSION):
        return None
    state = _state_of(record)
    if state is None or record["validator_kind"] != state.validator_kind:
        return None
    return state


def _state_of(record: dict[str, Any]) -> ResumeState | None:
    url, validator, total, digest = (record[k] for k in ("url", "validator", "total", "sha256"))
    if not isinstance(url, str) or not url:
        return None
    if validator is not None and (not isinstance(validator, str) or not _usable(validator)):
        return None
    if total is not None and not (_is_int(total) and 0 <= total <= _MAX_SIZE):
        return None
    if digest is not None and not (isinstance(digest, str) and _HEX_SHA256.fullmatch(digest)):
        return None
    return ResumeState(url, validator, total, digest)


def _usable(validator: str) -> bool:
    header = "ETag" if validator.startswith('"') else "Last-Modified"
    return resume_validator({header: validator}) == validator


def _is_int(value: object) -> bool:
    return type(value) is int  # bool is an int subclass, and not a size


@dataclass(frozen=True)
class RestartPlan:
    """What a new run does with what an earlier one left.

    `keep` bytes of the partial file are kept (0: start from zero, truncating it) and
    `state` is the resume record to go on with (None when starting from zero). `note` says
    why, for the log; it is empty when there was nothing to resume.
    """

    keep: int
    state: ResumeState | None
    note: str = ""


def plan_restart(raw_record: bytes | None, *, url: str, part_size: int | None) -> RestartPlan:
    """Decide how much of a partial file (`part_size` bytes, None: no file) to keep.

    `raw_record` is the resume record as read from disk (None: there is none). Only a
    partial file of the same url with a usable validator is kept. A partial file that
    already holds the whole file keeps all but its last byte, so that the request that
    fetches that byte still checks, with If-Range, that the file did not change.
    """
    if raw_record is None:
        note = "" if not part_size else "a partial file without its resume record"
        return RestartPlan(0, None, note)
    if part_size is None:
        return RestartPlan(0, None, "a resume record without its partial file")
    state = decode_resume_state(raw_record)
    if state is None:
        return RestartPlan(0, None, "an unreadable resume record")
    if state.url != url:
        return RestartPlan(0, None, "a partial file of another url")
    if state.validator is None:
        return RestartPlan(0, None, "the server gave no ETag or Last-Modified to resume with")
    if part_size == 0:
        return RestartPlan(0, None)
    if state.total is not None and part_size > state.total:
        return RestartPlan(0, None, f"a partial file longer than the file ({state.total} bytes)")
    if part_size == state.total:
        return RestartPlan(part_size - 1, state, "the partial file is complete: recheck")
    return RestartPlan(part_size, state, f"resuming at byte {part_size}")
