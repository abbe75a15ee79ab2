"""A firmware larger than the free space under data.path: a clear 502 naming the sizes, and
nothing half-written left in the cache. data.path is a real small filesystem (tmpfs)."""

from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def tmpfs(mount_point: Path, size: str) -> Iterator[Path]:
    """A real filesystem of `size` (skips the test where it cannot be mounted)."""
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    with tmpfs(tmp_path / "small", "4m") as mount_point:
        yield mount_point


async def test_not_enough_disk_space_fails_clearly(tmp_path: Path, broker: Broker, small_disk: Path) -> None:
    data = small_disk / "data"
    write_config(tmp_path / "etc", data, broker.port, free_port())
    async with (
        FirmwareServer(files={"huge.bin": b"\x00" * (8 << 20)}) as cloud,
        observer(broker.port) as obs,
        Gateway(tmp_path / "etc", data),
    ):
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


@pytest.fixture
def disk_of_8m(tmp_path: Path) -> Iterator[Path]:
    with tmpfs(tmp_path / "disk8m", "8m") as mount_point:
        yield mount_point


@pytest.mark.parametrize("pinned", [False, True], ids=["unused firmware goes", "pinned firmware stays"])
async def test_a_download_makes_room_by_evicting_what_nothing_needs(
    tmp_path: Path, broker: Broker, disk_of_8m: Path, pinned: bool
) -> None:
    """3 MiB of old firmware in an 8 MiB cache, then a 5.5 MiB one: the old one goes to make
    room (no limits are configured: the room is needed now), unless it is pinned; then the
    operation fails naming the sizes, and nothing half-written stays."""
    import hashlib
    import time

    from harness import seed_cache
    from tedge_firmware.core.operation import file_id_for_url
    from tedge_firmware.shell.cache import FirmwareCache

    data = disk_of_8m / "data"
    write_config(tmp_path / "etc", data, broker.port, free_port())
    old, new = b"\x01" * (3 << 20), b"\x02" * (11 << 19)
    old_file = seed_cache(data, "http://cloud.example/old.bin", old)
    if pinned:
        cache = FirmwareCache(data / "cache", data / "file-transfer")
        assert cache.pin(file_id_for_url("http://cloud.example/old.bin"), time.time() + 3600) is not None
    async with (
        FirmwareServer(files={"new.bin": new}) as cloud,
        observer(broker.port) as obs,
        Gateway(tmp_path / "etc", data),
    ):
        assert await obs.next("c8y/s/us") == b"500"
        url = cloud.url("new.bin")
        await obs.publish("c8y/s/ds", f"515,{CHILD},fw,2.0,{url}")
        if pinned:
            assert await obs.next(us()) == E501
            failed = (await obs.next(us())).decode()
            assert "not enough disk space" in failed and "freed only 0 bytes" in failed, failed
            assert old_file.read_bytes() == old
            assert [f for f in cache_files(data) if f.startswith(("sha256/", "incoming/"))] == [f"sha256/{old_file.name}"]
        else:
            import json

            request = json.loads(await obs.next(req_topic(), timeout=20))
            assert request["sha256"] == hashlib.sha256(new).hexdigest()
            assert not old_file.exists()  # evicted to make room


@pytest.mark.parametrize("upstream_when_full", [True, False], ids=["upstream URL handed", "failed"])
async def test_a_te_child_gets_the_upstream_url_when_the_cache_is_full_if_the_site_allows(
    tmp_path: Path, broker: Broker, disk_of_8m: Path, upstream_when_full: bool
) -> None:
    import json
    import time

    from harness import seed_cache
    from tedge_firmware.core.operation import file_id_for_url
    from tedge_firmware.shell.cache import FirmwareCache

    data = disk_of_8m / "data"
    extra = "[firmware.cache]\nupstream_when_full = true\n" if upstream_when_full else ""
    write_config(tmp_path / "etc", data, broker.port, free_port(), extra=extra)
    seed_cache(data, "http://cloud.example/old.bin", b"\x01" * (3 << 20))
    cache = FirmwareCache(data / "cache", data / "file-transfer")
    assert cache.pin(file_id_for_url("http://cloud.example/old.bin"), time.time() + 3600) is not None
    topic = "te/device/te-child///cmd/firmware_update/c8y-mapper-5"
    async with (
        FirmwareServer(files={"new.bin": b"\x02" * (11 << 19)}) as cloud,
        Gateway(tmp_path / "etc", data),
        observer(broker.port, [topic]) as obs,
    ):
        command = {"status": "gateway_download", "remoteUrl": cloud.url("new.bin"), "name": "fw", "version": "2"}
        await obs.publish(topic, json.dumps(command), retain=True)
        await obs.next(topic)  # ours
        moved = json.loads(await obs.next(topic, timeout=20))
    if upstream_when_full:
        assert moved == {**command, "status": "gateway_downloaded", "tedgeUrl": cloud.url("new.bin")}
    else:
        assert moved["status"] == "failed" and "not enough disk space" in moved["reason"]
    assert not [f for f in cache_files(data) if f.startswith("incoming/")]  # nothing half-written
