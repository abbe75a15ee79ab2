"""Idle memory: `tedge-firmware run` with nothing to do, against a bare Python that imports the
I/O libraries it is built on.

Ours: a fresh `tedge-firmware run` (plugin, file transfer and registration in one process) on a
private mosquitto, with no children and no operations. Its resident set (VmRSS) is read once it
asked Cumulocity for pending operations (its `500`: every part is up), then once a second for
`--settle` seconds; the largest reading counts.

Anchor: `python -c 'import aiohttp, aiohttp.web, aiomqtt'` with the same interpreter, its VmRSS
read by itself after the imports. The median of `--repeat` runs of each is compared; target:
ours within 1.15x of the anchor.

    python -m benchmarks.idle_memory [--repeat 3] [--settle 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
from pathlib import Path

from benchmarks import _support as s

ANCHOR = (
    "import aiohttp, aiohttp.web, aiomqtt\n"
    "for line in open('/proc/self/status'):\n"
    "    if line.startswith('VmRSS:'):\n"
    "        print(line.split()[1])\n"
)
TARGET = 1.15
START_LIMIT_S = 30.0


def anchor_kib() -> int:
    result = subprocess.run(
        [sys.executable, "-c", ANCHOR], capture_output=True, text=True, check=True, timeout=60
    )
    return int(result.stdout.strip())


async def gateway_idle_kib(workdir: Path, port: int, settle: float, index: int) -> int:
    home = workdir / f"idle-{index}"
    config_dir = home / "etc"
    s.write_tedge_config(config_dir, home / "data", mqtt_port=port, http_port=s.free_port())
    async with s.observer(port, [s.CLOUD_TOPIC]) as cloud:
        gateway = s.tedge_firmware("run", config_dir, home / "gateway.log")
        async with s.running(gateway):
            started = cloud.wait_for(lambda t, p: p[:3] == b"500", START_LIMIT_S)
            await s.until_exit(started, gateway)
            readings = []
            for _ in range(max(1, int(settle))):
                await asyncio.sleep(1.0)  # idle is a span of time, not an event
                readings.append(s.proc_status_kib(gateway.pid, "VmRSS"))
    return max(readings)


async def benchmark(args: argparse.Namespace) -> None:
    repeat = args.repeat or (1 if args.quick else 3)
    s.require(s.MOSQUITTO)
    with s.work_directory(args.workdir) as workdir:
        async with s.mosquitto(workdir) as port:
            ours = [await gateway_idle_kib(workdir, port, args.settle, i) for i in range(repeat)]
    anchors = [anchor_kib() for _ in range(repeat)]
    s.heading("idle memory: tedge-firmware run with nothing to do")
    anchor, mine = statistics.median(anchors), statistics.median(ours)
    s.line(
        "anchor: python importing aiohttp(.web), aiomqtt",
        f"{anchor / 1024:.1f} MiB",
        s.runs_text([a / 1024 for a in anchors], "{:.1f}"),
    )
    s.line(
        "ours: tedge-firmware run, idle VmRSS",
        f"{mine / 1024:.1f} MiB",
        s.runs_text([o / 1024 for o in ours], "{:.1f}"),
    )
    s.line(
        "ratio ours / anchor",
        f"{mine / anchor:.2f}x",
        s.verdict(mine / anchor, TARGET, higher_is_better=False),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.idle_memory", description=__doc__.split("\n")[0]
    )
    s.common_arguments(parser)
    parser.add_argument("--settle", type=float, default=5.0, help="seconds of idle readings")
    args = parser.parse_args(argv)
    return s.run(lambda: benchmark(args), args.budget)


if __name__ == "__main__":
    sys.exit(main())
