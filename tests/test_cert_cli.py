"""`tedge-firmware cert`: the site's CA, the gateway's certificate and the children's, made by the
project's own command and used as they are: the file-transfer service requires them, a child's
certificate opens its own firmware only, another CA's fails the handshake."""

from __future__ import annotations

import ssl
import stat
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509

from tedge_firmware.core.config import config_from_document
from tedge_firmware.gateway.service import file_transfer_ssl
from tedge_firmware.shell.file_transfer import FileTransferServer

CLI = [sys.executable, "-m", "tedge_firmware"]


def cert(*args: str, config_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, "--config-dir", str(config_dir), "cert", *args], capture_output=True, text=True, timeout=60)


@pytest.fixture
def site(tmp_path: Path) -> Path:
    config_dir = tmp_path / "etc"
    config_dir.mkdir()
    (config_dir / "tedge.toml").write_text('[http]\nclient.host = "127.0.0.1"\n')
    for args in (("create-ca",), ("create-server",), ("create-child", "child-a"), ("create-child", "child-b")):
        result = cert(*args, config_dir=config_dir)
        assert result.returncode == 0, result.stderr
    return config_dir / "device-local-certs"


def test_the_files_their_modes_and_what_they_say(site: Path) -> None:
    for key in ("ca.key", "server.key", "children/child-a.key"):
        assert stat.S_IMODE((site / key).stat().st_mode) == 0o600
    server = x509.load_pem_x509_certificate((site / "server.crt").read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    child = x509.load_pem_x509_certificate((site / "children" / "child-a.crt").read_bytes())
    assert child.subject.rfc4514_string() == "CN=child-a"
    ca = x509.load_pem_x509_certificate((site / "ca.crt").read_bytes())
    assert child.issuer == ca.subject and server.issuer == ca.subject


def test_the_gateways_certificate_names_the_main_device_and_no_child_gets_that_name(tmp_path: Path) -> None:
    config_dir = tmp_path / "etc"
    config_dir.mkdir()
    (config_dir / "tedge.toml").write_text('[device]\nid = "gw-1"\n')
    for args in (("create-ca",), ("create-server", "--name", "gw.lan", "--name", "10.0.0.1")):
        assert cert(*args, config_dir=config_dir).returncode == 0
    server = x509.load_pem_x509_certificate((config_dir / "device-local-certs" / "server.crt").read_bytes())
    assert server.subject.rfc4514_string() == "CN=gw-1"
    usages = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(usages) == {x509.ExtendedKeyUsageOID.SERVER_AUTH, x509.ExtendedKeyUsageOID.CLIENT_AUTH}
    refused = cert("create-child", "gw-1", config_dir=config_dir)
    assert refused.returncode == 2 and "gateway's own id" in refused.stderr
    assert not (config_dir / "device-local-certs" / "children" / "gw-1.crt").exists()


def test_the_ca_is_not_replaced_unless_forced_and_bad_input_is_one_line(site: Path) -> None:
    config_dir = site.parent
    refused = cert("create-ca", config_dir=config_dir)
    assert refused.returncode == 1 and "use --force" in refused.stderr and "Traceback" not in refused.stderr
    bad = cert("create-child", "a/b", config_dir=config_dir)
    assert bad.returncode == 2 and "'/'" in bad.stderr
    empty = cert("create-child", "x", "--dir", str(config_dir / "nowhere"), config_dir=config_dir)
    assert empty.returncode == 1 and "create it first" in empty.stderr
    assert cert("create-ca", "--force", config_dir=config_dir).returncode == 0


async def test_the_commands_certificates_lock_the_file_transfer_service(tmp_path: Path, site: Path) -> None:
    root, cache = tmp_path / "ft", tmp_path / "cache"
    (root / "child-a").mkdir(parents=True)
    (root / "child-b").mkdir(parents=True)
    cache.mkdir()
    (root / "child-a" / "fw.bin").write_bytes(b"a's firmware")
    (root / "child-b" / "fw.bin").write_bytes(b"b's firmware")
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    (trusted / "ca.crt").write_bytes((site / "ca.crt").read_bytes())
    http = {"cert_path": str(site / "server.crt"), "key_path": str(site / "server.key"), "ca_path": str(trusted)}
    config = config_from_document({"http": http}, {}, tmp_path, "tedge.toml")
    server = FileTransferServer(root=root, cache_dir=cache, host="127.0.0.1", port=0, ssl_context=file_transfer_ssl(config))
    await server.start()

    async def get(child: str, path: str, directory: Path = site) -> tuple[int, bytes]:
        context = ssl.create_default_context(cafile=str(site / "ca.crt"))
        context.load_cert_chain(directory / "children" / f"{child}.crt", directory / "children" / f"{child}.key")
        url = f"https://127.0.0.1:{server.port}/te/v1/files/{path}"
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session, session.get(url) as response:
            return response.status, await response.read()

    try:
        assert await get("child-a", "child-a/fw.bin") == (200, b"a's firmware")
        assert (await get("child-a", "child-b/fw.bin"))[0] == 403
        other = tmp_path / "other-site"
        assert cert("create-ca", "--dir", str(other), config_dir=site.parent).returncode == 0
        assert cert("create-child", "child-a", "--dir", str(other), config_dir=site.parent).returncode == 0
        with pytest.raises(aiohttp.ClientError):
            await get("child-a", "child-a/fw.bin", directory=other)
    finally:
        await server.stop()


def test_the_link_secret_rotates(tmp_path: Path) -> None:
    config_dir = tmp_path / "etc"
    config_dir.mkdir()
    data = tmp_path / "data"
    (config_dir / "tedge.toml").write_text(f'[data]\npath = "{data}"\n')
    first = cert("rotate-link-secret", config_dir=config_dir)
    assert first.returncode == 0 and first.stdout.strip() == str(data / "file-transfer.key")
    secret = (data / "file-transfer.key").read_bytes()
    assert cert("rotate-link-secret", config_dir=config_dir).returncode == 0
    assert (data / "file-transfer.key").read_bytes() != secret
    assert stat.S_IMODE((data / "file-transfer.key").stat().st_mode) == 0o600
