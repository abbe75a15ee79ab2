"""The simulated tenant's rules, pure: SmartREST records in, state, answers and violations out."""

from __future__ import annotations

import itertools
import json

import pytest

from tedge_firmware.sim import (
    FIRMWARE,
    BulkStatus,
    Downstream,
    Firmware,
    OperationStatus,
    SimulatorError,
    Tenant,
)

GW = "gw"
P, E, S, F = (
    OperationStatus.PENDING,
    OperationStatus.EXECUTING,
    OperationStatus.SUCCESSFUL,
    OperationStatus.FAILED,
)


def tenant() -> Tenant:
    ticks = itertools.count(1000)
    return Tenant(GW, clock=lambda: float(next(ticks)))


def up(t: Tenant, topic: str, payload: str | bytes) -> list[Downstream]:
    return t.handle_upstream(topic, payload if isinstance(payload, bytes) else payload.encode())


def registered(*children: str, ops: str = "c8y_Firmware") -> Tenant:
    t = tenant()
    for child in children:
        up(t, "c8y/s/us", f"101,{child},{child},thin-edge.io-child")
        up(t, f"c8y/s/us/{child}", f"114,{ops}\n")
    assert t.violations == []
    return t


# --- inventory ----------------------------------------------------------------------------------


def test_101_creates_a_child_under_the_gateway_and_114_sets_its_operations() -> None:
    t = tenant()
    up(t, "c8y/s/us", "101,child1,Child One,thin-edge.io-child")
    up(t, "c8y/s/us/child1", "114,c8y_Restart,c8y_Firmware\n")
    device = t.devices["child1"]
    assert (device.name, device.type, device.parent) == ("Child One", "thin-edge.io-child", GW)
    assert device.supported_operations == ("c8y_Restart", "c8y_Firmware")
    assert device.supports(FIRMWARE)
    assert t.violations == []


def test_101_with_only_an_id_takes_defaults_and_a_repeated_101_is_harmless() -> None:
    t = tenant()
    up(t, "c8y/s/us", "101,child1")
    up(t, "c8y/s/us", "101,child1,child1,thin-edge.io-child")
    assert t.devices["child1"].name == "child1"
    assert t.devices["child1"].type == "c8y_Device"
    assert t.violations == []


def test_an_empty_114_clears_the_operations() -> None:
    t = registered("child1")
    up(t, "c8y/s/us/child1", "114\n")
    assert t.devices["child1"].supported_operations == ()


def test_114_for_the_gateway_on_c8y_s_us() -> None:
    t = tenant()
    up(t, "c8y/s/us", "114,c8y_Restart\n")
    assert t.devices[GW].supported_operations == ("c8y_Restart",)


def test_115_sets_the_installed_firmware() -> None:
    t = registered("child1")
    up(t, "c8y/s/us/child1", "115,image,1.0,http://x/image.bin")
    assert t.devices["child1"].firmware == Firmware("image", "1.0", "http://x/image.bin")
    up(t, "c8y/s/us/child1", '115,"a,b",2.0')
    assert t.devices["child1"].firmware == Firmware("a,b", "2.0", None)


def test_105_is_answered_with_the_children_in_creation_order() -> None:
    t = registered("b", "a")
    assert up(t, "c8y/s/us", "105") == [Downstream("c8y/s/ds", "106,b,a")]
    assert up(t, "c8y/s/us/a", "105") == [Downstream("c8y/s/ds", "106")]


def test_one_payload_may_hold_several_records() -> None:
    t = tenant()
    up(t, "c8y/s/us", "101,c1,c1,x\n101,c2,c2,x\n")
    assert set(t.children_of(GW)) == {"c1", "c2"}


def test_templates_the_simulator_does_not_judge_are_kept_apart() -> None:
    t = registered("child1")
    up(t, "c8y/s/us/child1", "200,c8y_Temperature,T,25")
    assert t.ignored == [("child1", "200,c8y_Temperature,T,25")]
    assert t.violations == []


# --- operations ---------------------------------------------------------------------------------


def test_a_firmware_operation_is_pending_and_delivered_as_515() -> None:
    t = registered("child1")
    op = t.create_firmware_operation("child1", "image", "1.0", "http://h/image.bin")
    assert (op.id, op.status, op.deliveries) == ("1", P, 0)
    assert t.deliver(op) == [Downstream("c8y/s/ds", "515,child1,image,1.0,http://h/image.bin")]
    assert t.operation(op.id).deliveries == 1


def test_the_515_quotes_fields_that_need_it() -> None:
    t = registered("child1")
    op = t.create_firmware_operation("child1", 'my "fw", v', "1.0", "http://h/x")
    assert t.deliver(op)[0].payload == '515,child1,"my ""fw"", v",1.0,http://h/x'


@pytest.mark.parametrize(
    ("records", "final", "reason"),
    [
        (["501,c8y_Firmware\n", "503,c8y_Firmware,\n"], S, None),
        (["501,c8y_Firmware\n", '502,c8y_Firmware,"flash error"\n'], F, "flash error"),
        (["501,c8y_Firmware\n", "502,c8y_Firmware\n"], F, ""),
        (["501,c8y_Firmware\n", '502,c8y_Firmware,"a ""b"", c"\n'], F, 'a "b", c'),
        (["501,c8y_Firmware\n"], E, None),
        ([], P, None),
    ],
)
def test_status_updates_move_the_operation(records: list[str], final: OperationStatus, reason: str | None) -> None:
    t = registered("child1")
    op = t.create_firmware_operation("child1", "image", "1.0", "http://h/x")
    for record in records:
        up(t, "c8y/s/us/child1", record)
    after = t.operation(op.id)
    assert after.status is final
    assert after.failure_reason == reason
    assert [change.status for change in after.history][-1] is final
    assert t.violations == []


def test_status_updates_apply_to_the_oldest_operation_of_the_fragment() -> None:
    t = registered("child1")
    first = t.create_firmware_operation("child1", "a", "1", "http://h/a")
    second = t.create_firmware_operation("child1", "b", "2", "http://h/b")
    up(t, "c8y/s/us/child1", "501,c8y_Firmware")
    assert (t.operation(first.id).status, t.operation(second.id).status) == (E, P)
    up(t, "c8y/s/us/child1", "501,c8y_Firmware")
    up(t, "c8y/s/us/child1", "503,c8y_Firmware,")
    assert (t.operation(first.id).status, t.operation(second.id).status) == (S, E)


def test_status_updates_only_touch_the_topic_s_device() -> None:
    t = registered("child1", "child2")
    one = t.create_firmware_operation("child1", "a", "1", "http://h/a")
    two = t.create_firmware_operation("child2", "a", "1", "http://h/a")
    up(t, "c8y/s/us/child2", "501,c8y_Firmware")
    assert (t.operation(one.id).status, t.operation(two.id).status) == (P, E)


# --- what Cumulocity refuses --------------------------------------------------------------------

REFUSED = [
    # (topic, record, words the violation must contain)
    ("c8y/s/us/ghost", "501,c8y_Firmware", "unknown device 'ghost'"),
    ("c8y/s/us/ghost", "114,c8y_Firmware", "unknown device"),
    ("c8y/s/us/ghost", "115,image,1.0,u", "unknown device"),
    ("c8y/s/us/ghost", "101,grandchild", "unknown device"),
    ("c8y/s/us/child1", "503,c8y_Firmware,", "send 501 first"),
    ("c8y/s/us/child1", '502,c8y_Firmware,"boom"', "send 501 first"),
    ("c8y/s/us/child1", "501", "needs an operation fragment"),
    ("c8y/s/us/child1", "501,", "needs an operation fragment"),
    ("c8y/s/us/child1", "501,c8y_Restart", "no PENDING c8y_Restart operation"),
    ("c8y/s/us/child1", "115,image", "115 needs a firmware name and version"),
    ("c8y/s/us/child1", "115,,1.0", "115 needs a firmware name and version"),
    ("c8y/s/us", "101", "101 needs a valid external id"),
    ("c8y/s/us", "101,a+b", "101 needs a valid external id"),
    ("c8y/s/us", '101,"a\nb"', "101 needs a valid external id"),
    ("c8y/s/us/", "501,c8y_Firmware", "topic names no device"),
    ("c8y/s/us/+", "501,c8y_Firmware", "topic names no device"),
]


@pytest.mark.parametrize(("topic", "record", "words"), REFUSED)
def test_what_cumulocity_refuses_is_recorded_and_changes_nothing(topic: str, record: str, words: str) -> None:
    t = registered("child1")
    op = t.create_firmware_operation("child1", "image", "1.0", "http://h/x")
    devices_before = t.devices
    assert up(t, topic, record) == []
    [violation] = t.violations
    assert words in violation.message, violation
    assert t.operation(op.id).status is P
    assert t.devices == devices_before


def test_non_utf8_is_a_violation() -> None:
    t = registered("child1")
    up(t, "c8y/s/us/child1", b"\xff\xfe501,c8y_Firmware")
    assert "not UTF-8" in t.violations[0].message


def test_a_status_for_a_finished_operation_is_a_violation() -> None:
    t = registered("child1")
    op = t.create_firmware_operation("child1", "image", "1.0", "http://h/x")
    for record in ("501,c8y_Firmware", "503,c8y_Firmware,", "503,c8y_Firmware,"):
        up(t, "c8y/s/us/child1", record)
    assert t.operation(op.id).status is S
    [violation] = t.violations
    assert f"operation {op.id} already ended SUCCESSFUL" in violation.message


def test_a_second_501_is_a_violation_and_names_the_executing_operation() -> None:
    t = registered("child1")
    op = t.create_firmware_operation("child1", "image", "1.0", "http://h/x")
    up(t, "c8y/s/us/child1", "501,c8y_Firmware")
    up(t, "c8y/s/us/child1", "501,c8y_Firmware")
    [violation] = t.violations
    assert f"operation {op.id} is EXECUTING" in violation.message


def test_101_for_a_child_of_another_parent_is_a_violation() -> None:
    t = registered("child1", "child2")
    up(t, "c8y/s/us/child2", "101,child1")
    assert "already exists under 'gw'" in t.violations[0].message
    assert t.devices["child1"].parent == GW


@pytest.mark.parametrize(
    ("setup", "words"),
    [
        ([], "no device 'child1'"),
        ([("c8y/s/us", "101,child1")], "does not list c8y_Firmware"),
        ([("c8y/s/us", "101,child1"), ("c8y/s/us/child1", "114,c8y_Restart")], "does not list c8y_Firmware"),
    ],
)
def test_an_operation_for_a_device_that_cannot_take_it_is_refused(setup: list[tuple[str, str]], words: str) -> None:
    t = tenant()
    for topic, record in setup:
        up(t, topic, record)
    with pytest.raises(SimulatorError, match=words):
        t.create_firmware_operation("child1", "image", "1.0", "http://h/x")
    assert t.operations == []
    [violation] = t.violations
    assert violation.device == "child1"


# --- 500 ----------------------------------------------------------------------------------------


def test_500_redelivers_only_pending_operations_of_the_device_and_its_children() -> None:
    t = registered("child1", "child2")
    a = t.create_firmware_operation("child1", "a", "1", "http://h/a")
    b = t.create_firmware_operation("child2", "b", "1", "http://h/b")
    c = t.create_firmware_operation("child1", "c", "1", "http://h/c")
    up(t, "c8y/s/us/child1", "501,c8y_Firmware")  # a is executing now
    answers = up(t, "c8y/s/us", "500")
    assert [answer.payload for answer in answers] == ["515,child2,b,1,http://h/b", "515,child1,c,1,http://h/c"]
    assert [answer.payload for answer in up(t, "c8y/s/us/child2", "500")] == ["515,child2,b,1,http://h/b"]
    assert (t.operation(a.id).deliveries, t.operation(b.id).deliveries, t.operation(c.id).deliveries) == (0, 2, 1)


# --- bulk operations ----------------------------------------------------------------------------


def test_a_bulk_operation_goes_from_scheduled_to_successful() -> None:
    t = registered("c1", "c2")
    bulk = t.new_bulk(["c1", "c2", "c1"], "image", "1.0", "http://h/x", ramp_seconds=0.5)
    assert bulk.devices == ("c1", "c2")  # a device once
    assert t.bulk_progress(bulk.id).status is BulkStatus.SCHEDULED
    ops = [t.create_bulk_member(bulk.id, device) for device in bulk.devices]
    assert all(op is not None and op.bulk_id == bulk.id for op in ops)
    progress = t.bulk_progress(bulk.id)
    assert (progress.status, progress.pending, progress.total) == (BulkStatus.EXECUTING, 2, 2)
    for device in ("c1", "c2"):
        up(t, f"c8y/s/us/{device}", "501,c8y_Firmware")
        up(t, f"c8y/s/us/{device}", "503,c8y_Firmware,")
    progress = t.bulk_progress(bulk.id)
    assert (progress.status, progress.successful, progress.done) == (BulkStatus.SUCCESSFUL, 2, True)


def test_a_bulk_operation_with_a_refused_device_and_a_failure_ends_failed() -> None:
    t = registered("c1", "c2")
    bulk = t.new_bulk(["c1", "nobody", "c2"], "image", "1.0", "http://h/x", ramp_seconds=0)
    assert t.create_bulk_member(bulk.id, "c1") is not None
    assert t.create_bulk_member(bulk.id, "nobody") is None
    assert t.bulk_progress(bulk.id).status is BulkStatus.EXECUTING_WITH_ERRORS
    assert t.create_bulk_member(bulk.id, "c2") is not None
    for device, last in (("c1", "503,c8y_Firmware,"), ("c2", '502,c8y_Firmware,"no"')):
        up(t, f"c8y/s/us/{device}", "501,c8y_Firmware")
        up(t, f"c8y/s/us/{device}", last)
    progress = t.bulk_progress(bulk.id)
    assert (progress.status, progress.successful, progress.failed, progress.refused) == (BulkStatus.FAILED, 1, 1, 1)
    assert [violation.device for violation in t.violations] == ["nobody"]


def test_a_bulk_operation_needs_devices_and_a_non_negative_ramp() -> None:
    t = registered("c1")
    with pytest.raises(SimulatorError):
        t.new_bulk([], "image", "1.0", "http://h/x", ramp_seconds=0)
    with pytest.raises(ValueError, match="ramp"):
        t.new_bulk(["c1"], "image", "1.0", "http://h/x", ramp_seconds=-1)


def test_add_device_seeds_the_inventory_without_a_gateway() -> None:
    t = tenant()
    t.add_device("child1", operations=["c8y_Firmware"])
    assert t.devices["child1"].parent == GW
    t.create_firmware_operation("child1", "image", "1.0", "http://h/x")
    with pytest.raises(SimulatorError):
        t.add_device("x", parent="nobody")
    with pytest.raises(SimulatorError):
        t.add_device("a/b")


def test_every_change_counts() -> None:
    t = registered("child1")
    before = t.changes
    up(t, "c8y/s/us/child1", "115,image,1.0")
    assert t.changes > before


def test_the_gateway_id_must_be_usable() -> None:
    with pytest.raises(ValueError, match="gateway id"):
        Tenant("a/b")


# --- operations in their JSON form, statuses by id ---------------------------------------------


def test_with_json_operations_each_delivery_carries_the_json_form_too() -> None:
    t = registered("child1")
    t.json_operations = True
    op = t.create_firmware_operation("child1", "image", "1.0", "http://h/image.bin")
    smartrest_copy, json_copy = t.deliver(op)
    assert smartrest_copy.topic == "c8y/s/ds"
    assert json_copy.topic == "c8y/devicecontrol/notifications"
    document = json.loads(json_copy.payload)
    assert (document["id"], document["status"]) == (op.id, "PENDING")
    assert document["c8y_Firmware"] == {"name": "image", "version": "1.0", "url": "http://h/image.bin"}
    assert document["externalSource"] == {"externalId": "child1", "type": "c8y_Serial"}


def test_statuses_by_id_move_the_operation_they_name() -> None:
    t = registered("child1")
    first = t.create_firmware_operation("child1", "image", "1.0", "http://h/a")
    second = t.create_firmware_operation("child1", "image", "2.0", "http://h/b")
    up(t, "c8y/s/us/child1", f"504,{second.id}")  # not the oldest: by id, that one
    up(t, "c8y/s/us/child1", f'505,{second.id},"no space"')
    assert (t.operation(first.id).status, t.operation(second.id).status) == (P, OperationStatus.FAILED)
    assert t.operation(second.id).failure_reason == "no space"
    up(t, "c8y/s/us/child1", f"504,{first.id}\n506,{first.id}")
    assert t.operation(first.id).status is OperationStatus.SUCCESSFUL
    assert t.violations == []


@pytest.mark.parametrize(
    ("records", "says"),
    [
        (["506,1"], "is PENDING, not EXECUTING"),
        (["504,99"], "no operation '99'"),
        (["504,1", "504,1"], "is EXECUTING, not PENDING"),
        (["504,"], "no operation ''"),
    ],
)
def test_statuses_by_id_that_cumulocity_would_refuse_are_violations(records: list[str], says: str) -> None:
    t = registered("child1", "child2")
    t.create_firmware_operation("child1", "image", "1.0", "http://h/a")
    for record in records:
        up(t, "c8y/s/us/child1", record)
    assert says in t.violations[-1].message


def test_a_status_by_id_for_another_devices_operation_is_a_violation() -> None:
    t = registered("child1", "child2")
    op = t.create_firmware_operation("child1", "image", "1.0", "http://h/a")
    up(t, "c8y/s/us/child2", f"504,{op.id}")
    assert t.operation(op.id).status is P
    assert "of this device" in t.violations[-1].message
