"""Fleet: 1,000 children updated from one firmware through the real gateway, one cloud download.

Ours: a fresh `tedge-firmware run` (a subprocess, so that its memory is its own) on a private
mosquitto; the Cumulocity simulator and one SDK connector serving every child id run in this
process. The children declare `c8y_Firmware` over MQTT, the gateway registers them, and the
simulator creates one bulk operation for all of them at once (no ramp). Measured from the
simulator's records: operations per second (first `515` to last `503`), the median and p99
time from an operation's `515` to its `503`, how often the binary was fetched from the cloud
(must be 1), and the gateway's peak RSS (VmHWM).

The children declare themselves over `te/`, so `run` offers each operation both ways (the
legacy request and a `te/` command). `--protocol legacy` (the default): a connector that takes
legacy requests; the gateway clears the command on its first answer. `--protocol te`: a
connector in `te` mode, moving each command through the gateway's download step.

Anchor: the broker's own round-trip rate on this machine, one QoS 1 message published and
received at a time through the same mosquitto. One firmware operation costs, through the
broker, besides its HTTP download: legacy 9 messages (`515`, request, command `init`,
`executing`, `501`, `successful`, `115`, `503`, command clear); te 12 (`515`, request, `init`,
`executing`, `gateway_download`, `gateway_downloaded`, `successful`, `501`, `115`, `503`, clear,
twin). "operations/s x messages / round trips/s" tells how far the fleet is from a broker-bound
ceiling of sequential messages.

    python -m benchmarks.fleet [--quick] [--children 1000] [--size 1MiB] [--repeat 1]
                               [--protocol legacy|te]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import statistics
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiomqtt

from benchmarks import _support as s
from tedge_firmware.connector import BrokerSettings, Connector, DownloadSettings, Firmware
from tedge_firmware.core.topics import te_child_external_id
from tedge_firmware.sim import FIRMWARE, C8ySimulator, Operation

DEFAULT_CHILDREN = 1000
QUICK_CHILDREN = 100
DEFAULT_SIZE = "1MiB"
ANCHOR_MESSAGES = 2000
QUICK_ANCHOR_MESSAGES = 300
MESSAGES_PER_OPERATION = {"legacy": 9, "te": 12}
GATEWAY_ID = "bench-gateway"


@dataclass(frozen=True)
class FleetRun:
    children: int
    seconds: float  # first 515 to last 503
    durations: list[float]  # per operation, 515 to 503
    successful: int
    cloud_downloads: int  # GETs answered 200 (a whole download from byte 0)
    cloud_requests: int
    gateway_peak_kib: int
    gateway_idle_kib: int
    registration_seconds: float

    @property
    def rate(self) -> float:
        return self.children / self.seconds


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def broker_round_trips(port: int, messages: int) -> float:
    """QoS 1 publish → receive through the broker, one at a time: round trips per second."""
    topic = f"bench/anchor/{s.free_port()}"
    nodelay = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
    async with (
        s.observer(port, [topic]) as receiver,
        aiomqtt.Client(
            s.HOST, port, identifier=f"anchor-{topic}", socket_options=nodelay
        ) as sender,
    ):
        await sender.publish(topic, b"warm-up", qos=1)
        await receiver.wait_for(lambda t, p: True, 10)
        begin = time.perf_counter()
        for index in range(messages):
            await sender.publish(topic, str(index).encode(), qos=1)
            await receiver.wait_for(lambda t, p: True, 10)
        return messages / (time.perf_counter() - begin)


@contextlib.asynccontextmanager
async def fleet_mosquitto(workdir: Path) -> AsyncIterator[int]:
    """A private broker like `_support.mosquitto`, with room for a fleet's bursts.

    Mosquitto's default `max_queued_messages` (1000 per client) drops QoS 1 messages for a
    subscriber that falls behind: 1,000 children registering at once are 2,000 messages to the
    simulator in a burst, and some of them were lost (a real Cumulocity bridge has the same
    limit, set in the bridge configuration).
    """
    home = workdir / f"mosquitto-{s.free_port()}"
    home.mkdir()
    process, port = s.mosquitto_process(s.MOSQUITTO, home, max_queued=1_000_000)
    async with s.running(process, port):
        yield port
    dropped = (home / "mosquitto.log").read_text(errors="replace").count("dropped")
    if dropped:
        print(f"  !! mosquitto dropped messages ({dropped} log lines)", flush=True)


def write_gateway_config(config_dir: Path, data: Path, mqtt_port: int) -> None:
    s.write_tedge_config(config_dir, data, mqtt_port=mqtt_port, http_port=s.free_port())
    (config_dir / "operations" / "c8y").mkdir(parents=True)


async def noop_apply(firmware: Firmware) -> None:
    """The children apply instantly: the gateway and the protocol are what is measured."""


def ended_at(operation: Operation) -> float:
    return operation.history[-1].at


async def fleet_run(
    workdir: Path, port: int, children: int, firmware: Path, limit_s: float, protocol: str
) -> FleetRun:
    home = workdir / f"fleet-{s.free_port()}"
    config_dir = home / "etc"
    write_gateway_config(config_dir, home / "data", port)
    ids = [f"child-{index:04d}" for index in range(children)]
    # declared over te/ (`register`): Cumulocity knows them by thin-edge's external ids
    cloud_ids = [te_child_external_id(GATEWAY_ID, child) for child in ids]
    connector = Connector(
        *ids,
        apply=noop_apply,
        work_dir=home / "children",
        broker=BrokerSettings(host=s.HOST, port=port, client_id=f"bench-fleet-{home.name}"),
        download=DownloadSettings(parallel=16),
        heartbeat=None,
        register=True,
        protocol=protocol,
    )
    gateway = s.tedge_firmware("run", config_dir, home / "gateway.log")
    async with C8ySimulator(mqtt_port=port, gateway_id=GATEWAY_ID, control_api=False) as sim:
        url = sim.add_file("fleet.bin", firmware)
        async with s.running(gateway):
            serving = asyncio.create_task(connector.run())
            try:
                begin = time.perf_counter()

                def registered() -> bool:
                    devices = [sim.device(device) for device in cloud_ids]
                    return all(d is not None and d.supports(FIRMWARE) for d in devices)

                try:
                    await s.until_exit(sim.wait_until(registered, timeout=limit_s), gateway)
                except TimeoutError:
                    message = not_registered(sim, cloud_ids, config_dir, gateway)
                    raise RuntimeError(message) from None
                registration = time.perf_counter() - begin
                idle = s.proc_status_kib(gateway.pid, "VmRSS")
                bulk = sim.bulk_firmware_operation(cloud_ids, "fleet", "2.0", url)
                progress = await s.until_exit(sim.wait_for_bulk(bulk.id, timeout=limit_s), gateway)
                peak = s.proc_status_kib(gateway.pid, "VmHWM")
            finally:
                connector.stop()
                async with asyncio.timeout(30):
                    await serving
    operations = [sim.operation(op_id) for op_id in bulk_ids(sim, bulk.id)]
    stats = sim.stats.files["fleet.bin"]
    first = min(op.created for op in operations)
    return FleetRun(
        children=children,
        seconds=max(ended_at(op) for op in operations) - first,
        durations=[ended_at(op) - op.created for op in operations],
        successful=progress.successful,
        cloud_downloads=stats.statuses.count(200),
        cloud_requests=stats.requests,
        gateway_peak_kib=peak,
        gateway_idle_kib=idle,
        registration_seconds=registration,
    )


def not_registered(sim: C8ySimulator, ids: list[str], config_dir: Path, gateway: s.Process) -> str:
    missing = [c for c in ids if (d := sim.device(c)) is None or not d.supports(FIRMWARE)]
    on_disk = sum(1 for c in missing if (config_dir / "operations" / "c8y" / c).is_dir())
    return (
        f"{len(missing)} of {len(ids)} children not registered in time (e.g. {missing[:3]}; "
        f"{on_disk} of them have their directory); gateway log:\n{gateway.tail()}"
    )


def bulk_ids(sim: C8ySimulator, bulk_id: str) -> tuple[str, ...]:
    return next(bulk.operation_ids for bulk in sim.bulks if bulk.id == bulk_id)


def report(runs: list[FleetRun], anchor: float, size: int, protocol: str) -> None:
    # the run with the median rate (as the other benchmarks report medians)
    best = sorted(runs, key=lambda run: run.rate)[len(runs) // 2]
    s.heading(f"fleet: {best.children} {protocol} children, {s.format_size(size)} firmware")
    s.line(
        "operations/s (first 515 → last 503)",
        f"{best.rate:.1f}",
        s.runs_text([r.rate for r in runs], "{:.1f}"),
    )
    s.line("515 → 503 median", f"{statistics.median(best.durations):.2f} s")
    s.line("515 → 503 p99", f"{percentile(best.durations, 0.99):.2f} s")
    everyone = "" if all(r.successful == r.children for r in runs) else "NOT all, in some run"
    s.line("successful", f"{best.successful}/{best.children}", everyone)
    downloads = "met" if all(r.cloud_downloads == 1 for r in runs) else "NOT MET"
    s.line(
        "cloud downloads",
        str(best.cloud_downloads),
        f"({best.cloud_requests} requests; target 1: {downloads})",
    )
    s.line(
        "gateway peak RSS (VmHWM)",
        f"{best.gateway_peak_kib / 1024:.0f} MiB",
        f"(idle {best.gateway_idle_kib / 1024:.0f} MiB)",
    )
    s.line("registration of every child", f"{best.registration_seconds:.1f} s")
    s.line("anchor: broker QoS 1 round trips/s", f"{anchor:.0f}", "(one at a time, same mosquitto)")
    messages = MESSAGES_PER_OPERATION[protocol]
    ratio = best.rate * messages / anchor
    s.line(
        "fleet msgs/s ÷ broker round trips/s",
        f"{ratio:.2f}x",
        f"({messages} messages per operation)",
    )


async def benchmark(args: argparse.Namespace) -> None:
    children = args.children or (QUICK_CHILDREN if args.quick else DEFAULT_CHILDREN)
    messages = QUICK_ANCHOR_MESSAGES if args.quick else ANCHOR_MESSAGES
    repeat = args.repeat or 1
    s.require(s.MOSQUITTO)
    with s.work_directory(args.workdir) as workdir:
        firmware = workdir / "fleet.bin"
        s.make_file(firmware, args.size)
        async with fleet_mosquitto(workdir) as port:
            anchor = await broker_round_trips(port, messages)
            runs = []
            for _ in range(repeat):
                run = await fleet_run(
                    workdir, port, children, firmware, limit_s=args.limit, protocol=args.protocol
                )
                runs.append(run)
        report(runs, anchor, args.size, args.protocol)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.fleet", description=__doc__.split("\n")[0]
    )
    s.common_arguments(parser)
    parser.add_argument(
        "--children",
        type=int,
        default=None,
        help=f"default {DEFAULT_CHILDREN}, quick {QUICK_CHILDREN}",
    )
    parser.add_argument(
        "--size",
        type=s.parse_size,
        default=s.parse_size(DEFAULT_SIZE),
        help=f"firmware size (default {DEFAULT_SIZE})",
    )
    parser.add_argument(
        "--limit", type=float, default=600.0, help="seconds each phase of a run may take"
    )
    parser.add_argument(
        "--protocol",
        choices=sorted(MESSAGES_PER_OPERATION),
        default="legacy",
        help="the children's protocol (default legacy)",
    )
    args = parser.parse_args(argv)
    if args.children is not None and args.children < 1:
        parser.error("--children must be >= 1")
    return s.run(lambda: benchmark(args), args.budget)


if __name__ == "__main__":
    sys.exit(main())
