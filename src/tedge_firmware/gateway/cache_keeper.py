"""Keeps the firmware cache within its limits (`firmware.cache.max_size`, `.max_age`).

The plugin asks for a pass whenever the cache may have grown or an entry may have become free:
after a download, when an operation ends, at start, and now and then for the age limit. A pass
lists the cache, plans with `core.cache_policy` and evicts in a worker thread; requests made
while a pass runs are folded into one more pass. An entry published to a child is never
evicted (the policy leaves it out, and `FirmwareCache.evict` checks again under its lock).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Collection

from tedge_firmware.core.cache_policy import CacheLimits, Eviction, plan_eviction
from tedge_firmware.core.units import format_size
from tedge_firmware.shell.cache import FirmwareCache

log = logging.getLogger(__name__)

# How often the age limit is looked at without another reason: a tenth of the age, at least a
# minute, at most an hour.
MIN_AGE_CHECK_S = 60.0
MAX_AGE_CHECK_S = 3600.0


class CacheKeeper:
    def __init__(
        self,
        cache: FirmwareCache,
        limits: CacheLimits,
        *,
        clock: Callable[[], float] = time.time,
        age_check_interval: float | None = None,
        pinned: Callable[[], Collection[str]] = frozenset,
    ) -> None:
        """`pinned`: SHA-256s not to evict whatever their use, asked on the event loop at the
        start of each pass (what the plugin's fetches just stored: not published yet)."""
        self.cache = cache
        self.limits = limits
        self._clock = clock
        self._pinned = pinned
        self._age_check_interval = age_check_interval or _age_check_interval(limits)
        self._pass: asyncio.Task[None] | None = None
        self._again = False
        self._ticker: asyncio.Task[None] | None = None

    def start(self) -> None:
        """A first pass, and passes now and then when there is an age limit."""
        self.request()
        if self.limits.max_age is not None and self._ticker is None:
            self._ticker = asyncio.create_task(self._tick(), name="cache-age-check")

    def request(self) -> None:
        """Ask for a pass (from the event loop); cheap when there are no limits."""
        if self.limits.unlimited:
            return
        if self._pass is None or self._pass.done():
            self._pass = asyncio.create_task(self._passes(), name="cache-limits")
        else:
            self._again = True

    async def idle(self) -> None:
        """Wait until no pass is running or asked for (for tests)."""
        while self._pass is not None and not self._pass.done():
            await asyncio.shield(self._pass)

    async def close(self) -> None:
        for task in (self._ticker, self._pass):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    def prune_once(self, pinned: Collection[str] = frozenset()) -> list[Eviction]:
        """One pass (blocking): the evictions that were done."""
        plan = plan_eviction(self.cache.entries(), self.limits, self._clock(), keep=pinned)
        done = []
        for eviction in plan:
            entry = eviction.entry
            if self.cache.evict(entry.sha256):
                log.info(
                    "cache: removed %s (%s): %s",
                    entry.sha256,
                    format_size(entry.size),
                    eviction.reason.value,
                )
                done.append(eviction)
            else:
                log.info("cache: kept %s: published to a child meanwhile", entry.sha256)
        return done

    def make_room(self, needed: int, pinned: Collection[str] = frozenset()) -> int:
        """Evict firmware no child uses and nothing pins, least recently used first, until
        `needed` bytes are freed (blocking); the bytes freed (less when that is all there is).
        Applies whatever the configured limits: a download needs the room now."""
        now = self._clock()
        freed = 0
        entries = sorted(self.cache.entries(), key=lambda entry: (entry.last_used, entry.sha256))
        for entry in entries:
            if freed >= needed:
                break
            if entry.in_use or entry.pinned(now) or entry.sha256 in pinned:
                continue
            if self.cache.evict(entry.sha256):
                log.info(
                    "cache: removed %s (%s) to make room for a download",
                    entry.sha256,
                    format_size(entry.size),
                )
                freed += entry.size
        return freed

    async def _passes(self) -> None:
        while True:
            self._again = False
            try:
                await asyncio.to_thread(self.prune_once, frozenset(self._pinned()))
            except OSError as error:  # the next pass tries again; the service goes on
                log.warning("cache: cannot apply the limits: %s", error)
            if not self._again:
                return

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self._age_check_interval)  # a clock, not an event to await
            self.request()


def _age_check_interval(limits: CacheLimits) -> float:
    if limits.max_age is None:
        return MAX_AGE_CHECK_S
    return min(MAX_AGE_CHECK_S, max(MIN_AGE_CHECK_S, limits.max_age / 10))
