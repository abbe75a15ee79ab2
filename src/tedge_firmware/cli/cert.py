"""`tedge-firmware cert`: a site's local CA, the gateway's server certificate and the children's
client certificates (shell/certs.py)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from tedge_firmware.cli.support import config_dir_for, fail, load_for
from tedge_firmware.errors import ConfigError

if TYPE_CHECKING:
    from tedge_firmware.core.config import TedgeConfig

DEFAULT_SUBDIR = "device-local-certs"

dir_option = click.option(
    "--dir",
    "directory",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help=f"Where the files go (default: <config-dir>/{DEFAULT_SUBDIR}).",
)


@click.group("cert", short_help="Certificates for the local hop: CA, gateway, children.")
def cert_group() -> None:
    """Certificates for the local hop: a site CA, the gateway's server certificate and a client
    certificate per child. Keys are written with mode 0600."""


def _site(ctx: click.Context, directory: Path | None):  # type: ignore[no-untyped-def]
    from tedge_firmware.shell.certs import SiteCertificates

    return SiteCertificates(directory or config_dir_for(ctx, None) / DEFAULT_SUBDIR)


def _done(paths: list[Path]) -> None:
    for path in paths:
        click.echo(str(path))


@cert_group.command("create-ca")
@dir_option
@click.option("--name", default="tedge-firmware local CA", show_default=True, help="CA name.")
@click.option("--days", type=click.IntRange(1, 36500), default=3650, show_default=True)
@click.option(
    "--force", is_flag=True, help="Replace an existing CA (its certificates stop working)."
)
@click.pass_context
def create_ca(
    ctx: click.Context, directory: Path | None, name: str, days: int, force: bool
) -> None:
    """Create the site's CA (ca.crt, ca.key)."""
    try:
        _done(_site(ctx, directory).create_ca(name, days, force=force))
    except ConfigError as error:
        fail(str(error))


@cert_group.command("create-server")
@dir_option
@click.option(
    "--name",
    "names",
    multiple=True,
    help="A host name or address children use to reach the gateway (repeatable; default: "
    "http.client.host, else http.bind.address).",
)
@click.option("--days", type=click.IntRange(1, 3650), default=825, show_default=True)
@click.pass_context
def create_server(
    ctx: click.Context, directory: Path | None, names: tuple[str, ...], days: int
) -> None:
    """Create the gateway's certificate (server.crt, server.key), signed by the CA: the
    file-transfer service's and the broker's server certificate (http.cert_path,
    http.key_path) and, with CN = the main device id, the identity of the gateway's own
    clients (mqtt.client.auth.*, http.client.auth.*)."""
    config = load_for(ctx, None)
    if not names:
        names = tuple(n for n in (config.http_client_host, config.http_bind_address) if n)
    try:
        common_name = _main_device_id(config)
        _done(_site(ctx, directory).create_server(names, days, common_name=common_name))
    except ConfigError as error:
        fail(str(error))


def _main_device_id(config: TedgeConfig) -> str | None:
    from tedge_firmware.shell.config_file import resolve_device_id

    try:
        return resolve_device_id(config)
    except ConfigError:
        return None


@cert_group.command("create-child")
@dir_option
@click.argument("child_id")
@click.option("--days", type=click.IntRange(1, 3650), default=825, show_default=True)
@click.pass_context
def create_child(ctx: click.Context, directory: Path | None, child_id: str, days: int) -> None:
    """Create CHILD_ID's client certificate (children/<child>.crt, .key; CN = the child id)."""
    from tedge_firmware.core.topics import child_id_problem

    problem = child_id_problem(child_id)
    if problem is None and child_id == _main_device_id(load_for(ctx, None)):
        problem = "this is the gateway's own id: its certificate opens every child's files"
    if problem is not None:
        raise click.BadParameter(problem, param_hint="CHILD_ID")
    try:
        _done(_site(ctx, directory).create_child(child_id, days))
    except ConfigError as error:
        fail(str(error))


@cert_group.command("rotate-link-secret")
@click.pass_context
def rotate_link_secret(ctx: click.Context) -> None:
    """Replace the secret that signs file-transfer links (http.signed_links): every link handed
    out so far stops working; restart the services, then the gateway re-sends its requests
    with new links."""
    from tedge_firmware.shell import link_secret

    config = load_for(ctx, None)
    path = link_secret.secret_path(config.data_path)
    try:
        link_secret.rotate(path)
    except ConfigError as error:
        fail(str(error))
    click.echo(str(path))


@cert_group.command("broker-config")
@dir_option
@click.option(
    "--out",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Where the fragment and the ACL go (default: <config-dir>/mosquitto-conf).",
)
@click.option("--bind", default="0.0.0.0", show_default=True, help="Address of the TLS listener.")
@click.option("--port", type=click.IntRange(1, 65535), default=8883, show_default=True)
@click.pass_context
def broker_config(
    ctx: click.Context, directory: Path | None, out: Path | None, bind: str, port: int
) -> None:
    """Write a Mosquitto fragment (a TLS listener requiring client certificates of the site's
    CA) and an ACL (a child reads only its own requests and publishes only its own statuses)."""
    from tedge_firmware.core.broker_acl import mosquitto_acl, mosquitto_fragment
    from tedge_firmware.shell.config_file import resolve_device_id

    config = load_for(ctx, None)
    site = _site(ctx, directory)
    target = out or config_dir_for(ctx, None) / "mosquitto-conf"
    try:
        main_device_id = resolve_device_id(config)
        for required in (site.ca_cert, site.directory / "server.crt"):
            if not required.is_file():
                raise ConfigError(f"{required} is missing: create it with 'tedge-firmware cert'")
        target.mkdir(parents=True, exist_ok=True)
        acl = target / "tedge-firmware.acl"
        fragment = target / "tedge-firmware-mosquitto.conf"
        acl.write_text(mosquitto_acl(main_device_id))
        fragment.write_text(
            mosquitto_fragment(
                bind=bind,
                port=port,
                ca_file=site.ca_cert.absolute(),
                cert_file=(site.directory / "server.crt").absolute(),
                key_file=(site.directory / "server.key").absolute(),
                acl_file=acl.absolute(),
            )
        )
    except ConfigError as error:
        fail(str(error))
    except OSError as error:
        fail(f"cannot write {error.filename}: {error.strerror}")
    _done([fragment, acl])
