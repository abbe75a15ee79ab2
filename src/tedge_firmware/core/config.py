"""Configuration model: the `tedge.toml` keys we use, their defaults, parsing and validation.

Pure: the caller hands in the parsed TOML document and the environment; nothing here touches
the file system. Values flow one way: file (v2 layout, or v1 keys mapped to v2) < `TEDGE_*`
environment variables, then everything is validated into one frozen `TedgeConfig`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tedge_firmware.errors import ConfigError

DEFAULT_CONFIG_DIR = Path("/etc/tedge")
CONFIG_FILE_NAME = "tedge.toml"

Parser = Callable[[str, object], object]


def _text(key: str, value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ConfigError(f"invalid value for '{key}': expected a string, got {value!r}")
    text = str(value).strip()
    if not text:
        raise ConfigError(f"invalid value for '{key}': must not be empty")
    if any(ch in text for ch in "\n\r\0"):
        raise ConfigError(f"invalid value for '{key}': must be a single line")
    return text


def _int_in(low: int, high: int, what: str) -> Parser:
    def parse(key: str, value: object) -> int:
        if isinstance(value, bool):
            raise ConfigError(f"invalid value for '{key}': {value!r} is not {what}")
        if isinstance(value, int):
            number = value
        else:
            text = str(value).strip()
            try:
                number = int(text, 10)
            except ValueError:
                raise ConfigError(f"invalid value for '{key}': {value!r} is not {what}") from None
        if not low <= number <= high:
            raise ConfigError(f"invalid value for '{key}': {number} is not {what}")
        return number

    return parse


def _path(key: str, value: object) -> Path:
    return Path(_text(key, value))


def _host(key: str, value: object) -> str:
    text = _text(key, value)
    if any(ch.isspace() for ch in text) or "/" in text:
        raise ConfigError(f"invalid value for '{key}': {text!r} is not a host name or address")
    return text.removeprefix("[").removesuffix("]") if text.startswith("[") else text


_port = _int_in(1, 65535, "a port number (1-65535)")
_seconds = _int_in(1, 10 * 365 * 24 * 3600, "a positive whole number of seconds")
_count = _int_in(1, 1024, "a whole number from 1 to 1024")


@dataclass(frozen=True)
class KeySpec:
    """One configuration key: its canonical v2 name, how to parse it, and its other spellings."""

    name: str
    parse: Parser
    doc: str
    default: str | None = None
    aliases: tuple[str, ...] = ()
    v1: tuple[str, ...] = ()


KEYS: tuple[KeySpec, ...] = (
    KeySpec("device.id", _text, "Main device id; default: CN of device.cert_path"),
    KeySpec(
        "device.cert_path",
        _path,
        "Device certificate (for device.id)",
        "<config-dir>/device-certs/tedge-certificate.pem",
    ),
    KeySpec("c8y.url", _host, "Cumulocity tenant host (decides where the JWT may be sent)"),
    KeySpec("c8y.http", _host, "Cumulocity HTTP host; default: c8y.url"),
    KeySpec(
        "mqtt.bind.address", _host, "Local broker address", "127.0.0.1", (), ("mqtt.bind_address",)
    ),
    KeySpec("mqtt.bind.port", _port, "Local broker port", "1883", (), ("mqtt.port",)),
    KeySpec(
        "mqtt.client.host",
        _host,
        "Broker host to connect to",
        "localhost",
        (),
        ("mqtt.client_host",),
    ),
    KeySpec(
        "mqtt.client.port",
        _port,
        "Broker port; default: mqtt.bind.port",
        None,
        (),
        ("mqtt.client_port",),
    ),
    KeySpec(
        "mqtt.client.auth.ca_file",
        _path,
        "CA file for TLS to the broker",
        None,
        (),
        ("mqtt.client_ca_file",),
    ),
    KeySpec(
        "mqtt.client.auth.ca_dir",
        _path,
        "CA directory for TLS to the broker",
        None,
        (),
        ("mqtt.client_ca_path",),
    ),
    KeySpec(
        "mqtt.client.auth.cert_file",
        _path,
        "Client certificate",
        None,
        (),
        ("mqtt.client_auth.cert_file",),
    ),
    KeySpec(
        "mqtt.client.auth.key_file",
        _path,
        "Client private key",
        None,
        (),
        ("mqtt.client_auth.key_file",),
    ),
    KeySpec(
        "mqtt.external.bind.address",
        _host,
        "External broker address",
        None,
        (),
        ("mqtt.external_bind_address",),
    ),
    KeySpec(
        "http.bind.address",
        _host,
        "File-transfer bind address; default: mqtt.external.bind.address, mqtt.bind.address",
        None,
        ("http.address",),
        ("http.bind_address",),
    ),
    KeySpec("http.bind.port", _port, "File-transfer port", "8000", ("http.port",), ()),
    KeySpec(
        "http.client.host", _host, "Host put into URLs handed to children; default: bind address"
    ),
    KeySpec("http.cert_path", _path, "TLS certificate of the file-transfer service (https)"),
    KeySpec("http.key_path", _path, "TLS private key of the file-transfer service"),
    KeySpec("data.path", _path, "Data directory (cache, firmware, file-transfer)", "/var/tedge"),
    KeySpec("tmp.path", _path, "Temporary directory", "/tmp"),
    KeySpec(
        "firmware.child.update.timeout",
        _seconds,
        "Seconds without a child response before an operation fails",
        "3600",
        (),
        ("firmware.child_update_timeout",),
    ),
    KeySpec("firmware.download.parallel", _count, "Cloud downloads run at the same time", "4"),
)

KEYS_BY_NAME: dict[str, KeySpec] = {spec.name: spec for spec in KEYS}
_SPELLINGS: dict[str, KeySpec] = {
    name: spec for spec in KEYS for name in (spec.name, *spec.aliases, *spec.v1)
}


def find_key(name: str) -> KeySpec:
    """The key spec for a canonical name or alias; ConfigError for unknown keys."""
    spec = _SPELLINGS.get(name.strip().lower())
    if spec is None:
        raise ConfigError(f"unknown configuration key '{name}'")
    return spec


def validate_value(name: str, raw: object) -> object:
    """Parse one value as the key demands (used by `config set` before writing)."""
    spec = find_key(name)
    return spec.parse(spec.name, raw)


def _flatten(doc: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, object]]:
    for key, value in doc.items():
        dotted = f"{prefix}{key}".lower()
        if isinstance(value, Mapping):
            yield from _flatten(value, dotted + ".")
        else:
            yield dotted, value


def raw_values(doc: Mapping[str, Any], env: Mapping[str, str]) -> dict[str, tuple[object, str]]:
    """Canonical key → (raw value, where it came from). Unknown keys are ignored, as tedge does."""
    found: dict[str, tuple[object, str]] = {}
    for dotted, value in _flatten(doc):
        spec = _SPELLINGS.get(dotted)
        if spec is not None:
            found[spec.name] = (value, "file")
    env_names = {
        "TEDGE_" + name.replace(".", "_").upper(): spec for name, spec in _SPELLINGS.items()
    }
    for var, value in env.items():
        spec = env_names.get(var.upper())
        if spec is not None:
            found[spec.name] = (value, f"environment variable {var}")
    return found


@dataclass(frozen=True)
class MqttAuth:
    """TLS settings for the broker connection (all optional)."""

    ca_file: Path | None = None
    ca_dir: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    @property
    def uses_tls(self) -> bool:
        return self.ca_file is not None or self.ca_dir is not None


@dataclass(frozen=True)
class TedgeConfig:
    """Every setting tedge-firmware reads, validated. Build it with `config_from_document`."""

    config_dir: Path
    device_id: str | None
    device_cert_path: Path
    c8y_url: str | None
    c8y_http: str | None
    mqtt_host: str
    mqtt_port: int
    mqtt_auth: MqttAuth
    http_bind_address: str
    http_bind_port: int
    http_client_host: str | None
    http_cert_path: Path | None
    http_key_path: Path | None
    data_path: Path
    tmp_path: Path
    child_update_timeout: int
    download_parallel: int

    @property
    def cache_dir(self) -> Path:
        return self.data_path / "cache"

    @property
    def firmware_dir(self) -> Path:
        return self.data_path / "firmware"

    @property
    def file_transfer_dir(self) -> Path:
        return self.data_path / "file-transfer"

    @property
    def http_tls(self) -> bool:
        return self.http_cert_path is not None and self.http_key_path is not None

    @property
    def tenant_host(self) -> str | None:
        """The host a JWT may be sent to: c8y.http, else c8y.url, without scheme or port."""
        raw = self.c8y_http or self.c8y_url
        return None if raw is None else tenant_host_of(raw)

    def file_transfer_base_url(self) -> str:
        """`http(s)://host:port/tedge/file-transfer`, as handed to children."""
        host = self.http_client_host or self.http_bind_address
        if self.http_client_host is None and _is_unspecified(host):
            raise ConfigError(
                f"http.bind.address is {host}, which children cannot connect to: "
                "set http.client.host to the address children use to reach this gateway"
            )
        scheme = "https" if self.http_tls else "http"
        return f"{scheme}://{format_host(host)}:{self.http_bind_port}/tedge/file-transfer"


def tenant_host_of(raw: str) -> str:
    """`https://t.example.com:443/x` or `t.example.com:443` → `t.example.com` (lowercase)."""
    host = raw.strip().lower()
    if "://" in host:
        host = host.split("://", 1)[1]
    host = host.split("/", 1)[0]
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    if host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host


def format_host(host: str) -> str:
    """Put an IPv6 literal in brackets, as URLs need."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    return f"[{host}]" if address.version == 6 else host


def _is_unspecified(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def config_from_document(
    doc: Mapping[str, Any], env: Mapping[str, str], config_dir: Path, source: str
) -> TedgeConfig:
    """Validate a parsed `tedge.toml` plus environment overrides into a `TedgeConfig`.

    `source` names the file in error messages. Raises ConfigError naming the key.
    """
    raw = raw_values(doc, env)

    def get(name: str) -> Any:
        spec = KEYS_BY_NAME[name]
        if name in raw:
            value, origin = raw[name]
            where = source if origin == "file" else origin
            try:
                return spec.parse(name, value)
            except ConfigError as error:
                raise ConfigError(f"{error} (in {where})") from None
        return None if spec.default is None else spec.parse(name, spec.default)

    bind_port = get("mqtt.bind.port")
    http_address = (
        get("http.bind.address") or get("mqtt.external.bind.address") or get("mqtt.bind.address")
    )
    return TedgeConfig(
        config_dir=config_dir,
        device_id=get("device.id"),
        device_cert_path=(
            get("device.cert_path")
            if "device.cert_path" in raw
            else config_dir / "device-certs" / "tedge-certificate.pem"
        ),
        c8y_url=get("c8y.url"),
        c8y_http=get("c8y.http"),
        mqtt_host=get("mqtt.client.host"),
        mqtt_port=get("mqtt.client.port") or bind_port,
        mqtt_auth=MqttAuth(
            ca_file=get("mqtt.client.auth.ca_file"),
            ca_dir=get("mqtt.client.auth.ca_dir"),
            cert_file=get("mqtt.client.auth.cert_file"),
            key_file=get("mqtt.client.auth.key_file"),
        ),
        http_bind_address=http_address,
        http_bind_port=get("http.bind.port"),
        http_client_host=get("http.client.host"),
        http_cert_path=get("http.cert_path"),
        http_key_path=get("http.key_path"),
        data_path=get("data.path"),
        tmp_path=get("tmp.path"),
        child_update_timeout=get("firmware.child.update.timeout"),
        download_parallel=get("firmware.download.parallel"),
    )
