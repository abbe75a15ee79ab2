"""Fleet: 1,000 and 10,000 children updated from one firmware through the real gateway, one
cloud download.

Ours: a fresh `tedge-firmware run` (a subprocess, so that its memory is its own) on a private
mosquitto; the Cumulocity simulator runs in this process, the children in `--child-processes`
processes (`benchmarks._children`: one SDK connector each, serving its share of the child ids,
its work directory on tmpfs: a child's storage is its own, not the gateway's disk). CPU seconds
of each group of processes during the rollout are reported. The children declare
`c8y_Firmware` over MQTT, the gateway registers them, and the simulator creates one bulk
operation for all of them at once (no ramp). Measured from the simulator's records:
operations per second (first `515` to last `503`), the median and p99 time from an
operation's `515` to its `503`, how often the binary was fetched from the cloud (must be 1),
and the gateway's peak RSS (VmHWM) against its RSS once every child is registered (at most 2x).

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
ceiling of sequential messages (target: at least 1.0).

    python -m benchmarks.fleet [--quick] [--children 1000,10000] [--size 1MiB] [--repeat 1]
                               [--protocol legacy|te] [--child-processes 2] [--limit 600]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiomqtt

from benchmarks import _support as s
from tedge_firmware.core.topics import te_child_external_id
from tedge_firmware.sim import FIRMWARE, C8ySimulator, Operation

DEFAULT_CHILDREN = [1000, 10000]
QUICK_CHILDREN = [100]
DEFAULT_SIZE = "1MiB"
DEFAULT_CHILD_PROCESSES = 2
TARGET_RATIO = 1.0  # messages/s of the fleet against sequential round trips/s
TARGET_PEAK_OVER_IDLE = 2.0
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
    cpu: dict[str, tuple[float, float]]  # (user, system) s during the rollout, per process

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
async def fleet_mosquitto(workdir: Path) -> AsyncIterator[tuple[int, int]]:
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
        yield port, process.pid
    dropped = (home / "mosquitto.log").read_text(errors="replace").count("dropped")
    if dropped:
        print(f"  !! mosquitto dropped messages ({dropped} log lines)", flush=True)


def write_gateway_config(config_dir: Path, data: Path, mqtt_port: int) -> None:
    s.write_tedge_config(config_dir, data, mqtt_port=mqtt_port, http_port=s.free_port())
    (config_dir / "operations" / "c8y").mkdir(parents=True)


def ended_at(operation: Operation) -> float:
    return operation.history[-1].at


def children_processes(
    home: Path, children_home: Path, port: int, ids: list[str], processes: int, protocol: str
) -> list[s.Process]:
    """`processes` connectors (benchmarks._children), the children dealt out among them, their
    work directories under `children_home`."""
    slices = [ids[index::processes] for index in range(processes)]
    return [
        s.Process(
            f"children {index}",
            [
                sys.executable,
                "-m",
                "benchmarks._children",
                "--port",
                str(port),
                "--work-dir",
                str(children_home / f"children-{index}"),
                "--client-id",
                f"bench-fleet-{home.name}-{index}",
                "--protocol",
                protocol,
                *children,
            ],
            home / f"children-{index}.log",
        )
        for index, children in enumerate(slices)
        if children
    ]


def children_dir() -> Path | None:
    """tmpfs when the machine has one (/dev/shm), else the default temporary directory."""
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else None


def cpu_now(pids: dict[str, list[int]]) -> dict[str, tuple[float, float]]:
    """(user, system) CPU seconds so far of each group of processes."""
    usage = {}
    for name, members in pids.items():
        splits = [s.process_cpu_split(pid) for pid in members]
        usage[name] = (sum(user for user, _ in splits), sum(system for _, system in splits))
    return usage


async def fleet_run(
    workdir: Path,
    port: int,
    broker_pid: int,
    children: int,
    firmware: Path,
    limit_s: float,
    protocol: str,
    processes: int,
) -> FleetRun:
    home = workdir / f"fleet-{s.free_port()}"
    config_dir = home / "etc"
    write_gateway_config(config_dir, home / "data", port)
    ids = [f"child-{index:05d}" for index in range(children)]
    # declared over te/ (`register`): Cumulocity knows them by thin-edge's external ids
    cloud_ids = [te_child_external_id(GATEWAY_ID, child) for child in ids]
    gateway = s.tedge_firmware("run", config_dir, home / "gateway.log")
    async with (
        C8ySimulator(mqtt_port=port, gateway_id=GATEWAY_ID, control_api=False) as sim,
        contextlib.AsyncExitStack() as stack,
    ):
        # On a site every child has its own storage: the simulated children keep theirs in
        # memory (tmpfs), so that their fsyncs do not queue with the gateway's on its disk.
        # Removed last, whatever happens (tmpfs is memory), once the children have stopped.
        children_home = Path(tempfile.mkdtemp(prefix="fleet-children-", dir=children_dir()))
        stack.callback(shutil.rmtree, children_home, ignore_errors=True)
        connectors = children_processes(home, children_home, port, ids, processes, protocol)
        url = sim.add_file("fleet.bin", firmware)
        await stack.enter_async_context(s.running(gateway))
        for connector in connectors:
            await stack.enter_async_context(s.running(connector))
        pids = {
            "gateway": [gateway.pid],
            "broker": [broker_pid],
            f"children ({len(connectors)} processes)": [c.pid for c in connectors],
            "simulator (this process)": [os.getpid()],
        }
        begin = time.perf_counter()
        waiting = list(reversed(cloud_ids))

        def registered() -> bool:
            # re-evaluated on every change: drop the registered from the end, so that the
            # whole wait costs O(children), not O(children²)
            while waiting and supports_firmware(sim, waiting[-1]):
                waiting.pop()
            return not waiting

        try:
            await s.until_exit(sim.wait_until(registered, timeout=limit_s), gateway)
        except TimeoutError:
            message = not_registered(sim, cloud_ids, config_dir, gateway)
            raise RuntimeError(message) from None
        registration = time.perf_counter() - begin
        idle = s.proc_status_kib(gateway.pid, "VmRSS")
        cpu_before = cpu_now(pids)
        bulk = sim.bulk_firmware_operation(cloud_ids, "fleet", "2.0", url)
        progress = await s.until_exit(sim.wait_for_bulk(bulk.id, timeout=limit_s), gateway)
        peak = s.proc_status_kib(gateway.pid, "VmHWM")
        cpu_after = cpu_now(pids)
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
        cpu={
            name: (after[0] - before[0], after[1] - before[1])
            for (name, before), after in zip(cpu_before.items(), cpu_after.values(), strict=True)
        },
    )


def supports_firmware(sim: C8ySimulator, cloud_id: str) -> bool:
    device = sim.device(cloud_id)
    return device is not None and device.supports(FIRMWARE)


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
    for name, (user, system) in best.cpu.items():
        s.line(
            f"CPU, rollout: {name}",
            f"{user + system:.1f} s",
            f"({user:.1f} user, {system:.1f} system)",
        )
    s.line("anchor: broker QoS 1 round trips/s", f"{anchor:.0f}", "(one at a time, same mosquitto)")
    messages = MESSAGES_PER_OPERATION[protocol]
    ratio = best.rate * messages / anchor
    s.line(
        "fleet msgs/s ÷ broker round trips/s",
        f"{ratio:.2f}x",
        f"({messages} messages per operation) {s.verdict(ratio, TARGET_RATIO)}",
    )
    growth = best.gateway_peak_kib / best.gateway_idle_kib
    s.line(
        "gateway peak RSS ÷ idle",
        f"{growth:.2f}x",
        s.verdict(growth, TARGET_PEAK_OVER_IDLE, higher_is_better=False),
    )


async def benchmark(args: argparse.Namespace) -> None:
    fleets = args.children or (QUICK_CHILDREN if args.quick else DEFAULT_CHILDREN)
    messages = QUICK_ANCHOR_MESSAGES if args.quick else ANCHOR_MESSAGES
    repeat = args.repeat or 1
    s.require(s.MOSQUITTO)
    with s.work_directory(args.workdir) as workdir:
        firmware = workdir / "fleet.bin"
        s.make_file(firmware, args.size)
        async with fleet_mosquitto(workdir) as (port, broker_pid):
            for children in fleets:
                # the anchor again before each fleet: the broker's pace in the same minute
                anchor = await broker_round_trips(port, messages)
                runs = []
                for _ in range(repeat):
                    run = await fleet_run(
                        workdir,
                        port,
                        broker_pid,
                        children,
                        firmware,
                        limit_s=args.limit,
                        protocol=args.protocol,
                        processes=args.child_processes,
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
        type=s.parse_counts,
        default=None,
        help="fleet sizes, one run each after the other (default "
        f"{','.join(map(str, DEFAULT_CHILDREN))}, quick {','.join(map(str, QUICK_CHILDREN))})",
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
        "--child-processes",
        type=int,
        default=DEFAULT_CHILD_PROCESSES,
        help=f"connector processes serving the children (default {DEFAULT_CHILD_PROCESSES})",
    )
    parser.add_argument(
        "--protocol",
        choices=sorted(MESSAGES_PER_OPERATION),
        default="legacy",
        help="the children's protocol (default legacy)",
    )
    args = parser.parse_args(argv)
    if args.child_processes < 1:
        parser.error("--child-processes must be >= 1")
    return s.run(lambda: benchmark(args), args.budget)


if __name__ == "__main__":
    sys.exit(main())
