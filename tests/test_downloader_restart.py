"""The downloader across restarts: resume records, kill -9, digests, full disks, the hard cap.

Real aiohttp servers on loopback, the fault-injecting proxy, real files, a real subprocess.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import re
import shutil
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web
from multidict import CIMultiDictProxy

from faultproxy import Fault, FaultProxy
from tedge_firmware.core.retry import RetryPolicy
from tedge_firmware.errors import DownloadError
from tedge_firmware.shell.downloader import Downloader, DownloadResult, is_working_file

FAST = RetryPolicy(initial=0.05, multiplier=2.0, max_interval=0.2, max_elapsed=2.0, jitter=0.1)
CHUNK = 64 * 1024
SIZE = 4_000_000
WAIT = 15.0  # bound for any single test step; tests finish far below it
LOGGER = "tedge_firmware.shell.downloader"


# helpers ------------------------------------------------------------------------------------


def payload(size: int, seed: int = 1) -> bytes:
    """Deterministic bytes that do not repeat."""
    out = bytearray()
    block = hashlib.sha256(str(seed).encode()).digest()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(block + counter.to_bytes(8, "big")).digest()
        counter += 1
    return bytes(out[:size])


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def b64_sha256(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def part_of(target: Path) -> Path:
    return target.with_name(target.name + ".part")


def record_of(target: Path) -> Path:
    return target.with_name(target.name + ".part.json")


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def make_record(
    url: str, validator: str | None, total: int | None, digest: str | None = None
) -> bytes:
    kind = None if validator is None else ("etag" if validator.startswith('"') else "last-modified")
    record = {
        "version": 1,
        "url": url,
        "validator": validator,
        "validator_kind": kind,
        "total": total,
        "sha256": digest,
    }
    return json.dumps(record).encode()


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@asynccontextmanager
async def serve(handler: Handler, path: str = "/fw.bin") -> AsyncIterator[str]:
    """Serve one route on 127.0.0.1 (free port); yields the url of that route."""
    app = web.Application()
    app.router.add_get(path, handler)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}{path}"
    finally:
        await runner.cleanup()


@asynccontextmanager
async def proxied(handler: Handler) -> AsyncIterator[tuple[FaultProxy, str]]:
    """The server behind a fault proxy; yields the proxy and the url through it."""
    async with serve(handler) as direct:
        port = int(direct.split(":")[2].split("/")[0])
        async with FaultProxy(port) as proxy:
            yield proxy, proxy.url("/fw.bin")


@dataclass
class Origin:
    """An origin server for one file that changes version when a test says so.

    It answers `Range: bytes=N-` with a 206 when If-Range matches the current ETag (or is
    absent), else with a 200 of the whole file, as RFC 9110 requires. `honour_if_range=False`
    behaves like aiohttp <= 3.14.5's FileResponse, which serves the range of a changed file.
    """

    body: bytes
    etag: str = '"v1"'
    headers: dict[str, str] = field(default_factory=dict)  # extra headers of a 200
    partial_headers: dict[str, str] = field(default_factory=dict)  # extra headers of a 206
    honour_if_range: bool = True
    status: int | None = None  # when set, every answer is an error with this status
    seen: list[CIMultiDictProxy[str]] = field(default_factory=list)

    def change(self, body: bytes, etag: str) -> None:
        self.body, self.etag = body, etag

    async def handler(self, request: web.Request) -> web.Response:
        self.seen.append(request.headers)
        if self.status is not None:
            return web.Response(status=self.status)
        wanted = re.fullmatch(r"bytes=([0-9]+)-", request.headers.get("Range", ""))
        if_range = request.headers.get("If-Range")
        if wanted and (if_range in (None, self.etag) or not self.honour_if_range):
            return self._partial(int(wanted[1]))
        return web.Response(body=self.body, headers={"ETag": self.etag, **self.headers})

    def _partial(self, start: int) -> web.Response:
        size = len(self.body)
        if start >= size:
            return web.Response(status=416, headers={"Content-Range": f"bytes */{size}"})
        headers = {
            "ETag": self.etag,
            "Content-Range": f"bytes {start}-{size - 1}/{size}",
            **self.partial_headers,
        }
        return web.Response(status=206, body=self.body[start:], headers=headers)


def file_handler(path: Path, seen: list[CIMultiDictProxy[str]]) -> Handler:
    async def handler(request: web.Request) -> web.FileResponse:
        seen.append(request.headers)
        return web.FileResponse(path)

    return handler


@asynccontextmanager
async def downloader_of(**options: object) -> AsyncIterator[Downloader]:
    """A Downloader (a new one per "run" of the service), closed afterwards."""
    settings: dict[str, object] = {"retry": FAST, "stall_timeout": 10.0, "chunk_size": CHUNK}
    settings.update(options)
    instance = Downloader(**settings)  # type: ignore[arg-type]
    try:
        yield instance
    finally:
        await instance.close()


async def fetch(downloader: Downloader, url: str, target: Path) -> DownloadResult:
    async with asyncio.timeout(WAIT):
        return await downloader.download(url, target)


async def fetch_error(downloader: Downloader, url: str, target: Path) -> DownloadError:
    with pytest.raises(DownloadError) as caught:
        await fetch(downloader, url, target)
    return caught.value


def size_of(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


async def wait_for_size(path: Path, size: int, still_running: Callable[[], bool]) -> int:
    """Poll a file's size until it reaches `size` (callers bound this with a timeout).

    Polling, because what grows is a file written by another thread or process: there is no
    event to await.
    """
    while True:
        current = size_of(path)
        if current >= size:
            return current
        assert still_running(), f"the download ended with {path} at {current} bytes"
        await asyncio.sleep(0.01)


async def run_until_cancelled(
    downloader: Downloader, url: str, target: Path, proxy: FaultProxy, at_least: int
) -> int:
    """Start a download, let `at_least` bytes reach the disk, cancel it (a graceful stop).

    Returns the size of the partial file it leaves.
    """
    task = asyncio.create_task(downloader.download(url, target))
    async with asyncio.timeout(WAIT):
        await proxy.wait_faults(1)
        await wait_for_size(part_of(target), at_least, lambda: not task.done())
    task.cancel()
    async with asyncio.timeout(WAIT):
        with pytest.raises(asyncio.CancelledError):
            await task
    return part_of(target).stat().st_size


# restart after a graceful stop --------------------------------------------------------------


async def test_a_cancelled_download_resumes_in_a_new_downloader(tmp_path: Path) -> None:
    body = payload(SIZE, seed=11)
    served = tmp_path / "served.bin"
    served.write_bytes(body)
    cache = tmp_path / "cache"
    cache.mkdir()
    target = cache / "0123abcd"
    seen: list[CIMultiDictProxy[str]] = []
    stall_at = 1_500_000  # bytes through the proxy, headers included

    async with proxied(file_handler(served, seen)) as (proxy, url):
        proxy.plan(Fault.stall(stall_at))
        async with downloader_of() as first_run:
            kept = await run_until_cancelled(first_run, url, target, proxy, stall_at - 2 * CHUNK)
        # The graceful stop kept every received byte, and the record to resume them.
        assert stall_at - 2 * CHUNK <= kept < stall_at
        assert leftovers(cache) == ["0123abcd.part", "0123abcd.part.json"]
        assert part_of(target).read_bytes() == body[:kept]
        record = json.loads(record_of(target).read_text())
        assert record["url"] == url
        assert record["validator_kind"] == "etag"
        assert record["total"] == SIZE
        assert set(record) == {"version", "url", "validator", "validator_kind", "total", "sha256"}

        async with downloader_of() as second_run:
            result = await fetch(second_run, url, target)

    assert result == DownloadResult(target, sha256(body), SIZE)
    assert target.read_bytes() == body
    assert [h.get("Range") for h in seen] == [None, f"bytes={kept}-"]
    assert seen[1]["If-Range"] == record["validator"]
    assert proxy.bytes_to_client <= 1.05 * SIZE
    assert leftovers(cache) == ["0123abcd"]


async def test_a_graceful_stop_keeps_every_received_byte(tmp_path: Path) -> None:
    body = payload(1_000_000, seed=19)
    origin = Origin(body)
    received = 300_000
    chunk = 200_000  # after the first write (>= 200 000 bytes) the rest stays in memory
    target = tmp_path / "fw"
    async with proxied(origin.handler) as (proxy, url):
        async with downloader_of() as probe:  # how many bytes the 200's head takes
            await fetch(probe, url, tmp_path / "probe")
        head = proxy.bytes_to_client - len(body)
        (tmp_path / "probe").unlink()
        proxy.plan(Fault.stall(head + received))
        async with downloader_of(chunk_size=chunk) as first_run:
            kept = await run_until_cancelled(first_run, url, target, proxy, chunk)
        # Not only the written chunk: the bytes in memory were written on the way out too.
        assert kept == received
        before = proxy.bytes_to_client
        async with downloader_of() as second_run:
            result = await fetch(second_run, url, target)
    assert result.sha256 == sha256(body)
    assert origin.seen[-1]["Range"] == f"bytes={received}-"
    head_of_206 = proxy.bytes_to_client - before - (len(body) - received)
    assert 0 < head_of_206 < 1000  # no body byte was fetched twice


async def test_the_token_is_not_written_to_the_resume_record(tmp_path: Path) -> None:
    origin = Origin(payload(1_000_000))
    target = tmp_path / "fw"
    async with proxied(origin.handler) as (proxy, url):
        proxy.plan(Fault.stall(300_000))
        async with downloader_of() as run:
            task = asyncio.create_task(run.download(url, target, token="secret-jwt-token"))
            async with asyncio.timeout(WAIT):
                await proxy.wait_faults(1)
                await wait_for_size(part_of(target), CHUNK, lambda: not task.done())
            task.cancel()
            async with asyncio.timeout(WAIT):
                with pytest.raises(asyncio.CancelledError):
                    await task
    assert origin.seen[0]["Authorization"] == "Bearer secret-jwt-token"
    assert b"secret-jwt-token" not in record_of(target).read_bytes()


# restart after kill -9 ----------------------------------------------------------------------

CHILD = """
import asyncio, sys
from pathlib import Path
from tedge_firmware.shell.downloader import Downloader

async def main() -> None:
    downloader = Downloader(chunk_size=int(sys.argv[3]), stall_timeout=60.0)
    await downloader.download(sys.argv[1], Path(sys.argv[2]))

asyncio.run(main())
"""


async def test_a_download_killed_with_sigkill_resumes_where_it_stopped(tmp_path: Path) -> None:
    body = payload(SIZE, seed=12)
    served = tmp_path / "served.bin"
    served.write_bytes(body)
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    target = tmp_path / "fw"
    on_disk = 1 << 20
    seen: list[CIMultiDictProxy[str]] = []

    async with proxied(file_handler(served, seen)) as (proxy, url):
        # Enough bytes for `on_disk` to be written whatever the chunking, then nothing more.
        proxy.plan(Fault.stall(on_disk + 2 * CHUNK + 1000))
        with (tmp_path / "child.err").open("wb") as errors:
            child = await asyncio.create_subprocess_exec(
                sys.executable, str(script), url, str(target), str(CHUNK),
                stdout=errors, stderr=errors, cwd=tmp_path,
            )  # fmt: skip
            try:
                async with asyncio.timeout(WAIT):
                    await wait_for_size(part_of(target), on_disk, lambda: child.returncode is None)
            finally:
                child.send_signal(signal.SIGKILL)
                async with asyncio.timeout(WAIT):
                    await child.wait()
        assert child.returncode == -signal.SIGKILL, (tmp_path / "child.err").read_text()
        kept = part_of(target).stat().st_size
        assert kept >= on_disk
        assert record_of(target).exists()

        async with downloader_of() as after_restart:
            result = await fetch(after_restart, url, target)

    assert result.sha256 == sha256(body)
    assert target.read_bytes() == body
    assert [h.get("Range") for h in seen] == [None, f"bytes={kept}-"]
    assert seen[1]["If-Range"].startswith('"')
    assert proxy.bytes_to_client <= 1.05 * SIZE + CHUNK
    assert leftovers(tmp_path) == ["child.err", "child.py", "fw", "served.bin"]


# what a new run does not trust --------------------------------------------------------------


@pytest.mark.parametrize("honour_if_range", [True, False], ids=["200", "206-of-new-file"])
async def test_a_file_changed_between_runs_is_fetched_from_zero(
    tmp_path: Path, honour_if_range: bool
) -> None:
    old, new = payload(2_000_000, seed=1), payload(1_500_000, seed=2)
    origin = Origin(old, honour_if_range=honour_if_range)
    target = tmp_path / "fw"
    async with proxied(origin.handler) as (proxy, url):
        proxy.plan(Fault.stall(600_000))
        async with downloader_of() as first_run:
            kept = await run_until_cancelled(first_run, url, target, proxy, 300_000)
        origin.change(new, '"v2"')
        async with downloader_of() as second_run:
            result = await fetch(second_run, url, target)
    assert result == DownloadResult(target, sha256(new), len(new))
    assert target.read_bytes() == new
    ranges = [h.get("Range") for h in origin.seen]
    if honour_if_range:  # the server itself answers 200 with the new file
        assert ranges == [None, f"bytes={kept}-"]
    else:  # the 206 names another ETag: dropped, fetched anew
        assert ranges == [None, f"bytes={kept}-", None]
    assert origin.seen[1]["If-Range"] == '"v1"'
    assert leftovers(tmp_path) == ["fw"]


LEFTOVER = 500_000


@pytest.mark.parametrize(
    ("case", "note"),
    [
        ("another url", "a partial file of another url"),
        ("corrupt record", "an unreadable resume record"),
        ("no record", "a partial file without its resume record"),
        ("injecting validator", "an unreadable resume record"),
        ("weak etag", "an unreadable resume record"),
        ("longer than the file", "a partial file longer than the file"),
        ("record is a directory", "an unreadable resume record"),
    ],
)
async def test_leftovers_that_cannot_be_trusted_start_from_zero(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, case: str, note: str
) -> None:
    body = payload(1_000_000, seed=3)
    origin = Origin(body)
    target = tmp_path / "fw"
    caplog.set_level(logging.INFO, logger=LOGGER)
    async with serve(origin.handler) as url:
        # Bytes that are not the file's: resuming after them would give a wrong file.
        part_of(target).write_bytes(b"\0" * LEFTOVER)
        records = {
            "another url": make_record(url + "?v=2", '"v1"', len(body)),
            "corrupt record": b'{"version": 1, "url": ',
            "injecting validator": make_record(url, '"v1"\r\nX-Evil: 1', len(body)),
            "weak etag": make_record(url, 'W/"v1"', len(body)),
            "longer than the file": make_record(url, '"v1"', LEFTOVER - 1),
        }
        if case in records:
            record_of(target).write_bytes(records[case])
        if case == "record is a directory":
            record_of(target).mkdir()
            with pytest.raises(DownloadError):  # cannot be cleaned up: a clear failure
                await fetch(Downloader(), url, target)
            assert origin.seen == []
            return
        async with downloader_of() as run:
            result = await fetch(run, url, target)
    assert result.sha256 == sha256(body)
    assert target.read_bytes() == body
    assert "Range" not in origin.seen[0]
    assert "X-Evil" not in origin.seen[0]
    assert f"starts from zero: {note}" in caplog.text
    assert leftovers(tmp_path) == ["fw"]


@pytest.mark.parametrize(
    ("kept", "expected_range"),
    [(1, "bytes=1-"), (600_000, "bytes=600000-"), (1_000_000, "bytes=999999-")],
    ids=["one byte", "part", "complete: the last byte is fetched again to check the ETag"],
)
async def test_a_matching_leftover_is_resumed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, kept: int, expected_range: str
) -> None:
    body = payload(1_000_000, seed=4)
    origin = Origin(body)
    target = tmp_path / "fw"
    caplog.set_level(logging.INFO, logger=LOGGER)
    async with serve(origin.handler) as url:
        part_of(target).write_bytes(body[:kept])
        record_of(target).write_bytes(make_record(url, '"v1"', len(body)))
        async with downloader_of() as run:
            result = await fetch(run, url, target)
    assert result == DownloadResult(target, sha256(body), len(body))
    assert [h.get("Range") for h in origin.seen] == [expected_range]
    assert origin.seen[0]["If-Range"] == '"v1"'
    assert "left by an earlier run" in caplog.text
    assert leftovers(tmp_path) == ["fw"]


async def test_a_symlink_in_place_of_the_part_file_is_never_followed(tmp_path: Path) -> None:
    body = payload(100_000, seed=5)
    origin = Origin(body)
    precious = tmp_path / "precious"
    precious.write_bytes(b"not to be overwritten")
    cache = tmp_path / "cache"
    cache.mkdir()
    target = cache / "fw"
    part_of(target).symlink_to(precious)
    async with serve(origin.handler) as url:
        record_of(target).write_bytes(make_record(url, '"v1"', len(body)))
        async with downloader_of() as run:
            result = await fetch(run, url, target)
    assert result.sha256 == sha256(body)
    assert precious.read_bytes() == b"not to be overwritten"
    assert "Range" not in origin.seen[0]
    assert leftovers(cache) == ["fw"]


@pytest.mark.parametrize(
    ("name", "working"),
    [
        ("0123abcd.part", True),
        ("0123abcd.part.json", True),
        ("0123abcd.part.json.tmp", True),
        ("0123abcd", False),
        ("firmware.bin", False),
        ("partition", False),
    ],
)
def test_working_files_are_told_apart_from_cache_entries(name: str, working: bool) -> None:
    assert is_working_file(name) is working


# what is kept and what is removed -----------------------------------------------------------


async def test_a_permanent_failure_removes_what_an_earlier_run_kept(tmp_path: Path) -> None:
    origin = Origin(payload(1_000_000, seed=6))
    target = tmp_path / "fw"
    async with proxied(origin.handler) as (proxy, url):
        proxy.plan(Fault.stall(400_000))
        async with downloader_of() as first_run:
            await run_until_cancelled(first_run, url, target, proxy, 200_000)
        assert leftovers(tmp_path) == ["fw.part", "fw.part.json"]
        origin.status = 404  # the binary was deleted in the cloud meanwhile
        async with downloader_of() as second_run:
            error = await fetch_error(second_run, url, target)
    assert error.detail == "HTTP 404 Not Found"
    assert leftovers(tmp_path) == []


async def test_cancelling_while_waiting_to_retry_keeps_the_files(tmp_path: Path) -> None:
    body = payload(1_000_000, seed=7)
    origin = Origin(body)
    target = tmp_path / "fw"
    slow_retry = RetryPolicy(initial=30.0, max_interval=30.0, max_elapsed=600.0, jitter=0.0)
    async with proxied(origin.handler) as (proxy, url):
        proxy.plan(Fault.cut(300_000))
        async with downloader_of(retry=slow_retry) as first_run:
            task = asyncio.create_task(first_run.download(url, target))
            async with asyncio.timeout(WAIT):
                await proxy.wait_faults(1)
                # The cut transfer is written out before the 30 s backoff starts.
                kept = await wait_for_size(part_of(target), 200_000, lambda: not task.done())
            task.cancel()
            async with asyncio.timeout(WAIT):
                with pytest.raises(asyncio.CancelledError):
                    await task
        kept = part_of(target).stat().st_size
        assert leftovers(tmp_path) == ["fw.part", "fw.part.json"]
        async with downloader_of() as second_run:
            result = await fetch(second_run, url, target)
    assert result.sha256 == sha256(body)
    assert [h.get("Range") for h in origin.seen] == [None, f"bytes={kept}-"]


# digests the server declares ----------------------------------------------------------------


def digest_headers(kind: str, data: bytes) -> dict[str, str]:
    value = b64_sha256(data)
    return {
        "Repr-Digest": {"Repr-Digest": f"sha-256=:{value}:"},
        "Digest": {"Digest": f"SHA-256={value}"},
        "x-amz-checksum-sha256": {"x-amz-checksum-sha256": value},
    }[kind]


@pytest.mark.parametrize("kind", ["Repr-Digest", "Digest", "x-amz-checksum-sha256"])
async def test_a_matching_digest_passes(tmp_path: Path, kind: str) -> None:
    body = payload(300_000, seed=8)
    origin = Origin(body, headers=digest_headers(kind, body))
    async with serve(origin.handler) as url, downloader_of() as run:
        result = await fetch(run, url, tmp_path / "fw")
    assert result.sha256 == sha256(body)
    assert leftovers(tmp_path) == ["fw"]


@pytest.mark.parametrize("kind", ["Repr-Digest", "Digest", "x-amz-checksum-sha256"])
async def test_a_wrong_digest_fails_and_leaves_nothing(tmp_path: Path, kind: str) -> None:
    body = payload(300_000, seed=9)
    origin = Origin(body, headers=digest_headers(kind, b"another file"))
    async with serve(origin.handler) as url, downloader_of() as run:
        error = await fetch_error(run, url, tmp_path / "fw")
    assert error.detail == (
        f"digest mismatch: server says {sha256(b'another file')}, got {sha256(body)}"
    )
    assert len(origin.seen) == 1  # permanent: not retried
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("right", [True, False], ids=["right", "wrong"])
async def test_the_digest_of_the_first_run_is_checked_after_a_restart(
    tmp_path: Path, right: bool
) -> None:
    body = payload(1_000_000, seed=10)
    declared = body if right else b"something else"
    # Only the first (200) answer declares the digest; the 206 after the restart does not.
    origin = Origin(body, headers=digest_headers("Repr-Digest", declared))
    target = tmp_path / "fw"
    async with proxied(origin.handler) as (proxy, url):
        proxy.plan(Fault.stall(400_000))
        async with downloader_of() as first_run:
            await run_until_cancelled(first_run, url, target, proxy, 200_000)
        assert json.loads(record_of(target).read_text())["sha256"] == sha256(declared)
        async with downloader_of() as second_run:
            if right:
                result = await fetch(second_run, url, target)
                assert result.sha256 == sha256(body)
            else:
                error = await fetch_error(second_run, url, target)
                assert error.detail.startswith(f"digest mismatch: server says {sha256(declared)}")
    assert "Range" in origin.seen[-1]
    assert leftovers(tmp_path) == (["fw"] if right else [])


# free space ---------------------------------------------------------------------------------


@dataclass
class FakeDisk:
    """An injected free_space: reports `free` bytes and records where it was asked."""

    free: int
    asked: list[Path] = field(default_factory=list)

    def __call__(self, directory: Path) -> int:
        self.asked.append(directory)
        return self.free


async def test_a_full_disk_fails_with_the_sizes_and_leaves_nothing(tmp_path: Path) -> None:
    body = payload(200_000, seed=13)
    origin = Origin(body)
    disk = FakeDisk(free=150_000)
    async with (
        serve(origin.handler) as url,
        downloader_of(free_space=disk, reserve_bytes=4096) as run,
    ):
        error = await fetch_error(run, url, tmp_path / "fw")
    assert error.detail == (
        f"not enough disk space in {tmp_path}: need 200000 bytes (+4096 reserve), 150000 available"
    )
    assert disk.asked == [tmp_path]
    assert len(origin.seen) == 1
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(("free", "fits"), [(204_096, True), (204_095, False)])
async def test_the_reserve_is_kept_free(tmp_path: Path, free: int, fits: bool) -> None:
    body = payload(200_000, seed=14)
    origin = Origin(body)
    async with (
        serve(origin.handler) as url,
        downloader_of(free_space=FakeDisk(free), reserve_bytes=4096) as run,
    ):
        if fits:
            assert (await fetch(run, url, tmp_path / "fw")).sha256 == sha256(body)
        else:
            error = await fetch_error(run, url, tmp_path / "fw")
            assert error.detail.startswith("not enough disk space")
    assert leftovers(tmp_path) == (["fw"] if fits else [])


async def test_a_resume_needs_room_only_for_what_is_missing(tmp_path: Path) -> None:
    body = payload(1_000_000, seed=15)
    origin = Origin(body)
    target = tmp_path / "fw"
    async with serve(origin.handler) as url:
        part_of(target).write_bytes(body[:800_000])
        record_of(target).write_bytes(make_record(url, '"v1"', len(body)))
        disk = FakeDisk(free=200_000)  # not room for the file, but for its missing part
        async with downloader_of(free_space=disk, reserve_bytes=0) as run:
            result = await fetch(run, url, target)
    assert result.sha256 == sha256(body)
    assert origin.seen[0]["Range"] == "bytes=800000-"


async def test_the_default_reserve_is_5_percent_of_the_filesystem_at_most_64_mib(
    tmp_path: Path,
) -> None:
    origin = Origin(payload(1000, seed=18))
    expected = min(64 << 20, int(shutil.disk_usage(tmp_path).total * 0.05))
    async with serve(origin.handler) as url, downloader_of(free_space=FakeDisk(free=1000)) as run:
        error = await fetch_error(run, url, tmp_path / "fw")
    assert error.detail.endswith(f"need 1000 bytes (+{expected} reserve), 1000 available")


def test_a_negative_reserve_is_refused() -> None:
    with pytest.raises(ValueError, match="reserve_bytes"):
        Downloader(reserve_bytes=-1)


# the hard cap -------------------------------------------------------------------------------


async def test_max_total_cuts_a_transfer_that_never_ends(tmp_path: Path) -> None:
    size = 10_000_000

    async def trickle(request: web.Request) -> web.StreamResponse:
        # Always a little progress, never a stall: only the hard cap can end this.
        response = web.StreamResponse(headers={"ETag": '"t"'})
        response.content_length = size
        await response.prepare(request)
        while True:
            await response.write(b"x" * 1000)
            await asyncio.sleep(0.01)

    policy = RetryPolicy(initial=0.05, max_interval=0.1, max_elapsed=60.0, max_total=0.5)
    started = time.monotonic()
    async with serve(trickle) as url, downloader_of(retry=policy, stall_timeout=5.0) as run:
        error = await fetch_error(run, url, tmp_path / "fw")
    elapsed = time.monotonic() - started
    assert re.fullmatch(rf"time limit of 0\.5s reached with \d+ of {size} bytes", error.detail)
    assert 0.5 <= elapsed < 3.0
    assert leftovers(tmp_path) == []


async def test_max_total_ends_retrying_even_with_progress(tmp_path: Path) -> None:
    body = payload(2_000_000, seed=16)
    origin = Origin(body)
    # Every attempt brings bytes, so max_elapsed alone would go on for all 50 stalls.
    policy = RetryPolicy(
        initial=0.05, max_interval=0.05, max_elapsed=60.0, jitter=0.0, max_total=0.8
    )
    started = time.monotonic()
    async with proxied(origin.handler) as (proxy, url):
        proxy.plan(*[Fault.stall(30_000)] * 50)
        async with downloader_of(retry=policy, stall_timeout=0.2) as run:
            error = await fetch_error(run, url, tmp_path / "fw")
    elapsed = time.monotonic() - started
    assert re.fullmatch(
        r"(stalled: no data for 0\.2s|time limit of 0\.8s reached with \d+ of 2000000 bytes)"
        r" after \d+ attempts in [0-9.]+s",
        error.detail,
    ), error.detail
    assert elapsed < 0.8 + 0.5
    assert 2 <= proxy.connections < 50
    assert leftovers(tmp_path) == []


async def test_max_total_gives_up_before_a_wait_it_would_not_survive(tmp_path: Path) -> None:
    origin = Origin(b"x", status=503)
    policy = RetryPolicy(
        initial=0.1, max_interval=0.1, max_elapsed=60.0, jitter=0.0, max_total=0.45
    )
    started = time.monotonic()
    async with serve(origin.handler) as url, downloader_of(retry=policy) as run:
        error = await fetch_error(run, url, tmp_path / "fw")
    elapsed = time.monotonic() - started
    # The last error is named, not the cap: no wait was begun that would end past it.
    match = re.fullmatch(
        r"HTTP 503 Service Unavailable after (\d+) attempts in ([0-9.]+)s", error.detail
    )
    assert match, error.detail
    assert int(match[1]) == len(origin.seen) in (4, 5)
    assert float(match[2]) <= 0.45
    assert elapsed < 1.0


async def test_without_a_cap_progress_keeps_the_download_going(tmp_path: Path) -> None:
    body = payload(600_000, seed=17)
    origin = Origin(body)
    policy = RetryPolicy(initial=0.01, max_interval=0.01, max_elapsed=0.1, jitter=0.0)
    async with proxied(origin.handler) as (proxy, url):
        proxy.plan(*[Fault.stall(100_000)] * 6)
        async with downloader_of(retry=policy, stall_timeout=0.1) as run:
            result = await fetch(run, url, tmp_path / "fw")
    assert result.sha256 == sha256(body)
    assert proxy.faults_applied == 6
