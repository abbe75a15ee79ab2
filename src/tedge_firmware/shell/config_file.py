"""`tedge.toml` on disk, read, and the device id from the device certificate.

Reading uses the standard `tomllib` and never changes the file (thin-edge rewrites v1 files to
v2 when it loads them; we leave that to thin-edge). Writing is `shell.config_edit`'s: it needs
tomlkit, which the daemon does not load.
"""

from __future__ import annotations

import logging
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tedge_firmware.core.config import (
    CONFIG_FILE_NAME,
    TedgeConfig,
    config_from_document,
)
from tedge_firmware.errors import ConfigError

log = logging.getLogger(__name__)


def config_path(config_dir: Path) -> Path:
    """`<config_dir>/tedge.toml`."""
    return config_dir / CONFIG_FILE_NAME


def read_document(path: Path) -> dict[str, Any]:
    """The parsed TOML file, or `{}` when it does not exist. ConfigError names the file."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as error:
        raise ConfigError(f"cannot read {path}: {error.strerror or error}") from None
    return parse_document(data, path)


def parse_document(data: bytes, path: Path) -> dict[str, Any]:
    """Parse the bytes of a TOML file; `path` is only used in error messages."""
    try:
        # utf-8-sig: tolerate the byte order mark some editors write.
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"cannot read {path}: not UTF-8 text (invalid byte at offset {error.start})"
        ) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        # The message carries "(at line L, column C)".
        raise ConfigError(f"cannot read {path}: TOML syntax error: {error}") from None


def load_config(config_dir: Path, env: Mapping[str, str] | None = None) -> TedgeConfig:
    """Read `<config_dir>/tedge.toml` and the `TEDGE_*` environment into a `TedgeConfig`."""
    path = config_path(config_dir)
    document = read_document(path)
    return config_from_document(document, os.environ if env is None else env, config_dir, str(path))


# --- device id -------------------------------------------------------------------------------


def read_device_id(cert_path: Path) -> str:
    """The common name (CN) of the PEM certificate at `cert_path`."""

    def fail(why: str) -> ConfigError:
        return ConfigError(
            f"device.id is not set and the certificate {cert_path} cannot be read: {why}"
        )

    # cryptography costs about 8 MiB and 30 ms: only a gateway without device.id needs it
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    try:
        data = cert_path.read_bytes()
    except OSError as error:
        raise fail(error.strerror or str(error)) from None
    try:
        certificate = x509.load_pem_x509_certificate(data)
    except ValueError as error:
        raise fail(f"not a PEM certificate ({error})") from None
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names:
        raise fail("the certificate subject has no common name (CN)")
    value = names[0].value
    common_name = (value.decode("utf-8", "replace") if isinstance(value, bytes) else value).strip()
    if not common_name or any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in common_name):
        raise fail(f"the common name {common_name!r} is not a usable device id")
    return common_name


def resolve_device_id(config: TedgeConfig) -> str:
    """`device.id` when set, else the CN of `device.cert_path`."""
    return config.device_id or read_device_id(config.device_cert_path)
