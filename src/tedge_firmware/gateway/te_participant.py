"""The `te/` participant: thin-edge 1.x/2.x firmware_update commands get the shared cache.

Theory of operation. thin-edge's mapper creates a retained command
`te/<entity>/cmd/firmware_update/<id>` and clears it; the child owns `executing`, `successful`
and `failed`. A child whose workflow hands the command to our own state (`download_state`,
default `gateway_download`) gets this:

1. the firmware is fetched once for every command that needs it (`FirmwareFetches`, shared with
   the legacy operations; through thin-edge's proxy when `tedgeUrl` is its proxy URL for
   `remoteUrl`), cached under `remoteUrl`;
2. it is published on the file-transfer service for that child;
3. the whole payload is re-published, retained, in `downloaded_state` with `tedgeUrl` pointing
   at the child's copy and `sha256` and `size` added; every other field stays as it was.

A command we cannot serve goes to `failed` with a reason (the mapper sends it to Cumulocity).
We publish nothing else: no other state, no clear. A command that leaves our state while its
download runs (cleared, failed or moved on by someone else) stops waiting; the download stops
when nobody waits for it.

Nothing is persisted here: the broker keeps the retained command. After a restart (ours or a
broker's with its persistence) the command arrives again in our state and is served again
(the download resumes from its partial file; a cached file is published at once). The copy a
child was handed is removed when its command ends (final state or clear) unless another
command or legacy operation of the same child still uses it.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

from tedge_firmware.core import topics
from tedge_firmware.core.firmware_update import (
    TE_FINAL_STATES,
    TeCommand,
    TeCommandTopic,
    parse_te_command,
    parse_te_command_topic,
)
from tedge_firmware.core.links import LinkMaker, same_file
from tedge_firmware.core.operation import file_id_for_url
from tedge_firmware.errors import MessageError
from tedge_firmware.gateway.fetches import FetchDone, FirmwareFetches
from tedge_firmware.gateway.ports import CacheUpkeep, Publisher
from tedge_firmware.shell.cache import FirmwareCache
from tedge_firmware.shell.log_limits import LogLimiter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TeSettings:
    download_state: str = "gateway_download"
    downloaded_state: str = "gateway_downloaded"
    proxy_host: str = "127.0.0.1"  # thin-edge's Cumulocity proxy, as tedgeUrl names it
    proxy_port: int = 8001
    # where a child's copy is, without the trailing /: the file-transfer service's 1.x route
    # (`/te/v1/files`), which thin-edge 1.x/2.x's tedge-agent serves too; "" for the plugin's
    files_base_url: str = ""
    # firmware.cache.upstream_when_full: a firmware the cache cannot hold is handed over as
    # its upstream URL (thin-edge's proxy tedgeUrl, else remoteUrl) instead of failing
    upstream_when_full: bool = False


@dataclass(frozen=True)
class _Waiting:
    """A command in our state, waiting for its firmware."""

    where: TeCommandTopic
    command: TeCommand
    child_id: str
    file_id: str

    def context(self) -> str:
        return f"cmd={self.where.cmd_id} child={self.child_id}"


Copy = tuple[str, str]  # (child id, FILE_ID) of a file published for a child
V = TypeVar("V")


class _ByTopic(Generic[V]):
    """Values by command topic that count the copies they use, so that whether a copy is
    still used is known at once however many commands there are."""

    def __init__(self, copy_of: Callable[[V], Copy]) -> None:
        self._values: dict[str, V] = {}
        self._copy_of = copy_of
        self._users: Counter[Copy] = Counter()

    def __setitem__(self, topic: str, value: V) -> None:
        self.pop(topic)
        self._values[topic] = value
        self._users[self._copy_of(value)] += 1

    def pop(self, topic: str) -> V | None:
        value = self._values.pop(topic, None)
        if value is not None:
            copy = self._copy_of(value)
            self._users[copy] -= 1
            if not self._users[copy]:
                del self._users[copy]
        return value

    def get(self, topic: str) -> V | None:
        return self._values.get(topic)

    def uses(self, copy: Copy) -> bool:
        return copy in self._users


def _waiting_copy(waiting: _Waiting) -> Copy:
    return (waiting.child_id, waiting.file_id)


def _itself(copy: Copy) -> Copy:
    return copy


class TeParticipant:
    def __init__(
        self,
        settings: TeSettings,
        publisher: Publisher,
        cache: FirmwareCache,
        fetches: FirmwareFetches,
        links: LinkMaker,
        *,
        cache_keeper: CacheUpkeep,
        used_by_legacy: Callable[[str, str], bool],
        peer_errors: LogLimiter,
        legacy_copy: Callable[[str, str], tuple[str, int] | None] = lambda child, file_id: None,
    ) -> None:
        """`used_by_legacy(child, file_id)`: whether a live legacy operation still needs that
        published copy. `legacy_copy(child, file_id)`: SHA-256 and size of what the live legacy
        request of the same operation for this child was handed (the gateway offers an
        operation both ways, see te_mapper), None when there is none."""
        self._cache_keeper = cache_keeper
        self.settings = settings
        self._publisher = publisher
        self._cache = cache
        self._fetches = fetches
        self._links = links
        self._used_by_legacy = used_by_legacy
        self._legacy_copy = legacy_copy
        self._peer_errors = peer_errors
        self.waiting = _ByTopic(_waiting_copy)  # by command topic
        self.handed = _ByTopic(_itself)  # commands whose tedgeUrl is a copy of ours
        # What we moved on, by topic, until the command ends: the same command in our state
        # again is a stale copy (queued for our session, or re-sent) of what we served.
        self.served: dict[str, TeCommand] = {}

    def uses(self, child_id: str, file_id: str) -> bool:
        """Whether a live command needs the copy published for `child_id`."""
        copy = (child_id, file_id)
        return self.handed.uses(copy) or self.waiting.uses(copy)

    # ---- commands -----------------------------------------------------------------------

    def on_command(self, topic: str, payload: bytes) -> None:
        try:
            where = parse_te_command_topic(topic)
            command = parse_te_command(payload)
        except MessageError as error:
            self._peer_errors.log(
                logging.ERROR,
                "bad te/ command",
                "te/ command on %s ignored: %s",
                topic[:200],
                error,
            )
            self._stop_waiting(topic, "its payload is unusable")
            return
        if command is None:
            self._stop_waiting(topic, "it was cleared")
            self._end(topic)
            return
        if command.status == self.settings.download_state:
            self._serve(where, command)
            return
        self._stop_waiting(topic, f"it moved to {command.status!r}")
        self._note_copy(where, command)
        if command.status in TE_FINAL_STATES:
            self._end(topic)

    def _serve(self, where: TeCommandTopic, command: TeCommand) -> None:
        known = self.waiting.get(where.topic)
        if known is not None and known.command == command:
            return  # the retained command again (a re-subscription): its fetch runs
        if self.served.get(where.topic) == command:
            log.debug("te/ command %s in our state again, as we served it: ignored", where.topic)
            return
        self._stop_waiting(where.topic, "it came again with other fields")
        child_id = where.device_name
        if child_id is None:
            self._fail(where, command, f"{where.entity} is not a device/<name>// entity")
            return
        problem = topics.child_id_problem(child_id)
        if problem is not None:
            self._fail(where, command, problem)
            return
        try:
            download = command.download()
        except MessageError as error:
            self._fail(where, command, f"The firmware_update command cannot be served: {error}")
            return
        waiting = _Waiting(where, command, child_id, file_id_for_url(download.remote_url))
        handed = self._legacy_copy(child_id, waiting.file_id)
        if handed is not None:
            # the operation was offered to this child both ways (te_mapper): the command gets
            # the bytes its legacy request was handed, with no second question to the origin
            log.info("te/ command served with the legacy request's copy %s", waiting.context())
            self._hand_over(waiting, *handed)
            return
        self.waiting[where.topic] = waiting
        source = download.source_url(self.settings.proxy_host, self.settings.proxy_port)
        log.info(
            "te/ command to download name=%s version=%s url=%s %s",
            download.name,
            download.version,
            source,
            waiting.context(),
        )
        self._fetches.join(waiting.file_id, source, waiter=where.topic)

    def _stop_waiting(self, topic: str, why: str) -> None:
        waiting = self.waiting.pop(topic)
        if waiting is not None:
            log.info("te/ command no longer waits for its firmware: %s %s", why, waiting.context())
            self._fetches.leave(waiting.file_id, topic)

    # ---- the firmware is there (or not) -------------------------------------------------

    def on_fetch_done(self, done: FetchDone, waiters: Iterable[str]) -> None:
        for topic in waiters:
            waiting = self.waiting.pop(topic)
            if waiting is None:
                continue  # a legacy operation's, or no longer ours
            if done.sha256 is None and done.no_room and self.settings.upstream_when_full:
                self._hand_upstream(waiting, done.reason or "the cache is full")
            elif done.sha256 is None:
                reason = done.reason or f"Download of {waiting.command.text('remoteUrl')} failed"
                self._fail(waiting.where, waiting.command, reason)
            else:
                self._hand_over(waiting, done.sha256, done.size)

    def _hand_over(self, waiting: _Waiting, sha256: str, size: int | None) -> None:
        try:
            link = self._cache.publish(waiting.child_id, waiting.file_id, sha256)
            if size is None:
                size = link.stat().st_size
        except FileNotFoundError:  # evicted since the fetch ended (`cache prune`)
            log.info("cached firmware gone before it was published: fetching it again")
            self._serve(waiting.where, waiting.command)
            return
        except OSError as error:
            self._fail(
                waiting.where, waiting.command, f"Cannot publish the firmware to the child: {error}"
            )
            return
        topic = waiting.where.topic
        self.handed[topic] = (waiting.child_id, waiting.file_id)
        self.served[topic] = waiting.command
        moved = waiting.command.moved_to(
            self.settings.downloaded_state,
            tedgeUrl=self._copy_url(waiting.child_id, waiting.file_id),
            sha256=sha256,
            size=size,
        )
        self._publisher.publish(topic, moved, retain=True)
        log.info(
            "te/ command moved to %s with the gateway's copy %s",
            self.settings.downloaded_state,
            waiting.context(),
        )

    def _hand_upstream(self, waiting: _Waiting, why: str) -> None:
        """The child fetches the firmware itself, from where the gateway would have (no
        `sha256` or `size`: the gateway does not have the bytes)."""
        download = waiting.command.download()  # checked when the command was taken
        upstream = download.source_url(self.settings.proxy_host, self.settings.proxy_port)
        topic = waiting.where.topic
        self.served[topic] = waiting.command
        log.warning(
            "te/ command handed the upstream URL %s: the cache cannot hold the firmware "
            "(firmware.cache.upstream_when_full): %s %s",
            upstream,
            why,
            waiting.context(),
        )
        moved = waiting.command.moved_to(self.settings.downloaded_state, tedgeUrl=upstream)
        self._publisher.publish(topic, moved, retain=True)

    def _fail(self, where: TeCommandTopic, command: TeCommand, reason: str) -> None:
        log.error("te/ command failed: %s cmd=%s entity=%s", reason, where.cmd_id, where.entity)
        self.served[where.topic] = command
        self._publisher.publish(where.topic, command.failed(reason), retain=True)

    # ---- the copies handed to children --------------------------------------------------

    def _copy_url(self, child_id: str, file_id: str) -> str:
        return self._links.url(self._cache.relative_path(child_id, file_id))

    def _note_copy(self, where: TeCommandTopic, command: TeCommand) -> None:
        """Remember a command that carries one of our copies (ours, seen again after a
        restart, or moved on by the child), so that the copy goes when the command ends."""
        child_id, remote_url = where.device_name, command.text("remoteUrl")
        if child_id is None or remote_url is None:
            return
        file_id = file_id_for_url(remote_url)
        tedge_url = command.text("tedgeUrl")
        if tedge_url is not None and same_file(tedge_url, self._copy_url(child_id, file_id)):
            self.handed[where.topic] = (child_id, file_id)

    def _end(self, topic: str) -> None:
        self.served.pop(topic, None)
        copy = self.handed.pop(topic)
        if copy is None or self.uses(*copy) or self._used_by_legacy(*copy):
            return
        self._cache.unpublish(*copy)
        self._cache_keeper.request()  # the entry may be free to go now
        log.info("te/ command ended: copy for child %s removed", copy[0])
