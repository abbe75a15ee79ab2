"""Cloud download: the gateway against `curl -o`, both fetching the same file from nginx.

Anchor: `curl -s -o FILE URL`, timed as a process. Ours: a fresh `tedge-firmware run` (empty
data dir, so never a cache hit) gets `515,<child>,…,URL` and is timed until the child's
`firmware_update` request arrives, i.e. downloaded, SHA-256 computed, fsynced, cached and
published. Also the gateway's peak RSS (VmHWM) per file size: it should not grow with the size.
Repetitions alternate curl and gateway; medians are reported.

Goals (issue 17), each against its anchor from the same run: every run at least 1.2x `curl` +
`fsync`; CPU per GB at most 1.2x (curl's + hashlib's SHA-256 alone, in this process over the
same number of bytes in memory); peak RSS at most 10 MiB above the RSS before the `515`.

    python -m benchmarks.cloud_download [--quick] [--sizes 100MB,1GiB] [--repeat 5]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks import _support as s

DEFAULT_SIZES = "100MB,1GiB"
QUICK_SIZES = "10MB,100MB"
DEFAULT_REPEAT = 7
QUICK_REPEAT = 3
TARGET_RATIO = 0.9
TARGET_SYNC_RATIO = 1.2  # ours / (curl + fsync), every run
TARGET_CPU_RATIO = 1.2  # ours / (curl + hashlib SHA-256), CPU per GB
TARGET_PEAK_GROWTH_KIB = 10 * 1024
# Peak RSS counts as independent of the size when the biggest file's peak is within this of
# the smallest file's (allocator noise on a Python process is a few MiB).
RSS_TOLERANCE_KIB = 8 * 1024


def slowest_seconds(size: int) -> float:
    """A bound for one download: 60 s plus 20 MB/s, far below what loopback does."""
    return 60.0 + size / 20e6


@dataclass(frozen=True)
class CurlRun:
    """One `curl -s -o FILE URL`: its seconds and CPU seconds, then fsync(FILE)'s seconds."""

    seconds: float
    cpu_seconds: float
    fsync_seconds: float


async def curl_once(url: str, out: Path, size: int) -> CurlRun:
    cpu_before = s.children_cpu_seconds()
    begin = time.perf_counter()
    code, output = await s.run_command(
        [s.CURL, "-s", "-f", "-o", str(out), url], slowest_seconds(size)
    )
    seconds = time.perf_counter() - begin
    cpu = s.children_cpu_seconds() - cpu_before
    try:
        if code != 0 or s.file_size(out) != size:
            raise RuntimeError(f"curl failed ({code}): {output.strip()}")
        begin = time.perf_counter()
        await asyncio.to_thread(_fsync_file, out)
        synced = time.perf_counter() - begin
    finally:
        s.remove(out)
    return CurlRun(seconds, cpu, synced)


def hashlib_cpu_seconds(size: int) -> float:
    """CPU seconds of hashlib's SHA-256 over `size` bytes in memory (1 MiB at a time)."""
    block = os.urandom(1 << 20)
    digest = hashlib.sha256()
    begin = time.thread_time()
    for _ in range(max(1, size >> 20)):
        digest.update(block)
    return time.thread_time() - begin


def _fsync_file(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


async def measure_size(
    workdir: Path, www: Path, nginx_port: int, broker_port: int, size: int, repeat: int
) -> int:
    """Run and report one size; returns the median peak RSS in KiB."""
    name = f"firmware-{size}.bin"
    sha256 = await asyncio.to_thread(s.make_file, www / name, size)
    url = f"http://{s.HOST}:{nginx_port}/{name}"
    curls: list[CurlRun] = []
    ours: list[s.GatewayDownload] = []
    try:
        for _ in range(repeat):
            os.sync()  # each timed step starts without dirty pages from the previous one
            curls.append(await curl_once(url, workdir / "curl.out", size))
            os.sync()
            ours.append(
                await s.gateway_download(workdir, broker_port, url, sha256, slowest_seconds(size))
            )
    finally:
        (www / name).unlink(missing_ok=True)
    hashing = await asyncio.to_thread(hashlib_cpu_seconds, size)
    report(size, curls, ours, hashing)
    return int(s.median([run.peak_rss_kib for run in ours]))


def report(size: int, curls: list[CurlRun], ours: list[s.GatewayDownload], hashing: float) -> None:
    curl_mbps = [s.throughput(size, run.seconds) for run in curls]
    sync_mbps = [s.throughput(size, run.seconds + run.fsync_seconds) for run in curls]
    our_mbps = [s.throughput(size, run.seconds) for run in ours]
    ratio = s.median(our_mbps) / s.median(curl_mbps)
    s.heading(f"cloud download, {s.format_size(size)}: {len(ours)} runs each, medians")
    s.line("anchor: curl -s -o FILE URL", f"{s.median(curl_mbps):.0f} MB/s", s.runs_text(curl_mbps))
    s.line("ours: 515 -> child request", f"{s.median(our_mbps):.0f} MB/s", s.runs_text(our_mbps))
    s.line("ratio ours / curl", f"{ratio:.3f}x", s.verdict(ratio, TARGET_RATIO))
    s.line(
        "context: curl, then fsync(FILE)", f"{s.median(sync_mbps):.0f} MB/s", s.runs_text(sync_mbps)
    )
    s.line(
        "context: ours / (curl + fsync)",
        f"{s.median(our_mbps) / s.median(sync_mbps):.3f}x",
        "(the gateway fsyncs the firmware before it publishes it)",
    )
    # each run against the curl + fsync run just before it
    per_run = [mine / theirs for mine, theirs in zip(our_mbps, sync_mbps, strict=True)]
    s.line(
        "ours / (curl + fsync), the worst run",
        f"{min(per_run):.3f}x",
        f"{s.runs_text(per_run, '{:.2f}')} {s.verdict(min(per_run), TARGET_SYNC_RATIO)}",
    )
    gigabytes = size / 1e9
    curl_cpu = [run.cpu_seconds / gigabytes for run in curls]
    our_cpu = [run.cpu_seconds / gigabytes for run in ours]
    s.line(
        "context: CPU s per GB, curl",
        f"{s.median(curl_cpu):.2f} s",
        s.runs_text(curl_cpu, "{:.2f}"),
    )
    s.line(
        "context: CPU s per GB, gateway",
        f"{s.median(our_cpu):.2f} s",
        s.runs_text(our_cpu, "{:.2f}"),
    )
    hashlib_per_gb = hashing / gigabytes
    s.line("anchor: CPU s per GB, hashlib SHA-256 alone", f"{hashlib_per_gb:.2f} s")
    cpu_ratio = s.median(our_cpu) / (s.median(curl_cpu) + hashlib_per_gb)
    s.line(
        "CPU per GB: ours / (curl + hashlib)",
        f"{cpu_ratio:.2f}x",
        s.verdict(cpu_ratio, TARGET_CPU_RATIO, higher_is_better=False),
    )
    peaks = [run.peak_rss_kib / 1024 for run in ours]
    idles = [run.idle_rss_kib / 1024 for run in ours]
    s.line("gateway peak RSS (VmHWM)", f"{s.median(peaks):.1f} MiB", s.runs_text(peaks, "{:.1f}"))
    s.line("gateway RSS before the 515", f"{s.median(idles):.1f} MiB", s.runs_text(idles, "{:.1f}"))
    growth = [peak - idle for peak, idle in zip(peaks, idles, strict=True)]
    s.line(
        "peak - before, the worst run",
        f"{max(growth):+.1f} MiB",
        f"{s.runs_text(growth, '{:+.1f}')} target <= +{TARGET_PEAK_GROWTH_KIB // 1024} MiB: "
        f"{'met' if max(growth) * 1024 <= TARGET_PEAK_GROWTH_KIB else 'NOT MET'}",
    )


def report_memory(peaks: dict[int, int]) -> None:
    if len(peaks) < 2:
        return
    small, big = min(peaks), max(peaks)
    growth = peaks[big] - peaks[small]
    s.heading("cloud download: peak RSS against file size")
    s.line(
        f"{s.format_size(big)} vs {s.format_size(small)}",
        f"{growth / 1024:+.1f} MiB",
        f"({peaks[big] / peaks[small]:.2f}x; size {big / small:.0f}x; "
        f"independent when within {RSS_TOLERANCE_KIB // 1024} MiB: "
        f"{'yes' if abs(growth) <= RSS_TOLERANCE_KIB else 'NO'})",
    )


async def benchmark(args: argparse.Namespace) -> None:
    sizes = sorted(args.sizes or s.parse_sizes(QUICK_SIZES if args.quick else DEFAULT_SIZES))
    repeat = args.repeat or (QUICK_REPEAT if args.quick else DEFAULT_REPEAT)
    s.require(s.NGINX, s.MOSQUITTO, s.CURL)
    with s.work_directory(args.workdir) as workdir:
        # the source file, curl's copy and the gateway's .part/cache file exist at once
        s.check_disk(workdir, 3 * max(sizes))
        www = workdir / "www"
        www.mkdir()
        peaks: dict[int, int] = {}
        async with (
            s.nginx(www, workdir) as nginx_port,
            s.mosquitto(workdir, nodelay=not args.mosquitto_defaults) as broker_port,
        ):
            for size in sizes:
                peaks[size] = await measure_size(
                    workdir, www, nginx_port, broker_port, size, repeat
                )
        report_memory(peaks)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.cloud_download", description=__doc__.split("\n")[0]
    )
    s.common_arguments(parser)
    parser.add_argument(
        "--sizes",
        type=s.parse_sizes,
        default=None,
        help=f"file sizes (default {DEFAULT_SIZES}, quick {QUICK_SIZES})",
    )
    parser.add_argument(
        "--mosquitto-defaults",
        action="store_true",
        help="leave mosquitto's set_tcp_nodelay off (adds up to ~40 ms per operation)",
    )
    args = parser.parse_args(argv)
    return s.run(lambda: benchmark(args), args.budget)


if __name__ == "__main__":
    sys.exit(main())
