"""Shared fixtures: a private Mosquitto on a free port, free ports."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from brokers import Broker, free_port


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    workdir = tmp_path / "broker"
    workdir.mkdir()
    instance = Broker(workdir)
    instance.start()
    try:
        yield instance
    finally:
        instance.kill()


@pytest.fixture
def unused_port() -> int:
    return free_port()
