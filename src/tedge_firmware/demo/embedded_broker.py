"""The demo's fallback MQTT broker: amqtt (pure Python, MQTT 3.1.1) on one loopback listener.

`python -m tedge_firmware.demo.embedded_broker --host 127.0.0.1 --port N [--log-file PATH]`

Only for `tedge-firmware demo` on a machine where Mosquitto is not installed and cannot be
(README "Demo"); never for a gateway. amqtt 0.12 has known faults that a real installation
must not meet (the demo, where no client reconnects, does not): a client that connects
receives retained messages on topics it did not subscribe to (those of every other client's
filters), and QoS 1 messages for a disconnected session are dropped (every session here is
anonymous). It also costs about ten times Mosquitto's CPU. The demo runs it as a subprocess,
so that CPU is not taken from the demo's own event loop, and this is the only module that
imports amqtt (the `demo-broker` extra).

Anonymous clients are allowed; no `$SYS` topics, no persistence. SIGTERM or SIGINT stops it
cleanly (exit 0). Its log holds its own start and stop and amqtt's warnings and errors.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tedge_firmware.errors import BrokerError, ConfigError, TedgeFirmwareError

# named, not __name__: run with -m, __name__ is "__main__"
log = logging.getLogger("tedge_firmware.embedded_broker")

SHUTDOWN_GRACE_S = 5.0  # amqtt's own shutdown waits up to 5 s for its broadcast tasks
_ANONYMOUS = "amqtt.plugins.authentication.AnonymousAuthPlugin"


def broker_config(host: str, port: int) -> dict[str, Any]:
    """amqtt's configuration: one TCP listener, anonymous clients, no other plugin."""
    address = f"[{host}]" if ":" in host else host
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{address}:{port}"}},
        # Replaces amqtt's default plugins: its packet and event loggers and the $SYS
        # publisher cost CPU on every message and the demo reads none of them.
        "plugins": {_ANONYMOUS: {"allow_anonymous": True}},
    }


class _KnownNoise(logging.Filter):
    """Drops amqtt records that say nothing useful here.

    - The demo checks that the broker listens by connecting and closing at once; amqtt logs
      that as an error ("No data from ...") and a warning although nothing went wrong.
    - A failed start is logged by amqtt with a traceback; `main` reports it in one line.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        probe = message.startswith("No data from") or (
            message.startswith("Failed to initialize client session") and "No data" in message
        )
        return not (probe or message == "Broker startup failed")


def configure_logging(log_file: Path | None) -> None:
    handler: logging.Handler = (
        logging.FileHandler(log_file) if log_file is not None else logging.StreamHandler()
    )
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_KnownNoise())
    # amqtt's loggers: warnings and errors only (it logs every connection at INFO)
    logging.basicConfig(level=logging.WARNING, handlers=[handler], force=True)
    log.setLevel(logging.INFO)


async def serve(host: str, port: int) -> None:
    """Run the broker until SIGTERM or SIGINT.

    ConfigError when amqtt is not installed, BrokerError when it cannot listen.
    """
    try:
        from amqtt.broker import Broker  # the optional extra: imported here and nowhere else
    except ModuleNotFoundError as error:
        raise ConfigError(
            f"{error.name} is not installed: pip install 'tedge-firmware[demo-broker]'"
        ) from error
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    broker = Broker(broker_config(host, port))
    try:
        await broker.start()
    except Exception as error:  # amqtt wraps every start failure (e.g. port in use)
        raise BrokerError(f"cannot listen on {host}:{port}: {_cause(error)}") from error
    log.info("embedded broker (amqtt) listening on %s:%d", host, port)
    await stop.wait()
    log.info("stopping")
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(SHUTDOWN_GRACE_S):
            await broker.shutdown()
            log.info("stopped")
            return
    log.warning("amqtt did not shut down within %.0f s: exiting anyway", SHUTDOWN_GRACE_S)


def _cause(error: BaseException) -> str:
    """The innermost cause: amqtt wraps an OSError twice."""
    while error.__cause__ is not None:
        error = error.__cause__
    return str(error) or type(error).__name__


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tedge_firmware.demo.embedded_broker",
        description="The demo's fallback MQTT broker (amqtt); not for a real gateway.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, required=True, help="TCP port to listen on")
    parser.add_argument("--log-file", type=Path, default=None, help="default: standard error")
    args = parser.parse_args(argv)
    if not 1 <= args.port <= 65_535:
        parser.error(f"--port {args.port} is not in 1-65535")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(args.log_file)
    try:
        asyncio.run(serve(args.host, args.port))
    except TedgeFirmwareError as error:  # one line, no traceback, on stderr and in the log
        if args.log_file is not None:
            log.error("%s", error)
        print(f"embedded broker: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
