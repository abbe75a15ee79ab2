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

from tedge_firmware.core.access import WritePolicy
from tedge_firmware.core.cache_policy import CacheLimits
from tedge_firmware.core.firmware_update import te_state_problem
from tedge_firmware.core.proxy import UpstreamProxy, parse_no_proxy, proxy_address_problem
from tedge_firmware.core.units import parse_size
from tedge_firmware.core.windows import Window, parse_windows
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
    if any(ch in text for ch in "\n\r"):
        raise ConfigError(f"invalid value for '{key}': must be a single line")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in text):
        raise ConfigError(f"invalid value for '{key}': must not contain control characters")
    return text


_MAX_DIGITS = 20  # more than any value we accept has


def _int_in(low: int, high: int, what: str) -> Parser:
    def parse(key: str, value: object) -> int:
        if isinstance(value, bool):
            raise ConfigError(f"invalid value for '{key}': {value!r} is not {what}")
        if isinstance(value, int):
            number = value
        else:
            text = str(value).strip()
            # Plain ASCII digits only: int() would also take "1_000", "+5" and non-ASCII digits;
            # and not thousands of them, which int() refuses with a ValueError of its own.
            if not (isinstance(value, str) and text.isascii() and text.isdigit()):
                raise ConfigError(f"invalid value for '{key}': {value!r} is not {what}")
            if len(text) > _MAX_DIGITS:
                raise ConfigError(f"invalid value for '{key}': {text[:20]}… is not {what}")
            number = int(text, 10)
        if not low <= number <= high:
            raise ConfigError(f"invalid value for '{key}': {number} is not {what}")
        return number

    return parse


def _proxy_address(key: str, value: object) -> str:
    text = _text(key, value)
    problem = proxy_address_problem(text)
    if problem is not None:
        raise ConfigError(f"invalid value for '{key}': {text[:100]!r} {problem}")
    return text


def _windows(key: str, value: object) -> str:
    text = _text(key, value)
    try:
        parse_windows(text)
    except ValueError as error:
        raise ConfigError(f"invalid value for '{key}': {error}") from None
    return text


def _path(key: str, value: object) -> Path:
    return Path(_text(key, value))


_HOST_PUNCTUATION = frozenset("-._:%")


def _host(key: str, value: object) -> str:
    """A host name, IPv4 or IPv6 address (brackets optional), optionally with `:port`.

    Only letters, digits and `-._:%` are allowed: the value ends up in URLs handed to
    children, where `/`, `@`, `?` or `#` would silently change which host is contacted.
    """
    text = _text(key, value)
    if text.startswith("["):
        inner = text[1:-1] if text.endswith("]") else ""
        if not _is_ipv6(inner):
            raise ConfigError(f"invalid value for '{key}': {text!r} is not an IPv6 address")
        return inner
    if not all(ch.isalnum() or ch in _HOST_PUNCTUATION for ch in text):
        raise ConfigError(f"invalid value for '{key}': {text!r} is not a host name or address")
    return text


def _is_ipv6(text: str) -> bool:
    try:
        return ipaddress.ip_address(text).version == 6
    except ValueError:
        return False


_port = _int_in(1, 65535, "a port number (1-65535)")
_seconds = _int_in(1, 10 * 365 * 24 * 3600, "a positive whole number of seconds")
_seconds_or_zero = _int_in(0, 10 * 365 * 24 * 3600, "a whole number of seconds (0 or more)")
_count = _int_in(1, 1024, "a whole number from 1 to 1024")


def _bool(key: str, value: object) -> bool:
    """true/false (a TOML boolean, or the words on the command line and in the environment)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ConfigError(f"invalid value for '{key}': {value!r} is not true or false")


def _write_policy(key: str, value: object) -> WritePolicy:
    text = _text(key, value).strip().lower()
    try:
        return WritePolicy(text)
    except ValueError:
        choices = ", ".join(policy.value for policy in WritePolicy)
        raise ConfigError(f"invalid value for '{key}': {value!r} is not one of {choices}") from None


def _te_state(key: str, value: object) -> str:
    """A state of the `te/` firmware_update command that only tedge-firmware uses."""
    state = _text(key, value)
    problem = te_state_problem(state)
    if problem is not None:
        raise ConfigError(f"invalid value for '{key}': {problem}")
    return state


def _size(key: str, value: object) -> int:
    """Bytes: a whole number, or with a unit (`500MB`, `2GiB`)."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ConfigError(f"invalid value for '{key}': {value!r} is not a size (e.g. 2GiB)")
    try:
        return parse_size(_text(key, value) if isinstance(value, str) else str(value))
    except ValueError as error:
        raise ConfigError(f"invalid value for '{key}': {error}") from None


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
    KeySpec(
        "http.max_connections",
        _int_in(1, 65_536, "a whole number from 1 to 65536"),
        "File-transfer connections open at once; more get 503 (bounded by the open-file limit)",
        "1024",
    ),
    KeySpec(
        "http.idle_timeout",
        _seconds,
        "Seconds a file-transfer client may take to send its request headers or stay idle",
        "30",
    ),
    KeySpec("http.cert_path", _path, "TLS certificate of the file-transfer service (https)"),
    KeySpec(
        "http.ca_path",
        _path,
        "Directory of CA certificates: when set (with http.cert_path/key_path), file-transfer "
        "clients need a certificate signed by one of them, and a child reads only its own files",
    ),
    KeySpec(
        "http.client.auth.cert_file",
        _path,
        "Client certificate for the file-transfer service (a child's connector)",
    ),
    KeySpec("http.client.auth.key_file", _path, "Its private key"),
    KeySpec(
        "http.signed_links",
        _bool,
        "Hand children signed links that expire (HMAC, secret under data.path); the "
        "file-transfer service then refuses reads without a valid one",
        "false",
    ),
    KeySpec(
        "http.file_transfer.writes",
        _write_policy,
        "Who may PUT/DELETE on the file-transfer service: own (a certificate's own directory; "
        "anyone without client certificates), any, none",
        "own",
    ),
    KeySpec("http.key_path", _path, "TLS private key of the file-transfer service"),
    KeySpec(
        "c8y.smartrest.use_operation_id",
        _bool,
        "Take c8y_Firmware operations from their JSON form and report by operation id "
        "(504/505/506) instead of by type (501/502/503)",
        "false",
    ),
    KeySpec("c8y.proxy.bind.port", _port, "Port of thin-edge's Cumulocity proxy", "8001"),
    KeySpec(
        "c8y.proxy.client.host",
        _host,
        "Host of thin-edge's Cumulocity proxy in a te/ command's tedgeUrl",
        "127.0.0.1",
    ),
    KeySpec("c8y.proxy.client.port", _port, "Port in that tedgeUrl; default: c8y.proxy.bind.port"),
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
    KeySpec(
        "firmware.download.stall_timeout",
        _seconds,
        "Seconds without a byte before a download connection is dropped and resumed",
        "60",
    ),
    KeySpec(
        "firmware.download.retry_budget",
        _seconds,
        "Seconds a download may keep failing without progress before its operations fail",
        "21600",
    ),
    KeySpec(
        "firmware.cache.max_size",
        _size,
        "Cached firmware kept at most, in bytes (2GiB, 500MB); least recently used goes first",
    ),
    KeySpec(
        "firmware.cache.max_age",
        _seconds,
        "Seconds a cached firmware is kept after its last use",
    ),
    KeySpec(
        "firmware.download.windows",
        _windows,
        "Times of day (local) when cloud downloads may run, e.g. 22:00-06:00,12:30-13:00; "
        "default: any time",
    ),
    KeySpec(
        "firmware.download.max_rate",
        _size,
        "Bytes per second all cloud downloads together may take (2MB, 500KiB); default: no cap",
    ),
    KeySpec(
        "proxy.address",
        _proxy_address,
        "HTTP proxy (http[s]://host:port) for the gateway's downloads from the cloud",
    ),
    KeySpec("proxy.username", _text, "User name for the proxy (Basic)"),
    KeySpec("proxy.password", _text, "Password for the proxy (Basic)"),
    KeySpec(
        "proxy.no_proxy",
        _text,
        "Hosts reached without the proxy: comma-separated names (with their subdomains), "
        "addresses, networks (192.168.1.0/24) or *; default: the NO_PROXY environment variable",
    ),
    KeySpec(
        "firmware.cache.revalidate_after",
        _seconds_or_zero,
        "Seconds an origin's confirmation of a cached firmware is reused without asking it "
        "again (for bulk rollouts from origins that declare no freshness)",
        "0",
    ),
    KeySpec(
        "firmware.cache.upstream_when_full",
        _bool,
        "When the cache cannot hold a firmware even after evicting what nothing needs, hand "
        "te/ children its upstream URL (thin-edge's proxy tedgeUrl) instead of failing",
        "false",
    ),
    KeySpec(
        "firmware.cache.stale_if_error",
        _bool,
        "When the origin cannot be reached, hand out the cached copy (logged) instead of "
        "failing the operation",
        "false",
    ),
    KeySpec(
        "firmware.te.download_state",
        _te_state,
        "State of a te/ firmware_update command that tedge-firmware owns: it downloads then",
        "gateway_download",
    ),
    KeySpec(
        "firmware.te.downloaded_state",
        _te_state,
        "State tedge-firmware moves a te/ command to once the child's copy is ready",
        "gateway_downloaded",
    ),
    KeySpec(
        "firmware.registration.cloud_list_timeout",
        _seconds,
        "Seconds to wait for the cloud's list of children (106) before registering all",
        "5",
    ),
)

KEYS_BY_NAME: dict[str, KeySpec] = {spec.name: spec for spec in KEYS}
_SPELLINGS: dict[str, KeySpec] = {
    name: spec for spec in KEYS for name in (spec.name, *spec.aliases, *spec.v1)
}
# Dotted names that must be tables in the file ("mqtt", "mqtt.client", "mqtt.client.auth", ...).
_TABLE_NAMES: frozenset[str] = frozenset(
    name.rsplit(".", depth)[0] for name in _SPELLINGS for depth in range(1, name.count(".") + 1)
)

# Keys whose default is the effective value of other keys (the first one that has a value),
# as in thin-edge: mqtt.client.port follows mqtt.bind.port, and so on.
DERIVED_FROM: dict[str, tuple[str, ...]] = {
    "c8y.http": ("c8y.url",),
    "mqtt.client.port": ("mqtt.bind.port",),
    "c8y.proxy.client.port": ("c8y.proxy.bind.port",),
    "http.bind.address": ("mqtt.external.bind.address", "mqtt.bind.address"),
}
CONFIG_DIR_PLACEHOLDER = "<config-dir>"
# The file-transfer service's routes: thin-edge 0.x's, kept by thin-edge 1.x/2.x's tedge-agent
# as deprecated, and the 1.x one (both served by ours).
LEGACY_FILES_ROUTE = "/tedge/file-transfer"
FILES_ROUTE = "/te/v1/files"


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
        # A table where a key's value belongs is yielded whole, so that parsing rejects it
        # instead of the key silently reading as unset.
        if isinstance(value, Mapping) and dotted not in _SPELLINGS:
            yield from _flatten(value, dotted + ".")
        else:
            if dotted in _TABLE_NAMES:
                raise ConfigError(f"'{dotted}' must be a table of settings, not {value!r}")
            yield dotted, value


def _rank(spelling: str, spec: KeySpec) -> int:
    """The canonical spelling beats an alias, which beats a v1 spelling."""
    return 2 if spelling == spec.name else 1 if spelling in spec.aliases else 0


_ENV_NAMES: dict[str, tuple[str, KeySpec]] = {
    "TEDGE_" + name.replace(".", "_").upper(): (name, spec) for name, spec in _SPELLINGS.items()
}


def env_var_names(name: str) -> tuple[str, ...]:
    """The `TEDGE_*` variables that override a key (canonical spelling first)."""
    spec = find_key(name)
    spellings = (spec.name, *spec.aliases, *spec.v1)
    return tuple(dict.fromkeys("TEDGE_" + s.replace(".", "_").upper() for s in spellings))


def raw_values(doc: Mapping[str, Any], env: Mapping[str, str]) -> dict[str, tuple[object, str]]:
    """Canonical key → (raw value, where it came from). Unknown keys are ignored, as tedge does.

    The environment beats the file. When one key is given under several spellings in the same
    place, the canonical one wins, so the answer never depends on the order of the file.
    Raises ConfigError when a plain value sits where a table of settings belongs.
    """
    found: dict[str, tuple[object, str]] = {}
    ranks: dict[str, int] = {}

    def offer(spelling: str, spec: KeySpec, value: object, origin: str, base: int) -> None:
        rank = base + _rank(spelling, spec)
        if rank >= ranks.get(spec.name, -1):
            found[spec.name] = (value, origin)
            ranks[spec.name] = rank

    for dotted, value in _flatten(doc):
        spec = _SPELLINGS.get(dotted)
        if spec is not None:
            offer(dotted, spec, value, "file", 0)
    for var, value in env.items():
        entry = _ENV_NAMES.get(var.upper())
        if entry is not None:
            offer(entry[0], entry[1], value, f"environment variable {var}", 10)
    return found


def effective_value(
    name: str, raw: Mapping[str, tuple[object, str]], config_dir: Path, source: str
) -> Any:
    """The parsed value of one key: its own (file < env), else what it derives from, else default.

    `raw` comes from `raw_values`; `source` names the file in error messages. None when the
    key has no value at all. Raises ConfigError naming the key and where its bad value came from.
    """
    spec = find_key(name)
    if spec.name in raw:
        value, origin = raw[spec.name]
        try:
            return spec.parse(spec.name, value)
        except ConfigError as error:
            where = source if origin == "file" else origin
            raise ConfigError(f"{error} (in {where})") from None
    for other in DERIVED_FROM.get(spec.name, ()):
        derived = effective_value(other, raw, config_dir, source)
        if derived is not None:
            return derived
    if spec.default is None:
        return None
    return spec.parse(spec.name, spec.default.replace(CONFIG_DIR_PLACEHOLDER, str(config_dir)))


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
    http_max_connections: int
    http_idle_timeout: int
    http_cert_path: Path | None
    http_key_path: Path | None
    data_path: Path
    tmp_path: Path
    child_update_timeout: int
    download_parallel: int
    download_stall_timeout: int
    download_retry_budget: int
    registration_cloud_list_timeout: int
    http_ca_path: Path | None = None
    http_client_cert_file: Path | None = None
    http_client_key_file: Path | None = None
    http_writes: WritePolicy = WritePolicy.OWN
    http_signed_links: bool = False
    upstream_proxy: UpstreamProxy | None = None
    download_max_rate: int | None = None
    download_windows: tuple[Window, ...] = ()
    use_operation_id: bool = False
    c8y_proxy_host: str = "127.0.0.1"
    c8y_proxy_port: int = 8001
    te_download_state: str = "gateway_download"
    te_downloaded_state: str = "gateway_downloaded"
    cache_max_size: int | None = None
    cache_max_age: int | None = None
    cache_revalidate_after: int = 0
    cache_stale_if_error: bool = False
    cache_upstream_when_full: bool = False

    @property
    def cache_limits(self) -> CacheLimits:
        return CacheLimits(max_size=self.cache_max_size, max_age=self.cache_max_age)

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
    def c8y_operations_dir(self) -> Path:
        """`<config-dir>/operations/c8y`: the supported operations of the device and children."""
        return self.config_dir / "operations" / "c8y"

    @property
    def http_tls(self) -> bool:
        return self.http_cert_path is not None and self.http_key_path is not None

    @property
    def tenant_host(self) -> str | None:
        """The host a JWT may be sent to: c8y.http, else c8y.url, without scheme or port."""
        raw = self.c8y_http or self.c8y_url
        return None if raw is None else tenant_host_of(raw)

    def file_transfer_exposure(self) -> str | None:
        """A warning when the file-transfer service listens beyond this machine without TLS."""
        host = self.http_bind_address
        if self.http_tls or _is_loopback(host):
            return None
        return (
            f"the file-transfer service listens on {host} without TLS: anyone who can reach "
            f"port {self.http_bind_port} can read every child's firmware and write files; set "
            "http.cert_path and http.key_path (and http.ca_path to require client certificates)"
        )

    def file_transfer_base_url(self, route: str = LEGACY_FILES_ROUTE) -> str:
        """`http(s)://host:port/tedge/file-transfer` (or another `route` of the service), as
        handed to children."""
        host = self.http_client_host or self.http_bind_address
        if self.http_client_host is None and _is_unspecified(host):
            raise ConfigError(
                f"http.bind.address is {host}, which children cannot connect to: "
                "set http.client.host to the address children use to reach this gateway"
            )
        scheme = "https" if self.http_tls else "http"
        return f"{scheme}://{format_host(host)}:{self.http_bind_port}{route}"


def tenant_host_of(raw: str) -> str:
    """`https://t.example.com:443/x` or `t.example.com:443` → `t.example.com` (lowercase).

    Also safe on download URLs: the authority ends at the first `/`, `?` or `#`, and user
    info (`user:pw@`) is dropped, so `https://t.example.com:x@evil.com/` gives `evil.com`.
    """
    host = raw.strip().lower()
    if "://" in host:
        host = host.split("://", 1)[1]
    for delimiter in "/?#":
        host = host.split(delimiter, 1)[0]
    host = host.rsplit("@", 1)[-1]
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


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_unspecified(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def _download_windows(text: str | None) -> tuple[Window, ...]:
    return () if text is None else parse_windows(text)  # checked by the key's parser


def _upstream_proxy(get: Callable[[str], Any], env: Mapping[str, str]) -> UpstreamProxy | None:
    address = get("proxy.address")
    if address is None:
        return None
    username, password = get("proxy.username"), get("proxy.password")
    if password is not None and username is None:
        raise ConfigError("proxy.password is set without proxy.username: set both, or neither")
    no_proxy = get("proxy.no_proxy")
    if no_proxy is None:
        no_proxy = env.get("NO_PROXY", env.get("no_proxy"))
    return UpstreamProxy(address, username, password, parse_no_proxy(no_proxy))


def config_from_document(
    doc: Mapping[str, Any], env: Mapping[str, str], config_dir: Path, source: str
) -> TedgeConfig:
    """Validate a parsed `tedge.toml` plus environment overrides into a `TedgeConfig`.

    `source` names the file in error messages. Raises ConfigError naming the key.
    """
    try:
        raw = raw_values(doc, env)
    except ConfigError as error:
        raise ConfigError(f"{error} (in {source})") from None

    def get(name: str) -> Any:
        return effective_value(name, raw, config_dir, source)

    download_state = get("firmware.te.download_state")
    downloaded_state = get("firmware.te.downloaded_state")
    if download_state == downloaded_state:
        raise ConfigError(
            f"firmware.te.download_state and firmware.te.downloaded_state are both "
            f"{download_state!r} (in {source}): a command must move to another state"
        )
    return TedgeConfig(
        config_dir=config_dir,
        device_id=get("device.id"),
        device_cert_path=get("device.cert_path"),
        c8y_url=get("c8y.url"),
        # Kept unset when only c8y.url is given; `tenant_host` does the fallback.
        c8y_http=get("c8y.http") if "c8y.http" in raw else None,
        mqtt_host=get("mqtt.client.host"),
        mqtt_port=get("mqtt.client.port"),
        mqtt_auth=MqttAuth(
            ca_file=get("mqtt.client.auth.ca_file"),
            ca_dir=get("mqtt.client.auth.ca_dir"),
            cert_file=get("mqtt.client.auth.cert_file"),
            key_file=get("mqtt.client.auth.key_file"),
        ),
        http_bind_address=get("http.bind.address"),
        http_bind_port=get("http.bind.port"),
        http_client_host=get("http.client.host"),
        http_max_connections=get("http.max_connections"),
        http_idle_timeout=get("http.idle_timeout"),
        http_cert_path=get("http.cert_path"),
        http_key_path=get("http.key_path"),
        data_path=get("data.path"),
        tmp_path=get("tmp.path"),
        child_update_timeout=get("firmware.child.update.timeout"),
        download_parallel=get("firmware.download.parallel"),
        download_stall_timeout=get("firmware.download.stall_timeout"),
        download_retry_budget=get("firmware.download.retry_budget"),
        registration_cloud_list_timeout=get("firmware.registration.cloud_list_timeout"),
        http_ca_path=get("http.ca_path"),
        http_client_cert_file=get("http.client.auth.cert_file"),
        http_client_key_file=get("http.client.auth.key_file"),
        http_writes=get("http.file_transfer.writes"),
        http_signed_links=get("http.signed_links"),
        upstream_proxy=_upstream_proxy(get, env),
        download_max_rate=get("firmware.download.max_rate"),
        download_windows=_download_windows(get("firmware.download.windows")),
        use_operation_id=get("c8y.smartrest.use_operation_id"),
        c8y_proxy_host=get("c8y.proxy.client.host"),
        c8y_proxy_port=get("c8y.proxy.client.port"),
        te_download_state=download_state,
        te_downloaded_state=downloaded_state,
        cache_max_size=get("firmware.cache.max_size"),
        cache_max_age=get("firmware.cache.max_age"),
        cache_revalidate_after=get("firmware.cache.revalidate_after"),
        cache_stale_if_error=get("firmware.cache.stale_if_error"),
        cache_upstream_when_full=get("firmware.cache.upstream_when_full"),
    )
