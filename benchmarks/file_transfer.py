"""File transfer: our HTTP service against nginx, serving the same file to 1 and 50 children.

Ours: `tedge-firmware file-transfer` as a subprocess, serving the file the way the plugin
publishes firmware (a symlink in `file-transfer/<child>/firmware_update/` to the cache file).
Anchor: nginx (`sendfile on`, one worker by default, like our one process) whose root is the
same `file-transfer` directory. Clients: N `curl -s -o /dev/null` processes started together
(the same client for both servers, never in a server's event loop); aggregate throughput is
N x size over the time from the first start to the last exit. Every client must get 200 and
all bytes. Repetitions alternate the servers; medians are reported.

    python -m benchmarks.file_transfer [--quick] [--size 1GiB] [--clients 1,50] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

from benchmarks import _support as s

DEFAULT_SIZE = "1GiB"
QUICK_SIZE = "20MB"
DEFAULT_CLIENTS = "1,50"
DEFAULT_REPEAT = 5
QUICK_REPEAT = 3
TARGET_RATIO = 0.8
FILE_ID = "0" * 64  # stands for sha256(url): the name the plugin gives a cached firmware


def slowest_seconds(total_bytes: int) -> float:
    """A bound for one round: 60 s plus 20 MB/s aggregate, far below what loopback does."""
    return 60.0 + total_bytes / 20e6


async def one_client(url: str, size: int, limit_s: float) -> None:
    argv = [s.CURL, "-s", "-o", os.devnull, "-w", "%{http_code} %{size_download}", url]
    code, output = await s.run_command(argv, limit_s)
    if code != 0 or output.split() != ["200", str(size)]:
        raise RuntimeError(f"a client failed: curl exit {code}, '{output.strip()}' for {url}")


async def round_of(url: str, size: int, clients: int) -> float:
    """Seconds for `clients` concurrent curls to each fetch the whole file."""
    timeout = slowest_seconds(size * clients)
    begin = time.perf_counter()
    async with asyncio.TaskGroup() as group:
        for _ in range(clients):
            group.create_task(one_client(url, size, timeout))
    return time.perf_counter() - begin


def publish_like_the_plugin(data: Path, size: int) -> str:
    """Cache file + link, as the plugin lays them out; returns the path below file-transfer/."""
    cached = data / "cache" / FILE_ID
    s.make_file(cached, size)
    relative = f"{s.CHILD}/firmware_update/{FILE_ID}"
    link = data / "file-transfer" / relative
    link.parent.mkdir(parents=True)
    link.symlink_to(cached)
    return relative


async def benchmark(args: argparse.Namespace) -> None:
    size = args.size or s.parse_size(QUICK_SIZE if args.quick else DEFAULT_SIZE)
    repeat = args.repeat or (QUICK_REPEAT if args.quick else DEFAULT_REPEAT)
    s.require(s.NGINX, s.CURL)
    with s.work_directory(args.workdir) as workdir:
        s.check_disk(workdir, size)
        data = workdir / "data"
        relative = await asyncio.to_thread(publish_like_the_plugin, data, size)
        http_port = s.free_port()
        config_dir = workdir / "etc"
        s.write_tedge_config(config_dir, data, mqtt_port=s.free_port(), http_port=http_port)
        ours = s.tedge_firmware("file-transfer", config_dir, workdir / "file-transfer.log")
        async with (
            s.running(ours, http_port),
            s.nginx(data / "file-transfer", workdir, workers=args.nginx_workers) as nginx_port,
        ):
            urls = {
                "nginx": f"http://{s.HOST}:{nginx_port}/{relative}",
                "ours": f"http://{s.HOST}:{http_port}/tedge/file-transfer/{relative}",
            }
            for clients in args.clients:
                seconds = await measure(urls, size, clients, repeat, ours)
                report(size, clients, seconds, args.nginx_workers)


async def measure(
    urls: dict[str, str], size: int, clients: int, repeat: int, ours: s.Process
) -> dict[str, list[float]]:
    seconds: dict[str, list[float]] = {name: [] for name in urls}
    for index in range(repeat):
        order = list(urls) if index % 2 == 0 else list(reversed(urls))
        for name in order:
            seconds[name].append(await s.until_exit(round_of(urls[name], size, clients), ours))
    return seconds


def report(size: int, clients: int, seconds: dict[str, list[float]], workers: int) -> None:
    total = size * clients
    nginx = [s.throughput(total, t) for t in seconds["nginx"]]
    ours = [s.throughput(total, t) for t in seconds["ours"]]
    ratio = s.median(ours) / s.median(nginx)
    client_word = "client" if clients == 1 else "concurrent clients"
    s.heading(
        f"file transfer, {s.format_size(size)} to {clients} {client_word}: "
        f"{len(ours)} runs each, medians of aggregate MB/s"
    )
    label = f"anchor: nginx ({workers} worker{'s' if workers > 1 else ''})"
    s.line(label, f"{s.median(nginx):.0f} MB/s", s.runs_text(nginx))
    s.line("ours: tedge-firmware file-transfer", f"{s.median(ours):.0f} MB/s", s.runs_text(ours))
    s.line("ratio ours / nginx", f"{ratio:.3f}x", s.verdict(ratio, TARGET_RATIO))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.file_transfer", description=__doc__.split("\n")[0]
    )
    s.common_arguments(parser)
    parser.add_argument(
        "--size",
        type=s.parse_size,
        default=None,
        help=f"file size (default {DEFAULT_SIZE}, quick {QUICK_SIZE})",
    )
    parser.add_argument(
        "--clients",
        type=s.parse_counts,
        default=s.parse_counts(DEFAULT_CLIENTS),
        help=f"concurrent clients per round (default {DEFAULT_CLIENTS})",
    )
    parser.add_argument(
        "--nginx-workers",
        type=int,
        default=1,
        help="nginx worker processes (default 1: one process each)",
    )
    args = parser.parse_args(argv)
    if args.nginx_workers < 1:
        parser.error("--nginx-workers must be >= 1")
    return s.run(lambda: benchmark(args), args.budget)


if __name__ == "__main__":
    sys.exit(main())
