"""A cache that never hands out stale firmware, and keeps one copy per content: the real gateway,
the Cumulocity simulator as the origin (its binaries change at the same URL, answer 304 to a
conditional request and declare freshness with Cache-Control), a real broker, real files."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from brokers import Broker, free_port
from harness import (
    Gateway,
    Observer,
    cache_files,
    eventually,
    gateway_ready,
    observer,
    operation_files,
    write_simulated_tenant_config,
)
from tedge_firmware.core.operation import file_id_for_url
from tedge_firmware.sim import C8ySimulator, FileFaults

V1 = os.urandom(200_000)
V2 = os.urandom(200_000)
CHILDREN = [f"c{index:03d}" for index in range(100)]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def req(child: str) -> str:
    return f"tedge/{child}/commands/req/firmware_update"


@dataclass
class Site:
    sim: C8ySimulator
    gateway: Gateway
    data: Path
    config_dir: Path

    async def install(self, obs: Observer, child: str, url: str, version: str = "1") -> dict[str, object]:
        """A c8y_Firmware operation for `child`; the request the gateway sends the child."""
        self.sim.create_firmware_operation(child, "fw", version, url)
        return json.loads(await obs.next(req(child), timeout=20))  # type: ignore[no-any-return]

    async def child_gets(self, request: dict[str, object]) -> bytes:
        async with aiohttp.ClientSession() as http, http.get(str(request["url"])) as answer:
            assert answer.status == 200
            return await answer.read()

    def statuses(self, name: str) -> tuple[int, ...]:
        return self.sim.stats.files[name].statuses


@pytest.fixture
async def site(tmp_path: Path, broker: Broker, request: pytest.FixtureRequest) -> AsyncIterator[Site]:
    config_dir, data = tmp_path / "etc", tmp_path / "data"
    write_simulated_tenant_config(config_dir, data, broker.port, free_port(), CHILDREN)
    extra = getattr(request, "param", "")
    if extra:
        with (config_dir / "tedge.toml").open("a") as toml:
            toml.write(extra)
    gateway = Gateway(config_dir, data)
    async with C8ySimulator(mqtt_port=broker.port, gateway_id="parent-device") as sim:
        await gateway.start()
        try:
            await sim.wait_until(lambda: all(sim.device(c) is not None for c in CHILDREN), timeout=30)
            yield Site(sim, gateway, data, config_dir)
        finally:
            await gateway.stop()


async def test_a_changed_file_at_the_same_url_is_downloaded_again_and_an_unchanged_one_is_not(
    site: Site, broker: Broker
) -> None:
    url = site.sim.add_file("fw.bin", V1)
    async with observer(broker.port, [req(c) for c in CHILDREN[:3]]) as obs:
        first = await site.install(obs, "c000", url)
        assert first["sha256"] == sha(V1)
        second = await site.install(obs, "c001", url)  # unchanged: the origin confirms it
        assert second["sha256"] == sha(V1)
        assert site.statuses("fw.bin") == (200, 304)
        site.sim.add_file("fw.bin", V2)  # the tenant replaces the binary behind the URL
        third = await site.install(obs, "c002", url, version="2")
        assert third["sha256"] == sha(V2)  # the new bytes, with their own digest
        assert site.statuses("fw.bin") == (200, 304, 200)
        # what c000 was handed stays c000's while its operation runs; c002 gets the new file
        assert await site.child_gets(first) == V1
        assert await site.child_gets(third) == V2
    assert site.sim.stats.files["fw.bin"].bytes_served == 2 * len(V1)  # a 304 has no body
    files = cache_files(site.data)
    assert f"sha256/{sha(V1)}" in files and f"sha256/{sha(V2)}" in files
    assert [f for f in files if f.startswith("urls/")] == [f"urls/{file_id_for_url(url)}.json"]


@pytest.mark.parametrize("cache_control", ["max-age=3600", "public, max-age=31536000, immutable"])
async def test_what_the_origin_declares_fresh_costs_no_request(site: Site, broker: Broker, cache_control: str) -> None:
    url = site.sim.add_file("fw.bin", V1, cache_control=cache_control)
    async with observer(broker.port, [req(c) for c in CHILDREN[:2]]) as obs:
        await site.install(obs, "c000", url)
        again = await site.install(obs, "c001", url)
    assert again["sha256"] == sha(V1)
    assert site.statuses("fw.bin") == (200,)


async def test_a_hundred_children_asking_at_once_share_one_revalidation(site: Site, broker: Broker) -> None:
    url = site.sim.add_file("fw.bin", V1)
    async with observer(broker.port, [req(c) for c in CHILDREN]) as obs:
        await site.install(obs, CHILDREN[0], url)
        release = site.sim.hold_file("fw.bin")  # the origin is slow to answer
        for child in CHILDREN[1:]:
            site.sim.create_firmware_operation(child, "fw", "1", url)
        # every operation taken (its file written: waiting for the download) while the
        # origin has not answered yet
        assert await eventually(lambda: len(operation_files(site.data)) == len(CHILDREN), timeout=30)
        assert site.sim.stats.files["fw.bin"].requests == 2
        release.set()
        requests = [json.loads(await obs.next(req(child), timeout=30)) for child in CHILDREN[1:]]
    assert {r["sha256"] for r in requests} == {sha(V1)}
    assert site.statuses("fw.bin") == (200, 304)


async def test_the_same_bytes_under_two_urls_are_stored_once(site: Site, broker: Broker) -> None:
    first_url = site.sim.add_file("a.bin", V1)
    second_url = site.sim.add_file("b.bin", V1)
    async with observer(broker.port, [req(c) for c in CHILDREN[:2]]) as obs:
        first = await site.install(obs, "c000", first_url)
        second = await site.install(obs, "c001", second_url)
        assert await site.child_gets(first) == V1 and await site.child_gets(second) == V1
    assert [f for f in cache_files(site.data) if f.startswith("sha256/")] == [f"sha256/{sha(V1)}"]
    links = [site.data / "file-transfer" / c / "firmware_update" for c in ("c000", "c001")]
    targets = {os.readlink(next(folder.iterdir())) for folder in links}
    assert targets == {str(site.data / "cache" / "sha256" / sha(V1))}


@pytest.mark.parametrize(
    ("site", "handed_out"),
    [
        ("[firmware.download]\nretry_budget = 2\n[firmware.cache]\nstale_if_error = true\n", True),
        ("[firmware.download]\nretry_budget = 2\n", False),
    ],
    indirect=["site"],
    ids=["stale_if_error", "default"],
)
async def test_an_unreachable_origin_fails_the_operation_unless_the_site_allows_the_cached_copy(
    site: Site, broker: Broker, handed_out: bool, caplog: pytest.LogCaptureFixture
) -> None:
    url = site.sim.add_file("fw.bin", V1)
    async with observer(broker.port, [req(c) for c in CHILDREN[:2]] + ["c8y/s/us/c001"]) as obs:
        await site.install(obs, "c000", url)
        # the origin goes away: every request now fails as an overloaded origin's would (503s
        # until the gateway's retry budget, 2 s here, runs out)
        site.sim.set_faults("fw.bin", FileFaults(error_status=503, error_times=1000))
        caplog.set_level(logging.WARNING)
        site.sim.create_firmware_operation("c001", "fw", "1", url)
        if handed_out:
            request = json.loads(await obs.next(req("c001"), timeout=30))
            assert request["sha256"] == sha(V1)
            assert any("handing out the cached copy" in r.getMessage() for r in caplog.records)
        else:
            while not (line := await obs.next("c8y/s/us/c001", timeout=30)).startswith(b"502"):
                pass
            assert b"503" in line
            assert obs.pending(req("c001")) == 0


async def test_a_cache_of_the_earlier_layout_keeps_serving_and_is_moved(tmp_path: Path, broker: Broker) -> None:
    """An entry as the previous release kept it (`cache/<FILE_ID>`), linked for a child whose
    operation was in progress: after the upgrade the child's link serves the same bytes with
    the same ETag (a resume goes on), the entry is content-addressed, and the next operation
    for the URL asks the origin (nothing says the copy is fresh)."""
    config_dir, data = tmp_path / "etc", tmp_path / "data"
    write_simulated_tenant_config(config_dir, data, broker.port, free_port(), CHILDREN[:2])
    async with C8ySimulator(mqtt_port=broker.port, gateway_id="parent-device") as sim:
        url = sim.add_file("fw.bin", V1)
        file_id = file_id_for_url(url)
        old = data / "cache" / file_id
        old.parent.mkdir(parents=True)
        old.write_bytes(V1)
        link = data / "file-transfer" / "c000" / "firmware_update" / file_id
        link.parent.mkdir(parents=True)
        link.symlink_to(old)
        gateway = Gateway(config_dir, data)
        await gateway.start()
        try:
            await gateway_ready(broker.port)  # the cache was moved before the services started
            await sim.wait_until(lambda: sim.device("c001") is not None, timeout=20)
            http_port = gateway_http_port(config_dir)
            child_url = f"http://127.0.0.1:{http_port}/tedge/file-transfer/c000/firmware_update/{file_id}"
            async with aiohttp.ClientSession() as http, http.get(child_url) as answer:
                assert answer.status == 200 and await answer.read() == V1
                etag = answer.headers["ETag"]
            assert not old.exists() and os.readlink(link) == str(data / "cache" / "sha256" / sha(V1))
            async with aiohttp.ClientSession() as http, http.get(child_url) as answer:
                assert answer.headers["ETag"] == etag
            async with observer(broker.port, [req("c001")]) as obs:
                sim.create_firmware_operation("c001", "fw", "1", url)
                request = json.loads(await obs.next(req("c001"), timeout=20))
            assert request["sha256"] == sha(V1)
            assert sim.stats.files["fw.bin"].statuses == (200,)  # asked; the same bytes came
            assert [f for f in cache_files(data) if f.startswith("sha256/")] == [f"sha256/{sha(V1)}"]
        finally:
            await gateway.stop()


def gateway_http_port(config_dir: Path) -> int:
    import tomllib

    document = tomllib.loads((config_dir / "tedge.toml").read_text())
    return int(document["http"]["bind"]["port"])
