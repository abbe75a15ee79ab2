"""Download floor: what a body loop outside the event loop would reach, against curl.

A probe for a design, not the product. One thread fetches the file from nginx with the
standard library's blocking `http.client`, reads the body into one reused 1 MiB buffer
(`readinto`), hashes it with hashlib, writes it with `os.write`, starts writeback every 8 MiB
(`sync_file_range`, as the downloader does) and fsyncs at the end; the digest is checked. No
asyncio, aiohttp, thread hops or per-piece objects: the per-byte work left is what curl does
(two copies) plus SHA-256. Anchor in the same run, alternating: `curl -s -o FILE URL`, then
fsync(FILE).

    python -m benchmarks.download_floor [--size 512MiB] [--repeat 5]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import http.client
import os
import sys
import time
from pathlib import Path

from benchmarks import _support as s
from benchmarks.cloud_download import CurlRun, curl_once
from tedge_firmware.shell.partial_file import SYNC_FILE_RANGE, SYNC_FILE_RANGE_WRITE

BUFFER = 1 << 20
WRITEBACK_STEP = 8 << 20


def blocking_download(port: int, name: str, out: Path, sha256: str) -> tuple[float, float]:
    """(seconds, CPU seconds of this thread) to fetch, hash, write and fsync the file."""
    begin, cpu_begin = time.perf_counter(), time.thread_time()
    connection = http.client.HTTPConnection(s.HOST, port)
    connection.request("GET", f"/{name}")
    response = connection.getresponse()
    buffer = bytearray(BUFFER)
    view = memoryview(buffer)
    digest = hashlib.sha256()
    descriptor = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        written = handed = 0
        while count := response.readinto(buffer):
            digest.update(view[:count])
            done = 0
            while done < count:
                done += os.write(descriptor, view[done:count])
            written += count
            if SYNC_FILE_RANGE is not None and written - handed >= WRITEBACK_STEP:
                SYNC_FILE_RANGE(descriptor, handed, written - handed, SYNC_FILE_RANGE_WRITE)
                handed = written
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
        connection.close()
    if digest.hexdigest() != sha256:
        raise RuntimeError("the probe's digest differs from the file's")
    return time.perf_counter() - begin, time.thread_time() - cpu_begin


async def benchmark(args: argparse.Namespace) -> None:
    size = args.size
    repeat = args.repeat or (2 if args.quick else 5)
    s.require(s.NGINX, s.CURL)
    rows = []
    with s.work_directory(args.workdir) as workdir:
        s.check_disk(workdir, 3 * size)
        www = workdir / "www"
        www.mkdir()
        sha256 = await asyncio.to_thread(s.make_file, www / "floor.bin", size)
        url = f"http://{s.HOST}:{{port}}/floor.bin"
        async with s.nginx(www, workdir) as port:
            for _ in range(repeat):
                os.sync()
                curl = await curl_once(url.format(port=port), workdir / "curl.out", size)
                os.sync()
                probe = await asyncio.to_thread(
                    blocking_download, port, "floor.bin", workdir / "probe.out", sha256
                )
                s.remove(workdir / "probe.out")
                rows.append((curl, probe))
    report(size, rows)


def report(size: int, rows: list[tuple[CurlRun, tuple[float, float]]]) -> None:
    gigabytes = size / 1e9
    s.heading(f"download floor, {s.format_size(size)}: {len(rows)} runs, one line each")
    for curl, (probe_s, probe_cpu) in rows:
        curl_s, curl_cpu, fsync_s = curl.seconds, curl.cpu_seconds, curl.fsync_seconds
        s.line(
            "curl | curl+fsync | probe",
            f"{s.throughput(size, probe_s):.0f} MB/s",
            f"curl {s.throughput(size, curl_s):.0f} MB/s ({curl_cpu / gigabytes:.2f} CPU s/GB), "
            f"curl+fsync {s.throughput(size, curl_s + fsync_s):.0f} MB/s, "
            f"probe {probe_cpu / gigabytes:.2f} CPU s/GB, "
            f"probe / (curl+fsync) {(curl_s + fsync_s) / probe_s:.2f}x",
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.download_floor", description=__doc__.split("\n")[0]
    )
    s.common_arguments(parser)
    parser.add_argument("--size", type=s.parse_size, default=s.parse_size("512MiB"))
    args = parser.parse_args(argv)
    return s.run(lambda: benchmark(args), args.budget)


if __name__ == "__main__":
    sys.exit(main())
