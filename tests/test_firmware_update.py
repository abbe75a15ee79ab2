"""firmware_update JSON messages both ways and their topics, from tables (reference §1.4, §1.5)."""

from __future__ import annotations

import json

import pytest

from tedge_firmware.core import topics
from tedge_firmware.core.firmware_update import (
    MAX_PAYLOAD_BYTES,
    BadRequest,
    ChildStatus,
    FirmwareUpdateRequest,
    FirmwareUpdateResponse,
    parse_request,
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


SHA = "a" * 64
GOOD = {"id": "op1", "attempt": 2, "name": "image", "version": "1.0", "sha256": SHA, "url": "http://127.0.0.1:8000/tedge/file-transfer/c/firmware_update/x"}


def payload(**changes: object) -> bytes:
    document = {**GOOD, **changes}
    return json.dumps({k: v for k, v in document.items() if v is not ...}).encode()


# ---- requests ---------------------------------------------------------------------------------


def test_a_good_request_parses() -> None:
    assert parse_request(payload()) == FirmwareUpdateRequest("op1", 2, "image", "1.0", SHA, GOOD["url"])


def test_defaults_and_normalisation() -> None:
    parsed = parse_request(payload(attempt=..., name=..., version=..., sha256="AB" * 32, extra=[1]))
    assert parsed == FirmwareUpdateRequest("op1", 1, "", "", "ab" * 32, GOOD["url"])


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"\xff\xfe", BadRequest(None, "payload is not UTF-8")),
        (b"{not json", BadRequest(None, "payload is not JSON: ")),
        (b"[" * 100_000 + b"]" * 100_000, BadRequest(None, f"payload of 200000 bytes exceeds {MAX_PAYLOAD_BYTES}")),
        (b"[" * 30_000 + b"]" * 30_000, BadRequest(None, "payload is not JSON: ")),
        (b"[1,2]", BadRequest(None, "payload is not a JSON object")),
        (b"null", BadRequest(None, "payload is not a JSON object")),
        (b"", BadRequest(None, "payload is not JSON: ")),
        (payload(id=...), BadRequest(None, "'id' is missing or not a short printable string")),
        (payload(id=7), BadRequest(None, "'id' is missing or not a short printable string")),
        (payload(id=""), BadRequest(None, "'id' is missing or not a short printable string")),
        (payload(id="a\nb"), BadRequest(None, "'id' is missing or not a short printable string")),
        (payload(id=" a"), BadRequest(None, "'id' is missing or not a short printable string")),
        (payload(id="x" * 257), BadRequest(None, "'id' is missing or not a short printable string")),
        (payload(attempt="1"), BadRequest("op1", "'attempt' is not an integer")),
        (payload(attempt=True), BadRequest("op1", "'attempt' is not an integer")),
        (payload(attempt=1.0), BadRequest("op1", "'attempt' is not an integer")),
        (payload(attempt=0), BadRequest("op1", "'attempt' 0 is out of range")),
        (payload(attempt=2**40), BadRequest("op1", f"'attempt' {2**40} is out of range")),
        (payload(name=5), BadRequest("op1", "'name' is not a string")),
        (payload(version=None), BadRequest("op1", "'version' is not a string")),
        (payload(name="a\0b"), BadRequest("op1", "'name' contains a NUL character")),
        (payload(sha256=...), BadRequest("op1", "'sha256' is missing: the firmware cannot be verified")),
        (payload(sha256=None), BadRequest("op1", "'sha256' is missing: the firmware cannot be verified")),
        (payload(sha256="abc"), BadRequest("op1", "'sha256' is not 64 hexadecimal digits")),
        (payload(sha256="g" * 64), BadRequest("op1", "'sha256' is not 64 hexadecimal digits")),
        (payload(sha256=["a"]), BadRequest("op1", "'sha256' is not 64 hexadecimal digits")),
        (payload(url=...), BadRequest("op1", "'url' is missing or not a string")),
        (payload(url=""), BadRequest("op1", "'url' is missing or not a string")),
        (payload(url="ftp://host/x"), BadRequest("op1", "'url' is an invalid url: ")),
        (payload(url="http:///x"), BadRequest("op1", "'url' is an invalid url: ")),
        (payload(url="/relative"), BadRequest("op1", "'url' is an invalid url: ")),
        (payload(url="http://h:99999/x"), BadRequest("op1", "'url' is an invalid url: ")),
        (payload(url="http://[::1/x"), BadRequest("op1", "'url' is an invalid url: ")),
        (payload(url="http://h/a b"), BadRequest("op1", "'url' contains spaces")),
        (payload(url="http://h/\r\nx"), BadRequest("op1", "'url' is an invalid url: it contains control characters")),
    ],
)
def test_hostile_requests_are_described_never_raised(raw: bytes, expected: BadRequest) -> None:
    parsed = parse_request(raw)
    assert isinstance(parsed, BadRequest)
    assert parsed.operation_id == expected.operation_id
    # A problem ending in ": " is followed by the parser's own detail.
    assert parsed.problem.startswith(expected.problem) if expected.problem.endswith(": ") else parsed.problem == expected.problem


def test_any_http_host_is_allowed() -> None:
    parsed = parse_request(payload(url="https://cdn.example.com:8443/fw.bin?sig=1"))
    assert isinstance(parsed, FirmwareUpdateRequest) and parsed.url == "https://cdn.example.com:8443/fw.bin?sig=1"


@pytest.mark.parametrize(
    ("topic", "addressee"),
    [
        ("tedge/c1/commands/req/firmware_update", ("c1", "c1")),
        ("tedge/gw:device:c1/commands/req/firmware_update", ("c1", "gw:device:c1")),
        ("tedge/a:b:device:c1/commands/req/firmware_update", ("c1", "a:b:device:c1")),
        ("tedge/gw:device:c2/commands/req/firmware_update", None),
        ("tedge/gw:device:c1x/commands/req/firmware_update", None),
        ("tedge/gw:c1/commands/req/firmware_update", None),
        ("tedge/c2/commands/req/firmware_update", None),
        ("tedge/c1/commands/res/firmware_update", None),
        ("tedge/c1/x/commands/req/firmware_update", None),
        ("tedge/x/gw:device:c1/commands/req/firmware_update", None),
        ("te/c1/commands/req/firmware_update", None),
    ],
)
def test_request_addressee(topic: str, addressee: tuple[str, str] | None) -> None:
    assert topics.request_addressee(topic, ("c1",)) == addressee


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("op", "executing"), '{"id":"op","status":"executing"}'),
        (("op", "successful", "ignored"), '{"id":"op","status":"successful"}'),
        (("op", "failed", "flash\nerror"), '{"id":"op","status":"failed","reason":"flash error"}'),
        (("op", "failed", None), '{"id":"op","status":"failed","reason":"failed"}'),
        (("é", "failed", "ünïcode, \"quoted\""), '{"id":"é","status":"failed","reason":"ünïcode, \\"quoted\\""}'),
    ],
)
def test_status_messages(args: tuple[str, ...], expected: str) -> None:
    operation_id, status, *reason = args
    response = FirmwareUpdateResponse(operation_id, ChildStatus(status), *reason)
    assert response.to_json() == expected


def test_declaration_topic() -> None:
    assert topics.firmware_declaration_topic("c1") == "te/device/c1///cmd/firmware_update"
