"""A firmware larger than the free space under data.path: a clear 502 naming the sizes, and
nothing half-written left in the cache. data.path is a real small filesystem (tmpfs)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from brokers import Broker, free_port
from harness import (
    CHILD,
    E501,
    FirmwareServer,
    Gateway,
    cache_files,
    no_operation_files_left,
    observer,
    req_topic,
    us,
    write_config,
)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


async def test_not_enough_disk_space_fails_clearly(tmp_path: Path, broker: Broker, small_disk: Path) -> None:
    data = small_disk / "data"
    write_config(tmp_path / "etc", data, broker.port, free_port())
    cloud = FirmwareServer(files={"huge.bin": b"\x00" * (8 << 20)})
    await cloud.start()
    gateway = Gateway(tmp_path / "etc", data)
    try:
        async with observer(broker.port) as obs:
            await gateway.start()
            assert await obs.next("c8y/s/us") == b"500"
            url = cloud.url("huge.bin")
            await obs.publish("c8y/s/ds", f"515,{CHILD},fw,1.0,{url}")
            assert await obs.next(us()) == E501
            failed = (await obs.next(us())).decode()
            assert failed.startswith(f'502,c8y_Firmware,"Download from {url} failed with not enough disk space in ')
            assert "need 8388608 bytes" in failed and "available" in failed
            assert cache_files(data) == []  # nothing half-written
            assert await no_operation_files_left(data) == []
            assert obs.pending(req_topic()) == 0
    finally:
        await gateway.stop()
        await cloud.stop()


async def test_a_put_that_fills_the_disk_answers_507_and_leaves_nothing(small_disk: Path) -> None:
    import io

    import aiohttp

    from tedge_firmware.shell.file_transfer import FileTransferServer

    root, cache = small_disk / "file-transfer", small_disk / "cache"
    root.mkdir()
    cache.mkdir()
    server = FileTransferServer(root=root, cache_dir=cache, host="127.0.0.1", port=0)
    await server.start()
    try:
        url = f"http://127.0.0.1:{server.port}/tedge/file-transfer/child1/big.bin"
        body_stream = io.BytesIO(b"\x00" * (8 << 20))
        async with aiohttp.ClientSession() as session, session.put(url, data=body_stream) as response:
            status, body = response.status, await response.text()
    finally:
        await server.stop()
    assert status == 507, body
    assert "No space left" in body
    assert [p.name for p in (root / "child1").iterdir()] == []  # no half file, no temp file
