"""`tedge-firmware file-transfer` as its own process with a small descriptor limit (soft and hard,
so it cannot raise it), serving `child1/firmware_update/image.bin`: for the flood tests."""

from __future__ import annotations

import contextlib
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from brokers import free_port
from harness import write_config

LIMIT_NOFILE = 512
IDLE_TIMEOUT = 2
FLOOD = 1_100  # connections: more than the service has descriptors


def _small_descriptor_limit() -> None:  # runs in the child, before exec
    resource.setrlimit(resource.RLIMIT_NOFILE, (LIMIT_NOFILE, LIMIT_NOFILE))


@contextlib.contextmanager
def file_transfer_process(tmp_path: Path, firmware: bytes, extra: str = "") -> Iterator[tuple[int, Path]]:
    """The service on a free port (yielded with its log), `http.idle_timeout = IDLE_TIMEOUT`
    and the `[http]` keys of `extra` (a TOML `[http]` table, e.g. TLS, may follow)."""
    port = free_port()
    config_dir = tmp_path / "etc"
    # one [http] table: the idle timeout, and the keys of `extra`'s own [http] table if it has one
    keys = f"[http]\nidle_timeout = {IDLE_TIMEOUT}\n" + extra.removeprefix("[http]\n")
    write_config(config_dir, tmp_path / "data", free_port(), port, extra=keys)
    folder = tmp_path / "data" / "file-transfer" / "child1" / "firmware_update"
    folder.mkdir(parents=True)
    (folder / "image.bin").write_bytes(firmware)
    log = tmp_path / "file-transfer.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "tedge_firmware", "file-transfer", "--config-dir", str(config_dir)],
            stdout=out,
            stderr=out,
            preexec_fn=_small_descriptor_limit,
        )
    try:
        deadline = time.monotonic() + 15
        while b"File transfer: serving" not in log.read_bytes():
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)  # a line in another process's log: nothing to await
        yield port, log
        assert process.poll() is None, log.read_text()[-3000:]  # it is still serving
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
