"""The simulator's model of thin-edge's mapper (firmware_update only), decision by decision."""

from __future__ import annotations

import json

from tedge_firmware.sim import ThinEdgeMapperModel

CMD = "te/device/c1///cmd/firmware_update/c8y-mapper-12"
OPERATION = {
    "id": "12",
    "c8y_Firmware": {"name": "img", "version": "1", "url": "http://h/x"},
    "externalSource": {"externalId": "gw:device:c1", "type": "c8y_Serial"},
}


def decide(model: ThinEdgeMapperModel, topic: str, payload: object) -> list[tuple[str, str, bool]]:
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return [(out.topic, out.payload, out.retain) for out in model.decide(topic, data)]


def command(status: str, **extra: object) -> dict[str, object]:
    return {"status": status, "remoteUrl": "http://h/x", "name": "img", "version": "1", **extra}


def test_a_capability_registers_the_child_once_with_thin_edges_external_id() -> None:
    model = ThinEdgeMapperModel("gw")
    expected = [
        ("c8y/s/us", "101,gw:device:c1,c1,thin-edge.io-child", False),
        ("c8y/s/us/gw:device:c1", "114,c8y_Firmware\n", False),
    ]
    assert decide(model, "te/device/c1///cmd/firmware_update", {}) == expected
    assert decide(model, "te/device/c1///cmd/firmware_update", {}) == []
    assert decide(model, "te/device/main///cmd/firmware_update", {}) == []


def test_a_json_operation_for_a_te_child_becomes_a_retained_command_once() -> None:
    model = ThinEdgeMapperModel("gw")
    [(topic, payload, retain)] = decide(model, "c8y/devicecontrol/notifications", OPERATION)
    assert (topic, retain) == (CMD, True)
    assert json.loads(payload) == {**command("init"), "tedgeUrl": "http://h/x"}
    assert decide(model, "c8y/devicecontrol/notifications", OPERATION) == []  # re-delivered
    legacy = {**OPERATION, "id": "13", "externalSource": {"externalId": "c2", "type": "t"}}
    assert decide(model, "c8y/devicecontrol/notifications", legacy) == []  # the plugin's


def test_the_childs_states_are_reported_by_id_and_the_command_cleared_at_the_end() -> None:
    model = ThinEdgeMapperModel("gw")
    up = "c8y/s/us/gw:device:c1"
    assert decide(model, CMD, command("executing")) == [(up, "504,12\n", False)]
    assert decide(model, CMD, command("gateway_download")) == []
    assert decide(model, CMD, command("successful")) == [
        (up, "506,12\n", False),
        ("te/device/c1///twin/firmware", json.dumps({"name": "img", "version": "1", "url": "http://h/x"}), True),
        (CMD, "", True),
    ]
    assert decide(model, CMD, command("failed", reason="flash")) == [(up, '505,12,"flash"\n', False), (CMD, "", True)]


def test_a_state_without_the_required_fields_fails_the_operation_as_the_mapper_does() -> None:
    model = ThinEdgeMapperModel("gw")
    [(_, failed, _), clear] = decide(model, CMD, {"status": "gateway_downloaded", "name": "img", "version": "1"})
    assert failed.startswith("505,12,") and "remoteUrl" in failed
    assert clear == (CMD, "", True)


def test_commands_it_did_not_create_and_garbage_are_left_alone() -> None:
    model = ThinEdgeMapperModel("gw")
    assert decide(model, "te/device/c1///cmd/firmware_update/other-1", command("executing")) == []
    assert decide(model, CMD, b"\xff") == []
    assert decide(model, CMD, b"") == []
    assert decide(model, "c8y/devicecontrol/notifications", b"{") == []
