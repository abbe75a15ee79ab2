"""Cloud downloader: streams a URL into a file with retries, resume and a running SHA-256.

The one aiohttp client of tedge-firmware. Decisions (backoff, which failures are transient,
what a ranged answer means, what to keep from an earlier run) live in
`tedge_firmware.core.retry`; this module only does the I/O and maps aiohttp/OSError
exceptions into `DownloadError` in one place (`describe_exception`).

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
`.part.json.tmp` beside a target are this module's working files, never cache entries
(`is_working_file`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import errno
import functools
import hashlib
import logging
import os
import shutil
import stat
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

import aiohttp
from yarl import URL

from tedge_firmware.core.http import declared_sha256, parse_retry_after, resume_validator
from tedge_firmware.core.resume import (
    MAX_RESUME_RECORD_BYTES,
    RestartPlan,
    ResumeAction,
    ResumeDecision,
    ResumeState,
    encode_resume_state,
    plan_restart,
    resume_decision,
)
from tedge_firmware.core.retry import (
    RetryPolicy,
    describe_status,
    format_seconds,
    is_transient_status,
    plan_retry,
)
from tedge_firmware.core.text import one_line
from tedge_firmware.core.urls import firmware_url_problem
from tedge_firmware.errors import DownloadError
from tedge_firmware.shell.durable import fsync_directory, write_atomically

logger = logging.getLogger(__name__)

PART_SUFFIX = ".part"
RECORD_SUFFIX = ".part.json"
_RECORD_TEMP_SUFFIX = ".part.json.tmp"

# Chunks queued for the writer thread before reading from the network waits for the disk.
# Memory per transfer stays below (WRITE_DEPTH + 2) * chunk_size plus aiohttp's read buffer.
WRITE_DEPTH = 4

# The default free-space reserve: 5% of the filesystem, at most 64 MiB.
RESERVE_FRACTION = 0.05
RESERVE_CAP = 64 << 20

_REHASH_CHUNK = 1 << 20

# Start the disk writing every this many new bytes. Measured on the benchmark machine (1 GiB
# from nginx, see docs/benchmarks.md): 1 to 16 MiB performed the same within noise, 64 MiB left
# more for the final fsync (20 ms instead of 2 ms).
WRITEBACK_STEP = 4 << 20

FreeSpace = Callable[[Path], int]

# sync_file_range(fd, offset, nbytes, flags) -> 0 or -1; in the shape of the libc function.
StartWriteback = Callable[[int, int, int, int], int]
SYNC_FILE_RANGE_WRITE = 2  # <fcntl.h>: start writing dirty pages in the range, do not wait


def _libc_sync_file_range() -> StartWriteback | None:
    """The C library's sync_file_range (Linux only; Python's os module does not offer it)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        # CDLL(None): the symbols already loaded into the process, which include the C
        # library's (glibc and musl alike), without searching for its file.
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    # glibc and musl both declare the offsets as 64-bit on every architecture.
    function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    function.restype = ctypes.c_int
    return function


SYNC_FILE_RANGE = _libc_sync_file_range()


def is_working_file(name: str) -> bool:
    """Whether a file name is one of the downloader's working files (not a cache entry)."""
    return name.endswith((PART_SUFFIX, RECORD_SUFFIX, _RECORD_TEMP_SUFFIX))


def free_bytes(directory: Path) -> int:
    """Bytes an unprivileged process may still write in `directory`'s filesystem."""
    return shutil.disk_usage(directory).free


@dataclass(frozen=True)
class DownloadResult:
    """A completed download: where it is, its lowercase hex SHA-256 and its size in bytes."""

    path: Path
    sha256: str
    size: int


@dataclass(frozen=True)
class Failure:
    """Why one attempt failed: a single-line detail, and whether another try may help."""

    detail: str
    transient: bool
    retry_after: float | None = None


class _Failed(Exception):
    """Internal: an attempt or a file operation failed; carries the Failure."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.detail)
        self.failure = failure


@dataclass(frozen=True)
class FailureContext:
    """What the exception mapping needs to make a detail precise."""

    host: str
    port: int | None
    stall_timeout: float
    received: int = 0
    expected: int | None = None


@dataclass(frozen=True)
class _Request:
    url: str
    target: Path
    token: str | None

    def headers(self, offset: int, validator: str | None) -> dict[str, str]:
        # identity: we store and hash the bytes of the file, not a compressed transfer of it.
        headers = {"Accept-Encoding": "identity"}
        if self.token is not None:
            headers["Authorization"] = f"Bearer {self.token}"
        if offset > 0 and validator is not None:
            headers["Range"] = f"bytes={offset}-"
            headers["If-Range"] = validator
        return headers


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


@dataclass(frozen=True)
class _Space:
    """The free-space check: how to read free bytes, and the reserve (None: the default)."""

    free_space: FreeSpace
    reserve_bytes: int | None

    def reserve(self, directory: Path) -> int:
        if self.reserve_bytes is not None:
            return self.reserve_bytes
        return min(RESERVE_CAP, int(shutil.disk_usage(directory).total * RESERVE_FRACTION))


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
    """

    def __init__(
        self,
        *,
        parallel: int = 4,
        retry: RetryPolicy = RetryPolicy(),  # noqa: B008 (frozen, so sharing is safe)
        stall_timeout: float = 60.0,
        chunk_size: int = 1 << 20,
        reserve_bytes: int | None = None,
        free_space: FreeSpace | None = None,
        start_writeback: StartWriteback | None = SYNC_FILE_RANGE,
        resolver: aiohttp.abc.AbstractResolver | None = None,
    ) -> None:
        if parallel < 1 or stall_timeout <= 0 or chunk_size < 1:
            raise ValueError("parallel and chunk_size must be >= 1, stall_timeout > 0")
        if reserve_bytes is not None and reserve_bytes < 0:
            raise ValueError("reserve_bytes must be >= 0 (or None for the default)")
        self._slots = asyncio.Semaphore(parallel)
        self._retry = retry
        self._stall_timeout = stall_timeout
        self._resolver = resolver
        self._chunk_size = chunk_size
        self._space = _Space(free_space or free_bytes, reserve_bytes)
        self._start_writeback = start_writeback
        self._session: aiohttp.ClientSession | None = None

    async def download(self, url: str, target: Path, *, token: str | None = None) -> DownloadResult:
        """Download `url` into `target`; raise DownloadError when it cannot be done.

        `token` is sent as `Authorization: Bearer <token>` when given (never logged, never
        written to disk). A partial download of the same url into the same target left by an
        earlier call (cancelled, or a process that died) is resumed.
        """
        request = _Request(_checked_url(url), Path(target), _checked_token(url, token))
        part = _PartFile(request.target, self._space, _Writeback(self._start_writeback))
        interrupted = False
        try:
            progress = await self._reopen(request, part)
            await self._fetch_with_retries(request, part, progress)
            result = await asyncio.to_thread(part.commit, progress.sha256)
            logger.info("Downloaded %s into %s (%d bytes)", url, result.path, result.size)
            return result
        except _Failed as error:
            raise DownloadError(url, error.failure.detail) from error
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
            connector = None if self._resolver is None else aiohttp.TCPConnector(
                resolver=self._resolver
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                auto_decompress=False,
                timeout=aiohttp.ClientTimeout(
                    total=None, connect=stall, sock_connect=stall, sock_read=stall
                ),
            )
        return self._session

    async def _reopen(self, request: _Request, part: _PartFile) -> _Progress:
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
        self, request: _Request, part: _PartFile, progress: _Progress
    ) -> None:
        loop = asyncio.get_running_loop()
        while True:
            progress.attempts += 1
            try:
                await self._capped_attempt(request, part, progress)
                return
            except _Failed as error:
                failure = error.failure
            wait = self._next_wait(failure, part, progress, loop.time())
            if wait is None:
                raise _Failed(_final_failure(failure, progress, loop.time()))
            logger.warning(
                "Download of %s failed with %s; retrying in %.2fs",
                request.url,
                failure.detail,
                wait,
            )
            await asyncio.sleep(wait)

    async def _capped_attempt(
        self, request: _Request, part: _PartFile, progress: _Progress
    ) -> None:
        """One attempt (with its wait for a slot), cut when the `max_total` cap is reached."""
        cap = self._retry.max_total
        deadline = None if cap is None else progress.started_at + cap
        try:
            async with asyncio.timeout_at(deadline), self._slots:
                await self._attempt(request, part, progress)
        except TimeoutError as exc:
            # Only the cap gets here: _attempt maps the network's own timeouts to _Failed.
            received = _received(part.size, progress.expected_end)
            detail = f"time limit of {format_seconds(cap or 0)} reached with {received}"
            raise _Failed(Failure(detail, transient=False)) from exc

    def _next_wait(
        self, failure: Failure, part: _PartFile, progress: _Progress, now: float
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

    async def _attempt(self, request: _Request, part: _PartFile, progress: _Progress) -> None:
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
            async with self._client().get(
                request.url, headers=request.headers(offset, progress.validator)
            ) as response:
                await self._receive(request, response, part, progress, offset)
        except (aiohttp.ClientError, OSError, TimeoutError, UnicodeError) as exc:
            # UnicodeError: the resolver's IDNA encoding refuses a host (`a..b`) that a
            # redirect led to; the first url was checked before.
            context = self._context(request, part, progress)
            raise _Failed(describe_exception(exc, context)) from exc

    def _context(self, request: _Request, part: _PartFile, progress: _Progress) -> FailureContext:
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
        part: _PartFile,
        progress: _Progress,
        offset: int,
    ) -> None:
        decision = resume_decision(
            response.status,
            response.headers,
            offset,
            validator=progress.validator,
            expected_total=progress.total,
        )
        if decision.action is ResumeAction.NOT_A_BODY:
            raise _Failed(_status_failure(response))
        if decision.action is ResumeAction.REFETCH:
            progress.validator = progress.total = progress.sha256 = None
            await asyncio.to_thread(part.reset)
            raise _Failed(Failure(decision.reason, transient=True))
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
        part: _PartFile,
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
        part: _PartFile,
        first_steps: list[Callable[[], None]],
    ) -> None:
        # The network side never waits for the disk unless WRITE_DEPTH steps are queued: when
        # a connection breaks, aiohttp drops what it still buffers, so bytes must leave its
        # buffer promptly for a resume not to fetch them again.
        writer = _WritePipeline(WRITE_DEPTH + len(first_steps), name=part.path.name)
        buffer = bytearray()
        try:
            for step in first_steps:
                await writer.put(step)
            async for piece in response.content.iter_any():
                buffer += piece
                if len(buffer) >= self._chunk_size:
                    # `buffer` is replaced only once queued: a cancellation while put() waits
                    # must not lose these bytes (the rest would be written after a gap).
                    await writer.put(functools.partial(part.write, buffer))
                    buffer = bytearray()
        except (aiohttp.ClientError, OSError, TimeoutError):
            # Keep what did arrive, so that a resume does not fetch it again.
            await writer.finish(_tail(part, buffer))
            raise
        except asyncio.CancelledError:
            # The service stops (or the time cap is reached): write what arrived, shielded,
            # so that the partial file holds every received byte for the next run.
            await _finish_quietly(writer, _tail(part, buffer))
            raise
        except BaseException:
            writer.abandon()
            raise
        await writer.finish(_tail(part, buffer))


def _tail(part: _PartFile, buffer: bytearray) -> Callable[[], None] | None:
    return functools.partial(part.write, buffer) if buffer else None


async def _finish_quietly(writer: _WritePipeline, last: Callable[[], None] | None) -> None:
    try:
        await asyncio.shield(writer.finish(last))
    except _Failed as error:
        logger.warning("While stopping, cannot write the last bytes: %s", error.failure.detail)


def _received(size: int, expected: int | None) -> str:
    return f"{size} of {expected} bytes" if expected is not None else f"{size} bytes"


def _check_complete(size: int, decision: ResumeDecision) -> None:
    # A 206 may legitimately end before the end of the file: the next attempt resumes there.
    expected = decision.total if decision.total is not None else decision.body_end
    if expected is not None and size != expected:
        detail = f"incomplete body: got {size} of {expected} bytes"
        raise _Failed(Failure(detail, transient=True))


def _status_failure(response: aiohttp.ClientResponse) -> Failure:
    transient = is_transient_status(response.status)
    retry_after = None
    if transient:
        retry_after = parse_retry_after(response.headers.get("Retry-After"), datetime.now(UTC))
    return Failure(describe_status(response.status, response.reason), transient, retry_after)


def _final_failure(failure: Failure, progress: _Progress, now: float) -> Failure:
    detail = failure.detail
    if progress.attempts > 1:
        elapsed = format_seconds(now - progress.started_at)
        detail = f"{detail} after {progress.attempts} attempts in {elapsed}"
    if failure.transient and failure.retry_after is not None:
        detail += f" (server asked to retry after {format_seconds(failure.retry_after)})"
    return Failure(detail, transient=False)


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


# ---------------------------------------------------------------------------------------------
# The one place where aiohttp and OSError exceptions become failure details.

_Describe = Callable[[BaseException, FailureContext], Failure]


def _endpoint(context: FailureContext) -> str:
    return f"{context.host}:{context.port}" if context.port is not None else context.host


def _dns(exc: BaseException, context: FailureContext) -> Failure:
    return Failure(f"DNS lookup failed for {context.host}", transient=True)


def _tls(exc: BaseException, context: FailureContext) -> Failure:
    cause = getattr(exc, "certificate_error", None) or getattr(exc, "os_error", None) or exc
    reason = one_line(getattr(cause, "verify_message", None) or _strerror(cause), limit=120)
    return Failure(f"TLS error with {_endpoint(context)}: {reason}", transient=False)


def _connect(exc: BaseException, context: FailureContext) -> Failure:
    os_error = exc.os_error if isinstance(exc, aiohttp.ClientConnectorError) else exc
    if isinstance(os_error, ConnectionRefusedError) or _errno(os_error) == errno.ECONNREFUSED:
        return Failure(f"connection refused ({_endpoint(context)})", transient=True)
    reason = one_line(_strerror(os_error), limit=120)
    return Failure(f"cannot connect to {_endpoint(context)}: {reason}", transient=True)


def _connect_timeout(exc: BaseException, context: FailureContext) -> Failure:
    seconds = format_seconds(context.stall_timeout)
    return Failure(f"connect timeout: no connection within {seconds} ({_endpoint(context)})", True)


def _stalled(exc: BaseException, context: FailureContext) -> Failure:
    return Failure(f"stalled: no data for {format_seconds(context.stall_timeout)}", True)


def _fingerprint(exc: BaseException, context: FailureContext) -> Failure:
    return Failure(f"TLS certificate fingerprint mismatch ({_endpoint(context)})", False)


def _disconnected(exc: BaseException, context: FailureContext) -> Failure:
    return Failure(f"server disconnected before answering ({_endpoint(context)})", True)


def _network(exc: BaseException, context: FailureContext) -> Failure:
    if isinstance(exc, ConnectionResetError) or _errno(exc) == errno.ECONNRESET:
        return Failure(f"connection reset ({_endpoint(context)})", transient=True)
    reason = one_line(_strerror(exc), limit=120)
    return Failure(f"network error with {_endpoint(context)}: {reason}", transient=True)


def _payload(exc: BaseException, context: FailureContext) -> Failure:
    if context.expected is not None:
        detail = f"incomplete body: got {context.received} of {context.expected} bytes"
    else:
        detail = f"incomplete body: broken after {context.received} bytes"
    return Failure(detail, transient=True)


def _redirects(exc: BaseException, context: FailureContext) -> Failure:
    return Failure("too many redirects", transient=False)


def _proxy_status(exc: BaseException, context: FailureContext) -> Failure:
    status = exc.status if isinstance(exc, aiohttp.ClientResponseError) else 0
    return Failure(f"proxy answered {describe_status(status)}", is_transient_status(status))


def _bad_response(exc: BaseException, context: FailureContext) -> Failure:
    message = exc.message if isinstance(exc, aiohttp.ClientResponseError) else str(exc)
    reason = one_line(str(message), limit=120)
    return Failure(f"invalid HTTP response from {_endpoint(context)}: {reason}", False)


def _bad_redirect(exc: BaseException, context: FailureContext) -> Failure:
    return Failure("redirect to an invalid or non-HTTP url", transient=False)


def _bad_url(exc: BaseException, context: FailureContext) -> Failure:
    return Failure("invalid url", transient=False)


def _bad_host(exc: BaseException, context: FailureContext) -> Failure:
    # Only the resolver raises it, for a host the first check did not see (a redirect's)
    return Failure(f"invalid url: a host name the resolver refuses ({exc})", transient=False)


def _timeout(exc: BaseException, context: FailureContext) -> Failure:
    return Failure(f"timed out ({_endpoint(context)})", transient=True)


def _other_client_error(exc: BaseException, context: FailureContext) -> Failure:
    reason = one_line(str(exc) or type(exc).__name__, limit=120)
    return Failure(f"client error: {reason}", transient=True)


# Most specific first: the first entry whose type matches describes the exception.
EXCEPTION_MAP: tuple[tuple[type[BaseException], _Describe], ...] = (
    (aiohttp.ClientConnectorDNSError, _dns),
    (aiohttp.ClientSSLError, _tls),
    (aiohttp.ClientConnectorError, _connect),
    (aiohttp.ConnectionTimeoutError, _connect_timeout),
    (aiohttp.SocketTimeoutError, _stalled),
    (aiohttp.ServerTimeoutError, _stalled),
    (aiohttp.ServerFingerprintMismatch, _fingerprint),
    (aiohttp.ServerDisconnectedError, _disconnected),
    (aiohttp.ClientConnectionResetError, _network),
    (aiohttp.ClientOSError, _network),
    (aiohttp.ClientConnectionError, _network),
    (aiohttp.ClientPayloadError, _payload),
    (aiohttp.TooManyRedirects, _redirects),
    (aiohttp.ClientHttpProxyError, _proxy_status),
    (aiohttp.ClientResponseError, _bad_response),
    (aiohttp.RedirectClientError, _bad_redirect),
    (aiohttp.NonHttpUrlClientError, _bad_url),
    (aiohttp.InvalidURL, _bad_url),
    (UnicodeError, _bad_host),
    (aiohttp.UploadAbortedError, _other_client_error),  # we send no body; listed for completeness
    (aiohttp.ClientError, _other_client_error),
    (TimeoutError, _timeout),
    (OSError, _network),
)


def describe_exception(exc: BaseException, context: FailureContext) -> Failure:
    """Map an exception raised while fetching into a Failure (detail + transient or not)."""
    for kind, describe in EXCEPTION_MAP:
        if isinstance(exc, kind):
            return describe(exc, context)
    raise exc


def _errno(exc: BaseException) -> int | None:
    return exc.errno if isinstance(exc, OSError) else None


def _strerror(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


# ---------------------------------------------------------------------------------------------
# Writing off the event loop, in order, with a bounded number of chunks in flight.


class _WritePipeline:
    """Runs file steps (writes, truncation, checks) in a thread of its own, in order.

    At most `depth` steps wait in the queue. A step's failure is kept and raised by the next
    put() or by finish(); later steps are then skipped, so that put() never blocks on a dead
    writer.

    One thread per pipeline rather than the event loop's shared pool: with the pool, a step
    could start before the thread that ran the previous one was back in the pool, so the pool
    grew and consecutive steps ran in different threads (more wake-ups and context switches:
    measured about 5700 voluntary and 1600 involuntary switches per GiB against 4100 and 700).
    """

    def __init__(self, depth: int, *, name: str) -> None:
        self._queue: asyncio.Queue[Callable[[], None] | None] = asyncio.Queue(depth)
        self._error: _Failed | None = None
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="download")
        self._worker = asyncio.create_task(self._run(), name=f"write {name}")

    async def put(self, step: Callable[[], None]) -> None:
        self._raise_if_failed()
        await self._queue.put(step)

    async def finish(self, last: Callable[[], None] | None = None) -> None:
        """Queue a last step (if any), wait until all steps have run, raise a failure."""
        if last is not None and self._error is None:
            await self._queue.put(last)
        await self._queue.put(None)
        await self._worker
        self._raise_if_failed()

    def abandon(self) -> None:
        """Stop (on cancellation); a step already running in its thread still completes."""
        self._worker.cancel()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while (step := await self._queue.get()) is not None:
                if self._error is None:
                    try:
                        await loop.run_in_executor(self._thread, step)
                    except _Failed as error:
                        self._error = error
        finally:
            # Without waiting: a step still running (we are being cancelled) completes in
            # its thread, which then ends.
            self._thread.shutdown(wait=False)

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error


# ---------------------------------------------------------------------------------------------
# The partial file and its resume record. Every method but the constructor runs in a worker
# thread; the lock makes a release wait for a write still in progress, and steps that come
# after a release (a cancellation cut the pipeline short) do nothing. Since the steps run in
# order (truncate, then record, then data), a release between any two of them leaves a
# consistent pair: an empty file, or a record with bytes of the version it describes.


class _Writeback:
    """Asks the kernel to start writing a file's new pages every `step` bytes, without waiting.

    A head start for the final fsync, never a guarantee of its own: when the call is missing
    or fails (a filesystem may refuse it), it is not tried again and nothing else changes.
    """

    def __init__(self, start: StartWriteback | None, step: int = WRITEBACK_STEP) -> None:
        self._start = start
        self._step = step
        self._begin = 0  # the bytes before this offset were already handed to the kernel

    def advance(self, descriptor: int, end: int) -> None:
        """The file now holds `end` bytes: start writing the new ones once a step gathered."""
        start = self._start
        if start is None or end - self._begin < self._step:
            return
        if start(descriptor, self._begin, end - self._begin, SYNC_FILE_RANGE_WRITE) != 0:
            reason = os.strerror(ctypes.get_errno() or errno.EINVAL)
            logger.debug("No early writeback (sync_file_range: %s); fsync does it all", reason)
            self._start = None
        self._begin = end

    def restart(self) -> None:
        """The file was emptied: count from its start again."""
        self._begin = 0


class _PartFile:
    def __init__(self, target: Path, space: _Space, writeback: _Writeback) -> None:
        self.target = target
        self.path = target.with_name(target.name + PART_SUFFIX)
        self.record_path = target.with_name(target.name + RECORD_SUFFIX)
        self.record_temp = target.with_name(target.name + _RECORD_TEMP_SUFFIX)
        self.size = 0
        self.committed = False
        self._released = False
        self._space = space
        self._writeback = writeback
        self._file: BinaryIO | None = None
        self._hash = hashlib.sha256()
        self._recorded: ResumeState | None = None  # the record on disk, as far as we know
        self._lock = threading.Lock()
        self._stopping = threading.Event()

    def open(self, url: str) -> RestartPlan:
        """Open the partial file; keep (and hash again) what an earlier run left, if usable."""
        with self._lock, self._mapped("open"):
            plan = plan_restart(self._read_record(), url=url, part_size=self._part_size())
            if plan.keep:
                self._file = _open_file(self.path, os.O_RDWR)
                self._rehash(plan.keep)
                self._recorded = plan.state
            else:
                # Empty the partial file first, then drop the record: killed in between, the
                # next run finds an empty file, which it cannot mistake for a resumable one.
                self.path.unlink(missing_ok=True)  # also a symlink put there: never follow it
                self._file = _open_file(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
                self._remove_record()
        return plan

    def reset(self) -> None:
        with self._lock, self._mapped("truncate"):
            if self._released:
                return
            file = self._opened()
            file.seek(0)
            file.truncate()
            # Durable before a new resume record can be: after a power loss, a record of the
            # new version must not sit beside bytes of the old one. Rare, so cheap.
            os.fsync(file.fileno())
            self._hash = hashlib.sha256()
            self.size = 0
            self._writeback.restart()

    def write(self, chunk: bytes | bytearray) -> None:
        with self._lock, self._mapped("write"):
            if self._released:
                return
            file = self._opened()
            # Hash, then write: the write copies the chunk while the hash has just pulled it
            # into this core's cache (measured slightly faster than the other order, see
            # docs/benchmarks.md). A failed write fails the download or, on a stop, leaves a
            # partial file that the next run hashes again from disk: the hash of bytes that
            # did not reach the file is never used.
            self._hash.update(chunk)
            file.write(chunk)
            self.size += len(chunk)
            self._writeback.advance(file.fileno(), self.size)

    def record(self, state: ResumeState) -> None:
        """Write the resume record atomically (temp file, fsync, rename, fsync directory)."""
        with self._lock, self._mapped("write the resume record of"):
            if self._released:
                return
            write_atomically(self.record_path, encode_resume_state(state), temp=self.record_temp)
            self._recorded = state

    def ensure_space(self, needed: int) -> None:
        directory = self.target.parent
        with self._mapped("inspect"):
            available = self._space.free_space(directory)
            reserve = self._space.reserve(directory)
        if needed + reserve > available:
            detail = (
                f"not enough disk space in {directory}: "
                f"need {needed} bytes (+{reserve} reserve), {available} available"
            )
            raise _Failed(Failure(detail, transient=False))

    def commit(self, expected_sha256: str | None) -> DownloadResult:
        """Check the digest, make the file durable and rename it to the target."""
        with self._lock, self._mapped("save"):
            digest = self._hash.hexdigest()
            if expected_sha256 is not None and digest != expected_sha256:
                detail = f"digest mismatch: server says {expected_sha256}, got {digest}"
                raise _Failed(Failure(detail, transient=False))
            file = self._opened()
            file.flush()
            # Waits for the writeback started during the download, and writes the rest.
            os.fsync(file.fileno())
            file.close()
            self._file = None
            os.replace(self.path, self.target)
            self.committed = True
            # Only now: a record without its partial file is dropped by the next run.
            self._remove_record(quietly=True)
            fsync_directory(self.target.parent)
        return DownloadResult(self.target, digest, self.size)

    def release(self, *, keep: bool) -> None:
        """Close; remove the partial file and its record unless `keep` and resumable."""
        self._stopping.set()  # a re-hash in progress stops at its next chunk
        with self._lock:
            if self.committed or self._released:
                return
            self._released = True
            if self._file is not None:
                self._close_quietly(self._file)
                self._file = None
            if keep and self._resumable():
                logger.info("Keeping %s (%d bytes) to resume later", self.path, self._disk_size())
                return
            for path in (self.path, self.record_path, self.record_temp):
                try:
                    path.unlink(missing_ok=True)
                except OSError as exc:
                    logger.warning("Cannot remove %s: %s", path, exc.strerror)

    def _resumable(self) -> bool:
        state = self._recorded
        return state is not None and state.validator is not None and self._disk_size() > 0

    def _disk_size(self) -> int:
        return self._part_size() or 0

    def _part_size(self) -> int | None:
        """Size of the partial file if it is a regular file, None if there is none."""
        try:
            info = os.lstat(self.path)
        except FileNotFoundError:
            return None
        return info.st_size if stat.S_ISREG(info.st_mode) else None

    def _read_record(self) -> bytes | None:
        try:
            with _open_file(self.record_path, os.O_RDONLY) as source:
                return source.read(MAX_RESUME_RECORD_BYTES + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:  # a directory or a symlink in its place: not our record
            logger.warning("Cannot read %s: %s", self.record_path, exc.strerror or exc)
            return b""

    def _remove_record(self, *, quietly: bool = False) -> None:
        try:
            self.record_path.unlink(missing_ok=True)
        except OSError as exc:
            if not quietly:
                raise
            logger.warning("Cannot remove %s: %s", self.record_path, exc.strerror)

    def _rehash(self, keep: int) -> None:
        """Hash the first `keep` bytes again (constant memory) and cut the file there."""
        file = self._opened()
        remaining = keep
        while remaining and not self._stopping.is_set():
            chunk = file.read(min(_REHASH_CHUNK, remaining))
            if not chunk:
                break  # shorter than it was a moment ago: keep what is there
            self._hash.update(chunk)
            remaining -= len(chunk)
        if self._stopping.is_set():
            return  # released while hashing: leave the file as it was
        self.size = keep - remaining
        file.seek(self.size)
        file.truncate()

    def _opened(self) -> BinaryIO:
        if self._file is None:
            raise RuntimeError(f"{self.path} is not open")  # a bug in the downloader
        return self._file

    def _close_quietly(self, file: BinaryIO) -> None:
        try:
            file.close()
        except OSError as exc:
            logger.warning("Cannot close %s: %s", self.path, exc.strerror)

    @contextmanager
    def _mapped(self, action: str) -> Iterator[None]:
        try:
            yield
        except FileNotFoundError as exc:
            directory = self.target.parent
            if not directory.is_dir():
                detail = f"target directory {directory} does not exist"
                raise _Failed(Failure(detail, transient=False)) from exc
            raise _Failed(Failure(f"cannot {action} {self.path}: file vanished", False)) from exc
        except OSError as exc:
            reason = one_line(exc.strerror or str(exc), limit=120)
            raise _Failed(Failure(f"cannot {action} {self.path}: {reason}", False)) from exc


def _open_file(path: Path, flags: int) -> BinaryIO:
    """Open without following a symlink: our working files are never links to elsewhere."""
    descriptor = os.open(path, flags | os.O_NOFOLLOW, 0o644)
    modes = {os.O_RDONLY: "rb", os.O_WRONLY: "wb", os.O_RDWR: "r+b"}
    return os.fdopen(descriptor, modes[flags & os.O_ACCMODE])  # type: ignore[return-value]
