"""The logging policy: what a user sees by default, and what --debug adds."""

from __future__ import annotations

import logging

import pytest

from tedge_firmware.gateway.logs import configure_logging


@pytest.mark.parametrize(
    ("debug", "expected"),
    [(False, {"tedge_firmware": logging.INFO, "watchfiles": logging.WARNING, "aiomqtt": logging.WARNING}),
     (True, {"tedge_firmware": logging.DEBUG, "watchfiles": logging.DEBUG, "aiomqtt": logging.DEBUG})],
)
def test_third_party_chatter_only_with_debug(debug: bool, expected: dict[str, int]) -> None:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        configure_logging(debug)
        assert {name: logging.getLogger(name).getEffectiveLevel() for name in expected} == expected
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        for name in ("watchfiles", "aiomqtt", "aiohttp.access", "asyncio"):
            logging.getLogger(name).setLevel(logging.NOTSET)
