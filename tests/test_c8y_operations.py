"""Operations by id, the pure parts: the JSON operation decoder, the by-id SmartREST lines, the
state machine's lines by id, and operation records that remember the Cumulocity id."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tedge_firmware.core import smartrest
from tedge_firmware.core.c8y_operations import (
    MAX_PAYLOAD_BYTES,
    FirmwareOperation,
    Unusable,
    cannot_do,
    firmware_operations,
)
from tedge_firmware.core.operation import Event, FetchRecord, OperationRecord, State, step
from tedge_firmware.errors import StoreError

URL = "https://t1.example/inventory/binaries/51541"


def op(**changes: object) -> bytes:
    document: dict[str, object] = {
        "id": "123456",
        "status": "PENDING",
        "c8y_Firmware": {"name": "esp32", "version": "1.1.1", "url": URL},
        "externalSource": {"externalId": "gw:device:esp32-01", "type": "c8y_Serial"},
        **changes,
    }
    return json.dumps(document).encode()


def test_cumulocitys_operation_is_read() -> None:
    assert firmware_operations(op()) == [FirmwareOperation("123456", "gw:device:esp32-01", "esp32", "1.1.1", URL)]


def test_a_numeric_id_is_read_as_its_digits() -> None:
    [found] = firmware_operations(op(id=99))
    assert isinstance(found, FirmwareOperation) and found.c8y_id == "99"


def test_several_lines_in_order_and_other_operations_left_out() -> None:
    restart = json.dumps({"id": "2", "c8y_Restart": {}, "externalSource": {"externalId": "x", "type": "t"}})
    payload = b"\n".join([op(id="1"), restart.encode(), b"", op(id="3")])
    assert [found.c8y_id for found in firmware_operations(payload) if isinstance(found, FirmwareOperation)] == ["1", "3"]


def test_patches_say_what_they_apply_to() -> None:
    fragment = {"name": "p", "version": "2", "url": URL, "dependency": "1.0", "isPatch": True}
    [found] = firmware_operations(op(c8y_Firmware=fragment))
    assert isinstance(found, FirmwareOperation) and found.patch_of == "1.0"
    [found] = firmware_operations(op(c8y_Firmware={"name": "p", "version": "2", "url": URL, "isPatch": True}))
    assert isinstance(found, FirmwareOperation) and found.patch_of == "?"


@pytest.mark.parametrize(
    ("payload", "says"),
    [
        (b"\xff", "not UTF-8"),
        (b"x" * (MAX_PAYLOAD_BYTES + 1), "over"),
        (b'{"c8y_Firmware": {}, "id": ', "not JSON"),
        (b"[" * 20_000 + b"]" * 20_000, "not JSON"),
        (op(id="12a"), "'id'"),
        (op(id=True), "'id'"),
        (op(id="1" * 21), "'id'"),
        (op(externalSource={"type": "x"}), "externalId"),
        (op(externalSource="gw"), "externalId"),
        (op(c8y_Firmware=[1]), "not an object"),
        (op(c8y_Firmware={"name": "a", "version": 1, "url": URL}), "'c8y_Firmware.version'"),
        (op(c8y_Firmware={"name": "a", "version": "1"}), "'c8y_Firmware.url'"),
    ],
)
def test_unusable_firmware_operations_say_why(payload: bytes, says: str) -> None:
    [found] = firmware_operations(payload)
    assert isinstance(found, Unusable) and says in found.problem


@given(st.binary(max_size=400))
def test_any_payload_decodes_to_operations_or_problems(payload: bytes) -> None:
    for found in firmware_operations(payload):
        assert isinstance(found, FirmwareOperation | Unusable)
        if isinstance(found, FirmwareOperation):
            assert smartrest.is_operation_id(found.c8y_id)


@given(st.text(max_size=40), st.text(max_size=40), st.text(max_size=80))
def test_any_strings_in_the_fragment_round_trip(name: str, version: str, url: str) -> None:
    [found] = firmware_operations(op(c8y_Firmware={"name": name, "version": version, "url": url}))
    assert isinstance(found, FirmwareOperation) and (found.name, found.version, found.url) == (name, version, url)


def test_what_tedge_firmware_cannot_do() -> None:
    assert cannot_do("a", "1", URL, None) is None
    assert "patch" in str(cannot_do("a", "1", URL, "0.9"))
    assert "$PROVIDED" in str(cannot_do("a", "1", " $PROVIDED ", None))


# ---- lines by id ------------------------------------------------------------------------------


def test_lines_by_id() -> None:
    assert smartrest.set_executing_by_id("12") == "504,12\n"
    assert smartrest.set_successful_by_id("12") == "506,12\n"
    assert smartrest.set_failed_by_id("12", 'bad "x", y\nz') == '505,12,"bad ""x"", y z"\n'


@pytest.mark.parametrize(
    ("state", "event", "lines"),
    [
        (State.PENDING, Event.EXECUTING, ("504,7\n",)),
        (State.EXECUTING, Event.SUCCESSFUL, ("115,a", "506,7\n")),
        (State.PENDING, Event.SUCCESSFUL, ("504,7\n", "115,a", "506,7\n")),
        (State.EXECUTING, Event.FAILED, ('505,7,"disk"\n',)),
        (State.FETCHING, Event.ABORTED, ("504,7\n", '505,7,"timeout"\n')),
    ],
)
def test_the_state_machine_reports_by_id_when_it_has_one(state: State, event: Event, lines: tuple[str, ...]) -> None:
    reason = "disk" if event is Event.FAILED else "timeout"
    assert step(state, event, reason=reason, installed="115,a", c8y_id="7").to_cloud == lines


# ---- records ----------------------------------------------------------------------------------

RECORD = OperationRecord("op1", "child1", "fw", "1.0", URL, "http://gw/x", "ab" * 32, 1)


def test_a_record_without_an_id_keeps_thin_edges_eight_fields() -> None:
    assert list(json.loads(RECORD.to_json())) == [
        "operation_id", "child_id", "name", "version", "server_url", "file_transfer_url", "sha256", "attempt",
    ]  # fmt: skip


def test_records_remember_the_cumulocity_id() -> None:
    record = OperationRecord(**{**RECORD.__dict__, "c8y_id": "123"})
    assert OperationRecord.from_json(record.to_json()) == record
    fetch = FetchRecord("op1", "child1", "fw", "1.0", URL, 1, c8y_id="9")
    assert FetchRecord.from_json(fetch.to_json()) == fetch


@pytest.mark.parametrize("bad", ["12a", "", 12, None, "1" * 21])
def test_a_record_with_an_unusable_id_is_refused(bad: object) -> None:
    document = {**json.loads(RECORD.to_json()), "c8y_operation_id": bad}
    if bad is None:
        assert OperationRecord.from_json(json.dumps(document)).c8y_id is None
        return
    with pytest.raises(StoreError, match="c8y_operation_id"):
        OperationRecord.from_json(json.dumps(document))
