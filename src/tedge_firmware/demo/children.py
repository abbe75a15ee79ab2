"""The simulated children: their roles (ok, failing, flaky) and what each is doing."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from tedge_firmware.connector import (
    Firmware,
    Phase,
    Progress,
)
from tedge_firmware.demo.options import FAIL_REASON, FLAKY_REASON, DemoOptions


@dataclass
class ChildView:
    """What the demo knows about one child: its role and what the connector reported."""

    child_id: str
    role: str  # "ok", "fail" or "flaky"
    protocol: str = "legacy"  # "legacy" (tedge/<child>/commands/...) or "te" (te/ commands)
    phase: str = "waiting"
    downloaded: int = 0  # bytes of the current operation
    bytes_total: int = 0  # bytes fetched from the gateway over every operation
    applies: int = 0
    reason: str | None = None
    operations: dict[str, int] = field(default_factory=dict)  # connector op id → bytes

    @property
    def should_succeed(self) -> bool:
        return self.role != "fail"


def child_roles(options: DemoOptions) -> dict[str, str]:
    """c01…cNN; the last `fail` ones fail, the `flaky` ones before them are flaky."""
    width = max(2, len(str(options.children)))
    ids = [f"c{index:0{width}d}" for index in range(1, options.children + 1)]
    roles = {child: "ok" for child in ids}
    ordinary = options.children - options.fail - options.flaky
    for child in ids[ordinary : ordinary + options.flaky]:
        roles[child] = "flaky"
    for child in ids[ordinary + options.flaky :]:
        roles[child] = "fail"
    return roles


def child_protocols(options: DemoOptions, children: list[str]) -> dict[str, str]:
    """Which protocol each child speaks; `mixed`: every other child speaks `te`."""
    if options.protocol != "mixed":
        return {child: options.protocol for child in children}
    return {child: "te" if index % 2 else "legacy" for index, child in enumerate(children)}


class Fleet:
    """The simulated children: the demo apply step and the progress the connector reports."""

    def __init__(
        self,
        roles: dict[str, str],
        apply_seconds: float,
        protocols: dict[str, str] | None = None,
    ) -> None:
        protocols = protocols or {}
        self.views = {
            child: ChildView(child, role, protocols.get(child, "legacy"))
            for child, role in roles.items()
        }
        self.apply_seconds = apply_seconds

    def speaking(self, protocol: str) -> list[str]:
        return [child for child, view in self.views.items() if view.protocol == protocol]

    async def apply(self, firmware: Firmware) -> None:
        view = self.views[firmware.child_id]
        view.applies += 1
        await asyncio.sleep(self.apply_seconds)  # the "flash" itself: time is the point here
        if view.role == "fail":
            raise RuntimeError(FAIL_REASON)
        if view.role == "flaky" and view.applies == 1:
            raise RuntimeError(FLAKY_REASON)

    def on_progress(self, progress: Progress) -> None:
        view = self.views.get(progress.child_id)
        if view is None:
            return
        view.phase = progress.phase.value
        view.operations[progress.operation_id] = progress.downloaded
        view.downloaded = progress.downloaded
        view.bytes_total = sum(view.operations.values())
        if progress.phase is Phase.FAILED:
            view.reason = progress.reason

    @property
    def bytes_to_children(self) -> int:
        return sum(view.bytes_total for view in self.views.values())
