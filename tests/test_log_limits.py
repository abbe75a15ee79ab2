"""LogLimiter: the first line of a kind at once, the rest of its interval counted, then summed up."""

from __future__ import annotations

import asyncio
import logging

import pytest

from tedge_firmware.shell.log_limits import LogLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Lines:
    """The messages logged so far on the `limited` logger (read anew at every use)."""

    def __init__(self, caplog: pytest.LogCaptureFixture) -> None:
        self.caplog = caplog

    def __eq__(self, other: object) -> bool:
        return self.caplog.messages == other

    def __len__(self) -> int:
        return len(self.caplog.messages)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.caplog.messages)

    def __getitem__(self, index):  # type: ignore[no-untyped-def]
        return self.caplog.messages[index]

    def __repr__(self) -> str:
        return repr(self.caplog.messages)


@pytest.fixture
def lines(caplog: pytest.LogCaptureFixture) -> Lines:
    caplog.set_level(logging.DEBUG, logger="limited")
    return Lines(caplog)


def test_the_first_line_of_a_kind_is_written_and_the_rest_counted(lines: Lines) -> None:
    clock = Clock()
    limiter = LogLimiter(logging.getLogger("limited"), interval=60, clock=clock)
    for index in range(10_000):
        limiter.log(logging.ERROR, "bad 515", "bad record %d", index)
    assert lines == ["bad record 0"]
    assert limiter.left_out("bad 515") == 9_999
    clock.now += 61
    limiter.log(logging.ERROR, "bad 515", "bad record %d", 10_000)
    assert lines == [
        "bad record 0",
        "bad record 9999 (the latest of 9999 similar lines left out in 60 s)",
        "bad record 10000",
    ]
    assert limiter.left_out("bad 515") == 0


def test_kinds_are_counted_apart(lines: Lines) -> None:
    limiter = LogLimiter(logging.getLogger("limited"), interval=60, clock=Clock())
    for _ in range(3):
        limiter.log(logging.WARNING, "a", "line a")
        limiter.log(logging.WARNING, ("b", 1), "line b")
    assert lines == ["line a", "line b"]
    limiter.flush()
    assert lines[2:] == [
        "line a (the latest of 2 similar lines left out in 60 s)",
        "line b (the latest of 2 similar lines left out in 60 s)",
    ]
    limiter.flush()  # nothing more to say
    assert len(lines) == 4


def test_the_summary_keeps_the_highest_level(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="limited")
    limiter = LogLimiter(logging.getLogger("limited"), interval=60, clock=Clock())
    limiter.log(logging.INFO, "k", "first")
    limiter.log(logging.ERROR, "k", "worse")
    limiter.log(logging.INFO, "k", "mild")
    limiter.flush()
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("INFO", "first"),
        ("ERROR", "mild (the latest of 2 similar lines left out in 60 s)"),
    ]


def test_kinds_are_bounded(lines: Lines) -> None:
    limiter = LogLimiter(logging.getLogger("limited"), interval=60, clock=Clock())
    for kind in range(1_000):
        limiter.log(logging.INFO, kind, "kind %d", kind)
        limiter.log(logging.INFO, kind, "kind %d", kind)
    assert len(limiter._kinds) <= 256
    # every line left out was summed up before its kind was forgotten, or still is counted
    summarised = sum(1 for line in lines if "left out" in line)
    assert summarised + sum(limiter.left_out(k) for k in range(1_000)) == 1_000


async def test_the_summary_comes_when_the_interval_ends(lines: Lines) -> None:
    logger = logging.getLogger("limited")
    summary = asyncio.Event()
    handler = logging.Handler()
    handler.emit = lambda record: summary.set() if "left out" in record.getMessage() else None  # type: ignore[method-assign]
    logger.addHandler(handler)
    try:
        limiter = LogLimiter(logger, interval=0.05)
        limiter.log(logging.INFO, "k", "first")
        limiter.log(logging.INFO, "k", "second")
        async with asyncio.timeout(5):
            await summary.wait()  # nothing else is logged: the interval's end brings it
    finally:
        logger.removeHandler(handler)
    assert lines == ["first", "second (the latest of 1 similar lines left out in 0 s)"]
