"""Resume: bytes fetched from the server per byte of firmware when the connection is cut 3 times.

A fault-injecting TCP proxy (tests/faultproxy.py) sits between the gateway and nginx. The first
`--cuts` connections are closed after a quarter of the file each (FIN, a truncated body); the
next one passes. Ours: a fresh `tedge-firmware run` gets a 515 for the proxied URL; we count the
bytes the proxy forwarded to it until the child's request arrives (the SHA-256 in the request is
checked, so the resumed file is the right one). Anchor: the file size, what an ideal client
fetches. For context, stock curl (`-C - --retry`) through the same faults.

    python -m benchmarks.resume [--quick] [--sizes 100MB,1GiB] [--cuts 3] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks import _support as s

sys.path.insert(0, str(s.REPO / "tests"))  # tests/ is not a package
from faultproxy import Fault, FaultProxy  # type: ignore[import-not-found]

DEFAULT_SIZES = "100MB,1GiB"
QUICK_SIZES = "20MB"
DEFAULT_REPEAT = 3
QUICK_REPEAT = 3
DEFAULT_CUTS = 3
TARGET_RATIO = 1.05


@dataclass(frozen=True)
class Fetched:
    """One download through the proxy: bytes it forwarded, connections, faults, seconds."""

    forwarded: int
    connections: int
    faults: int
    seconds: float


def plan_cuts(proxy: FaultProxy, size: int, cuts: int) -> None:
    # Evenly spread: each cut connection delivers about size / (cuts + 1) bytes.
    proxy.plan(*[Fault.cut(size // (cuts + 1))] * cuts)


def slowest_seconds(size: int, cuts: int) -> float:
    """60 s plus 10 MB/s plus the downloader's backoff (about 1 s per failure, jittered)."""
    return 60.0 + size / 10e6 + 2.0 * cuts


async def gateway_through_faults(
    workdir: Path, nginx_port: int, broker_port: int, name: str, size: int, sha256: str, cuts: int
) -> Fetched:
    async with FaultProxy(nginx_port) as proxy:
        plan_cuts(proxy, size, cuts)
        run = await s.gateway_download(
            workdir, broker_port, proxy.url(f"/{name}"), sha256, slowest_seconds(size, cuts)
        )
        return Fetched(proxy.bytes_to_client, proxy.connections, proxy.faults_applied, run.seconds)


async def curl_through_faults(
    workdir: Path, nginx_port: int, name: str, size: int, cuts: int
) -> Fetched:
    out = workdir / "curl.out"
    argv = [s.CURL, "-s", "-f", "-C", "-", "--retry", str(cuts + 2), "--retry-delay", "1"]
    argv += ["--retry-all-errors", "-o", str(out)]
    async with FaultProxy(nginx_port) as proxy:
        plan_cuts(proxy, size, cuts)
        begin = time.perf_counter()
        code, output = await s.run_command(
            [*argv, proxy.url(f"/{name}")], slowest_seconds(size, cuts)
        )
        seconds = time.perf_counter() - begin
        fetched = Fetched(proxy.bytes_to_client, proxy.connections, proxy.faults_applied, seconds)
    complete = s.file_size(out) == size
    s.remove(out)
    if code != 0 or not complete:
        raise RuntimeError(f"curl did not complete the file ({code}): {output.strip()[-300:]}")
    return fetched


async def measure_size(
    workdir: Path, www: Path, nginx_port: int, broker_port: int, size: int, repeat: int, cuts: int
) -> None:
    name = f"firmware-{size}.bin"
    sha256 = await asyncio.to_thread(s.make_file, www / name, size)
    ours: list[Fetched] = []
    try:
        for _ in range(repeat):
            ours.append(
                await gateway_through_faults(
                    workdir, nginx_port, broker_port, name, size, sha256, cuts
                )
            )
        curl = await curl_through_faults(workdir, nginx_port, name, size, cuts)
    finally:
        (www / name).unlink(missing_ok=True)
    report(size, cuts, ours, curl)


def report(size: int, cuts: int, ours: list[Fetched], curl: Fetched) -> None:
    ratios = [run.forwarded / size for run in ours]
    ratio = s.median(ratios)
    extra = [(run.forwarded - size) / 1024 for run in ours]
    s.heading(f"resume, {s.format_size(size)}, {cuts} cuts: {len(ours)} runs, medians")
    s.line("anchor: the file size", f"{size} B", "what an ideal client fetches")
    s.line("ours: bytes sent to the gateway", f"{int(s.median([r.forwarded for r in ours]))} B")
    s.line(
        "ratio fetched / size",
        f"{ratio:.4f}",
        s.verdict(ratio, TARGET_RATIO, higher_is_better=False),
    )
    s.line("  per run", s.runs_text(ratios, "{:.4f}"), "")
    s.line("  re-fetched per run", s.runs_text(extra, "{:.0f}") + " KiB", "(includes HTTP headers)")
    s.line(
        "  connections, faults applied",
        s.runs_text([r.connections for r in ours]) + " " + s.runs_text([r.faults for r in ours]),
        "",
    )
    s.line(
        "  seconds 515 -> child request",
        f"{s.median([r.seconds for r in ours]):.2f} s",
        "(includes the downloader's ~1 s backoff per cut)",
    )
    s.line(
        "context: curl -C - --retry (1 run)",
        f"{curl.forwarded / size:.4f}",
        f"{curl.connections} connections, {curl.faults} faults; curl restarts from 0 on retry",
    )


async def benchmark(args: argparse.Namespace) -> None:
    sizes = sorted(args.sizes or s.parse_sizes(QUICK_SIZES if args.quick else DEFAULT_SIZES))
    repeat = args.repeat or (QUICK_REPEAT if args.quick else DEFAULT_REPEAT)
    s.require(s.NGINX, s.MOSQUITTO, s.CURL)
    with s.work_directory(args.workdir) as workdir:
        s.check_disk(workdir, 3 * max(sizes))
        www = workdir / "www"
        www.mkdir()
        async with s.nginx(www, workdir) as nginx_port, s.mosquitto(workdir) as broker_port:
            for size in sizes:
                await measure_size(workdir, www, nginx_port, broker_port, size, repeat, args.cuts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.resume", description=__doc__.split("\n")[0]
    )
    s.common_arguments(parser)
    parser.add_argument(
        "--sizes",
        type=s.parse_sizes,
        default=None,
        help=f"file sizes (default {DEFAULT_SIZES}, quick {QUICK_SIZES})",
    )
    parser.add_argument(
        "--cuts", type=int, default=DEFAULT_CUTS, help="connections cut per download (default 3)"
    )
    args = parser.parse_args(argv)
    if args.cuts < 0:
        parser.error("--cuts must be >= 0")
    return s.run(lambda: benchmark(args), args.budget)


if __name__ == "__main__":
    sys.exit(main())
