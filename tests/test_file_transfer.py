"""The file-transfer HTTP service: GET/HEAD with ranges, PUT, DELETE, server lifecycle.

A real server on loopback (port 0) and aiohttp's client. Hostile paths and broken uploads
are in test_file_transfer_hostile.py.
"""

from __future__ import annotations

import asyncio
import errno
import io
import os
import shutil
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator
from email.utils import formatdate
from pathlib import Path

import aiohttp
import pytest
from multidict import CIMultiDictProxy

from tedge_firmware.core.http import (
    ByteRange,
    RangeVerdict,
    entity_tag,
    if_range_allows,
    is_not_modified,
    parse_byte_range,
)
from tedge_firmware.errors import ConfigError
from tedge_firmware.shell.file_transfer import FileTransferServer, url_segments

PREFIXES = ["/tedge/file-transfer/", "/te/v1/files/"]
BIG_SIZE = 5 * 1024 * 1024 + 17  # several MB, not a multiple of any buffer size


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    (data / "file-transfer").mkdir(parents=True)
    (data / "cache").mkdir()
    return data


@pytest.fixture
def root(data_dir: Path) -> Path:
    return data_dir / "file-transfer"


@pytest.fixture
async def server(data_dir: Path) -> AsyncIterator[FileTransferServer]:
    srv = FileTransferServer(
        root=data_dir / "file-transfer", cache_dir=data_dir / "cache", host="127.0.0.1", port=0
    )
    await srv.start()
    yield srv
    await srv.stop()


@pytest.fixture
async def client(server: FileTransferServer) -> AsyncIterator[aiohttp.ClientSession]:
    timeout = aiohttp.ClientTimeout(total=20)
    async with aiohttp.ClientSession(
        base_url=f"http://127.0.0.1:{server.port}", timeout=timeout
    ) as session:
        yield session


@pytest.fixture(scope="module")
def big_bytes() -> bytes:
    data = os.urandom(BIG_SIZE)
    with pytest.raises(UnicodeDecodeError):
        data.decode("utf-8")  # the 0.10-0.12 bug: such a file gave a 500
    return data


@pytest.fixture
def big_file(root: Path, big_bytes: bytes) -> Path:
    path = root / "child1" / "firmware_update" / "image.bin"
    path.parent.mkdir(parents=True)
    path.write_bytes(big_bytes)
    return path


async def fetch(
    client: aiohttp.ClientSession, method: str, url: str, **kwargs: object
) -> tuple[int, CIMultiDictProxy[str], bytes]:
    async with asyncio.timeout(20), client.request(method, url, **kwargs) as resp:  # type: ignore[arg-type]
        return resp.status, resp.headers, await resp.read()


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith(".ft-upload-")]


# --- pure helpers -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        (None, 100, RangeVerdict.WHOLE),
        ("bytes=0-9", 100, ByteRange(0, 10)),
        ("bytes=10-10", 100, ByteRange(10, 11)),
        ("BYTES = 5 - 7", 100, ByteRange(5, 8)),
        ("bytes=90-", 100, ByteRange(90, 100)),
        ("bytes=0-", 100, ByteRange(0, 100)),
        ("bytes=0-999", 100, ByteRange(0, 100)),
        ("bytes=-10", 100, ByteRange(90, 100)),
        ("bytes=-1000", 100, ByteRange(0, 100)),
        ("bytes=100-", 100, RangeVerdict.UNSATISFIABLE),
        ("bytes=100-200", 100, RangeVerdict.UNSATISFIABLE),
        ("bytes=-0", 100, RangeVerdict.UNSATISFIABLE),
        ("bytes=0-", 0, RangeVerdict.UNSATISFIABLE),
        ("bytes=-5", 0, RangeVerdict.UNSATISFIABLE),
        ("bytes=9-5", 100, RangeVerdict.WHOLE),
        ("bytes=-", 100, RangeVerdict.WHOLE),
        ("bytes=", 100, RangeVerdict.WHOLE),
        ("bytes=0-1,5-6", 100, RangeVerdict.WHOLE),
        ("items=0-5", 100, RangeVerdict.WHOLE),
        ("bytes=a-b", 100, RangeVerdict.WHOLE),
        ("bytes=" + "9" * 5000 + "-", 100, RangeVerdict.WHOLE),
        ("bytes=99999999999999999999-", 100, RangeVerdict.UNSATISFIABLE),
    ],
)
def test_parse_byte_range(header, size, expected):
    assert parse_byte_range(header, size) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/tedge/file-transfer/a", ["a"]),
        ("/te/v1/files/a/b/c", ["a", "b", "c"]),
        ("/tedge/file-transfer/", []),
        ("/tedge/file-transfer/a%2fb", ["a", "b"]),
        ("/tedge/file-transfer/%252e%252e", ["%2e%2e"]),
        ("/tedge/file-transfer/sp%20ace+plus", ["sp ace+plus"]),
        ("/tedge/file-transfer/%ff", [os.fsdecode(b"\xff")]),
        ("/tedge/file-transfer", None),
        ("/tedge/firmware/x", None),
        ("/tedge/%66ile-transfer/x", None),
        ("/TEDGE/file-transfer/x", None),
        ("//tedge/file-transfer/x", None),
    ],
)
def test_url_segments(raw, expected):
    assert url_segments(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "/tedge/file-transfer/..",
        "/tedge/file-transfer/a/../b",
        "/tedge/file-transfer/%2e%2e/x",
        "/tedge/file-transfer/%2E%2E%2Fx",
        "/tedge/file-transfer/..%2fx",
        "/tedge/file-transfer/./x",
        "/tedge/file-transfer//etc/passwd",
        "/tedge/file-transfer/%2fetc%2fpasswd",
        "/tedge/file-transfer/a//b",
        "/tedge/file-transfer/dir/",
        "/tedge/file-transfer/a%00b",
        "/tedge/file-transfer/..\\x",
        "/tedge/file-transfer/a%5cb",
        "/tedge/file-transfer/\udcff",
    ],
)
def test_url_segments_refuses(raw):
    from aiohttp import web

    with pytest.raises(web.HTTPBadRequest):
        url_segments(raw)


def test_entity_tag_changes_with_inode_size_and_mtime(tmp_path: Path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"x")
    b.write_bytes(b"x")
    tag = entity_tag(a.stat())
    assert tag.startswith('"') and tag.endswith('"') and not tag.startswith("W/")
    assert tag == entity_tag(a.stat())
    assert tag != entity_tag(b.stat())  # same size, other inode
    os.utime(a, ns=(1, 1))
    assert tag != entity_tag(a.stat())


@pytest.mark.parametrize(
    ("if_range", "allowed"),
    [
        (None, True),
        ('"tag"', True),
        ('"other"', False),
        ('W/"tag"', False),  # If-Range needs a strong match
        ("Sat, 01 Jan 2022 00:00:00 GMT", True),
        ("Sat, 01 Jan 2022 00:00:01 GMT", False),
        ("Fri, 31 Dec 2021 23:59:59 GMT", False),
        ("yesterday", False),
        ("", False),
    ],
)
def test_if_range_allows(if_range, allowed):
    assert if_range_allows(if_range, '"tag"', 1640995200.5) is allowed


@pytest.mark.parametrize(
    ("inm", "ims", "expected"),
    [
        (None, None, False),
        ('"tag"', None, True),
        ('W/"tag"', None, True),
        ('"a", "tag"', None, True),
        ("*", None, True),
        ('"other"', "Sat, 01 Jan 2030 00:00:00 GMT", False),  # If-None-Match wins
        (None, "Sat, 01 Jan 2030 00:00:00 GMT", True),
        (None, "Sat, 01 Jan 2000 00:00:00 GMT", False),
        (None, "garbage", False),
    ],
)
def test_is_not_modified(inm, ims, expected):
    assert is_not_modified(inm, ims, '"tag"', 1640995200.5) is expected


# --- the reference Robot test and basic methods -------------------------------------------


@pytest.mark.parametrize("prefix", PREFIXES)
async def test_put_get_delete_round_trip(client, root: Path, prefix: str):
    url = prefix + "file_a"
    assert (await fetch(client, "PUT", url, data=b"test of put"))[0] == 201
    assert (root / "file_a").read_bytes() == b"test of put"
    status, _, body = await fetch(client, "GET", url)
    assert (status, body) == (200, b"test of put")
    assert (await fetch(client, "DELETE", url))[0] == 202
    assert not (root / "file_a").exists()
    assert (await fetch(client, "GET", url))[0] == 404
    assert temp_files(root) == []


async def test_put_creates_parents_and_replaces(client, root: Path):
    url = "/tedge/file-transfer/child/config/new.toml"
    assert (await fetch(client, "PUT", url, data=b"first"))[0] == 201
    assert (await fetch(client, "PUT", url, data=b"second, longer"))[0] == 201
    assert (root / "child" / "config" / "new.toml").read_bytes() == b"second, longer"
    assert (await fetch(client, "PUT", url, data=b""))[0] == 201
    assert (root / "child" / "config" / "new.toml").read_bytes() == b""
    assert temp_files(root) == []


async def test_put_streams_a_chunked_body(client, root: Path, big_bytes: bytes):
    async def body() -> AsyncIterator[bytes]:
        for start in range(0, len(big_bytes), 700_001):
            yield big_bytes[start : start + 700_001]

    assert (await fetch(client, "PUT", "/te/v1/files/up.bin", data=body()))[0] == 201
    assert (root / "up.bin").read_bytes() == big_bytes


async def test_query_string_is_ignored(client, root: Path):
    assert (await fetch(client, "PUT", "/tedge/file-transfer/file_a?x=1", data=b"A"))[0] == 201
    assert listing(root) == ["file_a"]
    status, _, body = await fetch(client, "GET", "/tedge/file-transfer/file_a?x=1&y=%2e%2e")
    assert (status, body) == (200, b"A")


async def test_directories_and_missing_files(client, root: Path):
    (root / "dir" / "sub").mkdir(parents=True)
    (root / "plain").write_bytes(b"p")
    assert (await fetch(client, "GET", "/tedge/file-transfer/dir"))[0] == 404
    assert (await fetch(client, "HEAD", "/tedge/file-transfer/dir"))[0] == 404
    assert (await fetch(client, "GET", "/tedge/file-transfer/missing"))[0] == 404
    assert (await fetch(client, "GET", "/tedge/file-transfer/"))[0] == 404
    assert (await fetch(client, "PUT", "/tedge/file-transfer/dir", data=b"x"))[0] == 409
    assert (root / "dir" / "sub").is_dir()
    assert (await fetch(client, "DELETE", "/tedge/file-transfer/dir"))[0] == 409
    assert (root / "dir").is_dir()
    assert (await fetch(client, "DELETE", "/tedge/file-transfer/missing"))[0] == 202
    assert (await fetch(client, "DELETE", "/tedge/file-transfer/no/such/dir/x"))[0] == 202
    assert not (root / "no").exists()  # DELETE creates nothing
    assert (await fetch(client, "PUT", "/tedge/file-transfer/plain/child", data=b"x"))[0] == 409
    assert (await fetch(client, "GET", "/tedge/file-transfer/plain/child"))[0] == 404
    assert (root / "plain").read_bytes() == b"p"
    assert temp_files(root) == []


@pytest.mark.parametrize("method", ["POST", "PATCH", "OPTIONS", "PROPFIND"])
async def test_other_methods_are_not_allowed(client, root: Path, method: str):
    (root / "f").write_bytes(b"f")
    status, headers, _ = await fetch(client, method, "/tedge/file-transfer/f", data=b"zz")
    assert status == 405
    assert set(headers["Allow"].replace(" ", "").split(",")) == {"GET", "HEAD", "PUT", "DELETE"}
    assert (root / "f").read_bytes() == b"f"


@pytest.mark.parametrize(
    "path", ["/", "/tedge/file-transfer", "/tedge/other/f", "/te/v1/file/f", "/f", "/tedge/f"]
)
async def test_other_paths_are_404(client, root: Path, path: str):
    (root / "f").write_bytes(b"f")
    for method in ("GET", "PUT", "DELETE"):
        assert (await fetch(client, method, path, data=b"x"))[0] == 404
    assert (root / "f").read_bytes() == b"f"


async def test_name_too_long(client, root: Path):
    name = "n" * 300
    assert (await fetch(client, "PUT", f"/tedge/file-transfer/{name}", data=b"x"))[0] == 400
    assert (await fetch(client, "GET", f"/tedge/file-transfer/{name}"))[0] == 400
    assert temp_files(root) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
async def test_unwritable_directory_is_403(client, root: Path):
    (root / "ro").mkdir()
    (root / "ro" / "f").write_bytes(b"old")
    (root / "ro").chmod(0o555)
    try:
        assert (await fetch(client, "PUT", "/tedge/file-transfer/ro/f", data=b"new"))[0] == 403
        assert (await fetch(client, "DELETE", "/tedge/file-transfer/ro/f"))[0] == 403
    finally:
        (root / "ro").chmod(0o755)
    assert (root / "ro" / "f").read_bytes() == b"old"


# --- binary GET, HEAD and ranges ---------------------------------------------------------


@pytest.mark.parametrize("prefix", PREFIXES)
async def test_binary_file_is_served_byte_exact(client, big_file: Path, big_bytes, prefix):
    status, headers, body = await fetch(client, "GET", prefix + "child1/firmware_update/image.bin")
    assert status == 200
    assert body == big_bytes
    st = os.stat(big_file)
    assert headers["Content-Length"] == str(BIG_SIZE)
    assert headers["Accept-Ranges"] == "bytes"
    assert headers["ETag"] == entity_tag(st)
    assert headers["Last-Modified"] == formatdate(st.st_mtime, usegmt=True)
    assert headers["Content-Type"] == "application/octet-stream"
    assert "Content-Encoding" not in headers


async def test_head_gives_headers_and_no_body(client, big_file: Path):
    status, headers, body = await fetch(
        client, "HEAD", "/te/v1/files/child1/firmware_update/image.bin"
    )
    assert status == 200
    assert body == b""
    assert headers["Content-Length"] == str(BIG_SIZE)
    assert headers["ETag"] == entity_tag(os.stat(big_file))
    status, headers, body = await fetch(
        client,
        "HEAD",
        "/te/v1/files/child1/firmware_update/image.bin",
        headers={"Range": "bytes=-5"},
    )
    assert (status, body, headers["Content-Length"]) == (206, b"", "5")


async def test_gzip_sibling_is_not_served_instead(client, root: Path):
    # web.FileResponse would answer with f.gz to a client accepting gzip.
    (root / "f").write_bytes(b"plain")
    (root / "f.gz").write_bytes(b"\x1f\x8bnot this")
    status, headers, body = await fetch(
        client, "GET", "/tedge/file-transfer/f", headers={"Accept-Encoding": "gzip"}
    )
    assert (status, body) == (200, b"plain")
    assert "Content-Encoding" not in headers


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize(
    ("range_header", "start", "stop"),
    [
        ("bytes=0-99", 0, 100),
        ("bytes=1000-1000", 1000, 1001),
        ("bytes=4000000-", 4000000, BIG_SIZE),
        ("bytes=0-", 0, BIG_SIZE),
        ("bytes=-500", BIG_SIZE - 500, BIG_SIZE),
        ("bytes=-99999999", 0, BIG_SIZE),
        (f"bytes=100-{BIG_SIZE * 2}", 100, BIG_SIZE),
    ],
)
async def test_range(client, big_file, big_bytes, prefix, range_header, start, stop):
    status, headers, body = await fetch(
        client, "GET", prefix + "child1/firmware_update/image.bin", headers={"Range": range_header}
    )
    assert status == 206
    assert headers["Content-Range"] == f"bytes {start}-{stop - 1}/{BIG_SIZE}"
    assert headers["Content-Length"] == str(stop - start)
    assert body == big_bytes[start:stop]


@pytest.mark.parametrize(
    "range_header", [f"bytes={BIG_SIZE}-", f"bytes={BIG_SIZE + 5}-", "bytes=-0"]
)
async def test_unsatisfiable_range_is_416(client, big_file, range_header):
    status, headers, body = await fetch(
        client,
        "GET",
        "/tedge/file-transfer/child1/firmware_update/image.bin",
        headers={"Range": range_header},
    )
    assert status == 416
    assert headers["Content-Range"] == f"bytes */{BIG_SIZE}"
    assert body == b""


async def test_range_on_empty_file_is_416(client, root: Path):
    (root / "empty").write_bytes(b"")
    status, headers, body = await fetch(client, "GET", "/tedge/file-transfer/empty")
    assert (status, headers["Content-Length"], body) == (200, "0", b"")
    status, headers, _ = await fetch(
        client, "GET", "/tedge/file-transfer/empty", headers={"Range": "bytes=0-"}
    )
    assert (status, headers["Content-Range"]) == (416, "bytes */0")


@pytest.mark.parametrize("range_header", ["bytes=5-2", "bytes=0-1,5-2", "items=0-5", "bytes=x-"])
async def test_ignored_range_gives_the_whole_file(client, big_file, big_bytes, range_header):
    status, headers, body = await fetch(
        client,
        "GET",
        "/tedge/file-transfer/child1/firmware_update/image.bin",
        headers={"Range": range_header},
    )
    assert status == 200
    assert "Content-Range" not in headers
    assert body == big_bytes


async def test_if_range_with_entity_tag(client, root: Path, big_file, big_bytes):
    # an upload (firmware_update/ is the gateway's, not written over HTTP)
    url = "/tedge/file-transfer/child1/uploads/image.bin"
    assert (await fetch(client, "PUT", url, data=io.BytesIO(big_bytes)))[0] == 201
    _, headers, _ = await fetch(client, "HEAD", url)
    old_etag = headers["ETag"]
    status, _, body = await fetch(
        client, "GET", url, headers={"Range": "bytes=100-199", "If-Range": old_etag}
    )
    assert (status, body) == (206, big_bytes[100:200])

    new_bytes = os.urandom(300_000)
    assert (await fetch(client, "PUT", url, data=new_bytes))[0] == 201
    status, headers, body = await fetch(
        client, "GET", url, headers={"Range": "bytes=100-199", "If-Range": old_etag}
    )
    assert status == 200  # the file changed: resuming would splice two files together
    assert body == new_bytes
    assert headers["ETag"] != old_etag

    weak = "W/" + headers["ETag"]
    status, _, body = await fetch(
        client, "GET", url, headers={"Range": "bytes=0-9", "If-Range": weak}
    )
    assert (status, body) == (200, new_bytes)


async def test_if_range_with_date(client, big_file, big_bytes):
    url = "/tedge/file-transfer/child1/firmware_update/image.bin"
    os.utime(big_file, (1_600_000_000, 1_600_000_000))
    last_modified = formatdate(1_600_000_000, usegmt=True)
    status, headers, body = await fetch(
        client, "GET", url, headers={"Range": "bytes=-10", "If-Range": last_modified}
    )
    assert headers["Last-Modified"] == last_modified
    assert (status, body) == (206, big_bytes[-10:])
    older = formatdate(1_500_000_000, usegmt=True)
    status, _, body = await fetch(
        client, "GET", url, headers={"Range": "bytes=-10", "If-Range": older}
    )
    assert (status, body) == (200, big_bytes)
    status, _, body = await fetch(
        client, "GET", url, headers={"Range": "bytes=-10", "If-Range": "not a date"}
    )
    assert (status, body) == (200, big_bytes)


async def test_conditional_get(client, big_file):
    url = "/tedge/file-transfer/child1/firmware_update/image.bin"
    _, headers, _ = await fetch(client, "HEAD", url)
    status, got, body = await fetch(client, "GET", url, headers={"If-None-Match": headers["ETag"]})
    assert (status, body, got["ETag"]) == (304, b"", headers["ETag"])
    status, _, body = await fetch(client, "GET", url, headers={"If-None-Match": '"stale"'})
    assert (status, len(body)) == (200, BIG_SIZE)
    since = {"If-Modified-Since": headers["Last-Modified"]}
    assert (await fetch(client, "GET", url, headers=since))[0] == 304


async def test_fifty_concurrent_gets(client, big_file, big_bytes):
    url = "/te/v1/files/child1/firmware_update/image.bin"

    async def one(index: int) -> bool:
        if index % 5 == 0:
            range_header = {"Range": f"bytes={index * 1000}-"}
            status, _, body = await fetch(client, "GET", url, headers=range_header)
            return status == 206 and body == big_bytes[index * 1000 :]
        status, _, body = await fetch(client, "GET", url)
        return status == 200 and body == big_bytes

    async with asyncio.timeout(60):
        results = await asyncio.gather(*(one(i) for i in range(50)))
    assert all(results)


# --- run-time robustness -----------------------------------------------------------------


async def test_root_deleted_at_run_time_is_recreated(client, data_dir: Path, root: Path):
    assert (await fetch(client, "PUT", "/tedge/file-transfer/a", data=b"1"))[0] == 201
    shutil.rmtree(data_dir)
    assert (await fetch(client, "GET", "/tedge/file-transfer/a"))[0] == 404
    assert listing(data_dir) == ["file-transfer"]
    assert listing(root) == []
    shutil.rmtree(data_dir)
    assert (await fetch(client, "PUT", "/tedge/file-transfer/child/b", data=b"2"))[0] == 201
    assert (root / "child" / "b").read_bytes() == b"2"
    status, _, body = await fetch(client, "GET", "/tedge/file-transfer/child/b")
    assert (status, body) == (200, b"2")


async def test_file_replaced_by_put_while_being_downloaded(client, big_file, big_bytes):
    # Readers keep the file they opened; the rename makes the new one visible to later GETs.
    url = "/tedge/file-transfer/child1/uploads/image.bin"
    assert (await fetch(client, "PUT", url, data=io.BytesIO(big_bytes)))[0] == 201
    async with asyncio.timeout(20), client.get(url) as resp:
        first = await resp.content.readexactly(1000)
        assert (await fetch(client, "PUT", url, data=b"new"))[0] == 201
        rest = await resp.read()
    assert first + rest == big_bytes
    assert (await fetch(client, "GET", url))[2] == b"new"


# --- the server object -------------------------------------------------------------------


async def test_port_zero_reports_the_bound_port(server):
    assert server.port > 0
    with socket.create_connection(("127.0.0.1", server.port), timeout=2):
        pass


async def test_bind_error_is_a_config_error(data_dir: Path, server: FileTransferServer):
    other = FileTransferServer(
        root=data_dir / "file-transfer",
        cache_dir=data_dir / "cache",
        host="127.0.0.1",
        port=server.port,
    )
    with pytest.raises(
        ConfigError, match=rf"cannot bind 127\.0\.0\.1:{server.port}: address in use"
    ):
        await other.start()
    await other.stop()  # harmless when start failed


async def test_unknown_host_is_a_config_error(data_dir: Path):
    srv = FileTransferServer(
        root=data_dir / "file-transfer",
        cache_dir=data_dir / "cache",
        host="no-such-host.invalid",
        port=0,
    )
    with pytest.raises(ConfigError, match=r"cannot bind no-such-host\.invalid:0"):
        await srv.start()


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")
@pytest.mark.parametrize("host", ["::1", "[::1]"])
async def test_ipv6_host(data_dir: Path, host: str):
    (data_dir / "file-transfer" / "f").write_bytes(b"six")
    srv = FileTransferServer(
        root=data_dir / "file-transfer", cache_dir=data_dir / "cache", host=host, port=0
    )
    await srv.start()
    try:
        async with aiohttp.ClientSession() as session:
            status, _, body = await fetch(session, "GET", f"http://[::1]:{srv.port}/te/v1/files/f")
        assert (status, body) == (200, b"six")
        other = FileTransferServer(
            root=data_dir / "file-transfer", cache_dir=data_dir / "cache", host=host, port=srv.port
        )
        with pytest.raises(ConfigError, match=rf"cannot bind \[::1\]:{srv.port}: address in use"):
            await other.start()
    finally:
        await srv.stop()


async def test_stop_is_bounded_with_a_stalled_download(data_dir: Path, big_file: Path):
    srv = FileTransferServer(
        root=data_dir / "file-transfer", cache_dir=data_dir / "cache", host="127.0.0.1", port=0
    )
    await srv.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    # A client that asks for a big file and never reads: the server's send stalls.
    writer.write(
        b"GET /tedge/file-transfer/child1/firmware_update/image.bin HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    await writer.drain()
    await reader.readuntil(b"\r\n\r\n")  # the response has started
    loop = asyncio.get_running_loop()
    began = loop.time()
    async with asyncio.timeout(10):
        await srv.stop()
    assert loop.time() - began < 8
    with pytest.raises(OSError) as exc_info:
        socket.create_connection(("127.0.0.1", srv.port), timeout=2).close()
    assert exc_info.value.errno in (errno.ECONNREFUSED, None)
    writer.close()


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return cert, key


async def test_tls(data_dir: Path, big_file: Path, big_bytes: bytes, tls_files):
    cert, key = tls_files
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    srv = FileTransferServer(
        root=data_dir / "file-transfer",
        cache_dir=data_dir / "cache",
        host="127.0.0.1",
        port=0,
        ssl_context=server_context,
    )
    await srv.start()
    try:
        client_context = ssl.create_default_context(cafile=str(cert))
        url = f"https://127.0.0.1:{srv.port}/tedge/file-transfer/child1/firmware_update/image.bin"
        async with aiohttp.ClientSession() as session:
            status, _, body = await fetch(session, "GET", url, ssl=client_context)
            assert (status, body) == (200, big_bytes)
            status, _, body = await fetch(
                session, "GET", url, ssl=client_context, headers={"Range": "bytes=-1000"}
            )
            assert (status, body) == (206, big_bytes[-1000:])
    finally:
        await srv.stop()
