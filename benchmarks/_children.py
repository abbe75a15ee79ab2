"""A slice of the fleet benchmark's children: one SDK `Connector` serving many child ids.

    python -m benchmarks._children --port P --work-dir D --protocol legacy|te CHILD [CHILD ...]

Run by `benchmarks.fleet` as several processes, so that the children do not share one
interpreter (and one GIL) with each other and with the simulator: the benchmark then measures
the gateway, not its own children. Each child applies at once (the gateway and the protocol
are what is measured). Serves until SIGTERM or SIGINT; prints "ready" once subscribed.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

from benchmarks import _support as s
from tedge_firmware.connector import BrokerSettings, Connector, DownloadSettings, Firmware


async def noop_apply(firmware: Firmware) -> None:
    """The children apply instantly."""


async def serve(args: argparse.Namespace) -> None:
    connector = Connector(
        *args.children,
        apply=noop_apply,
        work_dir=args.work_dir,
        broker=BrokerSettings(host=s.HOST, port=args.port, client_id=args.client_id),
        download=DownloadSettings(parallel=args.parallel),
        heartbeat=None,
        register=True,
        protocol=args.protocol,
    )
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, connector.stop)
    serving = asyncio.create_task(connector.run())
    await connector.wait_connected()
    print("ready", flush=True)
    await serving


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks._children")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--work-dir", type=Path, required=True)
    parser.add_argument("--client-id", required=True)
    parser.add_argument("--protocol", choices=["legacy", "te"], default="legacy")
    parser.add_argument("--parallel", type=int, default=16)
    parser.add_argument("children", nargs="+")
    args = parser.parse_args(argv)
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
