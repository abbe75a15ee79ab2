"""The simulator's HTTP side on loopback: validators, ranges, the token check and every fault."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tedge_firmware.sim import FileFaults
from tedge_firmware.sim._files import BinaryServer

DATA = bytes(range(256)) * 40  # 10 240 bytes


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[BinaryServer]:
    files = tmp_path / "files"
    files.mkdir()
    instance = BinaryServer(files_dir=files)
    await instance.start()
    try:
        yield instance
    finally:
        await instance.stop()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


async def fetch(client: aiohttp.ClientSession, url: str, **kwargs: object) -> tuple[int, bytes, str | None]:
    """Status, the bytes that arrived, and what ended the body early ("cut", "timeout")."""
    received = bytearray()
    async with asyncio.timeout(10):
        async with client.get(url, **kwargs) as response:  # type: ignore[arg-type]
            try:
                async for chunk in response.content.iter_any():
                    received += chunk
            except aiohttp.ClientPayloadError:  # the connection closed before Content-Length
                return response.status, bytes(received), "cut"
            except aiohttp.ServerTimeoutError:  # no byte within the client's read timeout
                return response.status, bytes(received), "timeout"
            return response.status, bytes(received), None


# --- plain serving ------------------------------------------------------------------------------


async def test_get_and_head_serve_the_bytes_with_validators(server: BinaryServer, client: aiohttp.ClientSession) -> None:
    url = server.add("image.bin", DATA)
    assert url == f"http://127.0.0.1:{server.port}/inventory/binaries/image.bin"
    async with client.get(url) as response:
        assert response.status == 200
        assert await response.read() == DATA
        headers = response.headers
    assert headers["Accept-Ranges"] == "bytes"
    assert headers["Content-Length"] == str(len(DATA))
    assert headers["ETag"].startswith('"') and headers["Last-Modified"]
    async with client.head(url) as response:
        assert response.status == 200
        assert response.headers["ETag"] == headers["ETag"]
        assert response.headers["Content-Length"] == str(len(DATA))
    stats = server.stats()["image.bin"]
    assert (stats.requests, stats.statuses, stats.bytes_served, stats.complete) == (2, (200, 200), len(DATA), 1)


async def test_ranges_and_if_range(server: BinaryServer, client: aiohttp.ClientSession) -> None:
    url = server.add("image.bin", DATA)
    async with client.head(url) as response:
        etag = response.headers["ETag"]
    status, body, _ = await fetch(client, url, headers={"Range": "bytes=1000-"})
    assert (status, body) == (206, DATA[1000:])
    status, body, _ = await fetch(client, url, headers={"Range": "bytes=-10"})
    assert (status, body) == (206, DATA[-10:])
    status, body, _ = await fetch(client, url, headers={"Range": "bytes=1000-", "If-Range": etag})
    assert (status, body) == (206, DATA[1000:])
    status, body, _ = await fetch(client, url, headers={"Range": "bytes=1000-", "If-Range": '"stale"'})
    assert (status, body) == (200, DATA)
    async with client.get(url, headers={"Range": f"bytes={len(DATA)}-"}) as response:
        assert response.status == 416
        assert response.headers["Content-Range"] == f"bytes */{len(DATA)}"
    assert server.stats()["image.bin"].range_starts == (1000, len(DATA) - 10, 1000)


async def test_a_path_is_served_and_a_changed_file_gets_a_new_etag(server: BinaryServer, client: aiohttp.ClientSession, tmp_path: Path) -> None:
    path = tmp_path / "fw.bin"
    path.write_bytes(DATA)
    url = server.add("fw.bin", path)
    async with client.get(url) as response:
        etag = response.headers["ETag"]
        assert await response.read() == DATA
    path.write_bytes(b"new firmware")
    status, body, _ = await fetch(client, url, headers={"Range": "bytes=3-", "If-Range": etag})
    assert (status, body) == (200, b"new firmware")
    path.unlink()
    async with client.get(url) as response:
        assert response.status == 404


async def test_files_dir_serves_its_regular_files_and_nothing_else(server: BinaryServer, client: aiohttp.ClientSession, tmp_path: Path) -> None:
    files = tmp_path / "files"
    (files / "image.bin").write_bytes(DATA)
    (files / ".hidden").write_bytes(b"x")
    (files / "sub").mkdir()
    (tmp_path / "secret").write_bytes(b"secret")
    os.symlink(tmp_path / "secret", files / "link")
    base = f"{server.base_url}/inventory/binaries/"
    status, body, _ = await fetch(client, base + "image.bin")
    assert (status, body) == (200, DATA)
    for name in ("..%2Fsecret", "%2E%2E%2Fsecret", "link", ".hidden", "sub", "missing", "%00"):
        async with client.get(base + name) as response:
            assert response.status == 404, name
            assert b"secret" not in await response.read()


@pytest.mark.parametrize("name", ["", ".hidden", "../x", "a/b", "a\\b", "x" * 201, "-x", "ä"])
async def test_unsafe_names_are_refused(server: BinaryServer, name: str) -> None:
    with pytest.raises(ValueError, match="file name"):
        server.add(name, DATA)


async def test_content_must_be_bytes_or_a_path(server: BinaryServer) -> None:
    with pytest.raises(TypeError):
        server.add("x", "not bytes")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "faults",
    [
        {"error_status": 200},
        {"error_status": 302},
        {"error_times": -1},
        {"cut_after": -1},
        {"stall_seconds": -1.0},
        {"rate": 0},
    ],
)
def test_impossible_faults_are_refused(faults: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        FileFaults(**faults)  # type: ignore[arg-type]


# --- faults -------------------------------------------------------------------------------------


async def test_cut_after_n_bytes_for_the_first_k_requests(server: BinaryServer, client: aiohttp.ClientSession) -> None:
    url = server.add("image.bin", DATA, FileFaults(cut_after=1000, cut_times=2))
    for _ in range(2):
        status, body, error = await fetch(client, url)
        assert (status, body, error) == (200, DATA[:1000], "cut")
    status, body, error = await fetch(client, url, headers={"Range": "bytes=1000-"})
    assert (status, body, error) == (206, DATA[1000:], None)
    stats = server.stats()["image.bin"]
    assert stats.bytes_served == 2000 + len(DATA) - 1000
    assert stats.complete == 1


async def test_a_cut_applies_to_a_range_answer_too(server: BinaryServer, client: aiohttp.ClientSession) -> None:
    url = server.add("image.bin", DATA, FileFaults(cut_after=100))
    status, body, error = await fetch(client, url, headers={"Range": "bytes=5000-"})
    assert (status, body, error) == (206, DATA[5000:5100], "cut")


async def test_error_status_for_the_first_k_gets_head_is_spared(server: BinaryServer, client: aiohttp.ClientSession) -> None:
    url = server.add("image.bin", DATA, FileFaults(error_status=503, error_times=2))
    async with client.head(url) as response:
        assert response.status == 200
    statuses = []
    for _ in range(3):
        async with client.get(url) as response:
            statuses.append(response.status)
            body = await response.read()
    assert statuses == [503, 503, 200]
    assert body == DATA
    assert server.stats()["image.bin"].statuses == (200, 503, 503, 200)


async def test_a_stall_until_the_client_gives_up(server: BinaryServer, client: aiohttp.ClientSession) -> None:
    url = server.add("image.bin", DATA, FileFaults(stall_after=500))
    timeout = aiohttp.ClientTimeout(sock_read=0.3)
    status, body, error = await fetch(client, url, timeout=timeout)
    assert (status, body, error) == (200, DATA[:500], "timeout")
    status, body, error = await fetch(client, url, timeout=timeout)  # stall_times=1: the next is fine
    assert (status, body, error) == (200, DATA, None)


async def test_a_stall_for_a_while_then_the_rest(server: BinaryServer, client: aiohttp.ClientSession) -> None:
    url = server.add("image.bin", DATA, FileFaults(stall_after=500, stall_seconds=0.4))
    started = time.monotonic()
    status, body, error = await fetch(client, url)
    assert (status, body, error) == (200, DATA, None)
    assert time.monotonic() - started >= 0.35


async def test_rate_limit(server: BinaryServer, client: aiohttp.ClientSession) -> None:
    data = DATA * 4  # 40 960 bytes at 100 000 B/s: about 0.41 s
    fast = server.add("fast.bin", data)
    slow = server.add("slow.bin", data, FileFaults(rate=100_000))
    started = time.monotonic()
    assert (await fetch(client, fast))[1] == data
    unlimited = time.monotonic() - started
    started = time.monotonic()
    assert (await fetch(client, slow))[1] == data
    limited = time.monotonic() - started
    assert limited >= 0.35
    assert unlimited < limited / 2


async def test_set_faults_starts_the_counts_again(server: BinaryServer, client: aiohttp.ClientSession) -> None:
    url = server.add("image.bin", DATA, FileFaults(error_status=500))
    async with client.get(url) as response:
        assert response.status == 500
    async with client.get(url) as response:
        assert response.status == 200
    server.set_faults("image.bin", FileFaults(error_status=502, error_times=1))
    async with client.get(url) as response:
        assert response.status == 502
    with pytest.raises(KeyError):
        server.set_faults("missing", FileFaults())


async def test_stop_ends_a_stall_that_waits_for_nobody() -> None:
    server = BinaryServer()
    await server.start()
    url = server.add("image.bin", DATA, FileFaults(stall_after=10))
    async with aiohttp.ClientSession() as client, client.get(url) as response:
        async with asyncio.timeout(5):
            assert await response.content.readexactly(10) == DATA[:10]  # the stall has begun
        started = time.monotonic()
        await server.stop()
        assert time.monotonic() - started < 2.5
        with pytest.raises(aiohttp.ClientPayloadError):
            async with asyncio.timeout(5):
                await response.read()


# --- the token check ----------------------------------------------------------------------------


async def test_a_bearer_token_is_required_when_configured(client: aiohttp.ClientSession) -> None:
    server = BinaryServer(token=lambda: "the-token")
    await server.start()
    try:
        url = server.add("image.bin", DATA)
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic the-token"}, {"Authorization": "Bearer"}):
            async with client.get(url, headers=headers) as response:
                assert response.status == 401, headers
                assert response.headers["WWW-Authenticate"].startswith("Bearer")
        status, body, _ = await fetch(client, url, headers={"Authorization": "Bearer the-token"})
        assert (status, body) == (200, DATA)
        assert server.stats()["image.bin"].statuses == (401, 401, 401, 401, 200)
    finally:
        await server.stop()


async def test_binding_a_taken_port_is_a_config_error(server: BinaryServer) -> None:
    from tedge_firmware.errors import ConfigError

    other = BinaryServer(port=server.port)
    with pytest.raises(ConfigError, match="cannot bind"):
        await other.start()


async def test_urls_need_a_running_server() -> None:
    server = BinaryServer(public_host="fw.example")
    with pytest.raises(RuntimeError):
        server.add("image.bin", DATA)
    await server.start()
    try:
        assert server.url("image.bin").startswith("http://fw.example:")
    finally:
        await server.stop()
