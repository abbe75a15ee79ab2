"""Hostile clients on the file-transfer service's TLS port (client certificates required): plain
HTTP, handshake garbage, and a flood of handshakes that never finish. The service runs as its
own process with a small descriptor limit, as in test_file_transfer_flood; none of them stops it,
and a child with its certificate downloads its firmware while they are at it."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from ftprocess import (
    FLOOD,
    IDLE_TIMEOUT,
    LIMIT_NOFILE,
    file_transfer_process,
)
from tedge_firmware.demo.secure import LockedSite

FIRMWARE = os.urandom(2 * 1024 * 1024)


@dataclass(frozen=True)
class Service:
    port: int
    log: Path
    site: LockedSite

    def child_context(self, child: str = "child1") -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.site.ca_file))
        context.load_cert_chain(self.site.child_cert(child), self.site.child_key(child))
        return context

    async def download(self, first_byte: int = 0) -> bytes:
        url = f"https://127.0.0.1:{self.port}/te/v1/files/child1/firmware_update/image.bin"
        connector = aiohttp.TCPConnector(ssl=self.child_context())
        headers = {"Range": f"bytes={first_byte}-"} if first_byte else {}
        async with aiohttp.ClientSession(connector=connector) as session, session.get(url, headers=headers) as response:
            assert response.status == (206 if first_byte else 200)
            return await response.read()


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    site = LockedSite.create(tmp_path / "certs", "parent-device", ["child1"])
    with file_transfer_process(tmp_path, FIRMWARE, site.gateway_toml()) as (port, log):
        yield Service(port, log, site)
    text = log.read_text()
    assert "Traceback" not in text and "Too many open files" not in text, text[-3000:]


async def _send(port: int, data: bytes) -> bytes:
    """Send `data` on a raw connection; what came back before the service closed it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(IDLE_TIMEOUT + 5):
            return await reader.read()
    except ConnectionResetError:
        return b""
    finally:
        writer.transport.abort()


@pytest.mark.parametrize(
    "data",
    [
        b"GET /te/v1/files/child1/firmware_update/image.bin HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x16\x03\x01\x02\x00" + b"\xff" * 600,  # a handshake record full of garbage
        bytes(range(256)) * 8,
        b"\x16\x03\x01",  # a record header, then nothing (the handshake time limit ends it)
    ],
    ids=["plain HTTP", "garbage handshake", "binary noise", "stalled handshake"],
)
async def test_a_client_that_does_not_speak_tls_gets_nothing_and_the_service_goes_on(
    service: Service, data: bytes
) -> None:
    answer = await _send(service.port, data)
    assert b"HTTP/" not in answer and b"firmware" not in answer  # an alert at most
    async with asyncio.timeout(10):
        assert await service.download() == FIRMWARE


async def test_over_tls_a_download_resumes_where_it_stopped(service: Service) -> None:
    offset = len(FIRMWARE) // 3 + 7  # inside a piece the service sends
    async with asyncio.timeout(10):
        assert await service.download(offset) == FIRMWARE[offset:]


async def test_a_flood_of_unfinished_handshakes_does_not_starve_a_child_with_its_certificate(
    service: Service, enough_descriptors_for_the_test: None
) -> None:
    async def hold() -> asyncio.StreamWriter | None:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", service.port)
        except OSError:
            return None
        writer.write(b"\x16\x03\x01")  # a handshake begun, never continued
        return writer

    links = [link for link in await asyncio.gather(*(hold() for _ in range(FLOOD))) if link]
    try:
        assert len(links) > LIMIT_NOFILE  # more than the service has descriptors
        # while the flood holds its connections, a child downloads its firmware whole; it may
        # have to retry while the flood is being turned away, as the connector would
        digest = hashlib.sha256(FIRMWARE).hexdigest()
        async with asyncio.timeout(IDLE_TIMEOUT + 15):
            while True:
                with contextlib.suppress(aiohttp.ClientError, AssertionError):
                    if hashlib.sha256(await service.download()).hexdigest() == digest:
                        break
                await asyncio.sleep(0.05)  # the client's own backoff between attempts
    finally:
        for writer in links:
            writer.transport.abort()
    async with asyncio.timeout(10):
        assert await service.download() == FIRMWARE
