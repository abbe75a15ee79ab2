"""Child registration, the pure part: which names and contents count, the SmartREST lines, the
decisions of the Registrar over snapshots, and the network API's topic and payload rules."""

from __future__ import annotations

import pytest

from tedge_firmware.core.registration import (
    COMMAND_OPERATIONS,
    DECLARATION_FILTER,
    MAX_DECLARATION_BYTES,
    MAX_OPERATION_FILE_BYTES,
    Declaration,
    DeviceOperations,
    Phase,
    Publish,
    Registrar,
    Snapshot,
    child_dir_problem,
    cloud_child_list,
    operation_file_problem,
    operation_for_command,
    operation_name_problem,
    parse_declaration,
)
from tedge_firmware.errors import InputError, TopicError
from tedge_firmware.shell.mqtt import check_topic_filter

# --- names and contents ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["c8y_Firmware", "c8y_Restart", "A", "_", "0", "x" * 128])
def test_valid_operation_names(name: str) -> None:
    assert operation_name_problem(name) is None


@pytest.mark.parametrize(
    "name",
    ["", "c8y-Firmware", "c8y_Firmware.toml", "c8y Firmware", "c8y_Fïrmware", "c8y_Firmware\n", "..", "a/b", "x" * 129, "ⅷ", "٣"],
)
def test_invalid_operation_names(name: str) -> None:
    assert operation_name_problem(name) is not None


@pytest.mark.parametrize("name", ["child1", "child-1", "child.1", "Child_1", "child 1", "ü-child", "x" * 200])
def test_valid_child_directory_names(name: str) -> None:
    assert child_dir_problem(name, "gateway") is None


@pytest.mark.parametrize(
    "name",
    ["", " ", "+", "#", "a+b", "a#b", "a/b", "a\\b", ".", "..", "bad\x01", "bad\x7f", "tab\tname", "nl\n", "x" * 201, "\udcff-not-utf8", "gateway"],
)
def test_hostile_child_directory_names(name: str) -> None:
    assert child_dir_problem(name, "gateway") is not None


@pytest.mark.parametrize("content", [b"", b"\n", b"# comment\n", b'[exec]\ncommand = "/bin/true"\ntopic = "c8y/s/ds"\non_message = "511"\n'])
def test_valid_operation_file_contents(content: bytes) -> None:
    assert operation_file_problem(content) is None


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"[exec\n", "TOML"),
        (b"key = \n", "TOML"),
        (b"a = 1\na = 2\n", "TOML"),
        (b"\xff\xfe", "UTF-8"),
        (b"#" * (MAX_OPERATION_FILE_BYTES + 1), "larger"),
    ],
)
def test_invalid_operation_file_contents(content: bytes, why: str) -> None:
    problem = operation_file_problem(content)
    assert problem is not None and why in problem


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"106,child1,child2", ["child1", "child2"]),
        (b"106", []),
        (b"106,", []),
        (b"106,child1\r\n", ["child1"]),
        (b"515,child1,fw,1.0,http://x\n106,a,b\n", ["a", "b"]),
        (b'106,"a,b",c', ["a,b", "c"]),
        (b"515,child1,fw,1.0,http://x", None),
        (b"1066,x", None),
        (b"", None),
        (b"\xff106,a", None),
    ],
)
def test_cloud_child_list(payload: bytes, expected: list[str] | None) -> None:
    assert cloud_child_list(payload) == expected


# --- the Registrar -------------------------------------------------------------------------------


def ops(*names: str, stamp: int = 0) -> DeviceOperations:
    return DeviceOperations(frozenset((name, index + 1, 0, stamp) for index, name in enumerate(names)))


def snap(main: DeviceOperations | None = None, **children: DeviceOperations) -> Snapshot:
    return Snapshot(main=main or DeviceOperations(), children=children)


def lines(out: list[Publish]) -> list[tuple[str, str]]:
    return [(p.topic, p.payload) for p in out]


R101 = "101,{0},{0},thin-edge.io-child"


def test_start_without_children_asks_nothing() -> None:
    registrar = Registrar()
    assert registrar.start(snap()) == []
    assert registrar.phase is Phase.RUNNING


def test_start_declares_the_main_device_and_asks_for_the_children() -> None:
    registrar = Registrar()
    out = registrar.start(snap(ops("c8y_Restart", "c8y_Firmware"), a=ops("c8y_Firmware")))
    assert lines(out) == [("c8y/s/us", "114,c8y_Firmware,c8y_Restart\n"), ("c8y/s/us", "105")]
    assert registrar.phase is Phase.WAITING_FOR_CLOUD


def test_cloud_list_registers_the_unknown_children_then_declares_every_child() -> None:
    registrar = Registrar()
    registrar.start(snap(a=ops("c8y_Firmware"), b=ops("c8y_Restart", "c8y_Firmware"), c=ops()))
    out = registrar.on_cloud_list(["a", "other"])
    assert lines(out) == [
        ("c8y/s/us", R101.format("b")),
        ("c8y/s/us", R101.format("c")),
        ("c8y/s/us/a", "114,c8y_Firmware\n"),
        ("c8y/s/us/b", "114,c8y_Firmware,c8y_Restart\n"),
        ("c8y/s/us/c", "114\n"),
    ]
    assert registrar.phase is Phase.RUNNING
    assert registrar.on_cloud_list([]) == []  # a second 106 changes nothing
    assert registrar.on_cloud_silent() == []


def test_cloud_silence_registers_every_child() -> None:
    registrar = Registrar()
    registrar.start(snap(a=ops("c8y_Firmware")))
    assert lines(registrar.on_cloud_silent()) == [
        ("c8y/s/us", R101.format("a")),
        ("c8y/s/us/a", "114,c8y_Firmware\n"),
    ]
    assert registrar.on_cloud_list(["a"]) == []  # a late 106 changes nothing


def test_cloud_list_before_start_is_ignored() -> None:
    assert Registrar().on_cloud_list(["a"]) == []


def test_changes_while_waiting_for_the_cloud_are_covered_by_the_registration() -> None:
    registrar = Registrar()
    registrar.start(snap(a=ops("c8y_Firmware")))
    assert registrar.on_snapshot(snap(a=ops("c8y_Firmware", "c8y_Restart"), b=ops("c8y_Firmware"))) == []
    # only the main device does not wait
    assert lines(registrar.on_snapshot(snap(ops("c8y_Restart"), a=ops("c8y_Firmware", "c8y_Restart"), b=ops("c8y_Firmware")))) == [
        ("c8y/s/us", "114,c8y_Restart\n")
    ]
    assert lines(registrar.on_cloud_list(["a"])) == [
        ("c8y/s/us", R101.format("b")),
        ("c8y/s/us/a", "114,c8y_Firmware,c8y_Restart\n"),
        ("c8y/s/us/b", "114,c8y_Firmware\n"),
    ]


def running(start: Snapshot) -> Registrar:
    registrar = Registrar()
    registrar.start(start)
    registrar.on_cloud_silent()
    return registrar


def test_new_child_directory_is_registered_at_once_and_declared_when_it_has_operations() -> None:
    registrar = running(snap())
    assert lines(registrar.on_snapshot(snap(new=ops()))) == [("c8y/s/us", R101.format("new"))]
    assert lines(registrar.on_snapshot(snap(new=ops("c8y_Firmware")))) == [("c8y/s/us/new", "114,c8y_Firmware\n")]


def test_new_child_with_files_in_the_same_look_gets_101_before_114() -> None:
    registrar = running(snap())
    assert lines(registrar.on_snapshot(snap(z=ops("c8y_Firmware"), y=ops("c8y_Restart")))) == [
        ("c8y/s/us", R101.format("y")),
        ("c8y/s/us/y", "114,c8y_Restart\n"),
        ("c8y/s/us", R101.format("z")),
        ("c8y/s/us/z", "114,c8y_Firmware\n"),
    ]


def test_a_changed_file_gives_one_full_114_again() -> None:
    registrar = running(snap(a=ops("c8y_Firmware", "c8y_Restart")))
    # same names, one file rewritten (new mtime): the full list again, once
    changed = snap(a=DeviceOperations(frozenset({("c8y_Firmware", 1, 0, 0), ("c8y_Restart", 2, 7, 99)})))
    assert lines(registrar.on_snapshot(changed)) == [("c8y/s/us/a", "114,c8y_Firmware,c8y_Restart\n")]
    assert registrar.on_snapshot(changed) == []  # nothing changed: nothing sent


def test_unchanged_children_are_not_declared_again() -> None:
    registrar = running(snap(a=ops("c8y_Firmware"), b=ops("c8y_Firmware")))
    assert lines(registrar.on_snapshot(snap(a=ops("c8y_Firmware"), b=ops("c8y_Firmware", "c8y_Restart")))) == [
        ("c8y/s/us/b", "114,c8y_Firmware,c8y_Restart\n")
    ]


def test_deleted_operation_and_removed_child() -> None:
    registrar = running(snap(a=ops("c8y_Firmware", "c8y_Restart")))
    assert lines(registrar.on_snapshot(snap(a=ops("c8y_Restart")))) == [("c8y/s/us/a", "114,c8y_Restart\n")]
    assert lines(registrar.on_snapshot(snap())) == [("c8y/s/us/a", "114\n")]
    # created again: registered again, as a new directory is
    assert lines(registrar.on_snapshot(snap(a=ops()))) == [("c8y/s/us", R101.format("a"))]


def test_removed_child_without_operations_sends_nothing() -> None:
    registrar = running(snap(a=ops()))
    assert registrar.on_snapshot(snap()) == []


def test_main_device_changes() -> None:
    registrar = running(snap(ops("c8y_Restart")))
    assert lines(registrar.on_snapshot(snap(ops("c8y_Restart", "c8y_Firmware")))) == [
        ("c8y/s/us", "114,c8y_Firmware,c8y_Restart\n")
    ]
    assert lines(registrar.on_snapshot(snap())) == [("c8y/s/us", "114\n")]


def test_child_ids_that_need_csv_quotes() -> None:
    registrar = running(snap())
    assert lines(registrar.on_snapshot(snap(**{'a,"b"': ops("c8y_Firmware")}))) == [
        ("c8y/s/us", '101,"a,""b""","a,""b""",thin-edge.io-child'),
        ('c8y/s/us/a,"b"', "114,c8y_Firmware\n"),
    ]


# --- the network API ---------------------------------------------------------------------------


def test_the_filter_is_a_valid_subscription() -> None:
    check_topic_filter(DECLARATION_FILTER)


@pytest.mark.parametrize(("command", "operation"), [*COMMAND_OPERATIONS.items(), ("c8y_Custom_1", "c8y_Custom_1")])
def test_commands_map_to_operations(command: str, operation: str) -> None:
    assert operation_for_command(command) == operation
    assert parse_declaration(f"te/device/child1///cmd/{command}", b"{}") == Declaration("child1", operation, True)
    assert parse_declaration(f"te/device/child1///cmd/{command}", b"") == Declaration("child1", operation, False)


@pytest.mark.parametrize("payload", [b"{}", b' { "types": ["a"] } ', b'{"x": {"y": [1, 2]}}', b"{}\n"])
def test_declare_payloads(payload: bytes) -> None:
    assert parse_declaration("te/device/child1///cmd/firmware_update", payload).supported


def test_main_entity_is_the_main_device() -> None:
    assert parse_declaration("te/device/main///cmd/restart", b"{}") == Declaration(None, "c8y_Restart", True)


@pytest.mark.parametrize(
    "topic",
    [
        "te/device////cmd/firmware_update",  # empty child
        "te/device/..///cmd/firmware_update",
        "te/device/.///cmd/firmware_update",
        "te/device/bad\x01///cmd/firmware_update",
        "te/device/bad\\name///cmd/firmware_update",
        "te/device/gateway///cmd/firmware_update",  # the main device's own id as a child
        "te/device/" + "x" * 201 + "///cmd/firmware_update",
        "te/device/child1///cmd/firmware_update/123",  # a command instance, not a capability
        "te/device/child1/service/svc/cmd/firmware_update",
        "te/device/child1//x/cmd/firmware_update",
        "tedge/child1/commands/req/firmware_update",
        "te/device/child1///cmd",
        "",
    ],
)
def test_hostile_topics(topic: str) -> None:
    with pytest.raises(TopicError):
        parse_declaration(topic, b"{}", "gateway")


@pytest.mark.parametrize(
    "command",
    ["", "unknown_command", "c8y_", "c8y_Bad-Name", "c8y_Firmware.toml", "c8y_..", "c8y_" + "x" * 125, "C8Y_Firmware", "c8y_Fïrmware"],
)
def test_unknown_or_invalid_commands(command: str) -> None:
    with pytest.raises(InputError):
        parse_declaration(f"te/device/child1///cmd/{command}", b"{}")


@pytest.mark.parametrize(
    "payload",
    [
        b"[]",
        b"null",
        b"true",
        b'"{}"',
        b"1",
        b"{",
        b" ",
        b"\xff{}",
        b"{}{}",
        b"[" * 10_000,
        b'{"a":' + b"[" * 5000 + b"]" * 5000 + b"}",  # valid JSON, nested too deep to parse
        b'{"a": "' + b"x" * MAX_DECLARATION_BYTES + b'"}',
    ],
)
def test_hostile_payloads(payload: bytes) -> None:
    with pytest.raises(InputError):
        parse_declaration("te/device/child1///cmd/firmware_update", payload)


# --- thin-edge's identity scheme for children declared over te/ -------------------------------


def test_a_child_declared_over_te_is_named_by_thin_edges_external_id() -> None:
    declared = parse_declaration("te/device/child1///cmd/firmware_update", b"{}", "gw")
    assert declared == Declaration("gw:device:child1", "c8y_Firmware", True)
    # the main device stays the main device
    assert parse_declaration("te/device/main///cmd/restart", b"{}", "gw").device is None


def test_an_external_id_over_the_length_limit_is_refused() -> None:
    with pytest.raises(TopicError, match="longer than"):
        parse_declaration("te/device/" + "c" * 190 + "///cmd/firmware_update", b"{}", "g" * 20)


def test_a_te_child_is_registered_with_its_own_name_and_a_file_child_with_its_id() -> None:
    from tedge_firmware.core.registration import register_child

    assert register_child("gw:device:child1", "gw").payload == "101,gw:device:child1,child1,thin-edge.io-child"
    assert register_child("child1", "gw").payload == "101,child1,child1,thin-edge.io-child"
    assert register_child("other:device:child1", "gw").payload == "101,other:device:child1,other:device:child1,thin-edge.io-child"
    assert register_child("gw:device:", "gw").payload == "101,gw:device:,gw:device:,thin-edge.io-child"


def test_the_registrar_names_te_children_in_their_101() -> None:
    registrar = Registrar("gw")
    children = {"gw:device:a": DeviceOperations(frozenset({("c8y_Firmware", 1, 0, 0)}))}
    registrar.start(Snapshot(children=children))
    out = registrar.on_cloud_list([])
    assert out[0].payload == "101,gw:device:a,a,thin-edge.io-child"
