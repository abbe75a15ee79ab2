"""Property-based tests: every decoder of outside data takes any input and raises nothing but its
own error type (or, where it promises so, nothing at all).

Inputs are random and adversarial: arbitrary bytes and text (surrogates and controls
included), text built from the characters each format cares about, huge numbers, deep
nesting. A failing example is shrunk by Hypothesis and printed.
"""

from __future__ import annotations

import contextlib
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tedge_firmware.core import firmware_update, http, resume, smartrest, topics, units, urls
from tedge_firmware.core import registration as reg
from tedge_firmware.core.config import KEYS, config_from_document, validate_value
from tedge_firmware.core.operation import FetchRecord, OperationRecord
from tedge_firmware.errors import (
    ConfigError,
    InputError,
    MessageError,
    SmartRestError,
    StoreError,
    TopicError,
)
from tedge_firmware.shell import file_transfer

settings.register_profile("decoders", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("decoders")

# --- adversarial inputs -------------------------------------------------------------------------

ANY_TEXT = st.text(st.characters(codec=None), max_size=200)  # surrogates and controls included
NUMBERS = st.one_of(st.integers(), st.just("9" * 5000), st.just("-" + "1" * 4301), st.just("1e999999"))


def made_of(alphabet: str, max_size: int = 120) -> st.SearchStrategy[str]:
    """Text from the characters a format gives meaning to, plus a few that break things."""
    return st.text(st.sampled_from(alphabet + "\x00\r\n\t\x85\ufffe\ud800é"), max_size=max_size)


SMARTREST_TEXT = st.one_of(ANY_TEXT, made_of('515,106,71,"\\\n\r abc'), st.just("515," + "x" * 10_000))
HEADER_TEXT = st.one_of(ANY_TEXT, made_of('bytes=-0123456789,*/ "W/:;=GMTMon, Jan 1970'), NUMBERS.map(str))


def json_values() -> st.SearchStrategy[object]:
    scalars = st.one_of(
        st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), ANY_TEXT
    )
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(ANY_TEXT, inner, max_size=4), max_leaves=12)


def json_payloads(keys: list[str]) -> st.SearchStrategy[bytes]:
    """JSON objects with the keys a format uses (and others), any values; plus raw bytes."""
    documents = st.dictionaries(st.sampled_from([*keys, "x"]), json_values(), max_size=len(keys) + 1)
    return st.one_of(
        documents.map(lambda d: json.dumps(d).encode()),
        st.binary(max_size=200),
        st.just(b"[" * 100_000),
        st.just(b'{"id":"a","status":"executing","x":' + b"9" * 5000 + b"}"),
        st.just(b'{"id":"a","attempt":' + b"9" * 5000 + b"}"),
    )


# --- SmartREST ----------------------------------------------------------------------------------


@given(SMARTREST_TEXT)
def test_smartrest_records_never_raise_but_their_own_error(text: str) -> None:
    for record in smartrest.split_records(text):
        smartrest.template_id(record)
        for parse in (smartrest.parse_fields, smartrest.parse_firmware_request, smartrest.parse_jwt_response, smartrest.parse_child_list):
            with contextlib.suppress(SmartRestError):
                parse(record)


@given(st.lists(st.one_of(ANY_TEXT, made_of('",\\\n')), max_size=5))
def test_smartrest_lines_we_write_read_back(fields: list[str]) -> None:
    # what we quote, a reader splits back into the same fields
    values = [field.replace("\r", "").replace("\n", " ") for field in fields]
    line = ",".join(["999", *(smartrest.quote_field(v) for v in values)])
    assert smartrest.parse_fields(line)[1:] == values or not values


# --- firmware_update messages (gateway and connector share them) -------------------------------------------


@given(json_payloads(["id", "status", "reason"]))
def test_child_responses_raise_only_message_errors(payload: bytes) -> None:
    with contextlib.suppress(MessageError):
        firmware_update.parse_response(payload)


@given(json_payloads(["id", "attempt", "name", "version", "sha256", "url"]))
def test_child_requests_never_raise(payload: bytes) -> None:
    parsed = firmware_update.parse_request(payload)
    assert isinstance(parsed, firmware_update.FirmwareUpdateRequest | firmware_update.BadRequest)


@given(
    st.builds(
        firmware_update.FirmwareUpdateRequest,
        operation_id=st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=40),
        attempt=st.integers(1, 2**31 - 1),
        # What a strict UTF-8 decode of a 515 can give: no NUL (refused), no lone surrogate.
        name=st.text(st.characters(blacklist_characters="\x00", blacklist_categories=["Cs"]), max_size=40),
        version=st.text(st.characters(blacklist_characters="\x00", blacklist_categories=["Cs"]), max_size=40),
        sha256=st.text("0123456789abcdef", min_size=64, max_size=64),
        url=st.from_regex(r"https?://[a-z][a-z0-9]{0,20}(:[0-9]{1,4})?/[a-z0-9/._-]{0,40}", fullmatch=True),
    )
)
def test_a_request_the_gateway_sends_is_the_request_a_child_reads(
    request: firmware_update.FirmwareUpdateRequest,
) -> None:
    assert firmware_update.parse_request(request.to_json().encode()) == request


# --- topics, child ids, registration ------------------------------------------------------------


@given(st.one_of(ANY_TEXT, made_of("tedge/commands/res/firmware_update+#.")))
def test_topics_and_child_ids(text: str) -> None:
    topics.child_id_problem(text)
    topics.mqtt_text_problem(text)
    try:
        child = topics.child_id_from_response_topic(text)
    except TopicError:
        return
    assert topics.mqtt_text_problem(topics.firmware_request_topic(child)) is None


@given(st.one_of(ANY_TEXT, made_of("te/device/cmd/+#.firmware_update_c8y")), json_payloads([]))
def test_registration_declarations_raise_only_input_errors(topic: str, payload: bytes) -> None:
    reg.child_dir_problem(topic)
    try:
        declaration = reg.parse_declaration(topic, payload, "main")
    except InputError:
        return
    if declaration.device is not None:
        assert topics.child_id_problem(declaration.device) is None


@given(st.binary(max_size=300) | SMARTREST_TEXT.map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_registration_cloud_lists_and_operation_files_never_raise(payload: bytes) -> None:
    reg.cloud_child_list(payload)
    reg.operation_file_problem(payload)


# --- HTTP semantics -----------------------------------------------------------------------------


@given(HEADER_TEXT, st.integers(min_value=0, max_value=2**63))
def test_http_headers_never_raise(value: str, size: int) -> None:
    http.parse_byte_range(value, size)
    http.parse_http_date(value)
    http.if_range_allows(value, '"etag"', 1_700_000_000.0)
    http.is_not_modified(value, value, '"etag"', 1_700_000_000.0)
    now = datetime(2026, 1, 1, tzinfo=UTC)
    http.parse_retry_after(value, now)
    http.parse_content_length(value)
    http.parse_content_range(value)
    headers = {"ETag": value, "Last-Modified": value, "Repr-Digest": value, "Digest": value, "x-amz-checksum-sha256": value, "Content-Length": value, "Content-Range": value}
    http.resume_validator(headers)
    http.declared_sha256(headers)
    for status in (200, 206, 416):
        resume.resume_decision(status, headers, size, validator=value, expected_total=size or None)


@given(st.one_of(ANY_TEXT, made_of("/tedge/file-transfer/%2e./\\")))
def test_request_paths_raise_only_bad_request(path: str) -> None:
    with contextlib.suppress(file_transfer.web.HTTPBadRequest):
        file_transfer.url_segments(path)


@given(st.binary(max_size=400), ANY_TEXT, st.one_of(st.none(), st.integers(min_value=0, max_value=2**70)))
def test_resume_records_never_raise(raw: bytes, url: str, part_size: int | None) -> None:
    resume.decode_resume_state(raw)
    resume.plan_restart(raw, url=url, part_size=part_size)


# --- URLs, sizes, config, our own files ---------------------------------------------------------


@given(st.one_of(ANY_TEXT, made_of("http:s//[]@:%.a-b0123456789?#"), st.just("http://" + "a." * 200 + "b/")))
def test_firmware_urls_never_raise(url: str) -> None:
    urls.firmware_url_problem(url)


@given(st.one_of(ANY_TEXT, made_of("0123456789.kKMGTiBb "), NUMBERS.map(str)))
def test_sizes_raise_only_value_errors(text: str) -> None:
    with contextlib.suppress(ValueError):
        units.parse_size(text)


@pytest.mark.parametrize("key", [spec.name for spec in KEYS])
@given(value=st.one_of(json_values(), NUMBERS))
def test_config_values_raise_only_config_errors(key: str, value: object) -> None:
    with contextlib.suppress(ConfigError):
        validate_value(key, value)


@given(st.dictionaries(st.sampled_from(["mqtt", "http", "c8y", "device", "data", "firmware", "x"]), json_values(), max_size=4))
def test_config_documents_raise_only_config_errors(document: dict[str, object]) -> None:
    with contextlib.suppress(ConfigError):
        config_from_document(document, {}, Path("/etc/tedge"), "/etc/tedge/tedge.toml")


@given(json_payloads(["operation_id", "child_id", "name", "version", "server_url", "file_transfer_url", "sha256", "attempt", "state", "to_cloud"]))
def test_operation_files_raise_only_store_errors(raw: bytes) -> None:
    for parse in (OperationRecord.from_json, FetchRecord.from_json):
        with contextlib.suppress(StoreError):
            parse(raw)
