"""The rollout as the demo follows it, and its result."""

from __future__ import annotations

from dataclasses import dataclass

from tedge_firmware.demo.children import Fleet
from tedge_firmware.demo.options import FAIL_REASON, FIRMWARE_NAME, FIRMWARE_VERSION, cloud_id
from tedge_firmware.sim import C8ySimulator, Operation, OperationStatus

# --- the result --------------------------------------------------------------------------


@dataclass(frozen=True)
class ChildResult:
    child_id: str
    role: str
    status: str  # SUCCESSFUL, FAILED, or the last status when the demo ran out of time
    seconds: float | None
    attempts: int  # Cumulocity operations created for this child
    bytes: int  # bytes the child fetched from the gateway
    reason: str | None
    protocol: str = "legacy"

    @property
    def as_expected(self) -> bool:
        if self.role == "fail":
            return self.status == "FAILED" and self.reason == FAIL_REASON
        return self.status == "SUCCESSFUL"


@dataclass(frozen=True)
class DemoResult:
    children: list[ChildResult]
    size: int
    seconds: float
    cloud_downloads: int  # GETs of the binary that started at byte 0
    cloud_requests: int  # those that fetched bytes (a download or its resumption)
    cloud_confirmations: int  # revalidations of the cached copy answered 304 (no body)
    cloud_bytes: int
    bytes_to_children: int
    protocol_errors: list[str]
    gateway_peak_rss_kib: int | None
    installed: int  # children whose inventory shows the new firmware

    @property
    def ok(self) -> bool:
        return (
            all(child.as_expected for child in self.children)
            and self.cloud_downloads == 1
            and not self.protocol_errors
        )

    def count(self, status: str) -> int:
        return sum(1 for child in self.children if child.status == status)


# --- the rollout -------------------------------------------------------------------------


class Rollout:
    """Drives the bulk operation and its retries; tells what each child's state is."""

    def __init__(self, sim: C8ySimulator, fleet: Fleet, url: str) -> None:
        self.sim = sim
        self.fleet = fleet
        self.url = url
        self.retried: set[str] = set()

    def start(self, ramp: float) -> None:
        self.sim.bulk_firmware_operation(
            [cloud_id(child) for child in self.fleet.views],
            FIRMWARE_NAME,
            FIRMWARE_VERSION,
            self.url,
            ramp_seconds=ramp,
        )

    def retry_flaky(self) -> None:
        """A flaky child whose operation failed gets one new operation (as a person would)."""
        for child, view in self.fleet.views.items():
            if view.role != "flaky" or child in self.retried:
                continue
            last = self.last(child)
            if last is not None and last.status is OperationStatus.FAILED:
                self.retried.add(child)
                self.sim.create_firmware_operation(
                    cloud_id(child), FIRMWARE_NAME, FIRMWARE_VERSION, self.url
                )

    def last(self, child: str) -> Operation | None:
        operations = self.sim.operations_of(cloud_id(child))
        return operations[-1] if operations else None

    def settled(self, child: str) -> bool:
        last = self.last(child)
        if last is None or not last.status.final:
            return False
        role = self.fleet.views[child].role
        retry_due = role == "flaky" and child not in self.retried
        return not (retry_due and last.status is OperationStatus.FAILED)

    def done(self) -> bool:
        return all(self.settled(child) for child in self.fleet.views)

    def result_of(self, child: str) -> ChildResult:
        view = self.fleet.views[child]
        operations = self.sim.operations_of(cloud_id(child))
        last = operations[-1] if operations else None
        seconds = None
        if last is not None and last.status.final and last.history:
            seconds = last.history[-1].at - operations[0].created
        return ChildResult(
            child_id=child,
            role=view.role,
            status=last.status.value if last is not None else "NOT CREATED",
            seconds=seconds,
            attempts=len(operations),
            bytes=view.bytes_total,
            reason=last.failure_reason if last is not None else None,
            protocol=view.protocol,
        )


def collect(rollout: Rollout, size: int, seconds: float, rss: int | None, name: str) -> DemoResult:
    sim = rollout.sim
    stats = sim.stats.files.get(name)
    statuses = stats.statuses if stats is not None else ()
    installed = sum(
        1
        for child in rollout.fleet.views
        if (device := sim.device(cloud_id(child))) is not None
        and device.firmware is not None
        and device.firmware.version == FIRMWARE_VERSION
    )
    return DemoResult(
        children=[rollout.result_of(child) for child in rollout.fleet.views],
        size=size,
        seconds=seconds,
        cloud_downloads=statuses.count(200),
        cloud_requests=(stats.requests if stats is not None else 0) - statuses.count(304),
        cloud_confirmations=statuses.count(304),
        cloud_bytes=stats.bytes_served if stats is not None else 0,
        bytes_to_children=rollout.fleet.bytes_to_children,
        protocol_errors=[str(error) for error in sim.errors],
        gateway_peak_rss_kib=rss,
        installed=installed,
    )
