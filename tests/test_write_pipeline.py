"""The downloader's write pipeline: steps run in order in a thread of their own, whatever was
queued meanwhile goes in one hop, and after a failure the later steps are skipped and the
failure is raised (issue 17: fewer hops per byte must not change what reaches the file)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from tedge_firmware.shell.download_failures import AttemptFailed, Failure
from tedge_firmware.shell.partial_file import WritePipeline


async def test_steps_queued_while_the_writer_is_busy_run_in_order_in_one_hop() -> None:
    pipeline = WritePipeline(8, name="test")
    hops: list[object] = []
    submit = pipeline._thread.submit  # every hop to the writer thread passes here
    pipeline._thread.submit = lambda *args, **kwargs: (hops.append(args), submit(*args, **kwargs))[1]  # type: ignore[method-assign]
    ran: list[tuple[int, int]] = []  # (step, thread id)
    started, gate = threading.Event(), threading.Event()
    await pipeline.put(lambda: (started.set(), gate.wait(5), ran.append((0, threading.get_ident())))[2])
    assert await asyncio.to_thread(started.wait, 5)  # the writer is inside the first step
    for index in range(1, 6):
        await pipeline.put(lambda index=index: ran.append((index, threading.get_ident())))
    gate.set()
    async with asyncio.timeout(5):
        await pipeline.finish(lambda: ran.append((6, threading.get_ident())))
    assert [index for index, _ in ran] == list(range(7))
    assert len({thread for _, thread in ran}) == 1  # one writer thread, never the loop's
    assert threading.get_ident() not in {thread for _, thread in ran}
    # the first step alone, then the five queued behind it together (and the last with them
    # or alone): 2 or 3 hops for 7 steps
    assert 2 <= len(hops) <= 3, len(hops)


async def test_after_a_failure_the_later_steps_are_skipped_and_the_failure_is_raised() -> None:
    pipeline = WritePipeline(8, name="test")
    ran: list[int] = []
    started, gate = threading.Event(), threading.Event()

    def fail() -> None:
        raise AttemptFailed(Failure("disk full", transient=False))

    await pipeline.put(lambda: (started.set(), gate.wait(5), ran.append(0))[2])
    assert await asyncio.to_thread(started.wait, 5)
    await pipeline.put(lambda: ran.append(1))
    await pipeline.put(fail)  # in the same hop as the steps around it
    await pipeline.put(lambda: ran.append(3))
    gate.set()
    with pytest.raises(AttemptFailed, match="disk full"):
        async with asyncio.timeout(5):
            await pipeline.finish(lambda: ran.append(4))
    assert ran == [0, 1]
