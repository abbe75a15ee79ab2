"""The gateway's promises under hostile input, crashes and broker restarts (issue 12).

Each test reproduces one way the gateway used to stop or lose a status, over a real Mosquitto,
and shows that it now goes on and loses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from brokers import Broker, free_port
from harness import (
    E501,
    E503,
    S515,
    WATCHED,
    Gateway,
    GatewayProcess,
    K,
    U,
    eventually,
    f502,
    no_operation_files_left,
    observer,
    recorded_state,
    req_topic,
    res_topic,
    seed_cache,
    us,
    write_config,
)
from linkproxy import LinkProxy
from tedge_firmware.gateway.plugin import PluginOptions

INSTALLED = b"115,fw-name,fw-version," + U.encode()


# Characters Mosquitto refuses in a topic (it then drops the publisher's connection): C1
# controls, Unicode non-characters, and the C0 controls our check always refused.
REFUSED_BY_MOSQUITTO = ["\u0085", "\u0080", "\u009f", "\ufdd0", "\ufdef", "\ufffe", "\uffff", "\U0001fffe"]


@pytest.mark.parametrize("character", REFUSED_BY_MOSQUITTO, ids=lambda c: f"U+{ord(c):04X}")
async def test_a_child_id_the_broker_refuses_does_not_silence_the_gateway(
    tmp_path: Path, broker: Broker, gateway: Gateway, character: str
) -> None:
    async with observer(broker.port) as obs:
        await gateway.start()
        assert await obs.next("c8y/s/us") == b"500"
        await obs.publish("c8y/s/ds", f"515,{character}x,fw-name,fw-version,{U}")
        await obs.publish("c8y/s/ds", S515)
        request = json.loads(await obs.next(req_topic()))
        await obs.publish(res_topic(), json.dumps({"id": request["id"], "status": "successful"}))
        assert await obs.sequence(us(), 3) == [E501, INSTALLED, E503]
    assert await no_operation_files_left(tmp_path / "data") == []


# --- statuses are not lost, nor sent twice, whatever stops ---------------------------------


@contextlib.asynccontextmanager
async def behind_a_proxy(
    tmp_path: Path, broker: Broker, config_dir: Path, options: PluginOptions | None = None
) -> AsyncIterator[tuple[LinkProxy, Gateway]]:
    """An in-process gateway whose MQTT link goes through a LinkProxy (stopped at the end)."""
    data = tmp_path / "data"
    async with LinkProxy(broker.port) as proxy:
        write_config(config_dir, data, proxy.port, free_port())
        gateway = Gateway(config_dir, data, options=options or PluginOptions(jwt_timeout=1.0, jwt_attempts=2))
        try:
            yield proxy, gateway
        finally:
            await gateway.stop()


@contextlib.contextmanager
def gateway_process(tmp_path: Path, mqtt_port: int) -> Iterator[GatewayProcess]:
    """`tedge-firmware run` as a process, against `mqtt_port` (a proxy in front of the broker)."""
    config_dir = tmp_path / "etc-proxied"
    write_config(config_dir, tmp_path / "data", mqtt_port, free_port())
    seed_cache(tmp_path / "data", U, b"\x00\xff binary firmware")  # immutable: no request
    process = GatewayProcess(config_dir, tmp_path / "gateway.log")
    try:
        yield process
    finally:
        process.kill_if_running()


@pytest.mark.parametrize("stop", ["kill -9", "SIGTERM"])
async def test_a_status_the_broker_never_acknowledged_is_sent_after_a_restart(
    tmp_path: Path, broker: Broker, stop: str
) -> None:
    data = tmp_path / "data"
    async with LinkProxy(broker.port) as proxy, observer(broker.port) as obs:
        with gateway_process(tmp_path, proxy.port) as gateway:
            gateway.start()
            assert await obs.next("c8y/s/us", timeout=20) == b"500"
            await obs.publish("c8y/s/ds", S515)
            request = json.loads(await obs.next(req_topic()))
            op_id = str(request["id"])
            # the gateway's statuses now reach neither the broker nor Cumulocity
            proxy.freeze(upstream=True, downstream=False)
            await obs.publish(res_topic(), json.dumps({"id": op_id, "status": "successful"}))
            # the gateway took the answer: its file says how the operation ended (before the
            # fix, the file was already gone)
            assert await eventually(
                lambda: recorded_state(data, op_id) == "successful" or not (data / "firmware" / op_id).exists()
            )
            if stop == "kill -9":
                gateway.kill()
            else:
                assert gateway.terminate() == 0  # waits for the broker, then gives up in time
            proxy.cut()  # what the frozen link held is lost with the process
            proxy.thaw()
            await obs.silence(0.5, [us()])
            gateway.start()
            assert await obs.next("c8y/s/us", timeout=20) == b"500"
            assert await obs.sequence(us(), 3) == [E501, INSTALLED, E503]
            await obs.silence(1.0, [us(), req_topic()])  # nothing twice, no request again
            assert await no_operation_files_left(data) == []
            assert gateway.terminate() == 0
    assert "Traceback" not in (tmp_path / "gateway.log").read_text()


async def test_a_restart_does_not_announce_an_executing_operation_again(
    tmp_path: Path, broker: Broker
) -> None:
    data = tmp_path / "data"
    async with observer(broker.port) as obs:
        with gateway_process(tmp_path, broker.port) as gateway:
            gateway.start()
            assert await obs.next("c8y/s/us", timeout=20) == b"500"
            await obs.publish("c8y/s/ds", S515)
            request = json.loads(await obs.next(req_topic()))
            op_id = str(request["id"])
            await obs.publish(res_topic(), json.dumps({"id": op_id, "status": "executing"}))
            assert await obs.next(us()) == E501
            assert await eventually(lambda: recorded_state(data, op_id) == "executing")
            gateway.kill()
            gateway.start()
            again = json.loads(await obs.next(req_topic(), timeout=20))
            assert (again["id"], again["attempt"]) == (op_id, 2)
            # a child re-sent its request answers with where it stands
            await obs.publish(res_topic(), json.dumps({"id": op_id, "status": "executing"}))
            await obs.publish(res_topic(), json.dumps({"id": op_id, "status": "successful"}))
            assert await obs.sequence(us(), 2) == [INSTALLED, E503]  # no second 501
            await obs.silence(0.5, [us()])
            assert gateway.terminate() == 0


async def test_a_broker_that_lost_our_session_gets_pending_requests_again(
    tmp_path: Path, broker: Broker, config_dir: Path
) -> None:
    # Mosquitto's usual configuration saves sessions every 30 minutes: a kill -9 loses ours,
    # and what children said meanwhile. The gateway must ask again, as after its own restart.
    async with behind_a_proxy(tmp_path, broker, config_dir) as (proxy, gateway):
        async with observer(broker.port) as obs:
            await gateway.start()
            assert await obs.next("c8y/s/us") == b"500"
            await obs.publish("c8y/s/ds", S515)
            request = json.loads(await obs.next(req_topic()))
        proxy.block()  # the gateway stays away until the child has spoken
        broker.kill()
        broker.start()
        async with observer(broker.port, [*WATCHED, "tedge/health/c8y-firmware-plugin"]) as obs:
            # the child finished while the gateway was away: the broker keeps nothing for it
            await obs.publish(res_topic(), json.dumps({"id": request["id"], "status": "successful"}))
            proxy.unblock()
            again = json.loads(await obs.next(req_topic(), timeout=15))
            assert (again["id"], again["attempt"]) == (request["id"], 2)
            assert await obs.next("c8y/s/us") == b"500"
            await obs.publish(res_topic(), json.dumps({"id": request["id"], "status": "successful"}))
            assert await obs.sequence(us(), 3) == [E501, INSTALLED, E503]


# --- work per message is bounded --------------------------------------------------------------


class LoopLag:
    """The longest time the event loop took to come back to a task that asked for 10 ms."""

    def __init__(self) -> None:
        self.longest = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(0.01)  # the measurement itself: how late does 10 ms come back
            self.longest = max(self.longest, loop.time() - before - 0.01)

    def __enter__(self) -> LoopLag:
        self._task = asyncio.create_task(self._tick())
        return self

    def __exit__(self, *exc_info: object) -> None:
        assert self._task is not None
        self._task.cancel()


async def test_a_flood_on_c8y_s_ds_is_bounded_and_logged_once(
    tmp_path: Path, broker: Broker, gateway: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    huge = b"515,a\n" * 174_763  # 1 MiB: over the limit, refused whole
    big = b"515,a\n" * 10_000  # under the limit: ten thousand bad records
    async with observer(broker.port) as obs:
        await gateway.start()
        assert await obs.next("c8y/s/us") == b"500"
        with LoopLag() as lag:
            await obs.publish("c8y/s/ds", huge)
            for _ in range(5):
                await obs.publish("c8y/s/ds", big)
            await obs.publish("c8y/s/ds", S515)
            request = json.loads(await obs.next(req_topic(), timeout=30))
        await obs.publish(res_topic(), json.dumps({"id": request["id"], "status": "successful"}))
        assert await obs.sequence(us(), 3) == [E501, INSTALLED, E503]
    await gateway.stop()  # flushes the summaries
    messages = [r.getMessage() for r in caplog.records if r.name == "tedge_firmware.gateway.plugin"]
    too_large = [m for m in messages if "over the limit" in m]
    assert too_large == [f"payload of {len(huge)} bytes on c8y/s/ds is over the limit of 65536 bytes: ignored"]
    bad = [m for m in messages if "Incorrect c8y_Firmware SmartREST payload" in m]
    assert len(bad) == 2, bad  # the first one, then one summary with the count
    assert "the latest of 49999 similar lines left out" in bad[1]
    assert not [r for r in caplog.records if "lost the connection" in r.getMessage()]
    assert lag.longest < 2.0, f"the event loop was held for {lag.longest:.2f} s"


# --- hostile values fail their own operation, with a reason and without a traceback -------------


async def test_hostile_values_reach_no_unmapped_exception(
    tmp_path: Path, broker: Broker, gateway: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with observer(broker.port) as obs:
        await gateway.start()
        assert await obs.next("c8y/s/us") == b"500"
        await obs.publish("c8y/s/ds", "515,child-a,fw,1.0,http://a..b/firmware.bin")
        assert await obs.next(us("child-a")) == E501
        failed = await obs.next(us("child-a"))
        assert failed == f502("Download from http://a..b/firmware.bin failed with invalid url: the host name 'a..b' is not a valid DNS name")
        await obs.publish("c8y/s/ds", S515)
        request = json.loads(await obs.next(req_topic()))
        huge_number = '{"id":"' + str(request["id"]) + '","status":"executing","progress":' + "9" * 5000 + "}"
        await obs.publish(res_topic(), huge_number)
        await obs.publish(res_topic(), json.dumps({"id": request["id"], "status": "successful"}))
        assert await obs.sequence(us(), 3) == [E501, INSTALLED, E503]
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records if r.exc_info]
    assert "Exceeds the limit" in caplog.text  # named as the input's fault, one line


async def test_a_request_the_broker_refuses_fails_its_operation_and_nothing_else(
    tmp_path: Path, broker: Broker, config_dir: Path
) -> None:
    # A broker configured with a small max_packet_size drops the connection of a client that
    # publishes a larger packet; a request to a child with a long firmware name is one.
    broker.stop()
    broker.conf.write_text(broker.conf.read_text() + "max_packet_size 1200\n")
    broker.start()
    name = "n" * 1000  # the 515 and the 115 fit, the request (with its url and sha256) does not
    gateway = Gateway(config_dir, tmp_path / "data")
    try:
        async with observer(broker.port) as obs:
            await gateway.start()
            assert await obs.next("c8y/s/us") == b"500"
            await obs.publish("c8y/s/ds", f"515,child-a,{name},1.0,{U}")
            assert await obs.next(us("child-a"), timeout=20) == E501
            failed = await obs.next(us("child-a"))
            assert failed.startswith(b'502,c8y_Firmware,"The MQTT broker refuses the firmware_update request for child device child-a')
            await obs.publish("c8y/s/ds", S515)  # the gateway goes on with the others
            request = json.loads(await obs.next(req_topic()))
            await obs.publish(res_topic(), json.dumps({"id": request["id"], "status": "successful"}))
            assert await obs.sequence(us(), 3) == [E501, INSTALLED, E503]
    finally:
        await gateway.stop()


async def test_a_child_that_comes_back_late_after_the_broker_lost_everything_gets_the_request(
    tmp_path: Path, broker: Broker, config_dir: Path
) -> None:
    # After a broker restart without its state, a child subscribes again whenever it
    # reconnects; a request sent before that is gone. The gateway sends the requests nobody
    # answered again a little later.
    options = PluginOptions(jwt_timeout=1.0, jwt_attempts=2, resend_after_session_loss=(1.0,))
    async with behind_a_proxy(tmp_path, broker, config_dir, options) as (_, gateway):
        async with observer(broker.port) as obs:
            await gateway.start()
            assert await obs.next("c8y/s/us") == b"500"
            await obs.publish("c8y/s/ds", S515)
            request = json.loads(await obs.next(req_topic()))
        broker.kill()
        broker.start()
        async with observer(broker.port, ["c8y/s/us"]) as cloud:
            assert await cloud.next("c8y/s/us", timeout=15) == b"500"  # the gateway is back
            async with observer(broker.port) as child:  # and only now the child
                again = json.loads(await child.next(req_topic(), timeout=10))
                assert (again["id"], again["attempt"]) == (request["id"], 3)
                await child.publish(res_topic(), json.dumps({"id": request["id"], "status": "successful"}))
                assert await child.sequence(us(), 3) == [E501, INSTALLED, E503]


# --- te/ commands: the broker keeps the command, so a crash or a broker restart redoes our step


TE_COMMAND = "te/device/te-child///cmd/firmware_update/c8y-mapper-42"
TE_PAYLOAD = json.dumps({"status": "gateway_download", "remoteUrl": U, "name": "fw", "version": "1"})


async def test_kill_9_during_the_te_hand_over_hands_over_once_after_the_restart(
    tmp_path: Path, broker: Broker
) -> None:
    data = tmp_path / "data"
    link = data / "file-transfer" / "te-child" / "firmware_update" / K
    async with LinkProxy(broker.port) as proxy, observer(broker.port, [TE_COMMAND, "c8y/s/us"]) as obs:
        with gateway_process(tmp_path, proxy.port) as gateway:  # the firmware of U is cached
            gateway.start()
            assert await obs.next("c8y/s/us", timeout=20) == b"500"  # connected and subscribed
            # what the gateway publishes now reaches no one; what it receives still arrives
            proxy.freeze(upstream=True, downstream=False)
            await obs.publish(TE_COMMAND, TE_PAYLOAD, retain=True)
            assert await obs.next(TE_COMMAND) == TE_PAYLOAD.encode()
            assert await eventually(link.is_symlink, timeout=20)  # handed over, not yet published
            gateway.kill()
            proxy.cut()  # what the frozen link held is lost with the process
            proxy.thaw()
            gateway.start()
            moved = json.loads(await obs.next(TE_COMMAND, timeout=20))
            assert moved["status"] == "gateway_downloaded"
            assert str(moved["tedgeUrl"]).endswith(f"/te-child/firmware_update/{K}")
            await obs.silence(1.0, [TE_COMMAND])  # once
            assert gateway.terminate() == 0
    assert "Traceback" not in (tmp_path / "gateway.log").read_text()


async def test_a_te_download_completes_across_a_broker_restart(
    tmp_path: Path, broker: Broker, config_dir: Path
) -> None:
    from harness import FirmwareServer

    cloud = FirmwareServer(files={"fw.bin": b"te firmware"}, gates={"fw.bin": asyncio.Event()})
    await cloud.start()
    gateway = Gateway(config_dir, tmp_path / "data")
    command = {"status": "gateway_download", "remoteUrl": cloud.url("fw.bin"), "name": "fw", "version": "1"}
    try:
        await gateway.start()
        async with observer(broker.port, [TE_COMMAND]) as obs:
            await obs.publish(TE_COMMAND, json.dumps(command), retain=True)
            async with asyncio.timeout(10):
                await cloud.arrivals["fw.bin"].wait()
        broker.stop()  # saves its state: the retained command survives
        broker.start()
        async with observer(broker.port, [TE_COMMAND]) as obs:
            assert json.loads(await obs.next(TE_COMMAND)) == command  # retained
            cloud.gates["fw.bin"].set()
            moved = json.loads(await obs.next(TE_COMMAND, timeout=20))
            assert moved["status"] == "gateway_downloaded"
            await obs.silence(1.0)  # once, although the command came again after the restart
        assert cloud.count("fw.bin") == 1
    finally:
        await gateway.stop()
        await cloud.stop()
