"""Connector internals without I/O (tables), plus its work-directory store and command helpers."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest

from tedge_firmware.connector._command import (
    Command,
    _parse_stat,
    failure_reason,
    is_running,
    last_error_line,
    launch,
    process_start,
    read_status,
    wait,
)
from tedge_firmware.connector._state import (
    TRANSITIONS,
    OperationRecord,
    Phase,
    ProcessIdentity,
    RequestAction,
    RestartAction,
    advance,
    decode_record,
    encode_record,
    expired,
    file_key,
    new_record,
    not_confirmed,
    on_request,
    on_restart,
)
from tedge_firmware.connector._store import Store
from tedge_firmware.core.firmware_update import FirmwareUpdateRequest
from tedge_firmware.errors import InvalidTransition
from tedge_firmware.shell.durable import sha256_of_file

SHA = "a" * 64


# ---- state ------------------------------------------------------------------------------------


def record(phase: Phase = Phase.RECEIVED, **changes: object) -> OperationRecord:
    base = new_record("c1", FirmwareUpdateRequest("op1", 1, "image", "1.0", SHA, "http://h/x"), now=100.0)
    return replace(base, phase=phase, **changes)  # type: ignore[arg-type]


@pytest.mark.parametrize("source", list(Phase))
@pytest.mark.parametrize("target", list(Phase))
def test_every_transition_pair(source: Phase, target: Phase) -> None:
    allowed = target in TRANSITIONS[source]
    if allowed:
        moved = advance(record(source, reported=True), target, now=200.0, reason="r")
        assert moved.phase is target and moved.updated_at == 200.0 and not moved.reported
        assert moved.reason == ("r" if target is Phase.FAILED else None)
    else:
        with pytest.raises(InvalidTransition):
            advance(record(source), target, now=200.0)


def test_every_unfinished_phase_can_fail_and_ended_phases_are_final() -> None:
    for phase in Phase:
        assert (Phase.FAILED in TRANSITIONS[phase]) is (not phase.ended)
    assert not TRANSITIONS[Phase.SUCCESSFUL] and not TRANSITIONS[Phase.FAILED]
    # an apply is never started twice, and a success is never reached without an apply
    assert [p for p in Phase if Phase.APPLYING in TRANSITIONS[p]] == [Phase.DOWNLOADED]
    assert [p for p in Phase if Phase.SUCCESSFUL in TRANSITIONS[p]] == [Phase.APPLYING]


def test_the_process_is_kept_only_while_applying() -> None:
    job = ProcessIdentity(10, 10, 5, "boot", 1.0)
    applying = advance(record(Phase.DOWNLOADED), Phase.APPLYING, now=1.0, process=job)
    assert applying.process == job
    assert advance(applying, Phase.SUCCESSFUL, now=2.0).process is None


@pytest.mark.parametrize(
    ("known", "running", "action"),
    [
        (None, False, RequestAction.START),
        (record(Phase.RECEIVED), True, RequestAction.ACKNOWLEDGE),
        (record(Phase.DOWNLOADING), True, RequestAction.ACKNOWLEDGE),
        (record(Phase.APPLYING), True, RequestAction.ACKNOWLEDGE),
        (record(Phase.DOWNLOADED), False, RequestAction.START),
        (record(Phase.SUCCESSFUL), False, RequestAction.REPORT_AGAIN),
        (record(Phase.FAILED), False, RequestAction.REPORT_AGAIN),
        (record(Phase.SUCCESSFUL), True, RequestAction.REPORT_AGAIN),
    ],
)
def test_on_request(known: OperationRecord | None, running: bool, action: RequestAction) -> None:
    assert on_request(known, running) is action


@pytest.mark.parametrize(
    ("phase", "reported", "action"),
    [
        (Phase.RECEIVED, False, RestartAction.RESUME),
        (Phase.DOWNLOADING, False, RestartAction.RESUME),
        (Phase.DOWNLOADED, False, RestartAction.RESUME),
        (Phase.APPLYING, False, RestartAction.SETTLE),
        (Phase.SUCCESSFUL, False, RestartAction.REPORT),
        (Phase.FAILED, False, RestartAction.REPORT),
        (Phase.SUCCESSFUL, True, RestartAction.NOTHING),
        (Phase.FAILED, True, RestartAction.NOTHING),
    ],
)
def test_on_restart(phase: Phase, reported: bool, action: RestartAction) -> None:
    assert on_restart(record(phase, reported=reported)) is action


@pytest.mark.parametrize(
    ("phase", "reported", "age", "gone"),
    [
        (Phase.SUCCESSFUL, True, 11.0, True),
        (Phase.SUCCESSFUL, True, 9.0, False),
        (Phase.SUCCESSFUL, False, 11.0, False),
        (Phase.APPLYING, True, 1e9, False),
        (Phase.FAILED, True, 11.0, True),
    ],
)
def test_expired(phase: Phase, reported: bool, age: float, gone: bool) -> None:
    assert expired(record(phase, reported=reported), now=100.0 + age, retention=10.0) is gone


def test_file_keys_are_safe_and_stable() -> None:
    assert file_key("tLrLthPXksKbqRqIsrDmy") == "tLrLthPXksKbqRqIsrDmy"
    for hostile in ("../../etc/passwd", "a/b", ".hidden", "x" * 65, "é", "a.b"):
        key = file_key(hostile)
        assert key.startswith("x-") and len(key) == 42 and key == file_key(hostile)
    assert file_key("a/b") != file_key("a/c")


def test_reasons() -> None:
    assert not_confirmed(record(), None) == "interrupted during apply; the verify step did not confirm image 1.0"
    assert not_confirmed(record(), "still 0.9") == "interrupted during apply; verify step: still 0.9"


def test_records_round_trip() -> None:
    for value in (record(), record(Phase.APPLYING, process=ProcessIdentity(1, 1, None, None, 2.5)), record(Phase.FAILED, reason="é")):
        assert decode_record(encode_record(value)) == value
    extra = json.loads(encode_record(record()))
    extra["future_field"] = 1
    assert decode_record(json.dumps(extra).encode()) == record()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.pop("sha256"), "no 'sha256'"),
        (lambda d: d.update(attempt="1"), "'attempt' has the wrong type"),
        (lambda d: d.update(attempt=True), "'attempt' has the wrong type"),
        (lambda d: d.update(reported=1), "'reported' has the wrong type"),
        (lambda d: d.update(phase="flashing"), "unknown phase"),
        (lambda d: d.update(process=[]), "'process' has the wrong type"),
        (lambda d: d.update(process={"pid": 1}), "process has no 'pgid'"),
    ],
)
def test_bad_records_are_refused(mutate, message: str) -> None:
    document = json.loads(encode_record(record()))
    mutate(document)
    with pytest.raises(ValueError, match=message):
        decode_record(json.dumps(document).encode())


@pytest.mark.parametrize("raw", [b"", b"\xff", b"[]", b"{", b"[" * 50_000])
def test_garbage_records_are_refused(raw: bytes) -> None:
    with pytest.raises(ValueError):
        decode_record(raw)


# ---- store ------------------------------------------------------------------------------------


def test_store_saves_loads_and_quarantines(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.prepare("c1")
    first = record()
    second = replace(record(Phase.DOWNLOADING), operation_id="../odd id")
    store.save(first)
    store.save(second)
    operations = tmp_path / "c1" / "operations"
    (operations / "junk.json").write_bytes(b"{broken")
    (operations / "moved.json").write_bytes(encode_record(first))  # a record under another name
    assert sorted(r.operation_id for r in store.load("c1")) == ["../odd id", "op1"]
    assert sorted(p.name for p in (operations / ".corrupt").iterdir()) == ["junk.json", "moved.json"]
    assert not list(operations.glob("*.tmp"))
    store.forget(first)
    assert [r.operation_id for r in store.load("c1")] == ["../odd id"]


def test_store_sweeps_files_of_operations_that_are_over(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.prepare("c1")
    kept = store.firmware("c1", "live")
    kept.write_bytes(b"x")
    kept.with_name(kept.name + ".part").write_bytes(b"x")
    gone = store.firmware("c1", "old")
    gone.with_name(gone.name + ".part.json").write_bytes(b"{}")
    files = store.step_files("c1", "old", "apply")
    files.err.write_text("e")
    store.sweep("c1", ["live"])
    assert sorted(p.name for p in kept.parent.iterdir()) == ["live.firmware", "live.firmware.part"]
    assert not files.err.exists()
    store.discard_files("c1", "live")
    assert not list(kept.parent.iterdir())


def test_hash_file(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"abc" * 1_000_000)
    import hashlib

    assert sha256_of_file(path) == hashlib.sha256(b"abc" * 1_000_000).hexdigest()


# ---- command helpers --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stat", "expected"),
    [
        ("1234 (sh) S 1 1234 1234 0 -1 4194560 1 2 3 4 5 6 7 8 20 0 1 0 987654 100 5\n", ("S", 987654)),
        ("1234 (a) (b) c) Z 1 1234 1234 0 -1 4194560 1 2 3 4 5 6 7 8 20 0 1 0 42 100 5", ("Z", 42)),
        ("garbage", ("?", None)),
    ],
)
def test_parse_stat(stat: str, expected: tuple[str, int | None]) -> None:
    assert _parse_stat(stat) == expected


def test_this_process_is_recognised_and_a_reused_pid_is_not() -> None:
    ticks, boot = process_start(os.getpid())
    assert ticks is not None and boot
    me = ProcessIdentity(os.getpid(), os.getpgid(0), ticks, boot, 0.0)
    assert is_running(me)
    assert not is_running(replace(me, start_ticks=ticks + 1))
    assert not is_running(replace(me, boot_id="another boot"))
    assert not is_running(replace(me, pid=2**22 + 7))


@pytest.mark.parametrize(
    ("status", "err", "reason"),
    [
        (0, "noise\n", None),
        (1, "first\nflash failed: bad block\n\n  \n", "flash failed: bad block"),
        (3, "", "apply command exited with status 3"),
        (137, "", "apply command exited with status 137 (signal 9)"),
        (None, "", "apply command ended without an exit status"),
        (2, "x" * 20_000 + "\nlast\twords\r\n", "last words"),
    ],
)
def test_failure_reason(tmp_path: Path, status: int | None, err: str, reason: str | None) -> None:
    path = tmp_path / "err"
    path.write_text(err)
    assert failure_reason("apply", status, path) == reason


def test_missing_output_files_are_no_reason(tmp_path: Path) -> None:
    assert last_error_line(tmp_path / "none") is None
    assert read_status(tmp_path / "none") is None
    (tmp_path / "bad").write_text("zero")
    assert read_status(tmp_path / "bad") is None


async def test_a_job_runs_detached_with_its_environment_and_records_its_status(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.prepare("c1")
    files = store.step_files("c1", "op", "apply")
    script = 'echo "out $FOO"; echo "err one" >&2; echo "err $FOO" >&2; exit 4'
    job = await launch(Command(script), {"FOO": "bar baz"}, files)
    assert job.pgid != os.getpgid(0)  # a session of its own: terminal signals do not reach it
    assert await wait(job, files, 10.0) == 4
    assert files.out.read_text() == "out bar baz\n"
    assert last_error_line(files.err) == "err bar baz"
    assert not is_running(job)


async def test_a_job_over_its_time_limit_is_stopped(tmp_path: Path) -> None:
    from tedge_firmware.connector._command import StepTimedOut

    store = Store(tmp_path)
    store.prepare("c1")
    files = store.step_files("c1", "op", "apply")
    job = await launch(Command(["sleep", "30"]), {}, files)
    with pytest.raises(StepTimedOut, match=r"timed out after 0\.3s"):
        await wait(job, files, 0.3)
    assert not is_running(job)
    assert read_status(files.status) is None


async def test_a_missing_program_fails_with_the_shells_message(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.prepare("c1")
    files = store.step_files("c1", "op", "apply")
    job = await launch(Command(["/nonexistent/flash"]), {}, files)
    status = await wait(job, files, 10.0)
    assert status == 127
    assert "/nonexistent/flash" in (failure_reason("apply", status, files.err) or "")


@pytest.mark.parametrize(("age", "gone"), [(11.0, True), (9.0, False)])
def test_an_unreported_te_command_record_expires_after_the_retention(age: float, gone: bool) -> None:
    from dataclasses import replace

    te_record = replace(record(Phase.SUCCESSFUL, reported=False), command={"status": "gateway_downloaded"})
    assert expired(te_record, now=100.0 + age, retention=10.0) is gone
    assert not expired(replace(te_record, phase=Phase.APPLYING), now=1e9, retention=10.0)
