"""Running a service until a signal: the first SIGTERM/SIGINT asks for a graceful stop, a
second one exits at once."""

from __future__ import annotations

import asyncio
import errno
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
        asyncio.get_running_loop().set_exception_handler(on_loop_exception)
        stop = asyncio.Event()
        with stop_on_signals(stop):
            await serve(stop)

    asyncio.run(main())


def on_loop_exception(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """The event loop's report of an error nobody caught: a traceback (a bug), except for one
    known race that is not: aiomqtt asks the loop to watch paho's socket from a callback that
    can run after paho closed it when the broker went away (EBADF, or EPERM when the number
    is a regular file's by then), and the session reconnects anyway. That one is a debug line.
    (`shell.mqtt` closes the race for writing; aiomqtt's reading side remains.)"""
    error = context.get("exception")
    handle = repr(context.get("handle", ""))
    if (
        isinstance(error, OSError)
        and error.errno in (errno.EBADF, errno.EPERM)  # EPERM: the number is a file's now
        and ("add_writer" in handle or "add_reader" in handle)
    ):
        log.debug("a closed MQTT socket was not watched (%s): ignored", error)
        return
    loop.default_exception_handler(context)


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
