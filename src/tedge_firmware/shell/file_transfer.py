"""The file-transfer HTTP service: a small file repository over aiohttp.

It serves the directory `root` (`data.path/file-transfer`) under two URL prefixes,
`/tedge/file-transfer/<path>` (thin-edge's legacy route) and `/te/v1/files/<path>` (1.x):

* GET / HEAD stream the file (sendfile where the event loop has it) and answer a single
  `Range` with 206, an unsatisfiable one with 416. `ETag` (strong: inode, size, mtime),
  `Last-Modified`, `Accept-Ranges`, `If-Range` (entity tag or date), `If-None-Match` and
  `If-Modified-Since` are handled here, not by `web.FileResponse`: aiohttp <= 3.14.5 honours
  `If-Range` only as a date, guesses content types and serves `.gz` siblings, none of which a
  firmware repository wants.
* PUT streams the body to a temporary file next to the target, fsyncs it and renames it over
  the target only when the body is complete, so a broken upload (client gone, malformed
  chunk, no data for UPLOAD_STALL_TIMEOUT_S) never replaces a good file nor leaves a temp one.
* DELETE removes a file (202, also when it is missing; 409 for a directory).

What a client can hold is bounded, so that no one can take the port (and the descriptors of
the process) away from the children: a client gets `idle_timeout` seconds to send its request
headers, and a connection idle that long between requests is closed (aiohttp's keep-alive
timer, armed from the moment a connection is accepted); a TLS handshake gets as long. At most
`max_connections` are open at once, counted from accept to close (TLS handshakes included);
one more gets a `503` at once and is closed (on a TLS port: closed at once, before any
handshake), and the refusal is logged once a minute with a count. The limit is kept
below half the open-file limit of the process, after a reserve for the rest of the service
and for connections being turned away (a transfer holds a socket and a file).

Path rules (the reason this module exists; thin-edge 0.12 let `..` reach all of `data.path`):
the raw path after the prefix is percent-decoded exactly once, the query string is ignored, and
empty, `.` and `..` segments, NUL bytes, backslashes and absolute paths are refused (400).
Symbolic links inside `root` are followed only when their real target lies inside `cache_dir`
(the firmware plugin publishes `root/<child>/firmware_update/<FILE_ID>` → `cache_dir/<FILE_ID>`);
any other link answers 404, for every method. PUT and DELETE act on the entry in `root` (a link
is replaced or unlinked, never written through) and refuse to descend through a linked
directory (403). Only local users can create links; HTTP clients can only create regular files
and directories, so they cannot race a checked path into pointing elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import resource
import secrets
import socket
import ssl
import stat
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from email.utils import formatdate
from pathlib import Path
from typing import Any, BinaryIO, Final, TypeVar
from urllib.parse import unquote_to_bytes

from aiohttp import web
from aiohttp.http import HttpProcessingError

from tedge_firmware.core.access import READS, WritePolicy, access_problem
from tedge_firmware.core.http import (
    ByteRange,
    RangeVerdict,
    entity_tag,
    if_range_allows,
    is_not_modified,
    multipart_layout,
    parse_byte_ranges,
)
from tedge_firmware.core.links import link_problem
from tedge_firmware.errors import ConfigError
from tedge_firmware.shell.durable import fsync_directory
from tedge_firmware.shell.log_limits import LogLimiter

__all__ = [
    "ALLOWED_METHODS",
    "ROUTE_PREFIXES",
    "STOP_TIMEOUT_S",
    "UPLOAD_STALL_TIMEOUT_S",
    "FileTransferServer",
    "build_app",
    "url_segments",
]

T = TypeVar("T")

logger = logging.getLogger(__name__)

ROUTE_PREFIXES: Final = ("/tedge/file-transfer/", "/te/v1/files/")
ALLOWED_METHODS: Final = ("GET", "HEAD", "PUT", "DELETE")
STOP_TIMEOUT_S: Final = 2.0
"""How long stop() lets running requests finish before they are cancelled."""
UPLOAD_STALL_TIMEOUT_S = 60.0
"""A PUT whose body sends nothing for this long is abandoned (408); the file is unchanged."""

DEFAULT_MAX_CONNECTIONS: Final = 1024
DEFAULT_IDLE_TIMEOUT_S: Final = 30.0
# Descriptors kept for everything but client connections (broker, downloads, logs, cache).
_DESCRIPTORS_RESERVED: Final = 128
# asyncio accepts up to this many connections at once before any of them runs (the listen
# backlog): connections beyond the limit hold a descriptor until their 503 is out.
_ACCEPT_BURST: Final = 32
# How many such bursts hold descriptors at once under a flood: a burst accepted in one turn of
# the event loop gets its protocols in the next and is closed in the one after, while each turn
# accepts another burst (three bursts of 128 and the 128 connections of the limit exhausted 512
# descriptors: the flood test's EMFILE).
_BURSTS_IN_FLIGHT: Final = 3
_REFUSAL: Final = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n"
    b"Retry-After: 5\r\n\r\n"
)
_CHUNK_SIZE: Final = 256 * 1024
_TEMP_PREFIX: Final = ".ft-upload-"
_OCTET_STREAM: Final = "application/octet-stream"


# --- URL paths (pure) ---------------------------------------------------------------------


def url_segments(raw_path: str) -> list[str] | None:
    """Split a raw request path (no query) into file name segments below the repository.

    Returns None when the path is not under one of ROUTE_PREFIXES (the caller answers 404),
    an empty list for the repository itself, and raises HTTPBadRequest for a path that no
    file name may have. The remainder is percent-decoded once: `%252e` stays the name `%2e`.
    """
    prefix = next((p for p in ROUTE_PREFIXES if raw_path.startswith(p)), None)
    if prefix is None:
        return None
    rest = raw_path[len(prefix) :]
    if not rest:
        return []
    try:
        decoded = unquote_to_bytes(rest)
    except UnicodeEncodeError:  # the raw path held characters no client may send
        raise _bad_path("is not valid") from None
    return _checked_segments(decoded)


def _checked_segments(decoded: bytes) -> list[str]:
    if b"\0" in decoded:
        raise _bad_path("contains a NUL byte")
    if b"\\" in decoded:  # some clients mean a separator: refuse rather than guess
        raise _bad_path("contains a backslash")
    if decoded.startswith(b"/"):
        raise _bad_path("is absolute")
    segments = decoded.split(b"/")
    if any(segment in (b"", b".", b"..") for segment in segments):
        raise _bad_path("has an empty, '.' or '..' segment")
    return [os.fsdecode(segment) for segment in segments]


def _bad_path(why: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(text=f"The file path {why}.\n")


# --- File system (blocking: run in worker threads) -----------------------------------------


@dataclass(frozen=True)
class _Places:
    """The real (symlink-free) paths of the repository and of the firmware cache."""

    root: Path
    cache: Path

    @classmethod
    def current(cls, root: Path, cache_dir: Path) -> _Places:
        # Recreated on every request: an admin or a test may delete it at run time.
        root.mkdir(parents=True, exist_ok=True)
        return cls(Path(os.path.realpath(root)), Path(os.path.realpath(cache_dir)))

    def link_target(self, link: Path) -> Path:
        """The real target of a symlink in the repository; 404 unless it is in the cache."""
        target = Path(os.path.realpath(link))
        if not target.is_relative_to(self.cache):
            logger.warning("File transfer: refusing symlink %s -> %s", link, target)
            raise _not_found()
        return target


def _not_found() -> web.HTTPNotFound:
    return web.HTTPNotFound(text="No such file.\n")


def _published_by_the_gateway() -> web.HTTPForbidden:
    return web.HTTPForbidden(
        text="This is a firmware the gateway published: it cannot be replaced or removed "
        "over HTTP.\n"
    )


def _lstat_mode(path: Path) -> int | None:
    try:
        return path.lstat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None


def _open_for_reading(places: _Places, segments: Sequence[str]) -> tuple[BinaryIO, os.stat_result]:
    """Open the regular file a URL names, following links only into the cache."""
    path = places.root
    for name in segments:
        path = path / name
        if path.is_symlink():
            path = places.link_target(path)
    # O_NOFOLLOW: the checked path is what gets opened; O_NONBLOCK: a FIFO cannot hang us.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except PermissionError:
        raise web.HTTPForbidden(text="The file cannot be read.\n") from None
    except OSError:  # missing, a parent is a file, a symlink loop, a name too long
        raise _not_found() from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise _not_found()
    return os.fdopen(fd, "rb"), st


def _parent_for_writing(places: _Places, segments: Sequence[str], *, create: bool) -> Path | None:
    """The real directory that holds the last segment, created when asked.

    None when it does not exist and `create` is false. Writes never go through a link.
    """
    parent = places.root
    for name in segments[:-1]:
        parent = parent / name
        mode = _lstat_mode(parent)
        if mode is None and not create:
            return None
        if mode is None:
            parent.mkdir(exist_ok=True)
            mode = parent.lstat().st_mode
        if stat.S_ISLNK(mode):
            places.link_target(parent)
            raise web.HTTPForbidden(text="Files are not written through symbolic links.\n")
        if not stat.S_ISDIR(mode):
            raise web.HTTPConflict(text=f"'{name}' is a file, not a directory.\n")
    return parent


def _checked_entry(places: _Places, entry: Path) -> int | None:
    """The lstat mode of the entry a write replaces; 404 for a link leading out of the cache,
    403 for any other link: those are the firmware the gateway published for a child."""
    mode = _lstat_mode(entry)
    if mode is not None and stat.S_ISLNK(mode):
        places.link_target(entry)
        raise _published_by_the_gateway()
    if mode is not None and stat.S_ISDIR(mode):
        raise web.HTTPConflict(text="The path is a directory.\n")
    return mode


class _Upload:
    """A temporary file that becomes `target` when the whole body has arrived.

    Writes run in worker threads; the lock keeps discard() (which must also run on
    cancellation, when the thread may still be writing) from closing the descriptor under
    a write, which could otherwise land in whatever file reuses the number.
    """

    def __init__(self, fd: int, temp: Path, target: Path) -> None:
        self._fd = fd
        self._lock = threading.Lock()
        self.temp = temp
        self.target = target
        self.received = 0

    @classmethod
    def begin(cls, places: _Places, segments: Sequence[str]) -> _Upload:
        parent = _parent_for_writing(places, segments, create=True)
        assert parent is not None  # created on demand
        target = parent / segments[-1]
        _checked_entry(places, target)
        # A fixed-length name: a target name near NAME_MAX must not make the temp name fail.
        temp = parent / f"{_TEMP_PREFIX}{secrets.token_hex(8)}"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        return cls(fd, temp, target)

    def write(self, data: bytes) -> None:
        with self._lock:
            view = memoryview(data)
            while view:
                view = view[os.write(self._open_fd(), view) :]
            self.received += len(data)

    def commit(self) -> None:
        """Make the upload durable and visible in one step (fsync, rename, fsync dir)."""
        with self._lock:
            os.fsync(self._open_fd())
            self._close()
            if os.path.islink(self.target):  # published meanwhile: the gateway's, not ours
                raise _published_by_the_gateway()
            os.replace(self.temp, self.target)
        fsync_directory(self.target.parent)

    def discard(self) -> None:
        """Remove the temporary file (called on any failure, also on cancellation)."""
        with self._lock:
            self._close()
            self.temp.unlink(missing_ok=True)

    def _open_fd(self) -> int:
        if self._fd < 0:
            raise OSError(errno.EBADF, "the upload was already closed")
        return self._fd

    def _close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _delete_entry(places: _Places, segments: Sequence[str]) -> None:
    parent = _parent_for_writing(places, segments, create=False)
    if parent is None:
        return
    entry = parent / segments[-1]
    if _checked_entry(places, entry) is not None:
        entry.unlink(missing_ok=True)  # a link is removed, never what it points to


# --- HTTP handlers ------------------------------------------------------------------------


class _FileTransferHandler:
    """One handler for every path: aiohttp's router would decode and normalise it first."""

    def __init__(
        self,
        root: Path,
        cache_dir: Path,
        main_device_id: str | None = None,
        writes: WritePolicy = WritePolicy.OWN,
        link_secret: bytes | None = None,
    ) -> None:
        self._root = root
        self._cache_dir = cache_dir
        self._main_device_id = main_device_id
        self._writes = writes
        self._link_secret = link_secret
        self._methods: dict[str, Callable[[web.Request, list[str]], Awaitable[web.StreamResponse]]]
        self._methods = {
            "GET": self._get,
            "HEAD": self._get,
            "PUT": self._put,
            "DELETE": self._delete,
        }

    async def handle(self, request: web.Request) -> web.StreamResponse:
        try:
            response = await self._dispatch(request)
        except web.HTTPException as exc:
            _log_request(request, exc.status, exc.text)
            raise
        except OSError as exc:
            verb = "read" if request.method in ("GET", "HEAD") else "written"
            error = _os_error_response(exc, verb)
            _log_request(request, error.status, f"{error.text} ({exc})")
            raise error from exc
        detail = response.text if isinstance(response, web.Response) else None
        _log_request(request, response.status, detail)
        return response

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        segments = url_segments(request.rel_url.raw_path)
        if segments is None:
            raise web.HTTPNotFound(text="Not a file-transfer path.\n")
        method = self._methods.get(request.method)
        if method is None:
            raise web.HTTPMethodNotAllowed(request.method, ALLOWED_METHODS)
        if not segments:
            raise web.HTTPNotFound(text="The repository itself cannot be read or written.\n")
        client = _client_name(request)
        problem = access_problem(
            request.method, segments, client, self._main_device_id, self._writes
        )
        if problem is None and self._link_secret is not None and request.method in READS:
            path = "/".join(segments)
            problem = link_problem(self._link_secret, path, request.rel_url.query, time.time())
        if problem is not None:
            raise web.HTTPForbidden(text=problem)
        return await method(request, segments)

    async def _in_places(
        self, action: Callable[[_Places, Sequence[str]], T], segments: Sequence[str]
    ) -> T:
        """`action(places, segments)` in a worker thread, the places looked up there first: one
        hop off the event loop per request, not two (a fleet's downloads come by the thousand)."""

        def run() -> T:
            return action(_Places.current(self._root, self._cache_dir), segments)

        return await asyncio.to_thread(run)

    async def _get(self, request: web.Request, segments: list[str]) -> web.StreamResponse:
        file, st = await self._in_places(_open_for_reading, segments)
        try:
            return await _send_file(request, file, st)
        finally:
            file.close()

    async def _put(self, request: web.Request, segments: list[str]) -> web.StreamResponse:
        upload = await self._in_places(_Upload.begin, segments)
        try:
            failure = await _receive_body(request, upload)
            if failure is None:
                await asyncio.to_thread(upload.commit)
        except BaseException:
            upload.discard()  # synchronous: must also run when the handler is cancelled
            raise
        if failure is not None:
            upload.discard()
            return await _answer_and_close(request, failure)
        return web.Response(status=201)

    async def _delete(self, request: web.Request, segments: list[str]) -> web.StreamResponse:
        await self._in_places(_delete_entry, segments)
        return web.Response(status=202)


async def _receive_body(request: web.Request, upload: _Upload) -> web.Response | None:
    """Stream the body into the upload; the answer to send when it ended badly, else None."""
    try:
        while chunk := await _next_chunk(request):
            await asyncio.to_thread(upload.write, chunk)
    except ConnectionError:  # aiohttp's way of saying the client went away mid-body
        return _upload_failed(400, f"connection lost after {upload.received} bytes")
    except (web.RequestPayloadError, HttpProcessingError) as exc:  # e.g. a broken chunk
        return _upload_failed(400, f"malformed body: {exc}")
    except TimeoutError:
        stalled = f"no data for {UPLOAD_STALL_TIMEOUT_S:.0f} s after {upload.received} bytes"
        return _upload_failed(408, stalled)
    expected = request.content_length
    if expected is not None and upload.received != expected:
        return _upload_failed(400, f"got {upload.received} of {expected} bytes")
    return None


async def _next_chunk(request: web.Request) -> bytes:
    # A stall bound of our own: aiohttp has no body read timeout, and its C parser leaves the
    # body waiting forever after a malformed chunk (the pure-Python one raises).
    async with asyncio.timeout(UPLOAD_STALL_TIMEOUT_S):
        return await request.content.read(_CHUNK_SIZE)


def _upload_failed(status: int, why: str) -> web.Response:
    return web.Response(status=status, text=f"Incomplete upload ({why}): nothing changed.\n")


async def _answer_and_close(request: web.Request, response: web.Response) -> web.Response:
    """Send an answer to a broken upload, then close the connection.

    What is left of the body is worthless; without the close aiohttp would linger up to 10 s
    reading it before it takes the next request.
    """
    with contextlib.suppress(ConnectionError):  # the client may be gone already
        await response.prepare(request)
        await response.write_eof()
    request.protocol.force_close()
    return response


def _client_name(request: web.Request) -> str | None:
    """The common name of the client's certificate; None without one (or without TLS)."""
    transport = request.transport
    certificate = transport.get_extra_info("peercert") if transport is not None else None
    if not certificate:
        return None
    for rdn in certificate.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


def _os_error_response(exc: OSError, verb: str) -> web.HTTPException:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return web.HTTPInsufficientStorage(text="No space left on the gateway's disk.\n")
    if isinstance(exc, PermissionError):
        return web.HTTPForbidden(text="Permission denied by the file system.\n")
    if isinstance(exc, IsADirectoryError):
        return web.HTTPConflict(text="The path is a directory.\n")
    if isinstance(exc, NotADirectoryError | FileExistsError):
        return web.HTTPConflict(text="A parent of the path is a file.\n")
    if exc.errno == errno.ENAMETOOLONG:
        return web.HTTPBadRequest(text="The file name is too long.\n")
    reason = exc.strerror or type(exc).__name__
    return web.HTTPInternalServerError(text=f"The file cannot be {verb}: {reason}.\n")


def _log_request(request: web.Request, status: int, detail: str | None) -> None:
    # %r and the folded detail: a hostile path or body must not be able to forge log lines.
    if status >= 500 or status in (400, 403, 408):
        folded = " ".join((detail or "").split())
        logger.warning(
            "File transfer: %s %r -> %d %s", request.method, request.raw_path, status, folded
        )
    else:
        logger.debug("File transfer: %s %r -> %d", request.method, request.raw_path, status)


def _file_headers(st: os.stat_result) -> dict[str, str]:
    return {
        "Accept-Ranges": "bytes",
        "ETag": entity_tag(st),
        "Last-Modified": formatdate(st.st_mtime, usegmt=True),
        "Content-Type": _OCTET_STREAM,
    }


def _selected_ranges(request: web.Request, st: os.stat_result) -> list[ByteRange] | RangeVerdict:
    """The parts of the file a GET asks for, with If-Range checked first."""
    headers = request.headers
    if not if_range_allows(headers.get("If-Range"), entity_tag(st), st.st_mtime):
        return RangeVerdict.WHOLE
    return parse_byte_ranges(headers.get("Range"), st.st_size)


async def _send_file(
    request: web.Request, file: BinaryIO, st: os.stat_result
) -> web.StreamResponse:
    response = web.StreamResponse(headers=_file_headers(st))
    since = request.headers.get("If-Modified-Since")
    if is_not_modified(request.headers.get("If-None-Match"), since, entity_tag(st), st.st_mtime):
        response.set_status(304)
        await response.prepare(request)
        return response
    ranges = _selected_ranges(request, st)
    if ranges is RangeVerdict.UNSATISFIABLE:
        response.set_status(416)
        response.headers["Content-Range"] = f"bytes */{st.st_size}"
        response.content_length = 0
        await response.prepare(request)
        return response
    if isinstance(ranges, list) and len(ranges) > 1:
        return await _send_ranges(request, response, file, st, ranges)
    if isinstance(ranges, list):
        [selected] = ranges
        response.set_status(206)
        response.headers["Content-Range"] = selected.content_range(st.st_size)
    else:
        selected = ByteRange(0, st.st_size)
    response.content_length = selected.length
    await response.prepare(request)
    try:
        if request.method != "HEAD" and selected.length:
            await _stream_range(request, response, file, selected)
        await response.write_eof()
    except ConnectionError as exc:  # routine: a child that reboots mid-download
        logger.debug("File transfer: %r: the client left mid-body (%s)", request.raw_path, exc)
        response.force_close()
    return response


async def _send_ranges(
    request: web.Request,
    response: web.StreamResponse,
    file: BinaryIO,
    st: os.stat_result,
    ranges: list[ByteRange],
) -> web.StreamResponse:
    """Several ranges: one `206 multipart/byteranges` body (for delta and chunk clients)."""
    layout = multipart_layout(ranges, st.st_size, secrets.token_hex(16), _OCTET_STREAM)
    response.set_status(206)
    response.headers["Content-Type"] = layout.content_type
    response.content_length = layout.length
    await response.prepare(request)
    try:
        if request.method != "HEAD":
            for head, selected in zip(layout.heads, ranges, strict=True):
                await response.write(head)
                if await _copy_range(response, file, selected) < selected.length:
                    response.force_close()  # the file shrank under us: a short body
                    return response
            await response.write(layout.tail)
        await response.write_eof()
    except ConnectionError as exc:
        logger.debug("File transfer: %r: the client left mid-body (%s)", request.raw_path, exc)
        response.force_close()
    return response


async def _stream_range(
    request: web.Request, response: web.StreamResponse, file: BinaryIO, selected: ByteRange
) -> None:
    transport = request.transport
    if transport is None or transport.is_closing():
        raise ConnectionResetError("the client went away")
    if transport.get_extra_info("sslcontext") is not None:
        # asyncio's sendfile over TLS falls back to 16 KiB reads, each through a thread: our
        # 256 KiB pieces are 6-7x faster (72 -> 490 MB/s on loopback). 1 MiB pieces were
        # faster still (830 MB/s) but held 3.7 MiB per download in flight, not 1.3.
        sent = await _copy_range(response, file, selected)
    else:
        sent = await _sendfile(transport, response, file, selected)
    if sent < selected.length:  # the file shrank under us: the client must see a short body
        response.force_close()


async def _sendfile(
    transport: asyncio.BaseTransport,
    response: web.StreamResponse,
    file: BinaryIO,
    selected: ByteRange,
) -> int:
    assert isinstance(transport, asyncio.WriteTransport)
    try:
        # The headers are already on the wire (StreamResponse sends them at prepare()).
        loop = asyncio.get_running_loop()
        return await loop.sendfile(transport, file, selected.start, selected.length)
    except NotImplementedError:  # an event loop without sendfile (uvloop on some transports)
        return await _copy_range(response, file, selected)


async def _copy_range(response: web.StreamResponse, file: BinaryIO, selected: ByteRange) -> int:
    await asyncio.to_thread(file.seek, selected.start)
    sent = 0
    while sent < selected.length:
        data = await asyncio.to_thread(file.read, min(_CHUNK_SIZE, selected.length - sent))
        if not data:
            break
        await response.write(data)
        sent += len(data)
    return sent


# --- Application and server ---------------------------------------------------------------


def build_app(
    *,
    root: Path,
    cache_dir: Path,
    main_device_id: str | None = None,
    writes: WritePolicy = WritePolicy.OWN,
    link_secret: bytes | None = None,
) -> web.Application:
    """The aiohttp application serving `root` at both route prefixes."""
    app = web.Application()
    handler = _FileTransferHandler(root, cache_dir, main_device_id, writes, link_secret)
    app.router.add_route("*", "/{tail:.*}", handler.handle)
    return app


class _ServerLog(logging.LoggerAdapter[logging.Logger]):
    """aiohttp's server log, for our service: a request aiohttp's parser refuses (it answers
    400) is the client's fault and gets one warning line, summed up when repeated; a traceback
    stays for what is not (an error in our handler)."""

    def __init__(self) -> None:
        super().__init__(logging.getLogger("aiohttp.server"), {})
        self._refusals = LogLimiter(logger)

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        refused = kwargs.get("exc_info")
        if not isinstance(refused, HttpProcessingError):
            super().log(level, msg, *args, **kwargs)
            return
        detail = " ".join(str(refused).split())[:200]
        peer = args[0] if args else "?"
        if level < logging.WARNING:  # aiohttp's choice for non-HTTP bytes: debug
            logger.debug("File transfer: not HTTP from %s: %s", peer, detail)
            return
        self._refusals.log(
            logging.WARNING,
            ("malformed request", type(refused).__name__),
            "File transfer: malformed request from %s refused: %s",
            peer,
            detail,
        )


class _Counted(asyncio.Protocol):
    """aiohttp's protocol for one connection, counted from accept until the connection ends.

    `release` runs once: when the connection is lost, or when asyncio drops the protocol
    without telling it (a TLS handshake that failed or timed out never reaches it).
    """

    def __init__(self, inner: asyncio.Protocol, release: Callable[[], None]) -> None:
        self._inner = inner
        self._release = weakref.finalize(self, release)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._release()
        self._inner.connection_lost(exc)

    def abandon(self) -> None:
        """The connection ended before aiohttp saw it (its TLS handshake failed)."""
        self._release()


class _TlsStart(asyncio.Protocol):
    """A connection inside the limit on a TLS port: accepted as plain TCP, its handshake run
    here with `handshake_timeout`, then handed to aiohttp.

    Why not asyncio's TLS server: it runs the handshake before any protocol of ours sees the
    connection, so a connection beyond the limit (or any garbage) would keep its descriptor
    for the whole handshake time limit; a flood of handshakes that never finish exhausted the
    descriptors of the process. Here, what is beyond the limit is closed at once.
    """

    def __init__(self, inner: _Counted, context: ssl.SSLContext, handshake_timeout: float) -> None:
        self._inner = inner
        self._context = context
        self._handshake_timeout = handshake_timeout
        self._starting: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.pause_reading()  # the client hello is for the TLS layer, not for us
        self._starting = asyncio.get_running_loop().create_task(self._start(transport))

    async def _start(self, transport: asyncio.Transport) -> None:
        loop = asyncio.get_running_loop()
        try:
            secured = await loop.start_tls(
                transport,
                self._inner,
                self._context,
                server_side=True,
                ssl_handshake_timeout=self._handshake_timeout,
            )
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError, RuntimeError) as error:
            # no certificate, a wrong one, garbage, too slow: the client hears an alert at most
            logger.debug("File transfer: TLS handshake failed: %s", error)
            transport.abort()
            self._inner.abandon()
            return
        if secured is None:  # the connection went away meanwhile
            self._inner.abandon()
            return
        self._inner.connection_made(secured)

    def connection_lost(self, exc: Exception | None) -> None:
        # before start_tls took the transport over: the client left at once
        if self._starting is not None:
            self._starting.cancel()
        self._inner.abandon()


class _Refusal(asyncio.Protocol):
    """A connection beyond the limit: a 503 without reading anything, then closed; on a TLS
    port closed at once (a 503 would first need a handshake)."""

    def __init__(self, tls: bool) -> None:
        self._tls = tls

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        if self._tls:
            transport.abort()
            return
        transport.write(_REFUSAL)
        transport.close()


class _ConnectionLimit:
    """The protocol factory of the listening socket: aiohttp's, up to `limit` connections."""

    def __init__(
        self,
        factory: Callable[[], asyncio.Protocol],
        limit: int,
        tls: ssl.SSLContext | None = None,
        handshake_timeout: float = DEFAULT_IDLE_TIMEOUT_S,
    ) -> None:
        self._factory = factory
        self._tls = tls
        self._handshake_timeout = handshake_timeout
        self.limit = limit
        self.open = 0
        self.refused = 0
        self._refusals = LogLimiter(logger)

    def __call__(self) -> asyncio.Protocol:
        if self.open >= self.limit:
            self.refused += 1
            self._refusals.log(
                logging.WARNING,
                "refused",
                "File transfer: %d connections open, the limit (http.max_connections): "
                "new ones get 503 (%d refused so far)",
                self.open,
                self.refused,
            )
            return _Refusal(tls=self._tls is not None)
        self.open += 1
        counted = _Counted(self._factory(), self._closed)
        if self._tls is None:
            return counted
        return _TlsStart(counted, self._tls, self._handshake_timeout)

    def _closed(self) -> None:
        self.open -= 1


class _LimitedSite(web.BaseSite):
    """A TCP site whose connections go through a `_ConnectionLimit` (aiohttp's TCPSite has no
    limit and no TLS handshake timeout); TLS is started per connection, inside the limit."""

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        *,
        limit: int,
        ssl_context: ssl.SSLContext | None,
        handshake_timeout: float,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context)
        self._host = host
        self._port = port
        self._handshake_timeout = handshake_timeout
        assert runner.server is not None
        self.connections = _ConnectionLimit(runner.server, limit, ssl_context, handshake_timeout)

    @property
    def name(self) -> str:
        scheme = "https" if self._ssl_context else "http"
        return f"{scheme}://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        self._server = await asyncio.get_running_loop().create_server(
            self.connections,
            self._host,
            self._port,
            backlog=_ACCEPT_BURST,
            reuse_address=True,
        )  # TLS: started per connection, see _TlsStart


def connection_limit(wanted: int) -> int:
    """`wanted`, or less when the open-file limit of the process could not hold that many
    transfers (a socket and a file each) besides what the rest of the service needs and a
    burst of connections being turned away."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    turned_away = _BURSTS_IN_FLIGHT * _ACCEPT_BURST
    return max(1, min(wanted, (soft - _DESCRIPTORS_RESERVED - turned_away) // 2))


class FileTransferServer:
    """The file-transfer service bound to one address; start() it, then stop() it."""

    def __init__(
        self,
        *,
        root: Path,
        cache_dir: Path,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext | None = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT_S,
        main_device_id: str | None = None,
        writes: WritePolicy = WritePolicy.OWN,
        link_secret: bytes | None = None,
    ) -> None:
        """`main_device_id`: the common name whose certificate reads and writes everything
        (client certificates only); `writes`: who may PUT and DELETE (core.access);
        `link_secret`: reads need a link signed with it (core.links)."""
        self._main_device_id = main_device_id
        self._writes = writes
        self._link_secret = link_secret
        self._root = root
        self._cache_dir = cache_dir
        self._host = host.removeprefix("[").removesuffix("]")  # "[::1]" works as "::1"
        self._port = port
        self._ssl_context = ssl_context
        self._max_connections = max_connections
        self._idle_timeout = idle_timeout
        self._runner: web.AppRunner | None = None
        self._site: _LimitedSite | None = None

    @property
    def open_connections(self) -> int:
        """Client connections open now (TLS handshakes included)."""
        return 0 if self._site is None else self._site.connections.open

    @property
    def port(self) -> int:
        """The bound port after start() (useful with port 0); the configured one before."""
        if self._runner is not None and self._runner.addresses:
            return int(self._runner.addresses[0][1])
        return self._port

    async def start(self) -> None:
        """Bind and serve. Raises ConfigError when the address cannot be bound."""
        app = build_app(
            root=self._root,
            cache_dir=self._cache_dir,
            main_device_id=self._main_device_id,
            writes=self._writes,
            link_secret=self._link_secret,
        )
        # access_log=None: the handler logs one line per request itself, at debug level.
        # keepalive_timeout: aiohttp arms it when a connection is accepted and again after each
        # response, and closes the connection if no complete request head came meanwhile.
        runner = web.AppRunner(
            app,
            access_log=None,
            shutdown_timeout=STOP_TIMEOUT_S,
            keepalive_timeout=self._idle_timeout,
            logger=_ServerLog(),
        )
        await runner.setup()
        limit = connection_limit(self._max_connections)
        if limit < self._max_connections:
            logger.warning(
                "File transfer: at most %d connections (http.max_connections is %d, but the "
                "open-file limit of this process is %d; raise LimitNOFILE)",
                limit,
                self._max_connections,
                resource.getrlimit(resource.RLIMIT_NOFILE)[0],
            )
        site = _LimitedSite(
            runner,
            self._host,
            self._port,
            limit=limit,
            ssl_context=self._ssl_context,
            handshake_timeout=self._idle_timeout,
        )
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise ConfigError(f"cannot bind {self._address()}: {_bind_failure(exc)}") from exc
        self._runner = runner
        self._site = site
        logger.info(
            "File transfer: serving %s on %s://%s%s",
            self._root,
            "https" if self._ssl_context else "http",
            self._address(self.port),
            self._client_certificates(),
        )

    async def stop(self) -> None:
        """Stop accepting; running requests get STOP_TIMEOUT_S, then are cancelled.

        aiohttp may wait that long twice (finish, then cancel), so stop() takes at most about
        2 * STOP_TIMEOUT_S; a hard cap of 3 * STOP_TIMEOUT_S guards against anything else.
        """
        runner, self._runner = self._runner, None
        self._site = None
        if runner is None:
            return
        try:
            async with asyncio.timeout(3 * STOP_TIMEOUT_S):
                await runner.cleanup()
        except TimeoutError:
            logger.warning("File transfer: stop took longer than %.0f s", 3 * STOP_TIMEOUT_S)

    def _client_certificates(self) -> str:
        if self._ssl_context is None or self._ssl_context.verify_mode != ssl.CERT_REQUIRED:
            return ""
        return " (client certificates required)"

    def _address(self, port: int | None = None) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"{host}:{self._port if port is None else port}"


def _bind_failure(exc: OSError) -> str:
    if isinstance(exc, socket.gaierror):
        return f"unknown host ({exc.strerror})"
    known = {
        errno.EADDRINUSE: "address in use",
        errno.EADDRNOTAVAIL: "address not available on this machine",
        errno.EACCES: "permission denied (ports below 1024 need privileges)",
    }
    return known.get(exc.errno or 0, exc.strerror or str(exc))
