"""Polite on both links: the file-transfer service answers several ranges at once (`206
multipart/byteranges`, read back with a standard multipart parser) and the gateway's downloads
keep within `firmware.download.max_rate`, measured."""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from pathlib import Path

import aiohttp
import pytest
from hypothesis import given
from hypothesis import strategies as st

from harness import FirmwareServer
from tedge_firmware.core.http import ByteRange, RangeVerdict, multipart_layout, parse_byte_ranges
from tedge_firmware.core.rate import TokenBucket
from tedge_firmware.shell.downloader import Downloader
from tedge_firmware.shell.file_transfer import FileTransferServer

SIZE = 1000


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("bytes=0-9,20-29", [ByteRange(0, 10), ByteRange(20, 30)]),
        ("bytes=20-29, 0-9", [ByteRange(0, 10), ByteRange(20, 30)]),  # ascending
        ("bytes=0-9,5-19,20-24", [ByteRange(0, 25)]),  # overlapping and adjacent merged
        ("bytes=-10,0-0", [ByteRange(0, 1), ByteRange(990, 1000)]),
        ("bytes=0-9,5000-6000", [ByteRange(0, 10)]),  # the part beyond the end is dropped
        ("bytes=5000-,6000-", RangeVerdict.UNSATISFIABLE),
        ("bytes=0-9,9-2", RangeVerdict.WHOLE),  # one invalid part: the header is ignored
        ("bytes=0-9,", RangeVerdict.WHOLE),
        ("items=0-9,20-29", RangeVerdict.WHOLE),
        (",".join(["bytes=0-0"] + [f"{i}-{i}" for i in range(2, 200, 2)]), RangeVerdict.WHOLE),  # too many
        (None, RangeVerdict.WHOLE),
    ],
)
def test_several_ranges(header: str | None, expected: object) -> None:
    assert parse_byte_ranges(header, SIZE) == expected


@given(st.text(max_size=200))
def test_any_range_header_is_ranges_or_a_verdict(header: str) -> None:
    parsed = parse_byte_ranges(header, SIZE)
    if isinstance(parsed, list):
        assert parsed and all(0 <= r.start < r.stop <= SIZE for r in parsed)
        assert all(a.stop < b.start for a, b in itertools.pairwise(parsed))  # sorted, apart


def test_the_multipart_length_is_what_is_sent() -> None:
    ranges = [ByteRange(0, 10), ByteRange(20, 30)]
    layout = multipart_layout(ranges, SIZE, "b0undary", "application/octet-stream")
    body = layout.heads[0] + b"x" * 10 + layout.heads[1] + b"y" * 10 + layout.tail
    assert len(body) == layout.length and body.endswith(b"\r\n--b0undary--\r\n")


@pytest.fixture
async def served(tmp_path: Path):  # type: ignore[no-untyped-def]
    root, cache = tmp_path / "ft", tmp_path / "cache"
    (root / "child1" / "uploads").mkdir(parents=True)
    cache.mkdir()
    data = os.urandom(100_000)
    (root / "child1" / "uploads" / "fw.bin").write_bytes(data)
    server = FileTransferServer(root=root, cache_dir=cache, host="127.0.0.1", port=0)
    await server.start()
    try:
        yield f"http://127.0.0.1:{server.port}/te/v1/files/child1/uploads/fw.bin", data
    finally:
        await server.stop()


async def test_several_ranges_come_back_as_multipart_byteranges(served) -> None:  # type: ignore[no-untyped-def]
    url, data = served
    ranges = {(0, 99), (50_000, 50_999), (99_990, 99_999)}
    header = "bytes=" + ",".join(f"{a}-{b}" for a, b in sorted(ranges))
    async with aiohttp.ClientSession() as session, session.get(url, headers={"Range": header}) as response:
        assert response.status == 206
        assert response.headers["Content-Type"].startswith("multipart/byteranges; boundary=")
        reader = aiohttp.MultipartReader.from_response(response)
        parts = {}
        while (part := await reader.next()) is not None:
            assert isinstance(part, aiohttp.BodyPartReader)
            first, last = part.headers["Content-Range"].removeprefix("bytes ").split("/")[0].split("-")
            parts[(int(first), int(last))] = await part.read()
    assert set(parts) == ranges
    for (first, last), body in parts.items():
        assert body == data[first : last + 1]


async def test_one_range_is_still_a_plain_206(served) -> None:  # type: ignore[no-untyped-def]
    url, data = served
    async with aiohttp.ClientSession() as session, session.get(url, headers={"Range": "bytes=10-19,15-25"}) as response:
        assert response.status == 206 and response.headers["Content-Range"] == "bytes 10-25/100000"
        assert await response.read() == data[10:26]  # the two overlapping ranges, merged


def test_the_bucket_keeps_the_rate_and_shares_it() -> None:
    bucket = TokenBucket(1000, burst=100)
    assert bucket.delay(100, now=0.0) == 0.0  # the burst goes at once
    assert bucket.delay(500, now=0.0) == pytest.approx(0.5)  # then the debt is waited for
    assert bucket.delay(500, now=0.5) == pytest.approx(0.5)  # another download waits its turn too
    assert bucket.delay(10, now=100.0) == 0.0  # after a pause: the burst again, never more


@pytest.mark.parametrize("downloads", [1, 2])
async def test_downloads_keep_within_the_cap(tmp_path: Path, downloads: int) -> None:
    """2 MB in all at 1 MB/s: about two seconds, whether one download or two share the cap."""
    rate, total = 1_000_000, 2_000_000
    each = total // downloads
    downloader = Downloader(max_rate=rate)
    async with FirmwareServer(files={f"f{i}.bin": os.urandom(each) for i in range(downloads)}) as cloud:
        try:
            began = time.monotonic()
            await asyncio.gather(*(downloader.download(cloud.url(f"f{i}.bin"), tmp_path / f"f{i}") for i in range(downloads)))
            seconds = time.monotonic() - began
        finally:
            await downloader.close()
    measured = total / seconds
    assert 0.9 * rate <= measured <= 1.1 * rate, f"{measured:.0f} B/s for a cap of {rate}"
