"""The file-transfer service with client certificates (`http.ca_path`): real TLS on loopback,
certificates made in the test. A child's certificate opens only its own files; no certificate,
an expired one or one from another CA fails the handshake; the gateway's published firmware
cannot be overwritten by anyone."""

from __future__ import annotations

import os
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from pki import Issued, TestCA
from tedge_firmware.core.access import WritePolicy, access_problem
from tedge_firmware.core.config import config_from_document
from tedge_firmware.errors import ConfigError
from tedge_firmware.gateway.service import file_transfer_ssl
from tedge_firmware.shell.file_transfer import FileTransferServer

GATEWAY = "gw"
FIRMWARE = os.urandom(100_000)
FILE_ID = "ab" * 32


# ---- the rules (pure) ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "client", "writes", "allowed"),
    [
        ("GET", "child-a/firmware_update/x", "child-a", WritePolicy.OWN, True),
        ("HEAD", "gw:device:child-a/firmware_update/x", "child-a", WritePolicy.OWN, True),
        ("GET", "child-b/firmware_update/x", "child-a", WritePolicy.OWN, False),
        ("GET", "gw:device:child-b/x", "child-a", WritePolicy.OWN, False),
        ("GET", "other:device:child-a/x", "child-a", WritePolicy.OWN, False),
        ("GET", "child-b/x", None, WritePolicy.OWN, True),  # no client certificates: as before
        ("GET", "child-b/x", GATEWAY, WritePolicy.OWN, True),  # the gateway's own certificate
        ("PUT", "child-a/logs/x", "child-a", WritePolicy.OWN, True),
        ("PUT", "child-b/logs/x", "child-a", WritePolicy.OWN, False),
        ("DELETE", "child-b/logs/x", "child-a", WritePolicy.OWN, False),
        ("PUT", "child-b/logs/x", None, WritePolicy.OWN, True),
        ("PUT", "child-b/logs/x", "child-a", WritePolicy.ANY, True),
        ("PUT", "child-a/logs/x", "child-a", WritePolicy.NONE, False),
        ("DELETE", "x", None, WritePolicy.NONE, False),
        # a child's firmware_update/ is the gateway's: no one writes there over HTTP
        ("PUT", "child-a/firmware_update/evil", "child-a", WritePolicy.OWN, False),
        ("PUT", "child-a/firmware_update/evil", None, WritePolicy.OWN, False),
        ("DELETE", "child-a/firmware_update/x", GATEWAY, WritePolicy.ANY, False),
        ("PUT", "child-a/firmware_update", "child-a", WritePolicy.OWN, False),
        ("PUT", "child-a/firmware_updates/x", "child-a", WritePolicy.OWN, True),
        ("GET", "child-a/firmware_update/x", "child-a", WritePolicy.NONE, True),
    ],
)
def test_who_may_do_what(method: str, path: str, client: str | None, writes: WritePolicy, allowed: bool) -> None:
    problem = access_problem(method, path.split("/"), client, GATEWAY, writes)
    assert (problem is None) is allowed, problem


# ---- over TLS ---------------------------------------------------------------------------------


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, object]:
    ca = TestCA(tmp_path / "ca")
    other = TestCA(tmp_path / "other-ca", "other-ca")
    return {
        "ca": ca,
        "server": ca.issue("gateway.local", server=True),
        "child-a": ca.issue("child-a"),
        "child-b": ca.issue("child-b"),
        "gateway": ca.issue(GATEWAY),
        "expired": ca.issue("child-a", expired=True),
        "stranger": other.issue("child-a"),
    }


def tls_config(tmp_path: Path, pki: dict[str, object], **extra: object):  # type: ignore[no-untyped-def]
    server = pki["server"]
    assert isinstance(server, Issued)
    ca_dir = tmp_path / "trusted"
    ca_dir.mkdir(exist_ok=True)
    ca = pki["ca"]
    assert isinstance(ca, TestCA)
    (ca_dir / "site-ca.pem").write_bytes(ca.cert_path.read_bytes())
    (ca_dir / "README").write_text("not a certificate: skipped")
    http = {"cert_path": str(server.cert), "key_path": str(server.key), "ca_path": str(ca_dir), **extra}
    return config_from_document({"http": http, "device": {"id": GATEWAY}}, {}, tmp_path, "tedge.toml")


@pytest.fixture
async def service(tmp_path: Path, pki: dict[str, object]) -> AsyncIterator[tuple[FileTransferServer, Path]]:
    root, cache = tmp_path / "file-transfer", tmp_path / "cache"
    for child in ("child-a", "child-b"):
        (root / child / "firmware_update").mkdir(parents=True)
    cache.mkdir()
    (cache / FILE_ID).write_bytes(FIRMWARE)
    (root / "child-a" / "firmware_update" / FILE_ID).symlink_to(cache / FILE_ID)
    (root / "child-b" / "firmware_update" / FILE_ID).symlink_to(cache / FILE_ID)
    config = tls_config(tmp_path, pki)
    server = FileTransferServer(
        root=root,
        cache_dir=cache,
        host="127.0.0.1",
        port=0,
        ssl_context=file_transfer_ssl(config),
        main_device_id=GATEWAY,
        writes=config.http_writes,
    )
    await server.start()
    try:
        yield server, root
    finally:
        await server.stop()


def client_context(pki: dict[str, object], who: str | None) -> ssl.SSLContext:
    ca = pki["ca"]
    assert isinstance(ca, TestCA)
    context = ssl.create_default_context(cafile=str(ca.cert_path))
    if who is not None:
        issued = pki[who]
        assert isinstance(issued, Issued)
        context.load_cert_chain(issued.cert, issued.key)
    return context


async def request(
    server: FileTransferServer, pki: dict[str, object], who: str | None, method: str, path: str, **kwargs: object
) -> tuple[int, bytes]:
    url = f"https://127.0.0.1:{server.port}{path}"
    connector = aiohttp.TCPConnector(ssl=client_context(pki, who))
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.request(method, url, **kwargs) as response,  # type: ignore[arg-type]
    ):
        return response.status, await response.read()


@pytest.mark.parametrize("route", ["/tedge/file-transfer", "/te/v1/files"])
async def test_a_child_reads_its_own_firmware_and_not_another_childs(
    service: tuple[FileTransferServer, Path], pki: dict[str, object], route: str
) -> None:
    server, _ = service
    own = f"{route}/child-a/firmware_update/{FILE_ID}"
    other = f"{route}/child-b/firmware_update/{FILE_ID}"
    assert await request(server, pki, "child-a", "GET", own) == (200, FIRMWARE)
    status, body = await request(server, pki, "child-a", "GET", other)
    assert status == 403 and b"opens only its own files" in body
    assert (await request(server, pki, "gateway", "GET", other))[0] == 200  # the gateway's own
    # resuming works within its rights
    status, body = await request(server, pki, "child-a", "GET", own, headers={"Range": "bytes=1000-"})
    assert (status, body) == (206, FIRMWARE[1000:])


@pytest.mark.parametrize("who", [None, "expired", "stranger"])
async def test_no_certificate_an_expired_one_or_another_cas_fail_the_handshake(
    service: tuple[FileTransferServer, Path], pki: dict[str, object], who: str | None
) -> None:
    server, _ = service
    with pytest.raises(aiohttp.ClientError):
        await request(server, pki, who, "GET", f"/tedge/file-transfer/child-a/firmware_update/{FILE_ID}")


async def test_writes_only_under_the_own_directory_and_never_over_published_firmware(
    service: tuple[FileTransferServer, Path], pki: dict[str, object]
) -> None:
    server, root = service
    assert (await request(server, pki, "child-a", "PUT", "/te/v1/files/child-a/logs/1.log", data=b"log"))[0] == 201
    assert (root / "child-a" / "logs" / "1.log").read_bytes() == b"log"
    status, _ = await request(server, pki, "child-a", "PUT", "/te/v1/files/child-b/logs/1.log", data=b"x")
    assert status == 403 and not (root / "child-b" / "logs").exists()
    assert (await request(server, pki, "child-a", "DELETE", f"/te/v1/files/child-b/firmware_update/{FILE_ID}"))[0] == 403
    for who in ("child-a", "gateway"):  # not even its own child's copy, not even the gateway's cert
        published = f"/te/v1/files/child-a/firmware_update/{FILE_ID}"
        assert (await request(server, pki, who, "PUT", published, data=b"evil"))[0] == 403
        assert (await request(server, pki, who, "DELETE", published))[0] == 403
    assert await request(server, pki, "child-a", "GET", f"/te/v1/files/child-a/firmware_update/{FILE_ID}") == (
        200,
        FIRMWARE,
    )


def test_a_ca_directory_without_tls_or_without_certificates_is_a_config_error(
    tmp_path: Path, pki: dict[str, object]
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("nothing here")
    config = tls_config(tmp_path, pki, ca_path=str(empty))
    with pytest.raises(ConfigError, match="holds no PEM CA certificate"):
        file_transfer_ssl(config)
    no_tls = config_from_document({"http": {"ca_path": str(empty)}}, {}, tmp_path, "tedge.toml")
    with pytest.raises(ConfigError, match=r"set http\.cert_path and http\.key_path"):
        file_transfer_ssl(no_tls)
    missing = tls_config(tmp_path, pki, ca_path=str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match=r"cannot read http\.ca_path"):
        file_transfer_ssl(missing)


@pytest.mark.parametrize(
    ("http", "warned"),
    [
        ({"bind": {"address": "0.0.0.0"}, "client": {"host": "10.0.0.1"}}, True),
        ({"bind": {"address": "192.168.1.10"}}, True),
        ({"bind": {"address": "gateway.lan"}}, True),
        ({"bind": {"address": "127.0.0.1"}}, False),
        ({"bind": {"address": "::1"}}, False),
        ({"bind": {"address": "localhost"}}, False),
    ],
)
def test_a_file_transfer_service_reachable_without_tls_is_warned_about(
    tmp_path: Path, http: dict[str, object], warned: bool, caplog: pytest.LogCaptureFixture
) -> None:
    from tedge_firmware.gateway.service import make_file_transfer

    config = config_from_document({"http": http, "data": {"path": str(tmp_path)}}, {}, tmp_path, "tedge.toml")
    with caplog.at_level("WARNING"):
        make_file_transfer(config)
    lines = [r.getMessage() for r in caplog.records if "without TLS" in r.getMessage()]
    assert bool(lines) is warned
    if warned:
        assert "http.cert_path and http.key_path" in lines[0]


def test_with_tls_no_warning(tmp_path: Path, pki: dict[str, object], caplog: pytest.LogCaptureFixture) -> None:
    from tedge_firmware.gateway.service import make_file_transfer

    config = tls_config(tmp_path, pki, bind={"address": "0.0.0.0"}, client={"host": "10.0.0.1"})
    with caplog.at_level("WARNING"):
        make_file_transfer(config)
    assert not [r for r in caplog.records if "without TLS" in r.getMessage()]


# ---- the connector as a client of the local hop --------------------------------------------------


def test_client_contexts(tmp_path: Path, pki: dict[str, object]) -> None:
    from tedge_firmware.shell.tls import client_context

    assert client_context(None, None, None) is None
    child = pki["child-a"]
    ca = pki["ca"]
    assert isinstance(child, Issued) and isinstance(ca, TestCA)
    assert client_context(ca.cert_path, child.cert, child.key) is not None  # a file
    assert client_context(ca.cert_path.parent, None, None) is not None  # a directory
    with pytest.raises(ConfigError, match="go together"):
        client_context(None, child.cert, None)
    with pytest.raises(ConfigError, match="cannot load"):
        client_context(None, child.cert, ca.cert_path)  # not the certificate's key


async def test_the_connector_downloads_with_its_certificate_and_only_its_own_firmware(
    tmp_path: Path, pki: dict[str, object], service: tuple[FileTransferServer, Path]
) -> None:
    import json

    from brokers import Broker
    from harness import observer
    from tedge_firmware.connector import DownloadSettings, Firmware
    from test_connector_support import FAST_DOWNLOADS, connector, serving

    server, _ = service
    broker_dir = tmp_path / "broker"
    broker_dir.mkdir()
    broker = Broker(broker_dir)
    broker.start()
    ca = pki["ca"]
    assert isinstance(ca, TestCA)
    applied: list[bytes] = []

    async def apply(firmware: Firmware) -> None:
        applied.append(firmware.path.read_bytes())

    def settings(who: str) -> DownloadSettings:
        issued = pki[who]
        assert isinstance(issued, Issued)
        return DownloadSettings(
            stall_timeout=FAST_DOWNLOADS.stall_timeout,
            retry_budget=1.0,
            retry_initial=0.0,
            ca_path=ca.cert_path.parent,
            cert_file=issued.cert,
            key_file=issued.key,
        )

    import hashlib

    sha = hashlib.sha256(FIRMWARE).hexdigest()
    url = f"https://127.0.0.1:{server.port}/tedge/file-transfer/child-a/firmware_update/{FILE_ID}"
    try:
        async with observer(broker.port, ["tedge/+/commands/res/firmware_update"]) as obs:
            for who, op_id in (("child-a", "op-1"), ("child-b", "op-2")):
                child = connector(broker, tmp_path / who, who, apply=apply, download=settings(who))
                request = {"id": op_id, "attempt": 1, "name": "fw", "version": "1", "sha256": sha, "url": url}
                async with serving(child):
                    await obs.publish(f"tedge/{who}/commands/req/firmware_update", json.dumps(request))
                    res = f"tedge/{who}/commands/res/firmware_update"
                    answers = [json.loads(await obs.next(res, timeout=15)) for _ in range(2)]
                if who == "child-a":
                    assert answers[1]["status"] == "successful"
                else:  # child-b's certificate does not open child-a's firmware
                    assert answers[1]["status"] == "failed" and "403" in answers[1]["reason"]
    finally:
        broker.kill()
    assert applied == [FIRMWARE]
