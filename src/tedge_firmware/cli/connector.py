"""`tedge-firmware connector`: a ready child-device connector around a user's apply command.

    tedge-firmware connector --child-id ID [--child-id ID2 ...] --apply-command CMD
        [--verify-command CMD] [--config-dir DIR | --mqtt-host H --mqtt-port P]
        [--work-dir D] [--apply-timeout S] [--register] [--protocol legacy|te] ...

The broker comes from `<config-dir>/tedge.toml` (`mqtt.client.*`, TLS included) unless
`--mqtt-host`/`--mqtt-port` are given; with only those, no configuration file is read.
`--register` declares `c8y_Firmware` for every child: as the operations file
`<config-dir>/operations/c8y/<child>/c8y_Firmware` when that directory exists and is writable
(on the gateway), else with the network API (a retained `{}` on
`te/device/<child>///cmd/firmware_update`).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import click

from tedge_firmware.cli.support import config_for_broker, fail, run_service
from tedge_firmware.core import topics
from tedge_firmware.core.config import DEFAULT_CONFIG_DIR, TedgeConfig
from tedge_firmware.gateway.lifecycle import run_until_signal
from tedge_firmware.gateway.logs import configure_logging

if TYPE_CHECKING:
    from tedge_firmware.connector import BrokerSettings

log = logging.getLogger("tedge_firmware.connector")

DEFAULT_WORK_DIR = Path("/var/lib/tedge-firmware-connector")
FIRMWARE_OPERATION_FILE = "c8y_Firmware"


def _check_child_ids(
    ctx: click.Context, param: click.Parameter, values: Sequence[str]
) -> tuple[str, ...]:
    for value in values:
        problem = topics.child_id_problem(value)
        if problem is not None:
            raise click.BadParameter(problem)
    return tuple(dict.fromkeys(values))


def _seconds_or_none(value: float) -> float | None:
    return None if value == 0 else value


@click.command("connector", short_help="A child-device connector around your apply command.")
@click.option(
    "--child-id",
    "child_ids",
    multiple=True,
    required=True,
    callback=_check_child_ids,
    help="A child device to serve (repeat it to serve several from one process).",
)
@click.option(
    "--apply-command",
    required=True,
    help="Shell command that installs $FIRMWARE_FILE; exit 0 means applied.",
)
@click.option(
    "--verify-command",
    default=None,
    help="Shell command run after an interrupted apply; exit 0 means the firmware is installed.",
)
@click.option(
    "--config-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help=f"Directory of tedge.toml, for the broker settings (default: {DEFAULT_CONFIG_DIR}).",
)
@click.option(
    "--mqtt-host",
    default=None,
    help="Broker host; with it (or --mqtt-port) alone, tedge.toml is not read "
    "(default: mqtt.client.host of tedge.toml).",
)
@click.option(
    "--mqtt-port",
    type=click.IntRange(1, 65535),
    default=None,
    help="Broker port; with it (or --mqtt-host) alone, tedge.toml is not read "
    "(default: mqtt.client.port of tedge.toml, else 1883).",
)
@click.option(
    "--client-id", default=None, help="MQTT client id (default: derived from the child ids)."
)
@click.option(
    "--work-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=DEFAULT_WORK_DIR,
    show_default=True,
    help="Where operation records and downloads are kept (must survive reboots).",
)
@click.option(
    "--apply-timeout",
    type=click.FloatRange(min=0),
    default=3600.0,
    show_default=True,
    help="Seconds the apply command may run (0: no limit).",
)
@click.option(
    "--verify-timeout",
    type=click.FloatRange(min=0),
    default=300.0,
    show_default=True,
    help="Seconds the verify command may run (0: no limit).",
)
@click.option(
    "--heartbeat",
    type=click.FloatRange(min=0),
    default=300.0,
    show_default=True,
    help="Seconds between repeated 'executing' statuses while an operation runs (0: off).",
)
@click.option(
    "--download-stall-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=60.0,
    show_default=True,
    help="Seconds without a byte before a download connection is dropped and resumed.",
)
@click.option(
    "--download-retry-budget",
    type=click.FloatRange(min=0, min_open=True),
    default=3600.0,
    show_default=True,
    help="Seconds a download may keep failing without progress before the operation fails.",
)
@click.option("--register", is_flag=True, help="Declare c8y_Firmware for every child.")
@click.option(
    "--protocol",
    type=click.Choice(["legacy", "te"]),
    default="legacy",
    show_default=True,
    help="legacy: thin-edge 0.x requests (tedge/<child>/commands/...); te: thin-edge 1.x/2.x "
    "commands (te/device/<child>///cmd/firmware_update/+), with the gateway's download step "
    "(its states from firmware.te.* in tedge.toml when a config dir is read).",
)
@click.option("--debug", is_flag=True, help="Log debug messages.")
@click.pass_context
def connector_command(
    ctx: click.Context,
    child_ids: tuple[str, ...],
    apply_command: str,
    verify_command: str | None,
    config_dir: Path | None,
    mqtt_host: str | None,
    mqtt_port: int | None,
    client_id: str | None,
    work_dir: Path,
    apply_timeout: float,
    verify_timeout: float,
    heartbeat: float,
    download_stall_timeout: float,
    download_retry_budget: float,
    register: bool,
    protocol: str,
    debug: bool,
) -> None:
    """A child-device connector: receives firmware_update requests, downloads (resuming) and
    verifies the firmware, runs --apply-command once per firmware and reports the outcome.

    \b
    The command gets FIRMWARE_FILE (the verified file), FIRMWARE_NAME, FIRMWARE_VERSION,
    FIRMWARE_SHA256, OPERATION_ID, ATTEMPT and CHILD_ID. Exit 0 means applied; anything else
    failed, with the last line of its standard error as the reason.
    """
    # Imported here: the SDK pulls in aiohttp and aiomqtt, which `tedge-firmware --help` and the
    # other commands do not need.
    from tedge_firmware.connector import Command, Connector, DownloadSettings, TeStates

    configure_logging(debug)
    config = config_for_broker(ctx, config_dir, mqtt_host, mqtt_port)
    broker = _broker_settings(config, mqtt_host, mqtt_port, client_id)
    use_network_api = False
    if register:
        use_network_api = not _register_by_file(config, child_ids)
    try:
        connector = Connector(
            *child_ids,
            apply=Command(apply_command, timeout=_seconds_or_none(apply_timeout)),
            verify=None
            if verify_command is None
            else Command(verify_command, timeout=_seconds_or_none(verify_timeout)),
            work_dir=work_dir,
            broker=broker,
            download=DownloadSettings(
                stall_timeout=download_stall_timeout,
                retry_budget=download_retry_budget,
                # the local hop's TLS, as thin-edge configures a child: http.ca_path,
                # http.client.auth.cert_file/key_file
                ca_path=None if config is None else config.http_ca_path,
                cert_file=None if config is None else config.http_client_cert_file,
                key_file=None if config is None else config.http_client_key_file,
            ),
            heartbeat=_seconds_or_none(heartbeat),
            register=use_network_api,
            protocol=protocol,
            te_states=TeStates()
            if config is None
            else TeStates(config.te_download_state, config.te_downloaded_state),
        )
    except ValueError as error:
        fail(str(error))

    async def serve(stop: asyncio.Event) -> None:
        task = asyncio.create_task(connector.run())
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait([task, stopper], return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        connector.stop()
        await task

    run_service(lambda: run_until_signal(serve))


def _broker_settings(
    config: TedgeConfig | None, host: str | None, port: int | None, client_id: str | None
) -> BrokerSettings:
    from tedge_firmware.connector import BrokerSettings

    if config is None:
        return BrokerSettings(host=host or "localhost", port=port or 1883, client_id=client_id)
    auth = config.mqtt_auth
    return BrokerSettings(
        host=host or config.mqtt_host,
        port=port or config.mqtt_port,
        client_id=client_id,
        ca_file=auth.ca_file,
        ca_dir=auth.ca_dir,
        cert_file=auth.cert_file,
        key_file=auth.key_file,
    )


def operations_dir(config: TedgeConfig | None) -> Path | None:
    """`<config-dir>/operations/c8y` when it exists and is writable (we run on the gateway)."""
    if config is None:
        return None
    directory = config.c8y_operations_dir
    if directory.is_dir() and os.access(directory, os.W_OK | os.X_OK):
        return directory
    return None


def register_by_file(directory: Path, child_ids: Sequence[str]) -> None:
    """Create `<directory>/<child>/c8y_Firmware` (empty) for every child; keep existing files."""
    for child in child_ids:
        path = directory / child / FIRMWARE_OPERATION_FILE
        path.parent.mkdir(exist_ok=True)
        if not path.exists():
            path.touch(mode=0o644)
            log.info("registered c8y_Firmware for child=%s with %s", child, path)


def _register_by_file(config: TedgeConfig | None, child_ids: Sequence[str]) -> bool:
    """True when the operations files were written; False: use the network API."""
    directory = operations_dir(config)
    if directory is None:
        return False
    try:
        register_by_file(directory, child_ids)
    except OSError as error:
        log.warning(
            "cannot write operation files in %s (%s): using the network API", directory, error
        )
        return False
    return True
