"""Config model and `tedge.toml` on disk: every key, spellings, environment, bad input, device id,
derived URLs, and editing the file without losing comments or other keys."""

from __future__ import annotations

import datetime
import logging
import os
import re
import stat
import tomllib
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tedge_firmware.core.access import WritePolicy
from tedge_firmware.core.config import (
    KEYS,
    KEYS_BY_NAME,
    TedgeConfig,
    config_from_document,
    effective_value,
    env_var_names,
    find_key,
    format_host,
    raw_values,
    tenant_host_of,
    validate_value,
)
from tedge_firmware.errors import ConfigError
from tedge_firmware.shell.config_edit import set_value, unset_value
from tedge_firmware.shell.config_file import (
    load_config,
    read_device_id,
    read_document,
    resolve_device_id,
)

CONFIG_DIR = Path("/etc/tedge-test")


def nested(name: str, value: object) -> dict[str, Any]:
    """`a.b.c`, v → {"a": {"b": {"c": v}}}, the shape tomllib gives."""
    parts = name.split(".")
    doc: dict[str, Any] = {parts[-1]: value}
    for part in reversed(parts[:-1]):
        doc = {part: doc}
    return doc


def value_of(doc: dict[str, Any], name: str, env: dict[str, str] | None = None) -> Any:
    return effective_value(name, raw_values(doc, env or {}), CONFIG_DIR, "tedge.toml")


def from_doc(doc: dict[str, Any], env: dict[str, str] | None = None) -> TedgeConfig:
    return config_from_document(doc, env or {}, CONFIG_DIR, "/x/tedge.toml")


def write(config_dir: Path, text: str | bytes) -> Path:
    path = config_dir / "tedge.toml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


# --- every key: a valid value (as typed on the command line) and what it parses to -------------

VALID: dict[str, tuple[str, object]] = {
    "device.id": ("my-gateway", "my-gateway"),
    "device.cert_path": ("/etc/ssl/gw.pem", Path("/etc/ssl/gw.pem")),
    "c8y.url": ("tenant.example.com", "tenant.example.com"),
    "c8y.http": ("http.tenant.example.com:443", "http.tenant.example.com:443"),
    "mqtt.bind.address": ("0.0.0.0", "0.0.0.0"),
    "mqtt.bind.port": ("1884", 1884),
    "mqtt.client.host": ("broker.local", "broker.local"),
    "mqtt.client.port": ("8883", 8883),
    "mqtt.client.auth.ca_file": ("/etc/ca.pem", Path("/etc/ca.pem")),
    "mqtt.client.auth.ca_dir": ("/etc/ssl/certs", Path("/etc/ssl/certs")),
    "mqtt.client.auth.cert_file": ("/etc/client.pem", Path("/etc/client.pem")),
    "mqtt.client.auth.key_file": ("/etc/client.key", Path("/etc/client.key")),
    "mqtt.external.bind.address": ("192.168.1.10", "192.168.1.10"),
    "http.bind.address": ("[fd00::1]", "fd00::1"),
    "http.bind.port": ("65535", 65535),
    "http.client.host": ("gateway.lan", "gateway.lan"),
    "http.max_connections": ("2048", 2048),
    "http.idle_timeout": ("10", 10),
    "http.cert_path": ("/etc/ft.pem", Path("/etc/ft.pem")),
    "http.key_path": ("/etc/ft.key", Path("/etc/ft.key")),
    "data.path": ("/srv/tedge", Path("/srv/tedge")),
    "tmp.path": ("/var/tmp", Path("/var/tmp")),
    "firmware.child.update.timeout": ("1", 1),
    "firmware.download.parallel": ("1024", 1024),
    "firmware.download.stall_timeout": ("5", 5),
    "firmware.download.retry_budget": ("86400", 86400),
    "firmware.registration.cloud_list_timeout": ("2", 2),
    "firmware.cache.max_size": ("2GiB", 2 * 2**30),
    "firmware.cache.max_age": ("2592000", 2592000),
    "firmware.cache.revalidate_after": ("0", 0),
    "firmware.download.max_rate": ("2MB", 2_000_000),
    "firmware.download.windows": ("22:00-06:00", "22:00-06:00"),
    "proxy.address": ("http://proxy.lan:3128", "http://proxy.lan:3128"),
    "proxy.username": ("site", "site"),
    "proxy.password": ("s3cret", "s3cret"),
    "proxy.no_proxy": ("localhost,10.0.0.0/8", "localhost,10.0.0.0/8"),
    "firmware.cache.stale_if_error": ("true", True),
    "firmware.cache.upstream_when_full": ("true", True),
    "c8y.proxy.bind.port": ("8101", 8101),
    "c8y.smartrest.use_operation_id": ("true", True),
    "http.ca_path": ("/etc/tedge/ca", Path("/etc/tedge/ca")),
    "http.file_transfer.writes": ("none", WritePolicy.NONE),
    "http.signed_links": ("true", True),
    "http.client.auth.cert_file": ("/etc/tedge/child.crt", Path("/etc/tedge/child.crt")),
    "http.client.auth.key_file": ("/etc/tedge/child.key", Path("/etc/tedge/child.key")),
    "c8y.proxy.client.host": ("gateway.lan", "gateway.lan"),
    "c8y.proxy.client.port": ("8102", 8102),
    "firmware.te.download_state": ("fw_cache", "fw_cache"),
    "firmware.te.downloaded_state": ("fw-cached", "fw-cached"),
}

DEFAULTS: dict[str, object] = {
    "device.id": None,
    "device.cert_path": CONFIG_DIR / "device-certs" / "tedge-certificate.pem",
    "c8y.url": None,
    "c8y.http": None,
    "mqtt.bind.address": "127.0.0.1",
    "mqtt.bind.port": 1883,
    "mqtt.client.host": "localhost",
    "mqtt.client.port": 1883,
    "mqtt.client.auth.ca_file": None,
    "mqtt.client.auth.ca_dir": None,
    "mqtt.client.auth.cert_file": None,
    "mqtt.client.auth.key_file": None,
    "mqtt.external.bind.address": None,
    "http.bind.address": "127.0.0.1",
    "http.bind.port": 8000,
    "http.client.host": None,
    "http.max_connections": 1024,
    "http.idle_timeout": 30,
    "http.cert_path": None,
    "http.key_path": None,
    "data.path": Path("/var/tedge"),
    "tmp.path": Path("/tmp"),
    "firmware.child.update.timeout": 3600,
    "firmware.download.parallel": 4,
    "firmware.download.stall_timeout": 60,
    "firmware.download.retry_budget": 21600,
    "firmware.registration.cloud_list_timeout": 5,
    "firmware.cache.max_size": None,
    "firmware.cache.max_age": None,
    "firmware.cache.revalidate_after": 0,
    "firmware.download.max_rate": None,
    "firmware.download.windows": None,
    "proxy.address": None,
    "proxy.username": None,
    "proxy.password": None,
    "proxy.no_proxy": None,
    "firmware.cache.stale_if_error": False,
    "firmware.cache.upstream_when_full": False,
    "c8y.proxy.bind.port": 8001,
    "c8y.smartrest.use_operation_id": False,
    "http.ca_path": None,
    "http.file_transfer.writes": WritePolicy.OWN,
    "http.signed_links": False,
    "http.client.auth.cert_file": None,
    "http.client.auth.key_file": None,
    "c8y.proxy.client.host": "127.0.0.1",
    "c8y.proxy.client.port": 8001,
    "firmware.te.download_state": "gateway_download",
    "firmware.te.downloaded_state": "gateway_downloaded",
}


def test_tables_cover_every_key() -> None:
    assert set(VALID) == set(KEYS_BY_NAME)
    assert set(DEFAULTS) == set(KEYS_BY_NAME)


@pytest.mark.parametrize(("name", "case"), VALID.items())
def test_valid_value_from_file_and_command_line(name: str, case: tuple[str, object]) -> None:
    typed, expected = case
    assert validate_value(name, typed) == expected
    # In the file, integers are TOML integers.
    in_file = expected if isinstance(expected, int) else typed
    assert value_of(nested(name, in_file), name) == expected


@pytest.mark.parametrize(("name", "expected"), DEFAULTS.items())
def test_default_of_every_key(name: str, expected: object) -> None:
    assert value_of({}, name) == expected


def test_defaults_in_the_config_record() -> None:
    config = from_doc({})
    assert config.device_id is None
    assert config.device_cert_path == CONFIG_DIR / "device-certs" / "tedge-certificate.pem"
    assert (config.c8y_url, config.c8y_http, config.tenant_host) == (None, None, None)
    assert (config.mqtt_host, config.mqtt_port) == ("localhost", 1883)
    assert not config.mqtt_auth.uses_tls
    assert (config.http_bind_address, config.http_bind_port) == ("127.0.0.1", 8000)
    assert config.data_path == Path("/var/tedge")
    assert config.cache_dir == Path("/var/tedge/cache")
    assert config.firmware_dir == Path("/var/tedge/firmware")
    assert config.file_transfer_dir == Path("/var/tedge/file-transfer")
    assert config.tmp_path == Path("/tmp")
    assert (config.child_update_timeout, config.download_parallel) == (3600, 4)
    assert config.cache_limits.unlimited
    assert (config.c8y_proxy_host, config.c8y_proxy_port) == ("127.0.0.1", 8001)
    assert (config.te_download_state, config.te_downloaded_state) == (
        "gateway_download",
        "gateway_downloaded",
    )


def test_the_proxy_client_port_follows_the_bind_port() -> None:
    assert from_doc({"c8y": {"proxy": {"bind": {"port": 9001}}}}).c8y_proxy_port == 9001


@pytest.mark.parametrize(
    "bad", ["executing", "init", "successful", "failed", "scheduled", "Gateway", "a b", "", "x" * 80]
)
def test_te_states_that_thin_edge_uses_or_cannot_be_states_are_refused(bad: str) -> None:
    for key in ("firmware.te.download_state", "firmware.te.downloaded_state"):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            validate_value(key, bad)


@pytest.mark.parametrize(("value", "expected"), [(True, True), (False, False), ("TRUE", True), (" false ", False)])
def test_use_operation_id_takes_booleans(value: object, expected: bool) -> None:
    assert from_doc({"c8y": {"smartrest": {"use_operation_id": value}}}).use_operation_id is expected


@pytest.mark.parametrize("bad", ["yes", "1", 1, 0, "", "truee"])
def test_use_operation_id_refuses_anything_else(bad: object) -> None:
    with pytest.raises(ConfigError, match=r"c8y\.smartrest\.use_operation_id"):
        from_doc({"c8y": {"smartrest": {"use_operation_id": bad}}})


def test_the_two_te_states_must_differ() -> None:
    doc = {"firmware": {"te": {"download_state": "fw", "downloaded_state": "fw"}}}
    with pytest.raises(ConfigError, match=r"both 'fw' \(in /x/tedge.toml\)"):
        from_doc(doc)


def test_every_key_reaches_the_config_record() -> None:
    doc: dict[str, Any] = {}
    for name, (_typed, expected) in VALID.items():
        value = expected if isinstance(expected, int) else str(expected)
        _merge(doc, nested(name, value))
    config = from_doc(doc)
    assert config.device_id == "my-gateway"
    assert config.device_cert_path == Path("/etc/ssl/gw.pem")
    assert (config.c8y_url, config.c8y_http) == (
        "tenant.example.com",
        "http.tenant.example.com:443",
    )
    assert config.tenant_host == "http.tenant.example.com"
    assert (config.mqtt_host, config.mqtt_port) == ("broker.local", 8883)
    assert config.mqtt_auth.ca_file == Path("/etc/ca.pem")
    assert config.mqtt_auth.ca_dir == Path("/etc/ssl/certs")
    assert config.mqtt_auth.cert_file == Path("/etc/client.pem")
    assert config.mqtt_auth.key_file == Path("/etc/client.key")
    assert config.mqtt_auth.uses_tls
    assert (config.http_bind_address, config.http_bind_port) == ("fd00::1", 65535)
    assert config.http_client_host == "gateway.lan"
    assert (config.http_cert_path, config.http_key_path) == (
        Path("/etc/ft.pem"),
        Path("/etc/ft.key"),
    )
    assert (config.data_path, config.tmp_path) == (Path("/srv/tedge"), Path("/var/tmp"))
    assert (config.child_update_timeout, config.download_parallel) == (1, 1024)
    assert config.registration_cloud_list_timeout == 2
    assert (config.cache_max_size, config.cache_max_age) == (2 * 2**30, 2592000)
    assert (config.cache_limits.max_size, config.cache_limits.max_age) == (2 * 2**30, 2592000)
    assert config.c8y_operations_dir == CONFIG_DIR / "operations" / "c8y"
    assert (config.c8y_proxy_host, config.c8y_proxy_port) == ("gateway.lan", 8102)
    assert config.use_operation_id is True
    assert (config.te_download_state, config.te_downloaded_state) == ("fw_cache", "fw-cached")


def _merge(into: dict[str, Any], other: dict[str, Any]) -> None:
    for key, value in other.items():
        if isinstance(value, dict):
            _merge(into.setdefault(key, {}), value)
        else:
            into[key] = value


# --- derived defaults --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("doc", "mqtt_port", "http_address"),
    [
        ({}, 1883, "127.0.0.1"),
        ({"mqtt": {"bind": {"port": 2000, "address": "10.0.0.2"}}}, 2000, "10.0.0.2"),
        ({"mqtt": {"bind": {"port": 2000}, "client": {"port": 3000}}}, 3000, "127.0.0.1"),
        ({"mqtt": {"external": {"bind": {"address": "10.0.0.3"}}}}, 1883, "10.0.0.3"),
        (
            {
                "mqtt": {"external": {"bind": {"address": "10.0.0.3"}}},
                "http": {"bind": {"address": "10.0.0.4"}},
            },
            1883,
            "10.0.0.4",
        ),
    ],
)
def test_derived_defaults_agree_between_record_and_lookup(
    doc: dict[str, Any], mqtt_port: int, http_address: str
) -> None:
    config = from_doc(doc)
    assert (config.mqtt_port, config.http_bind_address) == (mqtt_port, http_address)
    assert value_of(doc, "mqtt.client.port") == mqtt_port
    assert value_of(doc, "http.bind.address") == http_address


def test_c8y_http_follows_c8y_url_for_lookup_but_stays_unset_in_the_record() -> None:
    doc = {"c8y": {"url": "t.example.com"}}
    assert value_of(doc, "c8y.http") == "t.example.com"
    config = from_doc(doc)
    assert config.c8y_http is None
    assert config.tenant_host == "t.example.com"


# --- spellings: aliases, v1 and case ----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "name", "expected"),
    [
        # aliases
        ('[http]\naddress = "10.1.1.1"\n', "http.bind.address", "10.1.1.1"),
        ("[http]\nport = 9000\n", "http.bind.port", 9000),
        # v1 spellings (no [config] version)
        ("[mqtt]\nport = 1885\n", "mqtt.bind.port", 1885),
        ('[mqtt]\nbind_address = "10.0.0.9"\n', "mqtt.bind.address", "10.0.0.9"),
        ('[mqtt]\nclient_host = "broker.v1"\n', "mqtt.client.host", "broker.v1"),
        ("[mqtt]\nclient_port = 1999\n", "mqtt.client.port", 1999),
        ('[mqtt]\nclient_ca_file = "/ca.pem"\n', "mqtt.client.auth.ca_file", Path("/ca.pem")),
        ('[mqtt]\nclient_ca_path = "/cas"\n', "mqtt.client.auth.ca_dir", Path("/cas")),
        (
            '[mqtt.client_auth]\ncert_file = "/c.pem"\n',
            "mqtt.client.auth.cert_file",
            Path("/c.pem"),
        ),
        ('[mqtt.client_auth]\nkey_file = "/c.key"\n', "mqtt.client.auth.key_file", Path("/c.key")),
        ('[mqtt]\nexternal_bind_address = "10.2.2.2"\n', "mqtt.external.bind.address", "10.2.2.2"),
        ('[http]\nbind_address = "10.3.3.3"\n', "http.bind.address", "10.3.3.3"),
        ("[firmware]\nchild_update_timeout = 77\n", "firmware.child.update.timeout", 77),
        ('[config]\nversion = "1"\n[mqtt]\nport = 1886\n', "mqtt.bind.port", 1886),
        # v2 with dotted keys, inline tables and upper case
        ("firmware.child.update.timeout = 12\n", "firmware.child.update.timeout", 12),
        ("http = { bind = { port = 8111 } }\n", "http.bind.port", 8111),
        ('[C8Y]\nURL = "upper.example.com"\n', "c8y.url", "upper.example.com"),
    ],
)
def test_spellings_read_from_a_file(tmp_path: Path, text: str, name: str, expected: object) -> None:
    write(tmp_path, text)
    raw = raw_values(read_document(tmp_path / "tedge.toml"), {})
    assert effective_value(name, raw, tmp_path, "f") == expected


def test_v1_file_is_read_and_not_rewritten(tmp_path: Path) -> None:
    text = (
        '# v1\n[mqtt]\nport = 1885\nclient_host = "b"\n[http]\nport = 8001\n[c8y]\nurl = "t.io"\n'
    )
    path = write(tmp_path, text)
    config = load_config(tmp_path, {})
    assert (config.mqtt_host, config.mqtt_port, config.http_bind_port) == ("b", 1885, 8001)
    assert config.c8y_url == "t.io"
    assert path.read_text() == text


@pytest.mark.parametrize(
    "text",
    [
        "[http]\nport = 1\n[http.bind]\nport = 2\n",
        "[http.bind]\nport = 2\n[http]\nport = 1\n",
        "[mqtt]\nport = 1\n[mqtt.bind]\nport = 2\n",
        "[mqtt.bind]\nport = 2\n[mqtt]\nport = 1\n",
    ],
)
def test_canonical_spelling_wins_whatever_the_order(tmp_path: Path, text: str) -> None:
    write(tmp_path, text)
    raw = raw_values(read_document(tmp_path / "tedge.toml"), {})
    name = "http.bind.port" if "http" in text else "mqtt.bind.port"
    assert effective_value(name, raw, tmp_path, "f") == 2


@pytest.mark.parametrize("name", ["HTTP.PORT", " c8y.url ", "Mqtt.Client.Port", "mqtt.client_host"])
def test_find_key_is_case_insensitive_and_knows_aliases(name: str) -> None:
    assert find_key(name).name in KEYS_BY_NAME


@pytest.mark.parametrize(
    "name", ["", "c8y", "c8y.url.x", "mqtt.client", "logs.path", "config.version"]
)
def test_unknown_keys_are_rejected(name: str) -> None:
    with pytest.raises(ConfigError, match="unknown configuration key"):
        find_key(name)


def test_unknown_keys_in_the_file_are_ignored() -> None:
    config = from_doc(
        {"c8y": {"url": "t.io", "smartrest": {"templates": []}}, "logs": {"path": "/l"}}
    )
    assert config.c8y_url == "t.io"


# --- environment ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "name", "expected"),
    [
        ({"TEDGE_MQTT_CLIENT_PORT": "1999"}, "mqtt.client.port", 1999),
        ({"TEDGE_C8Y_URL": "env.example.com"}, "c8y.url", "env.example.com"),
        ({"tedge_c8y_url": "lower.example.com"}, "c8y.url", "lower.example.com"),
        ({"Tedge_Mqtt_Client_Port": "2001"}, "mqtt.client.port", 2001),
        ({"TEDGE_HTTP_PORT": "8088"}, "http.bind.port", 8088),
        ({"TEDGE_HTTP_ADDRESS": "10.9.9.9"}, "http.bind.address", "10.9.9.9"),
        ({"TEDGE_FIRMWARE_CHILD_UPDATE_TIMEOUT": "42"}, "firmware.child.update.timeout", 42),
        ({"TEDGE_MQTT_PORT": "1777"}, "mqtt.bind.port", 1777),
        ({"TEDGE_HTTP_PORT": "1", "TEDGE_HTTP_BIND_PORT": "2"}, "http.bind.port", 2),
        ({"TEDGE_HTTP_BIND_PORT": "2", "TEDGE_HTTP_PORT": "1"}, "http.bind.port", 2),
        ({"TEDGE_UNRELATED": "x", "PATH": "/bin"}, "c8y.url", None),
    ],
)
def test_environment_overrides(env: dict[str, str], name: str, expected: object) -> None:
    assert value_of({}, name, env) == expected


def test_environment_beats_the_file(tmp_path: Path) -> None:
    write(tmp_path, '[c8y]\nurl = "file.example.com"\n[mqtt.client]\nport = 1111\n')
    env = {"TEDGE_MQTT_CLIENT_PORT": "2222", "TEDGE_C8Y_URL": "env.example.com"}
    config = load_config(tmp_path, env)
    assert (config.mqtt_port, config.c8y_url) == (2222, "env.example.com")
    assert load_config(tmp_path, {}).mqtt_port == 1111


def test_load_config_reads_os_environ_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEDGE_MQTT_CLIENT_PORT", "2345")
    assert load_config(tmp_path).mqtt_port == 2345


def test_invalid_environment_value_names_the_variable() -> None:
    with pytest.raises(
        ConfigError, match=r"mqtt\.client\.port.*environment variable TEDGE_MQTT_CLIENT_PORT"
    ):
        from_doc({}, {"TEDGE_MQTT_CLIENT_PORT": "abc"})


def test_env_var_names_lists_every_spelling() -> None:
    assert env_var_names("http.port") == ("TEDGE_HTTP_BIND_PORT", "TEDGE_HTTP_PORT")
    assert env_var_names("mqtt.bind.port") == ("TEDGE_MQTT_BIND_PORT", "TEDGE_MQTT_PORT")


# --- invalid values -------------------------------------------------------------------------------

PORT_KEYS = ["mqtt.bind.port", "mqtt.client.port", "http.bind.port"]
HOST_KEYS = [
    spec.name
    for spec in KEYS
    if spec.name.endswith((".address", ".host", ".url", ".http")) and spec.name != "proxy.address"
]  # proxy.address is a URL (test_upstream_proxy)


@pytest.mark.parametrize("name", PORT_KEYS)
@pytest.mark.parametrize(
    "bad",
    ["abc", "0", "70000", "65536", "-1", "true", "", " ", "1_000", "+80", "80.0", "٣٣", "0x50"],
)
def test_invalid_port_typed(name: str, bad: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"'{name}'")):
        validate_value(name, bad)


@pytest.mark.parametrize("name", PORT_KEYS)
@pytest.mark.parametrize("bad", [0, 70000, -1, True, False, 1.5, 1883.0, [1883], {"a": 1}, "abc"])
def test_invalid_port_in_file_names_key_and_file(name: str, bad: object) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"'{name}'") + r".*/x/tedge\.toml"):
        from_doc(nested(name, bad))


@pytest.mark.parametrize("bad", ["0", "-5", "abc", "1.5", str(10 * 365 * 24 * 3600 + 1)])
def test_invalid_timeout(bad: str) -> None:
    with pytest.raises(ConfigError, match=r"firmware\.child\.update\.timeout"):
        validate_value("firmware.child.update.timeout", bad)


@pytest.mark.parametrize(
    "bad", ["0", "0MB", "-1", "2 GiB of disk", "1e9", "2XB", "", "1,5GB", "\u0662GB", "5\nGB"]
)
def test_invalid_cache_max_size(bad: str) -> None:
    with pytest.raises(ConfigError, match=r"firmware\.cache\.max_size"):
        validate_value("firmware.cache.max_size", bad)


@pytest.mark.parametrize("name", ["firmware.cache.max_size", "firmware.cache.max_age", "http.bind.port"])
@pytest.mark.parametrize("bad", ["9" * 400, "9" * 5000, "9" * 400 + "GiB", "1" * 21])
def test_huge_numbers_are_a_config_error_not_a_crash(name: str, bad: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"'{name}'")):
        validate_value(name, bad)
    with pytest.raises(ConfigError, match=re.escape(f"'{name}'")):
        from_doc(nested(name, bad))


@pytest.mark.parametrize("bad", [True, 1.5, [1], {"a": 1}, -3])
def test_invalid_cache_max_size_in_file(bad: object) -> None:
    with pytest.raises(ConfigError, match=r"firmware\.cache\.max_size.*/x/tedge\.toml"):
        from_doc(nested("firmware.cache.max_size", bad))


@pytest.mark.parametrize(("text", "size"), [("1", 1), ("500MB", 500 * 10**6), ("1.5GiB", 3 * 2**29)])
def test_cache_max_size_units(text: str, size: int) -> None:
    assert validate_value("firmware.cache.max_size", text) == size


@pytest.mark.parametrize(
    ("name", "bad"),
    [("http.max_connections", bad) for bad in ["0", "65537", "-1", "lots", "1e3", "9" * 5000]]
    + [("http.idle_timeout", bad) for bad in ["0", "-5", "30s", "1.5", "9" * 5000]],
)
def test_invalid_file_transfer_limits(name: str, bad: str) -> None:
    with pytest.raises(ConfigError, match=name.replace(".", r"\.")):
        validate_value(name, bad)


@pytest.mark.parametrize("bad", ["0", "1025", "-1", "many"])
def test_invalid_download_parallel(bad: str) -> None:
    with pytest.raises(ConfigError, match=r"firmware\.download\.parallel"):
        validate_value("firmware.download.parallel", bad)


@pytest.mark.parametrize("name", HOST_KEYS)
@pytest.mark.parametrize(
    "bad",
    [
        "",
        "   ",
        "my host",
        "host\tname",
        "a\nb",
        "a\rb",
        "nul\x00byte",
        "bell\x07",
        "https://t.example.com",
        "t.example.com/path",
        "user@evil.com",
        "host?x",
        "host#x",
        "[not-ipv6]",
        "[::1",
        "[10.0.0.1]",
        '"quoted"',
    ],
)
def test_invalid_hosts(name: str, bad: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"'{name}'")):
        validate_value(name, bad)


@pytest.mark.parametrize(
    ("name", "good", "expected"),
    [
        ("http.client.host", "::1", "::1"),
        ("http.client.host", "[::1]", "::1"),
        ("http.client.host", " gateway.lan ", "gateway.lan"),
        ("http.client.host", "fe80::1%eth0", "fe80::1%eth0"),
        ("c8y.url", "tenant.example.com:8443", "tenant.example.com:8443"),
        ("c8y.url", "münchen.example", "münchen.example"),
    ],
)
def test_valid_hosts(name: str, good: str, expected: str) -> None:
    assert validate_value(name, good) == expected


@pytest.mark.parametrize("name", ["device.id", "data.path", "http.cert_path"])
@pytest.mark.parametrize("bad", ["", "  ", "line\nbreak", "cr\rhere", "tab\tinside", "esc\x1b[0m"])
def test_invalid_text_values(name: str, bad: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"'{name}'")):
        validate_value(name, bad)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # a table where a value is expected
        ('[c8y.url]\nhost = "t.io"\n', "'c8y.url'"),
        ("[mqtt.client.port]\nvalue = 1\n", "'mqtt.client.port'"),
        ("http = { port = { number = 1 } }\n", "'http.bind.port'"),
        # arrays and other types where a value is expected
        ('[c8y]\nurl = ["a", "b"]\n', "'c8y.url'"),
        ("[mqtt.bind]\nport = true\n", "'mqtt.bind.port'"),
        ("[data]\npath = 1979-05-27\n", "'data.path'"),
        ("[firmware.child.update]\ntimeout = -1\n", "'firmware.child.update.timeout'"),
        ("[firmware.child.update]\ntimeout = 0\n", "'firmware.child.update.timeout'"),
        ('[firmware.child.update]\ntimeout = "soon"\n', "'firmware.child.update.timeout'"),
        ('[mqtt.client]\nhost = ""\n', "'mqtt.client.host'"),
        ('[mqtt.client]\nhost = "two words"\n', "'mqtt.client.host'"),
        ('[c8y]\nurl = "a\\nb"\n', "'c8y.url'"),
        # a value where a table is expected
        ("http = 5\n", "'http' must be a table"),
        ('[mqtt]\nclient = "localhost"\n', "'mqtt.client' must be a table"),
        ("[[firmware]]\nx = 1\n", "'firmware' must be a table"),
    ],
)
def test_wrong_toml_types_name_key_and_file(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=re.escape(message)) as caught:
        load_config(tmp_path, {})
    assert str(path) in str(caught.value)


# --- reading the file -------------------------------------------------------------------------------


def test_missing_file_means_defaults(tmp_path: Path) -> None:
    assert read_document(tmp_path / "tedge.toml") == {}
    assert load_config(tmp_path, {}).mqtt_port == 1883


def test_missing_config_dir_means_defaults(tmp_path: Path) -> None:
    assert load_config(tmp_path / "nowhere", {}).http_bind_port == 8000


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("[c8y]\nurl = \n", 2),
        ('[c8y]\nurl = "a"\n\n[mqtt\nport = 1\n', 4),
        ('[c8y]\nurl = "a"\nurl = "b"\n', 3),
        ('[c8y]\nurl = "unterminated\n', 2),
        ("[http.bind]\nport = 1\n[http.bind]\nport = 2\n", 3),
    ],
)
def test_toml_syntax_error_names_file_and_line(tmp_path: Path, text: str, line: int) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path, {})
    message = str(caught.value)
    assert str(path) in message
    assert f"line {line}" in message
    assert "\n" not in message


def test_non_utf8_file_is_a_config_error(tmp_path: Path) -> None:
    path = write(tmp_path, b'[c8y]\nurl = "caf\xe9.example.com"\n')
    with pytest.raises(ConfigError, match="not UTF-8") as caught:
        read_document(path)
    assert str(path) in str(caught.value)


def test_directory_named_tedge_toml_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "tedge.toml").mkdir()
    with pytest.raises(ConfigError, match="cannot read") as caught:
        load_config(tmp_path, {})
    assert str(tmp_path / "tedge.toml") in str(caught.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a mode-000 file anyway")
def test_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    path = write(tmp_path, '[c8y]\nurl = "t.io"\n')
    path.chmod(0)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path, {})


def test_byte_order_mark_is_tolerated(tmp_path: Path) -> None:
    write(tmp_path, '\ufeff[c8y]\nurl = "bom.example.com"\n'.encode())
    assert load_config(tmp_path, {}).c8y_url == "bom.example.com"


# --- device id from the certificate --------------------------------------------------------------


def make_certificate(common_name: str | None) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Thin Edge")]
    if common_name is not None:
        attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    name = x509.Name(attributes)
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return certificate.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def gateway_pem() -> bytes:
    return make_certificate("my-gateway")


def test_device_id_is_the_certificate_cn(tmp_path: Path, gateway_pem: bytes) -> None:
    cert = tmp_path / "cert.pem"
    cert.write_bytes(gateway_pem)
    assert read_device_id(cert) == "my-gateway"


def test_device_id_from_the_first_certificate_of_a_chain(
    tmp_path: Path, gateway_pem: bytes
) -> None:
    cert = tmp_path / "chain.pem"
    cert.write_bytes(gateway_pem + make_certificate("the-ca"))
    assert read_device_id(cert) == "my-gateway"


def test_resolve_device_id_uses_the_default_certificate_path(
    tmp_path: Path, gateway_pem: bytes
) -> None:
    (tmp_path / "device-certs").mkdir()
    (tmp_path / "device-certs" / "tedge-certificate.pem").write_bytes(gateway_pem)
    assert resolve_device_id(load_config(tmp_path, {})) == "my-gateway"


def test_configured_device_id_beats_the_certificate(tmp_path: Path, gateway_pem: bytes) -> None:
    cert = tmp_path / "cert.pem"
    cert.write_bytes(gateway_pem)
    write(tmp_path, f'[device]\nid = "configured"\ncert_path = "{cert}"\n')
    assert resolve_device_id(load_config(tmp_path, {})) == "configured"


def test_device_cert_path_from_the_file(tmp_path: Path, gateway_pem: bytes) -> None:
    cert = tmp_path / "elsewhere.pem"
    cert.write_bytes(gateway_pem)
    write(tmp_path, f'[device]\ncert_path = "{cert}"\n')
    assert resolve_device_id(load_config(tmp_path, {})) == "my-gateway"


def test_missing_certificate_is_a_clear_error(tmp_path: Path) -> None:
    config = load_config(tmp_path, {})
    expected = f"device.id is not set and the certificate {config.device_cert_path} cannot be read"
    with pytest.raises(ConfigError, match="No such file") as caught:
        resolve_device_id(config)
    assert str(caught.value).startswith(expected)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"not a certificate",
        b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        b"\xff\xfe",
    ],
)
def test_garbage_certificate_is_a_clear_error(tmp_path: Path, content: bytes) -> None:
    cert = tmp_path / "cert.pem"
    cert.write_bytes(content)
    with pytest.raises(
        ConfigError, match=r"device\.id is not set .* cannot be read: not a PEM certificate"
    ):
        read_device_id(cert)


@pytest.mark.parametrize("common_name", [None, "   ", "bad\nname"])
def test_certificate_without_usable_cn(tmp_path: Path, common_name: str | None) -> None:
    cert = tmp_path / "cert.pem"
    cert.write_bytes(make_certificate(common_name))
    with pytest.raises(ConfigError, match=r"device\.id is not set"):
        read_device_id(cert)


def test_certificate_path_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"device\.id is not set"):
        read_device_id(tmp_path)


# --- derived URLs and hosts ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("http", "expected"),
    [
        (
            {"bind": {"address": "192.168.1.5", "port": 8000}},
            "http://192.168.1.5:8000/tedge/file-transfer",
        ),
        (
            {"bind": {"address": "fd00::5", "port": 8001}},
            "http://[fd00::5]:8001/tedge/file-transfer",
        ),
        ({"bind": {"address": "[fd00::6]"}}, "http://[fd00::6]:8000/tedge/file-transfer"),
        ({"bind": {"address": "gateway.lan"}}, "http://gateway.lan:8000/tedge/file-transfer"),
        (
            {"bind": {"address": "0.0.0.0"}, "client": {"host": "10.0.0.1"}},
            "http://10.0.0.1:8000/tedge/file-transfer",
        ),
        (
            {"bind": {"address": "::"}, "client": {"host": "fd00::7"}},
            "http://[fd00::7]:8000/tedge/file-transfer",
        ),
        ({}, "http://127.0.0.1:8000/tedge/file-transfer"),
        (
            {"bind": {"address": "10.0.0.1"}, "cert_path": "/c.pem", "key_path": "/c.key"},
            "https://10.0.0.1:8000/tedge/file-transfer",
        ),
        (
            {"bind": {"address": "10.0.0.1"}, "cert_path": "/c.pem"},
            "http://10.0.0.1:8000/tedge/file-transfer",
        ),
        (
            {"bind": {"address": "10.0.0.1"}, "key_path": "/c.key"},
            "http://10.0.0.1:8000/tedge/file-transfer",
        ),
    ],
)
def test_file_transfer_base_url(http: dict[str, Any], expected: str) -> None:
    assert from_doc({"http": http}).file_transfer_base_url() == expected


def test_file_transfer_host_follows_mqtt_external_bind_address() -> None:
    config = from_doc({"mqtt": {"external": {"bind": {"address": "10.5.5.5"}}}})
    assert config.file_transfer_base_url() == "http://10.5.5.5:8000/tedge/file-transfer"


@pytest.mark.parametrize("address", ["0.0.0.0", "::", "[::]"])
def test_unspecified_bind_address_without_client_host_is_a_config_error(address: str) -> None:
    config = from_doc({"http": {"bind": {"address": address}}})
    with pytest.raises(ConfigError, match=r"http\.client\.host"):
        config.file_transfer_base_url()


@pytest.mark.parametrize(
    ("host", "expected"),
    [("::1", "[::1]"), ("10.0.0.1", "10.0.0.1"), ("name", "name"), ("fd00::1", "[fd00::1]")],
)
def test_format_host(host: str, expected: str) -> None:
    assert format_host(host) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("t.example.com", "t.example.com"),
        ("T.Example.COM", "t.example.com"),
        ("t.example.com:443", "t.example.com"),
        ("https://t.example.com", "t.example.com"),
        ("https://t.example.com:8443/inventory/binaries/1", "t.example.com"),
        ("HTTPS://T.EXAMPLE.COM/", "t.example.com"),
        ("  t.example.com  ", "t.example.com"),
        ("[::1]:443", "::1"),
        ("https://[fd00::1]:443/x", "fd00::1"),
        ("fd00::1", "fd00::1"),
        ("https://t.example.com?x=1", "t.example.com"),
        ("https://t.example.com#frag", "t.example.com"),
        # user info is not the host: the JWT must not follow it
        ("https://t.example.com:x@evil.com/", "evil.com"),
        ("https://t.example.com@evil.com/", "evil.com"),
        ("https://evil.com/?next=@t.example.com", "evil.com"),
        ("https://evil.com#@t.example.com", "evil.com"),
        ("https://user:pw@t.example.com/x", "t.example.com"),
    ],
)
def test_tenant_host_of(raw: str, expected: str) -> None:
    assert tenant_host_of(raw) == expected


@pytest.mark.parametrize(
    ("c8y", "expected"),
    [
        ({"url": "t.example.com"}, "t.example.com"),
        ({"url": "t.example.com:443"}, "t.example.com"),
        ({"url": "t.example.com", "http": "h.example.com"}, "h.example.com"),
        ({"http": "H.Example.com:8443"}, "h.example.com"),
    ],
)
def test_tenant_host_from_config(c8y: dict[str, str], expected: str) -> None:
    assert from_doc({"c8y": c8y}).tenant_host == expected


# --- writing: set_value / unset_value ----------------------------------------------------------------


def read_toml(path: Path) -> dict[str, Any]:
    with path.open("rb") as file:
        return tomllib.load(file)


@pytest.mark.parametrize(("name", "case"), VALID.items())
def test_set_every_key_reads_back(tmp_path: Path, name: str, case: tuple[str, object]) -> None:
    typed, expected = case
    set_value(tmp_path, name, typed)
    doc = read_toml(tmp_path / "tedge.toml")
    raw = raw_values(doc, {})
    assert effective_value(name, raw, tmp_path, "f") == expected
    stored = raw[name][0]
    if isinstance(expected, bool):
        assert stored is expected  # a TOML boolean, as thin-edge writes it
        return
    assert isinstance(stored, int if isinstance(expected, int) else str)
    assert not isinstance(stored, bool)


def test_set_creates_a_v2_file(tmp_path: Path) -> None:
    set_value(tmp_path, "c8y.url", "t.example.com")
    path = tmp_path / "tedge.toml"
    assert read_toml(path) == {"config": {"version": "2"}, "c8y": {"url": "t.example.com"}}
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_set_writes_the_canonical_key_for_an_alias(tmp_path: Path) -> None:
    set_value(tmp_path, "http.port", "9000")
    set_value(tmp_path, "HTTP.ADDRESS", "10.0.0.1")
    doc = read_toml(tmp_path / "tedge.toml")
    assert doc["http"] == {"bind": {"port": 9000, "address": "10.0.0.1"}}
    assert "[http.bind]" in (tmp_path / "tedge.toml").read_text()


def test_set_keeps_comments_and_other_keys(tmp_path: Path) -> None:
    text = (
        "# Managed by hand: keep this comment\n"
        "[config]\n"
        'version = "2"\n'
        "\n"
        "[c8y]\n"
        'url = "t.example.com" # the tenant\n'
        "\n"
        "[mqtt.client]\n"
        "# which broker\n"
        'host = "localhost"\n'
        "port = 1883\n"
        "\n"
        "[unknown.section]\n"
        'kept = "yes"\n'
    )
    path = write(tmp_path, text)
    set_value(tmp_path, "mqtt.client.port", "1884")
    after = path.read_text()
    assert after == text.replace("port = 1883", "port = 1884")


def test_set_adds_a_table_in_thin_edge_layout(tmp_path: Path) -> None:
    path = write(tmp_path, '# top\n[c8y]\nurl = "t.io"\n')
    set_value(tmp_path, "firmware.child.update.timeout", "60")
    text = path.read_text()
    assert text.startswith('# top\n[c8y]\nurl = "t.io"\n')
    assert "[firmware.child.update]\ntimeout = 60\n" in text


def test_set_on_v1_file_writes_v2_key_removes_v1_spelling_and_logs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(
        tmp_path,
        '# v1 file\n[mqtt]\nport = 1883\nclient_host = "b"\n\n[firmware]\nchild_update_timeout = 5\n',
    )
    with caplog.at_level(logging.INFO):
        set_value(tmp_path, "mqtt.bind.port", "1999")
        set_value(tmp_path, "firmware.child_update_timeout", "99")
    doc = read_toml(path)
    assert doc["mqtt"] == {"client_host": "b", "bind": {"port": 1999}}
    assert doc["firmware"] == {"child": {"update": {"timeout": 99}}}
    assert path.read_text().startswith("# v1 file\n")
    assert "v1 file" in caplog.text
    config = load_config(tmp_path, {})
    assert (config.mqtt_port, config.mqtt_host, config.child_update_timeout) == (1999, "b", 99)


@pytest.mark.parametrize(
    "text",
    [
        # tomlkit issue 557: a table added under dotted keys lands elsewhere or swallows keys
        'http.address = "10.0.0.1"\nc8y.url = "t.io"\n',
        '[firmware]\nchild.x = 1\n[c8y]\nurl = "t.io"\n',
        '[http]\nbind.address = "10.0.0.1"\n[c8y]\nurl = "t.io"\n',
        # out-of-order tables
        '[http.bind]\naddress = "10.0.0.1"\n[c8y]\nurl = "t.io"\n[http]\nclient.host = "h"\n',
        # inline tables
        'http = { bind = { address = "10.0.0.1" } }\nfirmware = {}\nc8y = { url = "t.io" }\n',
        # super table only
        '[http.bind]\naddress = "10.0.0.1"\n[c8y]\nurl = "t.io"\n',
    ],
)
@pytest.mark.parametrize(
    ("name", "typed", "expected"),
    [
        ("http.bind.port", "9000", 9000),
        ("http.client.host", "gw", "gw"),
        ("firmware.child.update.timeout", "60", 60),
        ("mqtt.client.auth.ca_file", "/ca.pem", "/ca.pem"),
    ],
)
def test_set_in_awkward_layouts_changes_exactly_one_value(
    tmp_path: Path, text: str, name: str, typed: str, expected: object
) -> None:
    path = write(tmp_path, text)
    before = read_toml(path)
    set_value(tmp_path, name, typed)
    after = read_toml(path)
    _merge(before, nested(name, expected))
    assert after == before


def test_set_invalid_value_leaves_file_byte_identical(tmp_path: Path) -> None:
    original = b"# comment\n[mqtt.client]\nport = 1883\n"
    path = write(tmp_path, original)
    mtime = path.stat().st_mtime_ns
    for bad in ["abc", "0", "70000", "-1", "true", "", "1\n2"]:
        with pytest.raises(ConfigError, match=r"mqtt\.client\.port"):
            set_value(tmp_path, "mqtt.client.port", bad)
    assert path.read_bytes() == original
    assert path.stat().st_mtime_ns == mtime


def test_set_invalid_value_does_not_create_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        set_value(tmp_path, "http.client.host", "two words")
    assert not (tmp_path / "tedge.toml").exists()


def test_set_unknown_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown configuration key 'c8y\.nope'"):
        set_value(tmp_path, "c8y.nope", "x")


@pytest.mark.parametrize(
    "text", ["[c8y\nurl = 1\n", "http = 5\n", "[http]\nbind = 5\n", "[http.bind.port]\nx = 1\n"]
)
def test_set_refuses_a_broken_file_and_leaves_it_alone(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=re.escape(str(path))):
        set_value(tmp_path, "http.bind.port", "9000")
    assert path.read_text() == text


def test_set_keeps_mode_and_leaves_no_temp_files(tmp_path: Path) -> None:
    path = write(tmp_path, '[c8y]\nurl = "t.io"\n')
    path.chmod(0o600)
    set_value(tmp_path, "c8y.url", "u.io")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tedge.toml"]
    assert read_toml(path) == {"c8y": {"url": "u.io"}}


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a file away")
def test_set_keeps_the_owner(tmp_path: Path) -> None:
    path = write(tmp_path, '[c8y]\nurl = "t.io"\n')
    os.chown(path, 4321, 4322)
    set_value(tmp_path, "c8y.url", "u.io")
    assert (path.stat().st_uid, path.stat().st_gid) == (4321, 4322)


def test_set_writes_through_a_symlink(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    target = write(real, '[c8y]\nurl = "t.io"\n')
    config_dir = tmp_path / "etc"
    config_dir.mkdir()
    (config_dir / "tedge.toml").symlink_to(target)
    set_value(config_dir, "c8y.url", "u.io")
    assert (config_dir / "tedge.toml").is_symlink()
    assert read_toml(target) == {"c8y": {"url": "u.io"}}


def test_set_in_a_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        set_value(tmp_path / "missing", "c8y.url", "t.io")


def test_set_normalises_values(tmp_path: Path) -> None:
    set_value(tmp_path, "http.client.host", " [fd00::1] ")
    set_value(tmp_path, "firmware.child.update.timeout", " 0060 ")
    doc = read_toml(tmp_path / "tedge.toml")
    assert doc["http"]["client"]["host"] == "fd00::1"
    assert doc["firmware"]["child"]["update"]["timeout"] == 60


def test_set_value_with_quotes_and_backslashes_is_escaped(tmp_path: Path) -> None:
    set_value(tmp_path, "data.path", 'C:\\tedge "data"')
    assert load_config(tmp_path, {}).data_path == Path('C:\\tedge "data"')


def test_unset_removes_every_spelling(tmp_path: Path) -> None:
    path = write(tmp_path, '# keep\n[http]\nport = 1\n[http.bind]\nport = 2\n[c8y]\nurl = "t.io"\n')
    assert unset_value(tmp_path, "http.port") is True
    assert read_toml(path) == {"c8y": {"url": "t.io"}}
    assert path.read_text().startswith("# keep\n")
    assert load_config(tmp_path, {}).http_bind_port == 8000
    assert unset_value(tmp_path, "http.port") is False


def test_unset_on_missing_file(tmp_path: Path) -> None:
    assert unset_value(tmp_path, "c8y.url") is False
    assert not (tmp_path / "tedge.toml").exists()
