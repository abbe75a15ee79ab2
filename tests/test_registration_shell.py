"""The operations directory on disk (real files in a temp dir) and its watcher (real inotify, and
polling): what counts, what is refused and logged, declaring without ever leaving the root."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import stat
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tedge_firmware.core.registration import DeviceOperations
from tedge_firmware.errors import StoreError
from tedge_firmware.shell.ops_watch import OperationsDirectory, OperationsWatcher


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "operations" / "c8y"
    path.mkdir(parents=True)
    return path


def names(device: DeviceOperations) -> list[str]:
    return device.operations


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


# --- scanning ------------------------------------------------------------------------------------


def test_scan_main_and_children(root: Path) -> None:
    (root / "c8y_Restart").touch()
    (root / "child1").mkdir()
    (root / "child1" / "c8y_Firmware").touch()
    (root / "child1" / "c8y_Custom").write_text('[exec]\ncommand = "/bin/true"\n')
    (root / "child2").mkdir()
    snapshot = OperationsDirectory(root).scan()
    assert names(snapshot.main) == ["c8y_Restart"]
    assert {child: names(ops) for child, ops in snapshot.children.items()} == {
        "child1": ["c8y_Custom", "c8y_Firmware"],
        "child2": [],
    }


def test_missing_root_is_an_empty_snapshot(tmp_path: Path) -> None:
    snapshot = OperationsDirectory(tmp_path / "absent").scan()
    assert snapshot.children == {} and snapshot.main.files == frozenset()


def test_only_valid_names_of_regular_files_with_toml_content_count(root: Path, caplog: pytest.LogCaptureFixture) -> None:
    child = root / "child1"
    child.mkdir()
    (child / "c8y_Firmware").touch()
    (child / "c8y_Bad-Name").touch()
    (child / "c8y_Firmware.toml").touch()
    (child / ".c8y_Firmware.swp").touch()
    (child / "c8y_BadToml").write_text("[exec\n")
    (child / "c8y_NotUtf8").write_bytes(b"\xff\xfe")
    (child / "c8y_Dir").mkdir()
    os.mkfifo(child / "c8y_Fifo")
    (tmp_path_file := root.parent / "elsewhere").write_text("")
    (child / "c8y_Linked").symlink_to(tmp_path_file)
    (child / "c8y_Dangling").symlink_to(root.parent / "nothing")
    directory = OperationsDirectory(root)
    with caplog.at_level(logging.WARNING):
        snapshot = directory.scan()
    assert names(snapshot.children["child1"]) == ["c8y_Firmware", "c8y_Linked"]
    logged = "\n".join(warnings(caplog))
    for name in ("c8y_Bad-Name", "c8y_Firmware.toml", "c8y_BadToml", "c8y_NotUtf8", "c8y_Dir", "c8y_Fifo"):
        assert name in logged
    assert ".swp" not in logged
    assert "TOML" in logged and "UTF-8" in logged
    # logged once: a second look at the same files is quiet
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert directory.scan() == snapshot
    assert warnings(caplog) == []


def test_invalid_toml_fixed_later_counts(root: Path) -> None:
    (root / "child1").mkdir()
    op = root / "child1" / "c8y_Firmware"
    op.write_text("[exec\n")
    directory = OperationsDirectory(root)
    assert names(directory.scan().children["child1"]) == []
    op.write_text("[exec]\n")
    assert names(directory.scan().children["child1"]) == ["c8y_Firmware"]
    op.write_text("= broken")
    assert names(directory.scan().children["child1"]) == []


def test_a_rewritten_file_changes_the_fingerprint(root: Path) -> None:
    (root / "child1").mkdir()
    op = root / "child1" / "c8y_Firmware"
    op.touch()
    directory = OperationsDirectory(root)
    before = directory.scan().children["child1"]
    os.utime(op, ns=(time.time_ns(), time.time_ns() + 1_000_000))
    after = directory.scan().children["child1"]
    assert before != after and names(before) == names(after)


def test_hostile_directory_names_are_refused_and_logged_once(root: Path, caplog: pytest.LogCaptureFixture) -> None:
    hostile = ["+", "#", "bad\x01name", "bad\\name", "x" * 201, "gateway", " "]
    for name in hostile:
        (root / name).mkdir()
        (root / name / "c8y_Firmware").touch()
    os.mkdir(os.fsencode(root) + b"/not-utf8-\xff")
    (root / "good").mkdir()
    directory = OperationsDirectory(root, main_device_id="gateway")
    with caplog.at_level(logging.WARNING):
        snapshot = directory.scan()
    assert list(snapshot.children) == ["good"]
    logged = warnings(caplog)
    assert len(logged) == len(hostile) + 1
    assert all("ignored child directory" in line for line in logged)
    assert all("\x01" not in line for line in logged)  # control characters are escaped in logs
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        directory.scan()
    assert warnings(caplog) == []


def test_nested_directories_are_not_children(root: Path) -> None:
    (root / "child1" / "deeper").mkdir(parents=True)
    (root / "child1" / "deeper" / "c8y_Firmware").touch()
    snapshot = OperationsDirectory(root).scan()
    assert list(snapshot.children) == ["child1"] and names(snapshot.children["child1"]) == []


# --- declaring ---------------------------------------------------------------------------------


def test_declare_and_withdraw(root: Path) -> None:
    directory = OperationsDirectory(root)
    assert directory.declare("child1", "c8y_Firmware") is True
    op = root / "child1" / "c8y_Firmware"
    assert op.is_file() and op.read_bytes() == b""
    assert stat.S_IMODE(op.stat().st_mode) & 0o644 == stat.S_IMODE(op.stat().st_mode)
    assert directory.declare("child1", "c8y_Firmware") is False  # there already: untouched
    assert directory.withdraw("child1", "c8y_Firmware") is True
    assert not op.exists() and (root / "child1").is_dir()  # the child stays
    assert directory.withdraw("child1", "c8y_Firmware") is False
    assert directory.withdraw("never-seen", "c8y_Firmware") is False


def test_declare_keeps_an_existing_file_with_content(root: Path) -> None:
    (root / "child1").mkdir()
    (root / "child1" / "c8y_Custom").write_text("[exec]\n")
    assert OperationsDirectory(root).declare("child1", "c8y_Custom") is False
    assert (root / "child1" / "c8y_Custom").read_text() == "[exec]\n"


def test_declare_for_the_main_device(root: Path) -> None:
    directory = OperationsDirectory(root)
    assert directory.declare(None, "c8y_Restart") is True
    assert (root / "c8y_Restart").is_file()
    assert directory.withdraw(None, "c8y_Restart") is True and not (root / "c8y_Restart").exists()


def test_declare_creates_a_missing_root(tmp_path: Path) -> None:
    root = tmp_path / "operations" / "c8y"
    assert OperationsDirectory(root).declare("child1", "c8y_Firmware")
    assert (root / "child1" / "c8y_Firmware").is_file()


def test_a_missing_config_directory_is_not_created(tmp_path: Path) -> None:
    root = tmp_path / "no-such-etc" / "operations" / "c8y"
    with pytest.raises(StoreError, match="no-such-etc/operations"):
        OperationsDirectory(root).declare("child1", "c8y_Firmware")
    assert not (tmp_path / "no-such-etc").exists()


def test_a_symlinked_child_directory_is_never_written_through(root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "c8y_Firmware").touch()
    (root / "evil").symlink_to(outside)
    directory = OperationsDirectory(root)
    with pytest.raises(StoreError, match="is a symlink, which is never written through"):
        directory.declare("evil", "c8y_Other")
    with pytest.raises(StoreError, match="is a symlink, which is never written through"):
        directory.withdraw("evil", "c8y_Firmware")
    assert sorted(p.name for p in outside.iterdir()) == ["c8y_Firmware"]


def test_a_symlinked_operation_file_is_not_followed(root: Path, tmp_path: Path) -> None:
    target = tmp_path / "target"
    (root / "child1").mkdir()
    (root / "child1" / "c8y_Firmware").symlink_to(target)
    directory = OperationsDirectory(root)
    assert directory.declare("child1", "c8y_Firmware") is False
    assert not target.exists()
    target.write_text("keep")
    assert directory.withdraw("child1", "c8y_Firmware") is True  # removes the link only
    assert target.read_text() == "keep"


def test_declare_into_a_file_or_a_directory_fails_cleanly(root: Path) -> None:
    (root / "afile").write_text("")
    directory = OperationsDirectory(root)
    with pytest.raises(StoreError, match="not a directory"):
        directory.declare("afile", "c8y_Firmware")
    (root / "child1" / "c8y_Firmware").mkdir(parents=True)
    with pytest.raises(StoreError):
        directory.withdraw("child1", "c8y_Firmware")
    assert (root / "child1" / "c8y_Firmware").is_dir()


@pytest.mark.parametrize(
    ("device", "operation"),
    [("..", "c8y_Firmware"), ("a/b", "c8y_Firmware"), ("+", "c8y_Firmware"), ("child1", "../../x"), ("child1", "c8y_Bad-Name"), ("child1", ""), ("gateway", "c8y_Firmware")],
)
def test_invalid_names_never_reach_the_disk(root: Path, device: str, operation: str) -> None:
    directory = OperationsDirectory(root, main_device_id="gateway")
    with pytest.raises(StoreError):
        directory.declare(device, operation)
    with pytest.raises(StoreError):
        directory.withdraw(device, operation)
    assert list(root.parent.parent.rglob("*")) == [root.parent, root]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only directory anyway")
def test_unwritable_root(root: Path) -> None:
    root.chmod(0o555)
    try:
        with pytest.raises(StoreError, match="cannot create"):
            OperationsDirectory(root).declare("child1", "c8y_Firmware")
    finally:
        root.chmod(0o755)


# --- watching ----------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def watching(watcher: OperationsWatcher) -> AsyncIterator[asyncio.Queue[None]]:
    ticks: asyncio.Queue[None] = asyncio.Queue()

    async def consume() -> None:
        async with contextlib.aclosing(watcher.changes()) as changes:
            async for tick in changes:
                ticks.put_nowait(tick)

    task = asyncio.create_task(consume())
    try:
        async with asyncio.timeout(5):
            await watcher.ready.wait()
        yield ticks
    finally:
        watcher.close()
        async with asyncio.timeout(2):  # close() ends it promptly, without a cancel
            await task


async def next_tick(ticks: asyncio.Queue[None], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        await ticks.get()


@pytest.mark.parametrize("polling", [False, True], ids=["notifications", "polling"])
async def test_one_tick_per_burst(root: Path, polling: bool) -> None:
    watcher = OperationsWatcher(OperationsDirectory(root), force_polling=polling, poll_delay_ms=50, resync=60)
    async with watching(watcher) as ticks:
        (root / "child1").mkdir()
        for index in range(40):
            (root / "child1" / f"c8y_Op{index}").touch()
        await next_tick(ticks)
        await asyncio.sleep(0.5)  # waiting for the absence of a tick has no event to await
        assert ticks.empty()
        (root / "child1" / "c8y_Op3").unlink()
        await next_tick(ticks)
    assert watcher.polling is polling


async def test_quiet_periods_tick_for_a_full_look(root: Path) -> None:
    watcher = OperationsWatcher(OperationsDirectory(root), resync=0.2)
    async with watching(watcher) as ticks:
        await next_tick(ticks, timeout=2)
        await next_tick(ticks, timeout=2)


async def test_removed_root_is_created_again_and_watched(root: Path) -> None:
    watcher = OperationsWatcher(OperationsDirectory(root), resync=60)  # every tick is a change
    async with watching(watcher) as ticks:
        shutil.rmtree(root)
        await next_tick(ticks)
        # The watch restarts on its own; changes made before it is back are not seen, so make
        # a change until one is.
        for attempt in range(50):
            with contextlib.suppress(FileNotFoundError):
                (root / f"c8y_Op{attempt}").touch()
            with contextlib.suppress(TimeoutError):
                await next_tick(ticks, timeout=0.2)
                break
        else:
            pytest.fail("no change seen after the directory was removed")
        assert stat.S_ISDIR(os.stat(root).st_mode)


@pytest.mark.parametrize("polling", [False, True], ids=["notifications", "polling"])
async def test_a_name_that_is_not_utf8_does_not_stop_the_watch(root: Path, polling: bool, caplog: pytest.LogCaptureFixture) -> None:
    # watchfiles cannot report such a path (it raises); the watch must go on regardless
    watcher = OperationsWatcher(OperationsDirectory(root), force_polling=polling, poll_delay_ms=50, resync=60)
    async with watching(watcher) as ticks:
        os.mkdir(os.fsencode(root) + b"/bad-\xff")
        await next_tick(ticks)
        for attempt in range(50):  # changes made while the watch restarts are not seen
            (root / f"c8y_Op{attempt}").touch()
            with contextlib.suppress(TimeoutError):
                await next_tick(ticks, timeout=0.3)
                break
        else:
            pytest.fail("the watch did not come back")
    assert watcher.polling is polling


async def test_close_ends_the_watch_within_a_step(root: Path) -> None:
    watcher = OperationsWatcher(OperationsDirectory(root), resync=60)
    async with watching(watcher):
        started = time.monotonic()
    assert time.monotonic() - started < 1.0


# --- unchanged child directories are not listed again (10,000 children) -------------------------


@pytest.fixture
def listings(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The directories each scan lists (ops_watch._entries, recorded)."""
    import tedge_firmware.shell.ops_watch as ops_watch

    seen: list[str] = []
    real = ops_watch._entries

    def recorded(directory: Path, unreadable: set[str]) -> list[os.DirEntry[str]]:
        seen.append(directory.name)
        return real(directory, unreadable)

    monkeypatch.setattr(ops_watch, "_entries", recorded)
    return seen


def later(seconds: float) -> float:
    return time.time() + seconds


def test_an_unchanged_child_directory_is_not_listed_again(root: Path, listings: list[str]) -> None:
    for child in ("child1", "child2"):
        (root / child).mkdir()
        (root / child / "c8y_Firmware").touch()
    directory = OperationsDirectory(root, clock=lambda: later(10))  # their changes are old news
    first = directory.scan()
    listings.clear()
    again = directory.scan()
    assert again == first and listings == ["c8y"]  # the root only
    (root / "child2" / "c8y_Restart").touch()  # an entry added: the directory changed
    listings.clear()
    assert names(directory.scan().children["child2"]) == ["c8y_Firmware", "c8y_Restart"]
    assert listings == ["c8y", "child2"]


def test_a_file_edited_in_an_unchanged_directory_is_seen(root: Path) -> None:
    (root / "child1").mkdir()
    (root / "child1" / "c8y_Firmware").touch()
    directory = OperationsDirectory(root, clock=lambda: later(10))
    assert names(directory.scan().children["child1"]) == ["c8y_Firmware"]
    (root / "child1" / "c8y_Firmware").write_text("not = [toml")  # in place: same directory
    assert names(directory.scan().children["child1"]) == []
    (root / "child1" / "c8y_Firmware").write_text("")
    assert names(directory.scan().children["child1"]) == ["c8y_Firmware"]


def test_a_directory_changed_within_the_clock_tick_is_listed_again(root: Path, listings: list[str]) -> None:
    # File times are coarse: an entry added within the tick of a listing leaves the directory's
    # times unchanged. A directory changed in the last seconds is therefore always listed.
    (root / "child1").mkdir()
    (root / "child1" / "c8y_Firmware").touch()
    directory = OperationsDirectory(root)  # the real clock: the change is fresh
    directory.scan()
    listings.clear()
    directory.scan()
    assert listings == ["c8y", "child1"]
