"""A TCP proxy in front of the broker that can cut, freeze or refuse a client's MQTT link.

- `cut()` aborts every connection on both sides, as a network failure would (the broker then
  publishes the client's will); bytes held by a freeze are dropped, never delivered late.
- `freeze(upstream=..., downstream=...)` forwards nothing more in those directions (the
  connections stay open) until `thaw()`: a message the client sent then is neither delivered
  nor acknowledged.
- `block()` refuses new connections (closed at once) until `unblock()`: the client stays away
  for as long as the test needs.
- `cut_after`: the first connection is cut once that many bytes went from client to broker.
"""

from __future__ import annotations

import asyncio


class LinkProxy:
    def __init__(self, target_port: int, cut_after: int | None = None) -> None:
        self.target_port = target_port
        self.cut_after = cut_after
        self.cuts = 0
        self.accepted = 0
        self._sent = 0
        self._writers: list[asyncio.StreamWriter] = []
        self._handlers: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self._upstream_flows = asyncio.Event()
        self._downstream_flows = asyncio.Event()
        self._upstream_flows.set()
        self._downstream_flows.set()
        self._blocked = False
        self._generation = 0  # bumped by cut(): data read before it is dropped

    async def __aenter__(self) -> LinkProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        self.thaw()
        self._abort_all()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    def cut(self) -> None:
        self.cuts += 1
        self._generation += 1
        self._abort_all()

    def freeze(self, *, upstream: bool = True, downstream: bool = True) -> None:
        if upstream:
            self._upstream_flows.clear()
        if downstream:
            self._downstream_flows.clear()

    def thaw(self) -> None:
        self._upstream_flows.set()
        self._downstream_flows.set()

    def block(self) -> None:
        self._blocked = True

    def unblock(self) -> None:
        self._blocked = False

    def _abort_all(self) -> None:
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._blocked:
            writer.transport.abort()
            return
        self.accepted += 1
        task = asyncio.create_task(self._relay(reader, writer))
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers += [writer, up_writer]
        await asyncio.gather(
            self._pipe(reader, up_writer, self._upstream_flows, upstream=True),
            self._pipe(up_reader, writer, self._downstream_flows, upstream=False),
            return_exceptions=True,
        )
        writer.transport.abort()
        up_writer.transport.abort()

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        flows: asyncio.Event,
        *,
        upstream: bool,
    ) -> None:
        while data := await reader.read(65536):
            generation = self._generation
            await flows.wait()
            if generation != self._generation or writer.transport.is_closing():
                return  # cut while frozen: what was held is lost, as on a real network
            writer.write(data)
            if upstream and self.cut_after is not None:
                self._sent += len(data)
                if self._sent >= self.cut_after:
                    self.cut_after = None
                    self.cut()
                    return
            await writer.drain()
        writer.transport.abort()
