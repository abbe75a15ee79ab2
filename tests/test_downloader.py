"""The cloud downloader against real aiohttp servers on loopback and a fault-injecting proxy."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import hashlib
import itertools
import logging
import os
import re
import shutil
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.client_reqrep import ConnectionKey
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from faultproxy import Fault, FaultProxy
from tedge_firmware.core.retry import RetryPolicy
from tedge_firmware.errors import DownloadError
from tedge_firmware.shell.download_failures import EXCEPTION_MAP, FailureContext, describe_exception
from tedge_firmware.shell.downloader import Downloader, DownloadResult
from tedge_firmware.shell.partial_file import SYNC_FILE_RANGE, SYNC_FILE_RANGE_WRITE, WRITEBACK_STEP

FAST = RetryPolicy(initial=0.05, multiplier=2.0, max_interval=0.2, max_elapsed=2.0, jitter=0.1)
SHORT_BUDGET = RetryPolicy(initial=0.05, multiplier=2.0, max_interval=0.1, max_elapsed=0.5)
WAIT = 15.0  # bound for any single test step; tests finish far below it


@dataclass
class Seen:
    """What a test server saw: request headers and arrival times (monotonic)."""

    headers: list[CIMultiDictProxy[str]] = field(default_factory=list)
    times: list[float] = field(default_factory=list)

    def record(self, request: web.Request) -> None:
        self.headers.append(request.headers)
        self.times.append(time.monotonic())

    @property
    def count(self) -> int:
        return len(self.headers)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@asynccontextmanager
async def serve(handler: Handler, path: str = "/fw.bin") -> AsyncIterator[str]:
    """Serve one route on 127.0.0.1 (free port); yields the base url."""
    app = web.Application()
    app.router.add_get(path, handler)
    # A short shutdown bound: a test that leaves a handler hanging must not wait 60 s here.
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


RawHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def serve_raw(respond: RawHandler) -> AsyncIterator[str]:
    """A bare TCP server for answers aiohttp's server would not send; yields the base url."""
    server = await asyncio.start_server(respond, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        await server.wait_closed()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


def payload(size: int, seed: int = 1) -> bytes:
    """Deterministic, non-repeating-looking bytes."""
    block = hashlib.sha256(str(seed).encode()).digest()
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(block + counter.to_bytes(8, "big")).digest()
        counter += 1
    return bytes(out[:size])


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.fixture
async def downloader() -> AsyncIterator[Downloader]:
    instance = Downloader(retry=FAST, stall_timeout=2.0, chunk_size=64 * 1024)
    try:
        yield instance
    finally:
        await instance.close()


async def fetch(
    downloader: Downloader, url: str, target: Path, token: str | None = None
) -> DownloadResult:
    async with asyncio.timeout(WAIT):
        return await downloader.download(url, target, token=token)


async def fetch_error(
    downloader: Downloader, url: str, target: Path, token: str | None = None
) -> DownloadError:
    with pytest.raises(DownloadError) as caught:
        await fetch(downloader, url, target, token)
    return caught.value


# success and authorization ------------------------------------------------------------------


async def test_download_writes_the_bytes_and_their_sha256(
    downloader: Downloader, tmp_path: Path
) -> None:
    body = payload(300_000)
    seen = Seen()

    async def handler(request: web.Request) -> web.Response:
        seen.record(request)
        return web.Response(body=body)

    target = tmp_path / "firmware"
    async with serve(handler) as base:
        result = await fetch(downloader, f"{base}/fw.bin", target)
    assert result == DownloadResult(target, sha256(body), len(body))
    assert target.read_bytes() == body
    assert leftovers(tmp_path) == ["firmware"]
    assert "Authorization" not in seen.headers[0]
    assert seen.headers[0]["Accept-Encoding"] == "identity"


async def test_token_is_sent_as_bearer_only_when_given(
    downloader: Downloader, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    seen = Seen()
    token = "eyJhbGciOi.secret-token.sig"

    async def handler(request: web.Request) -> web.Response:
        seen.record(request)
        return web.Response(body=b"x" * 10)

    caplog.set_level(logging.INFO, logger="tedge_firmware")
    async with serve(handler) as base:
        await fetch(downloader, f"{base}/fw.bin", tmp_path / "a", token=token)
        await fetch(downloader, f"{base}/fw.bin", tmp_path / "b")
    assert seen.headers[0]["Authorization"] == f"Bearer {token}"
    assert "Authorization" not in seen.headers[1]
    assert f"{base}/fw.bin" in caplog.text
    assert token not in caplog.text


async def test_the_token_does_not_follow_a_redirect_to_another_origin(
    downloader: Downloader, tmp_path: Path
) -> None:
    tenant, storage = Seen(), Seen()

    async def storage_handler(request: web.Request) -> web.Response:
        storage.record(request)
        return web.Response(body=b"firmware")

    async with serve(storage_handler) as storage_base:

        async def tenant_handler(request: web.Request) -> web.Response:
            tenant.record(request)
            raise web.HTTPFound(f"{storage_base}/fw.bin")

        async with serve(tenant_handler) as tenant_base:
            result = await fetch(downloader, f"{tenant_base}/fw.bin", tmp_path / "fw", "tok")
    assert result.sha256 == sha256(b"firmware")
    assert tenant.headers[0]["Authorization"] == "Bearer tok"
    assert "Authorization" not in storage.headers[0]


async def test_an_existing_target_is_replaced(downloader: Downloader, tmp_path: Path) -> None:
    target = tmp_path / "firmware"
    target.write_bytes(b"old content that is longer than the new one")

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=b"new")

    async with serve(handler) as base:
        result = await fetch(downloader, f"{base}/fw.bin", target)
    assert target.read_bytes() == b"new"
    assert result.size == 3


async def test_an_empty_body_is_a_valid_download(downloader: Downloader, tmp_path: Path) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=b"")

    async with serve(handler) as base:
        result = await fetch(downloader, f"{base}/fw.bin", tmp_path / "empty")
    assert (result.size, result.sha256) == (0, sha256(b""))


async def test_the_body_is_stored_as_sent_not_decompressed(
    downloader: Downloader, tmp_path: Path
) -> None:
    gzipped = bytes.fromhex("1f8b0800000000000003cb48cdc9c90700863ba61005000000")  # "hello"

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=gzipped, headers={"Content-Encoding": "gzip"})

    async with serve(handler) as base:
        result = await fetch(downloader, f"{base}/fw.bin", tmp_path / "fw")
    assert (tmp_path / "fw").read_bytes() == gzipped
    assert result.sha256 == sha256(gzipped)


# HTTP status handling -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "detail"),
    [
        (404, "HTTP 404 Not Found"),
        (400, "HTTP 400 Bad Request"),
        (401, "HTTP 401 Unauthorized"),
        (403, "HTTP 403 Forbidden"),
        (410, "HTTP 410 Gone"),
    ],
)
async def test_permanent_status_fails_at_once(
    downloader: Downloader, tmp_path: Path, status: int, detail: str
) -> None:
    seen = Seen()

    async def handler(request: web.Request) -> web.Response:
        seen.record(request)
        return web.Response(status=status, text="no")

    async with serve(handler) as base:
        url = f"{base}/fw.bin"
        error = await fetch_error(downloader, url, tmp_path / "fw")
    assert seen.count == 1
    assert error.detail == detail
    assert error.reason == f"Download from {url} failed with {detail}"
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("status", [500, 502, 503, 504, 408, 429])
async def test_transient_status_is_retried_until_success(
    downloader: Downloader, tmp_path: Path, status: int
) -> None:
    seen = Seen()
    body = payload(5000)

    async def handler(request: web.Request) -> web.Response:
        seen.record(request)
        if seen.count <= 2:
            return web.Response(status=status)
        return web.Response(body=body)

    async with serve(handler) as base:
        result = await fetch(downloader, f"{base}/fw.bin", tmp_path / "fw")
    assert seen.count == 3
    assert result.sha256 == sha256(body)


async def test_retry_after_seconds_is_honoured(downloader: Downloader, tmp_path: Path) -> None:
    seen = Seen()

    async def handler(request: web.Request) -> web.Response:
        seen.record(request)
        if seen.count == 1:
            return web.Response(status=503, headers={"Retry-After": "1"})
        return web.Response(body=b"ok")

    async with serve(handler) as base:
        await fetch(downloader, f"{base}/fw.bin", tmp_path / "fw")
    assert seen.count == 2
    assert seen.times[1] - seen.times[0] >= 0.9


async def test_retry_after_beyond_the_budget_fails_at_once(
    downloader: Downloader, tmp_path: Path
) -> None:
    seen = Seen()

    async def handler(request: web.Request) -> web.Response:
        seen.record(request)
        return web.Response(status=429, headers={"Retry-After": "3600"})

    async with serve(handler) as base:
        error = await fetch_error(downloader, f"{base}/fw.bin", tmp_path / "fw")
    assert seen.count == 1
    assert error.detail == "HTTP 429 Too Many Requests (server asked to retry after 1h)"


async def test_always_failing_server_gives_up_after_the_budget(tmp_path: Path) -> None:
    seen = Seen()

    async def handler(request: web.Request) -> web.Response:
        seen.record(request)
        return web.Response(status=500)

    downloader = Downloader(retry=SHORT_BUDGET)
    started = time.monotonic()
    try:
        async with serve(handler) as base:
            error = await fetch_error(downloader, f"{base}/fw.bin", tmp_path / "fw")
    finally:
        await downloader.close()
    elapsed = time.monotonic() - started
    match = re.fullmatch(
        r"HTTP 500 Internal Server Error after (\d+) attempts in [0-9.]+s", error.detail
    )
    assert match, error.detail
    assert int(match[1]) == seen.count >= 4
    assert 0.3 <= elapsed < 1.5
    assert leftovers(tmp_path) == []


# network failures ---------------------------------------------------------------------------


async def test_connection_refused_is_retried_then_fails(tmp_path: Path, unused_port: int) -> None:
    port = unused_port  # nothing listens there
    downloader = Downloader(retry=SHORT_BUDGET)
    started = time.monotonic()
    try:
        error = await fetch_error(downloader, f"http://127.0.0.1:{port}/fw", tmp_path / "fw")
    finally:
        await downloader.close()
    match = re.fullmatch(
        rf"connection refused \(127\.0\.0\.1:{port}\) after (\d+) attempts in [0-9.]+s",
        error.detail,
    )
    assert match, error.detail
    assert int(match[1]) >= 3
    assert time.monotonic() - started < 1.5
    assert leftovers(tmp_path) == []


async def test_dns_failure_is_named(tmp_path: Path) -> None:
    downloader = Downloader(retry=RetryPolicy(initial=0.05, max_interval=0.05, max_elapsed=0.1))
    try:
        error = await fetch_error(downloader, "http://firmware.invalid/fw", tmp_path / "fw")
    finally:
        await downloader.close()
    assert error.detail.startswith("DNS lookup failed for firmware.invalid after ")


async def test_incomplete_body_is_retried_then_named(tmp_path: Path) -> None:
    connections = 0

    async def respond(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2048\r\n\r\n" + b"x" * 100)
        await writer.drain()
        # aiohttp drops bytes still buffered when the connection breaks; let them be read first.
        await asyncio.sleep(0.1)
        writer.close()

    downloader = Downloader(retry=SHORT_BUDGET)
    try:
        async with serve_raw(respond) as base:
            error = await fetch_error(downloader, f"{base}/fw", tmp_path / "fw")
    finally:
        await downloader.close()
    assert re.fullmatch(
        r"incomplete body: got 100 of 2048 bytes after (\d+) attempts in [0-9.]+s", error.detail
    ), error.detail
    assert connections >= 3
    assert leftovers(tmp_path) == []


async def test_garbage_instead_of_http_fails_at_once(
    downloader: Downloader, tmp_path: Path
) -> None:
    connections = 0

    async def respond(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await read_request(reader)
        writer.write(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
        await writer.drain()
        writer.close()

    async with serve_raw(respond) as base:
        error = await fetch_error(downloader, f"{base}/fw", tmp_path / "fw")
    assert error.detail.startswith("invalid HTTP response from 127.0.0.1:")
    assert "\n" not in error.detail
    assert connections == 1


async def test_not_enough_disk_space_fails_before_writing(
    downloader: Downloader, tmp_path: Path
) -> None:
    connections = 0

    async def respond(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000000000\r\n\r\nabc")
        await writer.drain()
        writer.close()

    async with serve_raw(respond) as base:
        error = await fetch_error(downloader, f"{base}/fw", tmp_path / "fw")
    assert re.fullmatch(
        rf"not enough disk space in {re.escape(str(tmp_path))}: "
        r"need 1000000000000000 bytes \(\+\d+ reserve\), \d+ available",
        error.detail,
    ), error.detail
    assert connections == 1
    assert leftovers(tmp_path) == []


# fault injection through the proxy: cuts, resets, stalls ------------------------------------


@pytest.fixture
def firmware_file(tmp_path: Path) -> tuple[Path, bytes]:
    served = tmp_path / "served"
    served.mkdir()
    body = payload(2_000_000, seed=7)
    path = served / "fw.bin"
    path.write_bytes(body)
    return path, body


def file_handler(path: Path, seen: Seen) -> Handler:
    async def handler(request: web.Request) -> web.FileResponse:
        seen.record(request)
        return web.FileResponse(path)

    return handler


@pytest.mark.parametrize(
    ("size", "cuts"),
    [(2_000_000, (300_000, 400_000, 500_000)), (20_000_000, (5_000_000, 5_000_000, 5_000_000))],
)
async def test_cut_transfers_resume_and_fetch_little_more_than_the_file(
    downloader: Downloader, tmp_path: Path, size: int, cuts: tuple[int, ...]
) -> None:
    body = os.urandom(size)
    path = tmp_path / "served.bin"
    path.write_bytes(body)
    seen = Seen()
    target = tmp_path / "fw"
    async with (
        serve(file_handler(path, seen)) as base,
        FaultProxy(int(base.rsplit(":", 1)[1])) as proxy,
    ):
        proxy.plan(*(Fault.cut(after) for after in cuts))
        result = await fetch(downloader, proxy.url("/fw.bin"), target)
    assert proxy.faults_applied == 3
    assert result == DownloadResult(target, sha256(body), len(body))
    assert target.read_bytes() == body
    assert [h.get("Range") is not None for h in seen.headers] == [False, True, True, True]
    assert len({h["If-Range"] for h in seen.headers[1:]}) == 1  # the first answer's ETag
    assert proxy.bytes_to_client <= 1.05 * len(body)
    assert leftovers(tmp_path) == ["fw", "served.bin"]


async def test_progress_restarts_the_retry_budget(tmp_path: Path) -> None:
    body = os.urandom(2_000_000)
    path = tmp_path / "served.bin"
    path.write_bytes(body)
    budget = RetryPolicy(initial=0.05, max_interval=0.05, max_elapsed=0.15, jitter=0.0)
    downloader = Downloader(retry=budget, stall_timeout=0.1)
    started = time.monotonic()
    try:
        async with (
            serve(file_handler(path, Seen())) as base,
            FaultProxy(int(base.rsplit(":", 1)[1])) as proxy,
        ):
            # Each stall costs 0.1 s plus a 0.05 s wait: five of them are far past a 0.15 s
            # budget, but every attempt brings new bytes.
            proxy.plan(*(Fault.stall(300_000) for _ in range(5)))
            result = await fetch(downloader, proxy.url("/fw.bin"), tmp_path / "fw")
    finally:
        await downloader.close()
    assert result.sha256 == sha256(body)
    assert proxy.faults_applied == 5
    assert time.monotonic() - started > 0.5


async def test_a_reset_connection_resumes(
    downloader: Downloader, tmp_path: Path, firmware_file: tuple[Path, bytes]
) -> None:
    path, body = firmware_file
    seen = Seen()
    async with (
        serve(file_handler(path, seen)) as base,
        FaultProxy(int(base.rsplit(":", 1)[1])) as proxy,
    ):
        proxy.plan(Fault.reset(700_000), Fault.reset(0))
        result = await fetch(downloader, proxy.url("/fw.bin"), tmp_path / "fw")
    assert proxy.faults_applied == 2
    assert result.sha256 == sha256(body)
    assert seen.count >= 2
    assert seen.headers[-1].get("Range", "").startswith("bytes=")


async def test_without_validators_a_cut_restarts_from_zero(
    downloader: Downloader, tmp_path: Path
) -> None:
    body = payload(1_000_000, seed=3)
    seen = Seen()

    async def handler(request: web.Request) -> web.Response:
        seen.record(request)
        return web.Response(body=body)  # no ETag, no Last-Modified: nothing to resume against

    async with serve(handler) as base, FaultProxy(int(base.rsplit(":", 1)[1])) as proxy:
        proxy.plan(Fault.cut(400_000), Fault.cut(600_000))
        result = await fetch(downloader, proxy.url("/fw.bin"), tmp_path / "fw")
    assert result.sha256 == sha256(body)
    assert all("Range" not in headers for headers in seen.headers)
    assert proxy.bytes_to_client >= len(body) + 1_000_000 - 1000  # both cut parts were lost


async def test_a_server_ignoring_range_restarts_cleanly(
    downloader: Downloader, tmp_path: Path
) -> None:
    body = payload(1_000_000, seed=4)
    seen = Seen()

    async def handler(request: web.Request) -> web.Response:
        seen.record(request)
        return web.Response(body=body, headers={"ETag": '"v1"'})  # 200 even to a Range

    async with serve(handler) as base, FaultProxy(int(base.rsplit(":", 1)[1])) as proxy:
        proxy.plan(Fault.cut(500_000))
        result = await fetch(downloader, proxy.url("/fw.bin"), tmp_path / "fw")
    assert result.sha256 == sha256(body)
    assert (tmp_path / "fw").read_bytes() == body
    assert seen.headers[1]["Range"].startswith("bytes=")
    assert seen.headers[1]["If-Range"] == '"v1"'


async def test_a_file_changed_during_resume_is_fetched_anew(
    downloader: Downloader, tmp_path: Path, firmware_file: tuple[Path, bytes]
) -> None:
    path, _ = firmware_file
    new_body = payload(1_500_000, seed=99)
    seen = Seen()

    async def handler(request: web.Request) -> web.FileResponse:
        seen.record(request)
        if seen.count == 2:  # the file is replaced between the cut and the resume
            path.write_bytes(new_body)
        return web.FileResponse(path)

    async with serve(handler) as base, FaultProxy(int(base.rsplit(":", 1)[1])) as proxy:
        proxy.plan(Fault.cut(300_000))
        result = await fetch(downloader, proxy.url("/fw.bin"), tmp_path / "fw")
    assert result.sha256 == sha256(new_body)
    assert (tmp_path / "fw").read_bytes() == new_body
    assert "Range" in seen.headers[1]
    assert "Range" not in seen.headers[-1]


async def test_a_206_for_the_wrong_offset_is_fetched_anew(
    downloader: Downloader, tmp_path: Path
) -> None:
    body = payload(800_000, seed=5)
    seen = Seen()

    async def handler(request: web.Request) -> web.Response:
        seen.record(request)
        if "Range" in request.headers:  # a broken server: always the start of the file
            headers = {"Content-Range": f"bytes 0-99/{len(body)}", "ETag": '"v"'}
            return web.Response(status=206, body=body[:100], headers=headers)
        return web.Response(body=body, headers={"ETag": '"v"'})

    async with serve(handler) as base, FaultProxy(int(base.rsplit(":", 1)[1])) as proxy:
        proxy.plan(Fault.cut(300_000))
        result = await fetch(downloader, proxy.url("/fw.bin"), tmp_path / "fw")
    assert result.sha256 == sha256(body)
    assert ["Range" in h for h in seen.headers] == [False, True, False]


@pytest.mark.parametrize("after", [0, 200_000])
async def test_a_stall_times_out_and_is_retried(
    tmp_path: Path, firmware_file: tuple[Path, bytes], after: int
) -> None:
    path, body = firmware_file
    downloader = Downloader(retry=FAST, stall_timeout=0.3)
    started = time.monotonic()
    try:
        async with (
            serve(file_handler(path, Seen())) as base,
            FaultProxy(int(base.rsplit(":", 1)[1])) as proxy,
        ):
            proxy.plan(Fault.stall(after))
            result = await fetch(downloader, proxy.url("/fw.bin"), tmp_path / "fw")
    finally:
        await downloader.close()
    assert result.sha256 == sha256(body)
    assert proxy.connections == 2
    assert time.monotonic() - started >= 0.3


async def test_a_server_that_always_stalls_fails_with_the_stall(
    tmp_path: Path, firmware_file: tuple[Path, bytes]
) -> None:
    path, _ = firmware_file
    downloader = Downloader(retry=SHORT_BUDGET, stall_timeout=0.2)
    try:
        async with (
            serve(file_handler(path, Seen())) as base,
            FaultProxy(int(base.rsplit(":", 1)[1])) as proxy,
        ):
            # Stalls before any byte: no progress, so the budget runs out. (A stall after some
            # bytes would be progress, which restarts the budget: the download would succeed.)
            proxy.plan(*[Fault.stall(0)] * 50)
            error = await fetch_error(downloader, proxy.url("/fw.bin"), tmp_path / "fw")
    finally:
        await downloader.close()
    assert re.fullmatch(
        r"stalled: no data for 0\.2s after (\d+) attempts in [0-9.]+s", error.detail
    ), error.detail
    assert leftovers(tmp_path) == ["served"]


# parallelism, big files, the file system ----------------------------------------------------


async def test_parallel_transfers_are_bounded(tmp_path: Path) -> None:
    active = 0
    peak = 0
    body = payload(50_000)

    async def handler(request: web.Request) -> web.StreamResponse:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        try:
            # Hold the transfer open long enough for a third one to show up if the limit failed.
            response = web.StreamResponse()
            response.content_length = len(body)
            await response.prepare(request)
            await asyncio.sleep(0.1)
            await response.write(body)
            return response
        finally:
            active -= 1

    downloader = Downloader(parallel=2, retry=FAST)
    try:
        async with serve(handler) as base:
            results = await asyncio.gather(
                *(fetch(downloader, f"{base}/fw.bin", tmp_path / f"fw{i}") for i in range(5))
            )
    finally:
        await downloader.close()
    assert peak == 2
    assert [r.sha256 for r in results] == [sha256(body)] * 5


async def test_a_large_file_downloads_correctly(tmp_path: Path) -> None:
    served = tmp_path / "big.bin"
    digest = hashlib.sha256()
    with served.open("wb") as out:
        for index in range(50):
            block = payload(1 << 20, seed=index)
            digest.update(block)
            out.write(block)
    downloader = Downloader(retry=FAST)
    try:
        async with serve(file_handler(served, Seen())) as base:
            async with asyncio.timeout(60):
                result = await downloader.download(f"{base}/fw.bin", tmp_path / "copy")
    finally:
        await downloader.close()
    assert result.size == 50 << 20
    assert result.sha256 == digest.hexdigest()
    assert hashlib.sha256((tmp_path / "copy").read_bytes()).hexdigest() == digest.hexdigest()


# early writeback ----------------------------------------------------------------------------


@dataclass
class WritebackCalls:
    """Records the downloader's requests to start writeback; answers with the real call
    (where there is one) or with `answer`."""

    answer: int | None = None
    calls: list[tuple[int, int, int]] = field(default_factory=list)
    threads: set[tuple[int, str]] = field(default_factory=set)  # (ident, name) of callers

    def __call__(self, descriptor: int, offset: int, count: int, flags: int) -> int:
        self.calls.append((offset, count, flags))
        self.threads.add((threading.get_ident(), threading.current_thread().name))
        if self.answer is not None or SYNC_FILE_RANGE is None:
            return self.answer or 0
        return SYNC_FILE_RANGE(descriptor, offset, count, flags)

    def runs(self) -> list[list[tuple[int, int]]]:
        """The calls as runs of adjacent ranges; a new run starts where a range starts at 0."""
        runs: list[list[tuple[int, int]]] = []
        for offset, count, _ in self.calls:
            if offset == 0:
                runs.append([])
            runs[-1].append((offset, offset + count))
        return runs


def assert_adjacent_steps(run: list[tuple[int, int]]) -> None:
    assert run[0][0] == 0
    for (_, end), (begin, _) in itertools.pairwise(run):
        assert begin == end  # no gap, no overlap
    assert all(end - begin >= WRITEBACK_STEP for begin, end in run)


async def test_writeback_starts_every_step_while_the_body_arrives(tmp_path: Path) -> None:
    body = payload(5 * WRITEBACK_STEP + 12_345, seed=11)
    calls = WritebackCalls()
    downloader = Downloader(retry=FAST, start_writeback=calls)

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=body)

    try:
        async with serve(handler) as base:
            result = await fetch(downloader, f"{base}/fw.bin", tmp_path / "fw")
    finally:
        await downloader.close()
    assert result.sha256 == sha256(body)
    assert (tmp_path / "fw").read_bytes() == body
    assert {flags for _, _, flags in calls.calls} == {SYNC_FILE_RANGE_WRITE}
    [run] = calls.runs()
    assert_adjacent_steps(run)
    # Everything but the last, unfinished step was handed over before the final fsync.
    assert run[-1][1] > len(body) - WRITEBACK_STEP - (1 << 20)
    # Every write of the transfer ran in the same thread of its own, never the event loop's.
    [(ident, name)] = calls.threads
    assert name.startswith("download")
    assert ident != threading.get_ident()
    # ... and that thread ends once the transfer is done.
    for writer in [thread for thread in threading.enumerate() if thread.ident == ident]:
        writer.join(WAIT)
        assert not writer.is_alive()


async def test_writeback_counts_from_zero_again_after_a_restart(tmp_path: Path) -> None:
    body = payload(3 * WRITEBACK_STEP, seed=12)
    calls = WritebackCalls()
    downloader = Downloader(retry=FAST, start_writeback=calls)

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=body, headers={"ETag": '"v1"'})  # 200 even to a Range

    try:
        async with serve(handler) as base, FaultProxy(int(base.rsplit(":", 1)[1])) as proxy:
            proxy.plan(Fault.cut(2 * WRITEBACK_STEP + 500_000))
            result = await fetch(downloader, proxy.url("/fw.bin"), tmp_path / "fw")
    finally:
        await downloader.close()
    assert result.sha256 == sha256(body)
    assert (tmp_path / "fw").read_bytes() == body
    first, second = calls.runs()  # the partial file was emptied: ranges start at 0 again
    assert_adjacent_steps(first)
    assert_adjacent_steps(second)
    assert first[-1][1] >= WRITEBACK_STEP
    assert second[-1][1] > len(body) - WRITEBACK_STEP - (1 << 20)


async def test_a_refused_writeback_is_not_asked_again_and_the_download_completes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    body = payload(3 * WRITEBACK_STEP, seed=13)
    calls = WritebackCalls(answer=-1)  # a filesystem that refuses sync_file_range
    downloader = Downloader(retry=FAST, start_writeback=calls)

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=body)

    caplog.set_level(logging.DEBUG, logger="tedge_firmware.shell.downloader")
    try:
        async with serve(handler) as base:
            result = await fetch(downloader, f"{base}/fw.bin", tmp_path / "fw")
    finally:
        await downloader.close()
    assert result == DownloadResult(tmp_path / "fw", sha256(body), len(body))
    assert (tmp_path / "fw").read_bytes() == body
    assert len(calls.calls) == 1
    assert "No early writeback" in caplog.text


async def test_without_writeback_the_download_is_the_same(tmp_path: Path) -> None:
    body = payload(2 * WRITEBACK_STEP + 1, seed=14)
    downloader = Downloader(retry=FAST, start_writeback=None)

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=body)

    try:
        async with serve(handler) as base:
            result = await fetch(downloader, f"{base}/fw.bin", tmp_path / "fw")
    finally:
        await downloader.close()
    assert result == DownloadResult(tmp_path / "fw", sha256(body), len(body))
    assert (tmp_path / "fw").read_bytes() == body
    assert leftovers(tmp_path) == ["fw"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range is Linux's")
def test_the_c_library_sync_file_range_is_found_and_works(tmp_path: Path) -> None:
    assert SYNC_FILE_RANGE is not None
    path = tmp_path / "data"
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.write(descriptor, b"x" * 100_000)
        assert SYNC_FILE_RANGE(descriptor, 0, 100_000, SYNC_FILE_RANGE_WRITE) == 0
        # 64-bit offsets pass through intact: a range far beyond 4 GiB is accepted.
        assert SYNC_FILE_RANGE(descriptor, 5 << 32, 1 << 20, SYNC_FILE_RANGE_WRITE) == 0
    finally:
        os.close(descriptor)
    assert SYNC_FILE_RANGE(descriptor, 0, 1, SYNC_FILE_RANGE_WRITE) == -1  # closed now
    assert ctypes.get_errno() == errno.EBADF
    descriptor = os.open(path, os.O_RDONLY)
    try:  # a negative offset stays negative (no truncation to 32 bits): refused
        assert SYNC_FILE_RANGE(descriptor, -1, 1, SYNC_FILE_RANGE_WRITE) == -1
        assert ctypes.get_errno() == errno.EINVAL
    finally:
        os.close(descriptor)


async def test_a_missing_target_directory_fails_without_a_request(
    downloader: Downloader, tmp_path: Path
) -> None:
    seen = Seen()

    async def handler(request: web.Request) -> web.Response:
        seen.record(request)
        return web.Response(body=b"x")

    missing = tmp_path / "gone"
    async with serve(handler) as base:
        error = await fetch_error(downloader, f"{base}/fw.bin", missing / "fw")
    assert error.detail == f"target directory {missing} does not exist"
    assert seen.count == 0


async def test_the_target_directory_vanishing_mid_way_is_a_clear_error(
    downloader: Downloader, tmp_path: Path
) -> None:
    directory = tmp_path / "cache"
    directory.mkdir()
    first_half_sent = asyncio.Event()
    go_on = asyncio.Event()
    seen = Seen()

    async def handler(request: web.Request) -> web.StreamResponse:
        seen.record(request)
        response = web.StreamResponse()
        response.content_length = 200_000
        await response.prepare(request)
        await response.write(b"a" * 100_000)
        first_half_sent.set()
        await go_on.wait()
        await response.write(b"b" * 100_000)
        return response

    async with serve(handler) as base:
        task = asyncio.create_task(fetch(downloader, f"{base}/fw.bin", directory / "fw"))
        async with asyncio.timeout(WAIT):
            await first_half_sent.wait()
        assert (directory / "fw.part").exists()  # created before the request was sent
        shutil.rmtree(directory)
        go_on.set()
        with pytest.raises(DownloadError) as caught:
            await task
    assert caught.value.detail == f"target directory {directory} does not exist"
    assert seen.count == 1
    assert not directory.exists()


async def test_cancelling_a_download_that_cannot_be_resumed_removes_the_part_file(
    downloader: Downloader, tmp_path: Path
) -> None:
    # No ETag, no Last-Modified: nothing to resume with, so nothing is kept. (A resumable
    # download is kept: see test_downloader_restart.py.)
    started = asyncio.Event()
    release = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_length = 1_000_000
        await response.prepare(request)
        await response.write(b"a" * 300_000)
        started.set()
        await release.wait()  # holds the transfer open until the test is done with it
        return response

    async with serve(handler) as base:
        task = asyncio.create_task(fetch(downloader, f"{base}/fw.bin", tmp_path / "fw"))
        async with asyncio.timeout(WAIT):
            await started.wait()
        assert (tmp_path / "fw.part").exists()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        release.set()
    assert leftovers(tmp_path) == []


# hostile input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    ["ftp://example.com/fw", "not a url", "http://", "/relative/path", "file:///etc/passwd", ""],
)
async def test_an_unusable_url_fails_at_once(
    downloader: Downloader, tmp_path: Path, url: str
) -> None:
    error = await fetch_error(downloader, url, tmp_path / "fw")
    assert error.detail.startswith("invalid url")
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("token", ["abc\r\nX-Injected: 1", "with space", "", "caf\u00e9"])
async def test_an_unusable_token_is_refused_and_not_echoed(
    downloader: Downloader, tmp_path: Path, token: str
) -> None:
    seen = Seen()

    async def handler(request: web.Request) -> web.Response:
        seen.record(request)
        return web.Response(body=b"x")

    async with serve(handler) as base:
        error = await fetch_error(downloader, f"{base}/fw.bin", tmp_path / "fw", token=token)
    assert error.detail.startswith("unusable bearer token")
    assert token not in error.reason or token == ""
    assert seen.count == 0


async def test_the_session_is_reopened_after_close(tmp_path: Path) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=b"x")

    downloader = Downloader(retry=FAST)
    async with serve(handler) as base:
        await fetch(downloader, f"{base}/fw.bin", tmp_path / "a")
        await downloader.close()
        await fetch(downloader, f"{base}/fw.bin", tmp_path / "b")
        await downloader.close()
    assert (tmp_path / "b").read_bytes() == b"x"


# the exception mapping ----------------------------------------------------------------------


def _all_subclasses(cls: type[BaseException]) -> set[type[BaseException]]:
    found: set[type[BaseException]] = set()
    for sub in cls.__subclasses__():
        found |= {sub} | _all_subclasses(sub)
    return found


def test_every_aiohttp_client_error_has_a_specific_mapping() -> None:
    fallback_index = [kind for kind, _ in EXCEPTION_MAP].index(aiohttp.ClientError)
    checked = 0
    for error_class in _all_subclasses(aiohttp.ClientError):
        if not error_class.__module__.startswith("aiohttp"):
            continue
        index = next(
            i for i, (kind, _) in enumerate(EXCEPTION_MAP) if issubclass(error_class, kind)
        )
        assert index < fallback_index, f"{error_class.__name__} falls through to ClientError"
        checked += 1
    assert checked >= 25  # the walk did find aiohttp's exception tree


KEY = ConnectionKey("example.com", 8443, False, True, None, None, None)
REQUEST_INFO = aiohttp.RequestInfo(
    URL("https://example.com:8443/fw"),
    "GET",
    CIMultiDictProxy(CIMultiDict()),
    URL("https://example.com:8443/fw"),
)
CONTEXT = FailureContext(
    host="example.com", port=8443, stall_timeout=30.0, received=100, expected=2048
)


@pytest.mark.parametrize(
    ("exc", "detail", "transient"),
    [
        (
            aiohttp.ClientConnectorError(
                KEY,
                ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"),
            ),
            "connection refused (example.com:8443)",
            True,
        ),
        (
            aiohttp.SocketTimeoutError("Timeout on reading data from socket"),
            "stalled: no data for 30s",
            True,
        ),
        (
            aiohttp.ConnectionTimeoutError("x"),
            "connect timeout: no connection within 30s (example.com:8443)",
            True,
        ),
        (
            aiohttp.ClientPayloadError("Response payload is not completed"),
            "incomplete body: got 100 of 2048 bytes",
            True,
        ),
        (
            aiohttp.ClientOSError(errno.ECONNRESET, "Connection reset by peer"),
            "connection reset (example.com:8443)",
            True,
        ),
        (
            ConnectionResetError(errno.ECONNRESET, "reset"),
            "connection reset (example.com:8443)",
            True,
        ),
        (
            aiohttp.ServerDisconnectedError(),
            "server disconnected before answering (example.com:8443)",
            True,
        ),
        (
            aiohttp.ClientOSError(errno.EHOSTUNREACH, "No route to host"),
            "network error with example.com:8443: No route to host",
            True,
        ),
        (TimeoutError(), "timed out (example.com:8443)", True),
        (
            aiohttp.ClientConnectorDNSError(KEY, OSError(-2, "Name or service not known")),
            "DNS lookup failed for example.com",
            True,
        ),
        (
            aiohttp.ClientConnectorCertificateError(KEY, ValueError("self-signed certificate")),
            "TLS error with example.com:8443: self-signed certificate",
            False,
        ),
        (
            aiohttp.ClientConnectorError(KEY, OSError(None, "Multiple exceptions: a\nb")),
            "cannot connect to example.com:8443: Multiple exceptions: a b",
            True,
        ),
        (aiohttp.InvalidURL("http://[::1"), "invalid url", False),
        (
            aiohttp.ClientResponseError(REQUEST_INFO, (), status=400, message="Bad status line"),
            "invalid HTTP response from example.com:8443: Bad status line",
            False,
        ),
        (
            aiohttp.TooManyRedirects(REQUEST_INFO, ()),
            "too many redirects",
            False,
        ),
        (
            aiohttp.ClientHttpProxyError(REQUEST_INFO, (), status=503),
            "proxy answered HTTP 503 Service Unavailable",
            True,
        ),
        (
            aiohttp.ServerFingerprintMismatch(b"a", b"b", "example.com", 8443),
            "TLS certificate fingerprint mismatch (example.com:8443)",
            False,
        ),
    ],
)
def test_exception_details(exc: BaseException, detail: str, transient: bool) -> None:
    failure = describe_exception(exc, CONTEXT)
    assert (failure.detail, failure.transient) == (detail, transient)


def test_payload_error_without_a_known_size() -> None:
    context = FailureContext(host="h", port=None, stall_timeout=1.0, received=7)
    failure = describe_exception(aiohttp.ClientPayloadError("x"), context)
    assert failure.detail == "incomplete body: broken after 7 bytes"


# hostile URLs and silent peers (issue 12) ----------------------------------------------------


@pytest.mark.parametrize(
    "url",
    ["http://a..b/fw", "http://.a/fw", f"http://{'a' * 64}.com/fw", "http://\u0085x/fw", "http://[::1/fw", "http://h:99999/fw"],
)
async def test_a_url_the_resolver_cannot_take_fails_with_its_reason(
    downloader: Downloader, tmp_path: Path, url: str
) -> None:
    error = await fetch_error(downloader, url, tmp_path / "fw")
    assert error.detail.startswith("invalid url"), error.detail
    assert leftovers(tmp_path) == []


async def test_a_redirect_to_an_unusable_host_fails_with_a_reason(tmp_path: Path) -> None:
    # the redirect target only shows up inside aiohttp, where the resolver raises UnicodeError
    async def handler(request: web.Request) -> web.Response:
        raise web.HTTPFound("http://a..b/fw.bin")

    downloader = Downloader(retry=SHORT_BUDGET)
    try:
        async with serve(handler) as base:
            error = await fetch_error(downloader, f"{base}/fw.bin", tmp_path / "fw")
    finally:
        await downloader.close()
    assert error.detail.startswith("invalid url: a host name the resolver refuses"), error.detail


async def test_a_silent_host_holds_a_download_slot_no_longer_than_the_connect_timeout(
    tmp_path: Path, firmware_file: tuple[Path, bytes]
) -> None:
    # A listening socket whose backlog is full: the kernel drops further SYNs, so a connect
    # neither succeeds nor fails, like a host behind a firewall that drops packets.
    import socket

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(0)
    fillers = []
    for _ in range(4):  # fill the accept queue (Linux takes backlog + 1)
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(silent.getsockname())
        fillers.append(filler)
    path, body = firmware_file
    downloader = Downloader(parallel=1, retry=RetryPolicy(max_elapsed=0.1), stall_timeout=0.5)
    loop = asyncio.get_running_loop()
    try:
        async with serve(file_handler(path, Seen())) as base:
            started = loop.time()
            stuck = asyncio.create_task(fetch_error(downloader, f"http://127.0.0.1:{silent.getsockname()[1]}/fw", tmp_path / "a"))
            good = asyncio.create_task(fetch(downloader, f"{base}/fw.bin", tmp_path / "b"))
            error = await stuck
            assert error.detail.startswith("connect timeout"), error.detail
            result = await good  # it waited for the only slot, then got it
            assert result.sha256 == sha256(body)
            assert loop.time() - started < 5
    finally:
        await downloader.close()
        for sock in (*fillers, silent):
            sock.close()


async def test_a_silent_dns_server_holds_a_download_slot_no_longer_than_the_connect_timeout(
    tmp_path: Path,
) -> None:
    # A resolver that never answers, as a DNS server that drops queries: the connect timeout
    # covers the lookup too.
    class SilentResolver(aiohttp.abc.AbstractResolver):
        async def resolve(self, host: str, port: int = 0, family: int = 0) -> list:  # type: ignore[override]
            await asyncio.Event().wait()
            return []

        async def close(self) -> None:
            pass

    downloader = Downloader(
        parallel=1, retry=RetryPolicy(max_elapsed=0.1), stall_timeout=0.5, resolver=SilentResolver()
    )
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        error = await fetch_error(downloader, "http://firmware.example/fw", tmp_path / "fw")
    finally:
        await downloader.close()
    assert error.detail.startswith("connect timeout"), error.detail
    assert loop.time() - started < 3
