"""Running a service until a signal: the first SIGTERM/SIGINT asks for a graceful stop, a
second one exits at once."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable, Coroutine, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

log = logging.getLogger(__name__)

EXIT_FORCED = 130


@contextmanager
def stop_on_signals(stop: asyncio.Event) -> Iterator[None]:
    """Install SIGTERM/SIGINT handlers on the running loop; restore the defaults on exit."""
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT)

    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.warning("second %s: exiting at once", signal.Signals(signum).name)
            os._exit(EXIT_FORCED)
        log.info("%s received: shutting down", signal.Signals(signum).name)
        stop.set()

    for signum in signals:
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        yield
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)


def run_until_signal(serve: Callable[[asyncio.Event], Coroutine[Any, Any, None]]) -> None:
    """`asyncio.run` a service coroutine that returns when `stop` is set (or fails)."""

    async def main() -> None:
        stop = asyncio.Event()
        with stop_on_signals(stop):
            await serve(stop)

    asyncio.run(main())


async def until_stopped(stop: asyncio.Event, tasks: Sequence[asyncio.Task[None]]) -> None:
    """Wait for the stop request; a task that ends first (e.g. broker auth refused) re-raises."""
    stopper = asyncio.create_task(stop.wait(), name="stop")
    try:
        done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
    finally:
        await cancel_tasks([stopper])
    for task in done:
        if task is not stopper and not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]


async def cancel_tasks(tasks: Sequence[asyncio.Task[Any]]) -> None:
    """Cancel the tasks and wait until every one has ended."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
