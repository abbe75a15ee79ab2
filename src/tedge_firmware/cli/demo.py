"""`tedge-firmware demo`: broker, simulator, gateway and N children on this machine, and a
firmware rollout with a live view and a summary (see `tedge_firmware.demo`)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import cast

import click

from tedge_firmware.core.units import parse_size
from tedge_firmware.demo.options import (
    BROKER_CHOICES,
    PROTOCOL_CHOICES,
    BrokerChoice,
    DemoOptions,
    ProtocolChoice,
)
from tedge_firmware.demo.stack import main


def _size(ctx: click.Context, param: click.Parameter, value: str) -> int:
    try:
        return parse_size(value)
    except ValueError as error:
        raise click.BadParameter(str(error)) from None


@click.command("demo", short_help="A firmware rollout to simulated children.")
@click.option(
    "--children",
    type=click.IntRange(min=1),
    default=10,
    show_default=True,
    help="Simulated child devices (one connector process serves them all).",
)
@click.option(
    "--size",
    default="64MiB",
    show_default=True,
    callback=_size,
    help="Firmware size (e.g. 1MiB, 64MiB, 500MB).",
)
@click.option(
    "--fail",
    type=click.IntRange(min=0),
    default=1,
    show_default=True,
    help="Children whose apply step always fails (with a reason).",
)
@click.option(
    "--flaky",
    type=click.IntRange(min=0),
    default=1,
    show_default=True,
    help="Children whose first apply fails; the demo retries them once.",
)
@click.option(
    "--cuts",
    type=click.IntRange(min=0),
    default=1,
    show_default=True,
    help="Cloud downloads cut halfway on purpose (the gateway resumes).",
)
@click.option(
    "--ramp",
    type=click.FloatRange(min=0),
    default=0.2,
    show_default=True,
    help="Seconds between two operations of the bulk operation.",
)
@click.option(
    "--apply-seconds",
    type=click.FloatRange(min=0),
    default=1.0,
    show_default=True,
    help="How long each child's demo apply step takes.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=600.0,
    show_default=True,
    help="Seconds the whole rollout may take.",
)
@click.option(
    "--live/--plain",
    default=None,
    help="Live table, or one line per change (default: live on a terminal).",
)
@click.option(
    "--workdir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Where the temporary directory goes (default: the system's).",
)
@click.option("--keep", is_flag=True, help="Keep the temporary directory (logs) afterwards.")
@click.option(
    "--broker",
    type=click.Choice(BROKER_CHOICES),
    default="auto",
    show_default=True,
    help="MQTT broker: mosquitto, the embedded one (amqtt, a demo-only fallback: "
    "pip install 'tedge-firmware[demo-broker]'), or auto: mosquitto when installed, "
    "else the embedded one.",
)
@click.option(
    "--protocol",
    type=click.Choice(PROTOCOL_CHOICES),
    default="mixed",
    show_default=True,
    help="The children's protocol: legacy (thin-edge 0.x requests), te (thin-edge 1.x/2.x "
    "commands, with the gateway's download step), or mixed (every other child).",
)
@click.option(
    "--secure",
    is_flag=True,
    help="A locked site: every MQTT client on Mosquitto's TLS listener with a client "
    "certificate and the ACL of `cert broker-config`, every download over HTTPS with a client "
    "certificate (certificates made by `tedge-firmware cert`'s code). Needs mosquitto.",
)
def demo_command(
    children: int,
    size: int,
    fail: int,
    flaky: int,
    cuts: int,
    ramp: float,
    apply_seconds: float,
    timeout: float,
    live: bool | None,
    workdir: Path | None,
    keep: bool,
    broker: str,
    protocol: str,
    secure: bool,
) -> None:
    """Roll a firmware out to N simulated children through the real gateway, and watch it.

    Exit code 0 when every child that should succeed did, the --fail ones failed with their
    reason, the firmware was downloaded from the cloud once and no protocol error was seen;
    1 otherwise; 2 when the stack could not be set up (e.g. no MQTT broker).
    """
    try:
        options = DemoOptions(
            children=children,
            size=size,
            fail=fail,
            flaky=flaky,
            cloud_cuts=cuts,
            ramp=ramp,
            apply_seconds=apply_seconds,
            timeout=timeout,
            live=live,
            workdir=workdir,
            keep=keep,
            broker=cast(BrokerChoice, broker),  # click.Choice checked it
            protocol=cast(ProtocolChoice, protocol),
            secure=secure,
        )
    except ValueError as error:
        raise click.UsageError(str(error)) from None
    sys.exit(main(options))
