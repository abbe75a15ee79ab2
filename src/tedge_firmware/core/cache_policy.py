"""Which firmware files the cache may drop. Pure: the caller lists the entries and deletes.

The cache keeps every firmware it downloaded, so that the next child (or the next retry) gets it
without another cloud download. Left alone it would fill the disk of a gateway that sees many
firmware versions, so two optional limits apply:

- `max_age`: an entry not used for this many seconds goes;
- `max_size`: while the entries together are bigger, the least recently used one goes.

An entry that a child may still be downloading, that is one published to a child over file
transfer (an operation in progress), is never dropped, whatever the limits: the cache may then
stay above `max_size` until those operations end. Nor is one pinned by `cache fill --pin`,
until its pin ends. "Used" means downloaded, or handed to a child
for an operation (the caller records it as the entry's modification time).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass
from enum import Enum


@dataclass(frozen=True)
class CacheEntry:
    """One cached firmware: `cache/sha256/<sha256>`."""

    sha256: str
    size: int
    last_used: float  # seconds since the epoch
    children: tuple[str, ...] = ()  # children it is published to (operations in progress)
    urls: tuple[str, ...] = ()  # the URLs known to serve these bytes
    pinned_until: float | None = None  # `cache fill --pin`: kept until then whatever the limits

    @property
    def in_use(self) -> bool:
        return bool(self.children)

    def pinned(self, now: float) -> bool:
        return self.pinned_until is not None and now < self.pinned_until


@dataclass(frozen=True)
class CacheLimits:
    """None: no limit of that kind (the default: the cache keeps everything)."""

    max_size: int | None = None  # bytes
    max_age: float | None = None  # seconds since last use

    def __post_init__(self) -> None:
        if self.max_size is not None and self.max_size < 0:
            raise ValueError("max_size must be >= 0")
        if self.max_age is not None and self.max_age < 0:
            raise ValueError("max_age must be >= 0")

    @property
    def unlimited(self) -> bool:
        return self.max_size is None and self.max_age is None


class EvictionReason(Enum):
    AGE = "not used for longer than the cache's max age"
    SIZE = "least recently used while the cache was above its max size"
    REQUESTED = "removed on request"


@dataclass(frozen=True)
class Eviction:
    entry: CacheEntry
    reason: EvictionReason


def plan_eviction(
    entries: Iterable[CacheEntry],
    limits: CacheLimits,
    now: float,
    keep: Collection[str] = frozenset(),
) -> list[Eviction]:
    """The entries to drop, oldest use first: too old ones, then the least recently used until
    the rest fits in `max_size`. Entries in use, and those whose SHA-256 is in `keep` (e.g.
    just downloaded and about to be published), are never part of the plan; they still count
    towards the size."""
    ordered = sorted(entries, key=lambda entry: (entry.last_used, entry.sha256))
    plan: list[Eviction] = []
    kept: list[CacheEntry] = []
    for entry in ordered:
        evictable = not entry.in_use and not entry.pinned(now) and entry.sha256 not in keep
        too_old = limits.max_age is not None and now - entry.last_used > limits.max_age
        if too_old and evictable:
            plan.append(Eviction(entry, EvictionReason.AGE))
        else:
            kept.append(entry)
    if limits.max_size is not None:
        excess = sum(entry.size for entry in kept) - limits.max_size
        for entry in kept:
            if excess <= 0:
                break
            if not entry.in_use and not entry.pinned(now) and entry.sha256 not in keep:
                plan.append(Eviction(entry, EvictionReason.SIZE))
                excess -= entry.size
    return plan


def plan_clear(entries: Iterable[CacheEntry], now: float) -> list[Eviction]:
    """Every entry neither in use nor pinned (`cache prune --all`)."""
    ordered = sorted(entries, key=lambda entry: (entry.last_used, entry.sha256))
    return [
        Eviction(entry, EvictionReason.REQUESTED)
        for entry in ordered
        if not entry.in_use and not entry.pinned(now)
    ]
