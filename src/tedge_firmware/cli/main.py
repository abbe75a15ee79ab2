"""Command line: `c8y-firmware-plugin` (drop-in for thin-edge's) and `tedge-firmware`.

The only place where errors become exit codes: a ConfigError (or any TedgeFirmwareError that
stops a service) is one line on stderr and exit code 1, never a traceback.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

import click

from tedge_firmware import __version__
from tedge_firmware.cli.support import given, load_for, load_or_exit, run_service
from tedge_firmware.core.config import DEFAULT_CONFIG_DIR, TedgeConfig
from tedge_firmware.gateway.logs import configure_logging

log = logging.getLogger("tedge_firmware")

PLUGIN_HELP = """Thin-edge.io firmware plugin for child devices.

\b
Subscribes to `c8y/s/ds` listening for firmware operation requests (message `515`), downloads
the firmware once into `<data.path>/cache`, publishes it for the child over the file-transfer
service, sends `tedge/<child>/commands/req/firmware_update` to the child and forwards the child's
responses (`tedge/<child>/commands/res/firmware_update`) to Cumulocity.
"""

config_dir_option = click.option(
    "--config-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=DEFAULT_CONFIG_DIR,
    show_default=True,
    help="Directory of tedge.toml.",
)
debug_option = click.option("--debug", is_flag=True, help="Log debug messages.")


def _serve_plugin(config: TedgeConfig, with_file_transfer: bool) -> None:
    import asyncio

    from tedge_firmware.gateway.service import ServiceOptions, serve_plugin

    options = ServiceOptions(with_file_transfer=with_file_transfer)

    async def serve(stop: asyncio.Event) -> None:
        await serve_plugin(config, stop, options)

    from tedge_firmware.gateway.lifecycle import run_until_signal

    run_service(lambda: run_until_signal(serve))


@click.command(name="c8y-firmware-plugin", help=PLUGIN_HELP)
@config_dir_option
@debug_option
@click.option("-i", "--init", is_flag=True, help="Create the data directories and exit.")
@click.version_option(__version__)
@click.pass_context
def plugin_command(ctx: click.Context, config_dir: Path, debug: bool, init: bool) -> None:
    configure_logging(debug)
    config = load_or_exit(config_dir, given=given(ctx, "config_dir"))
    if init:
        from tedge_firmware.gateway.service import create_directories

        run_service(lambda: create_directories(config))
        log.info(
            "created %s, %s and %s", config.cache_dir, config.firmware_dir, config.file_transfer_dir
        )
        return
    _serve_plugin(config, with_file_transfer=False)


class LazyGroup(click.Group):
    """A group whose subcommands are imported when they run: `--help` lists them from
    `LAZY_COMMANDS` alone, so it loads neither aiohttp, the simulator nor the demo."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *LAZY_COMMANDS])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in LAZY_COMMANDS:
            return super().get_command(ctx, cmd_name)
        module, attribute, _ = LAZY_COMMANDS[cmd_name]
        command = getattr(importlib.import_module(module), attribute)
        assert isinstance(command, click.Command)
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [
            (name, LAZY_COMMANDS[name][2] if name in LAZY_COMMANDS else self._short_help(ctx, name))
            for name in self.list_commands(ctx)
        ]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def _short_help(self, ctx: click.Context, name: str) -> str:
        command = super().get_command(ctx, name)
        return "" if command is None else command.get_short_help_str(limit=200)


# name → (module, attribute, the line `--help` shows)
LAZY_COMMANDS: dict[str, tuple[str, str, str]] = {
    "c8y-sim": (
        "tedge_firmware.cli.sim",
        "c8y_sim_group",
        "A Cumulocity simulator on the local broker.",
    ),
    "cache": ("tedge_firmware.cli.admin", "cache_group", "List or prune the firmware cache."),
    "cert": (
        "tedge_firmware.cli.cert",
        "cert_group",
        "Certificates for the local hop: CA, gateway, children.",
    ),
    "config": ("tedge_firmware.cli.config", "config_group", "Read and change tedge.toml settings."),
    "connector": (
        "tedge_firmware.cli.connector",
        "connector_command",
        "A child-device connector around your apply command.",
    ),
    "demo": (
        "tedge_firmware.cli.demo",
        "demo_command",
        "A firmware rollout to simulated children.",
    ),
    "ops": ("tedge_firmware.cli.admin", "ops_group", "Firmware operations in progress."),
}


@click.group(name="tedge-firmware", cls=LazyGroup)
@click.version_option(__version__)
@config_dir_option
@click.pass_context
def main_group(ctx: click.Context, config_dir: Path) -> None:
    """Firmware management for Cumulocity child devices behind a thin-edge.io gateway.

    \b
    --config-dir goes before the command (tedge-firmware --config-dir DIR run); after the
    command it is accepted too.
    """
    ctx.ensure_object(dict)
    ctx.obj.setdefault("config_dir", config_dir)
    ctx.obj.setdefault("config_dir_given", given(ctx, "config_dir"))


sub_config_dir_option = click.option(
    "--config-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Directory of tedge.toml (default: /etc/tedge).",
)


@main_group.command("run", short_help="All in one: plugin, file transfer, registration.")
@sub_config_dir_option
@debug_option
@click.pass_context
def run_command(ctx: click.Context, config_dir: Path | None, debug: bool) -> None:
    """The all-in-one service: firmware plugin, file-transfer and child registration."""
    configure_logging(debug)
    _serve_plugin(load_for(ctx, config_dir), with_file_transfer=True)


@main_group.command("file-transfer", short_help="The file-transfer HTTP service alone.")
@sub_config_dir_option
@debug_option
@click.pass_context
def file_transfer_command(ctx: click.Context, config_dir: Path | None, debug: bool) -> None:
    """The file-transfer HTTP service alone (GET/HEAD/PUT/DELETE under data.path/file-transfer)."""
    import asyncio

    from tedge_firmware.gateway.service import serve_file_transfer

    configure_logging(debug)
    config = load_for(ctx, config_dir)

    async def serve(stop: asyncio.Event) -> None:
        await serve_file_transfer(config, stop)

    from tedge_firmware.gateway.lifecycle import run_until_signal

    run_service(lambda: run_until_signal(serve))


@main_group.command("registration", short_help="Child registration alone (101/114).")
@sub_config_dir_option
@debug_option
@click.pass_context
def registration_command(ctx: click.Context, config_dir: Path | None, debug: bool) -> None:
    """Child registration alone: operations files and MQTT declarations to Cumulocity 101/114."""
    import asyncio

    from tedge_firmware.gateway.registration import RegistrationOptions, serve_registration

    configure_logging(debug)
    config = load_for(ctx, config_dir)

    async def serve(stop: asyncio.Event) -> None:
        await serve_registration(config, stop, RegistrationOptions())

    from tedge_firmware.gateway.lifecycle import run_until_signal

    run_service(lambda: run_until_signal(serve))


def plugin_main() -> None:
    plugin_command(prog_name="c8y-firmware-plugin")


def main() -> None:
    main_group(prog_name="tedge-firmware", obj={})
