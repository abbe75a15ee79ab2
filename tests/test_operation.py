"""The operation record and the state machine, walked from tables."""

from __future__ import annotations

import dataclasses
import itertools
import json

import pytest

from tedge_firmware.core.operation import (
    NO_REASON,
    RECORD_FIELDS,
    Event,
    OperationRecord,
    State,
    step,
    timeout_reason,
)
from tedge_firmware.errors import InvalidTransition, StoreError

E501 = "501,c8y_Firmware\n"
E503 = "503,c8y_Firmware,\n"
I115 = "115,fw,1.0,http://u"


def f502(reason: str) -> str:
    return f'502,c8y_Firmware,"{reason}"\n'


TABLE = [
    (State.FETCHING, Event.READY, None, State.PENDING, ()),
    (State.FETCHING, Event.RESENT, None, State.FETCHING, ()),
    (State.FETCHING, Event.ABORTED, "Download failed", State.FAILED, (E501, f502("Download failed"))),
    # the download waits for its window: Cumulocity hears EXECUTING at once, and only once
    (State.FETCHING, Event.WAITING, None, State.WAITING, (E501,)),
    (State.WAITING, Event.WAITING, None, State.WAITING, ()),
    (State.WAITING, Event.RESENT, None, State.WAITING, ()),
    (State.WAITING, Event.READY, None, State.EXECUTING, ()),
    (State.WAITING, Event.ABORTED, "Download failed", State.FAILED, (f502("Download failed"),)),
    (State.PENDING, Event.RESENT, None, State.PENDING, ()),
    (State.PENDING, Event.EXECUTING, None, State.EXECUTING, (E501,)),
    (State.PENDING, Event.SUCCESSFUL, None, State.SUCCESSFUL, (E501, I115, E503)),
    (State.PENDING, Event.FAILED, None, State.FAILED, (E501, f502(NO_REASON))),
    (State.PENDING, Event.FAILED, "disk full", State.FAILED, (E501, f502("disk full"))),
    (State.PENDING, Event.ABORTED, "timed out", State.FAILED, (E501, f502("timed out"))),
    (State.EXECUTING, Event.RESENT, None, State.EXECUTING, ()),
    (State.EXECUTING, Event.EXECUTING, None, State.EXECUTING, ()),
    (State.EXECUTING, Event.SUCCESSFUL, None, State.SUCCESSFUL, (I115, E503)),
    (State.EXECUTING, Event.FAILED, "  ", State.FAILED, (f502(NO_REASON),)),
    (State.EXECUTING, Event.FAILED, "flash error", State.FAILED, (f502("flash error"),)),
    (State.EXECUTING, Event.ABORTED, "timed out", State.FAILED, (f502("timed out"),)),
]


@pytest.mark.parametrize(("state", "event", "reason", "after", "cloud"), TABLE)
def test_transitions(state, event, reason, after, cloud) -> None:
    outcome = step(state, event, reason=reason, installed=I115)
    assert outcome.state is after
    assert outcome.to_cloud == cloud


ALLOWED = {(state, event) for state, event, *_ in TABLE}


@pytest.mark.parametrize(
    ("state", "event"),
    [pair for pair in itertools.product(State, Event) if pair not in ALLOWED],
)
def test_every_other_pair_is_refused(state: State, event: Event) -> None:
    with pytest.raises(InvalidTransition):
        step(state, event, installed=I115)


def test_timeout_reason_text() -> None:
    assert timeout_reason("child-device", 1, "abc") == (
        "Child device child-device did not respond within the timeout interval of 1sec. "
        "Operation ID=abc"
    )


RECORD = OperationRecord(
    operation_id="abc",
    child_id="child-device",
    name="fw-name",
    version="fw-version",
    cloud_url="http://test.domain.com",
    child_url="http://127.0.0.1:8765/tedge/file-transfer/child-device/firmware_update/f6a5",
    sha256="e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    attempt=1,
)


def test_record_round_trips_with_the_reference_layout() -> None:
    text = RECORD.to_json()
    assert text.startswith('{"operation_id":"abc","child_id":"child-device","name":"fw-name",')
    assert text.endswith(',"attempt":1}')
    assert OperationRecord.from_json(text) == RECORD


@pytest.mark.parametrize(
    "text",
    [
        "",
        "{",
        "[]",
        RECORD.to_json().replace('"attempt":1', '"attempt":1,"extra":2'),
        RECORD.to_json().replace(',"attempt":1', ""),
        RECORD.to_json().replace('"attempt":1', '"attempt":"1"'),
        RECORD.to_json().replace('"attempt":1', '"attempt":true'),
        RECORD.to_json().replace('"attempt":1', '"attempt":-1'),
        RECORD.to_json().replace('"name":"fw-name"', '"name":null'),
        b"\xff\xfe",
        # our own two fields, when they do not make sense
        RECORD.to_json().replace('"attempt":1', '"attempt":1,"state":"fetching","to_cloud":[]'),
        RECORD.to_json().replace('"attempt":1', '"attempt":1,"state":"done","to_cloud":[]'),
        RECORD.to_json().replace('"attempt":1', '"attempt":1,"state":1,"to_cloud":[]'),
        RECORD.to_json().replace('"attempt":1', '"attempt":1,"state":"executing","to_cloud":["501,c8y_Firmware"]'),
        RECORD.to_json().replace('"attempt":1', '"attempt":1,"state":"failed","to_cloud":"502"'),
        RECORD.to_json().replace('"attempt":1', '"attempt":1,"state":"failed","to_cloud":[1]'),
        RECORD.to_json().replace('"attempt":1', '"attempt":1,"state":"failed","to_cloud":' + json.dumps(["x"] * 9)),
        RECORD.to_json().replace('"attempt":1', '"attempt":1,"state":"failed","to_cloud":["' + "x" * 5000 + '"]'),
    ],
)
def test_corrupt_records_are_store_errors(text: str | bytes) -> None:
    with pytest.raises(StoreError):
        OperationRecord.from_json(text)


def test_a_pending_record_stays_byte_for_byte_thin_edges() -> None:
    # thin-edge reads its operation files with deny_unknown_fields: ours add fields only once
    # the operation is announced or ended
    assert set(json.loads(RECORD.to_json())) == set(RECORD_FIELDS)


@pytest.mark.parametrize(
    ("state", "to_cloud"),
    [
        (State.EXECUTING, ()),
        (State.SUCCESSFUL, ("501,c8y_Firmware\n", I115, "503,c8y_Firmware,\n")),
        (State.FAILED, ('502,c8y_Firmware,"a, \\"quoted\\" reason"\n',)),
        (State.FAILED, ()),
    ],
)
def test_progress_round_trips(state: State, to_cloud: tuple[str, ...]) -> None:
    record = dataclasses.replace(RECORD, state=state, to_cloud=to_cloud)
    text = record.to_json()
    assert json.loads(text)["state"] == state.value
    assert OperationRecord.from_json(text) == record


def test_file_id_is_the_reference_key() -> None:
    from tedge_firmware.core.operation import file_id_for_url

    assert file_id_for_url("http://test.domain.com") == (
        "f6a5105230c19daee36d739d678ecc59ee0d5c99749138aedc65934a7f31cbf4"
    )


def test_operation_ids_are_nanoid_shaped() -> None:
    import re

    from tedge_firmware.core.operation import new_operation_id

    ids = {new_operation_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(re.fullmatch(r"[_\-0-9a-zA-Z]{21}", op_id) for op_id in ids)
