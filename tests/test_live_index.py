"""The indexes behind the per-message lookups of a big fleet (issue 17) answer exactly what a
scan of every entry would: the plugin's operations by copy and by Cumulocity id, and the `te/`
participant's commands by the copy they use."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from tedge_firmware.core.operation import State, new_operation_id
from tedge_firmware.gateway.plugin import LiveOperation, LiveOperations
from tedge_firmware.gateway.te_participant import _ByTopic

CHILDREN = ["child1", "child2", "gw:device:child1"]
FILE_IDS = ["a" * 64, "b" * 64]
C8Y_IDS = [None, "11", "12"]

add = st.tuples(
    st.just("add"),
    st.sampled_from(CHILDREN),
    st.sampled_from(FILE_IDS),
    st.sampled_from(C8Y_IDS),
)
pop = st.tuples(st.just("pop"), st.integers(0, 20))
end = st.tuples(st.just("end"), st.integers(0, 20), st.sampled_from([State.SUCCESSFUL, State.FAILED]))


def live(op_id: str, child: str, file_id: str, c8y_id: str | None) -> LiveOperation:
    return LiveOperation(op_id, child, "fw", "1.0", "http://c/fw", file_id, c8y_id=c8y_id)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(add, pop, end), max_size=40))
def test_live_operations_answer_as_a_scan_would(steps: list[tuple[object, ...]]) -> None:
    index = LiveOperations()
    everything: dict[str, LiveOperation] = {}  # the plain dict the plugin used to scan
    for number, step in enumerate(steps):
        if step[0] == "add":
            _, child, file_id, c8y_id = step
            if c8y_id is not None and any(op.c8y_id == c8y_id for op in everything.values()):
                continue  # the plugin takes an operation it holds by id again, never twice
            operation = live(f"op{number}", str(child), str(file_id), c8y_id)  # type: ignore[arg-type]
            index.add(operation)
            everything[operation.op_id] = operation
        elif everything:
            op_id = sorted(everything)[int(step[1]) % len(everything)]  # type: ignore[call-overload]
            if step[0] == "pop":
                assert index.pop(op_id) is everything.pop(op_id)
            else:
                everything[op_id].state = step[2]  # type: ignore[assignment]
        assert dict(index) == everything
        for child in CHILDREN:
            for file_id in FILE_IDS:
                scanned = [
                    op
                    for op in everything.values()
                    if not op.state.ended and op.child_id == child and op.file_id == file_id
                ]
                assert index.using(child, file_id) == scanned
        for c8y_id in C8Y_IDS[1:]:
            held = next((op for op in everything.values() if op.c8y_id == c8y_id), None)
            assert index.by_c8y_id(c8y_id) is held
    assert index.pop("no such operation") is None


@dataclass(frozen=True)
class Waiting:
    child_id: str
    file_id: str


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["set", "pop"]),
            st.sampled_from(["t1", "t2", "t3"]),
            st.sampled_from(CHILDREN),
            st.sampled_from(FILE_IDS),
        ),
        max_size=40,
    )
)
def test_commands_by_topic_count_the_copies_they_use(steps: list[tuple[str, str, str, str]]) -> None:
    index: _ByTopic[Waiting] = _ByTopic(lambda waiting: (waiting.child_id, waiting.file_id))
    plain: dict[str, Waiting] = {}
    for action, topic, child, file_id in steps:
        if action == "set":
            index[topic] = plain[topic] = Waiting(child, file_id)
        else:
            assert index.pop(topic) == plain.pop(topic, None)
        assert all(index.get(topic) == plain.get(topic) for topic in ("t1", "t2", "t3"))
        for copy_child in CHILDREN:
            for copy_file in FILE_IDS:
                copy = (copy_child, copy_file)
                assert index.uses(copy) == any((w.child_id, w.file_id) == copy for w in plain.values())


def test_operation_ids_are_21_characters_of_the_url_safe_alphabet_and_differ() -> None:
    ids = {new_operation_id() for _ in range(2000)}
    assert len(ids) == 2000
    alphabet = set("_-0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
    assert all(len(op_id) == 21 and set(op_id) <= alphabet for op_id in ids)
    # every character of the alphabet turns up (the low 6 bits of a byte pick it uniformly)
    assert set("".join(ids)) == alphabet
