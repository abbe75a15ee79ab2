"""The connector's work directory: operation records, downloads and step output, per child.

    <work_dir>/<child>/operations/<key>.json         one record per operation (atomic writes)
    <work_dir>/<child>/operations/.corrupt/           unreadable records, moved aside and logged
    <work_dir>/<child>/downloads/<key>.firmware       the file (+ the downloader's .part files)
    <work_dir>/<child>/steps/<key>.<step>.{out,err,status}   output and exit status of commands

`<key>` is `file_key(operation id)`. Every method blocks (call it in a worker thread) and raises
OSError; the caller decides what a failure means for the operation.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tedge_firmware.connector._state import OperationRecord, decode_record, encode_record, file_key
from tedge_firmware.shell.durable import quarantine, write_atomically

log = logging.getLogger(__name__)

_RECORD_SUFFIX = ".json"
_MAX_RECORD_BYTES = 1 << 20


@dataclass(frozen=True)
class StepFiles:
    """Where a command's standard output, standard error and exit status go."""

    out: Path
    err: Path
    status: Path

    def clear(self) -> None:
        for path in (self.out, self.err, self.status, _temp(self.status)):
            path.unlink(missing_ok=True)


class Store:
    def __init__(self, work_dir: Path) -> None:
        self.work_dir = work_dir

    def prepare(self, child_id: str) -> None:
        """Create the child's directories (OSError when the work directory is unusable)."""
        for directory in (
            self._records(child_id),
            self._downloads(child_id),
            self._steps(child_id),
        ):
            directory.mkdir(parents=True, exist_ok=True)

    def save(self, record: OperationRecord) -> None:
        """Write the record atomically: temp file, fsync, rename, fsync of the directory."""
        directory = self._records(record.child_id)
        target = directory / f"{file_key(record.operation_id)}{_RECORD_SUFFIX}"
        write_atomically(target, encode_record(record), temp=_temp(target))

    def load(self, child_id: str) -> list[OperationRecord]:
        """Every readable record of the child; unreadable ones are moved to `.corrupt/`."""
        records = []
        for path in sorted(self._records(child_id).glob(f"*{_RECORD_SUFFIX}")):
            try:
                record = self._read(path)
            except (OSError, ValueError) as error:
                quarantine(path, f"operation record: {error}")
                continue
            if record.child_id != child_id or path.stem != file_key(record.operation_id):
                quarantine(path, "operation record of another child or operation")
                continue
            records.append(record)
        return records

    def forget(self, record: OperationRecord) -> None:
        """Remove the record and everything the operation left on disk."""
        self.discard_files(record.child_id, record.operation_id)
        path = self._records(record.child_id) / f"{file_key(record.operation_id)}{_RECORD_SUFFIX}"
        path.unlink(missing_ok=True)

    def firmware(self, child_id: str, operation_id: str) -> Path:
        return self._downloads(child_id) / f"{file_key(operation_id)}.firmware"

    def step_files(self, child_id: str, operation_id: str, step: str) -> StepFiles:
        base = self._steps(child_id) / f"{file_key(operation_id)}.{step}"
        return StepFiles(
            out=base.with_name(base.name + ".out"),
            err=base.with_name(base.name + ".err"),
            status=base.with_name(base.name + ".status"),
        )

    def discard_files(self, child_id: str, operation_id: str) -> None:
        """Remove the operation's download (complete or partial) and its step output."""
        key = file_key(operation_id)
        for directory in (self._downloads(child_id), self._steps(child_id)):
            for path in directory.glob(f"{key}.*"):
                path.unlink(missing_ok=True)

    def sweep(self, child_id: str, keep: Iterable[str]) -> None:
        """Remove downloads and step output of operations other than `keep` (operation ids)."""
        kept = {file_key(operation_id) for operation_id in keep}
        for directory in (self._downloads(child_id), self._steps(child_id)):
            for path in directory.iterdir():
                if path.name.split(".", 1)[0] not in kept and path.is_file():
                    log.info("removing %s, left by an operation that is over", path)
                    path.unlink(missing_ok=True)

    def _read(self, path: Path) -> OperationRecord:
        with path.open("rb") as source:
            data = source.read(_MAX_RECORD_BYTES + 1)
        if len(data) > _MAX_RECORD_BYTES:
            raise ValueError("larger than any record")
        return decode_record(data)

    def _records(self, child_id: str) -> Path:
        return self.work_dir / child_id / "operations"

    def _downloads(self, child_id: str) -> Path:
        return self.work_dir / child_id / "downloads"

    def _steps(self, child_id: str) -> Path:
        return self.work_dir / child_id / "steps"


def _temp(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")
