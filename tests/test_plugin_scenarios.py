"""Reference §7 scenarios, black-box over a real broker, adapted to DESIGN.md "Our behaviour".

Each test starts the real all-in-one service in-process with a temp config and data dir, plays
Cumulocity and the child over MQTT, and asserts the exact messages and files.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from brokers import Broker, free_port
from harness import (
    CHILD,
    E501,
    E503,
    EMPTY_SHA,
    S515,
    FirmwareServer,
    Gateway,
    K,
    Observer,
    U,
    cache_files,
    f502,
    no_operation_files_left,
    observer,
    operation_files,
    req_topic,
    res_topic,
    seed_cache,
    sha256,
    us,
    write_config,
)
from tedge_firmware.core.operation import NO_REASON, file_id_for_url


class Setup:
    def __init__(self, tmp_path: Path, broker: Broker) -> None:
        self.tmp_path = tmp_path
        self.broker = broker
        self.config_dir = tmp_path / "etc"
        self.data = tmp_path / "data"
        self.http_port = free_port()
        self.gateway = Gateway(self.config_dir, self.data)
        self.cloud = FirmwareServer()

    def configure(self, *, timeout: int = 3600, c8y_url: str = "c8y.tenant.io", extra: str = "") -> None:
        write_config(
            self.config_dir, self.data, self.broker.port, self.http_port, timeout=timeout, extra=extra, tenant=c8y_url
        )

    def cache_hit(self, url: str = U, content: bytes = b"") -> Path:
        """A cached firmware the origin declared immutable: no request to the origin."""
        return seed_cache(self.data, url, content)

    async def start(self, obs: Observer) -> None:
        await self.gateway.start()
        assert await obs.next("c8y/s/us") == b"500"

    async def request(self, obs: Observer, child: str = CHILD) -> dict[str, object]:
        return json.loads(await obs.next(req_topic(child)))  # type: ignore[no-any-return]


@pytest.fixture
async def setup(tmp_path: Path, broker: Broker) -> AsyncIterator[Setup]:
    instance = Setup(tmp_path, broker)
    instance.configure()
    await instance.cloud.start()
    try:
        yield instance
    finally:
        await instance.gateway.stop()
        await instance.cloud.stop()


async def respond(obs: Observer, op_id: object, status: str, child: str = CHILD, **extra: str) -> None:
    await obs.publish(res_topic(child), json.dumps({"id": op_id, "status": status, **extra}))


# §7.1
async def test_startup_creates_directories_and_requests_pending_operations(setup: Setup) -> None:
    async with observer(setup.broker.port) as obs:
        await setup.start(obs)
        for name in ("cache", "firmware", "file-transfer"):
            assert (setup.data / name).is_dir()
        await setup.gateway.stop()
        for name in ("cache", "firmware", "file-transfer"):
            shutil.rmtree(setup.data / name)
        await setup.start(obs)
        for name in ("cache", "firmware", "file-transfer"):
            assert (setup.data / name).is_dir()


# §7.2
async def test_cache_hit_sends_request(setup: Setup) -> None:
    setup.cache_hit()
    async with observer(setup.broker.port) as obs:
        await setup.start(obs)
        await obs.publish("c8y/s/ds", S515)
        request = await setup.request(obs)
        assert list(request) == ["id", "attempt", "name", "version", "sha256", "url"]
        assert request["attempt"] == 1
        assert request["name"] == "fw-name"
        assert request["version"] == "fw-version"
        assert request["sha256"] == EMPTY_SHA
        assert request["url"] == f"http://127.0.0.1:{setup.http_port}/tedge/file-transfer/{CHILD}/firmware_update/{K}"
        assert isinstance(request["id"], str) and len(request["id"]) == 21
        link = setup.data / "file-transfer" / CHILD / "firmware_update" / K
        assert link.is_symlink() and os.readlink(link) == str(setup.data / "cache" / "sha256" / EMPTY_SHA)
        record = json.loads((setup.data / "firmware" / str(request["id"])).read_text())
        assert record == {
            "operation_id": request["id"],
            "child_id": CHILD,
            "name": "fw-name",
            "version": "fw-version",
            "server_url": U,
            "file_transfer_url": request["url"],
            "sha256": EMPTY_SHA,
            "attempt": 1,
        }
        await obs.silence(0.5, [us()])


# §7.3
async def test_duplicate_515_resends_with_next_attempt(setup: Setup) -> None:
    setup.cache_hit()
    async with observer(setup.broker.port) as obs:
        await setup.start(obs)
        await obs.publish("c8y/s/ds", S515)
        first = await setup.request(obs)
        await obs.publish("c8y/s/ds", S515)
        second = await setup.request(obs)
        assert second["id"] == first["id"] and second["attempt"] == 2
        assert json.loads((setup.data / "firmware" / str(first["id"])).read_text())["attempt"] == 2
        await obs.silence(0.5, [us()])


# §7.4
async def test_cache_miss_downloads_then_requests(setup: Setup) -> None:
    payload = os.urandom(4 << 20) + b"\xff\xfe\x00"  # several MB, not UTF-8
    setup.cloud.files["fw.bin"] = payload
    url = setup.cloud.url("fw.bin")
    async with observer(setup.broker.port) as obs:
        await setup.start(obs)
        await obs.publish("c8y/s/ds", f"515,{CHILD},fw,1.0,{url}")
        request = await setup.request(obs)
        key = file_id_for_url(url)
        assert request["sha256"] == sha256(payload)
        assert str(request["url"]).endswith(f"/firmware_update/{key}")
        digest = sha256(payload)
        assert (setup.data / "cache" / "sha256" / digest).read_bytes() == payload
        assert cache_files(setup.data) == [f"sha256/{digest}", f"urls/{key}.json"]
        assert setup.cloud.count("fw.bin") == 1
        assert "Authorization" not in setup.cloud.requests[0].headers
        # the child fetches it from our file-transfer service, byte-exact
        async with aiohttp.ClientSession() as http, http.get(str(request["url"])) as answer:
            assert answer.status == 200
            assert await answer.read() == payload


# §7.5
async def test_download_failure_fails_the_operation(setup: Setup) -> None:
    url = setup.cloud.url("missing.bin")
    async with observer(setup.broker.port) as obs:
        await setup.start(obs)
        await obs.publish("c8y/s/ds", f"515,{CHILD},fw,1.0,{url}")
        assert await obs.next(us()) == E501
        failed = await obs.next(us())
        assert failed.startswith(f'502,c8y_Firmware,"Download from {url} failed with '.encode())
        assert b"404" in failed
        assert await no_operation_files_left(setup.data) == []
        assert cache_files(setup.data) == []
        assert obs.pending(req_topic()) == 0


# §7.6
async def test_tenant_url_gets_a_jwt_and_bearer(tmp_path: Path, broker: Broker) -> None:
    setup = Setup(tmp_path, broker)
    setup.configure(c8y_url="localhost")
    await setup.cloud.start()
    setup.cloud.files["f"] = b"tenant firmware"
    tenant_url = f"http://localhost:{setup.cloud.port}/f"
    try:
        async with observer(broker.port) as obs:
            await setup.start(obs)
            setup.cache_hit()
            await obs.publish("c8y/s/ds", f"515,{CHILD},fw,1.0,{tenant_url}")
            assert await obs.next("c8y/s/uat") == b""
            # waiting for the token blocks nobody: another operation goes ahead meanwhile
            await obs.publish("c8y/s/ds", S515)
            assert json.loads(await obs.next(req_topic()))["name"] == "fw-name"
            await obs.publish("c8y/s/dat", "71,token")
            request = await setup.request(obs)
            assert request["sha256"] == sha256(b"tenant firmware")
            assert setup.cloud.requests[-1].headers["Authorization"] == "Bearer token"
            # another host (even the same machine) never sees the token
            other = f"http://127.0.0.1:{setup.cloud.port}/f"
            await obs.publish("c8y/s/ds", f"515,{CHILD},fw,1.0,{other}")
            await setup.request(obs)
            assert "Authorization" not in setup.cloud.requests[-1].headers
            assert obs.pending("c8y/s/uat") == 0
    finally:
        await setup.gateway.stop()
        await setup.cloud.stop()


# §7.7 + DESIGN item 4
async def test_successful_response_completes_and_removes_the_link(setup: Setup) -> None:
    setup.cache_hit()
    async with observer(setup.broker.port) as obs:
        await setup.start(obs)
        await obs.publish("c8y/s/ds", S515)
        request = await setup.request(obs)
        await respond(obs, request["id"], "successful")
        assert await obs.sequence(us(), 3) == [E501, b"115,fw-name,fw-version," + U.encode(), E503]
        assert await no_operation_files_left(setup.data) == []
        link = setup.data / "file-transfer" / CHILD / "firmware_update" / K
        assert not link.exists() and not link.is_symlink()
        assert (setup.data / "cache" / "sha256" / EMPTY_SHA).is_file()


# §7.8 adapted (DESIGN item 1: the child's reason reaches the cloud)
@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ({"reason": "flash write error"}, "flash write error"),
        ({}, NO_REASON),
        ({"reason": ""}, NO_REASON),
        ({"reason": 'bad "image", try\nagain'}, 'bad ""image"", try again'),
    ],
)
async def test_executing_then_failed_forwards_the_reason(setup: Setup, extra: dict[str, str], reason: str) -> None:
    setup.cache_hit()
    async with observer(setup.broker.port) as obs:
        await setup.start(obs)
        await obs.publish("c8y/s/ds", S515)
        request = await setup.request(obs)
        await respond(obs, request["id"], "executing")
        assert await obs.next(us()) == E501
        await respond(obs, request["id"], "failed", **extra)
        assert await obs.next(us()) == f502(reason)
        await obs.silence(0.3, [us()])
        assert await no_operation_files_left(setup.data) == []


# §7.9, §7.10, §7.23
async def test_invalid_unknown_and_misrouted_responses_are_ignored(setup: Setup) -> None:
    setup.cache_hit()
    async with observer(setup.broker.port) as obs:
        await setup.start(obs)
        await obs.publish("c8y/s/ds", S515)
        request = await setup.request(obs)
        await respond(obs, request["id"], "invalid")
        await respond(obs, "invalid_op_id", "successful")
        await respond(obs, request["id"], "successful", child="other-child")
        await obs.silence(1.0)
        # the operation is still alive and completes normally
        await respond(obs, request["id"], "successful")
        assert await obs.sequence(us(), 3) == [E501, b"115,fw-name,fw-version," + U.encode(), E503]


# §7.11
async def test_timeout_fails_a_pending_operation(setup: Setup) -> None:
    setup.configure(timeout=1)
    setup.cache_hit()
    async with observer(setup.broker.port) as obs:
        await setup.start(obs)
        await obs.publish("c8y/s/ds", S515)
        request = await setup.request(obs)
        assert await obs.next(us(), timeout=5) == E501
        reason = (
            f"Child device {CHILD} did not respond within the timeout interval of 1sec. "
            f"Operation ID={request['id']}"
        )
        assert await obs.next(us()) == f502(reason)
        assert await no_operation_files_left(setup.data) == []
        await respond(obs, request["id"], "successful")
        await obs.silence(0.5, [us()])


# §7.25 adapted (DESIGN item 2: executing restarts the inactivity timeout)
async def test_executing_extends_the_timeout(setup: Setup) -> None:
    setup.configure(timeout=2)
    setup.cache_hit()
    async with observer(setup.broker.port) as obs:
        await setup.start(obs)
        await obs.publish("c8y/s/ds", S515)
        request = await setup.request(obs)
        t0 = time.monotonic()
        await asyncio.sleep(1.2)  # the child works for a while before it reports
        await respond(obs, request["id"], "executing")
        t_exec = time.monotonic()
        assert await obs.next(us()) == E501
        failed = await obs.next(us(), timeout=6)
        elapsed_since_exec = time.monotonic() - t_exec
        assert failed.startswith(b'502,c8y_Firmware,"Child device child-device did not respond')
        assert elapsed_since_exec >= 1.8, "the timeout must count from the executing response"
        assert time.monotonic() - t0 >= 3.0


# §7.12
async def test_responses_are_handled_while_another_download_stalls(setup: Setup) -> None:
    setup.cache_hit()
    setup.cloud.stall.add("firmware2")
    async with observer(setup.broker.port) as obs:
        await setup.start(obs)
        await obs.publish("c8y/s/ds", f"515,child-2,fw-name,fw-version,{setup.cloud.url('firmware2')}")
        await obs.publish("c8y/s/ds", S515)
        request = await setup.request(obs)
        await respond(obs, request["id"], "successful")
        assert await obs.sequence(us(), 3) == [E501, b"115,fw-name,fw-version," + U.encode(), E503]
        assert setup.cloud.count("firmware2") == 1
        assert obs.pending(us("child-2")) == 0


# §7.13 adapted (DESIGN item 8: directories deleted at run time are recreated)
async def test_directories_deleted_at_run_time_are_recreated(setup: Setup) -> None:
    setup.cloud.files["fw.bin"] = b"firmware"
    url = setup.cloud.url("fw.bin")
    async with observer(setup.broker.port) as obs:
        await setup.start(obs)
        for name in ("cache", "firmware", "file-transfer"):
            shutil.rmtree(setup.data / name)
        await obs.publish("c8y/s/ds", f"515,{CHILD},fw,1.0,{url}")
        request = await setup.request(obs)
        assert (setup.data / "firmware" / str(request["id"])).is_file()
        async with aiohttp.ClientSession() as http, http.get(str(request["url"])) as answer:
            assert await answer.read() == b"firmware"
        await respond(obs, request["id"], "successful")
        assert (await obs.sequence(us(), 3))[2] == E503


# §7.16
async def test_cache_is_reused_for_a_later_operation(setup: Setup) -> None:
    setup.cloud.files["fw.bin"] = b"cached firmware"
    url = setup.cloud.url("fw.bin")
    line = f"515,{CHILD},fw,1.0,{url}"
    async with observer(setup.broker.port) as obs:
        await setup.start(obs)
        await obs.publish("c8y/s/ds", line)
        first = await setup.request(obs)
        entry = setup.data / "cache" / "sha256" / sha256(b"cached firmware")
        mtime = entry.stat().st_mtime_ns
        await respond(obs, first["id"], "successful")
        await obs.sequence(us(), 3)
        await obs.publish("c8y/s/ds", line)
        second = await setup.request(obs)
        assert second["attempt"] == 1 and second["id"] != first["id"]
        assert entry.stat().st_mtime_ns == mtime
        # the origin was asked whether the copy is current (it answered 304), once
        assert setup.cloud.count("fw.bin") == 2
        assert "If-None-Match" in setup.cloud.requests[1].headers


# §7.20, §7.22
async def test_main_device_and_malformed_515_are_ignored(setup: Setup) -> None:
    setup.cache_hit()
    setup.cache_hit("U")
    async with observer(setup.broker.port) as obs:
        await setup.start(obs)
        await obs.publish("c8y/s/ds", f"515,parent-device,fw,1.0,{U}")
        await obs.publish("c8y/s/ds", f"515,{CHILD},fw-name,fw-version")
        await obs.silence(1.0)
        assert operation_files(setup.data) == []
        await obs.publish("c8y/s/ds", f'515,{CHILD},"fw, x",1.0,U,extra')
        request = await setup.request(obs)
        assert request["name"] == "fw, x"


# §7.21
async def test_several_records_in_one_payload(setup: Setup) -> None:
    setup.cache_hit()
    async with observer(setup.broker.port) as obs:
        await setup.start(obs)
        await obs.publish("c8y/s/ds", f"511,x,foo\n515,{CHILD},fw-name,fw-version,{U}\n515,child-b,fw,1,{U}")
        a = await setup.request(obs)
        b = await setup.request(obs, "child-b")
        assert str(a["url"]).endswith(f"/{CHILD}/firmware_update/{K}")
        assert str(b["url"]).endswith(f"/child-b/firmware_update/{K}")
        assert (setup.data / "file-transfer" / "child-b" / "firmware_update" / K).is_symlink()


# §7.24
async def test_executing_twice_then_successful_sends_one_501(setup: Setup) -> None:
    setup.cache_hit()
    async with observer(setup.broker.port) as obs:
        await setup.start(obs)
        await obs.publish("c8y/s/ds", S515)
        request = await setup.request(obs)
        await respond(obs, request["id"], "executing")
        await respond(obs, request["id"], "executing")
        await respond(obs, request["id"], "successful")
        assert await obs.sequence(us(), 3) == [E501, b"115,fw-name,fw-version," + U.encode(), E503]
        await obs.silence(0.3, [us()])


# §7.26 and DESIGN item 11
async def test_parallel_operations_and_no_extra_501_after_resend(setup: Setup) -> None:
    setup.cache_hit()
    async with observer(setup.broker.port) as obs:
        await setup.start(obs)
        await obs.publish("c8y/s/ds", S515)
        first = await setup.request(obs)
        await respond(obs, first["id"], "executing")
        assert await obs.next(us()) == E501
        await obs.publish("c8y/s/ds", f"515,{CHILD},fw2,2.0,{U}")
        second = await setup.request(obs)
        assert second["id"] != first["id"] and second["attempt"] == 1
        await obs.publish("c8y/s/ds", S515)  # duplicate of the executing one
        again = await setup.request(obs)
        assert again["id"] == first["id"] and again["attempt"] == 2
        await respond(obs, first["id"], "successful")
        assert await obs.sequence(us(), 2) == [b"115,fw-name,fw-version," + U.encode(), E503]
        # the link stays while the second operation of this child still uses it
        assert (setup.data / "file-transfer" / CHILD / "firmware_update" / K).is_symlink()
        await respond(obs, second["id"], "successful")
        assert await obs.sequence(us(), 3) == [E501, b"115,fw2,2.0," + U.encode(), E503]
        assert not (setup.data / "file-transfer" / CHILD / "firmware_update" / K).is_symlink()


# §7.27
async def test_restart_resends_persisted_operations_before_500(setup: Setup) -> None:
    setup.cache_hit()
    firmware = setup.data / "firmware"
    firmware.mkdir(parents=True)
    url = f"http://127.0.0.1:{setup.http_port}/tedge/file-transfer/{CHILD}/firmware_update/{K}"
    record = {
        "operation_id": "opX",
        "child_id": CHILD,
        "name": "fw-name",
        "version": "fw-version",
        "server_url": U,
        "file_transfer_url": url,
        "sha256": "stored-sha",
        "attempt": 3,
    }
    (firmware / "opX").write_text(json.dumps(record))
    (firmware / "corrupt").write_text("{not json")
    async with observer(setup.broker.port) as obs:
        await setup.gateway.start()
        request = json.loads(await obs.next(req_topic()))
        assert request == {"id": "opX", "attempt": 4, "name": "fw-name", "version": "fw-version", "sha256": "stored-sha", "url": url}
        assert await obs.next("c8y/s/us") == b"500"
        assert json.loads((firmware / "opX").read_text())["attempt"] == 4
        assert (firmware / ".corrupt" / "corrupt").read_text() == "{not json"
        await respond(obs, "opX", "successful")
        assert await obs.sequence(us(), 3) == [E501, b"115,fw-name,fw-version," + U.encode(), E503]


# §7.28 (shortened: the harness asks twice, 1 s each)
async def test_jwt_unavailable_fails_the_operation(tmp_path: Path, broker: Broker) -> None:
    setup = Setup(tmp_path, broker)
    setup.configure(c8y_url="localhost")
    await setup.cloud.start()
    try:
        async with observer(broker.port) as obs:
            await setup.start(obs)
            await obs.publish("c8y/s/ds", f"515,{CHILD},fw,1.0,http://localhost:{setup.cloud.port}/f")
            assert await obs.sequence("c8y/s/uat", 2) == [b"", b""]
            assert await obs.sequence(us(), 2) == [E501, f502("Failed to retrieve JWT token.")]
            assert setup.cloud.requests == []
            # a malformed answer fails only that operation, with a clear reason
            await obs.publish("c8y/s/ds", f"515,{CHILD},fw,2.0,http://localhost:{setup.cloud.port}/f")
            await obs.next("c8y/s/uat")
            await obs.publish("c8y/s/dat", "garbage")
            assert await obs.next(us()) == E501
            failed = await obs.next(us())
            assert failed.startswith(b'502,c8y_Firmware,"Failed to retrieve JWT token: malformed answer')
    finally:
        await setup.gateway.stop()
        await setup.cloud.stop()


# §7.29
async def test_transient_5xx_is_retried(setup: Setup) -> None:
    setup.cloud.files["flaky.bin"] = b"finally"
    setup.cloud.statuses["flaky.bin"] = [500, 503]
    async with observer(setup.broker.port) as obs:
        await setup.start(obs)
        await obs.publish("c8y/s/ds", f"515,{CHILD},fw,1.0,{setup.cloud.url('flaky.bin')}")
        request = await setup.request(obs, CHILD)
        assert request["sha256"] == sha256(b"finally")
        assert setup.cloud.count("flaky.bin") == 3


# §7.30 (the "up" half; the will is tested with kill -9 in test_plugin_faults)
async def test_health_check_answers_up(setup: Setup) -> None:
    async with observer(setup.broker.port, ["tedge/health/c8y-firmware-plugin", "c8y/s/us"]) as obs:
        await setup.start(obs)
        first = json.loads(await obs.next("tedge/health/c8y-firmware-plugin"))
        assert first["status"] == "up" and first["pid"] == os.getpid()
        await obs.publish("tedge/health-check/c8y-firmware-plugin", "")
        message = await obs.next_message("tedge/health/c8y-firmware-plugin")
        assert json.loads(message.payload)["status"] == "up"  # type: ignore[arg-type]
        await obs.publish("tedge/health-check", "")
        assert json.loads(await obs.next("tedge/health/c8y-firmware-plugin"))["status"] == "up"


# DESIGN item 5
async def test_one_download_for_duplicates_and_other_children_while_downloading(setup: Setup) -> None:
    setup.cloud.files["big.bin"] = os.urandom(1 << 20)
    gate = setup.cloud.gates["big.bin"] = asyncio.Event()
    url = setup.cloud.url("big.bin")
    async with observer(setup.broker.port) as obs:
        await setup.start(obs)
        await obs.publish("c8y/s/ds", f"515,{CHILD},fw,1.0,{url}")
        await obs.publish("c8y/s/ds", f"515,{CHILD},fw,1.0,{url}")  # duplicate while downloading
        await obs.publish("c8y/s/ds", f"515,child-b,fw,1.0,{url}")  # same firmware, other child
        await obs.silence(0.5, [req_topic(), req_topic("child-b")])
        gate.set()
        mine = await setup.request(obs)
        other = await setup.request(obs, "child-b")
        assert mine["attempt"] == 2
        assert other["attempt"] == 1 and other["sha256"] == mine["sha256"]
        await obs.silence(0.5, [req_topic()])
        assert len(setup.cloud.requests) == 1


# issue 3: an operation waiting for its download survives a restart of the service
async def test_operation_waiting_for_its_download_survives_a_restart(setup: Setup) -> None:
    setup.cloud.files["slow.bin"] = b"firmware behind a slow link"
    gate = setup.cloud.gates["slow.bin"] = asyncio.Event()
    url = setup.cloud.url("slow.bin")
    async with observer(setup.broker.port) as obs:
        await setup.start(obs)
        await obs.publish("c8y/s/ds", f"515,{CHILD},fw,1.0,{url}")
        async with asyncio.timeout(5):
            await setup.cloud.arrivals["slow.bin"].wait()
        # the operation was persisted before the download started
        [record_file] = list((setup.data / "firmware" / ".fetching").iterdir())
        assert json.loads(record_file.read_text())["server_url"] == url
        await setup.gateway.stop()
        assert record_file.exists()
        gate.set()
        await setup.start(obs)
        request = await setup.request(obs)
        assert request["id"] == record_file.name
        assert request["sha256"] == sha256(b"firmware behind a slow link")
        assert not record_file.exists()
        # Cumulocity re-delivers the pending operation after the 500: a duplicate, not a new one
        await obs.publish("c8y/s/ds", f"515,{CHILD},fw,1.0,{url}")
        again = await setup.request(obs)
        assert again["id"] == request["id"] and again["attempt"] == 2
        await respond(obs, request["id"], "successful")
        assert await obs.sequence(us(), 3) == [E501, f"115,fw,1.0,{url}".encode(), E503]


# DESIGN item 10: the URL handed to children uses http.client.host when set
async def test_urls_use_the_client_host(setup: Setup) -> None:
    setup.configure(extra='[http.client]\nhost = "gateway.local"\n')
    setup.cache_hit()
    async with observer(setup.broker.port) as obs:
        await setup.start(obs)
        await obs.publish("c8y/s/ds", S515)
        request = await setup.request(obs)
        assert request["url"] == f"http://gateway.local:{setup.http_port}/tedge/file-transfer/{CHILD}/firmware_update/{K}"
