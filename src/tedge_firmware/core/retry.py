"""Pure retry and resume policy for cloud downloads.

Nothing here does I/O or knows about aiohttp: the downloader shell asks these functions how long
to wait, whether a failure is worth another try, and what to do with an HTTP answer to a request
that may have carried `Range: bytes=N-`. Header values arrive as plain strings and may come from
a hostile server, so every parser here returns None (or a refusal) instead of raising.

Theory of operation of a download (the shell implements it):

- The first request has no Range. A 200 streams the whole body into `<target>.part`.
- A broken transfer keeps the bytes received so far. If the first answer carried a usable
  validator (a strong ETag, else Last-Modified), the next request asks for `bytes=<size>-` with
  `If-Range: <validator>`; `resume_decision` then says whether the answer continues the file
  (206 for the same offset and the same validator), replaces it (200) or cannot be used (a 206
  for another offset or of a changed file, a 416), in which case the partial file is dropped.
- Between attempts the shell waits `RetryPolicy.delay(n)` (or longer when the server sent
  `Retry-After`), and gives up when the next wait would end past `max_elapsed` (counted from
  the last progress) or past `max_total` (counted from the start, whatever the progress).
- The partial file survives restarts: beside it, a small JSON resume record
  (`encode_resume_state`) keeps the url, the validator, the total size and the digest the
  server declared. `plan_restart` decides from that record and the partial file's size how
  much of it a new run keeps; everything it does not trust starts from zero.
- When the server declares a digest of the whole file (`declared_sha256`), the finished file
  must have it.
"""

from __future__ import annotations

import binascii
import enum
import json
import math
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from http import HTTPStatus
from typing import Any, Literal

# A Retry-After of more than this many seconds (about 317 years) is treated as exactly this:
# it is far beyond any budget, and capping keeps int() away from huge digit strings.
RETRY_AFTER_CAP = 10**10

# Header values we parse are short; anything longer than this is refused unread.
_MAX_HEADER_CHARS = 200

_DIGITS = re.compile(r"[0-9]{1,19}", re.ASCII)
_CONTENT_RANGE = re.compile(
    r"bytes[ \t]+([0-9]{1,19})-([0-9]{1,19})/([0-9]{1,19}|\*)", re.ASCII | re.IGNORECASE
)
# A strong entity tag: a quoted string of visible ASCII other than the quote (RFC 9110 8.8.3).
_STRONG_ETAG = re.compile(r'"[\x21\x23-\x7e]*"', re.ASCII)
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]+", re.ASCII)
# The three HTTP-date forms a recipient must accept (RFC 9110 5.6.7): IMF-fixdate, the obsolete
# RFC 850 form and asctime. Checked before parsing, since email.utils also takes other forms.
_HTTP_DATE = re.compile(
    r"[A-Z][a-z]{2}, [0-9]{2} [A-Z][a-z]{2} [0-9]{4} [0-9]{2}:[0-9]{2}:[0-9]{2} GMT"
    r"|[A-Z][a-z]{5,8}, [0-9]{2}-[A-Z][a-z]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2} GMT"
    r"|[A-Z][a-z]{2} [A-Z][a-z]{2} [ 0-9][0-9] [0-9]{2}:[0-9]{2}:[0-9]{2} [0-9]{4}",
    re.ASCII,
)


@dataclass(frozen=True)
class RetryPolicy:
    """Capped exponential backoff with jitter, within a budget of elapsed seconds.

    `delay(0)` is the wait after the first failure, about `initial`; each further failure
    multiplies it by `multiplier` up to `max_interval`. Jitter spreads every wait uniformly over
    +/- `jitter` (a fraction) so that many clients do not retry in lockstep.

    Two budgets, in seconds:

    - `max_elapsed` is how long the downloader keeps retrying *without progress*: every attempt
      that brings new bytes starts it afresh, so a slow but advancing transfer over a flaky
      link is never given up.
    - `max_total` (None: unlimited) is a hard cap on the whole download, counted from its
      start whatever the progress: no retry is planned past it, and a transfer still running
      when it is reached is cut. It bounds how long one firmware can hold a download slot.
    """

    initial: float = 1.0
    multiplier: float = 2.0
    max_interval: float = 60.0
    max_elapsed: float = 600.0
    jitter: float = 0.1
    max_total: float | None = None

    def __post_init__(self) -> None:
        values = (self.initial, self.multiplier, self.max_interval, self.max_elapsed, self.jitter)
        if not all(math.isfinite(value) for value in values):
            raise ValueError(f"RetryPolicy values must be finite numbers: {self}")
        if self.initial < 0 or self.max_interval < self.initial or self.max_elapsed < 0:
            raise ValueError(
                f"RetryPolicy needs 0 <= initial <= max_interval and max_elapsed >= 0: {self}"
            )
        if self.multiplier < 1 or not 0 <= self.jitter < 1:
            raise ValueError(f"RetryPolicy needs multiplier >= 1 and 0 <= jitter < 1: {self}")
        total = self.max_total
        if total is not None and not (math.isfinite(total) and total > 0):
            raise ValueError(f"RetryPolicy needs max_total None or a finite number > 0: {self}")

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after failure number `attempt` (0 for the first failure)."""
        if attempt < 0:
            raise ValueError(f"attempt must be >= 0, not {attempt}")
        try:
            base = min(self.initial * self.multiplier**attempt, self.max_interval)
        except OverflowError:
            base = self.max_interval
        spread = (rng or random).uniform(-self.jitter, self.jitter)
        return base * (1.0 + spread)


def plan_retry(
    policy: RetryPolicy,
    *,
    failures: int,
    elapsed: float,
    retry_after: float | None = None,
    rng: random.Random | None = None,
    total_elapsed: float = 0.0,
) -> float | None:
    """The wait before the next try, or None when it would end past a budget.

    `failures` counts failures since the last progress (1 after the first); `elapsed` is the
    time spent since then, `total_elapsed` the time since the download started (checked
    against `max_total`). A server's Retry-After is a lower bound: we never retry sooner than
    asked, but keep backing off if our own schedule is already longer.
    """
    wait = policy.delay(max(failures - 1, 0), rng)
    if retry_after is not None:
        wait = max(wait, retry_after)
    if elapsed + wait > policy.max_elapsed:
        return None
    if policy.max_total is not None and total_elapsed + wait > policy.max_total:
        return None
    return wait


def is_transient_status(status: int) -> bool:
    """Whether an HTTP status is worth retrying: 5xx, 408 Request Timeout, 429 Too Many Requests."""
    return status in (HTTPStatus.REQUEST_TIMEOUT, HTTPStatus.TOO_MANY_REQUESTS) or (
        500 <= status <= 599
    )


def describe_status(status: int, reason: str | None = None) -> str:
    """`HTTP 404 Not Found`: the standard phrase when known, else the server's (cleaned) one."""
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = single_line(reason or "", limit=60)
    return f"HTTP {status} {phrase}".rstrip()


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds to wait from a Retry-After value (delay-seconds or HTTP-date), None if unusable.

    A date in the past means 0. Naive datetimes (ours or the header's) are taken as UTC.
    """
    if value is None:
        return None
    text = value.strip()
    if not text or len(text) > _MAX_HEADER_CHARS:
        return None
    if text.isascii() and text.isdigit():
        return float(RETRY_AFTER_CAP) if len(text) > 10 else float(min(int(text), RETRY_AFTER_CAP))
    when = _parse_http_date(text)
    if when is None:
        return None
    seconds = (when - _as_utc(now)).total_seconds()
    return min(max(seconds, 0.0), float(RETRY_AFTER_CAP))


def parse_content_length(value: str | None) -> int | None:
    """A Content-Length as an int, None unless it is 1 to 19 ASCII digits."""
    if value is None:
        return None
    text = value.strip()
    return int(text) if _DIGITS.fullmatch(text) else None


def parse_content_range(value: str | None) -> tuple[int, int | None, int | None] | None:
    """`bytes START-END/TOTAL` (TOTAL may be `*`) as (start, end, total), None if unusable.

    An unsatisfied-range value (`bytes */TOTAL`) names no bytes, so it is None here too, like
    any value whose numbers are inconsistent (end before start, end at or past total).
    """
    if value is None or len(value) > _MAX_HEADER_CHARS:
        return None
    match = _CONTENT_RANGE.fullmatch(value.strip())
    if match is None:
        return None
    start, end = int(match[1]), int(match[2])
    total = None if match[3] == "*" else int(match[3])
    if end < start or (total is not None and end >= total):
        return None
    return start, end, total


def resume_validator(headers: Mapping[str, str]) -> str | None:
    """What to send in If-Range to resume this response: a strong ETag, else Last-Modified.

    Weak ETags must not be used in If-Range (RFC 9110 13.1.5); a Last-Modified that is not an
    HTTP date is useless too. None means: do not resume, restart from zero.
    """
    fields = _lower_keys(headers)
    etag = fields.get("etag", "").strip()
    if _STRONG_ETAG.fullmatch(etag) and len(etag) <= _MAX_HEADER_CHARS:
        return etag
    modified = fields.get("last-modified", "").strip()
    if modified and _parse_http_date(modified) is not None:
        return modified
    return None


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
    fields = _lower_keys(headers)
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


# ---------------------------------------------------------------------------------------------
# Digests the server declares for the whole file.

# A SHA-256 is 32 bytes: 44 base64 characters, the last one padding.
_BASE64_SHA256 = re.compile(r"[A-Za-z0-9+/]{43}=", re.ASCII)
_MAX_DIGEST_CHARS = 1000


def parse_repr_digest(value: str | None) -> str | None:
    """The hex SHA-256 in an RFC 9530 `Repr-Digest` (`sha-256=:<base64>:`), else None.

    The field is a structured dictionary; other algorithms and member parameters are
    ignored, and the last `sha-256` member wins, as for any dictionary key (RFC 8941).
    """
    found = None
    for name, item in _members(value):
        if name == "sha-256":
            item = item.split(";", 1)[0].strip()
            is_bytes = len(item) >= 2 and item[0] == item[-1] == ":"
            found = _hex_of_base64_sha256(item[1:-1]) if is_bytes else None
    return found


def parse_instance_digest(value: str | None) -> str | None:
    """The hex SHA-256 in an RFC 3230 `Digest` (`SHA-256=<base64>`, any case), else None."""
    found = None
    for name, item in _members(value):
        if name.lower() == "sha-256":
            found = _hex_of_base64_sha256(item)
    return found


def parse_amz_checksum(value: str | None, checksum_type: str | None = None) -> str | None:
    """The hex SHA-256 in an S3 `x-amz-checksum-sha256`, else None.

    A multipart object's COMPOSITE checksum (`<base64>-<parts>`) is a checksum of checksums,
    not of the file: it is never taken for one.
    """
    if value is None or (checksum_type or "").strip().upper() == "COMPOSITE":
        return None
    return _hex_of_base64_sha256(value)


def declared_sha256(headers: Mapping[str, str], *, partial: bool = False) -> str | None:
    """The SHA-256 (lowercase hex) of the whole file as the server declares it, or None.

    First usable of `Repr-Digest`, `Digest`, `x-amz-checksum-sha256`. For a partial answer
    (`partial=True`) the S3 header is not used: it is only defined for whole objects.
    """
    fields = _lower_keys(headers)
    found = parse_repr_digest(fields.get("repr-digest")) or parse_instance_digest(
        fields.get("digest")
    )
    if found is None and not partial:
        found = parse_amz_checksum(
            fields.get("x-amz-checksum-sha256"), fields.get("x-amz-checksum-type")
        )
    return found


def _members(value: str | None) -> list[tuple[str, str]]:
    """`name=value` members of a comma-separated header, with names and values stripped."""
    if value is None or len(value) > _MAX_DIGEST_CHARS:
        return []
    members = []
    for member in value.split(","):
        name, equals, item = member.partition("=")
        if equals:
            members.append((name.strip(), item.strip()))
    return members


def _hex_of_base64_sha256(text: str) -> str | None:
    text = text.strip()
    if not _BASE64_SHA256.fullmatch(text):
        return None
    try:
        return binascii.a2b_base64(text, strict_mode=True).hex()
    except binascii.Error:
        return None


# ---------------------------------------------------------------------------------------------
# The resume record kept beside a partial file, and what a new run makes of it.

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


def single_line(text: str, *, limit: int = 200) -> str:
    """Text fit for a one-line failure reason: printable ASCII, spaces collapsed, bounded."""
    cleaned = " ".join(_UNPRINTABLE.sub(" ", text).split())
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 3].rstrip() + "..."


def format_seconds(seconds: float) -> str:
    """`0.3s`, `1.5s`, `30s`, `3m12s`, `2m`, `1h2m5s`: one decimal below 10 s, then whole."""
    if seconds < 10:
        return f"{round(seconds, 1):g}s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    parts = [(hours, "h"), (minutes, "m"), (secs, "s")]
    return "".join(f"{value}{unit}" for value, unit in parts if value) or "0s"


def _lower_keys(headers: Mapping[str, str]) -> dict[str, str]:
    return {key.lower(): value for key, value in headers.items()}


def _parse_http_date(text: str) -> datetime | None:
    if not _HTTP_DATE.fullmatch(text):
        return None
    try:
        parsed = _as_utc(parsedate_to_datetime(text))
    except (ValueError, TypeError, OverflowError, IndexError):
        return None
    # email.utils reads years below 100 as 19xx/20xx even when written with four digits.
    four_digit_year = re.search(r"\b[0-9]{4}\b", text)
    if four_digit_year and int(four_digit_year[0]) != parsed.year:
        return None
    return parsed


def _as_utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment
