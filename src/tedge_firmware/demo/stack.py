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
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

from rich.console import Console

from tedge_firmware.connector import (
    BrokerSettings,
    Connector,
    DownloadSettings,
)
from tedge_firmware.core.units import format_size
from tedge_firmware.demo.broker import DemoBroker, find_broker
from tedge_firmware.demo.children import Fleet, child_protocols, child_roles
from tedge_firmware.demo.options import (
    FIRMWARE_NAME,
    FIRMWARE_VERSION,
    GATEWAY_ID,
    SECURE_NEEDS_MOSQUITTO,
    DemoOptions,
    cloud_id,
)
from tedge_firmware.demo.processes import (
    HOST,
    ChildProcess,
    free_port,
    kill_leftovers,
    running,
)
from tedge_firmware.demo.rollout import DemoResult, Rollout, collect
from tedge_firmware.demo.secure import LockedSite
from tedge_firmware.demo.view import follow, print_summary
from tedge_firmware.errors import ConfigError, TedgeFirmwareError
from tedge_firmware.shell.config_edit import write_local_config
from tedge_firmware.sim import FIRMWARE, C8ySimulator, FileFaults


def write_gateway_config(
    config_dir: Path, data: Path, mqtt_port: int, http_port: int, extra: str = ""
) -> None:
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
        extra=extra,
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
    if options.secure and broker.kind != "mosquitto":
        raise ConfigError(SECURE_NEEDS_MOSQUITTO)
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
    roles = child_roles(options)
    site = LockedSite.create(home / "certs", GATEWAY_ID, roles) if options.secure else None
    tls_port = free_port()
    broker, plain_port = demo_broker.process(
        home, site.mosquitto_lines(tls_port, HOST) if site else ()
    )
    mqtt_port = tls_port if site else plain_port  # a locked site: everyone over TLS
    config_dir, data = home / "etc-tedge", home / "data"
    extra = site.gateway_toml() if site else ""
    write_gateway_config(config_dir, data, mqtt_port, free_port(), extra)
    gateway = gateway_process(config_dir, home / "gateway.log")
    fleet = Fleet(roles, options.apply_seconds, child_protocols(options, list(roles)))
    firmware_file = home / "firmware.bin"
    await asyncio.to_thread(make_firmware, firmware_file, options.size)
    name = f"{FIRMWARE_NAME}-{FIRMWARE_VERSION}.bin"
    async with running(broker, plain_port):
        console.print(_broker_label(demo_broker, mqtt_port, site), highlight=False, markup=False)
        simulator = C8ySimulator(
            mqtt_port=mqtt_port,
            mqtt_auth=site.gateway_mqtt_auth() if site else None,  # the bridge is the gateway's
            gateway_id=GATEWAY_ID,
            require_token=True,
            control_api=False,
        )
        async with simulator as sim, running(gateway):
            cut = FileFaults(cut_after=options.size // 2, cut_times=options.cloud_cuts)
            url = sim.add_file(name, firmware_file, faults=cut if options.cloud_cuts else None)
            connectors = _connectors(home, fleet, mqtt_port, site)
            async with contextlib.AsyncExitStack() as serving:
                for connector in connectors:
                    await serving.enter_async_context(_serving(connector))
                return await _rollout(options, console, live, sim, fleet, gateway, url, name)


def _broker_label(demo_broker: DemoBroker, port: int, site: LockedSite | None) -> str:
    label = f"{demo_broker.label} on {HOST}:{port}"
    if site is None:
        return label
    return (
        f"{label} (TLS listener: client certificates, ACL)\n"
        f"firmware over HTTPS, client certificates required; certificates in {site.directory}"
    )


def _connectors(
    home: Path, fleet: Fleet, mqtt_port: int, site: LockedSite | None
) -> list[Connector]:
    """One connector per protocol serving its children; on a locked site one per child, each
    with its own certificate (the ACL lets a certificate act for its own child only)."""
    download = DownloadSettings(parallel=8, progress_interval=0.2)

    def connector(
        children: list[str], protocol: str, broker: BrokerSettings, work: Path
    ) -> Connector:
        return Connector(
            *children,
            apply=fleet.apply,
            work_dir=work,
            broker=broker,
            download=site.child_download(children[0], download) if site else download,
            on_progress=fleet.on_progress,
            register=True,  # over te/: the gateway registers them as thin-edge would
            protocol=protocol,
        )

    connectors: list[Connector] = []
    for protocol in ("legacy", "te"):
        children, work = fleet.speaking(protocol), home / f"children-{protocol}"
        if site is None and children:
            broker = BrokerSettings(
                host=HOST, port=mqtt_port, client_id=f"demo-children-{protocol}"
            )
            connectors.append(connector(children, protocol, broker, work))
        elif site is not None:
            connectors += [
                connector(
                    [child], protocol, site.child_broker(child, HOST, mqtt_port), work / child
                )
                for child in children
            ]
    return connectors


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
        devices = [sim.device(cloud_id(child)) for child in children]
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
