"""`tedge-firmware c8y-sim`: a Cumulocity simulator on the local broker, for trials and demos.

    tedge-firmware c8y-sim serve [--config-dir DIR | --mqtt-host H --mqtt-port P]
        [--gateway-id ID] [--http-host H] [--http-port 8080] [--public-host H]
        [--files-dir DIR] [--require-token] [--no-live] [--debug]
    tedge-firmware c8y-sim update --child C [--child C2 ... --ramp S] (--file F | --url U)
        [--name N] [--version V] [--wait S] [--control URL]
    tedge-firmware c8y-sim status [--json] [--control URL]

`serve` runs the simulator in the foreground and shows its operations live (a table on a
terminal, one line per change otherwise). `update` and `status` talk to that running simulator
over its control API (`/sim/...` on the simulator's HTTP port, answered for local clients
only; `--control`, default `http://127.0.0.1:8080`, or `C8Y_SIM_URL`). `update --file`
hands the file's path to the simulator, which serves it from where it lies (both run on the
same machine); with several `--child` it creates a bulk operation.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, NoReturn
from urllib.parse import urlsplit

import click

from tedge_firmware.cli.support import config_for_broker, fail, run_service
from tedge_firmware.core import topics
from tedge_firmware.core.config import DEFAULT_CONFIG_DIR, MqttAuth, TedgeConfig
from tedge_firmware.gateway.lifecycle import run_until_signal
from tedge_firmware.gateway.logs import configure_logging

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

    from tedge_firmware.sim import C8ySimulator

DEFAULT_HTTP_PORT = 8080
DEFAULT_CONTROL = f"http://127.0.0.1:{DEFAULT_HTTP_PORT}"
CONTROL_ENV = "C8Y_SIM_URL"
_REFRESH_S = 1.0  # the live view also redraws this often, for the ages
_SHOWN_OPERATIONS = 25
_SHOWN_ERRORS = 5
_STATUS_STYLE = {
    "PENDING": "yellow",
    "EXECUTING": "cyan",
    "SUCCESSFUL": "green",
    "FAILED": "bold red",
}

control_option = click.option(
    "--control",
    default=DEFAULT_CONTROL,
    show_default=True,
    envvar=CONTROL_ENV,
    help=f"URL of the running simulator (or ${CONTROL_ENV}).",
)


@click.group("c8y-sim", short_help="A Cumulocity simulator on the local broker.")
def c8y_sim_group() -> None:
    """A Cumulocity simulator on the local broker: sends 515s, answers JWT requests, serves
    firmware binaries (with faults on demand) and records every operation's status."""


# --- serve ---------------------------------------------------------------------------------------


@c8y_sim_group.command("serve")
@click.option(
    "--config-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help=f"Directory of tedge.toml, for the broker and device.id (default: {DEFAULT_CONFIG_DIR}).",
)
@click.option("--mqtt-host", default=None, help="Broker host (instead of tedge.toml).")
@click.option(
    "--mqtt-port", type=click.IntRange(1, 65535), default=None, help="Broker port (default 1883)."
)
@click.option("--gateway-id", default=None, help="The gateway's id (default: device.id).")
@click.option("--http-host", default="127.0.0.1", show_default=True, help="HTTP bind address.")
@click.option(
    "--http-port",
    type=click.IntRange(0, 65535),
    default=DEFAULT_HTTP_PORT,
    show_default=True,
    help="HTTP port for binaries and the control API (0: any free port).",
)
@click.option("--public-host", default=None, help="Host put into binary URLs (default: bind).")
@click.option(
    "--files-dir",
    type=click.Path(path_type=Path, file_okay=False, exists=True),
    default=None,
    help="Serve every file of this directory at /inventory/binaries/<name>.",
)
@click.option(
    "--require-token", is_flag=True, help="Binaries need the JWT the simulator hands out."
)
@click.option(
    "--json-operations",
    is_flag=True,
    help="Deliver each operation in its JSON form too (c8y/devicecontrol/notifications), as "
    "Cumulocity does, and take statuses by id (504/505/506).",
)
@click.option(
    "--model-thin-edge-mapper",
    is_flag=True,
    help="Also run a MODEL (not thin-edge) of thin-edge's mapper for te/ children: their "
    "registration, te/ commands from JSON operations, statuses by id, twin, clear. Implies "
    "--json-operations.",
)
@click.option("--live/--no-live", default=True, help="Live table on a terminal (default).")
@click.option("--debug", is_flag=True, help="Log debug messages.")
@click.pass_context
def serve_command(
    ctx: click.Context,
    config_dir: Path | None,
    mqtt_host: str | None,
    mqtt_port: int | None,
    gateway_id: str | None,
    http_host: str,
    http_port: int,
    public_host: str | None,
    files_dir: Path | None,
    require_token: bool,
    json_operations: bool,
    model_thin_edge_mapper: bool,
    live: bool,
    debug: bool,
) -> None:
    """Run the simulator in the foreground (Ctrl-C stops it)."""
    from tedge_firmware.shell.mqtt import MqttSettings
    from tedge_firmware.sim import DEFAULT_GATEWAY_ID, C8ySimulator, MapperModelRunner

    configure_logging(debug)
    config = config_for_broker(ctx, config_dir, mqtt_host, mqtt_port)
    host, port, auth = _broker(config, mqtt_host, mqtt_port)
    gateway = gateway_id or (config.device_id if config is not None else None)
    try:
        sim = C8ySimulator(
            mqtt_host=host,
            mqtt_port=port,
            mqtt_auth=auth,
            gateway_id=gateway or DEFAULT_GATEWAY_ID,
            http_host=http_host,
            http_port=http_port,
            public_host=public_host,
            files_dir=files_dir,
            require_token=require_token,
            json_operations=json_operations or model_thin_edge_mapper,
        )
        mapper = None
        if model_thin_edge_mapper:
            settings = MqttSettings(
                host=host, port=port, client_id="c8y-sim-mapper-model", auth=auth
            )
            mapper = MapperModelRunner(settings, sim.gateway_id)
    except ValueError as error:
        fail(str(error))

    async def serve(stop: asyncio.Event) -> None:
        await sim.start(connect_timeout=None)  # the broker may come later: we keep trying
        if mapper is not None:
            await mapper.start(connect_timeout=None)
        try:
            click.echo(
                f"c8y-sim: gateway {sim.gateway_id}, broker {sim.broker_address}, "
                f"binaries {sim.base_url}/inventory/binaries/, control {sim.base_url}/sim/",
                err=True,
            )
            await _show(sim, stop, live)
        finally:
            if mapper is not None:
                await mapper.stop()
            await sim.stop()

    run_service(lambda: run_until_signal(serve))


def _broker(
    config: TedgeConfig | None, host: str | None, port: int | None
) -> tuple[str, int, MqttAuth | None]:
    if config is None:
        return host or "localhost", port or 1883, None
    return host or config.mqtt_host, port or config.mqtt_port, config.mqtt_auth


async def _show(sim: C8ySimulator, stop: asyncio.Event, live: bool) -> None:
    from rich.console import Console
    from rich.live import Live

    console = Console()
    if not (live and console.is_terminal):
        printer = _ChangePrinter()
        while not stop.is_set():
            printer.print_changes(sim)
            await _next_change(sim, stop)
        return
    with _logs_above(console), Live(_render(sim), console=console, auto_refresh=False) as view:
        while not stop.is_set():
            await _next_change(sim, stop)
            view.update(_render(sim), refresh=True)


@contextlib.contextmanager
def _logs_above(console: Console) -> Iterator[None]:
    """While the live table is shown, log lines go through rich: above it, not through it."""
    from rich.logging import RichHandler

    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers = [RichHandler(console=console, show_path=False, rich_tracebacks=False)]
    try:
        yield
    finally:
        root.handlers = saved


async def _next_change(sim: C8ySimulator, stop: asyncio.Event) -> None:
    """Return after the next change of the tenant, on stop, or after _REFRESH_S."""
    seen = sim.changes
    waiters = [
        asyncio.create_task(sim.wait_until(lambda: sim.changes != seen or None, _REFRESH_S)),
        asyncio.create_task(stop.wait()),
    ]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)


class _ChangePrinter:
    """One line per new device, operation status and error, for logs and pipes."""

    def __init__(self) -> None:
        self._devices: dict[str, tuple[str, ...]] = {}
        self._statuses: dict[str, str] = {}
        self._errors = 0
        self._jwt = 0

    def print_changes(self, sim: C8ySimulator) -> None:
        for device in sim.inventory.values():
            if self._devices.get(device.id) != device.supported_operations:
                self._devices[device.id] = device.supported_operations
                ops = ",".join(device.supported_operations) or "-"
                click.echo(f"device {device.id} (parent {device.parent}): operations {ops}")
        for op in sim.operations:
            if self._statuses.get(op.id) != op.status.value:
                self._statuses[op.id] = op.status.value
                reason = f" {op.failure_reason!r}" if op.failure_reason else ""
                what = f"operation {op.id} {op.device} {op.name} {op.version}"
                click.echo(f"{what}: {op.status.value}{reason}")
        for violation in sim.errors[self._errors :]:
            click.echo(f"error: {violation}")
        self._errors = len(sim.errors)
        if sim.stats.jwt_requests != self._jwt:
            self._jwt = sim.stats.jwt_requests
            click.echo(f"JWT requests answered: {self._jwt}")
        sys.stdout.flush()


def _render(sim: C8ySimulator) -> RenderableType:
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    children = [device for device in sim.inventory.values() if device.parent is not None]
    stats = sim.stats
    header = Text(
        f"c8y-sim  gateway {sim.gateway_id}  broker {sim.broker_address} "
        f"({'connected' if sim.connected else 'not connected'})  children {len(children)}  "
        f"JWT {stats.jwt_requests}  served {stats.bytes_served:,} B  errors {len(sim.errors)}"
    )
    table = Table(expand=True)
    for column in ("op", "device", "firmware", "status", "reason", "sent", "age"):
        table.add_column(column)
    now = time.time()
    for op in sim.operations[-_SHOWN_OPERATIONS:]:
        ended = op.history[-1].at if op.status.final else now
        table.add_row(
            op.id,
            op.device,
            f"{op.name} {op.version}",
            Text(op.status.value, style=_STATUS_STYLE[op.status.value]),
            op.failure_reason or "",
            str(op.deliveries),
            f"{ended - op.created:.1f}s",
        )
    parts: list[RenderableType] = [header, table]
    for bulk in sim.bulks:
        progress = sim.bulk_progress(bulk.id)
        parts.append(
            Text(
                f"{bulk.id} {bulk.name} {bulk.version}: {progress.status.value}  "
                f"pending {progress.pending} executing {progress.executing} "
                f"successful {progress.successful} failed {progress.failed} "
                f"refused {progress.refused} of {progress.total}"
            )
        )
    for violation in sim.errors[-_SHOWN_ERRORS:]:
        parts.append(Text(f"error: {violation}", style="red"))
    return Group(*parts)


# --- update and status ---------------------------------------------------------------------------


@c8y_sim_group.command("update", short_help="Create a c8y_Firmware operation (or a bulk one).")
@click.option("--child", "children", multiple=True, required=True, help="Device id (repeatable).")
@click.option(
    "--file",
    "file",
    type=click.Path(path_type=Path, exists=True, dir_okay=False, resolve_path=True),
    default=None,
    help="Firmware file to serve (the simulator serves it from this path).",
)
@click.option("--url", default=None, help="Firmware URL to send instead of a file.")
@click.option("--name", default=None, help="Firmware name (default: the file or URL name).")
@click.option("--version", default=None, help="Firmware version (default: the file's SHA-256).")
@click.option(
    "--ramp",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="Seconds between the operations of a bulk operation (several --child).",
)
@click.option(
    "--wait",
    type=click.FloatRange(min=0),
    default=0.0,
    help="Wait up to this many seconds for the operation's end (one --child).",
)
@control_option
def update_command(
    children: tuple[str, ...],
    file: Path | None,
    url: str | None,
    name: str | None,
    version: str | None,
    ramp: float,
    wait: float,
    control: str,
) -> None:
    """Create a c8y_Firmware operation (a bulk operation for several children)."""
    for child in children:
        problem = topics.child_id_problem(child)
        if problem is not None:
            raise click.BadParameter(problem, param_hint="--child")
    if (file is None) == (url is None):
        raise click.UsageError("give either --file or --url")
    if wait and len(children) > 1:
        raise click.UsageError("--wait works with one --child; follow a bulk with `status`")
    body: dict[str, Any] = {"devices": list(dict.fromkeys(children)), "ramp": ramp}
    if file is not None:
        body.update(path=str(file), name=name or file.stem, version=version or _digest(file))
    else:
        assert url is not None
        if version is None:
            raise click.UsageError("--url needs --version")
        body.update(url=url, name=name or PurePosixPath(urlsplit(url).path).stem or "firmware")
        body["version"] = version
    status, answer = _call(control, "POST", "/sim/operations", body)
    if status not in (201, 202):
        fail(str(answer.get("error", answer)))
    if "bulk" in answer:
        bulk = answer["bulk"]
        click.echo(f"{bulk['id']}: {bulk['total']} device(s), {body['name']} {body['version']}")
        return
    operation = answer["operations"][0]
    click.echo(_operation_line(operation))
    if wait:
        _wait_and_exit(control, operation["id"], wait)


def _wait_and_exit(control: str, op_id: str, wait: float) -> NoReturn:
    status, operation = _call(control, "GET", f"/sim/operations/{op_id}?wait={wait:g}", None, wait)
    if status != 200:
        fail(str(operation.get("error", operation)))
    click.echo(_operation_line(operation))
    sys.exit({"SUCCESSFUL": 0, "FAILED": 1}.get(operation["status"], 2))


@c8y_sim_group.command("status")
@click.option("--json", "as_json", is_flag=True, help="Everything, as JSON.")
@control_option
def status_command(as_json: bool, control: str) -> None:
    """Show the running simulator's inventory, operations and errors."""
    status, answer = _call(control, "GET", "/sim/status", None)
    if status != 200:
        fail(str(answer.get("error", answer)))
    if as_json:
        click.echo(json.dumps(answer, indent=2, sort_keys=True))
        return
    click.echo(f"gateway {answer['gateway']}, broker {answer['broker']}")
    for device in answer["inventory"]:
        firmware = device["firmware"]
        installed = f"{firmware['name']} {firmware['version']}" if firmware else "-"
        ops = ",".join(device["supported_operations"]) or "-"
        click.echo(f"device {device['id']}: operations {ops}; firmware {installed}")
    for operation in answer["operations"]:
        click.echo(_operation_line(operation))
    for bulk in answer["bulks"]:
        click.echo(
            f"{bulk['id']}: {bulk['status']} (successful {bulk['successful']}, "
            f"failed {bulk['failed']}, refused {bulk['refused']} of {bulk['total']})"
        )
    for error in answer["errors"]:
        click.echo(f"error: {error['device']}: {error['message']} [{error['record']!r}]")


def _operation_line(operation: dict[str, Any]) -> str:
    reason = f" {operation['failure_reason']!r}" if operation.get("failure_reason") else ""
    return (
        f"operation {operation['id']} {operation['device']} {operation['name']} "
        f"{operation['version']}: {operation['status']}{reason} ({operation['url']})"
    )


def _digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def _call(
    control: str, method: str, path: str, body: dict[str, Any] | None, wait: float = 0.0
) -> tuple[int, dict[str, Any]]:
    """One request to the control API: (status, JSON answer); exits when nobody answers."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        control.rstrip("/") + path,
        data=data,
        method=method,
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=wait + 10) as response:
            return response.status, _json(response.read())
    except urllib.error.HTTPError as error:
        return error.code, _json(error.read())
    except (urllib.error.URLError, OSError, ValueError) as error:
        reason = getattr(error, "reason", error)
        fail(
            f"no simulator answers at {control} ({reason}); "
            "start one with `tedge-firmware c8y-sim serve`"
        )


def _json(data: bytes) -> dict[str, Any]:
    try:
        answer = json.loads(data)
    except ValueError:
        return {"error": data.decode("utf-8", "replace").strip() or "no answer"}
    return answer if isinstance(answer, dict) else {"error": str(answer)}
