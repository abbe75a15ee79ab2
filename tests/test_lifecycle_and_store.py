"""The service's last-resort error report, and the operation store after an interrupted write."""

from __future__ import annotations

import asyncio
import logging
import socket
from pathlib import Path

import pytest

from tedge_firmware.core.operation import FetchRecord
from tedge_firmware.gateway.lifecycle import on_loop_exception
from tedge_firmware.shell.store import fetch_store


async def test_a_socket_watch_that_raced_a_close_is_one_debug_line(caplog: pytest.LogCaptureFixture) -> None:
    # The race aiomqtt has: a callback asks the loop to watch a socket that paho has closed
    # meanwhile (the broker went away). Reproduced with a real closed descriptor.
    loop = asyncio.get_running_loop()
    caplog.set_level(logging.DEBUG)
    sock = socket.socket()
    fd = sock.fileno()
    sock.close()
    reported: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, context: (reported.append(context), on_loop_exception(_loop, context)))
    try:
        loop.call_soon(loop.add_writer, fd, lambda: None)
        await asyncio.sleep(0)  # the callback runs, and fails, in this turn of the loop
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(None)
    assert len(reported) == 1 and isinstance(reported[0]["exception"], OSError)
    assert [r.getMessage() for r in caplog.records if r.exc_info] == []
    assert any("a closed MQTT socket was not watched" in r.getMessage() and r.levelno == logging.DEBUG for r in caplog.records)


async def test_any_other_uncaught_error_keeps_its_traceback(caplog: pytest.LogCaptureFixture) -> None:
    loop = asyncio.get_running_loop()

    def bug() -> None:
        raise ZeroDivisionError("a bug")

    loop.set_exception_handler(on_loop_exception)
    try:
        with caplog.at_level(logging.ERROR, logger="asyncio"):
            loop.call_soon(bug)
            await asyncio.sleep(0)
            await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(None)
    [record] = [r for r in caplog.records if r.name == "asyncio"]
    assert record.exc_info is not None and "a bug" in str(record.exc_info[1])


def test_a_write_interrupted_by_a_crash_leaves_nothing_behind(tmp_path: Path) -> None:
    store = fetch_store(tmp_path)
    record = FetchRecord("op1", "child1", "fw", "1.0", "http://x/fw", 1)
    store.save(record)
    # a kill -9 between the temp file and the rename leaves the temp file
    (store.directory / ".op2.tmp").write_text('{"operation_id":"op2",')
    assert store.load_all() == [record]
    assert sorted(p.name for p in store.directory.iterdir()) == ["op1"]


def test_write_atomically_replaces_whole_and_leaves_no_temp(tmp_path: Path) -> None:
    from tedge_firmware.shell.durable import write_atomically

    target = tmp_path / "state.json"
    target.write_bytes(b"old")
    write_atomically(target, b"new " * 10_000, mode=0o600)
    assert target.read_bytes() == b"new " * 10_000
    assert target.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]

    def fail(fd: int) -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        write_atomically(target, b"never", prepare=fail)
    assert target.read_bytes() == b"new " * 10_000  # the old file is whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_write_atomically_never_writes_through_a_link_in_the_temp_files_place(tmp_path: Path) -> None:
    from tedge_firmware.shell.durable import write_atomically

    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_bytes(b"not yours")
    (tmp_path / ".state.json.tmp").symlink_to(elsewhere)
    with pytest.raises(OSError):
        write_atomically(tmp_path / "state.json", b"data")
    assert elsewhere.read_bytes() == b"not yours"
