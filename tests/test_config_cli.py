"""`config get/set/list` through click's CliRunner (the real commands, in-process)."""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tedge_firmware.cli.config import config_group
from tedge_firmware.core.config import KEYS_BY_NAME


@pytest.fixture(autouse=True)
def no_tedge_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A developer's own TEDGE_* variables must not leak into these tests."""
    import os

    for name in list(os.environ):
        if name.upper().startswith("TEDGE_"):
            monkeypatch.delenv(name)
    yield


def run(config_dir: Path, *args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(config_group, ["--config-dir", str(config_dir), *args], env=env)


def assert_one_error_line(result: Result, contains: str) -> None:
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    assert result.stderr.startswith("error: ")
    assert result.stderr.count("\n") == 1
    assert contains in result.stderr
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit | None)


def write(config_dir: Path, text: str) -> Path:
    path = config_dir / "tedge.toml"
    path.write_text(text, encoding="utf-8")
    return path


# --- get ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("mqtt.client.port", "1883"),
        ("mqtt.client.host", "localhost"),
        ("http.port", "8000"),
        ("http.bind.address", "127.0.0.1"),
        ("firmware.child.update.timeout", "3600"),
        ("data.path", "/var/tedge"),
    ],
)
def test_get_default(tmp_path: Path, key: str, expected: str) -> None:
    result = run(tmp_path, "get", key)
    assert (result.exit_code, result.stdout, result.stderr) == (0, expected + "\n", "")


def test_get_device_cert_path_default_is_under_the_config_dir(tmp_path: Path) -> None:
    result = run(tmp_path, "get", "device.cert_path")
    assert result.stdout == f"{tmp_path}/device-certs/tedge-certificate.pem\n"


def test_get_from_file_in_any_spelling(tmp_path: Path) -> None:
    write(tmp_path, '[c8y]\nurl = "t.example.com"\n[http]\nport = 9000\n[mqtt]\nport = 1999\n')
    assert run(tmp_path, "get", "c8y.url").stdout == "t.example.com\n"
    assert run(tmp_path, "get", "C8Y.URL").stdout == "t.example.com\n"
    assert run(tmp_path, "get", "http.bind.port").stdout == "9000\n"
    assert run(tmp_path, "get", "http.port").stdout == "9000\n"
    # mqtt.client.port follows mqtt.bind.port (v1 [mqtt] port)
    assert run(tmp_path, "get", "mqtt.client.port").stdout == "1999\n"
    assert run(tmp_path, "get", "c8y.http").stdout == "t.example.com\n"


def test_environment_beats_the_file(tmp_path: Path) -> None:
    write(tmp_path, "[mqtt.client]\nport = 1111\n")
    result = run(tmp_path, "get", "mqtt.client.port", env={"TEDGE_MQTT_CLIENT_PORT": "2222"})
    assert result.stdout == "2222\n"
    result = run(tmp_path, "get", "c8y.url", env={"tedge_c8y_url": "env.example.com"})
    assert result.stdout == "env.example.com\n"


def test_get_unset_key(tmp_path: Path) -> None:
    assert_one_error_line(run(tmp_path, "get", "c8y.url"), "'c8y.url' is not set")


@pytest.mark.parametrize("key", ["nope", "c8y", "c8y.url.more", ""])
def test_get_unknown_key(tmp_path: Path, key: str) -> None:
    assert_one_error_line(run(tmp_path, "get", key), "unknown configuration key")


def test_get_invalid_value_names_key_and_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[mqtt.client]\nport = "abc"\n')
    result = run(tmp_path, "get", "mqtt.client.port")
    assert_one_error_line(result, "'mqtt.client.port'")
    assert str(path) in result.stderr


def test_get_other_keys_despite_one_invalid_value(tmp_path: Path) -> None:
    write(tmp_path, '[mqtt.client]\nport = "abc"\n[c8y]\nurl = "t.io"\n')
    assert run(tmp_path, "get", "c8y.url").stdout == "t.io\n"


def test_get_with_toml_syntax_error(tmp_path: Path) -> None:
    path = write(tmp_path, '[c8y]\nurl = "t.io"\n[mqtt\n')
    result = run(tmp_path, "get", "c8y.url")
    assert_one_error_line(result, str(path))
    assert "line 3" in result.stderr


def make_certificate(common_name: str) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def test_get_device_id_from_the_certificate(tmp_path: Path) -> None:
    (tmp_path / "device-certs").mkdir()
    (tmp_path / "device-certs" / "tedge-certificate.pem").write_bytes(
        make_certificate("my-gateway")
    )
    result = run(tmp_path, "get", "device.id")
    assert (result.exit_code, result.stdout) == (0, "my-gateway\n")
    list_result = run(tmp_path, "list")
    assert "device.id=my-gateway\n" in list_result.stdout


def test_get_device_id_without_certificate(tmp_path: Path) -> None:
    result = run(tmp_path, "get", "device.id")
    assert_one_error_line(result, "device.id is not set and the certificate")
    assert str(tmp_path / "device-certs" / "tedge-certificate.pem") in result.stderr


def test_get_device_id_set_in_the_file(tmp_path: Path) -> None:
    write(tmp_path, '[device]\nid = "configured"\n')
    assert run(tmp_path, "get", "device.id").stdout == "configured\n"


# --- set ---------------------------------------------------------------------------------------


def test_set_then_get(tmp_path: Path) -> None:
    result = run(tmp_path, "set", "mqtt.client.port", "1884")
    assert (result.exit_code, result.stdout, result.stderr) == (0, "", "")
    assert run(tmp_path, "get", "mqtt.client.port").stdout == "1884\n"
    assert "[mqtt.client]\nport = 1884\n" in (tmp_path / "tedge.toml").read_text()


def test_set_alias_writes_the_v2_key(tmp_path: Path) -> None:
    assert run(tmp_path, "set", "http.port", "9000").exit_code == 0
    assert "[http.bind]\nport = 9000\n" in (tmp_path / "tedge.toml").read_text()
    assert run(tmp_path, "get", "http.bind.port").stdout == "9000\n"


def test_set_keeps_comments(tmp_path: Path) -> None:
    text = (
        "# gateway settings, edited by hand\n"
        "[c8y]\n"
        'url = "t.example.com"  # our tenant\n'
        "\n"
        "# the broker\n"
        "[mqtt.client]\n"
        "port = 1883\n"
    )
    path = write(tmp_path, text)
    assert run(tmp_path, "set", "c8y.url", "u.example.com").exit_code == 0
    assert path.read_text() == text.replace("t.example.com", "u.example.com")


@pytest.mark.parametrize(
    ("key", "value", "names"),
    [
        ("mqtt.client.port", "abc", "'mqtt.client.port'"),
        ("mqtt.client.port", "0", "'mqtt.client.port'"),
        ("http.port", "70000", "'http.bind.port'"),
        ("http.port", "-1", "'http.bind.port'"),
        ("mqtt.bind.port", "true", "'mqtt.bind.port'"),
        ("firmware.child.update.timeout", "0", "'firmware.child.update.timeout'"),
        ("firmware.child.update.timeout", "-5", "'firmware.child.update.timeout'"),
        ("mqtt.client.host", "", "'mqtt.client.host'"),
        ("mqtt.client.host", "two words", "'mqtt.client.host'"),
        ("c8y.url", "https://t.example.com/", "'c8y.url'"),
        ("c8y.url", "line\nbreak", "'c8y.url'"),
        ("nope.key", "1", "unknown configuration key 'nope.key'"),
    ],
)
def test_set_invalid_leaves_file_byte_identical(
    tmp_path: Path, key: str, value: str, names: str
) -> None:
    original = b'# keep me\n[mqtt.client]\nport = 1883\n\n[c8y]\nurl = "t.io"\n'
    path = tmp_path / "tedge.toml"
    path.write_bytes(original)
    assert_one_error_line(run(tmp_path, "set", key, value), names)
    assert path.read_bytes() == original


def test_set_invalid_does_not_create_the_file(tmp_path: Path) -> None:
    assert_one_error_line(run(tmp_path, "set", "mqtt.client.port", "abc"), "mqtt.client.port")
    assert not (tmp_path / "tedge.toml").exists()


def test_set_into_broken_file_fails_cleanly(tmp_path: Path) -> None:
    path = write(tmp_path, "[mqtt.client\nport = 1\n")
    assert_one_error_line(run(tmp_path, "set", "mqtt.client.port", "1884"), str(path))
    assert path.read_text() == "[mqtt.client\nport = 1\n"


def test_set_into_missing_directory(tmp_path: Path) -> None:
    assert_one_error_line(run(tmp_path / "missing", "set", "c8y.url", "t.io"), "does not exist")


def test_set_warns_when_environment_overrides(tmp_path: Path) -> None:
    result = run(tmp_path, "set", "http.bind.port", "9000", env={"TEDGE_HTTP_PORT": "1"})
    assert result.exit_code == 0
    assert "TEDGE_HTTP_PORT overrides" in result.stderr
    assert "Traceback" not in result.output


# --- list ----------------------------------------------------------------------------------------


def parse_listing(stdout: str) -> dict[str, str]:
    lines = stdout.splitlines()
    assert all("=" in line for line in lines), lines
    return dict(line.split("=", 1) for line in lines)


def test_list_every_key_sorted_with_effective_values(tmp_path: Path) -> None:
    write(tmp_path, '[c8y]\nurl = "t.io"\n[mqtt.bind]\nport = 1999\n')
    result = run(tmp_path, "list", env={"TEDGE_HTTP_BIND_PORT": "8123"})
    assert (result.exit_code, result.stderr) == (0, "")
    keys = [line.split("=", 1)[0] for line in result.stdout.splitlines()]
    assert keys == sorted(KEYS_BY_NAME)
    values = parse_listing(result.stdout)
    assert values["c8y.url"] == "t.io"
    assert values["c8y.http"] == "t.io"
    assert values["mqtt.bind.port"] == "1999"
    assert values["mqtt.client.port"] == "1999"
    assert values["http.bind.port"] == "8123"
    assert values["firmware.child.update.timeout"] == "3600"
    assert values["device.cert_path"] == f"{tmp_path}/device-certs/tedge-certificate.pem"
    assert values["http.client.host"] == ""
    assert values["device.id"] == ""


def test_list_doc_adds_descriptions(tmp_path: Path) -> None:
    result = run(tmp_path, "list", "--doc")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert len(lines) == 2 * len(KEYS_BY_NAME)
    index = lines.index("firmware.child.update.timeout=3600")
    assert "Seconds without a child response" in lines[index + 1]
    assert "default: 3600" in lines[index + 1]
    assert lines[index + 1].startswith("    ")


def test_list_reports_invalid_values_and_shows_the_rest(tmp_path: Path) -> None:
    path = write(tmp_path, '[mqtt.client]\nport = 0\n[c8y]\nurl = "t.io"\n')
    result = run(tmp_path, "list")
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: ") and "'mqtt.client.port'" in result.stderr
    assert str(path) in result.stderr
    values = parse_listing(result.stdout)
    assert values["c8y.url"] == "t.io"
    assert "mqtt.client.port" not in values
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("text", "contains"),
    [
        ("[c8y\n", "line 1"),
        ("http = 5\n", "'http' must be a table"),
    ],
)
def test_list_with_unusable_file(tmp_path: Path, text: str, contains: str) -> None:
    path = write(tmp_path, text)
    result = run(tmp_path, "list")
    assert_one_error_line(result, contains)
    assert str(path) in result.stderr


def test_list_with_a_directory_named_tedge_toml(tmp_path: Path) -> None:
    (tmp_path / "tedge.toml").mkdir()
    assert_one_error_line(run(tmp_path, "list"), "cannot read")


# --- the group inside a parent command --------------------------------------------------------------


def test_config_dir_comes_from_the_parent_context(tmp_path: Path) -> None:
    @click.group()
    @click.pass_context
    def parent(ctx: click.Context) -> None:
        ctx.ensure_object(dict)
        ctx.obj["config_dir"] = tmp_path

    parent.add_command(config_group)
    runner = CliRunner()
    assert runner.invoke(parent, ["config", "set", "c8y.url", "p.io"]).exit_code == 0
    assert (tmp_path / "tedge.toml").exists()
    result = runner.invoke(parent, ["config", "get", "c8y.url"])
    assert (result.exit_code, result.stdout) == (0, "p.io\n")


def test_group_option_beats_the_parent_context(tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    result = CliRunner().invoke(
        config_group,
        ["--config-dir", str(other), "set", "c8y.url", "o.io"],
        obj={"config_dir": tmp_path},
    )
    assert result.exit_code == 0
    assert (other / "tedge.toml").exists()
    assert not (tmp_path / "tedge.toml").exists()
