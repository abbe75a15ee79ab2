"""Downloads through the site's HTTP proxy (thin-edge's `proxy.address`, `proxy.username`,
`proxy.password`, `proxy.no_proxy`): a real forwarding proxy started by the test relays http
origins and tunnels https ones (CONNECT); hosts in no_proxy are reached directly; a proxy that
wants credentials and does not get them says so."""

from __future__ import annotations

import contextlib
import hashlib
import json
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web

from brokers import Broker, free_port
from forwardproxy import ForwardProxy
from harness import FirmwareServer, Gateway, observer, write_config
from pki import TestCA
from tedge_firmware.core.config import config_from_document
from tedge_firmware.core.proxy import UpstreamProxy, parse_no_proxy
from tedge_firmware.core.retry import RetryPolicy
from tedge_firmware.errors import ConfigError, DownloadError
from tedge_firmware.shell.downloader import Downloader

CONTENT = b"firmware behind a proxy" * 1000
QUICK = RetryPolicy(initial=0.01, max_interval=0.01, max_elapsed=0.3)


@pytest.mark.parametrize(
    ("no_proxy", "host", "bypassed"),
    [
        ("", "c8y.example.com", False),
        ("*", "anything", True),
        ("example.com", "c8y.example.com", True),
        (".example.com", "example.com", True),
        ("example.com", "badexample.com", False),
        ("10.0.0.0/8", "10.1.2.3", True),
        ("10.0.0.0/8", "11.1.2.3", False),
        ("10.0.0.0/8", "ten.example", False),
        ("::1", "[::1]", True),
        ("127.0.0.1, localhost", "LOCALHOST.", True),
        ("not a network/99", "10.0.0.1", False),
    ],
)
def test_which_hosts_skip_the_proxy(no_proxy: str, host: str, bypassed: bool) -> None:
    assert UpstreamProxy("http://p:3128", no_proxy=parse_no_proxy(no_proxy)).bypassed(host) is bypassed


@pytest.mark.parametrize(
    ("keys", "says"),
    [
        ({"address": "socks5://p:1080"}, "must be http://host:port"),
        ({"address": "http://user:pw@p:3128"}, "credentials go in proxy.username"),
        ({"address": "http://p:99999"}, "Port out of range"),
        ({"address": "http://p:3128", "password": "x"}, "proxy.password is set without proxy.username"),
    ],
)
def test_proxy_keys_that_cannot_work_are_one_line_errors(keys: dict[str, str], says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        config_from_document({"proxy": keys}, {}, Path("/tmp"), "tedge.toml")


@pytest.fixture
async def origin() -> AsyncIterator[FirmwareServer]:
    async with FirmwareServer(files={"fw.bin": CONTENT}) as server:
        yield server


async def download(downloader: Downloader, url: str, target: Path) -> str:
    try:
        return (await downloader.download(url, target)).sha256
    finally:
        await downloader.close()


async def test_an_http_origin_through_the_proxy_with_credentials(tmp_path: Path, origin: FirmwareServer) -> None:
    async with ForwardProxy(credentials=("site", "s3cret")) as proxy:
        settings = UpstreamProxy(proxy.url, "site", "s3cret")
        sha = await download(Downloader(proxy=settings), origin.url("fw.bin"), tmp_path / "fw")
    assert sha == hashlib.sha256(CONTENT).hexdigest()
    assert proxy.asked == [f"GET {origin.url('fw.bin')}"]


async def test_a_proxy_that_wants_credentials_says_so(tmp_path: Path, origin: FirmwareServer) -> None:
    async with ForwardProxy(credentials=("site", "s3cret")) as proxy:
        with pytest.raises(DownloadError, match=r"407 .*proxy.username, proxy.password"):
            await download(Downloader(proxy=UpstreamProxy(proxy.url), retry=QUICK), origin.url("fw.bin"), tmp_path / "fw")
    assert not (tmp_path / "fw").exists()


async def test_an_unreachable_proxy_is_named(tmp_path: Path, origin: FirmwareServer) -> None:
    unreachable = UpstreamProxy(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(DownloadError, match=r"cannot connect to the proxy \(proxy.address\)"):
        await download(Downloader(proxy=unreachable, retry=QUICK), origin.url("fw.bin"), tmp_path / "fw")


async def test_no_proxy_hosts_are_reached_directly(tmp_path: Path, origin: FirmwareServer) -> None:
    async with ForwardProxy() as proxy:
        settings = UpstreamProxy(proxy.url, no_proxy=parse_no_proxy("localhost"))
        direct = origin.url("fw.bin").replace("127.0.0.1", "localhost")
        await download(Downloader(proxy=settings), direct, tmp_path / "direct")
        await download(Downloader(proxy=settings), origin.url("fw.bin"), tmp_path / "proxied")
    assert proxy.asked == [f"GET {origin.url('fw.bin')}"]  # localhost never went through it


@contextlib.asynccontextmanager
async def serving(
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]], context: ssl.SSLContext | None = None
) -> AsyncIterator[int]:
    """`handler` answering GET /fw.bin on a free loopback port (HTTPS with `context`): the port."""
    app = web.Application()
    app.router.add_get("/fw.bin", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    try:
        yield site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    finally:
        await runner.cleanup()


async def test_an_https_origin_is_tunnelled(tmp_path: Path) -> None:
    ca = TestCA(tmp_path / "ca")
    server_cert = ca.issue("127.0.0.1", server=True)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(server_cert.cert, server_cert.key)

    async def serve(request: web.Request) -> web.Response:
        return web.Response(body=CONTENT)

    async with serving(serve, context) as port, ForwardProxy() as proxy:
        trusting = ssl.create_default_context(cafile=str(ca.cert_path))
        downloader = Downloader(proxy=UpstreamProxy(proxy.url), ssl_context=trusting)
        sha = await download(downloader, f"https://127.0.0.1:{port}/fw.bin", tmp_path / "fw")
    assert sha == hashlib.sha256(CONTENT).hexdigest()
    assert proxy.asked == [f"CONNECT 127.0.0.1:{port}"]  # the proxy saw the host, not the path


async def test_the_gateway_downloads_through_the_configured_proxy(
    tmp_path: Path, broker: Broker, origin: FirmwareServer
) -> None:
    config_dir, data = tmp_path / "etc", tmp_path / "data"
    async with ForwardProxy(credentials=("gw", "pw")) as proxy:
        keys = f'[proxy]\naddress = "{proxy.url}"\nusername = "gw"\npassword = "pw"\n'
        write_config(config_dir, data, broker.port, free_port(), extra=keys)
        gateway = Gateway(config_dir, data)
        await gateway.start()
        try:
            async with observer(broker.port) as obs:
                assert await obs.next("c8y/s/us", timeout=15) == b"500"
                # (127.0.0.1 is thin-edge's own proxy host, always reached directly)
                url = origin.url("fw.bin").replace("127.0.0.1", "localhost")
                await obs.publish("c8y/s/ds", f"515,child1,fw,1.0,{url}")
                request = json.loads(await obs.next("tedge/child1/commands/req/firmware_update", timeout=20))
        finally:
            await gateway.stop()
    assert request["sha256"] == hashlib.sha256(CONTENT).hexdigest()
    assert proxy.asked == [f"GET {url}"]


def test_config_list_does_not_show_the_proxy_password(tmp_path: Path) -> None:
    import subprocess
    import sys

    (tmp_path / "tedge.toml").write_text('[proxy]\naddress = "http://p:3128"\nusername = "u"\npassword = "s3cret"\n')
    listed = subprocess.run(
        [sys.executable, "-m", "tedge_firmware", "--config-dir", str(tmp_path), "config", "list"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert "proxy.password=(set)" in listed.stdout and "s3cret" not in listed.stdout


async def test_a_redirect_to_https_does_not_hand_the_proxy_credentials_to_the_origin(tmp_path: Path) -> None:
    """The http origin's answer (through the proxy, credentials in the request) redirects to an
    https origin (through a CONNECT): that origin never sees `Proxy-Authorization` (aiohttp
    drops it, with Authorization and cookies, when a redirect changes the origin)."""
    ca = TestCA(tmp_path / "ca")
    server_cert = ca.issue("127.0.0.1", server=True)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(server_cert.cert, server_cert.key)
    seen: list[dict[str, str]] = []

    async def final(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        return web.Response(body=CONTENT)

    async with serving(final, context) as secure_port:

        async def moved(request: web.Request) -> web.Response:
            raise web.HTTPFound(f"https://127.0.0.1:{secure_port}/fw.bin")

        async with serving(moved) as plain_port, ForwardProxy(credentials=("site", "s3cret")) as proxy:
            trusting = ssl.create_default_context(cafile=str(ca.cert_path))
            downloader = Downloader(proxy=UpstreamProxy(proxy.url, "site", "s3cret"), ssl_context=trusting)
            sha = await download(downloader, f"http://127.0.0.1:{plain_port}/fw.bin", tmp_path / "fw")
    assert sha == hashlib.sha256(CONTENT).hexdigest()
    assert proxy.asked == [f"GET http://127.0.0.1:{plain_port}/fw.bin", f"CONNECT 127.0.0.1:{secure_port}"]
    [headers] = seen
    assert "Proxy-Authorization" not in headers
