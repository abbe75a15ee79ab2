"""`tedge-firmware config get/set/list`: read and change `tedge.toml` from the shell.

The group takes the config directory from its parent (`ctx.obj["config_dir"]`); `--config-dir`
on the group itself overrides it, so the group also works on its own. Effective values follow
the daemon's rules: file < `TEDGE_*` environment, then derived keys and defaults. Every error is
one `error: ...` line on stderr and exit code 1, never a traceback.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import click

from tedge_firmware.core.config import (
    DEFAULT_CONFIG_DIR,
    KEYS,
    effective_value,
    env_var_names,
    find_key,
    raw_values,
)
from tedge_firmware.errors import ConfigError, TedgeFirmwareError
from tedge_firmware.shell.config_edit import set_value
from tedge_firmware.shell.config_file import config_path, read_device_id, read_document


class _Failed(Exception):
    """Raised inside a command to end it with one error line and exit code 1."""


@contextmanager
def _errors_as_one_line() -> Iterator[None]:
    try:
        yield
    except (_Failed, TedgeFirmwareError, OSError) as error:
        _report(error)
        raise click.exceptions.Exit(1) from None


def _report(error: BaseException) -> None:
    message = " ".join(str(error).split()) or type(error).__name__
    click.echo(f"error: {message}", err=True)


def _config_dir(ctx: click.Context) -> Path:
    obj = ctx.find_object(dict) or {}
    return Path(obj.get("config_dir", DEFAULT_CONFIG_DIR))


class _View:
    """The effective values for one config dir and environment, computed key by key, so that
    one bad value does not hide the others."""

    def __init__(self, config_dir: Path, env: Mapping[str, str]) -> None:
        self.config_dir = config_dir
        self.source = str(config_path(config_dir))
        document = read_document(config_path(config_dir))
        try:
            self.raw = raw_values(document, env)
        except ConfigError as error:
            raise ConfigError(f"{error} (in {self.source})") from None

    def value(self, name: str) -> Any:
        """Parsed effective value, None when unset; ConfigError when the value is invalid."""
        return effective_value(name, self.raw, self.config_dir, self.source)

    def device_id_from_certificate(self) -> str:
        return read_device_id(self.value("device.cert_path"))


@click.group("config")
@click.option(
    "--config-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help=f"Directory holding tedge.toml (default: the parent's, else {DEFAULT_CONFIG_DIR}).",
)
@click.pass_context
def config_group(ctx: click.Context, config_dir: Path | None) -> None:
    """Read and change tedge.toml settings."""
    ctx.ensure_object(dict)
    if config_dir is not None:
        ctx.obj["config_dir"] = config_dir
    ctx.obj.setdefault("config_dir", DEFAULT_CONFIG_DIR)


@config_group.command("get")
@click.argument("key")
@click.pass_context
def get_command(ctx: click.Context, key: str) -> None:
    """Print the effective value of KEY (exit code 1 when it is not set)."""
    with _errors_as_one_line():
        spec = find_key(key)
        view = _View(_config_dir(ctx), os.environ)
        value = view.value(spec.name)
        if value is None and spec.name == "device.id":
            value = view.device_id_from_certificate()
        if value is None:
            raise _Failed(f"'{key}' is not set")
        click.echo(str(value))


# ignore_unknown_options: a value such as "-1" is a value to validate, not an unknown option.
@config_group.command("set", context_settings={"ignore_unknown_options": True})
@click.argument("key")
@click.argument("value")
@click.pass_context
def set_command(ctx: click.Context, key: str, value: str) -> None:
    """Validate VALUE and write it to tedge.toml under KEY's v2 name."""
    with _errors_as_one_line():
        set_value(_config_dir(ctx), key, value)
        names = env_var_names(key)
        for var in os.environ:
            if var.upper() in names:
                click.echo(f"note: the environment variable {var} overrides this value", err=True)


# `config list` is for looking around: a secret is only said to be set (`config get` shows it)
SECRET_KEYS = frozenset({"proxy.password"})
SECRET_SHOWN = "(set)"


@config_group.command("list")
@click.option("--doc", is_flag=True, help="Add each key's description below it.")
@click.pass_context
def list_command(ctx: click.Context, doc: bool) -> None:
    """Print every key as key=value (empty when unset), sorted by key."""
    with _errors_as_one_line():
        view = _View(_config_dir(ctx), os.environ)
    failed = False
    for spec in sorted(KEYS, key=lambda spec: spec.name):
        try:
            value = view.value(spec.name)
        except TedgeFirmwareError as error:
            _report(error)  # the other keys are still worth showing
            failed = True
            continue
        if value is None and spec.name == "device.id":
            # No certificate yet is normal before `tedge cert create`: show device.id unset.
            with suppress(TedgeFirmwareError):
                value = view.device_id_from_certificate()
        shown = "" if value is None else SECRET_SHOWN if spec.name in SECRET_KEYS else value
        click.echo(f"{spec.name}={shown}")
        if doc:
            default = "" if spec.default is None else f" (default: {spec.default})"
            click.echo(f"    {spec.doc}{default}")
    if failed:
        raise click.exceptions.Exit(1)
