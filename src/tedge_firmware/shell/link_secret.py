"""The secret that signs file-transfer links: `data.path/file-transfer.key`, outside the served
repository, created on first use with mode 0600, replaced by `rotate` (links signed with the
old one stop working; restart the services to take the new one)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from tedge_firmware.core.links import SECRET_BYTES
from tedge_firmware.errors import ConfigError

FILE_NAME = "file-transfer.key"


def secret_path(data_path: Path) -> Path:
    return data_path / FILE_NAME


def load_or_create(path: Path) -> bytes:
    """The secret; a new one when there is none yet. Two services starting together (the
    plugin and the file-transfer service) end with the same one: the first to create it wins."""
    try:
        secret = path.read_bytes()
    except FileNotFoundError:
        _create_once(path)
        secret = path.read_bytes()
    except OSError as error:
        raise ConfigError(f"cannot read the link secret {path}: {error.strerror}") from error
    if len(secret) < SECRET_BYTES:
        raise ConfigError(f"the link secret {path} is too short: remove it to have a new one made")
    return secret


def rotate(path: Path) -> bytes:
    """Replace the secret with a new one (atomically, mode 0600) and return it."""
    secret, temp = _new_secret_file(path)
    try:
        os.replace(temp, path)
    except OSError as error:
        raise ConfigError(f"cannot write the link secret {path}: {error.strerror}") from error
    return secret


def _create_once(path: Path) -> None:
    _, temp = _new_secret_file(path)
    try:
        os.link(temp, path)  # fails when another process was first: its secret stays
    except FileExistsError:
        pass
    except OSError as error:
        raise ConfigError(f"cannot write the link secret {path}: {error.strerror}") from error
    finally:
        temp.unlink(missing_ok=True)


def _new_secret_file(path: Path) -> tuple[bytes, Path]:
    secret = secrets.token_bytes(SECRET_BYTES)
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as file:
            file.write(secret)
            os.fsync(file.fileno())
    except OSError as error:
        raise ConfigError(f"cannot write the link secret {path}: {error.strerror}") from error
    return secret, temp
