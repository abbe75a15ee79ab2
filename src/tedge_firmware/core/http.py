"""HTTP semantics, pure: byte ranges and Content-Range, validators (entity tags, HTTP dates,
If-Range, conditional GETs), Retry-After, Content-Length, and the digests a server declares.
Used by the downloader, the file-transfer service and the simulator alike."""

from __future__ import annotations

import binascii
import enum
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Final

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

# The three HTTP-date forms a recipient must accept (RFC 9110 5.6.7): IMF-fixdate, the obsolete
# RFC 850 form and asctime. Checked before parsing, since email.utils also takes other forms.
_HTTP_DATE = re.compile(
    r"[A-Z][a-z]{2}, [0-9]{2} [A-Z][a-z]{2} [0-9]{4} [0-9]{2}:[0-9]{2}:[0-9]{2} GMT"
    r"|[A-Z][a-z]{5,8}, [0-9]{2}-[A-Z][a-z]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2} GMT"
    r"|[A-Z][a-z]{2} [A-Z][a-z]{2} [ 0-9][0-9] [0-9]{2}:[0-9]{2}:[0-9]{2} [0-9]{4}",
    re.ASCII,
)


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
    when = parse_http_date(text)
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
    fields = lower_keys(headers)
    etag = fields.get("etag", "").strip()
    if _STRONG_ETAG.fullmatch(etag) and len(etag) <= _MAX_HEADER_CHARS:
        return etag
    modified = fields.get("last-modified", "").strip()
    if modified and parse_http_date(modified) is not None:
        return modified
    return None


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
    fields = lower_keys(headers)
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


def lower_keys(headers: Mapping[str, str]) -> dict[str, str]:
    return {key.lower(): value for key, value in headers.items()}


def parse_http_date(text: str) -> datetime | None:
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


class RangeVerdict(enum.Enum):
    """What to send when a Range header does not select one satisfiable byte range."""

    WHOLE = "whole"  # no Range, or one we ignore (invalid, several ranges): 200 and all bytes
    UNSATISFIABLE = "unsatisfiable"  # a valid range beyond the end: 416


@dataclass(frozen=True)
class ByteRange:
    """Bytes `start` to `stop - 1` of a file."""

    start: int
    stop: int

    @property
    def length(self) -> int:
        return self.stop - self.start

    def content_range(self, size: int) -> str:
        return f"bytes {self.start}-{self.stop - 1}/{size}"


_RANGE_RE: Final = re.compile(r"bytes\s*=\s*(\d*)\s*-\s*(\d*)", re.ASCII | re.IGNORECASE)


def parse_byte_range(header: str | None, size: int) -> ByteRange | RangeVerdict:
    """Interpret a Range header for a file of `size` bytes (RFC 9110 §14.1.2, one range)."""
    match = _RANGE_RE.fullmatch(header.strip()) if header is not None else None
    if match is None:
        return RangeVerdict.WHOLE
    first, last = match.groups()
    try:
        if not first:
            return _suffix_range(int(last), size) if last else RangeVerdict.WHOLE
        return _bounded_range(int(first), int(last) if last else None, size)
    except ValueError:  # more digits than int() accepts: not a range anyone means
        return RangeVerdict.WHOLE


def _suffix_range(suffix: int, size: int) -> ByteRange | RangeVerdict:
    if suffix == 0 or size == 0:
        return RangeVerdict.UNSATISFIABLE
    return ByteRange(max(size - suffix, 0), size)


def _bounded_range(start: int, last: int | None, size: int) -> ByteRange | RangeVerdict:
    if last is not None and last < start:
        return RangeVerdict.WHOLE  # syntactically invalid: ignored, as RFC 9110 says
    if start >= size:
        return RangeVerdict.UNSATISFIABLE
    stop = size if last is None else min(last + 1, size)
    return ByteRange(start, stop)


def entity_tag(st: os.stat_result) -> str:
    """The strong ETag (quoted) of a file: a rename, a resize or a rewrite changes it."""
    return f'"{st.st_ino:x}-{st.st_size:x}-{st.st_mtime_ns:x}"'


def if_range_allows(if_range: str | None, etag: str, mtime: float) -> bool:
    """True when a Range may be honoured: no If-Range, or it names the current file.

    An entity tag must match strongly (a weak one never does); a date must equal
    Last-Modified to the second (RFC 9110 §13.1.5). Anything else means "send it all".
    """
    if if_range is None:
        return True
    value = if_range.strip()
    if value.startswith(('"', "W/")):
        return value == etag
    when = parse_http_date(value)
    return when is not None and int(when.timestamp()) == int(mtime)


def is_not_modified(
    if_none_match: str | None, if_modified_since: str | None, etag: str, mtime: float
) -> bool:
    """True when a conditional GET may be answered 304 (RFC 9110 §13.1.2, §13.1.3)."""
    if if_none_match is not None:
        tags = {tag.strip().removeprefix("W/") for tag in if_none_match.split(",")}
        return "*" in tags or etag in tags
    if if_modified_since is not None:
        since = parse_http_date(if_modified_since)
        return since is not None and int(mtime) <= since.timestamp()
    return False


@dataclass(frozen=True)
class OriginHeaders:
    """What an origin's answer says about caching its bytes (`core.freshness` decides)."""

    etag: str | None = None
    last_modified: str | None = None
    cache_control: str | None = None

    @classmethod
    def of(cls, headers: Mapping[str, str]) -> OriginHeaders:
        def kept(name: str) -> str | None:
            value = headers.get(name)
            # a header we could not store or send back as it came is as good as none
            if value is None or len(value) > 4096 or not value.isprintable():
                return None
            return value.strip() or None

        return cls(kept("ETag"), kept("Last-Modified"), kept("Cache-Control"))


# Several ranges in one request (`bytes=0-99,500-599`): answered with one `206
# multipart/byteranges` body (RFC 9110 §14.6). More than this many are answered whole: a
# request for thousands of tiny ranges costs the server more than the file.
MAX_RANGES: Final = 64


def parse_byte_ranges(header: str | None, size: int) -> list[ByteRange] | RangeVerdict:
    """Interpret a Range header that may name several ranges (RFC 9110 §14.1.2).

    Each part is read as `parse_byte_range` reads one; one invalid part makes the whole header
    ignored (200 and all bytes), parts beyond the end are dropped (416 when none is left), and
    overlapping or adjacent ranges are merged, in ascending order (§14.3 lets a server do so).
    """
    if header is None or not header.strip().lower().startswith("bytes"):
        return RangeVerdict.WHOLE
    unit, _, specs = header.strip().partition("=")
    parts = [part.strip() for part in specs.split(",")]
    if unit.strip().lower() != "bytes" or not parts or len(parts) > MAX_RANGES:
        return RangeVerdict.WHOLE
    ranges: list[ByteRange] = []
    for part in parts:
        verdict = parse_byte_range(f"bytes={part}", size)
        if verdict is RangeVerdict.WHOLE:
            return RangeVerdict.WHOLE
        if isinstance(verdict, ByteRange):
            ranges.append(verdict)
    if not ranges:
        return RangeVerdict.UNSATISFIABLE
    return _merged(ranges)


def _merged(ranges: list[ByteRange]) -> list[ByteRange]:
    merged: list[ByteRange] = []
    for current in sorted(ranges, key=lambda r: r.start):
        if merged and current.start <= merged[-1].stop:
            merged[-1] = ByteRange(merged[-1].start, max(merged[-1].stop, current.stop))
        else:
            merged.append(current)
    return merged


@dataclass(frozen=True)
class MultipartLayout:
    """The body of a `multipart/byteranges` answer: before each range its part head, after
    the last one the closing delimiter; `length` is the Content-Length."""

    content_type: str
    heads: tuple[bytes, ...]
    tail: bytes
    length: int


def multipart_layout(
    ranges: list[ByteRange], size: int, boundary: str, part_type: str
) -> MultipartLayout:
    heads = tuple(
        (b"\r\n" if index else b"")
        + f"--{boundary}\r\nContent-Type: {part_type}\r\n"
        f"Content-Range: {selected.content_range(size)}\r\n\r\n".encode("ascii")
        for index, selected in enumerate(ranges)
    )
    tail = f"\r\n--{boundary}--\r\n".encode("ascii")
    length = sum(len(head) for head in heads) + sum(r.length for r in ranges) + len(tail)
    return MultipartLayout(f"multipart/byteranges; boundary={boundary}", heads, tail, length)
