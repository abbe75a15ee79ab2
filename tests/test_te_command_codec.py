"""The `te/` firmware_update command codec (core.firmware_update, second half): topics,
payloads read from the broker (hostile ones too), and the whole-payload moves a participant
publishes."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tedge_firmware.core.firmware_update import (
    MAX_PAYLOAD_BYTES,
    TeCommand,
    parse_te_command,
    parse_te_command_topic,
    te_state_problem,
)
from tedge_firmware.errors import MessageError

MAPPER_INIT = {
    "status": "init",
    "tedgeUrl": "http://127.0.0.1:8001/c8y/inventory/binaries/51541",
    "remoteUrl": "https://t123.example.com/inventory/binaries/51541",
    "name": "esp32-tedge",
    "version": "1.1.1",
}


def command(**fields: object) -> TeCommand:
    parsed = parse_te_command(json.dumps({**MAPPER_INIT, **fields}).encode())
    assert parsed is not None
    return parsed


# ---- topics -------------------------------------------------------------------------------


def test_a_child_command_topic_names_its_entity_device_and_id() -> None:
    parsed = parse_te_command_topic("te/device/esp32-01///cmd/firmware_update/c8y-mapper-123456")
    assert (parsed.entity, parsed.cmd_id, parsed.device_name) == (
        "device/esp32-01//",
        "c8y-mapper-123456",
        "esp32-01",
    )
    assert parsed.topic == "te/device/esp32-01///cmd/firmware_update/c8y-mapper-123456"


@pytest.mark.parametrize(
    "entity",
    ["device/child1/service/agent", "device///", "factory/child1//", "device/child1/x/"],
)
def test_an_entity_other_than_a_device_has_no_device_name(entity: str) -> None:
    assert parse_te_command_topic(f"te/{entity}/cmd/firmware_update/1").device_name is None


@pytest.mark.parametrize(
    "topic",
    [
        "te/device/child1///cmd/firmware_update",  # the capability, not a command
        "te/device/child1///cmd/firmware_update/",  # empty id
        "te/device/child1///cmd/firmware_update/..",
        "te/device/child1///cmd/restart/1",
        "te/device/child1//cmd/firmware_update/1",  # three entity levels
        "te/device/child1////cmd/firmware_update/1",
        "tedge/child1/commands/req/firmware_update",
        "te/device/child1///cmd/firmware_update/a/b",
        "te/device/child1///cmd/firmware_update/" + "x" * 300,
        "te/device/child1///cmd/firmware_update/id\x00",
        "te/device/child1///cmd/firmware_update/ id",
        "",
    ],
)
def test_other_topics_are_refused_with_a_message_error(topic: str) -> None:
    with pytest.raises(MessageError):
        parse_te_command_topic(topic)


@given(st.text(max_size=120))
def test_any_topic_parses_or_raises_message_error(topic: str) -> None:
    try:
        parsed = parse_te_command_topic(topic)
    except MessageError:
        return
    assert parsed.topic == topic


# ---- payloads in ----------------------------------------------------------------------------


def test_the_empty_payload_is_a_cleared_command() -> None:
    assert parse_te_command(b"") is None


def test_the_mappers_payload_is_read_whole() -> None:
    parsed = command()
    assert parsed.status == "init"
    assert parsed.fields == MAPPER_INIT
    download = parsed.download()
    assert download.source_url("127.0.0.1", 8001) == MAPPER_INIT["tedgeUrl"]  # thin-edge's proxy
    assert download.remote_url == MAPPER_INIT["remoteUrl"]
    assert (download.name, download.version) == ("esp32-tedge", "1.1.1")


def test_without_tedge_url_the_remote_url_is_fetched() -> None:
    fields = {k: v for k, v in MAPPER_INIT.items() if k != "tedgeUrl"}
    parsed = parse_te_command(json.dumps(fields).encode())
    assert parsed is not None
    assert parsed.download().source_url("127.0.0.1", 8001) == MAPPER_INIT["remoteUrl"]


@pytest.mark.parametrize(
    "tedge_url",
    [
        "http://evil.example:8001/c8y/inventory/binaries/51541",  # another host
        "http://127.0.0.1:8002/c8y/inventory/binaries/51541",  # another port
        "http://127.0.0.1:8001/c8y/inventory/binaries/666",  # another file
        "http://127.0.0.1:8001/inventory/binaries/51541",  # not through the proxy
        "http://127.0.0.1:8001/c8y/inventory/binaries/51541?x=1",  # another query
        "http://127.0.0.1:8001:99/c8y/inventory/binaries/51541",  # no port at all
        "file:///c8y/inventory/binaries/51541",
        "",
    ],
)
def test_a_tedge_url_that_is_not_the_proxy_for_the_remote_url_is_not_fetched(tedge_url: str) -> None:
    # the file is cached under remoteUrl: other bytes must never land under its name
    assert command(tedgeUrl=tedge_url).download().source_url("127.0.0.1", 8001) == MAPPER_INIT["remoteUrl"]


@pytest.mark.parametrize(
    ("remote", "proxied", "proxy"),
    [
        ("https://t1.example/inventory/binaries/7", "https://[::1]:8443/c8y/inventory/binaries/7", ("::1", 8443)),
        ("https://t1.example", "http://gw.local:80/c8y/", ("GW.local", 80)),
        ("https://t1.example/a?b=1", "http://127.0.0.1:8001/c8y/a?b=1", ("127.0.0.1", 8001)),
    ],
)
def test_the_proxy_url_is_fetched_in_its_forms(remote: str, proxied: str, proxy: tuple[str, int]) -> None:
    download = command(remoteUrl=remote, tedgeUrl=proxied).download()
    assert download.source_url(*proxy) == proxied


@pytest.mark.parametrize(
    ("payload", "says"),
    [
        (b"\xff\xfe", "not UTF-8"),
        (b"{", "not JSON"),
        (b"[]", "not a JSON object"),
        (b'"init"', "not a JSON object"),
        (b"{}", "'status'"),
        (b'{"status":3}', "'status'"),
        (b'{"status":""}', "'status'"),
        (b'{"status":"a\\u0000b"}', "'status'"),
        (b'{"status":"init","x":NaN}', "not JSON"),
        (b'{"status":"init","x":-Infinity}', "not JSON"),
        (b'{"status":"init","x":1e999}', "not JSON"),
        (b'{"status":"init","x":' + b"9" * 5000 + b"}", "not JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "exceeds"),
        (b'{"status":"init","a":' + b"[" * 10_000 + b"]" * 10_000 + b"}", "not JSON"),
        (b'{"status":"' + b"x" * MAX_PAYLOAD_BYTES + b'"}', "exceeds"),
    ],
)
def test_hostile_payloads_are_refused_with_what_is_wrong(payload: bytes, says: str) -> None:
    with pytest.raises(MessageError, match=says):
        parse_te_command(payload)


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"remoteUrl": None}, "'remoteUrl' is missing"),
        ({"remoteUrl": 5}, "'remoteUrl' is missing"),
        ({"name": ["x"]}, "'name' is missing"),
        ({"version": None}, "'version' is missing"),
        ({"remoteUrl": "ftp://host/fw"}, "'remoteUrl'"),
        ({"remoteUrl": "$PROVIDED"}, "'remoteUrl'"),
        ({"remoteUrl": "http://a b/fw"}, "'remoteUrl'"),
        ({"tedgeUrl": 8001}, "'tedgeUrl' is not a string"),
    ],
)
def test_a_download_needs_usable_urls_name_and_version(fields: dict[str, object], says: str) -> None:
    with pytest.raises(MessageError, match=says):
        command(**fields).download()


# ---- moves out ------------------------------------------------------------------------------


def test_a_move_keeps_every_field_in_order_and_adds_new_ones_at_the_end() -> None:
    parsed = command(logPath="/var/log/fw.log", custom={"a": [1, 2.5, None, True]})
    moved = json.loads(
        parsed.moved_to("gateway_downloaded", tedgeUrl="http://gw:8000/x", sha256="ab" * 32, size=7)
    )
    assert list(moved) == [*MAPPER_INIT, "logPath", "custom", "sha256", "size"]
    assert moved["status"] == "gateway_downloaded"
    assert moved["tedgeUrl"] == "http://gw:8000/x"  # replaced in place
    assert moved["custom"] == {"a": [1, 2.5, None, True]}
    assert (moved["remoteUrl"], moved["name"]) == (MAPPER_INIT["remoteUrl"], "esp32-tedge")


def test_a_failure_keeps_the_payload_and_says_why_on_one_line() -> None:
    moved = json.loads(command(extra=1).failed("Download from x failed\nwith 404"))
    assert moved["status"] == "failed"
    assert moved["reason"] == "Download from x failed with 404"
    assert moved["extra"] == 1


def test_a_lone_surrogate_in_a_field_is_written_back_escaped_as_it_came() -> None:
    parsed = parse_te_command(b'{"status":"init","note":"\\ud800 \\u00e9"}')
    assert parsed is not None
    moved = parsed.moved_to("next")
    moved.encode("utf-8")  # publishable
    again = parse_te_command(moved.encode())
    assert again is not None and again.fields["note"] == "\ud800 \u00e9"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@given(st.dictionaries(st.text(max_size=10), json_values, max_size=8), st.sampled_from(["a_b", "failed"]))
def test_a_move_changes_status_and_nothing_else(fields: dict[str, object], status: str) -> None:
    original = parse_te_command(json.dumps({**fields, "status": "gateway_download"}).encode())
    assert original is not None
    moved = parse_te_command(original.moved_to(status).encode())
    assert moved is not None
    assert moved.status == status
    assert {k: v for k, v in moved.fields.items() if k != "status"} == {
        k: v for k, v in original.fields.items() if k != "status"
    }


@given(st.binary(max_size=300))
def test_any_bytes_parse_or_raise_message_error(payload: bytes) -> None:
    try:
        parsed = parse_te_command(payload)
    except MessageError:
        return
    assert parsed is None or isinstance(parsed.status, str)


# ---- state names ----------------------------------------------------------------------------


@pytest.mark.parametrize("state", ["gateway_download", "gateway_downloaded", "fw-cache2"])
def test_own_state_names(state: str) -> None:
    assert te_state_problem(state) is None


@pytest.mark.parametrize(
    "state", ["init", "executing", "successful", "failed", "scheduled", "", "Upper", "a b", "a/b", "x" * 65]
)
def test_states_that_cannot_be_ours(state: str) -> None:
    assert te_state_problem(state) is not None
