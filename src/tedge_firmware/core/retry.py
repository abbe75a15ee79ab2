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
  `Retry-After`), and gives up when the next wait would end past `max_elapsed`.
"""

from __future__ import annotations

import enum
import math
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from http import HTTPStatus

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
    +/- `jitter` (a fraction) so that many clients do not retry in lockstep. `max_elapsed` is
    how long the downloader keeps retrying without progress.
    """

    initial: float = 1.0
    multiplier: float = 2.0
    max_interval: float = 60.0
    max_elapsed: float = 600.0
    jitter: float = 0.1

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
) -> float | None:
    """The wait before the next try, or None when it would end past the budget.

    `failures` counts failures since the last progress (1 after the first); `elapsed` is the
    time spent since then. A server's Retry-After is a lower bound: we never retry sooner than
    asked, but keep backing off if our own schedule is already longer.
    """
    wait = policy.delay(max(failures - 1, 0), rng)
    if retry_after is not None:
        wait = max(wait, retry_after)
    if elapsed + wait > policy.max_elapsed:
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
    status: int, headers: Mapping[str, str], offset: int, *, validator: str | None = None
) -> ResumeDecision:
    """Decide how an answer continues a download that already holds `offset` bytes.

    `validator` is what we sent in If-Range. When the 206 itself names a different ETag (or
    Last-Modified) the file changed on the server: some servers (aiohttp <= 3.14.5) ignore an
    entity-tag If-Range and would hand us the tail of the new file.
    """
    fields = _lower_keys(headers)
    if status == HTTPStatus.OK:
        length = parse_content_length(fields.get("content-length"))
        return ResumeDecision(ResumeAction.RESTART, 0, length, length)
    if status == HTTPStatus.PARTIAL_CONTENT:
        return _partial_decision(fields, offset, validator)
    if status == HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE and offset > 0:
        return _refetch(f"the server cannot serve bytes {offset}- (HTTP 416)")
    return ResumeDecision(ResumeAction.NOT_A_BODY, offset)


def _partial_decision(
    fields: Mapping[str, str], offset: int, validator: str | None
) -> ResumeDecision:
    content_range = parse_content_range(fields.get("content-range"))
    if content_range is None:
        return _refetch("HTTP 206 without a valid Content-Range")
    start, end, total = content_range
    if start != offset:
        return _refetch(f"HTTP 206 for bytes {start}- instead of {offset}-")
    if validator is not None and _validator_changed(fields, validator):
        return _refetch("the file changed on the server")
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


def single_line(text: str, *, limit: int = 200) -> str:
    """Text fit for a one-line failure reason: printable ASCII, spaces collapsed, bounded."""
    cleaned = " ".join(_UNPRINTABLE.sub(" ", text).split())
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 3].rstrip() + "..."


def format_seconds(seconds: float) -> str:
    """`30s`, `0.3s`, `1.5s`: whole seconds from 10 s up, one decimal below."""
    if seconds >= 10:
        return f"{round(seconds)}s"
    return f"{round(seconds, 1):g}s"


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
