"""Shared fixtures: a private Mosquitto on a free port, free ports."""

from __future__ import annotations

import resource
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from brokers import Broker, free_port
from ftprocess import FLOOD
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


@pytest.fixture
def enough_descriptors_for_the_test() -> Iterator[None]:
    """This process may open FLOOD connections and more (raised up to the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < FLOOD + 200:
        pytest.skip(f"this test needs {FLOOD + 200} open files, the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, FLOOD + 200), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
