"""The ports of the gateway's orchestrator: what it does I/O with, as protocols. The service
plugs in the real shells; tests plug in recording fakes."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Protocol

from tedge_firmware.errors import StoreError
from tedge_firmware.shell.partial_file import DownloadResult, NotModified


class Publisher(Protocol):
    """Where outgoing MQTT messages go (the MQTT session's outbox). `when_done(True)` once the
    broker acknowledged the message, `when_done(False)` if the broker refuses it."""

    def publish(
        self,
        topic: str,
        payload: bytes | str,
        *,
        qos: int = 1,
        retain: bool = False,
        when_done: Callable[[bool], None] | None = None,
    ) -> None: ...


class TimerPort(Protocol):
    """Timers by key: arming a key again replaces its timer; `fire` runs on the event loop."""

    def arm(self, key: str, seconds: float, fire: Callable[[], None]) -> None: ...

    def cancel(self, key: str) -> None: ...

    def cancel_all(self) -> None: ...


class RecordWriter(Protocol):
    """Runs store writes off the event loop, in order; `then(error)` runs on the loop once the
    write is done (see `StoreWriter`)."""

    def submit(
        self, write: Callable[[], None], then: Callable[[StoreError | None], None] | None = None
    ) -> None: ...

    async def close(self) -> None:
        """Wait for every write submitted (and those their callbacks submit), then stop."""


class CacheUpkeep(Protocol):
    """Keeps the cache within its limits; `request()` asks for a pass (see CacheKeeper)."""

    def start(self) -> None: ...

    def request(self) -> None: ...

    def make_room(self, needed: int, pinned: Collection[str] = ...) -> int: ...

    async def close(self) -> None: ...


class Fetcher(Protocol):
    """Downloads a url into `target` (atomically, resuming a partial file), raising
    DownloadError on failure; `revalidate` asks with the validators of a cached copy
    (`304`: NotModified, nothing written)."""

    async def download(
        self, url: str, target: Path, *, token: str | None = None
    ) -> DownloadResult: ...

    async def revalidate(
        self, url: str, target: Path, conditions: Mapping[str, str], *, token: str | None = None
    ) -> DownloadResult | NotModified: ...
