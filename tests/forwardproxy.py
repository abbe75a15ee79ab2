"""A small HTTP forward proxy for tests: `GET http://host:port/path` (absolute form) is relayed
to the origin, `CONNECT host:port` opens a tunnel (for https origins). It records what it was
asked, can require Basic credentials (407 otherwise), and serves until stopped."""

from __future__ import annotations

import asyncio
import base64
import contextlib
from dataclasses import dataclass, field
from urllib.parse import urlsplit


@dataclass
class ForwardProxy:
    credentials: tuple[str, str] | None = None
    asked: list[str] = field(default_factory=list)  # "GET http://…" / "CONNECT host:port"
    port: int = 0
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> ForwardProxy:
        self._server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        request_line, *header_lines = head.decode("latin-1").split("\r\n")
        method, target, version = request_line.split(" ", 2)
        headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines if h)}
        self.asked.append(f"{method} {target}")
        if self.credentials is not None and not self._authorized(headers):
            writer.write(b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
            return
        if method == "CONNECT":
            host, _, port = target.rpartition(":")
            upstream_reader, upstream_writer = await asyncio.open_connection(host, int(port))
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await writer.drain()
            await _pipe_both(reader, writer, upstream_reader, upstream_writer)
            return
        parts = urlsplit(target)
        upstream_reader, upstream_writer = await asyncio.open_connection(parts.hostname, parts.port or 80)
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        kept = [h for h in header_lines if h and not h.lower().startswith(("proxy-", "connection:"))]
        upstream_writer.write(
            f"{method} {path or '/'} {version}\r\n".encode("latin-1")
            + "".join(f"{h}\r\n" for h in kept).encode("latin-1")
            + b"Connection: close\r\n\r\n"
        )
        await upstream_writer.drain()
        await _pipe_both(reader, writer, upstream_reader, upstream_writer, close_after_response=True)

    def _authorized(self, headers: dict[str, str]) -> bool:
        assert self.credentials is not None
        expected = base64.b64encode(":".join(self.credentials).encode()).decode()
        return headers.get("proxy-authorization") == f"Basic {expected}"


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await source.read(1 << 16):
            sink.write(data)
            await sink.drain()


async def _pipe_both(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    upstream_reader: asyncio.StreamReader,
    upstream_writer: asyncio.StreamWriter,
    *,
    close_after_response: bool = False,
) -> None:
    to_origin = asyncio.create_task(_pipe(reader, upstream_writer))
    try:
        await _pipe(upstream_reader, writer)  # the origin's answer, until it closes
    finally:
        to_origin.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await to_origin
        upstream_writer.close()
