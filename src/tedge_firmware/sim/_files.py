"""The simulator's HTTP side: firmware binaries as the tenant serves them, with faults on demand.

`GET`/`HEAD /inventory/binaries/<name>` (the path of Cumulocity's binaries) serve a file that
was registered (bytes or a path) or that lies in `files_dir`. Answers carry `Accept-Ranges`,
a strong `ETag`, `Last-Modified` and `Content-Length`; a single `Range` gets `206` (`416`
beyond the end), honouring `If-Range`. With a token check, a request without
`Authorization: Bearer <the tenant's token>` gets `401`.

Faults are per file and count GET requests, so a test can say "the first two downloads are
cut after 1000 bytes": an error status for the first K requests, a cut (the connection is
closed after N body bytes) for the first K, a stall (no byte after N body bytes, for a while
or until the client gives up) for the first K, and a rate limit in bytes/s for every body.
One request gets at most one of error, cut and stall, in that order. HEAD gets no faults.

Names are `[A-Za-z0-9_][A-Za-z0-9._-]*` (at most 200 characters): no path ever leaves
`files_dir`, and a symlink in it that points outside is not served.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from email.utils import formatdate
from pathlib import Path
from typing import Literal

from aiohttp import web

from tedge_firmware.core.config import format_host
from tedge_firmware.core.http import (
    ByteRange,
    RangeVerdict,
    entity_tag,
    if_range_allows,
    is_not_modified,
    parse_byte_range,
)
from tedge_firmware.errors import ConfigError

log = logging.getLogger(__name__)

BINARIES_PATH = "/inventory/binaries/"
STOP_TIMEOUT_S = 1.0
_CHUNK = 64 * 1024
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,199}")
_OCTET_STREAM = "application/octet-stream"


def check_file_name(name: str) -> str:
    """ValueError unless `name` can be a binary's name (one safe path segment)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(
            f"file name {name!r} must match [A-Za-z0-9_][A-Za-z0-9._-]* (at most 200 characters)"
        )
    return name


@dataclass(frozen=True)
class FileFaults:
    """What goes wrong when a file is downloaded; counts are GET requests, the first ones."""

    error_status: int | None = None  # answer this status instead of the file ...
    error_times: int = 1  # ... to the first this many GET requests
    cut_after: int | None = None  # close the connection after this many body bytes ...
    cut_times: int = 1
    stall_after: int | None = None  # send nothing more after this many body bytes ...
    stall_times: int = 1
    stall_seconds: float | None = None  # ... for this long (None: until the client leaves)
    rate: int | None = None  # bytes per second, every response body

    def __post_init__(self) -> None:
        if self.error_status is not None and not 400 <= self.error_status <= 599:
            raise ValueError("error_status must be a 4xx or 5xx status")
        for name in ("error_times", "cut_times", "stall_times"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        for name in ("cut_after", "stall_after"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must not be negative")
        if self.stall_seconds is not None and self.stall_seconds < 0:
            raise ValueError("stall_seconds must not be negative")
        if self.rate is not None and self.rate <= 0:
            raise ValueError("rate must be positive")


@dataclass(frozen=True)
class FileStats:
    """What the server did for one file."""

    requests: int = 0  # GET and HEAD requests
    bytes_served: int = 0  # body bytes written
    statuses: tuple[int, ...] = ()  # the status of every answer, in order
    range_starts: tuple[int, ...] = ()  # first byte of every 206 answer
    complete: int = 0  # GET answers whose whole body was sent


@dataclass(frozen=True)
class _Plan:
    kind: Literal["cut", "stall"] | None = None
    at: int = 0
    stall_seconds: float | None = None


class _File:
    """A served file: its bytes or path, its faults (with what is left of them), its stats."""

    def __init__(
        self,
        name: str,
        source: bytes | Path,
        faults: FileFaults,
        cache_control: str | None = None,
        stats: FileStats | None = None,
    ) -> None:
        self.name = name
        self.source = source
        self.cache_control = cache_control
        self.stats = stats or FileStats()
        self.set_faults(faults)
        # registered bytes never change: a content hash is a strong validator
        digest = hashlib.sha256(source).hexdigest()[:32] if isinstance(source, bytes) else ""
        self._etag = f'"{digest}"'
        self._mtime = time.time()

    def set_faults(self, faults: FileFaults) -> None:
        self.faults = faults
        self.errors_left = faults.error_times if faults.error_status is not None else 0
        self.cuts_left = faults.cut_times if faults.cut_after is not None else 0
        self.stalls_left = faults.stall_times if faults.stall_after is not None else 0

    def take_error(self) -> int | None:
        if self.errors_left <= 0 or self.faults.error_status is None:
            return None
        self.errors_left -= 1
        return self.faults.error_status

    def take_plan(self) -> _Plan:
        faults = self.faults
        if self.cuts_left > 0 and faults.cut_after is not None:
            self.cuts_left -= 1
            return _Plan("cut", faults.cut_after)
        if self.stalls_left > 0 and faults.stall_after is not None:
            self.stalls_left -= 1
            return _Plan("stall", faults.stall_after, faults.stall_seconds)
        return _Plan()

    def validators(self) -> tuple[int, str, float]:
        """Size, ETag and modification time (blocking for a path: call it in a thread)."""
        if isinstance(self.source, bytes):
            return len(self.source), self._etag, self._mtime
        st = self.source.stat()
        return st.st_size, entity_tag(st), st.st_mtime

    def record(
        self,
        *,
        request: bool = False,
        status: int | None = None,
        sent: int = 0,
        range_start: int | None = None,
        complete: bool = False,
    ) -> None:
        stats = self.stats
        self.stats = FileStats(
            requests=stats.requests + (1 if request else 0),
            bytes_served=stats.bytes_served + sent,
            statuses=stats.statuses if status is None else (*stats.statuses, status),
            range_starts=stats.range_starts
            if range_start is None
            else (*stats.range_starts, range_start),
            complete=stats.complete + (1 if complete else 0),
        )


class BinaryServer:
    """The HTTP server of the simulated tenant; `start()` it, then `stop()` it."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        public_host: str | None = None,
        files_dir: Path | None = None,
        token: Callable[[], str] | None = None,
        extra_routes: Sequence[web.RouteDef] = (),
    ) -> None:
        self._host = host.removeprefix("[").removesuffix("]")
        self._port = port
        self._public_host = public_host
        self._files_dir = files_dir
        self._token = token
        self._extra_routes = tuple(extra_routes)
        self._files: dict[str, _File] = {}
        self._holds: dict[str, asyncio.Event] = {}
        self._runner: web.AppRunner | None = None
        self._closing = asyncio.Event()

    # --- lifecycle -------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._runner is not None and self._runner.addresses:
            return int(self._runner.addresses[0][1])
        return self._port

    @property
    def running(self) -> bool:
        return self._runner is not None

    @property
    def base_url(self) -> str:
        if self._runner is None:
            raise RuntimeError("the simulator's HTTP server is not started")
        return f"http://{format_host(self._public_host or self._host)}:{self.port}"

    async def start(self) -> None:
        """Bind and serve; ConfigError when the address cannot be bound."""
        app = web.Application()
        app.router.add_get(BINARIES_PATH + "{name}", self._handle)  # and HEAD
        app.add_routes(self._extra_routes)
        # handler_cancellation: a stalled answer ends when its client gives up
        runner = web.AppRunner(
            app, access_log=None, shutdown_timeout=STOP_TIMEOUT_S, handler_cancellation=True
        )
        await runner.setup()
        site = web.TCPSite(runner, self._host, self._port)
        try:
            await site.start()
        except OSError as error:
            await runner.cleanup()
            raise ConfigError(
                f"the simulator cannot bind {format_host(self._host)}:{self._port}: "
                f"{error.strerror or error}"
            ) from error
        self._closing.clear()
        self._runner = runner
        log.info("c8y-sim: serving binaries at %s%s", self.base_url, BINARIES_PATH)

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is None:
            return
        self._closing.set()  # stalls and rate limits end at once
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(3 * STOP_TIMEOUT_S):
                await runner.cleanup()

    # --- files -----------------------------------------------------------------------------

    def add(
        self,
        name: str,
        content: bytes | Path,
        faults: FileFaults | None = None,
        cache_control: str | None = None,
    ) -> str:
        """Serve `content` (bytes, or a file's path) as `name`; returns its URL. Adding a name
        again replaces its content at the same URL (new validators; the stats go on).
        `cache_control`: the `Cache-Control` header of every answer for it."""
        url = self.url(name)  # checks the name, and that the server runs
        if not isinstance(content, bytes | Path):
            raise TypeError("content must be bytes or a pathlib.Path")
        known = self._files.get(name)
        stats = known.stats if known is not None else None
        self._files[name] = _File(name, content, faults or FileFaults(), cache_control, stats)
        return url

    def set_faults(self, name: str, faults: FileFaults) -> None:
        """Replace a file's faults (their counts start again). KeyError for an unknown file."""
        self._files[name].set_faults(faults)

    def hold(self, name: str) -> asyncio.Event:
        """Requests for `name` wait (counted, unanswered) until the returned event is set: an
        origin that is slow to answer, for as long as a test needs."""
        self._holds[name] = held = asyncio.Event()
        return held

    def url(self, name: str) -> str:
        return f"{self.base_url}{BINARIES_PATH}{check_file_name(name)}"

    def stats(self) -> dict[str, FileStats]:
        return {name: file.stats for name, file in self._files.items()}

    def _lookup(self, name: str) -> _File | None:
        known = self._files.get(name)
        if known is not None or self._files_dir is None or not _NAME.fullmatch(name):
            return known
        root = os.path.realpath(self._files_dir)
        path = os.path.realpath(os.path.join(root, name))
        if os.path.dirname(path) != root or not os.path.isfile(path):
            return None
        self._files[name] = file = _File(name, Path(path), FileFaults())
        return file

    # --- requests --------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        file = self._lookup(request.match_info["name"])
        if not self._authorized(request):
            if file is not None:
                file.record(request=True, status=401)
            return web.Response(status=401, headers={"WWW-Authenticate": 'Bearer realm="c8y"'})
        if file is None:
            return web.Response(status=404)
        file.record(request=True)
        held = self._holds.get(file.name)
        if held is not None:
            await held.wait()
        error = file.take_error() if request.method == "GET" else None
        if error is not None:
            file.record(status=error)
            return web.Response(status=error, text=f"simulated fault: {error}\n")
        try:
            size, etag, mtime = await asyncio.to_thread(file.validators)
        except OSError:
            file.record(status=404)
            return web.Response(status=404)
        return await self._send(request, file, size, etag, mtime)

    def _authorized(self, request: web.Request) -> bool:
        if self._token is None:
            return True
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        expected = self._token().encode()
        presented = given.strip().encode()
        return scheme.lower() == "bearer" and secrets.compare_digest(presented, expected)

    async def _send(
        self, request: web.Request, file: _File, size: int, etag: str, mtime: float
    ) -> web.StreamResponse:
        headers = {
            "Accept-Ranges": "bytes",
            "ETag": etag,
            "Last-Modified": formatdate(mtime, usegmt=True),
            "Content-Type": _OCTET_STREAM,
        }
        if file.cache_control is not None:
            headers["Cache-Control"] = file.cache_control
        conditions = request.headers.get("If-None-Match"), request.headers.get("If-Modified-Since")
        if is_not_modified(*conditions, etag, mtime):
            file.record(status=304)
            return web.Response(status=304, headers=headers)
        response = web.StreamResponse(headers=headers)
        selected = _selected_range(request, size, etag, mtime)
        if selected is RangeVerdict.UNSATISFIABLE:
            response.set_status(416)
            response.headers["Content-Range"] = f"bytes */{size}"
            response.content_length = 0
            await response.prepare(request)
            file.record(status=416)
            return response
        range_start = None
        if isinstance(selected, ByteRange):
            response.set_status(206)
            response.headers["Content-Range"] = selected.content_range(size)
            range_start = selected.start
        else:
            selected = ByteRange(0, size)
        response.content_length = selected.length
        await response.prepare(request)
        file.record(status=response.status, range_start=range_start)
        if request.method == "HEAD":
            await response.write_eof()
            return response
        try:
            if await self._write_body(request, response, file, selected, file.take_plan()):
                await response.write_eof()
                file.record(complete=True)
        except ConnectionError:  # the client left mid-body: routine for a download test
            response.force_close()
        return response

    async def _write_body(
        self,
        request: web.Request,
        response: web.StreamResponse,
        file: _File,
        selected: ByteRange,
        plan: _Plan,
    ) -> bool:
        """Write the body, applying the plan and the rate; False when it was cut short."""
        loop = asyncio.get_running_loop()
        started, position = loop.time(), 0
        rate = file.faults.rate
        pending = plan.kind is not None
        async for part in _parts(file.source, selected, _piece_size(rate)):
            if pending and position + len(part) >= plan.at:
                head, part = part[: plan.at - position], part[plan.at - position :]
                position += await _write(response, file, head)
                pending = False
                if plan.kind == "cut" or not await self._stalled(plan.stall_seconds):
                    _drop_connection(request, response)
                    return False
            position += await _write(response, file, part)
            if rate is not None and not await self._paced(started + position / rate - loop.time()):
                _drop_connection(request, response)
                return False
        if pending and plan.kind == "cut" and position >= plan.at:
            _drop_connection(request, response)
            return False
        return True

    async def _stalled(self, seconds: float | None) -> bool:
        """Wait `seconds` (None: until the server stops); False when the server is stopping."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._closing.wait()
        return not self._closing.is_set()

    async def _paced(self, delay: float) -> bool:
        if delay <= 0:
            return not self._closing.is_set()
        return await self._stalled(delay)


def _selected_range(
    request: web.Request, size: int, etag: str, mtime: float
) -> ByteRange | RangeVerdict:
    if not if_range_allows(request.headers.get("If-Range"), etag, mtime):
        return RangeVerdict.WHOLE
    return parse_byte_range(request.headers.get("Range"), size)


def _piece_size(rate: int | None) -> int:
    """Write size: small enough that a rate limit paces about 20 times per second."""
    if rate is None:
        return _CHUNK
    return max(1024, min(_CHUNK, rate // 20))


async def _write(response: web.StreamResponse, file: _File, data: bytes) -> int:
    if data:
        await response.write(data)
        file.record(sent=len(data))
    return len(data)


def _drop_connection(request: web.Request, response: web.StreamResponse) -> None:
    response.force_close()
    if request.transport is not None:
        request.transport.close()  # what was written still goes out; then the client sees EOF


async def _parts(source: bytes | Path, selected: ByteRange, piece: int) -> AsyncIterator[bytes]:
    if isinstance(source, bytes):
        view = memoryview(source)
        for offset in range(selected.start, selected.stop, piece):
            yield bytes(view[offset : min(offset + piece, selected.stop)])
        return
    handle = await asyncio.to_thread(source.open, "rb")
    try:
        await asyncio.to_thread(handle.seek, selected.start)
        left = selected.length
        while left > 0:
            data = await asyncio.to_thread(handle.read, min(piece, left))
            if not data:  # the file shrank under us: the client sees a short body
                return
            left -= len(data)
            yield data
    finally:
        handle.close()
