"""The firmware plugin: c8y_Firmware operations for child devices, from `515` to `503`/`502`
(or, with `c8y.smartrest.use_operation_id`, from their JSON form to `506`/`505`).

It also hosts what shares its loop, downloads and cache: the `te/` participant
(`gateway/te_participant`), and, where `tedge-firmware run` plays thin-edge's mapper, the `te/`
commands offered to children registered over `te/` (`gateway/te_mapper`).

One loop consumes one queue of typed inputs (an MQTT message, a finished fetch, a fired timer,
a request the broker refuses) and decides; the I/O that takes time (downloads,
hashing, waiting for a JWT) runs in tasks that answer with inputs on the same queue, so a slow
download never delays a child's response. Decisions about one operation are in
`core.operation.step`; this module executes them. Everything it does I/O with comes in
`PluginPorts` (built by `gateway.service`, or by a test with fakes), and what it needs of the
configuration in `PluginSettings`.

Operation files are written by the `RecordWriter` in a thread of its own, in order, so the loop
never waits for a disk; whatever must follow a write (the request to the child, the final
lines for Cumulocity) is published from the write's callback, once the file is on disk.

Nothing a peer sends stops the loop: each payload is bounded in size, a `c8y/s/ds` payload is
split into one input per record, the loop lets other tasks run every few inputs, and errors
that a peer can repeat are logged once per minute with a count (`LogLimiter`).

An operation is forgotten only when the broker has acknowledged every line it owes Cumulocity
(`core.operation` says what its file holds meanwhile); acknowledgements are handled the moment
the MQTT session reports them, not queued. A broker that lost our session
(restarted without saving it) is treated like our own restart: the requests waiting for a
child go out again with attempt + 1, then `500`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import os
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tedge_firmware.core import c8y_operations, smartrest, topics
from tedge_firmware.core.cache_fill import CACHE_FILL_FILTER, is_cache_fill_topic
from tedge_firmware.core.config import FILES_ROUTE, TedgeConfig
from tedge_firmware.core.firmware_update import (
    TE_COMMAND_FILTER,
    ChildStatus,
    FirmwareUpdateRequest,
    FirmwareUpdateResponse,
    parse_response,
)
from tedge_firmware.core.links import LinkMaker
from tedge_firmware.core.operation import (
    Event,
    FetchRecord,
    OperationRecord,
    State,
    file_id_for_url,
    new_operation_id,
    step,
    timeout_reason,
)
from tedge_firmware.errors import InputError, SmartRestError, StoreError
from tedge_firmware.gateway import te_mapper
from tedge_firmware.gateway.cache_fill import CacheFiller
from tedge_firmware.gateway.fetches import (
    CacheRules,
    FetchDone,
    FetchWaiting,
    FirmwareFetches,
    JwtBroker,
)
from tedge_firmware.gateway.ports import (
    CacheUpkeep,
    Fetcher,
    Publisher,
    RecordWriter,
    TimerPort,
)
from tedge_firmware.gateway.te_participant import TeParticipant, TeSettings
from tedge_firmware.shell.cache import FirmwareCache
from tedge_firmware.shell.log_limits import LogLimiter
from tedge_firmware.shell.store import RecordStore

log = logging.getLogger(__name__)


# The loop lets other tasks (the MQTT session, the file-transfer service) run this often.
_INPUTS_PER_TURN = 32
# A signed link lives this much longer than a child may stay silent (it downloads meanwhile).
_LINK_MARGIN_S = 600
# How long the id of an ended operation is remembered: Cumulocity re-delivers pending
# operations after a `500` (thin-edge's mapper keeps them for an hour as well).
_COMPLETED_IDS_KEPT_S = 3600.0

PLUGIN_SUBSCRIPTIONS = (
    topics.C8Y_DOWNSTREAM,
    topics.C8Y_JWT_RESPONSE,
    topics.FIRMWARE_RESPONSES,
    topics.HEALTH_CHECK,
    topics.health_check_topic(),
    TE_COMMAND_FILTER,
    c8y_operations.OPERATIONS_TOPIC,
    CACHE_FILL_FILTER,
)


# ---- inputs of the loop -------------------------------------------------------------------


@dataclass(frozen=True)
class Incoming:
    topic: str
    payload: bytes


@dataclass(frozen=True)
class TimerFired:
    op_id: str
    generation: int


@dataclass(frozen=True)
class DownstreamRecord:
    """One `515` record of a `c8y/s/ds` payload."""

    record: str


@dataclass(frozen=True)
class JsonOperation:
    """One `c8y_Firmware` operation of a `c8y/devicecontrol/notifications` payload."""

    operation: c8y_operations.FirmwareOperation


@dataclass(frozen=True)
class SweepCopies:
    """The children's copies found published a while after the start: (child, FILE_ID)."""

    copies: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class RequestRefused:
    """The broker refuses the request to the child (it drops the connection on it)."""

    op_id: str


@dataclass(frozen=True)
class BrokerSessionLost:
    """The broker came back without our session: what it held for us is gone."""


@dataclass(frozen=True)
class ResendUnanswered:
    """Send again the requests no child has answered since `since` (loop time)."""

    since: float


Input = (
    Incoming
    | DownstreamRecord
    | JsonOperation
    | SweepCopies
    | FetchDone
    | FetchWaiting
    | TimerFired
    | RequestRefused
    | BrokerSessionLost
    | ResendUnanswered
)


@dataclass
class LiveOperation:
    """An operation the plugin is working on (in memory; persisted once the request is out)."""

    op_id: str
    child_id: str
    name: str
    version: str
    cloud_url: str  # where the firmware comes from (the 515's)
    file_id: str
    attempt: int = 1
    state: State = State.FETCHING
    record: OperationRecord | None = None
    timer_generation: int = 0
    owed: list[str] = field(default_factory=list)  # lines for Cumulocity not yet acknowledged
    heard_at: float = 0.0  # loop time of the child's last valid response
    c8y_id: str | None = None  # the Cumulocity operation's id, when it came by id
    te_command: str | None = None  # the te/ command offered for it (te_mapper), until cleared
    answered_on: str | None = None  # "legacy" or "te": where the child answered first

    def matches(self, request: smartrest.FirmwareRequest) -> bool:
        return (self.child_id, self.name, self.version, self.cloud_url) == (
            request.device,
            request.name,
            request.version,
            request.url,
        )

    def context(self) -> str:
        return f"op_id={self.op_id} child={self.child_id}"


class LiveOperations(Mapping[str, LiveOperation]):
    """The plugin's operations by id, indexed for the lookups made on every message: by the
    child's copy (child id, FILE_ID) and by Cumulocity id. (Scanning every operation per
    message made a rollout to n children cost n².) Ended operations stay until forgotten."""

    def __init__(self) -> None:
        self._by_id: dict[str, LiveOperation] = {}
        self._by_copy: dict[tuple[str, str], dict[str, LiveOperation]] = {}
        self._by_c8y_id: dict[str, LiveOperation] = {}

    def __getitem__(self, op_id: str) -> LiveOperation:
        return self._by_id[op_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_id)

    def __len__(self) -> int:
        return len(self._by_id)

    def add(self, operation: LiveOperation) -> None:
        self._by_id[operation.op_id] = operation
        copy = (operation.child_id, operation.file_id)
        self._by_copy.setdefault(copy, {})[operation.op_id] = operation
        if operation.c8y_id is not None:
            self._by_c8y_id[operation.c8y_id] = operation

    def pop(self, op_id: str) -> LiveOperation | None:
        operation = self._by_id.pop(op_id, None)
        if operation is None:
            return None
        copy = (operation.child_id, operation.file_id)
        same_copy = self._by_copy.get(copy, {})
        same_copy.pop(op_id, None)
        if not same_copy:
            self._by_copy.pop(copy, None)
        if operation.c8y_id is not None and self._by_c8y_id.get(operation.c8y_id) is operation:
            del self._by_c8y_id[operation.c8y_id]
        return operation

    def using(self, child_id: str, file_id: str) -> list[LiveOperation]:
        """The operations (not ended) of `child_id` that use its copy of `file_id`."""
        same_copy = self._by_copy.get((child_id, file_id), {})
        return [op for op in same_copy.values() if not op.state.ended]

    def by_c8y_id(self, c8y_id: str) -> LiveOperation | None:
        return self._by_c8y_id.get(c8y_id)


@dataclass(frozen=True)
class PluginOptions:
    """Tunables that are not tedge.toml keys (tests shorten them)."""

    jwt_timeout: float = 20.0
    jwt_attempts: int = 3
    # After the broker lost our session, requests that no child has answered since are sent
    # again this many seconds later: a child comes back at its own pace, and a request sent
    # before it subscribed again is gone (the broker kept nothing for it either).
    resend_after_session_loss: tuple[float, ...] = (5.0, 30.0)
    # A child's copy published before a restart whose operation or te/ command ended while we
    # were away is removed this long after the start (by then the broker has handed us every
    # retained te/ command that still uses one).
    sweep_copies_after: float = 60.0


@dataclass(frozen=True)
class PluginSettings:
    """What the plugin needs to know of the configuration, and nothing else."""

    device_id: str
    file_transfer_base_url: str  # what a child's url starts with, without the trailing /
    tenant_host: str | None  # the JWT goes to this host only; None: to no one
    child_update_timeout: int  # seconds a child may stay silent
    options: PluginOptions = field(default_factory=PluginOptions)
    te: TeSettings = field(default_factory=TeSettings)
    # `tedge-firmware run` without thin-edge's mapper: operations of children registered over
    # te/ are also offered as te/ commands (gateway/te_mapper). Beside thin-edge's mapper
    # (`c8y-firmware-plugin`) their 515s are the mapper's.
    plays_mapper: bool = False
    # c8y.smartrest.use_operation_id: operations from their JSON form, reported by id
    use_operation_id: bool = False
    # http.signed_links: the secret that signs the links handed to children (None: plain)
    link_secret: bytes | None = None
    # firmware.cache.revalidate_after, .stale_if_error
    cache_rules: CacheRules = field(default_factory=CacheRules)

    @classmethod
    def from_tedge(
        cls,
        config: TedgeConfig,
        device_id: str,
        options: PluginOptions | None = None,
        *,
        plays_mapper: bool = False,
        link_secret: bytes | None = None,
    ) -> PluginSettings:
        return cls(
            device_id=device_id,
            file_transfer_base_url=config.file_transfer_base_url(),
            tenant_host=config.tenant_host,
            child_update_timeout=config.child_update_timeout,
            options=options or PluginOptions(),
            te=TeSettings(
                download_state=config.te_download_state,
                downloaded_state=config.te_downloaded_state,
                proxy_host=config.c8y_proxy_host,
                proxy_port=config.c8y_proxy_port,
                files_base_url=config.file_transfer_base_url(FILES_ROUTE),
                upstream_when_full=config.cache_upstream_when_full,
            ),
            plays_mapper=plays_mapper,
            use_operation_id=config.use_operation_id,
            link_secret=link_secret,
            cache_rules=CacheRules(
                revalidate_after=config.cache_revalidate_after,
                stale_if_error=config.cache_stale_if_error,
                windows=config.download_windows,
            ),
        )


@dataclass(frozen=True)
class PluginPorts:
    """Everything the plugin does I/O with, built by the service (or by a test)."""

    publisher: Publisher
    fetcher: Fetcher
    operations: RecordStore[OperationRecord]  # data.path/firmware/<op_id>
    fetching: RecordStore[FetchRecord]  # operations waiting for their firmware
    writer: RecordWriter  # every write of the two stores goes through it
    cache: FirmwareCache
    cache_keeper: CacheUpkeep
    timers: TimerPort
    clock: Callable[[], float]  # monotonic seconds (the event loop's time)


class FirmwarePlugin:
    """The orchestrator. Feed it with `submit()`, run it with `run()`."""

    def __init__(self, settings: PluginSettings, ports: PluginPorts) -> None:
        self.settings = settings
        self.device_id = settings.device_id
        self.publisher = ports.publisher
        self.store = ports.operations
        self.fetching = ports.fetching
        self.writer = ports.writer
        self.cache = ports.cache
        self.cache_keeper = ports.cache_keeper
        self.timers = ports.timers
        self.clock = ports.clock
        jwt = JwtBroker(self.publisher, settings.options.jwt_timeout, settings.options.jwt_attempts)
        self.fetches = FirmwareFetches(
            ports.fetcher,
            self.cache,
            jwt,
            settings.tenant_host,
            report=self.submit,
            rules=settings.cache_rules,
            make_room=self._make_room,
        )
        self.inputs: asyncio.Queue[Input] = asyncio.Queue()
        self.operations = LiveOperations()
        self.peer_errors = LogLimiter(log)  # what a peer can make us log, once a minute
        # Cumulocity ids of operations that ended lately (loop time): re-delivered, ignored
        self.completed_c8y_ids: dict[str, float] = {}
        self._sweeping: asyncio.Task[None] | None = None
        # A link lives as long as a silent child may take, and a while more to download.
        lifetime = settings.child_update_timeout + _LINK_MARGIN_S
        self.links = LinkMaker(settings.file_transfer_base_url, settings.link_secret, lifetime)
        te_links = dataclasses.replace(
            self.links, base_url=settings.te.files_base_url or settings.file_transfer_base_url
        )
        self.te = TeParticipant(
            settings.te,
            self.publisher,
            self.cache,
            self.fetches,
            te_links,
            cache_keeper=self.cache_keeper,
            used_by_legacy=self._legacy_uses,
            peer_errors=self.peer_errors,
            legacy_copy=self._legacy_copy,
        )
        self.filler = CacheFiller(
            self.publisher, self.fetches, self.cache, peer_errors=self.peer_errors
        )

    async def _make_room(self, needed: int) -> int:
        pinned = frozenset(self.fetches.pinned())
        return await asyncio.to_thread(self.cache_keeper.make_room, needed, pinned)

    def pinned_firmware(self) -> Collection[str]:
        """The firmware (SHA-256) fetched and not published yet: the cache keeper must not
        evict it meanwhile."""
        return self.fetches.pinned()

    # ---- lifecycle ----------------------------------------------------------------------

    def recover(self) -> None:
        """Pick up where the last run stopped, then ask Cumulocity for pending operations.

        Operations whose request was sent are re-sent with attempt + 1 (timeout re-armed);
        ended operations send the lines the broker may not have acknowledged; operations still
        waiting for their firmware rejoin its (resumed) download. Then `500`.
        """
        for record in self.store.load_all():
            if self._usable_child(record.child_id, self.store.path(record.operation_id)):
                operation = self._live(record.operation_id, record, attempt=record.attempt + 1)
                operation.record = record
                operation.state = record.state
                if record.state.ended:
                    log.info(
                        "sending again after restart the %d line(s) for Cumulocity that the "
                        "broker had not acknowledged %s",
                        len(record.to_cloud),
                        operation.context(),
                    )
                    self._owe(operation, record.to_cloud)
                else:
                    log.info(
                        "resuming operation after restart (%s) %s",
                        record.state.value,
                        operation.context(),
                    )
                    self._resend(operation)
        for ended in [op for op in self.operations.values() if op.state.ended]:
            self._unpublish_unless_used(ended)  # the stop may have come before the clean-up
        for fetch in self.fetching.load_all():
            if fetch.operation_id in self.operations:
                self.fetching.delete(fetch.operation_id)  # its request went out before the stop
            elif self._usable_child(fetch.child_id, self.fetching.path(fetch.operation_id)):
                operation = self._live(fetch.operation_id, fetch, attempt=fetch.attempt)
                if fetch.announced:
                    operation.state = State.WAITING  # Cumulocity has its 501 already
                log.info("resuming the firmware download after restart %s", operation.context())
                self._join_fetch(operation)
        self.writer.submit(_nothing_to_write, lambda _error: self._ask_for_pending_operations())
        self.cache_keeper.start()
        self.timers.arm(
            "sweep-copies", self.settings.options.sweep_copies_after, self._start_copies_sweep
        )

    def _usable_child(self, child_id: str, path: Path) -> bool:
        problem = topics.child_id_problem(child_id)
        if problem is not None:
            self.store.quarantine(path, problem)
        return problem is None

    def _live(
        self, op_id: str, record: OperationRecord | FetchRecord, attempt: int
    ) -> LiveOperation:
        operation = LiveOperation(
            op_id=op_id,
            child_id=record.child_id,
            name=record.name,
            version=record.version,
            cloud_url=record.cloud_url,
            file_id=file_id_for_url(record.cloud_url),
            attempt=attempt,
            c8y_id=record.c8y_id,
        )
        self.operations.add(operation)
        return operation

    def submit(self, item: Input) -> None:
        self.inputs.put_nowait(item)

    async def run(self) -> None:
        """Handle inputs forever. An error in one input is logged; it never stops the loop."""
        handled = 0
        while True:
            item = await self.inputs.get()
            try:
                self.handle(item)
            except Exception:
                log.exception("unexpected error while handling %s", type(item).__name__)
            handled += 1
            if handled % _INPUTS_PER_TURN == 0:
                await asyncio.sleep(0)  # a queue that is never empty must not starve the rest

    async def close(self) -> None:
        self.peer_errors.flush()
        self.timers.cancel_all()
        if self._sweeping is not None:
            self._sweeping.cancel()
            await asyncio.gather(self._sweeping, return_exceptions=True)
        await self.cache_keeper.close()
        await self.fetches.close()

    # ---- dispatch -----------------------------------------------------------------------

    def handle(self, item: Input) -> None:
        match item:
            case Incoming(topic=topic, payload=payload):
                self._on_message(topic, payload)
            case DownstreamRecord(record=record):
                self._on_515(record)
            case JsonOperation(operation=operation):
                self._on_json_operation(operation)
            case SweepCopies(copies=copies):
                self._sweep_copies(copies)
            case FetchDone():
                self._on_fetch_done(item)
            case FetchWaiting(file_id=file_id, why=why):
                self._on_fetch_waiting(file_id, why)
            case TimerFired(op_id=op_id, generation=generation):
                self._on_timeout(op_id, generation)
            case RequestRefused(op_id=op_id):
                self._on_request_refused(op_id)
            case BrokerSessionLost():
                self._on_broker_session_lost()
            case ResendUnanswered(since=since):
                self._resend_unanswered(since)

    def _on_message(self, topic: str, payload: bytes) -> None:
        if topic == topics.C8Y_DOWNSTREAM:
            self._on_smartrest(payload)
        elif topic == c8y_operations.OPERATIONS_TOPIC:
            self._on_json_operations(payload)
        elif topic == topics.C8Y_JWT_RESPONSE:
            self.fetches.jwt.on_response(payload[: smartrest.MAX_DOWNSTREAM_BYTES])
        elif topic in (topics.HEALTH_CHECK, topics.health_check_topic()):
            self.publish_health()
        elif topic.startswith("tedge/") and topic.endswith("/commands/res/firmware_update"):
            self._on_child_response(topic, payload)
        elif is_cache_fill_topic(topic):
            self.filler.on_command(topic, payload)
        elif topic.startswith("te/"):
            self.te.on_command(topic, payload)
            if self.settings.plays_mapper:
                self._on_te_answer(topic, payload)
        else:
            log.debug("message on %s ignored", topic)

    def publish_health(self) -> None:
        self.publisher.publish(topics.health_topic(), health_up(), retain=True)

    # ---- 515 ----------------------------------------------------------------------------

    def _on_smartrest(self, payload: bytes) -> None:
        """Queue each `515` record of the payload as an input of its own (fair to the rest)."""
        if len(payload) > smartrest.MAX_DOWNSTREAM_BYTES:
            self.peer_errors.log(
                logging.ERROR,
                "c8y/s/ds too large",
                "payload of %d bytes on %s is over the limit of %d bytes: ignored",
                len(payload),
                topics.C8Y_DOWNSTREAM,
                smartrest.MAX_DOWNSTREAM_BYTES,
            )
            return
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError:
            self.peer_errors.log(
                logging.WARNING,
                "c8y/s/ds not UTF-8",
                "payload on %s is not UTF-8 (%d bytes): ignored",
                topics.C8Y_DOWNSTREAM,
                len(payload),
            )
            return
        for record in smartrest.split_records(text):
            if smartrest.template_id(record) not in ("515", "525"):
                continue
            if self.settings.use_operation_id:
                log.debug("%s ignored: operations are taken by id (JSON)", record[:200])
            else:
                self.submit(DownstreamRecord(record))

    def _on_515(self, record: str) -> None:
        """A `515` (or a `525`, a patch: same fields, then the version it applies to)."""
        try:
            request = smartrest.parse_firmware_request(record)
        except SmartRestError as error:
            self.peer_errors.log(logging.ERROR, "bad 515", "%s: %r", error, record[:200])
            return
        self._on_firmware_request(request, patch_of=smartrest.patch_of(record))

    # ---- operations by id (c8y.smartrest.use_operation_id) ------------------------------

    def _on_json_operations(self, payload: bytes) -> None:
        """Queue each `c8y_Firmware` operation of the payload as an input of its own."""
        if not self.settings.use_operation_id:
            return  # the 515 copy is the one we act on
        for found in c8y_operations.firmware_operations(payload):
            if isinstance(found, c8y_operations.FirmwareOperation):
                self.submit(JsonOperation(found))
            else:
                self.peer_errors.log(
                    logging.ERROR,
                    "bad JSON operation",
                    "c8y_Firmware operation on %s ignored: %s (id=%s device=%s)",
                    c8y_operations.OPERATIONS_TOPIC,
                    found.problem,
                    found.c8y_id,
                    found.device,
                )

    def _on_json_operation(self, found: c8y_operations.FirmwareOperation) -> None:
        live = self.operations.by_c8y_id(found.c8y_id)
        if live is not None and not live.state.ended:
            self._again(live)
            return
        if live is not None or found.c8y_id in self.completed_c8y_ids:
            log.info("operation %s delivered again after its end: ignored", found.c8y_id)
            return
        request = smartrest.FirmwareRequest(found.device, found.name, found.version, found.url)
        self._on_firmware_request(request, c8y_id=found.c8y_id, patch_of=found.patch_of)

    def _remember_completed(self, c8y_id: str) -> None:
        now = self.clock()
        self.completed_c8y_ids = {
            known: at
            for known, at in self.completed_c8y_ids.items()
            if now - at < _COMPLETED_IDS_KEPT_S
        }
        self.completed_c8y_ids[c8y_id] = now

    def _on_firmware_request(
        self,
        request: smartrest.FirmwareRequest,
        *,
        c8y_id: str | None = None,
        patch_of: str | None = None,
    ) -> None:
        if request.device == self.device_id:
            log.warning(
                "c8y_Firmware for the main device %s is left to its own handler: ignored",
                request.device,
            )
            return
        problem = topics.child_id_problem(request.device)
        if problem is not None:
            self.peer_errors.log(
                logging.ERROR, "bad child id", "c8y_Firmware operation ignored: %s", problem
            )
            return
        te_child = topics.te_child_name(request.device, self.device_id)
        if te_child is not None and not self.settings.plays_mapper:
            log.info("c8y_Firmware for %s, a te/ child: left to thin-edge's mapper", request.device)
            return
        same_copy = self.operations.using(request.device, file_id_for_url(request.url))
        duplicate = next(
            (op for op in same_copy if op.c8y_id is None and op.matches(request)), None
        )
        if duplicate is not None and c8y_id is None:
            self._again(duplicate)
            return
        operation = LiveOperation(
            op_id=new_operation_id(),
            child_id=request.device,
            name=request.name,
            version=request.version,
            cloud_url=request.url,
            file_id=file_id_for_url(request.url),
            c8y_id=c8y_id,
        )
        self.operations.add(operation)
        impossible = c8y_operations.cannot_do(request.name, request.version, request.url, patch_of)
        if impossible is not None:
            log.error("%s %s", impossible, operation.context())
            self._abort(operation, impossible)
            return
        log.info(
            "new firmware operation name=%s version=%s url=%s %s",
            operation.name,
            operation.version,
            operation.cloud_url,
            operation.context(),
        )
        # On disk before the download starts: a restart meanwhile resumes it for this operation.
        self._save_fetching(operation, and_then=lambda: self._join_fetch(operation))

    def _again(self, duplicate: LiveOperation) -> None:
        """The same operation received again: the request goes out again with attempt + 1."""
        duplicate.attempt += 1
        log.info(
            "same operation received again, attempt %d %s", duplicate.attempt, duplicate.context()
        )
        if duplicate.state.fetching:
            self._save_fetching(duplicate)
        else:
            self._resend(duplicate)

    # ---- fetching the firmware (single flight per FILE_ID) ------------------------------

    def _save_fetching(
        self, operation: LiveOperation, and_then: Callable[[], None] | None = None
    ) -> None:
        record = FetchRecord(
            operation_id=operation.op_id,
            child_id=operation.child_id,
            name=operation.name,
            version=operation.version,
            cloud_url=operation.cloud_url,
            attempt=operation.attempt,
            c8y_id=operation.c8y_id,
            announced=operation.state is State.WAITING and not operation.owed,
        )

        def saved(error: StoreError | None) -> None:
            if error is not None:
                # the operation goes on; only a restart during its download would lose it
                log.warning("%s %s", error, operation.context())
            if and_then is not None and self._is_live(operation):
                and_then()

        self.writer.submit(functools.partial(self.fetching.save, record), saved)

    def _on_fetch_waiting(self, file_id: str, why: str) -> None:
        """The download waits for its window: the operations waiting for it tell Cumulocity
        EXECUTING now (an operation left PENDING for hours looks lost), once."""
        for operation in self.operations.values():
            if operation.file_id == file_id and operation.state is State.FETCHING:
                log.info("operation waits: %s %s", why, operation.context())
                self._transition(operation, Event.WAITING)

    def _join_fetch(self, operation: LiveOperation) -> None:
        self.fetches.join(operation.file_id, operation.cloud_url, waiter=operation.op_id)

    def _on_fetch_done(self, done: FetchDone) -> None:
        waiters = self.fetches.finish(done)
        for op_id in waiters:
            operation = self.operations.get(op_id)
            if operation is None or operation.state.ended:
                continue
            if done.sha256 is None:
                self._abort(operation, done.reason or f"Download from {operation.cloud_url} failed")
            else:
                self._send_first_request(operation, done.sha256)
        self.te.on_fetch_done(done, waiters)
        self.filler.on_fetch_done(done, waiters)
        if done.sha256 is not None:
            self.cache_keeper.request()  # the cache grew; the new entry is published by now

    # ---- requests to the child ----------------------------------------------------------

    def _send_first_request(self, operation: LiveOperation, sha256: str) -> None:
        """Publish the firmware for the child, write the operation file, then (once it is on
        disk) send the request."""
        try:
            self.cache.publish(operation.child_id, operation.file_id, sha256)
        except FileNotFoundError:
            # evicted between the download (or cache hit) and now, e.g. by `cache prune`
            log.info(
                "cached firmware gone before it was published: downloading it again %s",
                operation.context(),
            )
            self._join_fetch(operation)
            return
        except OSError as error:
            self._abort(operation, f"Cannot publish the firmware to the child: {error}")
            return
        announced = operation.state.announced and not operation.owed
        record = OperationRecord(
            operation_id=operation.op_id,
            child_id=operation.child_id,
            name=operation.name,
            version=operation.version,
            cloud_url=operation.cloud_url,
            child_url=self._child_url(operation),
            sha256=sha256,
            attempt=operation.attempt,
            c8y_id=operation.c8y_id,
            # it waited for a download window and Cumulocity has its 501: not announced again
            state=State.EXECUTING if announced else State.PENDING,
        )

        def write() -> None:
            self.store.save(record)
            self.fetching.delete(operation.op_id)

        def written(error: StoreError | None) -> None:
            if not self._is_live(operation) or not operation.state.fetching:
                return  # ended while the file was written
            if error is not None:
                self._abort(operation, str(error))
                return
            operation.record = record
            operation.state = step(operation.state, Event.READY).state
            self._publish_request(operation, operation.record)
            self._offer_te_command(operation)

        self.writer.submit(write, written)

    def _is_live(self, operation: LiveOperation) -> bool:
        return self.operations.get(operation.op_id) is operation and not operation.state.ended

    def _resend(self, operation: LiveOperation) -> None:
        """Publish the same request again with the incremented attempt (persisted first)."""
        assert operation.record is not None
        record = operation.record = dataclasses.replace(
            operation.record, attempt=operation.attempt, child_url=self._child_url(operation)
        )  # a signed link is renewed with every re-send
        operation.state = step(operation.state, Event.RESENT).state

        def written(error: StoreError | None) -> None:
            if error is not None:
                log.error("%s %s", error, operation.context())
            if self._is_live(operation):
                self._publish_request(operation, record)

        self.writer.submit(functools.partial(self.store.save, record), written)

    def _publish_request(self, operation: LiveOperation, record: OperationRecord) -> None:
        request = FirmwareUpdateRequest(
            operation_id=record.operation_id,
            attempt=record.attempt,
            name=record.name,
            version=record.version,
            sha256=record.sha256,
            url=record.child_url,
        )
        op_id = operation.op_id

        def refused(acknowledged: bool) -> None:
            if not acknowledged:
                self.submit(RequestRefused(op_id))

        self.publisher.publish(
            topics.firmware_request_topic(operation.child_id), request.to_json(), when_done=refused
        )
        self._arm_timeout(operation)
        log.info("firmware update request sent, attempt %d %s", record.attempt, operation.context())

    def _arm_timeout(self, operation: LiveOperation) -> None:
        operation.timer_generation += 1
        fired = TimerFired(operation.op_id, operation.timer_generation)
        timeout = self.settings.child_update_timeout
        self.timers.arm(operation.op_id, timeout, lambda: self.submit(fired))

    def _on_request_refused(self, op_id: str) -> None:
        operation = self.operations.get(op_id)
        if operation is None or operation.state.ended:
            return
        self._abort(
            operation,
            f"The MQTT broker refuses the firmware_update request for child device "
            f"{operation.child_id} (it closes the connection on it; see the broker's log)",
        )

    def _on_broker_session_lost(self) -> None:
        """The broker restarted without our session: children's answers and Cumulocity's
        operations sent meanwhile are gone. Ask again, as after a restart of our own."""
        now = self.clock()
        waiting = self._unanswered(since=now)
        log.warning(
            "the MQTT broker lost our session (it restarted without saving it): sending %d "
            "request(s) to children again and asking Cumulocity for pending operations",
            len(waiting),
        )
        for operation in waiting:
            operation.attempt += 1
            self._resend(operation)
        # After the re-sent requests (the writer keeps order): a child that subscribes once
        # it sees the gateway back must not get a request from before its subscription.
        self.writer.submit(_nothing_to_write, lambda _error: self._ask_for_pending_operations())
        again = ResendUnanswered(since=now)
        for index, delay in enumerate(self.settings.options.resend_after_session_loss):
            self.timers.arm(f"broker-session-{index}", delay, lambda: self.submit(again))

    def _ask_for_pending_operations(self) -> None:
        self.publisher.publish(topics.C8Y_UPSTREAM, smartrest.get_pending_operations())

    def _unanswered(self, since: float) -> list[LiveOperation]:
        """Operations waiting for their child that heard nothing from it since `since`."""
        return [
            op
            for op in self.operations.values()
            if op.state in (State.PENDING, State.EXECUTING) and op.heard_at < since
        ]

    def _resend_unanswered(self, since: float) -> None:
        silent = self._unanswered(since)
        if silent:
            log.info(
                "%d request(s) not answered since the broker lost our session: sent again",
                len(silent),
            )
        for operation in silent:
            operation.attempt += 1
            self._resend(operation)

    # ---- responses from the child -------------------------------------------------------

    def _on_child_response(self, topic: str, payload: bytes) -> None:
        try:
            child_id = topics.child_id_from_response_topic(topic)
            response = parse_response(payload)
        except InputError as error:
            self.peer_errors.log(
                logging.ERROR,
                ("bad response", type(error).__name__),
                "invalid firmware_update response on %r: %s",
                topic[:200],
                error,
            )
            return
        operation = self.operations.get(response.operation_id)
        if (
            operation is None
            or operation.child_id != child_id
            or operation.state.fetching
            or operation.state.ended
        ):
            self.peer_errors.log(
                logging.INFO,
                "unknown operation",
                "response for an unknown or finished operation op_id=%s child=%s: ignored",
                response.operation_id[:100],
                child_id,
            )
            return
        if operation.answered_on is None:
            operation.answered_on = "legacy"
            self._clear_te_command(operation)
        self._apply_response(operation, response)

    # ---- te/ commands offered where we play thin-edge's mapper (gateway/te_mapper) ------

    def _offer_te_command(self, operation: LiveOperation) -> None:
        if not self.settings.plays_mapper or operation.answered_on is not None:
            return
        topic = te_mapper.command_topic(self.device_id, operation.child_id, operation.op_id)
        if topic is None:
            return
        operation.te_command = topic
        command = te_mapper.initial_command(operation.cloud_url, operation.name, operation.version)
        self.publisher.publish(topic, command, retain=True)
        log.info("te/ command %s created %s", topic, operation.context())

    def _on_te_answer(self, topic: str, payload: bytes) -> None:
        response = te_mapper.answer_of(topic, payload)
        if response is None:
            return
        operation = self.operations.get(response.operation_id)
        if operation is None or operation.state.ended or operation.answered_on == "legacy":
            return
        if operation.te_command is None:
            operation.te_command = topic  # after a restart: the command is there, and ours
        operation.answered_on = "te"
        self._apply_response(operation, response)

    def _clear_te_command(self, operation: LiveOperation) -> None:
        topic, operation.te_command = operation.te_command, None
        if topic is not None:
            self.publisher.publish(topic, b"", retain=True)
            log.info("te/ command %s cleared %s", topic, operation.context())

    def _apply_response(self, operation: LiveOperation, response: FirmwareUpdateResponse) -> None:
        log.info("child reports %s %s", response.status.value, operation.context())
        operation.heard_at = self.clock()
        match response.status:
            case ChildStatus.EXECUTING:
                self._transition(operation, Event.EXECUTING)
                self._arm_timeout(operation)
            case ChildStatus.SUCCESSFUL:
                self._transition(operation, Event.SUCCESSFUL)
            case ChildStatus.FAILED:
                self._transition(operation, Event.FAILED, reason=response.reason)

    def _on_timeout(self, op_id: str, generation: int) -> None:
        operation = self.operations.get(op_id)
        if operation is None or operation.state.ended or operation.timer_generation != generation:
            return
        timeout = self.settings.child_update_timeout
        reason = timeout_reason(operation.child_id, timeout, op_id)
        self._abort(operation, reason)

    # ---- ending operations --------------------------------------------------------------

    def _abort(self, operation: LiveOperation, reason: str) -> None:
        log.error("operation failed: %s %s", reason, operation.context())
        self._transition(operation, Event.ABORTED, reason=reason)

    def _transition(
        self, operation: LiveOperation, event: Event, reason: str | None = None
    ) -> None:
        installed = smartrest.set_installed_firmware(
            operation.name, operation.version, operation.cloud_url
        )
        requested = not operation.state.fetching
        outcome = step(
            operation.state, event, reason=reason, installed=installed, c8y_id=operation.c8y_id
        )
        operation.state = outcome.state
        if outcome.state.ended:
            self._end(operation, outcome.to_cloud, requested=requested)
        else:
            self._owe(operation, outcome.to_cloud)  # the 501: recorded once acknowledged

    def _end(self, operation: LiveOperation, lines: Iterable[str], *, requested: bool) -> None:
        """Record how the operation ended and what Cumulocity is owed, then tell it and clean
        up. The record stays until the broker has acknowledged the last line.

        An operation that ended before its request went out (its download failed) keeps its
        download record instead: a restart before the broker has the lines fetches again and
        reports anew, and no file needs writing now.
        """
        new_lines = list(lines)
        # Owed at once: no acknowledgement can forget the operation before they are out.
        operation.owed.extend(new_lines)
        self.timers.cancel(operation.op_id)
        if operation.c8y_id is not None:
            self._remember_completed(operation.c8y_id)
        self._unpublish_unless_used(operation)
        if operation.answered_on == "te" and operation.state is State.SUCCESSFUL:
            twin = te_mapper.twin_topic(self.device_id, operation.child_id)
            if twin is not None:
                document = te_mapper.twin(operation.name, operation.version, operation.cloud_url)
                self.publisher.publish(twin, document, retain=True)
        self._clear_te_command(operation)
        log.info("operation %s %s", operation.state.value, operation.context())
        if not requested:
            self._publish_owed(operation, new_lines)
            return
        record = self._record_of(operation, to_cloud=operation.owed)

        def write() -> None:
            self.store.save(record)
            self.fetching.delete(operation.op_id)

        def written(error: StoreError | None) -> None:
            if error is not None:
                log.error(
                    "%s: a restart now would not resend the result %s", error, operation.context()
                )
            self._publish_owed(operation, new_lines)

        self.writer.submit(write, written)

    def _record_of(self, operation: LiveOperation, to_cloud: Iterable[str]) -> OperationRecord:
        """The operation's file as it must be now."""
        assert operation.record is not None
        return dataclasses.replace(
            operation.record, state=operation.state, to_cloud=tuple(to_cloud)
        )

    def _owe(self, operation: LiveOperation, lines: Iterable[str]) -> None:
        """Publish lines for Cumulocity; each one is owed until the broker acknowledged it."""
        new_lines = list(lines)
        operation.owed.extend(new_lines)
        self._publish_owed(operation, new_lines)
        if not operation.owed and operation.state.ended:
            self._forget(operation)

    def _publish_owed(self, operation: LiveOperation, lines: Iterable[str]) -> None:
        op_id = operation.op_id
        for line in lines:
            # Handled at once, not queued behind other inputs: the sooner the file records the
            # acknowledgement, the smaller the window in which a kill -9 makes a restart send a
            # line the broker already has (also while the session flushes at shutdown).
            def delivered(acknowledged: bool, line: str = line) -> None:
                self._on_delivered(op_id, line, acknowledged)

            topic = topics.c8y_upstream(operation.child_id)
            self.publisher.publish(topic, line, when_done=delivered)

    def _on_delivered(self, op_id: str, line: str, acknowledged: bool) -> None:
        """The broker acknowledged (or refused) a line for Cumulocity that `op_id` owed."""
        operation = self.operations.get(op_id)
        if operation is None or line not in operation.owed:
            return
        operation.owed.remove(line)
        if not acknowledged:
            log.error(
                "the MQTT broker refuses a line for Cumulocity, which will not hear it: %r %s",
                line[:200],
                operation.context(),
            )
        if operation.owed:
            return
        if operation.state.ended:
            self._forget(operation)
        elif operation.state is State.WAITING:
            self._save_fetching(operation)  # now with `announced`: a restart does not repeat it
        elif operation.state is State.EXECUTING and operation.record is not None:
            # Cumulocity has the 501: a restart must not announce the operation again
            record = operation.record = self._record_of(operation, to_cloud=())

            def written(error: StoreError | None) -> None:
                if error is not None:
                    log.warning("%s %s", error, operation.context())

            self.writer.submit(functools.partial(self.store.save, record), written)

    def _forget(self, operation: LiveOperation) -> None:
        """The broker has every line the operation owed: its file goes."""
        op_id = operation.op_id
        self.operations.pop(op_id)

        def delete() -> None:
            self.store.delete(op_id)
            self.fetching.delete(op_id)

        self.writer.submit(delete)
        log.debug("result delivered, operation forgotten %s", operation.context())

    def _unpublish_unless_used(self, operation: LiveOperation) -> None:
        """Remove the operation's published link unless a live operation or `te/` command of
        the child uses it."""
        copy = (operation.child_id, operation.file_id)
        if not self._legacy_uses(*copy) and not self.te.uses(*copy):
            self.cache.unpublish(operation.child_id, operation.file_id)
            self.cache_keeper.request()  # the entry may be free to go now

    def _start_copies_sweep(self) -> None:
        async def list_copies() -> None:
            try:
                copies = await asyncio.to_thread(self.cache.copies)
            except OSError as error:
                log.warning("cannot list the children's copies: %s", error)
                return
            self.submit(SweepCopies(tuple(copies)))

        self._sweeping = asyncio.create_task(list_copies(), name="sweep-copies")

    def _sweep_copies(self, copies: Iterable[tuple[str, str]]) -> None:
        """Remove the copies nothing uses: left from before a restart."""
        unused = [c for c in copies if not self._legacy_uses(*c) and not self.te.uses(*c)]
        for child_id, file_id in unused:
            self.cache.unpublish(child_id, file_id)
        if unused:
            log.info("removed %d child copies no operation or command uses any more", len(unused))
            self.cache_keeper.request()

    def _child_url(self, operation: LiveOperation) -> str:
        return self.links.url(self.cache.relative_path(operation.child_id, operation.file_id))

    def _legacy_copy(self, name: str, file_id: str) -> tuple[str, int] | None:
        """What the live legacy request for child `name` (by its name or its external id) was
        handed for `file_id`: SHA-256 and size."""
        addresses = (name, topics.te_child_external_id(self.settings.device_id, name))
        users = [op for child in addresses for op in self.operations.using(child, file_id)]
        if not users:
            return None
        try:
            return self.cache.published(users[0].child_id, file_id)
        except OSError:
            return None

    def _legacy_uses(self, child_id: str, file_id: str) -> bool:
        return bool(self.operations.using(child_id, file_id))


def health_up() -> str:
    document = {"pid": os.getpid(), "status": "up", "time": int(time.time())}
    return json.dumps(document, sort_keys=True, separators=(",", ":"))


def health_down() -> str:
    return json.dumps({"pid": os.getpid(), "status": "down"}, sort_keys=True, separators=(",", ":"))


def _nothing_to_write() -> None:
    """A write that only marks a place in the writer's order."""
