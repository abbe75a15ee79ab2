"""What every benchmark needs: servers as subprocesses, test files, an MQTT observer, reports.

Everything here listens on 127.0.0.1 only and lives in one temporary directory per run, which
is removed at the end, also after an error or Ctrl-C (SIGTERM is treated like Ctrl-C). Every
wait is bounded: a benchmark that hangs fails with a timeout instead.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import aiohttp
import aiomqtt

from tedge_firmware.core import units
from tedge_firmware.demo.processes import ChildProcess as Process
from tedge_firmware.demo.processes import free_port as free_port
from tedge_firmware.demo.processes import kill_leftovers as kill_leftovers
from tedge_firmware.demo.processes import mosquitto_process
from tedge_firmware.demo.processes import running as running
from tedge_firmware.demo.secure import LockedSite
from tedge_firmware.shell.config_edit import write_local_config

T = TypeVar("T")

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
CHILD = "bench-child"
GATEWAY_ID = "bench-gateway"
REQUEST_TOPIC = f"tedge/{CHILD}/commands/req/firmware_update"
CLOUD_TOPIC = "c8y/s/us"


# --- sizes, numbers, reports -----------------------------------------------------------------


def parse_size(text: str) -> int:
    """'100MB' → 100_000_000, '1GiB' → 2**30 (the project's parser, as an argparse type)."""
    try:
        return units.parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def parse_sizes(text: str) -> list[int]:
    return [parse_size(part) for part in text.split(",") if part.strip()]


def parse_counts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"counts must be >= 1: {text!r}")
    return counts


def format_size(size: int) -> str:
    """In the units it was given in: 100 MB stays '100 MB', 2**30 is '1 GiB'."""
    binary = (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))
    decimal = (("GB", 10**9), ("MB", 10**6), ("kB", 10**3))
    for unit, scale in binary if size % 1024 == 0 else decimal:
        if size >= scale:
            return f"{size / scale:.4g} {unit}"
    return f"{size} B"


def throughput(size: int, seconds: float) -> float:
    """MB/s (10^6 bytes per second)."""
    return size / seconds / 1e6


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def runs_text(values: Iterable[float], fmt: str = "{:.0f}") -> str:
    return "[" + ", ".join(fmt.format(value) for value in values) + "]"


def verdict(ratio: float, target: float, *, higher_is_better: bool = True) -> str:
    met = ratio >= target if higher_is_better else ratio <= target
    sign = ">=" if higher_is_better else "<="
    return f"target {sign} {target:.2f}: {'met' if met else 'NOT MET'}"


def heading(text: str) -> None:
    print(f"\n== {text}", flush=True)


def line(label: str, value: str, detail: str = "") -> None:
    print(f"  {label:<34} {value:>14}  {detail}".rstrip(), flush=True)


# --- files -----------------------------------------------------------------------------------

_WRITE_BLOCK = 4 << 20


def make_file(path: Path, size: int) -> str:
    """Write `size` random bytes (incompressible, like firmware) and return their SHA-256."""
    digest = hashlib.sha256()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as stream:
        left = size
        while left:
            block = os.urandom(min(_WRITE_BLOCK, left))
            digest.update(block)
            stream.write(block)
            left -= len(block)
    return digest.hexdigest()


def file_size(path: Path) -> int:
    """The size of a file, -1 when there is none."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return -1


def remove(path: Path) -> None:
    path.unlink(missing_ok=True)


def check_disk(directory: Path, needed: int) -> None:
    """Refuse to start when the files this run writes would not fit (with 1 GiB to spare)."""
    free = shutil.disk_usage(directory).free
    if free < needed + 2**30:
        raise SystemExit(
            f"not enough disk space in {directory}: {format_size(free)} free, "
            f"this run writes up to {format_size(needed)} (+1 GiB margin)"
        )


@contextlib.contextmanager
def work_directory(base: Path | None) -> Iterator[Path]:
    """A private temporary directory, removed afterwards whatever happens."""
    path = Path(tempfile.mkdtemp(prefix="tedge-bench-", dir=base))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# --- ports and processes ---------------------------------------------------------------------


def proc_status_kib(pid: int, key: str) -> int:
    """A `kB` field of /proc/<pid>/status (VmRSS, VmHWM, ...)."""
    for text in Path(f"/proc/{pid}/status").read_text().splitlines():
        if text.startswith(f"{key}:"):
            return int(text.split()[1])
    raise RuntimeError(f"/proc/{pid}/status has no {key}")


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (all its threads)."""
    user, system = process_cpu_split(pid)
    return user + system


def process_cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds a process has used so far (all its threads)."""
    # the command name may contain spaces and parentheses: split after the last ')'
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def children_cpu_seconds() -> float:
    """User + system CPU seconds of the children waited for so far (e.g. finished curls)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


async def run_command(argv: Sequence[str], limit_s: float) -> tuple[int, str]:
    """Run a short-lived command; its exit code and stdout. Killed on timeout or cancel."""
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    try:
        async with asyncio.timeout(limit_s):
            out, err = await process.communicate()
    finally:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await asyncio.shield(process.wait())
    assert process.returncode is not None
    return process.returncode, out.decode(errors="replace") + err.decode(errors="replace")


async def until_exit(awaitable: Awaitable[T], process: Process) -> T:
    """Await `awaitable`, but fail at once when `process` exits in the meantime."""
    assert process.process is not None
    work = asyncio.ensure_future(awaitable)
    exited = asyncio.ensure_future(process.process.wait())
    try:
        await asyncio.wait({work, exited}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        work.cancel()
        raise
    finally:
        exited.cancel()
    if not work.done():
        work.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await work
        raise RuntimeError(
            f"{process.name} exited ({process.returncode}) unexpectedly; log:\n{process.tail()}"
        )
    return work.result()


# --- servers ---------------------------------------------------------------------------------

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
CURL = shutil.which("curl") or "/usr/bin/curl"


def require(*programs: str) -> None:
    missing = [p for p in programs if not os.access(p, os.X_OK)]
    if missing:
        raise SystemExit(
            f"missing: {', '.join(missing)}; `make bench` installs nginx (as root); "
            "mosquitto: apt-get install mosquitto; curl: apt-get install curl"
        )


@contextlib.asynccontextmanager
async def nginx(
    root: Path, workdir: Path, *, workers: int = 1, tls: LockedSite | None = None
) -> AsyncIterator[int]:
    """nginx serving `root` on a free loopback port (yielded); static files with sendfile.
    `tls`: HTTPS with the gateway's certificate of that site, client certificates of its CA
    required (what the file-transfer service does with `http.ca_path`)."""
    home = workdir / f"nginx-{free_port()}"
    (home / "temp").mkdir(parents=True)
    port = free_port()
    conf = home / "nginx.conf"
    temps = "".join(
        f"    {kind}_temp_path {home}/temp/{kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    # as root the workers would run as `nobody`, who cannot read our private temp dir
    run_as = "user root;\n" if os.geteuid() == 0 else ""
    conf.write_text(
        "daemon off;\n"
        "master_process on;\n"
        f"{run_as}"
        f"worker_processes {workers};\n"
        f"pid {home}/nginx.pid;\n"
        f"error_log {home}/error.log warn;\n"
        "events { worker_connections 1024; }\n"
        "http {\n"
        "    access_log off;\n"
        "    sendfile on;\n"
        "    tcp_nopush on;\n"
        "    keepalive_timeout 65;\n"
        "    default_type application/octet-stream;\n"
        f"{temps}"
        "    server {\n"
        f"        listen {HOST}:{port}{' ssl' if tls else ''};\n"
        f"{_nginx_tls(tls)}"
        f"        root {root};\n"
        "        location / { }\n"
        "    }\n"
        "}\n"
    )
    # SIGQUIT: graceful stop of master and workers (SIGTERM is nginx's fast shutdown).
    process = Process(
        "nginx", [NGINX, "-p", str(home), "-c", str(conf)], home / "stderr.log", signal.SIGQUIT
    )
    async with running(process, port):
        yield port


def _nginx_tls(site: LockedSite | None) -> str:
    if site is None:
        return ""
    return (
        f"        ssl_certificate {site.gateway_cert};\n"
        f"        ssl_certificate_key {site.gateway_key};\n"
        f"        ssl_client_certificate {site.ca_file};\n"
        "        ssl_verify_client on;\n"
    )


@contextlib.asynccontextmanager
async def mosquitto(
    workdir: Path, *, nodelay: bool = True, max_queued: int | None = None
) -> AsyncIterator[int]:
    """A private broker on a free loopback port (yielded); its files in a directory of its own.

    `nodelay` (mosquitto's `set_tcp_nodelay`): without it a message to the gateway may wait
    ~40 ms behind an unacknowledged small packet, a broker latency that would be counted as
    download time. `max_queued`: see `mosquitto_process`.
    """
    home = workdir / f"mosquitto-{free_port()}"
    home.mkdir()
    process, port = mosquitto_process(MOSQUITTO, home, nodelay=nodelay, max_queued=max_queued)
    async with running(process, port):
        yield port


def write_tedge_config(
    config_dir: Path, data_path: Path, *, mqtt_port: int, http_port: int, extra: str = ""
) -> None:
    # a tenant that resolves nowhere: the benchmark's binaries never get a JWT
    write_local_config(
        config_dir,
        device_id=GATEWAY_ID,
        tenant="c8y.tenant.invalid",
        mqtt_port=mqtt_port,
        http_port=http_port,
        data_path=data_path,
        extra=extra,
    )


def tedge_firmware(command: str, config_dir: Path, log: Path) -> Process:
    """`tedge-firmware <command> --config-dir DIR` with this interpreter (the project's venv)."""
    argv = [sys.executable, "-m", "tedge_firmware", command, "--config-dir", str(config_dir)]
    return Process(f"tedge-firmware {command}", argv, log)


# --- MQTT ------------------------------------------------------------------------------------


@dataclass
class Observer:
    """Plays Cumulocity and the child: records what arrives on the subscribed topics, in order."""

    client: aiomqtt.Client
    inbox: asyncio.Queue[tuple[str, bytes]] = field(default_factory=asyncio.Queue)

    async def collect(self) -> None:
        async for message in self.client.messages:
            payload = message.payload
            data = payload if isinstance(payload, bytes) else str(payload).encode()
            self.inbox.put_nowait((message.topic.value, data))

    async def wait_for(
        self, wanted: Callable[[str, bytes], bool], limit_s: float
    ) -> tuple[str, bytes]:
        """The next message for which `wanted(topic, payload)` holds; others are skipped."""
        async with asyncio.timeout(limit_s):
            while True:
                topic, data = await self.inbox.get()
                if wanted(topic, data):
                    return topic, data

    async def publish(self, topic: str, payload: str) -> None:
        await self.client.publish(topic, payload, qos=1)


@contextlib.asynccontextmanager
async def observer(port: int, topics: Iterable[str]) -> AsyncIterator[Observer]:
    identifier = f"bench-observer-{os.getpid()}-{free_port()}"
    # TCP_NODELAY: without it, a PUBACK we send followed at once by our next PUBLISH waits for
    # the broker's delayed ACK (Nagle), ~40 ms that would be counted against the gateway.
    nodelay = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
    async with aiomqtt.Client(HOST, port, identifier=identifier, socket_options=nodelay) as client:
        for topic in topics:
            await client.subscribe(topic, qos=1)
        watcher = Observer(client)
        task = asyncio.create_task(watcher.collect())
        try:
            yield watcher
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await task


def _first_line(argv: Sequence[str]) -> str:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except OSError:
        return "missing"
    return ((result.stdout or result.stderr).strip().splitlines() or ["?"])[0]


def machine_summary() -> str:
    """nproc, memory, CPU model, kernel and the versions of what is measured."""
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((t.split(":", 1)[1].strip() for t in cpuinfo if t.startswith("model name")), "?")
    memory_kib = next(
        int(t.split()[1])
        for t in Path("/proc/meminfo").read_text().splitlines()
        if t.startswith("MemTotal:")
    )
    curl = " ".join(_first_line([CURL, "--version"]).split()[:2])
    nginx = _first_line([NGINX, "-v"]).removeprefix("nginx version: ")
    return (
        f"{os.cpu_count()} CPUs ({cpu}), {memory_kib / 2**20:.1f} GiB RAM, "
        f"Linux {platform.release()}, Python {platform.python_version()}, "
        f"aiohttp {aiohttp.__version__}, {nginx}, {curl}"
    )


# --- running a benchmark ---------------------------------------------------------------------


class OverBudget(Exception):
    """The whole benchmark took longer than its --budget."""


def common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--repeat", type=int, default=None, help="repetitions (median reported)")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where the temporary files go (default: the system temp dir, usually /tmp)",
    )
    parser.add_argument(
        "--budget", type=float, default=3600.0, help="give up after this many seconds"
    )


def run(benchmark: Callable[[], Awaitable[None]], budget: float) -> int:
    """Run one benchmark within `budget` seconds; Ctrl-C and SIGTERM stop it cleanly."""

    async def bounded() -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
        try:
            async with asyncio.timeout(budget) as deadline:
                await benchmark()
        except TimeoutError:
            if deadline.expired():
                raise OverBudget from None
            raise
        finally:
            loop.remove_signal_handler(signal.SIGTERM)

    print(f"machine: {machine_summary()}", flush=True)
    started = time.monotonic()
    try:
        asyncio.run(bounded())
    except KeyboardInterrupt:
        print("\ninterrupted: processes stopped, files removed", file=sys.stderr)
        return 130
    except asyncio.CancelledError:
        print("\nterminated: processes stopped, files removed", file=sys.stderr)
        return 143
    except OverBudget:
        print(f"\ngave up: over the budget of {budget:.0f} s", file=sys.stderr)
        return 1
    except Exception:  # reported, and the next benchmark may still run
        traceback.print_exc()
        print("\nfailed: processes stopped, files removed", file=sys.stderr)
        return 1
    finally:
        kill_leftovers()
    print(f"  (took {time.monotonic() - started:.0f} s)", flush=True)
    return 0


# --- one firmware operation through the real gateway -----------------------------------------

CHILD_CLOUD_TOPIC = f"c8y/s/us/{CHILD}"
_START_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class GatewayDownload:
    """One 515 handled by a fresh `tedge-firmware run`: how long it took and its memory."""

    seconds: float
    cpu_seconds: float
    idle_rss_kib: int
    peak_rss_kib: int


def _is_request_or_failure(topic: str, payload: bytes) -> bool:
    return topic == REQUEST_TOPIC or (topic == CHILD_CLOUD_TOPIC and payload.startswith(b"502"))


async def gateway_download(
    workdir: Path, broker_port: int, url: str, sha256: str, limit_s: float
) -> GatewayDownload:
    """Start a gateway with an empty data dir, send it a 515 for `url`, time until the child's
    request arrives (the firmware is then downloaded, verified, cached and published)."""
    home = Path(tempfile.mkdtemp(prefix="gateway-", dir=workdir))
    try:
        config_dir = home / "etc"
        write_tedge_config(config_dir, home / "data", mqtt_port=broker_port, http_port=free_port())
        topics = [CLOUD_TOPIC, CHILD_CLOUD_TOPIC, REQUEST_TOPIC]
        async with observer(broker_port, topics) as watcher:
            gateway = tedge_firmware("run", config_dir, home / "gateway.log")
            async with running(gateway):
                started = watcher.wait_for(
                    lambda t, p: t == CLOUD_TOPIC and p[:3] == b"500", _START_TIMEOUT_S
                )
                await until_exit(started, gateway)
                idle = proc_status_kib(gateway.pid, "VmRSS")
                cpu_before = process_cpu_seconds(gateway.pid)
                begin = time.perf_counter()
                await watcher.publish("c8y/s/ds", f"515,{CHILD},bench-firmware,1.0,{url}")
                answer = watcher.wait_for(_is_request_or_failure, limit_s)
                topic, payload = await until_exit(answer, gateway)
                seconds = time.perf_counter() - begin
                cpu = process_cpu_seconds(gateway.pid) - cpu_before
                peak = proc_status_kib(gateway.pid, "VmHWM")
                if topic != REQUEST_TOPIC:
                    raise RuntimeError(
                        f"the gateway failed the operation: {payload!r}\n{gateway.tail()}"
                    )
        _check_request(payload, sha256)
        return GatewayDownload(seconds, cpu, idle, peak)
    finally:
        shutil.rmtree(home, ignore_errors=True)


def _check_request(payload: bytes, sha256: str) -> None:
    request = json.loads(payload)
    if request.get("sha256") != sha256:
        raise RuntimeError(f"the child request has the wrong sha256: {request}")
