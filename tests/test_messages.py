"""firmware_update JSON messages and topic parsing, from tables (reference §1.4, §1.5)."""

from __future__ import annotations

import json

import pytest

from tedge_firmware.core import topics
from tedge_firmware.core.messages import (
    ChildStatus,
    FirmwareUpdateRequest,
    FirmwareUpdateResponse,
    parse_response,
)
from tedge_firmware.errors import MessageError, TopicError


def test_request_has_exactly_the_six_keys_in_wire_order() -> None:
    request = FirmwareUpdateRequest("op", 1, "fw", "1.0", "ab" * 32, "http://h:8000/x")
    text = request.to_json()
    assert text == (
        '{"id":"op","attempt":1,"name":"fw","version":"1.0","sha256":"'
        + "ab" * 32
        + '","url":"http://h:8000/x"}'
    )
    assert list(json.loads(text)) == ["id", "attempt", "name", "version", "sha256", "url"]


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b'{"status":"failed","id":"op-id","reason":"aaa"}', FirmwareUpdateResponse("op-id", ChildStatus.FAILED, "aaa")),
        (b'{"status":"failed","id":"op-id","reason":null}', FirmwareUpdateResponse("op-id", ChildStatus.FAILED, None)),
        (b'{"id":"x","status":"executing"}', FirmwareUpdateResponse("x", ChildStatus.EXECUTING)),
        (b'{"id":"x","status":"successful","extra":[1,2]}', FirmwareUpdateResponse("x", ChildStatus.SUCCESSFUL)),
        ('{"id":"é","status":"successful"}'.encode(), FirmwareUpdateResponse("é", ChildStatus.SUCCESSFUL)),
    ],
)
def test_valid_responses(payload: bytes, expected: FirmwareUpdateResponse) -> None:
    assert parse_response(payload) == expected


@pytest.mark.parametrize(
    "payload",
    [
        b'{"status":"successful"}',  # id missing
        b'{"id":"op-id"}',  # status missing
        b'{"id":"op-id","status":"invalid"}',
        b'{"id":"op-id","status":"failed","reason":00}',
        b'{"id":"op-id","status":"failed","reason":5}',
        b'{"id":5,"status":"failed"}',
        b'{"id":"","status":"failed"}',
        b'{"id":"x","status":["failed"]}',
        b'{"id":"x","status":"SUCCESSFUL"}',
        b"not json",
        b"",
        b"[]",
        b'"string"',
        b"\xff\xfe\x00garbage",
        b'{"id":"x","status":"failed","reason":"' + b"a" * 70_000 + b'"}',
        b"[" * 100_000,
    ],
)
def test_invalid_responses(payload: bytes) -> None:
    with pytest.raises(MessageError):
        parse_response(payload)


@pytest.mark.parametrize(
    ("topic", "child"),
    [
        ("tedge/child-device/commands/res/firmware_update", "child-device"),
        ("tedge/Ünïcode child/commands/res/firmware_update", "Ünïcode child"),
    ],
)
def test_child_id_from_topic(topic: str, child: str) -> None:
    assert topics.child_id_from_response_topic(topic) == child


@pytest.mark.parametrize(
    "topic",
    [
        "tedge//commands/res/firmware_update",
        "tedge/../commands/res/firmware_update",
        "tedge/a/b/commands/res/firmware_update",
        "tedge/child/commands/req/firmware_update",
        "other/child/commands/res/firmware_update",
        "tedge/" + "x" * 300 + "/commands/res/firmware_update",
    ],
)
def test_bad_response_topics(topic: str) -> None:
    with pytest.raises(TopicError):
        topics.child_id_from_response_topic(topic)


@pytest.mark.parametrize(
    "child",
    ["", " ", "+", "#", "a/b", "..", ".", "a\x00b", "tab\there", "a\\b", "\x85x", "a\x80", "a\x9f",
     "a\x7f", "\ufdd0", "\ufdef", "\ufffe", "\uffff", "\U0001ffff", "\U0010fffe", "\ud800"],
)
def test_invalid_child_ids(child: str) -> None:
    assert topics.child_id_problem(child) is not None
    with pytest.raises(TopicError):
        topics.validate_child_id(child)


@pytest.mark.parametrize("child", ["child-device", "child_1", "a.b", "..a", "ÜML", "\xa0nbsp", "\ufdcf", "\ufff0", "😀"])
def test_valid_child_ids(child: str) -> None:
    assert topics.child_id_problem(child) is None
