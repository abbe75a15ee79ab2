"""Run every benchmark, one after the other: `python -m benchmarks [--quick] [--repeat N]`.

Each benchmark starts its own servers in its own temporary directory and removes them when it
ends. The exit code is non-zero when a benchmark could not run (a target not met is a result,
printed, not a failure).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from benchmarks import (
    cli_startup,
    cloud_download,
    file_transfer,
    fleet,
    idle_memory,
    resume,
    soak,
)

BENCHMARKS: dict[str, Callable[[list[str]], int]] = {
    "cloud_download": cloud_download.main,
    "resume": resume.main,
    "file_transfer": file_transfer.main,
    "fleet": fleet.main,
    "soak": soak.main,
    "cli_startup": cli_startup.main,
    "idle_memory": idle_memory.main,
}


def forwarded(args: argparse.Namespace) -> list[str]:
    argv = ["--quick"] if args.quick else []
    if args.repeat is not None:
        argv += ["--repeat", str(args.repeat)]
    if args.workdir is not None:
        argv += ["--workdir", str(args.workdir)]
    return argv


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--quick", action="store_true", help="small sizes: a smoke run of a few seconds each"
    )
    parser.add_argument("--repeat", type=int, default=None, help="repetitions for every benchmark")
    parser.add_argument("--workdir", type=Path, default=None, help="where temporary files go")
    parser.add_argument(
        "--only", choices=sorted(BENCHMARKS), action="append", help="run only these"
    )
    args = parser.parse_args(argv)
    failed = []
    for name in args.only or list(BENCHMARKS):
        print(f"\n#### {name}", flush=True)
        code = BENCHMARKS[name](forwarded(args))
        if code != 0:
            failed.append(name)
            if code in (130, 143):  # interrupted: do not start the next one
                return code
    if failed:
        print(f"\nfailed to run: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
