"""Filling the cache ahead of time: the gateway's side of the `cache_fill` command
(`core.cache_fill` has the protocol).

A command in `init` is taken (moved to `executing`) and joins the fetch of its URL, shared with
any operation that needs the same firmware: the same freshness rules, the same resume, the same
single download. A command found in `executing` at start is one a previous run took and did not
finish (a restart, a `kill -9`): its fetch is joined again, and resumes the partial download.
When the fetch ends the command moves to `successful` (`sha256`, `size`, `pinnedUntil` when
pinned) or `failed` (`reason`). Cleared or moved on by someone else, it is left, and its fetch
stops when nothing else waits for it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from tedge_firmware.core.cache_fill import FillRequest, cache_fill_id, fill_request
from tedge_firmware.core.firmware_update import (
    TE_EXECUTING,
    TE_INIT,
    TE_SUCCESSFUL,
    TeCommand,
    parse_te_command,
)
from tedge_firmware.core.operation import file_id_for_url
from tedge_firmware.errors import MessageError
from tedge_firmware.gateway.fetches import FetchDone, FirmwareFetches
from tedge_firmware.gateway.ports import Publisher
from tedge_firmware.shell.cache import FirmwareCache
from tedge_firmware.shell.log_limits import LogLimiter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Filling:
    command: TeCommand  # as we published it in `executing`
    request: FillRequest
    file_id: str


class CacheFiller:
    def __init__(
        self,
        publisher: Publisher,
        fetches: FirmwareFetches,
        cache: FirmwareCache,
        *,
        peer_errors: LogLimiter,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._publisher = publisher
        self._fetches = fetches
        self._cache = cache
        self._peer_errors = peer_errors
        self._clock = clock
        self.filling: dict[str, _Filling] = {}  # by command topic
        # commands we ended, until cleared: our own `executing` may come back after the end
        self.ended: set[str] = set()

    def on_command(self, topic: str, payload: bytes) -> None:
        try:
            cmd_id = cache_fill_id(topic)
            command = parse_te_command(payload)
        except MessageError as error:
            self._peer_errors.log(
                logging.ERROR, "bad cache_fill", "cache_fill on %s ignored: %s", topic[:200], error
            )
            return
        if command is None:
            self.ended.discard(topic)
            self._leave(topic, "it was cleared")
            return
        if command.status not in (TE_INIT, TE_EXECUTING):
            self._leave(topic, f"it is {command.status}")
            return
        if command.status == TE_EXECUTING and (topic in self.filling or topic in self.ended):
            return  # our own `executing` coming back
        try:
            request = fill_request(command)
        except MessageError as error:
            self._end(topic, command.failed(f"cache_fill {cmd_id}: {error}"))
            return
        running = command.moved_to(TE_EXECUTING) if command.status == TE_INIT else None
        if running is not None:
            self._publisher.publish(topic, running, retain=True)
        taken = parse_te_command(running.encode()) if running is not None else command
        assert taken is not None
        filling = _Filling(taken, request, file_id_for_url(request.url))
        self.filling[topic] = filling
        log.info("cache_fill %s: filling the cache with %s", cmd_id, request.url)
        self._fetches.join(filling.file_id, request.url, waiter=topic)

    def on_fetch_done(self, done: FetchDone, waiters: Iterable[str]) -> None:
        for topic in waiters:
            filling = self.filling.pop(topic, None)
            if filling is None:
                continue
            if done.sha256 is None:
                reason = done.reason or f"Download from {filling.request.url} failed"
                self._end(topic, filling.command.failed(reason))
                continue
            changes: dict[str, object] = {"sha256": done.sha256, "size": done.size}
            pin = filling.request.pin_seconds
            if pin is not None:
                until = self._clock() + pin
                if self._cache.pin(filling.file_id, until) is None:  # evicted meanwhile
                    self._end(topic, filling.command.failed("evicted before it could be pinned"))
                    continue
                changes["pinnedUntil"] = int(until)
            self._end(topic, filling.command.moved_to(TE_SUCCESSFUL, **changes))

    def _end(self, topic: str, payload: str) -> None:
        self.ended.add(topic)
        log.info("cache_fill %s: %s", topic.rsplit("/", 1)[-1], payload[:300])
        self._publisher.publish(topic, payload, retain=True)

    def _leave(self, topic: str, why: str) -> None:
        filling = self.filling.pop(topic, None)
        if filling is not None:
            log.info("cache_fill %s no longer waits: %s", topic.rsplit("/", 1)[-1], why)
            self._fetches.leave(filling.file_id, topic)
