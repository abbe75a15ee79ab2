"""Signed, expiring links (`http.signed_links`): the pure signing, the secret on disk, and the
gateway handing out links that its file-transfer service checks (legacy requests and te/
hand-overs), over a real broker and real HTTP."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import aiohttp
import pytest
from hypothesis import given
from hypothesis import strategies as st

from brokers import Broker, free_port
from harness import CHILD, FirmwareServer, Gateway, gateway_ready, observer, req_topic, write_config
from tedge_firmware.core.links import LinkMaker, link_problem, same_file, signed_query
from tedge_firmware.errors import ConfigError
from tedge_firmware.shell import link_secret

SECRET = b"s" * 32
PATH = "child1/firmware_update/abc"


def query(text: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in text.split("&"))


def test_a_signed_link_is_good_until_it_expires() -> None:
    signed = query(signed_query(SECRET, PATH, 2000))
    assert link_problem(SECRET, PATH, signed, now=1999.0) is None
    assert "expired" in str(link_problem(SECRET, PATH, signed, now=2001.0))


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"signature": "0" * 64}, "does not match"),
        ({"expires": "3000"}, "does not match"),  # a later expiry is not signed
        ({"expires": "-5"}, "not a time"),
        ({"expires": "1e9"}, "not a time"),
        ({"expires": "9" * 20}, "not a time"),
        ({"signature": "é"}, "does not match"),
    ],
)
def test_forged_links_are_refused(change: dict[str, str], says: str) -> None:
    signed = {**query(signed_query(SECRET, PATH, 2000)), **change}
    assert says in str(link_problem(SECRET, PATH, signed, now=1000.0))


def test_a_link_opens_only_its_own_path_and_only_with_its_secret() -> None:
    signed = query(signed_query(SECRET, PATH, 2000))
    assert "does not match" in str(link_problem(SECRET, "child2/firmware_update/abc", signed, now=1000.0))
    assert "does not match" in str(link_problem(b"t" * 32, PATH, signed, now=1000.0))
    assert "no signature" in str(link_problem(SECRET, PATH, {}, now=1000.0))


@given(st.dictionaries(st.sampled_from(["expires", "signature", "x"]), st.text(max_size=80)), st.text(max_size=40))
def test_any_query_is_judged_without_an_error(candidate: dict[str, str], path: str) -> None:
    assert isinstance(link_problem(SECRET, path, candidate, now=1000.0), str)


def test_the_link_maker() -> None:
    plain = LinkMaker("http://gw:8000/tedge/file-transfer")
    assert plain.url(PATH) == f"http://gw:8000/tedge/file-transfer/{PATH}"
    signed = LinkMaker("http://gw:8000/te/v1/files", SECRET, lifetime=100, clock=lambda: 1000.5)
    url = signed.url(PATH)
    assert url.startswith(f"http://gw:8000/te/v1/files/{PATH}?expires=1100&signature=")
    assert link_problem(SECRET, PATH, query(url.split("?")[1]), now=1099.0) is None
    assert same_file(url, plain.url(PATH).replace("tedge/file-transfer", "te/v1/files"))


def test_the_secret_is_made_once_private_and_kept(tmp_path: Path) -> None:
    path = link_secret.secret_path(tmp_path / "data")
    first = link_secret.load_or_create(path)
    assert len(first) == 32 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert link_secret.load_or_create(path) == first
    assert link_secret.rotate(path) != first
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary left
    path.write_bytes(b"short")
    with pytest.raises(ConfigError, match="too short"):
        link_secret.load_or_create(path)


# ---- the gateway -----------------------------------------------------------------------------


async def fetch(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as response:
        return response.status, await response.read()


@pytest.fixture
async def signing_gateway(tmp_path: Path, broker: Broker):  # type: ignore[no-untyped-def]
    config_dir = tmp_path / "etc"
    write_config(config_dir, tmp_path / "data", broker.port, free_port(), extra="[http]\nsigned_links = true\n")
    cloud = FirmwareServer(files={"fw.bin": b"signed firmware " * 1000})
    await cloud.start()
    gateway = Gateway(config_dir, tmp_path / "data")
    await gateway.start()
    try:
        yield gateway, cloud
    finally:
        await gateway.stop()
        await cloud.stop()


async def test_children_get_signed_links_that_the_service_checks(broker: Broker, signing_gateway) -> None:  # type: ignore[no-untyped-def]
    gateway, cloud = signing_gateway
    firmware = cloud.files["fw.bin"]
    url = cloud.url("fw.bin")
    async with observer(broker.port) as obs:
        await gateway_ready(broker.port)  # connected and subscribed
        await obs.publish("c8y/s/ds", f"515,{CHILD},fw,1,{url}")
        first = json.loads(await obs.next(req_topic()))
        link = first["url"]
        assert "?expires=" in link and "&signature=" in link
        assert await fetch(link) == (200, firmware)
        assert await fetch(link, {"Range": "bytes=100-"}) == (206, firmware[100:])  # resumes
        assert (await fetch(link.split("?")[0]))[0] == 403  # unsigned
        assert (await fetch(link[:-4] + "0000"))[0] == 403  # forged
        expired = link.split("?")[0] + "?" + signed_query(
            (gateway.data / "file-transfer.key").read_bytes(), link.split("/file-transfer/")[1].split("?")[0], 1000
        )
        status, body = await fetch(expired)
        assert status == 403 and b"expired" in body
        await obs.publish("c8y/s/ds", f"515,{CHILD},fw,1,{url}")  # re-sent: the link is renewed
        again = json.loads(await obs.next(req_topic()))
        assert again["attempt"] == 2 and same_file(again["url"], link)
        assert int(query(again["url"].split("?")[1])["expires"]) >= int(query(link.split("?")[1])["expires"])
        # a te/ hand-over is signed the same way
        topic = "te/device/te-child///cmd/firmware_update/c8y-mapper-1"
        await obs.client.subscribe(topic, qos=1)
        command = {"status": "gateway_download", "remoteUrl": url, "name": "fw", "version": "1"}
        await obs.publish(topic, json.dumps(command), retain=True)
        await obs.next(topic)
        moved = json.loads(await obs.next(topic))
        assert "&signature=" in moved["tedgeUrl"]
        assert await fetch(moved["tedgeUrl"]) == (200, firmware)
        await obs.publish(topic, b"", retain=True)
