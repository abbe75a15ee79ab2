"""Repeated log lines, summarised: what a peer can make us log must not flood the log.

A peer that sends the same bad message ten thousand times would otherwise get ten thousand
error lines (and the event loop spends its time formatting them). `LogLimiter` writes the
first line of a kind at once, leaves out the others of that kind for `interval` seconds, and
then writes one line saying how many were left out: at the next line of that kind, or when
the interval ends (a timer on the running event loop), whichever comes first.

A kind is a short key chosen by the caller (e.g. `("c8y/s/ds", "bad 515")`), never text taken
from the peer, so the number of kinds stays small; it is bounded anyway.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

DEFAULT_INTERVAL_S = 60.0
_MAX_KINDS = 256


@dataclass
class _Kind:
    window_ends: float
    left_out: int = 0
    level: int = logging.INFO
    last: tuple[str, tuple[object, ...]] = ("", ())  # the latest line left out, unformatted
    timer: asyncio.TimerHandle | None = None


class LogLimiter:
    """Writes lines through `logger`, at most one per kind and interval, counting the rest."""

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = DEFAULT_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._interval = interval
        self._clock = clock
        self._kinds: OrderedDict[Hashable, _Kind] = OrderedDict()

    def log(self, level: int, kind: Hashable, message: str, *args: object) -> None:
        """Log `message % args` unless a line of `kind` was written less than an interval ago."""
        now = self._clock()
        state = self._kinds.get(kind)
        if state is not None and now < state.window_ends:
            state.left_out += 1
            state.level = max(state.level, level)
            state.last = (message, args)
            if state.timer is None:
                state.timer = _call_later(state.window_ends - now, self._summarise, kind)
            return
        if state is not None:
            self._summarise(kind)
        self._remember(kind, _Kind(window_ends=now + self._interval))
        self._logger.log(level, message, *args)

    def flush(self) -> None:
        """Write the summary of every kind that has lines left out (at shutdown)."""
        for kind in list(self._kinds):
            self._summarise(kind)

    def left_out(self, kind: Hashable) -> int:
        """How many lines of `kind` were left out and not yet summarised."""
        state = self._kinds.get(kind)
        return 0 if state is None else state.left_out

    def _summarise(self, kind: Hashable) -> None:
        state = self._kinds.get(kind)
        if state is None:
            return
        if state.timer is not None:
            state.timer.cancel()
            state.timer = None
        if state.left_out:
            message, args = state.last
            self._logger.log(
                state.level,
                f"{message} (the latest of %d similar lines left out in %.0f s)",
                *args,
                state.left_out,
                self._interval,
            )
            state.left_out = 0
            state.last = ("", ())

    def _remember(self, kind: Hashable, state: _Kind) -> None:
        self._kinds[kind] = state
        self._kinds.move_to_end(kind)
        while len(self._kinds) > _MAX_KINDS:
            oldest = next(iter(self._kinds))
            self._summarise(oldest)
            del self._kinds[oldest]


def _call_later(
    delay: float, callback: Callable[[Hashable], None], kind: Hashable
) -> asyncio.TimerHandle | None:
    """A timer on the running loop; None outside of one (the next line then summarises)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return None
    return loop.call_later(max(delay, 0.0), callback, kind)
