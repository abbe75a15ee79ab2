"""Soak: real operations among thousands of hostile inputs, with kill -9 of the gateway and broker.

What runs: the gateway's mosquitto (with Mosquitto's usual persistence: saved every 30
minutes, so a kill -9 loses its state) bridged to a second mosquitto that plays Cumulocity's MQTT
endpoint, as thin-edge bridges to Cumulocity; `tedge-firmware run` as a process; the Cumulocity
simulator on the far side of the bridge; an SDK connector serving the children, in this
process. For `--duration` seconds:

- operations: each child gets a `c8y_Firmware` operation, then the next one once Cumulocity
  has its final status; each version is a different file, and a child's apply step checks that
  what it got is the file of the version it was asked for;
- hostile MQTT: bad `515`s (broken CSV, child ids Mosquitto refuses, unusable URLs, payloads
  over the size limit), garbage child responses (huge numbers, deep nesting, wrong ids, not
  UTF-8), bad declarations, health checks;
- hostile HTTP: path traversal, malformed request lines, requests that never finish (slowloris);
- chaos (not in the last quarter): now and then a kill -9 of the gateway or of the broker,
  restarted after a moment.

Then the soak waits until every operation has its final status and the gateway is idle (once,
if Cumulocity still has an operation PENDING, it restarts the gateway so that its `500` asks
for it again), and prints: operations started; final statuses; lost (an operation Cumulocity
never got a final status for); doubled (`501`, `502`/`503` lines Cumulocity got more often than
there were operations: a line sent twice also moves the statuses of that child's later
operations, since Cumulocity applies a status to the oldest operation waiting for it), with the
lines the gateway says it sent again without knowing whether the broker had them; wrong
firmware applied; the longest the gateway took to answer a health check and serve a 4 KiB file
while nothing was being killed (anchor: the first such probe, an idle gateway); the gateway's
RSS at the start and the end of its last run (which sees hostile input but no kill).

    python -m benchmarks.soak [--quick] [--duration 120] [--children 20] [--seed 1]
        [--kill both|gateway|broker|none] [--broker-saves default|every-change] [--keep-log F]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import logging
import os
import random
import shutil
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import aiomqtt

from benchmarks import _support as s
from tedge_firmware.connector import BrokerSettings, Connector, DownloadSettings, Firmware
from tedge_firmware.core.topics import te_child_external_id
from tedge_firmware.demo.processes import wait_listening
from tedge_firmware.gateway.lifecycle import on_loop_exception
from tedge_firmware.shell.config_edit import write_local_config
from tedge_firmware.sim import FIRMWARE, C8ySimulator, Operation, OperationStatus

GATEWAY_ID = "soak-gateway"
DEFAULT_DURATION = 120.0
QUICK_DURATION = 30.0
DEFAULT_CHILDREN = 20
VERSIONS = 4
FIRMWARE_SIZE = 128 * 1024
CHILD_TIMEOUT = 60  # firmware.child.update.timeout: a stuck operation fails, it is not lost
SETTLE_LIMIT = 180.0
HEALTH = "tedge/health/c8y-firmware-plugin"
HEALTH_CHECK = "tedge/health-check/c8y-firmware-plugin"
QUIET_AFTER_CHAOS = 3.0  # probes this close to a kill or restart are not counted as stalls


@dataclass
class Tally:
    """What the soak saw, apart from what the simulator records."""

    hostile_mqtt: int = 0
    hostile_http: int = 0
    gateway_kills: int = 0
    broker_kills: int = 0
    applied: Counter[tuple[str, str]] = field(default_factory=Counter)  # (child, op) → applies
    wrong_firmware: int = 0
    probe_longest: float = 0.0
    probe_first: float | None = None
    probes: int = 0
    chaos_at: list[float] = field(default_factory=list)
    rss_last_start_kib: int = 0
    rss_last_end_kib: int = 0
    rss_peak_kib: int = 0

    def quiet(self, start: float, end: float) -> bool:
        return not any(start - QUIET_AFTER_CHAOS <= at <= end for at in self.chaos_at)


# --- the broker and the gateway, restartable ------------------------------------------------


class Broker:
    """The gateway's mosquitto, on a fixed port, bridged to the cloud's broker as thin-edge
    bridges to Cumulocity (`c8y/s/us/#` and `c8y/s/uat` out, `c8y/s/ds` and `c8y/s/dat` in);
    it can be killed and started again. `saves`: mosquitto's own persistence (every 30 min, so
    a kill -9 loses its state), or on every change (it keeps what it acknowledged)."""

    def __init__(self, home: Path, saves: str, cloud_port: int) -> None:
        self.home = home
        self.port = s.free_port()
        conf = home / "mosquitto.conf"
        conf.write_text(
            "\n".join(
                [
                    f"listener {self.port} {s.HOST}",
                    "allow_anonymous true",
                    *(["user root"] if os.geteuid() == 0 else []),
                    "persistence true",
                    f"persistence_location {home}/",
                    *(
                        ["autosave_interval 1", "autosave_on_changes true"]
                        if saves == "every-change"
                        else []  # mosquitto's default: every 30 minutes
                    ),
                    "set_tcp_nodelay true",
                    "max_queued_messages 100000",
                    f"log_dest file {home}/mosquitto.log",
                    "log_type error",
                    "log_type warning",
                    "connection cloud",
                    f"address {s.HOST}:{cloud_port}",
                    "bridge_protocol_version mqttv311",
                    "cleansession false",
                    "clientid soak-bridge",
                    "try_private false",
                    "restart_timeout 1",
                    "topic c8y/s/us/# out 1",
                    "topic c8y/s/uat out 1",
                    "topic c8y/s/ds in 1",
                    "topic c8y/s/dat in 1",
                    "topic c8y/devicecontrol/notifications in 1",
                ]
            )
            + "\n"
        )
        self.process = s.Process("mosquitto", [s.MOSQUITTO, "-c", str(conf)], home / "out.log")

    async def start(self) -> None:
        await self.process.start()
        await wait_listening(self.port, self.process)

    def kill(self) -> None:
        self.process.kill_now()


class GatewayProcess:
    def __init__(self, config_dir: Path, log: Path, broker_port: int) -> None:
        self.process = s.tedge_firmware("run", config_dir, log)
        self.broker_port = broker_port

    async def start(self) -> None:
        await self.process.start()

    def kill(self) -> None:
        self.process.kill_now()

    @property
    def rss_kib(self) -> int:
        try:
            return s.proc_status_kib(self.process.pid, "VmRSS")
        except (OSError, ValueError, RuntimeError, AssertionError):  # not running
            return 0


# --- real operations -------------------------------------------------------------------------


def firmware_files(directory: Path) -> dict[str, bytes]:
    """One file per version, each different."""
    files = {}
    for index in range(VERSIONS):
        version = f"1.{index}"
        block = hashlib.sha256(version.encode()).digest()
        files[version] = (block * (FIRMWARE_SIZE // len(block) + 1))[:FIRMWARE_SIZE]
        (directory / f"fw-{version}.bin").write_bytes(files[version])
    return files


async def operations(
    sim: C8ySimulator,
    children: list[str],
    urls: dict[str, str],
    stop: asyncio.Event,
    rng: random.Random,
) -> None:
    """Keep every child busy: a new operation once the last one has its final status."""
    while not stop.is_set():
        for child in children:
            history = sim.operations_of(child)
            if not history or history[-1].status.final:
                version = rng.choice(sorted(urls))
                sim.create_firmware_operation(child, "soak", version, urls[version])
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.2):
                await stop.wait()


def apply_checker(files: dict[str, bytes], tally: Tally):  # type: ignore[no-untyped-def]
    async def apply(firmware: Firmware) -> None:
        tally.applied[(firmware.child_id, firmware.operation_id)] += 1
        if firmware.path.read_bytes() != files.get(firmware.version):
            tally.wrong_firmware += 1

    return apply


# --- hostile input -----------------------------------------------------------------------------


def hostile_mqtt_message(rng: random.Random, children: list[str]) -> tuple[str, bytes]:
    child = rng.choice(children)
    stranger = f"hostile-{rng.randrange(1000)}"
    choices: list[tuple[str, bytes]] = [
        ("c8y/s/ds", b"515," + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 60)))),
        ("c8y/s/ds", f"515,{stranger}\u0085,fw,1.0,http://x/y".encode()),
        ("c8y/s/ds", f"515,{stranger},fw,1.0,http://a..b/fw".encode()),
        ("c8y/s/ds", f'515,"{stranger},fw,1.0,'.encode() + b"\\" * 500),
        ("c8y/s/ds", b"515,a\n" * 11_000),  # over the size limit
        ("c8y/s/ds", b"515,+,fw,1.0,http://x/\n515,..,fw,1.0,http://x/\n515,#,a,b,c"),
        (
            f"tedge/{child}/commands/res/firmware_update",
            b'{"id":"x","status":"executing","n":' + b"9" * 5000 + b"}",
        ),
        (f"tedge/{child}/commands/res/firmware_update", b"[" * 50_000),
        (f"tedge/{child}/commands/res/firmware_update", b"\xff\xfe\x00"),
        (
            f"tedge/{child}/commands/res/firmware_update",
            json.dumps({"id": f"nope-{rng.random()}", "status": "successful"}).encode(),
        ),
        ("tedge//commands/res/firmware_update", b'{"id":"x","status":"failed"}'),
        (f"te/device/{stranger}///cmd/firmware_update", b"not json"),
        ("te/device/..///cmd/firmware_update", b"{}"),
        (f"te/device/{child}///cmd/no such command!", b"{}"),
        (HEALTH_CHECK, b""),
    ]
    return rng.choice(choices)


async def hostile_mqtt(
    port: int, children: list[str], stop: asyncio.Event, rng: random.Random, tally: Tally
) -> None:
    """A peer that publishes garbage as fast as the broker takes it (and reconnects after the
    broker or a refusal drops it)."""
    while not stop.is_set():
        try:
            async with aiomqtt.Client(s.HOST, port, identifier=f"hostile-{rng.random()}") as client:
                while not stop.is_set():
                    topic, payload = hostile_mqtt_message(rng, children)
                    await client.publish(topic, payload, qos=1)
                    tally.hostile_mqtt += 1
                    await asyncio.sleep(0.002)
        except aiomqtt.MqttError:
            await asyncio.sleep(0.2)


HOSTILE_REQUESTS = [
    b"GET /tedge/file-transfer/../../etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /tedge/file-transfer/%2e%2e/firmware HTTP/1.1\r\nHost: x\r\n\r\n",
    b"PUT /tedge/file-transfer/x HTTP/1.1\r\nHost: x\r\n"
    b"Content-Length: 99999999999999999999\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nRange: bytes=99999999999999999999999-\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 not http",
    b"GET /te/v1/files/" + b"a/" * 3000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /tedge/file-transfer/probe.bin HTTP/1.1\r\nHost: x\r\n",  # never finished
]


async def hostile_http(port: int, stop: asyncio.Event, rng: random.Random, tally: Tally) -> None:
    held: list[asyncio.StreamWriter] = []
    while not stop.is_set():
        try:
            _, writer = await asyncio.open_connection(s.HOST, port)
        except OSError:
            await asyncio.sleep(0.2)
            continue
        writer.write(rng.choice(HOSTILE_REQUESTS))
        tally.hostile_http += 1
        held.append(writer)  # kept open: half-open connections are part of the attack
        if len(held) > 300:
            held.pop(0).transport.abort()
        await asyncio.sleep(0.01)
    for writer in held:
        writer.transport.abort()


# --- chaos and probes -------------------------------------------------------------------------


async def serving(gateway: GatewayProcess) -> None:
    """Until the gateway answers a health check again (it is up and connected)."""
    with contextlib.suppress(TimeoutError):
        async with s.observer(gateway.broker_port, [HEALTH]) as obs:
            async with asyncio.timeout(30):
                while True:
                    await obs.publish(HEALTH_CHECK, "")
                    with contextlib.suppress(TimeoutError):
                        await obs.wait_for(lambda topic, payload: b'"up"' in payload, 1.0)
                        return


async def chaos(
    broker: Broker,
    gateway: GatewayProcess,
    until: float,
    rng: random.Random,
    tally: Tally,
    targets: str,
) -> None:
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(min(rng.uniform(4.0, 10.0), max(0.0, until - loop.time())))
        if loop.time() >= until or targets == "none":
            if targets == "none":
                await asyncio.sleep(max(0.0, until - loop.time()))
            return
        tally.chaos_at.append(loop.time())
        victim: Broker | GatewayProcess
        if targets == "gateway" or (targets == "both" and rng.random() < 0.5):
            tally.gateway_kills += 1
            victim = gateway
        else:
            tally.broker_kills += 1
            victim = broker
        victim.kill()
        await asyncio.sleep(rng.uniform(0.2, 2.0))
        await victim.start()
        await serving(gateway)
        tally.chaos_at.append(loop.time())


async def probes(mqtt_port: int, http_port: int, stop: asyncio.Event, tally: Tally) -> None:
    """Health check over MQTT and a small file over HTTP, every 0.25 s; the longest answer
    while nothing was being killed or restarted is the gateway's longest stall."""
    loop = asyncio.get_running_loop()
    url = f"http://{s.HOST}:{http_port}/tedge/file-transfer/probe.bin"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        while not stop.is_set():
            try:
                async with s.observer(mqtt_port, [HEALTH]) as obs:
                    while not stop.is_set():
                        start = loop.time()
                        await obs.publish(HEALTH_CHECK, "")
                        await obs.wait_for(lambda topic, payload: b'"up"' in payload, 60)
                        async with http.get(url) as response:
                            await response.read()
                            ok = response.status == 200
                        end = loop.time()
                        if ok and tally.quiet(start, end):
                            tally.probes += 1
                            took = end - start
                            tally.probe_first = (
                                took if tally.probe_first is None else tally.probe_first
                            )
                            tally.probe_longest = max(tally.probe_longest, took)
                        await asyncio.sleep(0.25)
            except (aiomqtt.MqttError, aiohttp.ClientError, OSError, TimeoutError):
                await asyncio.sleep(0.2)


# --- what Cumulocity was sent -----------------------------------------------------------------


class StatusRecorder:
    """Every line on `c8y/s/us/<child>`, through a persistent session (the broker keeps what it
    could not deliver while the recorder reconnects). A message the broker hands over again
    after its own restart (same message id, same line, within seconds) is counted once: that is
    the broker's re-delivery to us, not a line the gateway sent twice."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.lines: dict[str, list[str]] = {}
        self.last_at = time.monotonic()
        self._recent: dict[tuple[str, bytes, int], float] = {}

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                async with aiomqtt.Client(
                    s.HOST, self.port, identifier="soak-recorder", clean_session=False
                ) as client:
                    await client.subscribe("c8y/s/us/+", qos=1)
                    async for message in client.messages:
                        self._record(message)
            except aiomqtt.MqttError:
                await asyncio.sleep(0.1)

    def _record(self, message: aiomqtt.Message) -> None:
        payload = message.payload if isinstance(message.payload, bytes) else b""
        key = (message.topic.value, payload, message.mid)
        now = time.monotonic()
        if now - self._recent.get(key, -60.0) < 10.0:
            return
        self._recent[key] = now
        self.last_at = now
        child = message.topic.value.rsplit("/", 1)[1]
        self.lines.setdefault(child, []).append(payload.decode(errors="replace"))

    def count(self, child: str, *templates: str) -> int:
        return sum(1 for line in self.lines.get(child, []) if line.split(",", 1)[0] in templates)


# --- the run -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    started: int
    successful: int
    failed: int
    lost: list[Operation]
    doubled: int  # lines the gateway sent more often than there were operations
    missing: int  # lines Cumulocity never got
    resent: int  # lines the gateway sent again because the broker had not acknowledged them
    violations: list[str]
    reasons: Counter[str]


def judge(
    sim: C8ySimulator, children: list[str], sent: StatusRecorder, log: str, by_id: bool
) -> Result:
    """One 501 and one 502 or 503 (by id: 504, 505 or 506) per operation is right; more is
    doubled, fewer is missing.
    (Counted per child: Cumulocity applies a status to the oldest operation waiting for it,
    so one doubled line also shifts the statuses of that child's later operations, and the
    simulator then records more rule breaches than there were doubled lines.)"""
    ours = [op for op in sim.operations if op.device in children and op.fragment == FIRMWARE]
    doubled = missing = 0
    for child in children:
        created = sum(1 for op in ours if op.device == child)
        for templates in (("504",), ("505", "506")) if by_id else (("501",), ("502", "503")):
            difference = sent.count(child, *templates) - created
            doubled += max(0, difference)
            missing += max(0, -difference)
    resent = _resent_lines(log)
    return Result(
        started=len(ours),
        successful=sum(op.status is OperationStatus.SUCCESSFUL for op in ours),
        failed=sum(op.status is OperationStatus.FAILED for op in ours),
        lost=[op for op in ours if not op.status.final],
        doubled=doubled,
        missing=missing,
        resent=resent,
        violations=[str(v) for v in sim.errors if v.device in children][:3],
        reasons=Counter(
            (op.failure_reason or "")[:90] for op in ours if op.status is OperationStatus.FAILED
        ),
    )


def _resent_lines(log: str) -> int:
    """Lines the gateway's log says it sent (or may send) again, not knowing whether the broker
    had them: after a restart, an ended operation's unacknowledged lines and the 501 of an
    operation resumed as pending; after a lost connection, every message in flight (statuses
    to Cumulocity among them). An upper bound."""
    total = 0
    for line in log.splitlines():
        if "sending again after restart the " in line:
            total += int(line.split("sending again after restart the ", 1)[1].split()[0])
        elif "were waiting for the broker's acknowledgement when the connection was lost" in line:
            total += int(line.split(": ", 1)[1].split()[0])
        elif "resuming operation after restart (pending)" in line:
            total += (
                1  # its 501 may have gone out before the kill: the child's answer makes another
            )
    return total


def registered(sim: C8ySimulator, children: list[str]) -> bool:
    return all((d := sim.device(c)) is not None and d.supports(FIRMWARE) for c in children)


def all_final(sim: C8ySimulator, children: list[str]) -> Operation | None:
    pending = [op for op in sim.operations if op.device in children and not op.status.final]
    return None if pending else (sim.operations[-1] if sim.operations else None)


@contextlib.asynccontextmanager
async def stack(
    workdir: Path,
    children: list[str],
    files: dict[str, bytes],
    tally: Tally,
    saves: str,
    cloud_port: int,
    by_id: bool,
) -> AsyncIterator[tuple[Broker, GatewayProcess, C8ySimulator, dict[str, str], int]]:
    broker_home = workdir / "broker"
    broker_home.mkdir()
    broker = Broker(broker_home, saves, cloud_port)
    await broker.start()
    config_dir, data = workdir / "etc", workdir / "data"
    http_port = s.free_port()
    write_local_config(
        config_dir,
        device_id=GATEWAY_ID,
        tenant="c8y.tenant.invalid",
        mqtt_port=broker.port,
        http_port=http_port,
        data_path=data,
        child_timeout=CHILD_TIMEOUT,
        extra="[c8y.smartrest]\nuse_operation_id = true\n" if by_id else "",
    )
    (config_dir / "operations" / "c8y").mkdir(parents=True)
    (data / "file-transfer").mkdir(parents=True)
    (data / "file-transfer" / "probe.bin").write_bytes(b"p" * 4096)
    gateway = GatewayProcess(config_dir, workdir / "gateway.log", broker.port)
    sim = C8ySimulator(
        mqtt_port=cloud_port,
        gateway_id=GATEWAY_ID,
        control_api=False,
        clean_session=False,
        client_id="soak-cloud",
        json_operations=by_id,
    )
    connector = Connector(
        *children,
        apply=apply_checker(files, tally),
        work_dir=workdir / "children",
        broker=BrokerSettings(host=s.HOST, port=broker.port, client_id="soak-children"),
        download=DownloadSettings(parallel=8),
        heartbeat=None,
        register=True,
    )
    try:
        async with sim:
            urls = {
                version: sim.add_file(f"fw-{version}.bin", workdir / f"fw-{version}.bin")
                for version in files
            }
            await gateway.start()
            serving = asyncio.create_task(connector.run())
            try:
                yield broker, gateway, sim, urls, http_port
            finally:
                connector.stop()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(30):
                        await serving
    finally:
        await gateway.process.stop()
        await broker.process.stop()


async def soak(args: argparse.Namespace) -> None:
    duration = args.duration or (QUICK_DURATION if args.quick else DEFAULT_DURATION)
    rng = random.Random(args.seed)
    # The simulator reports every status Cumulocity would refuse (the hostile 515s for unknown
    # children make the gateway send many; the soak's children are judged below), and the
    # children retry while the gateway or the broker is away: expected here, not news.
    logging.getLogger("tedge_firmware").setLevel(logging.ERROR)
    logging.getLogger("mqtt").setLevel(logging.CRITICAL)  # paho, in the soak's own clients
    children = [f"soak-child-{index:02d}" for index in range(args.children)]
    # declared over te/ (`register`): Cumulocity knows them by thin-edge's external ids
    cloud = [te_child_external_id(GATEWAY_ID, child) for child in children]
    tally = Tally()
    s.require(s.MOSQUITTO)
    ignore_harness_client_noise(asyncio.get_running_loop())
    with s.work_directory(args.workdir) as workdir:
        files = firmware_files(workdir)
        async with (
            s.mosquitto(workdir) as cloud_port,
            stack(workdir, children, files, tally, args.broker_saves, cloud_port, args.by_id) as (
                broker,
                gateway,
                sim,
                urls,
                http_port,
            ),
        ):
            loop = asyncio.get_running_loop()
            try:
                await sim.wait_until(lambda: registered(sim, cloud), timeout=60)
            except TimeoutError:
                missing = sum(1 for c in cloud if not registered(sim, [c]))
                raise RuntimeError(
                    f"{missing} children not registered; gateway log:\n{gateway.process.tail()}"
                ) from None
            stop = asyncio.Event()
            recorder = StatusRecorder(cloud_port)
            recording = asyncio.Event()
            statuses = asyncio.create_task(recorder.run(recording))
            began = loop.time()
            calm_from = began + duration * 0.75
            workers = [
                asyncio.create_task(operations(sim, cloud, urls, stop, rng)),
                asyncio.create_task(hostile_mqtt(broker.port, children, stop, rng, tally)),
                asyncio.create_task(hostile_http(http_port, stop, rng, tally)),
                asyncio.create_task(probes(broker.port, http_port, stop, tally)),
            ]
            rss = asyncio.create_task(watch_rss(gateway, stop, tally))
            await chaos(broker, gateway, calm_from, rng, tally, args.kill)
            tally.chaos_at.append(loop.time())
            pid_calm = gateway.process.pid
            await asyncio.sleep(1.0)  # the last start has settled
            tally.rss_last_start_kib = gateway.rss_kib
            await asyncio.sleep(max(0.0, began + duration - loop.time()))
            tally.rss_last_end_kib = gateway.rss_kib if gateway.process.pid == pid_calm else 0
            stop.set()
            await asyncio.gather(*workers, rss, return_exceptions=True)
            settle_started = loop.time()
            with contextlib.suppress(TimeoutError):
                await sim.wait_until(lambda: all_final(sim, cloud), timeout=SETTLE_LIMIT / 2)
            if all_final(sim, cloud) is None:
                # An operation Cumulocity still has PENDING may be one whose 515 went down
                # with a broker that had not saved it: a restart's 500 asks for it again.
                await gateway.process.stop()
                await gateway.start()
                with contextlib.suppress(TimeoutError):
                    await sim.wait_until(lambda: all_final(sim, cloud), timeout=SETTLE_LIMIT / 2)
            # Cumulocity may count an operation as ended before the gateway has sent its own
            # lines (a doubled line ends the next operation early): wait until the gateway has
            # no operation left and nothing more arrives.
            left = await until_idle(workdir / "data" / "firmware", recorder, SETTLE_LIMIT / 2)
            for text in left[:5]:
                print(f"  left in the gateway: {text}", flush=True)
            settle = loop.time() - settle_started
            recording.set()
            statuses.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await statuses
            log = (workdir / "gateway.log").read_text(errors="replace")
            result = judge(sim, cloud, recorder, log, args.by_id)
            report(result, tally, duration, settle, log)
            if args.keep_log is not None:
                shutil.copyfile(workdir / "gateway.log", args.keep_log)


def operation_files(firmware: Path) -> list[Path]:
    """The operation files of the soak's children (a hostile operation for a host that does
    not resolve may wait for its download, retried, for hours: that is not the soak's)."""
    return [f for f in firmware.rglob("*") if ".corrupt" not in f.parts and _soak_child_file(f)]


def _soak_child_file(path: Path) -> bool:
    try:
        return b'"child_id":"soak-child-' in path.read_bytes()
    except OSError:  # a directory, or gone meanwhile
        return False


async def until_idle(firmware: Path, recorder: StatusRecorder, limit: float) -> list[str]:
    """Until no operation file is left and no status arrived for 2 s (or `limit` seconds);
    the operation files left."""
    deadline = time.monotonic() + limit
    while True:
        files = await asyncio.to_thread(operation_files, firmware)
        if not files and time.monotonic() - recorder.last_at > 2.0:
            return []
        if time.monotonic() > deadline:
            return [
                f"{f.relative_to(firmware)}: {f.read_text(errors='replace')[:300]}" for f in files
            ]
        await asyncio.sleep(0.2)  # another process's files: nothing to await but time


def ignore_harness_client_noise(loop: asyncio.AbstractEventLoop) -> None:
    """The soak's own plain aiomqtt clients (the hostile one, the recorder) leave a future with
    aiomqtt's disconnection error behind when the broker is killed under them; they are not
    the gateway, whose log is what the soak judges."""

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
        if isinstance(context.get("exception"), aiomqtt.MqttError):
            return
        on_loop_exception(loop, context)  # the services' own policy for the rest

    loop.set_exception_handler(handler)


async def watch_rss(gateway: GatewayProcess, stop: asyncio.Event, tally: Tally) -> None:
    while not stop.is_set():
        tally.rss_peak_kib = max(tally.rss_peak_kib, gateway.rss_kib)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.5):
                await stop.wait()


def report(result: Result, tally: Tally, duration: float, settle: float, text: str) -> None:
    s.heading(
        f"soak: {duration:.0f} s, "
        f"{tally.gateway_kills} gateway and {tally.broker_kills} broker kills (-9)"
    )
    s.line("hostile MQTT messages / HTTP requests", f"{tally.hostile_mqtt} / {tally.hostile_http}")
    s.line("operations started", str(result.started))
    s.line(
        "final statuses",
        f"{result.successful + result.failed}",
        f"(successful {result.successful}, failed {result.failed})",
    )
    s.line(
        "lost (no final status)", str(len(result.lost)), f"(settled {settle:.1f} s after the end)"
    )
    for op in result.lost[:3]:
        s.line("  lost", f"{op.device} operation {op.id}: {op.status.value}")
    s.line(
        "doubled (status lines beyond two per operation)",
        str(result.doubled),
        f"(missing {result.missing}; lines sent again unacknowledged: at most {result.resent})",
    )
    s.line("wrong firmware applied", str(tally.wrong_firmware))
    twice = sum(1 for count in tally.applied.values() if count > 1)
    s.line("firmware applied twice for one operation", str(twice))
    first = f"{tally.probe_first * 1000:.0f} ms" if tally.probe_first is not None else "-"
    s.line(
        "longest stall (health check + 4 KiB file)",
        f"{tally.probe_longest * 1000:.0f} ms",
        f"(anchor: first probe {first}; {tally.probes} probes)",
    )
    s.line(
        "gateway RSS, last run: start → end",
        f"{tally.rss_last_start_kib / 1024:.1f} → {tally.rss_last_end_kib / 1024:.1f} MiB",
        f"(peak {tally.rss_peak_kib / 1024:.1f} MiB)",
    )
    s.line(
        "gateway log lines / tracebacks", f"{len(text.splitlines())} / {text.count('Traceback')}"
    )
    s.line("'Task exception was never retrieved'", str(text.count("never retrieved")))
    for reason, count in result.reasons.most_common(5):
        s.line(f"  failed {count}x", reason)
    for violation in result.violations:
        s.line("  rule breach", violation)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.soak", description=__doc__.split("\n")[0]
    )
    s.common_arguments(parser)
    parser.add_argument(
        "--duration",
        type=float,
        default=None,
        help=f"seconds (default {DEFAULT_DURATION:.0f}, quick {QUICK_DURATION:.0f})",
    )
    parser.add_argument("--children", type=int, default=DEFAULT_CHILDREN)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--broker-saves",
        choices=("every-change", "default"),
        default="default",
        help="mosquitto's persistence: its default (every 30 min: a kill -9 loses its state) "
        "or on every change (it keeps what it acknowledged, and acknowledges slowly)",
    )
    parser.add_argument(
        "--kill",
        choices=("both", "gateway", "broker", "none"),
        default="both",
        help="what the chaos kills (-9)",
    )
    parser.add_argument("--keep-log", type=Path, default=None, help="copy the gateway's log here")
    parser.add_argument(
        "--by-id",
        action="store_true",
        help="operations from their JSON form, statuses by id (c8y.smartrest.use_operation_id)",
    )
    args = parser.parse_args(argv)
    return s.run(lambda: soak(args), args.budget)


if __name__ == "__main__":
    sys.exit(main())
