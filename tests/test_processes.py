"""Helper processes (app/processes.py): stopped in order, killed when they do not stop, their
whole process group included, and a start that fails says why."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest

from tedge_firmware.demo.processes import (
    ChildProcess,
    free_port,
    kill_leftovers,
    running,
    wait_listening,
)
from tedge_firmware.errors import TedgeFirmwareError

# Children tell the test they are ready (and their grandchild's pid) over a TCP connection: an
# event the test can await, unlike a line in a log file.
TELL = "import socket; socket.create_connection(('127.0.0.1', {port})).sendall({message})"
FAMILY = "import subprocess; grandchild = subprocess.Popen(['sleep', '300']); " + TELL.format(
    port="{port}", message="str(grandchild.pid).encode()"
) + "; grandchild.wait()"
STUBBORN = (
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    + TELL.format(port="{port}", message="b'ready'")
    + "; time.sleep(300)"
)


class Listener:
    """Collects what children send, one message per connection."""

    def __init__(self) -> None:
        self.messages: asyncio.Queue[bytes] = asyncio.Queue()
        self.port = 0

    async def __aenter__(self) -> Listener:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        await self.server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.messages.put_nowait(await reader.read())
        writer.close()

    async def next(self, limit_s: float = 10.0) -> bytes:
        async with asyncio.timeout(limit_s):
            return await self.messages.get()


async def exits(pidfd: int, limit_s: float = 5.0) -> bool:
    """Whether the process behind `pidfd` ends within `limit_s` (a pidfd turns readable then)."""
    loop = asyncio.get_running_loop()
    ended = loop.create_future()
    loop.add_reader(pidfd, ended.set_result, None)
    try:
        async with asyncio.timeout(limit_s):
            await ended
        return True
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(pidfd)


async def test_stop_reaches_the_whole_group(tmp_path: Path) -> None:
    async with Listener() as listener:
        argv = [sys.executable, "-c", FAMILY.format(port=listener.port)]
        child = ChildProcess("family", argv, tmp_path / "log")
        await child.start()
        grandchild = os.pidfd_open(int(await listener.next()))
    try:
        code = await child.stop(grace=5)
        assert code == -signal.SIGTERM
        assert await exits(grandchild)  # its parent's exit alone would leave it running
    finally:
        os.close(grandchild)


async def test_a_process_that_ignores_the_stop_signal_is_killed_after_the_grace(tmp_path: Path) -> None:
    async with Listener() as listener:
        argv = [sys.executable, "-c", STUBBORN.format(port=listener.port)]
        child = ChildProcess("stubborn", argv, tmp_path / "log")
        await child.start()
        assert await listener.next() == b"ready"
    code = await child.stop(grace=0.5)
    assert code == -signal.SIGKILL
    assert not child.running


async def test_kill_leftovers_kills_what_was_not_stopped(tmp_path: Path) -> None:
    async with Listener() as listener:
        argv = [sys.executable, "-c", STUBBORN.format(port=listener.port)]
        child = ChildProcess("stubborn", argv, tmp_path / "log")
        await child.start()
        assert await listener.next() == b"ready"
    kill_leftovers()
    assert child.process is not None
    assert await child.process.wait() == -signal.SIGKILL


async def test_a_process_that_exits_at_start_is_an_error_with_its_log(tmp_path: Path) -> None:
    child = ChildProcess("broken", ["sh", "-c", "echo cannot bind >&2; exit 3"], tmp_path / "log")
    with pytest.raises(TedgeFirmwareError, match=r"broken exited at start \(3\):\ncannot bind"):
        async with running(child, free_port()):
            pytest.fail("must not get here")


async def test_wait_listening_returns_once_the_port_accepts(tmp_path: Path) -> None:
    port = free_port()
    server = f"import socket; s = socket.create_server(('127.0.0.1', {port})); s.accept()"
    child = ChildProcess("server", [sys.executable, "-c", server], tmp_path / "log")
    async with running(child, port) as started:
        assert started.running
    assert not child.running


async def test_wait_listening_is_bounded(tmp_path: Path) -> None:
    child = ChildProcess("silent", ["sleep", "300"], tmp_path / "log")
    await child.start()
    try:
        with pytest.raises(TimeoutError):
            await wait_listening(free_port(), child, limit_s=0.3)
    finally:
        await child.stop(grace=5)
