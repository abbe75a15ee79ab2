"""A locked site end to end: every MQTT client (the gateway's plugin and registration, the
simulator's bridge, each child) on Mosquitto's TLS listener with `require_certificate` and the
generated ACL, every firmware download over HTTPS with a client certificate. 50 `te/` and 50
legacy children update from one cloud download; a child cannot get at another's operation."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiomqtt
import pytest
from aiohttp import web

from brokers import MOSQUITTO, _wait_listening, free_port
from harness import Gateway, assert_each_updated_once, bulk_rollout, observer, write_config
from tedge_firmware.connector import Connector, DownloadSettings, Firmware
from tedge_firmware.demo.secure import LockedSite
from tedge_firmware.sim import C8ySimulator, OperationStatus

GATEWAY = "parent-device"
TE_CHILDREN = [f"te-{index:02d}" for index in range(50)]
LEGACY_CHILDREN = [f"legacy-{index:02d}" for index in range(50)]
CONTENT = os.urandom(256 * 1024)


@dataclass(frozen=True)
class Locked:
    site: LockedSite
    local_port: int  # plain, loopback: the test's own observers only
    tls_port: int


@pytest.fixture
def locked(tmp_path: Path) -> Iterator[Locked]:
    site = LockedSite.create(tmp_path / "certs", GATEWAY, [*TE_CHILDREN, *LEGACY_CHILDREN, "intruder"])
    local_port, tls_port = free_port(), free_port()
    conf = tmp_path / "mosquitto.conf"
    lines = [
        f"listener {local_port} 127.0.0.1",
        "allow_anonymous true",
        *(["user root"] if os.geteuid() == 0 else []),
        "max_queued_messages 100000",
        *site.mosquitto_lines(tls_port, "127.0.0.1"),
    ]
    conf.write_text("\n".join(lines) + "\n")
    process = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_listening(local_port)
        _wait_listening(tls_port)
        yield Locked(site, local_port, tls_port)
    finally:
        process.kill()
        process.wait()


def xid(child: str) -> str:
    return f"{GATEWAY}:device:{child}"


async def test_fifty_te_and_fifty_legacy_children_update_over_tls_with_client_certificates(
    tmp_path: Path, locked: Locked
) -> None:
    site = locked.site
    config_dir, data = tmp_path / "etc", tmp_path / "data"
    # the gateway's plugin and registration on the TLS listener, with the gateway's certificate
    write_config(config_dir, data, locked.tls_port, free_port(), extra=site.gateway_toml(), tenant="127.0.0.1")
    applied: dict[str, list[str]] = {child: [] for child in [*TE_CHILDREN, *LEGACY_CHILDREN]}
    urls: set[str] = set()

    async def apply(firmware: Firmware) -> None:
        digest = await asyncio.to_thread(lambda: hashlib.sha256(firmware.path.read_bytes()).hexdigest())
        applied[firmware.child_id].append(digest)

    def child(name: str, protocol: str) -> Connector:
        return Connector(
            name,
            apply=apply,
            work_dir=tmp_path / "children" / name,
            broker=site.child_broker(name, "127.0.0.1", locked.tls_port),
            download=site.child_download(name, DownloadSettings(parallel=1)),
            register=True,  # declared over te/: the gateway registers each as <main>:device:<child>
            protocol=protocol,  # type: ignore[arg-type]
            heartbeat=None,
        )

    connectors = [child(name, "te") for name in TE_CHILDREN] + [child(name, "legacy") for name in LEGACY_CHILDREN]
    devices = [xid(name) for name in [*TE_CHILDREN, *LEGACY_CHILDREN]]
    gateway = Gateway(config_dir, data)
    sim = C8ySimulator(
        mqtt_port=locked.tls_port, mqtt_auth=site.gateway_mqtt_auth(), gateway_id=GATEWAY, require_token=True
    )
    async with sim, observer(locked.local_port, ["tedge/+/commands/req/firmware_update", "te/device/+///cmd/firmware_update/+"]) as watch:
        await gateway.start()
        tasks = [asyncio.create_task(c.run()) for c in connectors]
        try:
            url = sim.add_file("locked.bin", CONTENT)
            progress = await bulk_rollout(sim, devices, "locked", "4.0", url, timeout=90)
        finally:
            for connector in connectors:
                connector.stop()
            async with asyncio.timeout(30):
                await asyncio.gather(*tasks, return_exceptions=True)
            await gateway.stop()
    assert_each_updated_once(sim, devices, progress, applied, CONTENT)  # once each, the right bytes
    for _, payload in watch.log:  # every link handed to a child is the HTTPS service's
        document = json.loads(payload) if payload else {}
        for key in ("url", "tedgeUrl"):
            link = document.get(key)
            if isinstance(link, str) and ("/te/v1/files/" in link or "/tedge/file-transfer/" in link):
                urls.add(link.split("://")[0])
    assert urls == {"https"}
    files = sim.stats.files["locked.bin"]
    assert files.statuses[0] == 200 and set(files.statuses[1:]) <= {304} and files.complete == 1
    assert sim.errors == []


@pytest.mark.parametrize("victim", ["legacy-00", "te-00"])
async def test_a_childs_certificate_cannot_read_or_answer_another_childs_operation(
    tmp_path: Path, locked: Locked, victim: str
) -> None:
    """The intruder is a child of the site with a certificate of its own. It subscribes to
    everything, and, told the victim's operation by the test (as if it had guessed it), answers
    `failed` for the victim at both of its legacy addresses or on its te/ command. The broker
    delivers it nothing and drops its answers: Cumulocity sees the victim's operation only as
    the victim reports it."""
    site = locked.site
    protocol = "te" if victim.startswith("te-") else "legacy"
    config_dir, data = tmp_path / "etc", tmp_path / "data"
    write_config(config_dir, data, locked.tls_port, free_port(), extra=site.gateway_toml(), tenant="127.0.0.1")
    gate = asyncio.Event()

    async def apply(firmware: Firmware) -> None:
        await gate.wait()  # the victim holds its operation open while the intruder tries

    connector = Connector(
        victim,
        apply=apply,
        work_dir=tmp_path / "victim",
        broker=site.child_broker(victim, "127.0.0.1", locked.tls_port),
        download=site.child_download(victim, DownloadSettings()),
        register=True,
        protocol=protocol,  # type: ignore[arg-type]
        heartbeat=None,
    )
    context = ssl.create_default_context(cafile=str(site.ca_file))
    context.load_cert_chain(site.child_cert("intruder"), site.child_key("intruder"))
    seen: list[str] = []
    requests = [f"tedge/{xid(victim)}/commands/req/firmware_update", f"te/device/{victim}///cmd/firmware_update/+"]
    gateway = Gateway(config_dir, data)
    sim = C8ySimulator(mqtt_port=locked.tls_port, mqtt_auth=site.gateway_mqtt_auth(), gateway_id=GATEWAY)
    async with (
        sim,
        observer(locked.local_port, requests) as watch,
        aiomqtt.Client("127.0.0.1", locked.tls_port, identifier="intruder", tls_context=context) as intruder,
    ):
        await intruder.subscribe("#", qos=1)

        async def collect() -> None:
            async for message in intruder.messages:
                seen.append(message.topic.value)

        collecting = asyncio.create_task(collect())
        await gateway.start()
        serving = asyncio.create_task(connector.run())
        try:
            url = sim.add_file("fw.bin", CONTENT)
            await sim.wait_for_device(xid(victim), timeout=20)
            operation = sim.create_firmware_operation(xid(victim), "fw", "1", url)
            await sim.wait_for(operation.id, OperationStatus.EXECUTING, timeout=20)
            # the gateway offers the operation both ways: a legacy request, a te/ command
            request = json.loads(await watch.next(requests[0], timeout=10))
            answer = json.dumps({"id": request["id"], "status": "failed", "reason": "intruder"})
            for address in (victim, xid(victim)):
                await intruder.publish(f"tedge/{address}/commands/res/firmware_update", answer, qos=1)
            command_topic = f"te/device/{victim}///cmd/firmware_update/tedge-firmware-{request['id']}"
            command = json.loads(await watch.next(command_topic, timeout=10))
            failed = command | {"status": "failed", "reason": "intruder"}
            await intruder.publish(command_topic, json.dumps(failed), qos=1, retain=True)
            # Mosquitto routes (or drops) a publish before it acknowledges it: were the answers
            # let through, the gateway would have them before the victim's own
            gate.set()
            await sim.wait_finished(operation.id, timeout=20)
        finally:
            connector.stop()
            collecting.cancel()
            async with asyncio.timeout(15):
                await asyncio.gather(serving, collecting, return_exceptions=True)
            await gateway.stop()
    history = [change.status for change in sim.operation(operation.id).history]
    assert history == [OperationStatus.PENDING, OperationStatus.EXECUTING, OperationStatus.SUCCESSFUL]
    assert seen == []


class ThinEdgeProxy:
    """Stands in for thin-edge's Cumulocity proxy with `c8y.proxy.ca_path` set: HTTPS with the
    gateway's certificate, client certificates of the site's CA required; records who asked."""

    def __init__(self, site: LockedSite, content: bytes) -> None:
        self.site, self.content = site, content
        self.callers: list[str] = []
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def __aenter__(self) -> ThinEdgeProxy:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(self.site.ca_file))
        context.load_cert_chain(self.site.gateway_cert, self.site.gateway_key)
        context.verify_mode = ssl.CERT_REQUIRED
        app = web.Application()
        app.router.add_get("/c8y/inventory/binaries/{id}", self._serve)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=context)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()

    async def _serve(self, request: web.Request) -> web.Response:
        peer = request.transport.get_extra_info("peercert") if request.transport else None
        subject = dict(item for rdn in (peer or {}).get("subject", ()) for item in rdn)
        self.callers.append(subject.get("commonName", "?"))
        return web.Response(body=self.content)


async def test_the_gateway_fetches_through_thin_edges_proxy_with_its_certificate(tmp_path: Path, locked: Locked) -> None:
    site = locked.site
    config_dir, data = tmp_path / "etc", tmp_path / "data"
    async with ThinEdgeProxy(site, CONTENT) as proxy:
        proxy_keys = f'[c8y.proxy.client]\nhost = "127.0.0.1"\nport = {proxy.port}\n'
        write_config(config_dir, data, locked.tls_port, free_port(), extra=site.gateway_toml() + proxy_keys)
        remote = "https://tenant.example.com/inventory/binaries/77"  # never fetched: the proxy is
        command = {
            "status": "gateway_download",
            "remoteUrl": remote,
            "tedgeUrl": f"https://127.0.0.1:{proxy.port}/c8y/inventory/binaries/77",
            "name": "fw",
            "version": "1",
        }
        topic = "te/device/te-00///cmd/firmware_update/c8y-mapper-1"
        gateway = Gateway(config_dir, data)
        await gateway.start()
        try:
            async with observer(locked.local_port, [topic]) as watch:
                await watch.publish(topic, json.dumps(command), retain=True)
                await watch.next(topic)
                moved = json.loads(await watch.next(topic, timeout=20))
        finally:
            await gateway.stop()
    assert moved["status"] == "gateway_downloaded", moved
    assert moved["sha256"] == hashlib.sha256(CONTENT).hexdigest()
    assert proxy.callers == [GATEWAY]  # the gateway's certificate, CN = the main device


@pytest.mark.parametrize("local", [True, False], ids=["proxy host is local", "any other host"])
async def test_the_local_hop_certificate_goes_only_to_local_hosts(tmp_path: Path, locked: Locked, local: bool) -> None:
    """The downloader uses the local hop's CAs and client certificate for the hosts it is told
    are local (thin-edge's proxy), the system's CAs alone for any other: a cloud host is never
    shown the gateway's certificate, and the site's CA vouches for no cloud host."""
    from tedge_firmware.core.retry import RetryPolicy
    from tedge_firmware.errors import DownloadError
    from tedge_firmware.shell.downloader import Downloader
    from tedge_firmware.shell.tls import client_context

    site = locked.site
    context = client_context(site.trusted, site.gateway_cert, site.gateway_key)
    downloader = Downloader(
        ssl_context=context,
        local_hosts=frozenset({"127.0.0.1" if local else "localhost"}),
        retry=RetryPolicy(initial=0.01, max_interval=0.01, max_elapsed=0.2),
    )
    async with ThinEdgeProxy(site, CONTENT) as proxy:
        url = f"https://127.0.0.1:{proxy.port}/c8y/inventory/binaries/1"
        try:
            if local:
                result = await downloader.download(url, tmp_path / "fw.bin")
                assert result.sha256 == hashlib.sha256(CONTENT).hexdigest()
            else:
                with pytest.raises(DownloadError, match="certificate"):
                    await downloader.download(url, tmp_path / "fw.bin")
        finally:
            await downloader.close()
    assert proxy.callers == ([GATEWAY] if local else [])
