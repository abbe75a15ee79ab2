"""The connector: serves `firmware_update` requests for one or more child devices.

Theory of operation. One persistent MQTT session (resubscribed on every connect, with an
outbox, so a broker restart loses nothing) carries the requests of every child served. Each
operation runs in a task of its own, so children (and operations) never wait for each other,
except that the apply steps of one child run one at a time. An operation task:

1. records the request (`Phase.RECEIVED`), answers `executing`, and keeps answering it every
   `heartbeat` seconds until the operation ends, so the gateway's inactivity timeout does not
   fire during a long download or apply;
2. downloads the file (`DOWNLOADING`: the shared downloader resumes with Range/If-Range after
   cuts and across restarts, with stall timeout and retries) and checks its SHA-256
   (`DOWNLOADED`);
3. records `APPLYING`, runs the apply step, records `SUCCESSFUL` or `FAILED`, removes the
   file and only then reports it; the record is kept for re-sent requests.

Decisions about what a request or a record found at start-up calls for are pure
(`_state.on_request`, `_state.on_restart`); this module executes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import os
import time
from collections.abc import Coroutine
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tedge_firmware.connector._command import (
    Command,
    StepTimedOut,
    failure_reason,
    is_running,
    last_error_line,
    launch,
    wait,
)
from tedge_firmware.connector._model import (
    ApplyStep,
    BrokerSettings,
    DownloadSettings,
    Firmware,
    Progress,
    ProgressHook,
    VerifyStep,
    mqtt_settings,
    retry_policy,
)
from tedge_firmware.connector._state import (
    INTERRUPTED,
    OperationRecord,
    Phase,
    RequestAction,
    RestartAction,
    advance,
    expired,
    new_record,
    not_confirmed,
    on_request,
    on_restart,
    sha256_mismatch,
)
from tedge_firmware.connector._store import StepFiles, Store
from tedge_firmware.connector._te import TeStates, request_of
from tedge_firmware.core import topics
from tedge_firmware.core.firmware_update import (
    TE_FAILED,
    TE_SUCCESSFUL,
    BadRequest,
    ChildStatus,
    FirmwareUpdateRequest,
    FirmwareUpdateResponse,
    TeCommand,
    parse_request,
    parse_te_command,
    parse_te_command_topic,
)
from tedge_firmware.core.text import one_line
from tedge_firmware.errors import ConfigError, MessageError, OperationFailed, TedgeFirmwareError
from tedge_firmware.shell.downloader import PART_SUFFIX, Downloader
from tedge_firmware.shell.durable import sha256_of_file
from tedge_firmware.shell.mqtt import MqttSession
from tedge_firmware.shell.store import StoreWriter
from tedge_firmware.shell.tls import client_context

_log = logging.getLogger("tedge_firmware.connector")

DEFAULT_HEARTBEAT_S = 300.0
DEFAULT_RETENTION_S = 30 * 24 * 3600.0
STOP_GRACE_S = 5.0
FLUSH_ON_STOP_S = 2.0
_CONFIRM_WAIT_S = 30.0

_Key = tuple[str, str]


@dataclass
class _Operation:
    """An operation being worked on (in memory; its record is on disk)."""

    record: OperationRecord
    attempt: int
    task: asyncio.Task[None] | None = None
    downloaded: int = 0

    @property
    def key(self) -> _Key:
        return (self.record.child_id, self.record.operation_id)

    @property
    def context(self) -> str:
        return f"op_id={self.record.operation_id} child={self.record.child_id}"


class Connector:
    """Serves `firmware_update` requests for child devices; you provide the apply step.

    `child_ids`: the children served (one or more, each independent). `apply`: an async
    callback or a `Command`, run once per firmware with the verified file. `work_dir`: where
    operation records and downloads live (it must survive reboots for idempotency).

    Keyword arguments:

    - `verify`: decides, after an apply was interrupted (crash, reboot), whether the firmware
      is installed. Without it such an operation fails with "interrupted during apply".
    - `broker`: the MQTT broker (`BrokerSettings`); `download`: `DownloadSettings`.
    - `heartbeat`: seconds between repeated `executing` statuses while an operation runs
      (None: only the first one).
    - `on_progress`: called with a `Progress` on every phase change and while downloading.
    - `register`: publish the thin-edge capability message for every child at start-up.
    - `protocol`: `"legacy"` (thin-edge 0.x requests on `tedge/<child>/commands/req/...`, the
      default) or `"te"` (thin-edge 1.x/2.x commands `te/device/<child>///cmd/firmware_update/+`
      with the gateway's download step, see `TeStates`; the capability is always published).
    - `te_states`: the gateway's two states of a `te/` command (its `firmware.te.*` keys).
    - `retention`: seconds an ended operation's record is kept (a re-sent request for it is
      answered from it, never applied again).
    - `logger`: where to log (default `tedge_firmware.connector`); no handlers are installed.

    Construction validates everything (ValueError) and does no I/O.
    """

    def __init__(
        self,
        *child_ids: str,
        apply: ApplyStep | Command,
        work_dir: str | os.PathLike[str],
        verify: VerifyStep | Command | None = None,
        broker: BrokerSettings = BrokerSettings(),  # noqa: B008 (frozen)
        download: DownloadSettings = DownloadSettings(),  # noqa: B008 (frozen)
        heartbeat: float | None = DEFAULT_HEARTBEAT_S,
        on_progress: ProgressHook | None = None,
        register: bool = False,
        retention: float = DEFAULT_RETENTION_S,
        protocol: str = "legacy",
        te_states: TeStates = TeStates(),  # noqa: B008 (frozen)
        logger: logging.Logger | None = None,
    ) -> None:
        self._children = _checked_children(child_ids)
        if protocol not in ("legacy", "te"):
            raise ValueError(f"protocol must be 'legacy' or 'te', not {protocol!r}")
        self._te = te_states if protocol == "te" else None
        if not (isinstance(apply, Command) or callable(apply)):
            raise ValueError("apply must be an async callable or a Command")
        if verify is not None and not (isinstance(verify, Command) or callable(verify)):
            raise ValueError("verify must be an async callable, a Command or None")
        if heartbeat is not None and not heartbeat > 0:
            raise ValueError("heartbeat must be positive (or None)")
        if not retention > 0:
            raise ValueError("retention must be positive")
        self._apply = apply
        self._verify = verify
        self._settings = mqtt_settings(broker, self._children)
        self._download = download
        self._heartbeat = heartbeat if self._te is None else None  # te: the state says it
        self._on_progress = on_progress
        self._register = register or self._te is not None
        self._retention = retention
        self._log = logger or _log
        self._store = Store(Path(work_dir))
        # records and clean-ups go to disk in groups (one directory fsync per group)
        self._writer = StoreWriter()
        self._downloader = Downloader(
            parallel=download.parallel,
            retry=retry_policy(download),
            stall_timeout=download.stall_timeout,
        )
        self._locks = {child: asyncio.Lock() for child in self._children}
        self._active: dict[_Key, _Operation] = {}
        self._ended: dict[_Key, OperationRecord] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._session: MqttSession | None = None
        self._session_created = asyncio.Event()
        self._run_ended = asyncio.Event()
        self._stop = asyncio.Event()
        self._started = False

    # ---- public interface -----------------------------------------------------------------

    @property
    def child_ids(self) -> tuple[str, ...]:
        """The children this connector serves."""
        return self._children

    @property
    def work_dir(self) -> Path:
        """Where operation records and downloads live."""
        return self._store.work_dir

    async def run(self) -> None:
        """Serve requests until `stop()` is called or the task is cancelled.

        On start it picks up what an earlier run left: unfinished downloads resume, an
        interrupted apply is settled (never re-run), unreported statuses are sent again.
        Raises `ConfigError` when the work directory or the TLS files are unusable and
        `BrokerAuthError` when the broker refuses the credentials; broker outages are waited
        out. A connector runs once.
        """
        if self._started:
            raise RuntimeError("a Connector runs only once")
        self._started = True
        try:
            await self._serve()
        finally:
            self._run_ended.set()

    async def _serve(self) -> None:
        records = await asyncio.to_thread(self._load)
        settings = self._download
        context = await asyncio.to_thread(
            client_context, settings.ca_path, settings.cert_file, settings.key_file
        )
        if context is not None:  # read here: construction does no I/O
            self._downloader = Downloader(
                parallel=settings.parallel,
                retry=retry_policy(settings),
                stall_timeout=settings.stall_timeout,
                ssl_context=context,
            )
        if self._te is None:
            # every address: a child's own id, or the gateway's external id for it
            filters = [topics.firmware_request_topic("+")]
        else:
            filters = [topics.te_command_filter(child) for child in self._children]
        session = MqttSession(self._settings, filters)
        self._session = session
        self._session_created.set()
        if self._register:
            for child in self._children:
                session.publish(topics.firmware_declaration_topic(child), "{}", retain=True)
        self._log.info(
            "connector started: children=%s broker=%s work_dir=%s",
            ",".join(self._children),
            self._settings.address,
            self._store.work_dir,
        )
        for record in records:
            self._recover(record)
        tasks = [
            asyncio.create_task(session.run(), name="connector-mqtt"),
            asyncio.create_task(self._pump(session), name="connector-inbox"),
        ]
        stopper = asyncio.create_task(self._stop.wait(), name="connector-stop")
        try:
            done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
            await self._shutdown(session, tasks)
        for task in tasks:
            if task in done and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]

    def stop(self) -> None:
        """Ask `run()` to return after a graceful shutdown.

        Downloads stop and resume at the next run; a running apply callback is cancelled and
        a running apply command is left to finish (the next run settles the operation).
        """
        self._stop.set()

    async def wait_connected(self) -> None:
        """Return once `run()` is connected to the broker and subscribed to the requests.

        Waits for `run()` to start; raises `TedgeFirmwareError` when `run()` has ended.
        """
        waiters = [
            asyncio.create_task(self._session_created.wait()),
            asyncio.create_task(self._run_ended.wait()),
        ]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        if self._session is None or self._run_ended.is_set():
            raise TedgeFirmwareError("the connector is not running")
        await self._session.wait_connected()

    # ---- start and stop -------------------------------------------------------------------

    def _load(self) -> list[OperationRecord]:
        """Create the directories; the records worth keeping (blocking: runs in a thread)."""
        now = time.time()
        kept: list[OperationRecord] = []
        for child in self._children:
            try:
                self._store.prepare(child)
                records = self._store.load(child)
                live = [r for r in records if not expired(r, now, self._retention)]
                for record in records:
                    if record not in live:
                        self._store.forget(record)
                self._store.sweep(child, [r.operation_id for r in live if not r.phase.ended])
            except OSError as error:
                raise ConfigError(
                    f"cannot use the work directory {self._store.work_dir}: "
                    f"{error.strerror or error}"
                ) from error
            kept += live
        return kept

    def _recover(self, record: OperationRecord) -> None:
        key = (record.child_id, record.operation_id)
        action = on_restart(record)
        context = f"op_id={record.operation_id} child={record.child_id}"
        if action in (RestartAction.RESUME, RestartAction.SETTLE):
            self._log.info(
                "resuming the operation (%s) after a restart %s", record.phase.value, context
            )
            self._start(record, new=False)
            return
        self._ended[key] = record
        if action is RestartAction.REPORT and record.command is not None:
            # Only if the command is still where we left it: its retained state comes back
            # (REPORT_AGAIN); one the mapper cleared meanwhile must not be revived.
            return
        if action is RestartAction.REPORT:
            self._log.info("reporting %s again after a restart %s", record.phase.value, context)
            self._report(record)

    async def _shutdown(self, session: MqttSession, tasks: list[asyncio.Task[None]]) -> None:
        work = [op.task for op in self._active.values() if op.task is not None]
        work += [tasks[1], *self._background]
        for task in work:
            task.cancel()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(STOP_GRACE_S):
                await asyncio.gather(*work, return_exceptions=True)
        await session.close(timeout=FLUSH_ON_STOP_S)
        tasks[0].cancel()
        await asyncio.gather(tasks[0], return_exceptions=True)
        await self._downloader.close()
        await self._writer.close()
        self._log.info("connector stopped")

    # ---- requests -------------------------------------------------------------------------

    async def _pump(self, session: MqttSession) -> None:
        while True:
            message = await session.messages.get()
            try:
                self._on_message(message.topic, message.payload)
            except Exception:  # one bad message must never stop the connector
                self._log.exception("unexpected error with a message on %s", message.topic[:200])

    def _on_message(self, topic: str, payload: bytes) -> None:
        if self._te is not None:
            self._on_te_command(self._te, topic, payload)
            return
        addressee = topics.request_addressee(topic, self._children)
        if addressee is None:
            self._log.debug("message on %s ignored", topic[:200])
            return
        child, address = addressee
        parsed = parse_request(payload)
        if isinstance(parsed, BadRequest):
            self._on_bad_request(child, parsed, address=address)
            return
        self._on_request(child, parsed, address=address)

    def _on_te_command(self, states: TeStates, topic: str, payload: bytes) -> None:
        try:
            where = parse_te_command_topic(topic)
            command = parse_te_command(payload)
        except MessageError as error:
            self._log.warning("te/ command on %s ignored: %s", topic[:200], error)
            return
        child = where.device_name
        if child not in self._children or command is None:
            return  # not ours, or cleared
        following = states.next_state(command.status)
        if following is not None:
            self._log.info(
                "te/ command %s moved to %s op_id=%s child=%s",
                command.status,
                following,
                where.cmd_id,
                child,
            )
            self._publish_te(topic, command.moved_to(following))
        elif command.status == states.downloaded_state:
            parsed = request_of(where.cmd_id, command)
            if isinstance(parsed, BadRequest):
                self._on_bad_request(child, parsed, command)
            else:
                self._on_request(child, parsed, command)

    def _on_request(
        self,
        child: str,
        parsed: FirmwareUpdateRequest,
        command: TeCommand | None = None,
        *,
        address: str | None = None,
    ) -> None:
        key = (child, parsed.operation_id)
        running = self._active.get(key)
        known = running.record if running is not None else self._ended.get(key)
        context = f"op_id={parsed.operation_id} child={child}"
        match on_request(known, running is not None):
            case RequestAction.START:
                self._log.info(
                    "firmware update request name=%s version=%s attempt=%d %s",
                    parsed.name,
                    parsed.version,
                    parsed.attempt,
                    context,
                )
                fields = None if command is None else command.fields
                record = new_record(child, parsed, time.time(), fields, address)
                self._start(record, new=True)
            case RequestAction.ACKNOWLEDGE:
                assert running is not None
                running.attempt = max(running.attempt, parsed.attempt)
                self._log.info(
                    "request re-sent (attempt %d) while running %s", parsed.attempt, context
                )
                self._acknowledge(running.record)
            case RequestAction.REPORT_AGAIN:
                assert known is not None
                if known.command is not None and known.reported:
                    return  # the broker has it; a stale copy of the command must not revive it
                self._log.info(
                    "request re-sent (attempt %d) for an operation already %s: reporting it "
                    "again, not doing it again %s",
                    parsed.attempt,
                    known.phase.value,
                    context,
                )
                self._report(known)

    def _on_bad_request(
        self,
        child: str,
        bad: BadRequest,
        command: TeCommand | None = None,
        *,
        address: str | None = None,
    ) -> None:
        if bad.operation_id is None:
            self._log.warning(
                "unusable firmware_update request for child=%s ignored: %s", child, bad.problem
            )
            return
        context = f"op_id={bad.operation_id} child={child}"
        key = (child, bad.operation_id)
        if key in self._active or key in self._ended:
            self._log.warning("invalid re-sent request ignored (%s) %s", bad.problem, context)
            return
        self._log.error("invalid firmware_update request: %s %s", bad.problem, context)
        reason = f"Invalid firmware_update request: {bad.problem}"
        if command is not None:
            topic = topics.te_command_topic(child, bad.operation_id)
            self._publish_te(topic, command.failed(reason))
            return
        self._publish(
            address or child,
            FirmwareUpdateResponse(bad.operation_id, ChildStatus.FAILED, reason).to_json(),
        )

    # ---- one operation --------------------------------------------------------------------

    def _start(self, record: OperationRecord, *, new: bool) -> None:
        operation = _Operation(record, attempt=record.attempt)
        self._active[operation.key] = operation
        operation.task = asyncio.create_task(
            self._drive(operation, new), name=f"firmware {record.child_id} {record.operation_id}"
        )

    async def _drive(self, op: _Operation, new: bool) -> None:
        try:
            try:
                final = await self._work(op, new)
            except OperationFailed as failure:
                final = self._failed(op, failure.reason)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # a bug must end the operation, not leave it hanging
                self._log.exception("unexpected error %s", op.context)
                final = self._failed(op, f"internal error: {_describe(error)}")
            await self._conclude(op, final)
        except asyncio.CancelledError:
            self._active.pop(op.key, None)
            raise

    async def _work(self, op: _Operation, new: bool) -> OperationRecord:
        if new:
            await self._save(op, op.record)
        self._acknowledge(op.record)
        self._notify(op)
        heartbeat = self._start_heartbeat(op)
        try:
            if op.record.phase is Phase.APPLYING:
                async with self._locks[op.record.child_id]:
                    return await self._settle(op)
            firmware = await self._fetch(op)
            async with self._locks[op.record.child_id]:
                return await self._run_apply(op, firmware)
        finally:
            if heartbeat is not None:
                heartbeat.cancel()

    async def _fetch(self, op: _Operation) -> Firmware:
        """The verified file: found from an earlier run, or downloaded (resuming) and checked."""
        record = op.record
        target = self._store.firmware(record.child_id, record.operation_id)
        if await asyncio.to_thread(target.is_file):
            if await _digest_or_none(target) == record.sha256:
                if record.phase is not Phase.DOWNLOADED:
                    await self._advance(op, Phase.DOWNLOADED)
                return self._firmware(op, target)
            self._log.warning(
                "the downloaded file changed on disk: downloading again %s", op.context
            )
            await asyncio.to_thread(target.unlink, missing_ok=True)
        if record.phase is not Phase.DOWNLOADING:
            await self._advance(op, Phase.DOWNLOADING)
        watcher = asyncio.create_task(self._watch_download(op, target))
        try:
            result = await self._downloader.download(record.url, target)
        finally:
            watcher.cancel()
        op.downloaded = result.size
        if result.sha256 != record.sha256:
            await asyncio.to_thread(target.unlink, missing_ok=True)
            raise OperationFailed(sha256_mismatch(record.sha256, result.sha256))
        self._log.info("downloaded and verified (%d bytes) %s", result.size, op.context)
        await self._advance(op, Phase.DOWNLOADED)
        return self._firmware(op, target)

    async def _run_apply(self, op: _Operation, firmware: Firmware) -> OperationRecord:
        await self._advance(op, Phase.APPLYING)
        self._log.info("applying %s %s %s", firmware.name, firmware.version, op.context)
        apply = self._apply
        if isinstance(apply, Command):
            return await self._apply_command(op, apply, firmware)
        try:
            await _call(apply, firmware)
        except Exception as error:
            return self._failed(op, _describe(error))
        return self._succeeded(op)

    async def _apply_command(
        self, op: _Operation, command: Command, firmware: Firmware
    ) -> OperationRecord:
        files = self._step_files(op, "apply")
        try:
            job = await launch(command, firmware.environment(), files)
        except OSError as error:
            return self._failed(op, f"cannot start the apply command: {error}")
        await self._save(op, replace(op.record, process=job))
        return await self._apply_outcome(op, files, command.timeout)

    async def _apply_outcome(
        self, op: _Operation, files: StepFiles, limit: float | None
    ) -> OperationRecord:
        job = op.record.process
        assert job is not None
        try:
            status = await wait(job, files, limit)
        except StepTimedOut as error:
            return self._failed(op, f"apply command {error}")
        reason = await asyncio.to_thread(failure_reason, "apply", status, files.err)
        return self._succeeded(op) if reason is None else self._failed(op, reason)

    async def _settle(self, op: _Operation) -> OperationRecord:
        """An apply that was interrupted: decide without running it again."""
        job = op.record.process
        files = self._step_files(op, "apply")
        if job is not None:
            if is_running(job):
                self._log.info("the apply command is still running: waiting for it %s", op.context)
            limit = self._apply.timeout if isinstance(self._apply, Command) else None
            try:
                status = await wait(job, files, limit)
            except StepTimedOut as error:
                return self._failed(op, f"apply command {error}")
            if status is not None:
                self._log.info(
                    "the apply command started before the restart has ended %s", op.context
                )
                reason = await asyncio.to_thread(failure_reason, "apply", status, files.err)
                return self._succeeded(op) if reason is None else self._failed(op, reason)
        return await self._verify_interrupted(op)

    async def _verify_interrupted(self, op: _Operation) -> OperationRecord:
        verify = self._verify
        if verify is None:
            self._log.warning(
                "the apply was interrupted and there is no verify step %s", op.context
            )
            return self._failed(op, INTERRUPTED)
        self._log.info("the apply was interrupted: asking the verify step %s", op.context)
        firmware = self._firmware(
            op, self._store.firmware(op.record.child_id, op.record.operation_id)
        )
        if isinstance(verify, Command):
            detail = await self._verify_command(op, verify, firmware)
            confirmed = detail is None
        else:
            try:
                confirmed = await _call(verify, firmware) is True
                detail = None
            except Exception as error:
                confirmed, detail = False, _describe(error)
        if confirmed:
            return self._succeeded(op)
        return self._failed(op, not_confirmed(op.record, detail))

    async def _verify_command(
        self, op: _Operation, command: Command, firmware: Firmware
    ) -> str | None:
        """None when the verify command confirms; else what it said (or "")."""
        files = self._step_files(op, "verify")
        try:
            job = await launch(command, firmware.environment(), files)
            status = await wait(job, files, command.timeout)
        except OSError as error:
            return f"cannot start the verify command: {error}"
        except StepTimedOut as error:
            return f"verify command {error}"
        if status == 0:
            return None
        return await asyncio.to_thread(last_error_line, files.err) or ""

    async def _conclude(self, op: _Operation, final: OperationRecord) -> None:
        try:
            await self._writer.write(functools.partial(self._store.save, final))
        except OSError as error:
            self._log.error("cannot record the end of the operation: %s %s", error, op.context)
        # The files go before the status: whoever sees the end sees them gone (and the final
        # record, already saved, no longer needs them).
        try:
            await self._writer.write(
                functools.partial(self._store.discard_files, final.child_id, final.operation_id)
            )
        except OSError as error:
            self._log.warning("cannot remove the operation's files: %s %s", error, op.context)
        # Only now is a re-sent request answered from the final record (until then: executing).
        self._ended[op.key] = final
        self._active.pop(op.key, None)
        op.record = final
        self._notify(op)
        self._report(final)
        suffix = f": {final.reason}" if final.reason else ""
        self._log.info("operation %s%s %s", final.phase.value, suffix, op.context)

    # ---- helpers --------------------------------------------------------------------------

    async def _advance(self, op: _Operation, phase: Phase) -> None:
        record = advance(op.record, phase, now=time.time())
        await self._save(op, replace(record, attempt=max(record.attempt, op.attempt)))

    async def _save(self, op: _Operation, record: OperationRecord) -> None:
        try:
            await self._writer.write(functools.partial(self._store.save, record))
        except OSError as error:
            raise OperationFailed(
                f"cannot record the operation in {self._store.work_dir}: {error.strerror or error}"
            ) from error
        op.record = record
        self._notify(op)

    def _failed(self, op: _Operation, reason: str) -> OperationRecord:
        if op.record.phase.ended:
            return op.record
        return advance(op.record, Phase.FAILED, now=time.time(), reason=one_line(reason))

    def _succeeded(self, op: _Operation) -> OperationRecord:
        return advance(op.record, Phase.SUCCESSFUL, now=time.time())

    def _firmware(self, op: _Operation, path: Path) -> Firmware:
        record = op.record
        return Firmware(
            child_id=record.child_id,
            operation_id=record.operation_id,
            attempt=max(record.attempt, op.attempt),
            name=record.name,
            version=record.version,
            sha256=record.sha256,
            url=record.url,
            path=path,
        )

    def _step_files(self, op: _Operation, step: str) -> StepFiles:
        return self._store.step_files(op.record.child_id, op.record.operation_id, step)

    def _acknowledge(self, record: OperationRecord) -> None:
        """`executing` for a legacy request; a `te/` command is executing already."""
        if record.command is None:
            response = FirmwareUpdateResponse(record.operation_id, ChildStatus.EXECUTING)
            self._publish(record.address or record.child_id, response.to_json())

    def _report(self, record: OperationRecord) -> None:
        if record.command is not None:
            command = TeCommand(record.command)
            topic = topics.te_command_topic(record.child_id, record.operation_id)
            if record.phase is Phase.SUCCESSFUL:
                self._publish_te(topic, command.moved_to(TE_SUCCESSFUL))
            else:
                self._publish_te(topic, command.failed(record.reason or TE_FAILED))
        else:
            status = (
                ChildStatus.SUCCESSFUL if record.phase is Phase.SUCCESSFUL else ChildStatus.FAILED
            )
            response = FirmwareUpdateResponse(record.operation_id, status, record.reason)
            self._publish(record.address or record.child_id, response.to_json())
        if not record.reported:
            self._spawn(self._confirm_reported(record))

    async def _confirm_reported(self, record: OperationRecord) -> None:
        """Mark the record reported once the broker acknowledged everything published so far."""
        session = self._session
        assert session is not None
        while not await session.flush(_CONFIRM_WAIT_S):
            pass
        reported = replace(record, reported=True)
        key = (record.child_id, record.operation_id)
        if self._ended.get(key) is not record:
            return
        try:
            await self._writer.write(functools.partial(self._store.save, reported))
        except OSError as error:
            self._log.debug("cannot mark %s reported: %s", record.operation_id, error)
            return
        if self._ended.get(key) is record:
            self._ended[key] = reported

    def _publish(self, address: str, payload: str) -> None:
        """A response on `tedge/<address>/commands/res/firmware_update`."""
        assert self._session is not None
        self._session.publish(topics.firmware_response_topic(address), payload)

    def _publish_te(self, topic: str, payload: str) -> None:
        """A `te/` command in its next state: the whole payload, retained."""
        assert self._session is not None
        self._session.publish(topic, payload, retain=True)

    def _start_heartbeat(self, op: _Operation) -> asyncio.Task[None] | None:
        if self._heartbeat is None:
            return None
        return asyncio.create_task(self._beat(op, self._heartbeat), name=f"heartbeat {op.context}")

    async def _beat(self, op: _Operation, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)  # a period, not a wait for an event
            self._acknowledge(op.record)

    async def _watch_download(self, op: _Operation, target: Path) -> None:
        """Tell the progress hook how many bytes are on disk, every `progress_interval`."""
        if self._on_progress is None:
            return
        part = target.with_name(target.name + PART_SUFFIX)
        while True:
            await asyncio.sleep(self._download.progress_interval)
            try:
                size = (await asyncio.to_thread(part.stat)).st_size
            except OSError:
                continue
            if size != op.downloaded:
                op.downloaded = size
                self._notify(op)

    def _notify(self, op: _Operation) -> None:
        if self._on_progress is None:
            return
        record = op.record
        progress = Progress(
            record.child_id, record.operation_id, record.phase, op.downloaded, record.reason
        )
        try:
            self._on_progress(progress)
        except Exception:
            self._log.exception("the progress hook failed %s", op.context)

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def _checked_children(child_ids: tuple[str, ...]) -> tuple[str, ...]:
    if not child_ids:
        raise ValueError("at least one child id is needed")
    for child in child_ids:
        if not isinstance(child, str):
            raise ValueError(f"child ids are strings, not {type(child).__name__}")
        problem = topics.child_id_problem(child)
        if problem is not None:
            raise ValueError(problem)
    return tuple(dict.fromkeys(child_ids))


async def _call(step: ApplyStep | VerifyStep, firmware: Firmware) -> object:
    """Call a user step; a plain function is accepted too (its result is used as is)."""
    result: object = step(firmware)
    if inspect.isawaitable(result):
        return await result
    return result


async def _digest_or_none(path: Path) -> str | None:
    try:
        return await asyncio.to_thread(sha256_of_file, path)
    except OSError:
        return None


def _describe(error: BaseException) -> str:
    return one_line(str(error)) or type(error).__name__
