"""Firmware fetches into the cache, one per FILE_ID whoever needs it (single flight).

Legacy operations and `te/` commands alike `join` the fetch of the file they need, named by a
waiter key of their own; the fetch runs in a task and answers with one `FetchDone` input on the
orchestrator's queue; `finish` then hands back every waiter. A waiter that no longer needs the
file `leave`s; the last one to leave cancels the download (its partial file stays, and a later
fetch of the same file resumes it).

A fetch never hands out stale firmware: a cached copy is reused as it is only while
`core.freshness` says so (the origin's `immutable` or `max-age`, or the site's
`firmware.cache.revalidate_after`); otherwise the origin is asked with the copy's validators,
and its `304` confirms the copy while its `200` brings the new version (stored as new content:
what children were handed stays theirs). A fleet asking at once shares one such request. When
the origin cannot be reached, the cached copy is used only if `firmware.cache.stale_if_error`
says so, and the log says it was.

The JWT goes only to the tenant's own host (port ignored), whatever URL the file comes from.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from datetime import datetime
from urllib.parse import urlsplit

from tedge_firmware.core import smartrest, topics
from tedge_firmware.core.freshness import CachedUrl, Reuse, decide
from tedge_firmware.core.retry import format_seconds
from tedge_firmware.core.windows import Window, describe, seconds_until_open
from tedge_firmware.errors import DownloadError, JwtError, OperationFailed, SmartRestError
from tedge_firmware.gateway.ports import Fetcher, Publisher
from tedge_firmware.shell.cache import FirmwareCache
from tedge_firmware.shell.partial_file import DownloadResult, NotModified

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FetchDone:
    """A fetch ended: `sha256` and `size` of the cached firmware, or None and the `reason` it
    failed."""

    file_id: str
    sha256: str | None
    reason: str | None
    size: int | None = None
    no_room: bool = False  # it failed because the disk could not hold it, even after eviction


@dataclass(frozen=True)
class FetchWaiting:
    """A fetch waits for a download window (`why`, for the log and the operations)."""

    file_id: str
    why: str


@dataclass(frozen=True)
class CacheRules:
    """`firmware.cache.revalidate_after`, `.stale_if_error` and `firmware.download.windows`;
    `clock` (seconds since the epoch) and `sleep` for tests."""

    revalidate_after: float = 0.0
    stale_if_error: bool = False
    windows: tuple[Window, ...] = ()
    clock: Callable[[], float] = time.time
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep


class JwtBroker:
    """Gets a JWT over MQTT (`c8y/s/uat` → `71,<token>` on `c8y/s/dat`) without blocking the loop.

    Concurrent callers share one request. A malformed answer or none in time is a JwtError.
    """

    def __init__(self, publisher: Publisher, timeout: float, attempts: int) -> None:
        self._publisher = publisher
        self._timeout = timeout
        self._attempts = attempts
        self._waiter: asyncio.Future[str] | None = None
        self._request: asyncio.Task[str] | None = None

    async def token(self) -> str:
        if self._request is None or self._request.done():
            self._request = asyncio.create_task(self._fetch(), name="jwt-request")
        return await asyncio.shield(self._request)

    async def _fetch(self) -> str:
        loop = asyncio.get_running_loop()
        for attempt in range(1, self._attempts + 1):
            self._waiter = loop.create_future()
            self._publisher.publish(topics.C8Y_JWT_REQUEST, b"")
            try:
                async with asyncio.timeout(self._timeout):
                    return await self._waiter
            except TimeoutError:
                log.warning("no JWT token on %s (attempt %d)", topics.C8Y_JWT_RESPONSE, attempt)
            finally:
                self._waiter = None
        raise JwtError("Failed to retrieve JWT token.")

    def on_response(self, payload: bytes) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done():
            log.debug("JWT answer on %s that nobody asked for: ignored", topics.C8Y_JWT_RESPONSE)
            return
        try:
            token = smartrest.parse_jwt_response(payload.decode("utf-8").strip())
        except (UnicodeDecodeError, SmartRestError) as error:
            waiter.set_exception(
                JwtError(f"Failed to retrieve JWT token: malformed answer ({error})")
            )
            return
        waiter.set_result(token)


@dataclass
class _Fetch:
    """One download in flight and who waits for it."""

    waiting: set[str] = field(default_factory=set)
    task: asyncio.Task[None] | None = None


class FirmwareFetches:
    def __init__(
        self,
        fetcher: Fetcher,
        cache: FirmwareCache,
        jwt: JwtBroker,
        tenant_host: str | None,
        report: Callable[[FetchDone | FetchWaiting], None],
        rules: CacheRules | None = None,
        make_room: Callable[[int], Awaitable[int]] | None = None,
    ) -> None:
        """`report` puts a FetchDone (or a FetchWaiting) on the orchestrator's queue;
        `make_room(bytes)` evicts cached firmware nothing needs, to make room for a download
        (the bytes freed)."""
        self._fetcher = fetcher
        self._cache = cache
        self.jwt = jwt
        self._tenant_host = tenant_host
        self._report = report
        self._rules = rules or CacheRules()
        self._make_room = make_room
        self._fetches: dict[str, _Fetch] = {}
        self._stored: dict[str, str] = {}  # FILE_ID → SHA-256 reported, not finished yet

    def pinned(self) -> Collection[str]:
        """The firmware (SHA-256) fetches just found or stored and their waiters have not
        published yet: the cache keeper must not evict them meanwhile."""
        return set(self._stored.values())

    def join(self, file_id: str, url: str, waiter: str) -> None:
        """Wait for `file_id` (cached under that name), downloading it from `url` unless a
        fetch of it runs already."""
        fetch = self._fetches.get(file_id)
        if fetch is None:
            fetch = self._fetches[file_id] = _Fetch()
            fetch.task = asyncio.create_task(
                self._fetch(file_id, url), name=f"fetch-{file_id[:12]}"
            )
        fetch.waiting.add(waiter)

    def leave(self, file_id: str, waiter: str) -> None:
        """`waiter` no longer needs the file; the download stops when nobody does."""
        fetch = self._fetches.get(file_id)
        if fetch is None:
            return
        fetch.waiting.discard(waiter)
        if not fetch.waiting:
            del self._fetches[file_id]
            if fetch.task is not None:
                fetch.task.cancel()
            log.info("download of %s stopped: nothing waits for it any more", file_id)

    def finish(self, done: FetchDone) -> list[str]:
        """The waiters of a fetch that reported `done`, in a stable order; [] when it had
        been stopped meanwhile."""
        self._stored.pop(done.file_id, None)
        fetch = self._fetches.pop(done.file_id, None)
        return [] if fetch is None else sorted(fetch.waiting)

    async def close(self) -> None:
        tasks = [fetch.task for fetch in self._fetches.values() if fetch.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _fetch(self, file_id: str, url: str) -> None:
        try:
            record = await self._obtain(file_id, url)
        except OperationFailed as error:
            no_room = isinstance(error, DownloadError) and error.space_short is not None
            self._report(FetchDone(file_id, None, error.reason, no_room=no_room))
        except asyncio.CancelledError:
            raise
        except Exception as error:  # a bug or an unmapped error fails the waiters, never hangs
            log.exception("fetching %s failed unexpectedly", url)
            self._report(FetchDone(file_id, None, f"Download from {url} failed with {error}"))
        else:
            self._stored[file_id] = record.sha256
            self._report(FetchDone(file_id, record.sha256, None, record.size))

    async def _obtain(self, file_id: str, url: str) -> CachedUrl:
        await asyncio.to_thread(self._cache.make_directories)
        cached = await asyncio.to_thread(self._cache.lookup, file_id)
        conditions: dict[str, str] = {}
        if cached is not None:
            decision = decide(cached, self._rules.clock(), self._rules.revalidate_after)
            if isinstance(decision, Reuse):
                log.info("firmware for %s from the cache: %s", url, decision.why)
                await asyncio.to_thread(self._cache.touch, cached.sha256)
                return cached
            log.info("asking the origin whether the cached %s is current: %s", url, decision.why)
            conditions = decision.headers
        try:
            return await self._from_origin(file_id, url, cached, conditions)
        except (DownloadError, JwtError) as error:
            unreachable = isinstance(error, JwtError) or getattr(error, "unreachable", False)
            if cached is None or not unreachable or not self._rules.stale_if_error:
                raise
            age = format_seconds(max(0.0, self._rules.clock() - cached.confirmed_at))
            log.warning(
                "origin unreachable (%s): handing out the cached copy of %s, confirmed %s ago "
                "(firmware.cache.stale_if_error)",
                error,
                url,
                age,
            )
            return cached

    async def _from_origin(
        self, file_id: str, url: str, cached: CachedUrl | None, conditions: dict[str, str]
    ) -> CachedUrl:
        await self._within_a_window(file_id, url)
        token = await self.jwt.token() if self.is_tenant_url(url) else None
        now = self._rules.clock()
        try:
            result = await self._download(file_id, url, cached, conditions, token)
        except DownloadError as error:
            if error.space_short is None or self._make_room is None:
                raise
            freed = await self._make_room(error.space_short)
            if freed < error.space_short:
                raise DownloadError(
                    url,
                    f"{error.detail}; removing the cached firmware no child uses and nothing "
                    f"pins freed only {freed} bytes",
                    space_short=error.space_short - freed,
                ) from error
            log.info("made room for %s (%d bytes freed): downloading", url, freed)
            result = await self._download(file_id, url, cached, conditions, token)
        if isinstance(result, NotModified):
            assert cached is not None
            origin = result.origin
            confirmed = cached.confirmed(
                now, origin.etag, origin.last_modified, origin.cache_control
            )
            await asyncio.to_thread(self._cache.confirm, file_id, confirmed)
            return confirmed
        origin = result.origin
        record = CachedUrl(
            url, result.sha256, result.size, origin.etag, origin.last_modified,
            origin.cache_control, confirmed_at=now,
            pinned_until=cached.pinned_until if cached is not None else None,
        )  # fmt: skip
        await asyncio.to_thread(self._cache.store, file_id, record, result.path)
        if cached is not None and cached.sha256 != record.sha256:
            log.info(
                "the firmware at %s changed at the origin: sha256 %s, was %s",
                url,
                record.sha256,
                cached.sha256,
            )
        return record

    async def _within_a_window(self, file_id: str, url: str) -> None:
        """Return once a download may run (`firmware.download.windows`); the waiters hear
        why they wait once."""
        told = False
        while True:
            now = datetime.fromtimestamp(self._rules.clock())
            second = now.hour * 3600 + now.minute * 60 + now.second + now.microsecond / 1e6
            wait = seconds_until_open(self._rules.windows, second)
            if wait <= 0:
                return
            if not told:
                told = True
                why = (
                    f"waiting for the download window {describe(self._rules.windows)} "
                    f"(opens in {format_seconds(wait)})"
                )
                log.info("%s: %s", url, why)
                self._report(FetchWaiting(file_id, why))
            # looked at again at least every 5 minutes: the clock may be set meanwhile
            await self._rules.sleep(min(wait, 300.0))

    async def _download(
        self,
        file_id: str,
        url: str,
        cached: CachedUrl | None,
        conditions: dict[str, str],
        token: str | None,
    ) -> DownloadResult | NotModified:
        target = self._cache.incoming(file_id)
        if cached is None:
            return await self._fetcher.download(url, target, token=token)
        return await self._fetcher.revalidate(url, target, conditions, token=token)

    def is_tenant_url(self, url: str) -> bool:
        """JWT only for the tenant's own host (port ignored), never for anyone else."""
        tenant = self._tenant_host
        try:
            host = urlsplit(url.strip()).hostname
        except ValueError:
            return False
        return tenant is not None and host is not None and host.lower() == tenant
