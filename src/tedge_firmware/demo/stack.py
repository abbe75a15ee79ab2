"""`tedge-firmware demo`: the whole stack on one machine, and a fleet rollout anyone can watch.

What runs, all on 127.0.0.1 and in one temporary directory:

- a private MQTT broker on a free port (its own process group): Mosquitto, or where it is
  missing the embedded broker (amqtt in a subprocess, `embedded_broker`), a demo-only fallback;
- the Cumulocity simulator (`C8ySimulator`, in this process) serving the firmware binary, with
  the first cloud download cut on purpose so that the gateway has to resume;
- `tedge-firmware run` (a subprocess): the firmware plugin, file-transfer and registration;
- N simulated children: one SDK `Connector` (in this process) serving every child id, with a
  demo apply step. `--fail K` children always fail with a reason; `--flaky K` children fail
  their first apply, and the demo retries them with a new operation, as a person would in
  Cumulocity.

The children declare `c8y_Firmware` over MQTT (the connector's `register`), the gateway
registers them (`101`/`114`), the simulator creates a bulk operation with a ramp, and the live
view follows each child. The summary ends with what the demo promises: every child that should
succeed did, the failing ones failed with their reason, one cloud download, no protocol error.
Every process the demo started is stopped on the way out, also on Ctrl-C and SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib.util
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from rich.console import Console
from rich.live import Live
from rich.table import Table

from tedge_firmware.connector import (
    BrokerSettings,
    Connector,
    DownloadSettings,
    Firmware,
    Phase,
    Progress,
)
from tedge_firmware.core.units import format_size
from tedge_firmware.demo.processes import (
    HOST,
    ChildProcess,
    free_port,
    kill_leftovers,
    mosquitto_process,
    running,
)
from tedge_firmware.errors import ConfigError, TedgeFirmwareError
from tedge_firmware.shell.config_file import write_local_config
from tedge_firmware.sim import FIRMWARE, C8ySimulator, FileFaults, Operation, OperationStatus

log = logging.getLogger(__name__)

GATEWAY_ID = "demo-gateway"
FIRMWARE_NAME = "demo-firmware"
FIRMWARE_VERSION = "1.0"
FAIL_REASON = "demo: flash write error (this child fails on purpose)"
FLAKY_REASON = "demo: flash verify error (flaky child, retried)"
MAX_LIVE_ROWS = 24
_REFRESH_S = 0.25

BrokerChoice = Literal["auto", "mosquitto", "embedded"]
BrokerKind = Literal["mosquitto", "embedded"]
BROKER_CHOICES: tuple[BrokerChoice, ...] = ("auto", "mosquitto", "embedded")



@dataclass(frozen=True)
class DemoOptions:
    children: int = 10
    size: int = 64 * 2**20
    fail: int = 1  # children whose apply always fails
    flaky: int = 1  # children whose first apply fails; retried once with a new operation
    cloud_cuts: int = 1  # the first cloud downloads cut halfway (the gateway resumes)
    ramp: float = 0.2  # seconds between two operations of the bulk operation
    apply_seconds: float = 1.0  # how long the demo "flash" takes
    timeout: float = 600.0  # for the whole rollout
    live: bool | None = None  # rich live table; None: when the output is a terminal
    workdir: Path | None = None  # where the temporary directory goes
    keep: bool = False  # keep the temporary directory (logs) afterwards
    broker: BrokerChoice = "auto"  # auto: mosquitto when installed, else the embedded one

    def __post_init__(self) -> None:
        if self.broker not in BROKER_CHOICES:
            raise ValueError(f"--broker must be one of {', '.join(BROKER_CHOICES)}")
        if self.children < 1:
            raise ValueError("--children must be at least 1")
        if self.fail < 0 or self.flaky < 0 or self.fail + self.flaky > self.children:
            raise ValueError("--fail and --flaky must be >= 0 and add up to at most --children")
        if self.ramp < 0 or self.apply_seconds < 0 or self.timeout <= 0 or self.cloud_cuts < 0:
            raise ValueError("--ramp, --apply-seconds and --cuts must be >= 0, --timeout > 0")


# --- the children ------------------------------------------------------------------------


@dataclass
class ChildView:
    """What the demo knows about one child: its role and what the connector reported."""

    child_id: str
    role: str  # "ok", "fail" or "flaky"
    phase: str = "waiting"
    downloaded: int = 0  # bytes of the current operation
    bytes_total: int = 0  # bytes fetched from the gateway over every operation
    applies: int = 0
    reason: str | None = None
    operations: dict[str, int] = field(default_factory=dict)  # connector op id → bytes

    @property
    def should_succeed(self) -> bool:
        return self.role != "fail"


def child_roles(options: DemoOptions) -> dict[str, str]:
    """c01…cNN; the last `fail` ones fail, the `flaky` ones before them are flaky."""
    width = max(2, len(str(options.children)))
    ids = [f"c{index:0{width}d}" for index in range(1, options.children + 1)]
    roles = {child: "ok" for child in ids}
    ordinary = options.children - options.fail - options.flaky
    for child in ids[ordinary : ordinary + options.flaky]:
        roles[child] = "flaky"
    for child in ids[ordinary + options.flaky :]:
        roles[child] = "fail"
    return roles


class Fleet:
    """The simulated children: the demo apply step and the progress the connector reports."""

    def __init__(self, roles: dict[str, str], apply_seconds: float) -> None:
        self.views = {child: ChildView(child, role) for child, role in roles.items()}
        self.apply_seconds = apply_seconds

    async def apply(self, firmware: Firmware) -> None:
        view = self.views[firmware.child_id]
        view.applies += 1
        await asyncio.sleep(self.apply_seconds)  # the "flash" itself: time is the point here
        if view.role == "fail":
            raise RuntimeError(FAIL_REASON)
        if view.role == "flaky" and view.applies == 1:
            raise RuntimeError(FLAKY_REASON)

    def on_progress(self, progress: Progress) -> None:
        view = self.views.get(progress.child_id)
        if view is None:
            return
        view.phase = progress.phase.value
        view.operations[progress.operation_id] = progress.downloaded
        view.downloaded = progress.downloaded
        view.bytes_total = sum(view.operations.values())
        if progress.phase is Phase.FAILED:
            view.reason = progress.reason

    @property
    def bytes_to_children(self) -> int:
        return sum(view.bytes_total for view in self.views.values())


# --- the broker ---------------------------------------------------------------------------

# where Debian puts mosquitto, often not on a user's PATH
MOSQUITTO_DIRS: tuple[str, ...] = ("/usr/sbin", "/usr/local/sbin")
EMBEDDED_BROKER = "amqtt"  # the `demo-broker` extra
_GET_MOSQUITTO = "sudo apt-get install mosquitto; `make demo` does it when run as root"
_GET_EMBEDDED = (
    "pip install 'tedge-firmware[demo-broker]'; `make demo` does it when mosquitto cannot be "
    "installed"
)
_NO_BROKER: dict[BrokerChoice, str] = {
    "auto": "no MQTT broker: mosquitto was not found and the embedded broker is not "
    f"installed: install mosquitto ({_GET_MOSQUITTO}) or the embedded broker ({_GET_EMBEDDED})",
    "mosquitto": f"--broker mosquitto: mosquitto was not found: install it ({_GET_MOSQUITTO})",
    "embedded": "--broker embedded: the embedded broker is not installed: "
    f"install it ({_GET_EMBEDDED})",
}


def find_mosquitto(path: str | None = None) -> str | None:
    """The mosquitto binary on `path` (default: PATH, then MOSQUITTO_DIRS); None when none."""
    if path is None:
        path = os.pathsep.join([os.environ.get("PATH", os.defpath), *MOSQUITTO_DIRS])
    return shutil.which("mosquitto", path=path)


def embedded_broker_installed() -> bool:
    """Whether amqtt can be imported; not imported here: it runs in a process of its own."""
    return importlib.util.find_spec(EMBEDDED_BROKER) is not None


@dataclass(frozen=True)
class DemoBroker:
    """The broker the demo runs: Mosquitto (its binary), or the embedded one (amqtt)."""

    kind: BrokerKind
    mosquitto: str | None = None

    @property
    def label(self) -> str:
        return "mosquitto" if self.kind == "mosquitto" else "embedded broker (amqtt)"

    def process(self, home: Path) -> tuple[ChildProcess, int]:
        if self.kind == "embedded":
            return embedded_broker_process(home)
        assert self.mosquitto is not None
        return mosquitto_process(self.mosquitto, home, max_queued=100_000)


def choose_broker(choice: BrokerChoice, mosquitto: str | None, embedded: bool) -> DemoBroker:
    """`auto` prefers Mosquitto; ConfigError (one line, saying how to get one) when none fits."""
    if choice != "embedded" and mosquitto is not None:
        return DemoBroker("mosquitto", mosquitto)
    if choice != "mosquitto" and embedded:
        return DemoBroker("embedded")
    raise ConfigError(_NO_BROKER[choice])


def find_broker(choice: BrokerChoice) -> DemoBroker:
    return choose_broker(choice, find_mosquitto(), embedded_broker_installed())


def embedded_broker_process(home: Path) -> tuple[ChildProcess, int]:
    port = free_port()
    argv = [
        sys.executable, "-m", "tedge_firmware.demo.embedded_broker",
        "--host", HOST, "--port", str(port), "--log-file", str(home / "embedded-broker.log"),
    ]  # fmt: skip
    return ChildProcess("embedded broker", argv, home / "embedded-broker.out"), port


def write_gateway_config(config_dir: Path, data: Path, mqtt_port: int, http_port: int) -> None:
    """The gateway's tedge.toml: the simulator is the tenant (JWT for its host only)."""
    (config_dir / "operations" / "c8y").mkdir(parents=True, exist_ok=True)
    write_local_config(
        config_dir,
        device_id=GATEWAY_ID,
        tenant=HOST,
        mqtt_port=mqtt_port,
        http_port=http_port,
        data_path=data,
        child_timeout=600,
    )


def gateway_process(config_dir: Path, log_path: Path) -> ChildProcess:
    argv = [sys.executable, "-m", "tedge_firmware", "run", "--config-dir", str(config_dir)]
    return ChildProcess("tedge-firmware run", argv, log_path)


def make_firmware(path: Path, size: int) -> str:
    """`size` random bytes (incompressible, like firmware); their SHA-256."""
    digest = hashlib.sha256()
    with path.open("wb") as stream:
        left = size
        while left:
            block = os.urandom(min(4 << 20, left))
            digest.update(block)
            stream.write(block)
            left -= len(block)
    return digest.hexdigest()


def peak_rss_kib(pid: int) -> int | None:
    """VmHWM of a running process (Linux), None when unknown."""
    with contextlib.suppress(OSError, ValueError):
        for text in Path(f"/proc/{pid}/status").read_text().splitlines():
            if text.startswith("VmHWM:"):
                return int(text.split()[1])
    return None


# --- the result --------------------------------------------------------------------------


@dataclass(frozen=True)
class ChildResult:
    child_id: str
    role: str
    status: str  # SUCCESSFUL, FAILED, or the last status when the demo ran out of time
    seconds: float | None
    attempts: int  # Cumulocity operations created for this child
    bytes: int  # bytes the child fetched from the gateway
    reason: str | None

    @property
    def as_expected(self) -> bool:
        if self.role == "fail":
            return self.status == "FAILED" and self.reason == FAIL_REASON
        return self.status == "SUCCESSFUL"


@dataclass(frozen=True)
class DemoResult:
    children: list[ChildResult]
    size: int
    seconds: float
    cloud_downloads: int  # GETs of the binary that started at byte 0
    cloud_requests: int
    cloud_bytes: int
    bytes_to_children: int
    protocol_errors: list[str]
    gateway_peak_rss_kib: int | None
    installed: int  # children whose inventory shows the new firmware

    @property
    def ok(self) -> bool:
        return (
            all(child.as_expected for child in self.children)
            and self.cloud_downloads == 1
            and not self.protocol_errors
        )

    def count(self, status: str) -> int:
        return sum(1 for child in self.children if child.status == status)


# --- the rollout -------------------------------------------------------------------------


class Rollout:
    """Drives the bulk operation and its retries; tells what each child's state is."""

    def __init__(self, sim: C8ySimulator, fleet: Fleet, url: str) -> None:
        self.sim = sim
        self.fleet = fleet
        self.url = url
        self.retried: set[str] = set()

    def start(self, ramp: float) -> None:
        self.sim.bulk_firmware_operation(
            list(self.fleet.views), FIRMWARE_NAME, FIRMWARE_VERSION, self.url, ramp_seconds=ramp
        )

    def retry_flaky(self) -> None:
        """A flaky child whose operation failed gets one new operation (as a person would)."""
        for child, view in self.fleet.views.items():
            if view.role != "flaky" or child in self.retried:
                continue
            last = self.last(child)
            if last is not None and last.status is OperationStatus.FAILED:
                self.retried.add(child)
                self.sim.create_firmware_operation(child, FIRMWARE_NAME, FIRMWARE_VERSION, self.url)

    def last(self, child: str) -> Operation | None:
        operations = self.sim.operations_of(child)
        return operations[-1] if operations else None

    def settled(self, child: str) -> bool:
        last = self.last(child)
        if last is None or not last.status.final:
            return False
        role = self.fleet.views[child].role
        retry_due = role == "flaky" and child not in self.retried
        return not (retry_due and last.status is OperationStatus.FAILED)

    def done(self) -> bool:
        return all(self.settled(child) for child in self.fleet.views)

    def result_of(self, child: str) -> ChildResult:
        view = self.fleet.views[child]
        operations = self.sim.operations_of(child)
        last = operations[-1] if operations else None
        seconds = None
        if last is not None and last.status.final and last.history:
            seconds = last.history[-1].at - operations[0].created
        return ChildResult(
            child_id=child,
            role=view.role,
            status=last.status.value if last is not None else "NOT CREATED",
            seconds=seconds,
            attempts=len(operations),
            bytes=view.bytes_total,
            reason=last.failure_reason if last is not None else None,
        )


def live_table(rollout: Rollout, size: int, started: float) -> Table:
    views = list(rollout.fleet.views.values())
    finished = sum(1 for view in views if rollout.settled(view.child_id))
    table = Table(
        title=f"firmware {FIRMWARE_NAME} {FIRMWARE_VERSION} ({format_size(size)}) to "
        f"{len(views)} children: {finished} done, {time.monotonic() - started:.1f} s",
        title_justify="left",
    )
    for column in ("child", "role", "Cumulocity", "connector", "downloaded", "attempts", "time"):
        numeric = column in ("downloaded", "attempts")
        table.add_column(column, justify="right" if numeric else "left")
    # the unfinished children first: with many children those are the interesting ones
    ordered = sorted(views, key=lambda view: rollout.settled(view.child_id))
    for view in ordered[:MAX_LIVE_ROWS]:
        result = rollout.result_of(view.child_id)
        percent = f"{min(view.downloaded, size) * 100 // size}%" if size else "-"
        table.add_row(
            view.child_id,
            view.role,
            _colour(result.status),
            view.phase,
            percent,
            str(result.attempts),
            _elapsed(rollout, view.child_id, result),
        )
    if len(views) > MAX_LIVE_ROWS:
        table.caption = f"(+{len(views) - MAX_LIVE_ROWS} more children)"
    return table


def _elapsed(rollout: Rollout, child: str, result: ChildResult) -> str:
    """The time an ended child took; for a running one, the time so far (dimmed)."""
    if result.seconds is not None:
        return f"{result.seconds:.1f} s"
    operations = rollout.sim.operations_of(child)
    if not operations:
        return ""
    return f"[dim]{time.time() - operations[0].created:.1f} s[/]"  # the simulator's clock


def _colour(status: str) -> str:
    colour = {"SUCCESSFUL": "green", "FAILED": "red", "EXECUTING": "yellow"}.get(status)
    return f"[{colour}]{status}[/]" if colour else status


class PlainReporter:
    """Without a terminal: one line per status change of a child, in the order they happen."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.seen: dict[str, tuple[str, int]] = {}

    def update(self, rollout: Rollout) -> None:
        for child in rollout.fleet.views:
            result = rollout.result_of(child)
            state = (result.status, result.attempts)
            if self.seen.get(child) == state or result.status == "NOT CREATED":
                continue
            self.seen[child] = state
            detail = f" ({result.reason})" if result.reason and result.status == "FAILED" else ""
            took = f" after {result.seconds:.1f} s" if result.seconds is not None else ""
            self.console.print(
                f"{child}: {result.status}{took}, attempt {result.attempts}{detail}",
                highlight=False,
                markup=False,
            )


async def follow(
    rollout: Rollout,
    gateway: ChildProcess,
    console: Console,
    live: bool,
    size: int,
    limit_s: float,
) -> bool:
    """Show progress until every child settled (True) or the timeout (False)."""
    started = time.monotonic()
    plain = PlainReporter(console)

    async def loop(refresh: Live | None) -> bool:
        try:
            async with asyncio.timeout(limit_s):
                while True:
                    if not gateway.running:
                        raise TedgeFirmwareError(f"the gateway exited:\n{gateway.tail()}")
                    if refresh is not None:
                        refresh.update(live_table(rollout, size, started))
                    else:
                        plain.update(rollout)  # before the retry: its failure is shown too
                    rollout.retry_flaky()
                    if rollout.done():
                        return True
                    with contextlib.suppress(TimeoutError):  # a change, or a display refresh
                        await rollout.sim.wait_until(lambda: False, _REFRESH_S)
        except TimeoutError:
            return False

    if not live:
        return await loop(None)
    with Live(live_table(rollout, size, started), console=console, refresh_per_second=8) as view:
        return await loop(view)


def summary_table(result: DemoResult) -> Table:
    table = Table(title="summary", title_justify="left")
    for column in ("child", "role", "status", "time", "attempts", "bytes", "reason"):
        numeric = column in ("time", "attempts", "bytes")
        table.add_column(column, justify="right" if numeric else "left")
    for child in result.children:
        mark = "" if child.as_expected else " (unexpected)"
        table.add_row(
            child.child_id,
            child.role,
            _colour(child.status) + mark,
            f"{child.seconds:.1f} s" if child.seconds is not None else "-",
            str(child.attempts),
            format_size(child.bytes),
            child.reason or "",
        )
    return table


def print_summary(console: Console, result: DemoResult) -> None:
    console.print(summary_table(result))
    should = sum(1 for child in result.children if child.role != "fail")
    succeeded = sum(1 for c in result.children if c.role != "fail" and c.status == "SUCCESSFUL")
    failed_on_purpose = sum(1 for c in result.children if c.role == "fail" and c.as_expected)
    rss = f"{result.gateway_peak_rss_kib / 1024:.0f} MiB" if result.gateway_peak_rss_kib else "?"
    lines = [
        f"successful: {succeeded} of {should} that should succeed; "
        f"failed on purpose: {failed_on_purpose} of {len(result.children) - should}",
        f"firmware installed (Cumulocity inventory): {result.installed} children",
        f"cloud downloads: {result.cloud_downloads} ({result.cloud_requests} requests, "
        f"{format_size(result.cloud_bytes)} from the cloud for a {format_size(result.size)} "
        "firmware)",
        f"bytes served to children: {format_size(result.bytes_to_children)}",
        f"protocol errors (what Cumulocity would refuse): {len(result.protocol_errors)}",
        f"gateway peak RSS: {rss}; rollout took {result.seconds:.1f} s",
    ]
    for text in lines:
        console.print(text, highlight=False, markup=False)
    for error in result.protocol_errors:
        console.print(f"  {error}", highlight=False, markup=False)
    verdict = "demo OK" if result.ok else "demo FAILED: see above"
    console.print(f"[bold {'green' if result.ok else 'red'}]{verdict}[/]")


def collect(rollout: Rollout, size: int, seconds: float, rss: int | None, name: str) -> DemoResult:
    sim = rollout.sim
    stats = sim.stats.files.get(name)
    statuses = stats.statuses if stats is not None else ()
    installed = sum(
        1
        for child in rollout.fleet.views
        if (device := sim.device(child)) is not None
        and device.firmware is not None
        and device.firmware.version == FIRMWARE_VERSION
    )
    return DemoResult(
        children=[rollout.result_of(child) for child in rollout.fleet.views],
        size=size,
        seconds=seconds,
        cloud_downloads=statuses.count(200),
        cloud_requests=stats.requests if stats is not None else 0,
        cloud_bytes=stats.bytes_served if stats is not None else 0,
        bytes_to_children=rollout.fleet.bytes_to_children,
        protocol_errors=[str(error) for error in sim.errors],
        gateway_peak_rss_kib=rss,
        installed=installed,
    )


@contextlib.contextmanager
def demo_directory(options: DemoOptions) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="tedge-firmware-demo-", dir=options.workdir))
    try:
        yield path
    finally:
        if not options.keep:
            shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def logging_to(path: Path) -> Iterator[None]:
    """The in-process logs (simulator, connector) go to a file: the console is the view."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    root.handlers = [handler]
    root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.handlers, level = saved
        root.setLevel(level)
        handler.close()


async def run_demo(options: DemoOptions, console: Console) -> DemoResult:
    """Set up the stack, roll the firmware out, return what happened; everything is stopped."""
    live = console.is_terminal if options.live is None else options.live
    broker = find_broker(options.broker)  # before anything is created: no broker, no demo
    with demo_directory(options) as home, logging_to(home / "demo.log"):
        console.print(f"demo directory: {home}", highlight=False, markup=False)
        try:
            return await _run_stack(options, console, live, home, broker)
        except BaseException:
            if options.keep:
                console.print(f"logs kept in {home}", highlight=False, markup=False)
            raise
        finally:
            kill_leftovers()


async def _run_stack(
    options: DemoOptions, console: Console, live: bool, home: Path, demo_broker: DemoBroker
) -> DemoResult:
    broker, mqtt_port = demo_broker.process(home)
    config_dir, data = home / "etc-tedge", home / "data"
    write_gateway_config(config_dir, data, mqtt_port, free_port())
    gateway = gateway_process(config_dir, home / "gateway.log")
    fleet = Fleet(child_roles(options), options.apply_seconds)
    firmware_file = home / "firmware.bin"
    await asyncio.to_thread(make_firmware, firmware_file, options.size)
    name = f"{FIRMWARE_NAME}-{FIRMWARE_VERSION}.bin"
    async with running(broker, mqtt_port):
        label = f"{demo_broker.label} on {HOST}:{mqtt_port}"
        console.print(label, highlight=False, markup=False)
        simulator = C8ySimulator(
            mqtt_port=mqtt_port, gateway_id=GATEWAY_ID, require_token=True, control_api=False
        )
        async with simulator as sim, running(gateway):
            cut = FileFaults(cut_after=options.size // 2, cut_times=options.cloud_cuts)
            url = sim.add_file(name, firmware_file, faults=cut if options.cloud_cuts else None)
            connector = Connector(
                *fleet.views,
                apply=fleet.apply,
                work_dir=home / "children",
                broker=BrokerSettings(host=HOST, port=mqtt_port, client_id="demo-children"),
                download=DownloadSettings(parallel=8, progress_interval=0.2),
                on_progress=fleet.on_progress,
                register=True,
            )
            async with _serving(connector):
                return await _rollout(options, console, live, sim, fleet, gateway, url, name)


@contextlib.asynccontextmanager
async def _serving(connector: Connector) -> AsyncIterator[None]:
    task = asyncio.create_task(connector.run(), name="demo-children")
    try:
        async with asyncio.timeout(30):
            await connector.wait_connected()
        yield
    finally:
        connector.stop()
        with contextlib.suppress(Exception):
            await asyncio.shield(task)


async def _rollout(
    options: DemoOptions,
    console: Console,
    live: bool,
    sim: C8ySimulator,
    fleet: Fleet,
    gateway: ChildProcess,
    url: str,
    name: str,
) -> DemoResult:
    children = list(fleet.views)

    def registered() -> bool:
        devices = [sim.device(child) for child in children]
        return all(device is not None and device.supports(FIRMWARE) for device in devices)

    try:
        await sim.wait_until(registered, timeout=60)
    except TimeoutError:
        message = f"the children were not registered in time:\n{gateway.tail()}"
        raise TedgeFirmwareError(message) from None
    console.print(
        f"{len(children)} children registered with c8y_Firmware; bulk operation: "
        f"{FIRMWARE_NAME} {FIRMWARE_VERSION} ({format_size(options.size)}), "
        f"ramp {options.ramp:g} s",
        highlight=False,
        markup=False,
    )
    rollout = Rollout(sim, fleet, url)
    started = time.monotonic()
    rollout.start(options.ramp)
    finished = await follow(rollout, gateway, console, live, options.size, options.timeout)
    if not finished:
        console.print(f"timed out after {options.timeout:g} s", highlight=False, markup=False)
    seconds = time.monotonic() - started
    return collect(rollout, options.size, seconds, peak_rss_kib(gateway.pid), name)


def main(options: DemoOptions, console: Console | None = None) -> int:
    """Run the demo; 0 when every child that should succeed did (and the rest as planned)."""
    # without a terminal (CI, a pipe) rich would wrap at 80 columns
    console = console or Console(width=None if sys.stdout.isatty() else 120)
    try:
        result = asyncio.run(_main_with_signals(options, console))
    except KeyboardInterrupt:
        console.print("interrupted: every process the demo started is stopped")
        return 130
    except TedgeFirmwareError as error:  # the stack could not start or went away
        # one line, however long: a terminal wraps it, a log keeps it whole
        console.print(f"demo error: {error}", highlight=False, markup=False, soft_wrap=True)
        return 2
    finally:
        kill_leftovers()
    if result is None:
        console.print("terminated: every process the demo started is stopped")
        return 143
    print_summary(console, result)
    return 0 if result.ok else 1


async def _main_with_signals(options: DemoOptions, console: Console) -> DemoResult | None:
    """SIGTERM cancels the demo like Ctrl-C does: the finally blocks stop every process.

    Returns None when SIGTERM stopped it.
    """
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    terminated = False

    def on_sigterm() -> None:
        nonlocal terminated
        terminated = True
        task.cancel()

    loop.add_signal_handler(signal.SIGTERM, on_sigterm)
    try:
        return await run_demo(options, console)
    except asyncio.CancelledError:
        if terminated:
            return None
        raise
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
