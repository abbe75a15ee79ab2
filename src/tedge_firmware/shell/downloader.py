"""Cloud downloader: streams a URL into a file with retries, resume and a running SHA-256.

The one aiohttp client of tedge-firmware. Decisions (backoff, which failures are transient,
what a ranged answer means, what to keep from an earlier run) live in `core.retry`,
`core.http` and `core.resume`; this module runs the attempts and their retries. Beside it,
`download_failures` maps aiohttp/OSError exceptions into failure details in one place, and
`partial_file` keeps the durable partial file and its resume record.

How a download goes:

- The body is streamed into `<target>.part` beside the target, in chunks of `chunk_size`
  bytes; writing and hashing run in a thread of the transfer's own (always the same one, so
  the chunks do not hop between the threads of a pool) so the event loop stays responsive,
  and at most a few chunks per transfer are in memory whatever the file size.
- Beside it, `<target>.part.json` (the resume record) keeps the url, the validator (a strong
  ETag, else Last-Modified), the total size and the SHA-256 the server declared. It is
  written atomically when the first answer arrives and whenever that changes, always after
  the partial file was emptied for a new version of the file, so that a record never
  describes bytes of another version.
- A transient failure (network errors, stall, 5xx, 408, 429) is retried after a backoff, or
  after the server's Retry-After; other failures end the download at once.
- With a validator, a broken transfer resumes with `Range` + `If-Range`; otherwise (or when
  the server answers 200) it restarts from zero.
- A new `download()` of the same url into the same target (after a restart of the service, a
  crash or a `kill -9`) finds the partial file and its record, hashes the kept bytes again in a
  worker thread and resumes. A record of another url, an unreadable one, or a partial file
  without one: start from zero.
- Before the body is written, the free space (the injectable `free_space`, read nowhere else)
  must hold what is still to come plus a reserve.
- Once the body is complete, its SHA-256 is checked against a digest the server declared
  (Repr-Digest, Digest, x-amz-checksum-sha256), the file is fsynced and renamed to the
  target: the target appears only complete and checked.
- While the body arrives, every `WRITEBACK_STEP` bytes the kernel is asked to start writing
  the new pages to disk (Linux `sync_file_range`, which does not wait). The disk then works
  during the download instead of after it, and the final fsync, which still makes the file
  durable before the rename, has only the last few MiB left to wait for.
- A failure removes the partial file and its record. A cancellation (the service stopping)
  keeps them when they can be resumed, so that the next run goes on where this one stopped.

Callers must not download two URLs into the same target at the same time (single flight per
target is the orchestrator's job). Names ending in `.part`, `.part.json` and
`.part.json.tmp` beside a target are the downloader's working files, never cache entries
(`is_working_file`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import aiohttp
from yarl import URL

from tedge_firmware.core.http import OriginHeaders, declared_sha256, resume_validator
from tedge_firmware.core.proxy import UpstreamProxy
from tedge_firmware.core.rate import TokenBucket
from tedge_firmware.core.resume import ResumeAction, ResumeDecision, ResumeState, resume_decision
from tedge_firmware.core.retry import RetryPolicy, format_seconds, plan_retry
from tedge_firmware.core.text import one_line
from tedge_firmware.core.urls import firmware_url_problem
from tedge_firmware.errors import DownloadError
from tedge_firmware.shell.download_failures import (
    AttemptFailed,
    Failure,
    FailureContext,
    describe_exception,
    status_failure,
)
from tedge_firmware.shell.partial_file import (
    PART_SUFFIX,
    SYNC_FILE_RANGE,
    DownloadResult,
    FreeSpace,
    NotModified,
    PartFile,
    Space,
    StartWriteback,
    Writeback,
    WritePipeline,
    free_bytes,
    is_working_file,
)

__all__ = ["PART_SUFFIX", "DownloadResult", "Downloader", "NotModified", "is_working_file"]

logger = logging.getLogger(__name__)

# Chunks queued for the writer thread before reading from the network waits for the disk.
# The writer takes what is queued in one go, so memory per transfer stays below
# (2 * WRITE_DEPTH + 2) * chunk_size plus aiohttp's read buffer.
WRITE_DEPTH = 1


@dataclass(frozen=True)
class _Request:
    url: str
    target: Path
    token: str | None
    # If-None-Match / If-Modified-Since for the caller's copy; sent only when no partial
    # file is being resumed (a partial file is a version the origin already sent)
    conditions: Mapping[str, str] = field(default_factory=dict)

    def headers(self, offset: int, validator: str | None) -> dict[str, str]:
        # identity: we store and hash the bytes of the file, not a compressed transfer of it.
        headers = {"Accept-Encoding": "identity"}
        if self.token is not None:
            headers["Authorization"] = f"Bearer {self.token}"
        if offset > 0 and validator is not None:
            headers["Range"] = f"bytes={offset}-"
            headers["If-Range"] = validator
        elif offset == 0:
            headers.update(self.conditions)
        return headers


class _NotModified(Exception):
    def __init__(self, origin: OriginHeaders) -> None:
        self.origin = origin


@dataclass
class _Progress:
    """Mutable state of one download() call across its attempts.

    `validator`, `total` and `sha256` describe the version of the file being fetched;
    `recorded` is the resume record last handed to the writer, so that an unchanged one is
    not written again.
    """

    validator: str | None = None
    total: int | None = None
    sha256: str | None = None
    recorded: ResumeState | None = None
    expected_end: int | None = None
    attempts: int = 0
    high_water: int = 0
    failures_since_progress: int = 0
    progress_at: float = 0.0
    started_at: float = 0.0
    origin: OriginHeaders = field(default_factory=OriginHeaders)


class Downloader:
    """Downloads URLs into files, a bounded number at a time, over one shared session.

    Keyword arguments (the integrator maps them to tedge.toml):

    - `parallel`: transfers at the same time; more download() calls wait for a slot.
    - `retry`: backoff and the two budgets (`max_elapsed` without progress, `max_total` hard
      cap), see `RetryPolicy`.
    - `stall_timeout`: seconds without a byte (or without a connection) before an attempt is
      abandoned and retried.
    - `chunk_size`: bytes per write; memory per transfer is a few chunks.
    - `reserve_bytes`: free space to leave on the filesystem after the download; None means
      5% of the filesystem, at most 64 MiB.
    - `free_space`: returns the free bytes for a directory; the one place where free space is
      read (default: `shutil.disk_usage(directory).free`). Tests inject a full disk here.
    - `start_writeback`: how to start the disk writing without waiting, in the shape of
      `sync_file_range` (default: the C library's on Linux, None elsewhere). None: the final
      fsync writes the whole file, as it would without this head start.
    - `ssl_context`: for https (the local hop's CAs and a client certificate, see
      `shell.tls.client_context`); None: the system's CAs.
    - `local_hosts`: host names (lower case) that get `ssl_context`; empty: every host does.
      The gateway presents its local-hop certificate only to thin-edge's local services and
      keeps the system's CAs alone for the cloud.
    - `max_rate`: bytes per second over all downloads at once (the site's link); None: no cap.
    - `proxy`: the upstream HTTP proxy (`proxy.address`, thin-edge's keys); hosts in its
      `no_proxy` and `local_hosts` are reached directly. http origins get the absolute-form
      request, https ones a CONNECT tunnel.
    """

    def __init__(
        self,
        *,
        parallel: int = 4,
        retry: RetryPolicy = RetryPolicy(),  # noqa: B008 (frozen, so sharing is safe)
        stall_timeout: float = 60.0,
        chunk_size: int = 512 << 10,
        reserve_bytes: int | None = None,
        free_space: FreeSpace | None = None,
        start_writeback: StartWriteback | None = SYNC_FILE_RANGE,
        resolver: aiohttp.abc.AbstractResolver | None = None,
        ssl_context: ssl.SSLContext | None = None,
        local_hosts: frozenset[str] = frozenset(),
        proxy: UpstreamProxy | None = None,
        max_rate: int | None = None,
    ) -> None:
        if parallel < 1 or stall_timeout <= 0 or chunk_size < 1:
            raise ValueError("parallel and chunk_size must be >= 1, stall_timeout > 0")
        if reserve_bytes is not None and reserve_bytes < 0:
            raise ValueError("reserve_bytes must be >= 0 (or None for the default)")
        self._slots = asyncio.Semaphore(parallel)
        self._retry = retry
        self._stall_timeout = stall_timeout
        self._resolver = resolver
        self._ssl_context = ssl_context
        self._local_hosts = local_hosts
        self._proxy = proxy
        self._bucket = TokenBucket(max_rate) if max_rate else None
        self._proxy_headers = (
            {"Proxy-Authorization": aiohttp.encode_basic_auth(proxy.username, proxy.password or "")}
            if proxy is not None and proxy.username is not None
            else None
        )
        self._chunk_size = chunk_size
        self._space = Space(free_space or free_bytes, reserve_bytes)
        self._start_writeback = start_writeback
        self._session: aiohttp.ClientSession | None = None

    async def download(self, url: str, target: Path, *, token: str | None = None) -> DownloadResult:
        """Download `url` into `target`; raise DownloadError when it cannot be done.

        `token` is sent as `Authorization: Bearer <token>` when given (never logged, never
        written to disk). A partial download of the same url into the same target left by an
        earlier call (cancelled, or a process that died) is resumed.
        """
        result = await self._download(
            _Request(_checked_url(url), Path(target), _checked_token(url, token))
        )
        assert isinstance(result, DownloadResult)  # only a conditional request gets a 304
        return result

    async def revalidate(
        self, url: str, target: Path, conditions: Mapping[str, str], *, token: str | None = None
    ) -> DownloadResult | NotModified:
        """As `download`, conditional on `conditions` (`If-None-Match`, `If-Modified-Since`
        for a copy the caller has) when it starts from zero: a `304` returns NotModified and
        writes nothing; a `200` downloads the new version into `target`."""
        checked = _checked_url(url)
        request = _Request(checked, Path(target), _checked_token(url, token), dict(conditions))
        return await self._download(request)

    async def _download(self, request: _Request) -> DownloadResult | NotModified:
        url = request.url
        part = PartFile(request.target, self._space, Writeback(self._start_writeback))
        interrupted = False
        try:
            progress = await self._reopen(request, part)
            if part.size:  # resuming a version the origin sent: not a question of validity
                request = replace(request, conditions={})
            await self._fetch_with_retries(request, part, progress)
            result = await asyncio.to_thread(part.commit, progress.sha256)
            logger.info("Downloaded %s into %s (%d bytes)", url, result.path, result.size)
            return replace(result, origin=progress.origin)
        except _NotModified as answer:
            logger.info("Not modified at the origin: %s", url)
            return NotModified(answer.origin)
        except AttemptFailed as error:
            failure = error.failure
            short = failure.space_short
            raise DownloadError(url, failure.detail, error.unreachable, short) from error
        except BaseException as error:
            # Cancelled (the service stops) or interrupted: keep what can be resumed. A bug
            # (any Exception) leaves nothing behind, like a failure.
            interrupted = not isinstance(error, Exception)
            raise
        finally:
            if not part.committed:
                # Shielded and lock-protected: a write still running in its thread finishes
                # before the file is closed (and removed), even when we are being cancelled.
                await asyncio.shield(asyncio.to_thread(part.release, keep=interrupted))

    async def close(self) -> None:
        """Close the shared aiohttp session; a later download() opens a new one."""
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # aiohttp's default read buffer (256 KiB) is kept on purpose: when a connection
            # breaks, aiohttp discards what is still buffered, so a bigger buffer costs more
            # re-fetched bytes on resume without making transfers faster.
            stall = self._stall_timeout
            # The connect timeout covers the DNS lookup as well: a silent resolver or host
            # holds a download slot no longer than that.
            everywhere = self._ssl_context is not None and not self._local_hosts
            connector = aiohttp.TCPConnector(
                resolver=self._resolver,
                ssl=self._ssl_context if everywhere and self._ssl_context else True,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                auto_decompress=False,
                timeout=aiohttp.ClientTimeout(
                    total=None, connect=stall, sock_connect=stall, sock_read=stall
                ),
            )
        return self._session

    async def _reopen(self, request: _Request, part: PartFile) -> _Progress:
        """Open the partial file, keeping what an earlier run left when it can be resumed."""
        plan = await asyncio.to_thread(part.open, request.url)
        if plan.keep:
            logger.info(
                "Resuming download of %s into %s at byte %d (left by an earlier run)",
                request.url,
                part.path,
                plan.keep,
            )
        elif plan.note:
            logger.warning(
                "Download of %s into %s starts from zero: %s", request.url, part.path, plan.note
            )
        now = asyncio.get_running_loop().time()
        progress = _Progress(started_at=now, progress_at=now, high_water=part.size)
        if (state := plan.state) is not None:
            progress.recorded = state
            progress.validator = state.validator
            progress.total = state.total
            progress.sha256 = state.sha256
        return progress

    async def _fetch_with_retries(
        self, request: _Request, part: PartFile, progress: _Progress
    ) -> None:
        loop = asyncio.get_running_loop()
        while True:
            progress.attempts += 1
            try:
                await self._capped_attempt(request, part, progress)
                return
            except AttemptFailed as error:
                failure = error.failure
            wait = self._next_wait(failure, part, progress, loop.time())
            if wait is None:
                final = _final_failure(failure, progress, loop.time())
                raise AttemptFailed(final, unreachable=failure.transient)
            logger.warning(
                "Download of %s failed with %s; retrying in %.2fs",
                request.url,
                failure.detail,
                wait,
            )
            await asyncio.sleep(wait)

    async def _capped_attempt(self, request: _Request, part: PartFile, progress: _Progress) -> None:
        """One attempt (with its wait for a slot), cut when the `max_total` cap is reached."""
        cap = self._retry.max_total
        deadline = None if cap is None else progress.started_at + cap
        try:
            async with asyncio.timeout_at(deadline), self._slots:
                await self._attempt(request, part, progress)
        except TimeoutError as exc:
            # Only the cap gets here: _attempt maps the network's own timeouts to AttemptFailed.
            received = _received(part.size, progress.expected_end)
            detail = f"time limit of {format_seconds(cap or 0)} reached with {received}"
            raise AttemptFailed(Failure(detail, transient=False)) from exc

    def _next_wait(
        self, failure: Failure, part: PartFile, progress: _Progress, now: float
    ) -> float | None:
        if not failure.transient:
            return None
        if part.size > progress.high_water:
            # The transfer advanced: this is a new run of failures with a fresh budget.
            progress.high_water = part.size
            progress.failures_since_progress = 0
            progress.progress_at = now
        progress.failures_since_progress += 1
        return plan_retry(
            self._retry,
            failures=progress.failures_since_progress,
            elapsed=now - progress.progress_at,
            retry_after=failure.retry_after,
            total_elapsed=now - progress.started_at,
        )

    async def _attempt(self, request: _Request, part: PartFile, progress: _Progress) -> None:
        offset = part.size if progress.validator is not None else 0
        if part.size > offset:
            await asyncio.to_thread(part.reset)
        logger.info(
            "Downloading %s (attempt %d%s)",
            request.url,
            progress.attempts,
            f", resuming at byte {offset}" if offset else "",
        )
        progress.expected_end = None
        try:
            proxy = self._proxy_for(request.url)
            headers = request.headers(offset, progress.validator)
            if proxy is not None and self._proxy_headers and request.url.startswith("http:"):
                # an http origin gets the absolute-form request: the proxy reads this header
                # there (for https it goes on the CONNECT only, never to the origin)
                headers.update(self._proxy_headers)
            async with self._client().get(
                request.url,
                headers=headers,
                ssl=self._ssl_for(request.url),
                proxy=proxy,
                proxy_headers=self._proxy_headers,
            ) as response:
                await self._receive(request, response, part, progress, offset)
        except (aiohttp.ClientError, OSError, TimeoutError, UnicodeError) as exc:
            # UnicodeError: the resolver's IDNA encoding refuses a host (`a..b`) that a
            # redirect led to; the first url was checked before.
            context = self._context(request, part, progress)
            raise AttemptFailed(describe_exception(exc, context)) from exc

    def _proxy_for(self, url: str) -> str | None:
        if self._proxy is None:
            return None
        host = (URL(url).host or "").lower()
        if host in self._local_hosts or self._proxy.bypassed(host):
            return None
        return self._proxy.url

    def _ssl_for(self, url: str) -> ssl.SSLContext | bool:
        # A redirect keeps this request's context; a local service redirecting to the cloud
        # is not a case thin-edge has.
        host = (URL(url).host or "").lower()
        if self._ssl_context is not None and host in self._local_hosts:
            return self._ssl_context
        return True

    def _context(self, request: _Request, part: PartFile, progress: _Progress) -> FailureContext:
        parsed = URL(request.url)
        return FailureContext(
            host=parsed.host or "",
            port=parsed.port,
            stall_timeout=self._stall_timeout,
            received=part.size,
            expected=progress.expected_end,
        )

    async def _receive(
        self,
        request: _Request,
        response: aiohttp.ClientResponse,
        part: PartFile,
        progress: _Progress,
        offset: int,
    ) -> None:
        if response.status == 304 and request.conditions and offset == 0:
            raise _NotModified(OriginHeaders.of(response.headers))
        progress.origin = OriginHeaders.of(response.headers)
        decision = resume_decision(
            response.status,
            response.headers,
            offset,
            validator=progress.validator,
            expected_total=progress.total,
        )
        if decision.action is ResumeAction.NOT_A_BODY:
            raise AttemptFailed(status_failure(response))
        if decision.action is ResumeAction.REFETCH:
            progress.validator = progress.total = progress.sha256 = None
            await asyncio.to_thread(part.reset)
            raise AttemptFailed(Failure(decision.reason, transient=True))
        # From here on the body is read at once: file work (truncate, the resume record, the
        # free space check) goes through the write pipeline, ahead of the first chunk.
        first_steps = self._first_steps(request, response, part, progress, decision)
        end = decision.body_end if decision.body_end is not None else decision.total
        if end is not None:
            first_steps.append(functools.partial(part.ensure_space, end - decision.offset))
        progress.expected_end = end
        await self._stream(response, part, first_steps)
        _check_complete(part.size, decision)

    def _first_steps(
        self,
        request: _Request,
        response: aiohttp.ClientResponse,
        part: PartFile,
        progress: _Progress,
        decision: ResumeDecision,
    ) -> list[Callable[[], None]]:
        """Learn what the answer says about the file; the file steps that must come first."""
        steps: list[Callable[[], None]] = []
        if decision.action is ResumeAction.RESTART:
            progress.validator = resume_validator(response.headers)
            progress.total = decision.total
            progress.sha256 = declared_sha256(response.headers)
            if part.size:
                steps.append(part.reset)
        else:
            progress.total = decision.total if decision.total is not None else progress.total
            progress.sha256 = declared_sha256(response.headers, partial=True) or progress.sha256
        state = ResumeState(request.url, progress.validator, progress.total, progress.sha256)
        if state != progress.recorded:
            # After the reset: the record must never describe bytes of another version.
            steps.append(functools.partial(part.record, state))
            progress.recorded = state
        return steps

    async def _stream(
        self,
        response: aiohttp.ClientResponse,
        part: PartFile,
        first_steps: list[Callable[[], None]],
    ) -> None:
        # The network side never waits for the disk unless WRITE_DEPTH steps are queued: when
        # a connection breaks, aiohttp drops what it still buffers, so bytes must leave its
        # buffer promptly for a resume not to fetch them again.
        writer = WritePipeline(WRITE_DEPTH + len(first_steps), name=part.path.name)
        # The pieces aiohttp hands over are written as they are, a chunk's worth at a time:
        # gathering them into one buffer would copy every byte once more (issue 17: CPU/GB).
        pieces: list[bytes] = []
        gathered = 0
        try:
            for step in first_steps:
                await writer.put(step)
            # iter_chunks, not iter_any: a piece as aiohttp received it; iter_any joins what it
            # buffered meanwhile into a new bytes object (one more copy of every byte).
            async for piece, _ in response.content.iter_chunks():
                if not piece:
                    continue  # the end of an HTTP chunk (chunked transfer encoding)
                pieces.append(piece)
                gathered += len(piece)
                if self._bucket is not None:
                    # not reading holds the sender back (TCP): the cap costs no memory
                    loop = asyncio.get_running_loop()
                    if wait := self._bucket.delay(len(piece), loop.time()):
                        await asyncio.sleep(wait)
                if gathered >= self._chunk_size:
                    # `pieces` is replaced only once queued: a cancellation while put() waits
                    # must not lose these bytes (the rest would be written after a gap).
                    await writer.put(functools.partial(part.write, pieces))
                    pieces, gathered = [], 0
        except (aiohttp.ClientError, OSError, TimeoutError):
            # Keep what did arrive, so that a resume does not fetch it again.
            await writer.finish(_tail(part, pieces))
            raise
        except asyncio.CancelledError:
            # The service stops (or the time cap is reached): write what arrived, shielded,
            # so that the partial file holds every received byte for the next run.
            await _finish_quietly(writer, _tail(part, pieces))
            raise
        except BaseException:
            writer.abandon()
            raise
        await writer.finish(_tail(part, pieces))


def _tail(part: PartFile, pieces: list[bytes]) -> Callable[[], None] | None:
    return functools.partial(part.write, pieces) if pieces else None


async def _finish_quietly(writer: WritePipeline, last: Callable[[], None] | None) -> None:
    try:
        await asyncio.shield(writer.finish(last))
    except AttemptFailed as error:
        logger.warning("While stopping, cannot write the last bytes: %s", error.failure.detail)


def _received(size: int, expected: int | None) -> str:
    return f"{size} of {expected} bytes" if expected is not None else f"{size} bytes"


def _check_complete(size: int, decision: ResumeDecision) -> None:
    # A 206 may legitimately end before the end of the file: the next attempt resumes there.
    expected = decision.total if decision.total is not None else decision.body_end
    if expected is not None and size != expected:
        detail = f"incomplete body: got {size} of {expected} bytes"
        raise AttemptFailed(Failure(detail, transient=True))


def _final_failure(failure: Failure, progress: _Progress, now: float) -> Failure:
    detail = failure.detail
    if progress.attempts > 1:
        elapsed = format_seconds(now - progress.started_at)
        detail = f"{detail} after {progress.attempts} attempts in {elapsed}"
    if failure.transient and failure.retry_after is not None:
        detail += f" (server asked to retry after {format_seconds(failure.retry_after)})"
    return replace(failure, detail=detail, transient=False)


def _checked_url(url: str) -> str:
    problem = firmware_url_problem(url)
    if problem is not None:
        raise DownloadError(one_line(url, limit=200), problem)
    try:
        parsed = URL(url)
    except (ValueError, TypeError) as exc:  # what yarl refuses beyond our check (UnicodeError)
        raise DownloadError(one_line(url, limit=200), "invalid url") from exc
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise DownloadError(one_line(url, limit=200), "invalid url: not an http(s) url with a host")
    return url


def _checked_token(url: str, token: str | None) -> str | None:
    # A token with spaces or control characters would break (or inject into) the header.
    if token is not None and not (token.isascii() and token.isprintable() and " " not in token):
        raise DownloadError(url, "unusable bearer token: not printable ASCII")
    if token == "":
        raise DownloadError(url, "unusable bearer token: empty")
    return token
