"""The gateway's promises under hostile input, crashes and broker restarts (issue 12).

Each test reproduces one way the gateway used to stop or lose a status, over a real Mosquitto,
and shows that it now goes on and loses nothing.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from brokers import Broker, free_port
from harness import (
    E501,
    E503,
    S515,
    Gateway,
    K,
    U,
    observer,
    operation_files,
    req_topic,
    res_topic,
    us,
    write_config,
)

INSTALLED = b"115,fw-name,fw-version," + U.encode()


@pytest.fixture
def config_dir(tmp_path: Path, broker: Broker) -> Path:
    config_dir = tmp_path / "etc"
    write_config(config_dir, tmp_path / "data", broker.port, free_port())
    cache = tmp_path / "data" / "cache"
    cache.mkdir(parents=True)
    (cache / K).write_bytes(b"\x00\xff binary firmware")
    return config_dir


@pytest.fixture
async def gateway(tmp_path: Path, config_dir: Path) -> AsyncIterator[Gateway]:
    instance = Gateway(config_dir, tmp_path / "data")
    try:
        yield instance
    finally:
        await instance.stop()


# Characters Mosquitto refuses in a topic (it then drops the publisher's connection): C1
# controls, Unicode non-characters, and the C0 controls our check always refused.
REFUSED_BY_MOSQUITTO = ["\u0085", "\u0080", "\u009f", "\ufdd0", "\ufdef", "\ufffe", "\uffff", "\U0001fffe"]


@pytest.mark.parametrize("character", REFUSED_BY_MOSQUITTO, ids=lambda c: f"U+{ord(c):04X}")
async def test_a_child_id_the_broker_refuses_does_not_silence_the_gateway(
    tmp_path: Path, broker: Broker, gateway: Gateway, character: str
) -> None:
    async with observer(broker.port) as obs:
        await gateway.start()
        assert await obs.next("c8y/s/us") == b"500"
        await obs.publish("c8y/s/ds", f"515,{character}x,fw-name,fw-version,{U}")
        await obs.publish("c8y/s/ds", S515)
        request = json.loads(await obs.next(req_topic()))
        await obs.publish(res_topic(), json.dumps({"id": request["id"], "status": "successful"}))
        assert await obs.sequence(us(), 3) == [E501, INSTALLED, E503]
    assert operation_files(tmp_path / "data") == []
