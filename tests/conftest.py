"""Shared fixtures: a private Mosquitto on a free port, free ports."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from brokers import Broker, free_port
from harness import Gateway, U, seed_cache, write_config


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


@pytest.fixture
def config_dir(tmp_path: Path, broker: Broker) -> Path:
    """A gateway's config dir on the test's broker, with the firmware of `harness.U` cached."""
    config_dir = tmp_path / "etc"
    write_config(config_dir, tmp_path / "data", broker.port, free_port())
    seed_cache(tmp_path / "data", U, b"\x00\xff binary firmware")  # immutable: no request
    return config_dir


@pytest.fixture
async def gateway(tmp_path: Path, config_dir: Path) -> AsyncIterator[Gateway]:
    """`tedge-firmware run` in-process on `config_dir` (started by the test, stopped here)."""
    instance = Gateway(config_dir, tmp_path / "data")
    try:
        yield instance
    finally:
        await instance.stop()
