"""The service's last-resort error report, and the operation store after an interrupted write."""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import threading
from pathlib import Path

import pytest

from tedge_firmware.core.operation import FetchRecord, OperationRecord
from tedge_firmware.errors import StoreError
from tedge_firmware.gateway.lifecycle import on_loop_exception
from tedge_firmware.shell import durable
from tedge_firmware.shell.store import StoreWriter, fetch_store, operation_store


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


# --- StoreWriter: writes off the event loop, in order ---------------------------------------


async def test_a_slow_write_does_not_hold_the_event_loop(tmp_path: Path) -> None:
    writer = StoreWriter()
    gate = threading.Event()
    results: list[StoreError | None] = []
    writer.submit(lambda: (gate.wait(5), None)[1], results.append)
    # The loop goes on while the write waits in its thread.
    async with asyncio.timeout(5):
        await asyncio.sleep(0.01)
    assert results == []
    gate.set()
    async with asyncio.timeout(5):
        await writer.close()
    assert results == [None]


async def test_writes_and_their_callbacks_keep_the_order_they_were_submitted(tmp_path: Path) -> None:
    store = fetch_store(tmp_path)
    writer = StoreWriter()
    seen: list[str] = []
    record = FetchRecord("op1", "child1", "fw", "1.0", "http://x/fw", 1)
    for index in range(20):
        writer.submit(lambda: store.save(record), lambda error, index=index: seen.append(f"save {index} {error}"))
        writer.submit(lambda: store.delete("op1"), lambda error, index=index: seen.append(f"delete {index} {error}"))
    async with asyncio.timeout(5):
        await writer.close()
    assert seen == [f"{kind} {i} None" for i in range(20) for kind in ("save", "delete")]
    assert not store.path("op1").exists()


async def test_a_failed_write_reaches_its_callback_as_a_store_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    store = fetch_store(tmp_path / "file")
    writer = StoreWriter()
    errors: list[StoreError | None] = []
    record = FetchRecord("op1", "child1", "fw", "1.0", "http://x/fw", 1)
    writer.submit(lambda: store.save(record), errors.append)
    writer.submit(lambda: 1 / 0 and None, errors.append)  # a bug: logged, then a StoreError
    async with asyncio.timeout(5):
        await writer.close()
    assert [type(error) for error in errors] == [StoreError, StoreError]
    assert "Creating the file failed" in str(errors[0])
    assert "division by zero" in str(errors[1])


async def test_drain_waits_for_the_writes_that_callbacks_submit(tmp_path: Path) -> None:
    writer = StoreWriter()
    done: list[int] = []

    def then_again(error: StoreError | None) -> None:
        writer.submit(lambda: None, lambda error: done.append(2))
        done.append(1)

    writer.submit(lambda: None, then_again)
    async with asyncio.timeout(5):
        await writer.drain()
    assert done == [1, 2]
    await writer.close()


# --- StoreWriter: group commit ----------------------------------------------------------------


async def test_writes_that_queue_behind_a_busy_disk_go_down_together_with_one_directory_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = operation_store(tmp_path / "firmware")
    store.directory.mkdir()
    events: list[str] = []
    real_fsync_directory = durable.fsync_directory

    def counted(directory: Path) -> None:
        real_fsync_directory(directory)
        events.append(f"fsync {directory.name}")

    monkeypatch.setattr(durable, "fsync_directory", counted)
    writer = StoreWriter()
    gate = threading.Event()
    writer.submit(lambda: (gate.wait(5), None)[1])  # the disk is busy
    for index in range(50):
        record = OperationRecord(f"op{index}", "child1", "fw", "1.0", "http://x/fw", "http://gw/fw", "sha", 1)
        writer.submit(functools.partial(store.save, record), lambda error, i=index: events.append(f"saved {i} {error}"))
    gate.set()
    async with asyncio.timeout(5):
        await writer.close()
    # the 50 records: one fsync of their directory, and no one told before it
    assert events == ["fsync firmware"] + [f"saved {i} None" for i in range(50)]
    assert sorted(p.name for p in store.directory.iterdir()) == sorted(f"op{i}" for i in range(50))


async def test_await_write_returns_once_durable_and_raises_the_writes_own_error(tmp_path: Path) -> None:
    writer = StoreWriter()
    target = tmp_path / "record"
    await writer.write(lambda: durable.write_atomically(target, b"one"))
    assert target.read_bytes() == b"one"
    with pytest.raises(FileNotFoundError):
        await writer.write(lambda: durable.write_atomically(tmp_path / "missing" / "x", b"two"))
    await writer.write(lambda: durable.write_atomically(target, b"three"))  # the writer goes on
    assert target.read_bytes() == b"three"
    await writer.close()


async def test_a_cancelled_waiter_leaves_the_writer_working(tmp_path: Path) -> None:
    writer = StoreWriter()
    gate = threading.Event()
    waiter = asyncio.create_task(writer.write(lambda: (gate.wait(5), None)[1]))
    await asyncio.sleep(0)
    waiter.cancel()
    gate.set()
    target = tmp_path / "after"
    async with asyncio.timeout(5):
        await writer.write(lambda: durable.write_atomically(target, b"ok"))
    assert target.read_bytes() == b"ok" and waiter.cancelled()
    await writer.close()
