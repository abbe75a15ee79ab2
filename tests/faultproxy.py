"""A small asyncio TCP proxy that injects faults into server-to-client traffic, for tests.

Each new client connection takes the next planned `Fault` (first in, first out); once the plan
is used up, connections pass through untouched. A fault triggers after `after` bytes from the
server have been forwarded on that connection:

- `Fault.cut(n)`: forward n bytes, then close both sides cleanly (FIN): a truncated body.
- `Fault.reset(n)`: forward n bytes, then abort the client side with SO_LINGER 0 (RST). As with
  a real reset, bytes still in flight may be lost.
- `Fault.stall(n)`: forward n bytes, then forward nothing more (the connection stays open)
  until the client goes away, the proxy stops, or `release_stalls()` lets traffic flow again.

Usage:

    async with FaultProxy(upstream_port) as proxy:
        proxy.plan(Fault.cut(300_000), Fault.stall(0))
        url = proxy.url("/firmware.bin")
        ...
        assert proxy.bytes_to_client <= 1.05 * size
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections import deque
from dataclasses import dataclass
from typing import Literal

FaultKind = Literal["cut", "reset", "stall"]

_READ_SIZE = 64 * 1024


@dataclass(frozen=True)
class Fault:
    """One fault for one connection: `kind` after `after` bytes from the server."""

    kind: FaultKind
    after: int

    @classmethod
    def cut(cls, after: int) -> Fault:
        return cls("cut", after)

    @classmethod
    def reset(cls, after: int) -> Fault:
        return cls("reset", after)

    @classmethod
    def stall(cls, after: int) -> Fault:
        return cls("stall", after)


class FaultProxy:
    """Listens on 127.0.0.1 (a free port) and forwards to upstream_host:upstream_port."""

    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.port = 0
        self.connections = 0
        self.bytes_to_client = 0
        self.faults_applied = 0
        self._plan: deque[Fault] = deque()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._released = asyncio.Event()
        self._fault_signal = asyncio.Condition()

    async def __aenter__(self) -> FaultProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def plan(self, *faults: Fault) -> None:
        """Queue faults, one for each of the next connections."""
        self._plan.extend(faults)

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def release_stalls(self) -> None:
        """Let stalled connections (current and future) forward traffic again."""
        self._released.set()

    async def wait_faults(self, count: int) -> None:
        """Wait until `count` faults have been applied (bound it with asyncio.timeout)."""
        async with self._fault_signal:
            await self._fault_signal.wait_for(lambda: self.faults_applied >= count)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._on_client, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _on_client(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        # stop() cancels this inner task, never the one asyncio made for the callback: asyncio
        # logs an error when that one ends cancelled.
        work = asyncio.create_task(self._serve(client_reader, client_writer))
        self._tasks.add(work)
        try:
            await asyncio.wait({work})
        finally:
            self._tasks.discard(work)
            if not work.cancelled() and work.exception() is not None:
                raise work.exception()  # type: ignore[misc]

    async def _serve(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        self.connections += 1
        fault = self._plan.popleft() if self._plan else None
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(
                self.upstream_host, self.upstream_port
            )
        except OSError:
            _abort(client_writer)
            return
        upstream_pump = asyncio.create_task(_pump(client_reader, upstream_writer))
        try:
            await self._forward_to_client(upstream_reader, client_writer, upstream_pump, fault)
        except (ConnectionError, OSError):
            pass
        finally:
            upstream_pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError, OSError):
                await upstream_pump
            _close(upstream_writer)
            _close(client_writer)

    async def _forward_to_client(
        self,
        upstream: asyncio.StreamReader,
        client: asyncio.StreamWriter,
        upstream_pump: asyncio.Task[None],
        fault: Fault | None,
    ) -> None:
        remaining = fault.after if fault is not None else None
        while True:
            if fault is not None and remaining == 0:
                if not await self._apply(fault, client, upstream_pump):
                    return
                fault = remaining = None
            size = _READ_SIZE if remaining is None else min(_READ_SIZE, remaining)
            data = await upstream.read(size)
            if not data:
                return
            client.write(data)
            await client.drain()
            self.bytes_to_client += len(data)
            if remaining is not None:
                remaining -= len(data)

    async def _apply(
        self, fault: Fault, client: asyncio.StreamWriter, upstream_pump: asyncio.Task[None]
    ) -> bool:
        """Apply the fault; True when the connection goes on (a released stall)."""
        await self._count_fault()
        if fault.kind == "reset":
            _abort(client)
            return False
        if fault.kind == "cut":
            return False
        # stall: forward nothing until released or until the client gives up.
        released = asyncio.create_task(self._released.wait())
        try:
            await asyncio.wait({released, upstream_pump}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            released.cancel()
        return self._released.is_set() and not upstream_pump.done()

    async def _count_fault(self) -> None:
        async with self._fault_signal:
            self.faults_applied += 1
            self._fault_signal.notify_all()


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Client-to-server bytes, untouched; closes the server side when the client goes away."""
    try:
        while data := await reader.read(_READ_SIZE):
            writer.write(data)
            await writer.drain()
    finally:
        _close(writer)


def _abort(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def _close(writer: asyncio.StreamWriter) -> None:
    if not writer.is_closing():
        writer.close()
