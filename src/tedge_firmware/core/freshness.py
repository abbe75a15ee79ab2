"""When a cached firmware may be reused without asking its origin: pure, no I/O.

The cache keeps, for every URL it fetched, what the origin said about the bytes (`CachedUrl`,
stored as JSON beside the content): the content's SHA-256 and size, the validators (`ETag`,
`Last-Modified`), the freshness the origin declared (`Cache-Control`) and when the origin last
confirmed the bytes (a `200` or a `304`). A new operation reuses the cached bytes when:

- the origin declared them `immutable` (RFC 8246): no request at all;
- they are younger than the origin's `s-maxage` (we are a shared cache), else `max-age`;
- the site allows reusing a recent answer: `firmware.cache.revalidate_after` seconds;

unless the origin said `no-cache` (or `no-store`): then every operation asks. Otherwise the
operation revalidates: a conditional GET (`If-None-Match`, `If-Modified-Since`) whose `304`
reuses the bytes and whose `200` replaces them. Without validators it is a plain GET. A clock
that went back (now before the last confirmation) counts as stale.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, replace
from typing import Any

# a record is small; anything bigger is not one of ours
MAX_RECORD_BYTES = 64 * 1024
_SHA256 = re.compile(r"[0-9a-f]{64}")
_DIRECTIVE = re.compile(r"\s*([A-Za-z-]+)\s*(?:=\s*(\"[^\"]*\"|[^,\s]*))?\s*(?:,|$)")
_MAX_HEADER = 4096


@dataclass(frozen=True)
class Freshness:
    """What `Cache-Control` says, as far as a firmware cache cares."""

    max_age: float | None = None  # s-maxage when given (a shared cache), else max-age
    immutable: bool = False
    no_cache: bool = False  # no-cache or no-store: ask every time


def parse_cache_control(value: str | None) -> Freshness:
    """Directives of a `Cache-Control` header; malformed parts are ignored (a header we do not
    understand makes the bytes stale, never fresh)."""
    if not value or len(value) > _MAX_HEADER:
        return Freshness()
    seconds: dict[str, float | None] = {}  # None: given twice or malformed, so not trusted
    flags: set[str] = set()
    for match in _DIRECTIVE.finditer(value):
        name, argument = match.group(1).lower(), match.group(2)
        if argument is None or name == "no-cache":  # no-cache="field" still means no-cache
            flags.add(name)
        elif name in ("max-age", "s-maxage"):
            seconds[name] = None if name in seconds else _delta_seconds(argument.strip('"'))
    shared = seconds.get("s-maxage")
    return Freshness(
        max_age=shared if "s-maxage" in seconds else seconds.get("max-age"),
        immutable="immutable" in flags,
        no_cache=bool(flags & {"no-cache", "no-store"}),
    )


def _delta_seconds(text: str) -> float | None:
    if not text.isdigit() or len(text) > 12:  # RFC 9111 delta-seconds: digits only
        return None
    return float(text)


@dataclass(frozen=True)
class CachedUrl:
    """What the cache knows of one URL (`cache/urls/<FILE_ID>.json`).

    `url` is None for an entry migrated from the old layout, which knew the URL only by its
    digest (the FILE_ID).
    """

    url: str | None
    sha256: str
    size: int
    etag: str | None = None
    last_modified: str | None = None
    cache_control: str | None = None
    confirmed_at: float = 0.0  # seconds since the epoch: the origin's last 200 or 304
    pinned_until: float | None = None  # `cache_fill` with a pin: not evicted before then

    @property
    def freshness(self) -> Freshness:
        return parse_cache_control(self.cache_control)

    def confirmed(
        self,
        at: float,
        etag: str | None = None,
        last_modified: str | None = None,
        cache_control: str | None = None,
    ) -> CachedUrl:
        """The same bytes, confirmed by a `304` at `at`, with the validators and
        `Cache-Control` it sent (a 304 carries those that changed; the others stay)."""
        return replace(
            self,
            confirmed_at=at,
            etag=etag or self.etag,
            last_modified=last_modified or self.last_modified,
            cache_control=cache_control or self.cache_control,
        )

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()


def parse_cached_url(data: bytes) -> CachedUrl | None:
    """A record as written by `to_json`; None for anything else (a damaged or foreign file
    means the URL is not cached: it is fetched again)."""
    if len(data) > MAX_RECORD_BYTES:
        return None
    try:
        document = json.loads(data)
    except (ValueError, RecursionError):
        return None
    if not isinstance(document, dict):
        return None
    return _record(document)


def _record(document: dict[str, Any]) -> CachedUrl | None:
    sha256, size, confirmed = (document.get(k) for k in ("sha256", "size", "confirmed_at"))
    if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
        return None
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        return None
    if not isinstance(confirmed, int | float) or isinstance(confirmed, bool):
        return None
    if not math.isfinite(confirmed):
        return None
    pinned = document.get("pinned_until")
    if pinned is not None and (
        isinstance(pinned, bool) or not isinstance(pinned, int | float) or not math.isfinite(pinned)
    ):
        return None
    texts = {k: document.get(k) for k in ("url", "etag", "last_modified", "cache_control")}
    if not all(v is None or (isinstance(v, str) and len(v) <= _MAX_HEADER) for v in texts.values()):
        return None
    return CachedUrl(
        url=texts["url"],
        sha256=sha256,
        size=size,
        etag=texts["etag"],
        last_modified=texts["last_modified"],
        cache_control=texts["cache_control"],
        confirmed_at=float(confirmed),
        pinned_until=None if pinned is None else float(pinned),
    )


@dataclass(frozen=True)
class Reuse:
    """The cached bytes may be used as they are; `why`, for the log."""

    why: str


@dataclass(frozen=True)
class Revalidate:
    """Ask the origin; `headers` make it conditional (empty: no validators, a plain GET)."""

    headers: dict[str, str]
    why: str


def decide(record: CachedUrl, now: float, revalidate_after: float = 0.0) -> Reuse | Revalidate:
    """Whether `record`'s bytes may be reused at `now` without asking the origin."""
    freshness = record.freshness
    age = now - record.confirmed_at
    if not freshness.no_cache and age >= 0:
        if freshness.immutable:
            return Reuse("the origin declared it immutable")
        if freshness.max_age is not None and age < freshness.max_age:
            limit = freshness.max_age
            return Reuse(f"fresh for the origin: {age:.0f} s old, max-age {limit:.0f} s")
        if revalidate_after > 0 and age < revalidate_after:
            return Reuse(
                f"confirmed by the origin {age:.0f} s ago "
                f"(firmware.cache.revalidate_after = {revalidate_after:g})"
            )
    return Revalidate(conditional_headers(record), _stale_because(record, age))


def conditional_headers(record: CachedUrl) -> dict[str, str]:
    headers = {}
    if record.etag:
        headers["If-None-Match"] = record.etag
    if record.last_modified:
        headers["If-Modified-Since"] = record.last_modified
    return headers


def _stale_because(record: CachedUrl, age: float) -> str:
    if age < 0:
        return "the clock is before the origin's last confirmation"
    if record.freshness.no_cache:
        return "the origin asks to revalidate every time (no-cache)"
    if record.url is None:
        return "cached by an earlier version, without validators"
    return f"confirmed {age:.0f} s ago, no freshness from the origin"
