"""File transfer: our HTTP service against nginx, serving the same file to 1 and 50 children.

Ours: `tedge-firmware file-transfer` as a subprocess, serving the file the way the plugin
publishes firmware (a symlink in `file-transfer/<child>/firmware_update/` to the cache file).
Anchor: nginx (`sendfile on`, one worker by default, like our one process) whose root is the
same `file-transfer` directory. Clients: N `curl -s -o /dev/null` processes started together
(the same client for both servers, never in a server's event loop); aggregate throughput is
N x size over the time from the first start to the last exit. Every client must get 200 and
all bytes. Repetitions alternate the servers; medians are reported.

`--tls`: both over HTTPS with the same certificate (the gateway's, made by the project's own
certificate code) and both requiring a client certificate of the site's CA, which every curl
presents (the child's): the locked local hop.

    python -m benchmarks.file_transfer [--quick] [--tls] [--size 1GiB] [--clients 1,50]
        [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks import _support as s
from tedge_firmware.demo.secure import LockedSite

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


async def one_client(url: str, size: int, limit_s: float, tls: Sequence[str]) -> None:
    argv = [s.CURL, "-s", *tls, "-o", os.devnull, "-w", "%{http_code} %{size_download}", url]
    code, output = await s.run_command(argv, limit_s)
    if code != 0 or output.split() != ["200", str(size)]:
        raise RuntimeError(f"a client failed: curl exit {code}, '{output.strip()}' for {url}")


async def round_of(url: str, size: int, clients: int, tls: Sequence[str]) -> float:
    """Seconds for `clients` concurrent curls to each fetch the whole file."""
    timeout = slowest_seconds(size * clients)
    begin = time.perf_counter()
    async with asyncio.TaskGroup() as group:
        for _ in range(clients):
            group.create_task(one_client(url, size, timeout, tls))
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
        site = LockedSite.create(workdir / "certs", s.GATEWAY_ID, [s.CHILD]) if args.tls else None
        extra = site.gateway_toml() if site else ""
        s.write_tedge_config(
            config_dir, data, mqtt_port=s.free_port(), http_port=http_port, extra=extra
        )
        ours = s.tedge_firmware("file-transfer", config_dir, workdir / "file-transfer.log")
        scheme = "https" if site else "http"
        async with (
            s.running(ours, http_port),
            s.nginx(data / "file-transfer", workdir, workers=args.nginx_workers, tls=site) as port,
        ):
            urls = {
                "nginx": f"{scheme}://{s.HOST}:{port}/{relative}",
                "ours": f"{scheme}://{s.HOST}:{http_port}/tedge/file-transfer/{relative}",
            }
            for clients in args.clients:
                seconds = await measure(urls, size, clients, repeat, ours, curl_tls(site))
                report(size, clients, seconds, args.nginx_workers, scheme)
            peak = s.proc_status_kib(ours.pid, "VmHWM") / 1024
            s.line("ours: peak RSS over all rounds", f"{peak:.0f} MiB")


def curl_tls(site: LockedSite | None) -> list[str]:
    """curl's options for the child's side of the locked hop."""
    if site is None:
        return []
    child = (site.child_cert(s.CHILD), site.child_key(s.CHILD))
    return ["--cacert", str(site.ca_file), "--cert", str(child[0]), "--key", str(child[1])]


async def measure(
    urls: dict[str, str],
    size: int,
    clients: int,
    repeat: int,
    ours: s.Process,
    tls: Sequence[str],
) -> dict[str, list[float]]:
    seconds: dict[str, list[float]] = {name: [] for name in urls}
    for index in range(repeat):
        order = list(urls) if index % 2 == 0 else list(reversed(urls))
        for name in order:
            one_round = round_of(urls[name], size, clients, tls)
            seconds[name].append(await s.until_exit(one_round, ours))
    return seconds


def report(
    size: int, clients: int, seconds: dict[str, list[float]], workers: int, scheme: str
) -> None:
    total = size * clients
    nginx = [s.throughput(total, t) for t in seconds["nginx"]]
    ours = [s.throughput(total, t) for t in seconds["ours"]]
    ratio = s.median(ours) / s.median(nginx)
    client_word = "client" if clients == 1 else "concurrent clients"
    s.heading(
        f"file transfer ({scheme}), {s.format_size(size)} to {clients} {client_word}: "
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
    parser.add_argument(
        "--tls",
        action="store_true",
        help="both servers over HTTPS, the same certificate, client certificates required",
    )
    args = parser.parse_args(argv)
    if args.nginx_workers < 1:
        parser.error("--nginx-workers must be >= 1")
    return s.run(lambda: benchmark(args), args.budget)


if __name__ == "__main__":
    sys.exit(main())
