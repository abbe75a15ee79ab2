"""CLI start-up: `tedge-firmware --help` against `python -c 'import click'`, the same interpreter.

Each command runs `--repeat` times (default 20, quick 5), one after the other, after one
warm-up run of each (so that both read their files from the page cache); the median wall time
of each and their ratio are printed. Target: `--help` under 150 ms and about twice the anchor.

    python -m benchmarks.cli_startup [--quick] [--repeat 20]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

from benchmarks import _support as s

HELP = [sys.executable, "-m", "tedge_firmware", "--help"]
ANCHOR = [sys.executable, "-c", "import click"]


def wall_seconds(argv: list[str]) -> float:
    began = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, timeout=30)
    return time.perf_counter() - began


async def benchmark(repeat: int) -> None:
    for argv in (HELP, ANCHOR):
        wall_seconds(argv)  # warm-up
    ours = [wall_seconds(HELP) for _ in range(repeat)]
    anchor = [wall_seconds(ANCHOR) for _ in range(repeat)]
    s.heading(f"cli start-up: {repeat} runs each, medians")
    s.line(
        "anchor: python -c 'import click'",
        f"{statistics.median(anchor) * 1000:.0f} ms",
        s.runs_text([a * 1000 for a in anchor]),
    )
    s.line(
        "ours: tedge-firmware --help",
        f"{statistics.median(ours) * 1000:.0f} ms",
        s.runs_text([o * 1000 for o in ours]),
    )
    ratio = statistics.median(ours) / statistics.median(anchor)
    met = "met" if statistics.median(ours) < 0.150 else "NOT MET"
    s.line("ratio ours / anchor", f"{ratio:.2f}x", f"target: under 150 ms: {met}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.cli_startup", description=__doc__.split("\n")[0]
    )
    s.common_arguments(parser)
    args = parser.parse_args(argv)
    repeat = args.repeat or (5 if args.quick else 20)
    return s.run(lambda: benchmark(repeat), args.budget)


if __name__ == "__main__":
    sys.exit(main())
