"""One logging policy for every command: one line per event on stderr, UTC RFC 3339 times."""

from __future__ import annotations

import logging
import time


class _UtcFormatter(logging.Formatter):
    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        return f"{stamp}.{int(record.msecs):03d}Z"


def configure_logging(debug: bool = False) -> None:
    """Apply the policy once, from the CLI (library code never installs handlers)."""
    import logging.config  # here: it costs `--help`, which logs nothing, about 12 ms

    logging.config.dictConfig(
        {
            "version": 1,
            "disable_existing_loggers": False,
            "formatters": {
                "line": {
                    "()": _UtcFormatter,
                    "format": "%(asctime)s %(levelname)-7s %(name)s: %(message)s",
                }
            },
            "handlers": {
                "stderr": {
                    "class": "logging.StreamHandler",
                    "formatter": "line",
                    "stream": "ext://sys.stderr",
                }
            },
            "root": {"handlers": ["stderr"], "level": "DEBUG" if debug else "INFO"},
            "loggers": {
                # the libraries' own chatter stays out of an info log
                "aiohttp.access": {"level": "DEBUG" if debug else "WARNING"},
                "aiomqtt": {"level": "DEBUG" if debug else "WARNING"},
                "asyncio": {"level": "WARNING"},
                # watchfiles says "N changes detected" at INFO for every change it reports
                "watchfiles": {"level": "DEBUG" if debug else "WARNING"},
            },
        }
    )
