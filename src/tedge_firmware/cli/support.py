"""What every command shares: one-line errors with exit codes, running a service until a
signal, and finding the broker (from tedge.toml, or from --mqtt-host/--mqtt-port alone)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import click

from tedge_firmware.core.config import DEFAULT_CONFIG_DIR, TedgeConfig
from tedge_firmware.errors import BrokerAuthError, TedgeFirmwareError


def fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def load_or_exit(config_dir: Path, *, given: bool = False) -> TedgeConfig:
    """The configuration in `config_dir`; exit 1 when it is invalid. A directory the user
    named (`given`) must exist: a typo must not quietly run on the defaults."""
    if given and not config_dir.is_dir():
        fail(
            f"the configuration directory {config_dir} (--config-dir) does not exist: "
            f"create it (mkdir -p {config_dir}) or give the directory of your tedge.toml"
        )
    from tedge_firmware.shell.config_file import load_config  # not for `--help`

    try:
        return load_config(config_dir)
    except TedgeFirmwareError as error:
        fail(str(error))


def given(ctx: click.Context, name: str) -> bool:
    """Whether the option `name` of this command was given on the command line."""
    return ctx.get_parameter_source(name) is click.core.ParameterSource.COMMANDLINE


def run_service(action: Callable[[], None]) -> None:
    """Run a service; turn what stopped it into one line and an exit code."""
    try:
        action()
    except BrokerAuthError as error:
        fail(f"the MQTT broker refused the connection: {error}")
    except TedgeFirmwareError as error:
        fail(str(error))
    except KeyboardInterrupt:
        sys.exit(130)


def config_for_broker(
    ctx: click.Context, config_dir: Path | None, mqtt_host: str | None, mqtt_port: int | None
) -> TedgeConfig | None:
    """tedge.toml, unless only --mqtt-host/--mqtt-port say where the broker is."""
    if config_dir is None and (mqtt_host is not None or mqtt_port is not None):
        return None
    return load_for(ctx, config_dir)


def config_dir_for(ctx: click.Context, config_dir: Path | None) -> Path:
    """A subcommand's --config-dir, else `tedge-firmware --config-dir`, else /etc/tedge."""
    if config_dir is not None:
        return config_dir
    root = ctx.find_root().obj
    found = root.get("config_dir") if isinstance(root, dict) else None
    return DEFAULT_CONFIG_DIR if found is None else Path(found)


def load_for(ctx: click.Context, config_dir: Path | None) -> TedgeConfig:
    """The configuration a subcommand works with (see config_dir_for); exit 1 when invalid."""
    root = ctx.find_root().obj
    from_root = isinstance(root, dict) and bool(root.get("config_dir_given"))
    named = config_dir is not None or from_root
    return load_or_exit(config_dir_for(ctx, config_dir), given=named)
