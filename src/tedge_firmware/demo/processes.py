"""Helper processes that a tool starts and must not leave behind: the demo's broker and gateway,
the benchmarks' nginx, mosquitto and gateway.

Each one runs in a process group of its own, so that Ctrl-C in a terminal reaches only the tool,
which then stops them in order: the stop signal to the group, SIGKILL after a grace period.
`kill_leftovers()` is the synchronous last resort when the event loop is gone. Ports are probed
on loopback, since a TCP listener offers no event to await.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from tedge_firmware.errors import TedgeFirmwareError

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
STOP_GRACE_S = 10.0
LISTEN_LIMIT_S = 15.0


def free_port() -> int:
    """A TCP port free on loopback right now (the caller binds it soon after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


class ChildProcess:
    """A subprocess with its output in a log file, in a process group of its own."""

    def __init__(
        self, name: str, argv: list[str], log_path: Path, stop_signal: int = signal.SIGTERM
    ) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.stop_signal = stop_signal  # nginx stops gracefully on SIGQUIT, not SIGTERM
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with self.log_path.open("ab") as output:
            self.process = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=output,
                stderr=output,
                start_new_session=True,
            )
        _STARTED.add(self)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.returncode

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    def tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    async def stop(self, grace: float = STOP_GRACE_S) -> int | None:
        """The stop signal to its group, SIGKILL after `grace` seconds; its exit code."""
        process = self.process
        if process is None:
            return None
        try:
            if process.returncode is None:
                self._signal(self.stop_signal)
                try:
                    async with asyncio.timeout(grace):
                        await process.wait()
                except TimeoutError:
                    log.warning("%s did not stop within %.0f s: killed", self.name, grace)
                    self._signal(signal.SIGKILL)
                    await process.wait()
        finally:
            self.kill_now()
        return process.returncode

    def kill_now(self) -> None:
        """Synchronous last resort: SIGKILL the group if it still runs."""
        _STARTED.discard(self)
        if self.running:
            self._signal(signal.SIGKILL)

    def _signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signum)


_STARTED: set[ChildProcess] = set()


def kill_leftovers() -> None:
    """Kill every process started here and not stopped (e.g. the loop was torn down)."""
    for process in list(_STARTED):
        process.kill_now()


async def wait_listening(port: int, process: ChildProcess, limit_s: float = LISTEN_LIMIT_S) -> None:
    """Poll until something accepts on `port`; TedgeFirmwareError when the process exits."""
    async with asyncio.timeout(limit_s):
        while True:
            if not process.running:
                raise TedgeFirmwareError(
                    f"{process.name} exited at start ({process.returncode}):\n{process.tail()}"
                )
            try:
                _, writer = await asyncio.open_connection(HOST, port)
            except OSError:
                await asyncio.sleep(0.02)
                continue
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return


@contextlib.asynccontextmanager
async def running(process: ChildProcess, port: int | None = None) -> AsyncIterator[ChildProcess]:
    """Start it (and wait until it listens on `port`); stop it on the way out, shielded."""
    await process.start()
    try:
        if port is not None:
            await wait_listening(port, process)
        yield process
    finally:
        await asyncio.shield(process.stop())


def mosquitto_process(
    binary: str,
    home: Path,
    *,
    nodelay: bool = True,
    max_queued: int | None = None,
    extra_lines: Sequence[str] = (),
) -> tuple[ChildProcess, int]:
    """A private mosquitto on a free loopback port, configured and logging in `home`.

    `nodelay`: mosquitto's `set_tcp_nodelay` (off in mosquitto by default), without which a
    message may wait ~40 ms behind an unacknowledged small packet (Nagle and delayed ACK).
    `max_queued`: messages queued per client (mosquitto's default of 1000 drops messages when a
    thousand children register at once). `extra_lines`: more configuration after ours (a TLS
    listener, say).
    """
    port = free_port()
    conf = home / "mosquitto.conf"
    # as root mosquitto would switch to the `mosquitto` user, who cannot write our temp dir
    lines = [
        f"listener {port} {HOST}",
        "allow_anonymous true",
        *(["user root"] if os.geteuid() == 0 else []),
        "persistence false",
        f"set_tcp_nodelay {'true' if nodelay else 'false'}",
        *([f"max_queued_messages {max_queued}"] if max_queued is not None else []),
        f"log_dest file {home}/mosquitto.log",
        "log_type error",
        "log_type warning",
        *extra_lines,
    ]
    conf.write_text("\n".join(lines) + "\n")
    return ChildProcess("mosquitto", [binary, "-c", str(conf)], home / "mosquitto.out"), port
