"""Apply and verify steps as external commands, run as detached jobs that outlive a crash.

A flashing tool must not die because the connector did (a `kill -9`, an out-of-memory kill, a
restart by an operator): a half-written flash is worse than a late status. So a command does
not run as a plain child with pipes (a dead reader would kill it with SIGPIPE, and asyncio kills
children it still tracks when its loop closes). Instead a tiny launcher shell starts it in the
background, in a session of its own, with its standard output and error going to files, and
exits at once. The job writes the command's exit status to a file when the command ends.

The connector then waits for the job's process to end (a pidfd: no polling), reads the exit
status and the last line of standard error. A connector that restarts finds the job's identity
in the operation record (pid, process start time, boot id: a reused pid is not mistaken for it),
waits for it if it still runs, and reads the status it left; no status means the job was
killed with the machine (a reboot) and the apply counts as interrupted.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tedge_firmware.connector._state import ProcessIdentity
from tedge_firmware.connector._store import StepFiles
from tedge_firmware.core.retry import format_seconds
from tedge_firmware.core.text import one_line

SHELL = "/bin/sh"
TERMINATE_GRACE_S = 5.0
_POLL_S = 0.25  # only where the kernel offers no pidfd
_TAIL_BYTES = 8192

# $1 status file, $2 stdout file, $3 stderr file; the rest is the command. The job runs in the
# background, so it is not a child of the connector; `echo $!` hands over its pid.
_LAUNCHER = """s=$1 o=$2 e=$3
shift 3
( "$@" </dev/null >"$o" 2>"$e"
  c=$?
  printf '%s\\n' "$c" >"$s.tmp" && mv -f "$s.tmp" "$s" ) </dev/null >/dev/null 2>&1 &
echo $!
"""


@dataclass(frozen=True, init=False)
class Command:
    """An external command used as the apply or the verify step.

    `args` is a shell command line (a `str`, run with `/bin/sh -c`) or an argument vector (a
    sequence of `str`, run as is). It runs with the connector's environment plus
    `Firmware.environment()`: `FIRMWARE_FILE`, `FIRMWARE_NAME`, `FIRMWARE_VERSION`,
    `FIRMWARE_SHA256`, `OPERATION_ID`, `ATTEMPT`, `CHILD_ID`. Exit status 0 means success;
    anything else is a failure whose reason is the last non-empty line of its standard error.
    `timeout` is the time limit in seconds (None: none); a command over its limit gets SIGTERM,
    then SIGKILL, and fails. The command runs detached: it survives a crash of the connector,
    which then waits for it after its restart.
    """

    args: str | tuple[str, ...]
    timeout: float | None

    def __init__(self, args: str | Sequence[str], *, timeout: float | None = None) -> None:
        if isinstance(args, str):
            if not args.strip():
                raise ValueError("the command line is empty")
            value: str | tuple[str, ...] = args
        else:
            value = tuple(args)
            if not value or not all(isinstance(arg, str) for arg in value) or not value[0]:
                raise ValueError("the argument vector must be non-empty strings")
        if any("\x00" in arg for arg in ((value,) if isinstance(value, str) else value)):
            raise ValueError("the command contains a NUL character")
        if timeout is not None and not timeout > 0:
            raise ValueError("timeout must be positive (or None for no limit)")
        object.__setattr__(self, "args", value)
        object.__setattr__(self, "timeout", timeout)

    @property
    def argv(self) -> tuple[str, ...]:
        """The argument vector that is run."""
        if isinstance(self.args, str):
            return (SHELL, "-c", self.args)
        return self.args


class StepTimedOut(Exception):
    """The command ran past its time limit and was stopped."""


async def launch(command: Command, env: Mapping[str, str], files: StepFiles) -> ProcessIdentity:
    """Start the command as a detached job; its identity, to wait for it now or after a restart."""
    return await asyncio.to_thread(_start_job, command, env, files)


def _start_job(command: Command, env: Mapping[str, str], files: StepFiles) -> ProcessIdentity:
    files.clear()
    argv = [SHELL, "-c", _LAUNCHER, "tedge-firmware-step"]
    argv += [str(files.status), str(files.out), str(files.err), *command.argv]
    launcher = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, **env},
        start_new_session=True,  # the job gets its own process group, and no terminal signals
        close_fds=True,
    )
    out, err = launcher.communicate()
    try:
        pid = int(out.decode().strip())
    except ValueError:
        detail = one_line(err.decode("utf-8", "replace")) or f"exit status {launcher.returncode}"
        raise OSError(f"cannot start {command.argv[0]}: {detail}") from None
    start_ticks, boot_id = process_start(pid)
    return ProcessIdentity(pid, launcher.pid, start_ticks, boot_id, time.time())


async def wait(job: ProcessIdentity, files: StepFiles, limit: float | None) -> int | None:
    """Wait for the job to end; its exit status (None when it recorded none).

    StepTimedOut when it runs past `limit` seconds from its start (it is stopped first).
    Cancelling the wait leaves the job running.
    """
    remaining = None if limit is None else job.started_at + limit - time.time()
    try:
        async with asyncio.timeout(remaining):
            await wait_gone(job)
    except TimeoutError:
        await terminate(job)
        raise StepTimedOut(f"timed out after {format_seconds(limit or 0)}") from None
    return await asyncio.to_thread(read_status, files.status)


async def wait_gone(job: ProcessIdentity) -> None:
    """Return once the job's process has ended (at once when it is not running)."""
    try:
        pidfd = os.pidfd_open(job.pid)
    except ProcessLookupError:
        return
    except OSError:  # no pidfd (kernel older than 5.3): poll
        while is_running(job):  # noqa: ASYNC110 (nothing to await without a pidfd)
            await asyncio.sleep(_POLL_S)
        return
    try:
        if not is_running(job):  # the pid was reused, or the job is a zombie
            return
        loop = asyncio.get_running_loop()
        ended: asyncio.Future[None] = loop.create_future()

        def on_readable() -> None:
            if not ended.done():
                ended.set_result(None)

        loop.add_reader(pidfd, on_readable)
        try:
            await ended
        finally:
            loop.remove_reader(pidfd)
    finally:
        os.close(pidfd)


async def terminate(job: ProcessIdentity) -> None:
    """SIGTERM to the job's process group, SIGKILL after a grace period."""
    _signal_group(job, signal.SIGTERM)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(TERMINATE_GRACE_S):
            await wait_gone(job)
            return
    _signal_group(job, signal.SIGKILL)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(TERMINATE_GRACE_S):
            await wait_gone(job)


def _signal_group(job: ProcessIdentity, signum: int) -> None:
    if not is_running(job):
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(job.pgid, signum)


def is_running(job: ProcessIdentity) -> bool:
    """Whether the job's own process (not a later one with its pid) is still running."""
    try:
        stat = Path(f"/proc/{job.pid}/stat").read_text()
    except OSError:
        return False
    state, start_ticks = _parse_stat(stat)
    if state in ("Z", "X"):
        return False
    if job.start_ticks is not None and start_ticks != job.start_ticks:
        return False
    return job.boot_id is None or job.boot_id == _boot_id()


def process_start(pid: int) -> tuple[int | None, str | None]:
    """The process's start time (clock ticks since boot) and the boot id, when /proc tells."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None, _boot_id()
    return _parse_stat(stat)[1], _boot_id()


def _parse_stat(stat: str) -> tuple[str, int | None]:
    # "pid (comm) state ppid ...": comm may contain spaces and parentheses, so split after the
    # last ")"; the state is field 3 and the start time field 22.
    fields = stat.rsplit(")", 1)[-1].split()
    try:
        return fields[0], int(fields[19])
    except (IndexError, ValueError):
        return "?", None


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def read_status(path: Path) -> int | None:
    """The exit status a job recorded, or None."""
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def last_error_line(path: Path) -> str | None:
    """The last non-empty line of a command's standard error, one-lined; None when empty."""
    try:
        with path.open("rb") as source:
            source.seek(0, os.SEEK_END)
            size = source.tell()
            source.seek(max(0, size - _TAIL_BYTES))
            tail = source.read()
    except OSError:
        return None
    for line in reversed(tail.decode("utf-8", "replace").splitlines()):
        if line.strip():
            return one_line(line)
    return None


def failure_reason(step: str, status: int | None, err: Path) -> str | None:
    """None when the step succeeded; else why it failed, in one line."""
    if status == 0:
        return None
    line = last_error_line(err)
    if line:
        return line
    if status is None:
        return f"{step} command ended without an exit status"
    if status > 128:
        return f"{step} command exited with status {status} (signal {status - 128})"
    return f"{step} command exited with status {status}"
