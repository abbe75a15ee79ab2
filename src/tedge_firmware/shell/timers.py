"""Timers that answer with a message: when one fires, its callback puts an input on a queue.

Re-arming a key replaces its timer (an inactivity timeout), unlike thin-edge 0.11-0.13 where
earlier timers kept firing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Timers:
    def __init__(self) -> None:
        self._handles: dict[str, asyncio.TimerHandle] = {}

    def arm(self, key: str, seconds: float, fire: Callable[[], None]) -> None:
        self.cancel(key)
        loop = asyncio.get_running_loop()
        self._handles[key] = loop.call_later(seconds, self._fire, key, fire)

    def _fire(self, key: str, fire: Callable[[], None]) -> None:
        self._handles.pop(key, None)
        fire()

    def cancel(self, key: str) -> None:
        handle = self._handles.pop(key, None)
        if handle is not None:
            handle.cancel()

    def cancel_all(self) -> None:
        for handle in self._handles.values():
            handle.cancel()
        self._handles.clear()

    def __contains__(self, key: str) -> bool:
        return key in self._handles
