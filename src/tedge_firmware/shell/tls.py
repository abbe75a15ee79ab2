"""TLS contexts for the local hop, over the standard library's `ssl`; the one place where a
directory of CA certificates is read (thin-edge's `http.ca_path`: every PEM file in it, no
`c_rehash` needed). Failures are ConfigError naming the key."""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

from tedge_firmware.errors import ConfigError

log = logging.getLogger(__name__)


def trust_cas_in(context: ssl.SSLContext, path: Path, key: str = "http.ca_path") -> None:
    """Trust the CA certificates in `path`: a PEM file, or every PEM file of a directory."""
    try:
        files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    except OSError as error:
        raise ConfigError(f"cannot read {key} {path}: {error.strerror}") from error
    loaded = 0
    for file in files:
        try:
            context.load_verify_locations(cafile=file)
            loaded += 1
        except FileNotFoundError as error:
            raise ConfigError(f"cannot read {key} {path}: {error.strerror}") from error
        except (OSError, ssl.SSLError):
            log.debug("%s: %s is not a PEM certificate: skipped", key, file)
    if not loaded:
        raise ConfigError(f"{key} {path} holds no PEM CA certificate")


def client_context(
    ca_path: Path | None, cert_file: Path | None, key_file: Path | None
) -> ssl.SSLContext | None:
    """The context an HTTPS client of the local hop uses: the system's CAs plus `ca_path`, and a
    client certificate when given; None when nothing is configured (the defaults apply)."""
    if ca_path is None and cert_file is None and key_file is None:
        return None
    if (cert_file is None) != (key_file is None):
        raise ConfigError(
            "http.client.auth.cert_file and http.client.auth.key_file go together: set both"
        )
    context = ssl.create_default_context()
    if ca_path is not None:
        trust_cas_in(context, ca_path)
    if cert_file is not None and key_file is not None:
        try:
            context.load_cert_chain(cert_file, key_file)
        except (OSError, ssl.SSLError) as error:
            raise ConfigError(
                f"cannot load http.client.auth.cert_file/key_file ({cert_file}, {key_file}): "
                f"{error}"
            ) from error
    return context
