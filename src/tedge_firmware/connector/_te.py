"""A child's side of thin-edge 1.x/2.x `te/` firmware_update commands: pure, no I/O.

The child owns `executing`, `successful` and `failed`; the gateway (tedge-firmware) owns one
state of its own. A connector in `te` mode moves each command it is given:

    init ──▶ executing ──▶ <download_state>   (the gateway downloads for the whole fleet)
    <downloaded_state> ──▶ download tedgeUrl, check sha256, apply ──▶ successful | failed

Each move is taken from the command's retained state, whole payload kept, so a restart at any
point picks up where the broker says the command is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from tedge_firmware.core.firmware_update import (
    TE_EXECUTING,
    TE_INIT,
    BadRequest,
    FirmwareUpdateRequest,
    TeCommand,
    parse_request,
    te_state_problem,
)


@dataclass(frozen=True)
class TeStates:
    """The gateway's states of the command, as configured there (`firmware.te.*` keys)."""

    download_state: str = "gateway_download"
    downloaded_state: str = "gateway_downloaded"

    def __post_init__(self) -> None:
        for state in (self.download_state, self.downloaded_state):
            problem = te_state_problem(state)
            if problem is not None:
                raise ValueError(problem)
        if self.download_state == self.downloaded_state:
            raise ValueError("download_state and downloaded_state must differ")

    def next_state(self, status: str) -> str | None:
        """Where the child moves a command in `status` at once; None when it does not."""
        if status == TE_INIT:
            return TE_EXECUTING
        if status == TE_EXECUTING:
            return self.download_state
        return None


def request_of(cmd_id: str, command: TeCommand) -> FirmwareUpdateRequest | BadRequest:
    """The command in the downloaded state, as the request the connector carries out (the
    same checks as a legacy request: sha256 required, a usable url)."""
    fields = command.fields
    legacy = {
        "id": cmd_id,
        "name": fields.get("name", ""),
        "version": fields.get("version", ""),
        "sha256": fields.get("sha256"),
        "url": fields.get("tedgeUrl"),
    }
    parsed = parse_request(json.dumps(legacy).encode())
    if isinstance(parsed, BadRequest):
        problem = parsed.problem.replace("'url'", "'tedgeUrl'")
        return BadRequest(cmd_id, problem)
    return parsed
