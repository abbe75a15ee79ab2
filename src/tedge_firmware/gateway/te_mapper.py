"""Where `tedge-firmware run` plays thin-edge's mapper for children registered over `te/`.

Such a child has the external id `<main device id>:device:<name>`. It may run tedge-agent
(it takes `te/` commands) or a client such as thin-edge's python-tedge-agent (it takes legacy
requests at `tedge/<external id>/commands/req/firmware_update`); nothing says which. So the
operation is offered both ways, and the first answer decides:

- the legacy request goes out as for any child;
- a retained command `te/device/<name>///cmd/firmware_update/tedge-firmware-<op id>` is
  created in `init` with `remoteUrl`, `name`, `version` (the `te/` participant serves it when
  the child's workflow hands it over, from the same cache);
- the child's first answer on either side makes that side the operation's: a legacy answer
  clears the command at once; `executing`, `successful`, `failed` of the command count as the
  child's responses, and its end clears it (and, after `successful`, updates the child's
  `twin/firmware`, as thin-edge's mapper does).

Whatever ends the operation (also a timeout) clears the command. Nothing is persisted here:
the command's topic follows from the operation id, and the broker keeps the command.

`c8y-firmware-plugin` beside thin-edge's own mapper does none of this: the mapper creates and
reports the commands of these children itself, so their `515`s are left to it.
"""

from __future__ import annotations

import json

from tedge_firmware.core import topics
from tedge_firmware.core.firmware_update import (
    TE_EXECUTING,
    TE_FAILED,
    TE_INIT,
    TE_SUCCESSFUL,
    ChildStatus,
    FirmwareUpdateResponse,
    TeCommand,
    parse_te_command,
    parse_te_command_topic,
)
from tedge_firmware.errors import MessageError

CMD_PREFIX = "tedge-firmware-"
_STATUSES = {
    TE_EXECUTING: ChildStatus.EXECUTING,
    TE_SUCCESSFUL: ChildStatus.SUCCESSFUL,
    TE_FAILED: ChildStatus.FAILED,
}


def command_topic(main_device_id: str, child_id: str, op_id: str) -> str | None:
    """The command we create for an operation of `child_id`; None when the child was not
    registered over `te/`."""
    name = topics.te_child_name(child_id, main_device_id)
    if name is None:
        return None
    return topics.te_command_topic(name, f"{CMD_PREFIX}{op_id}")


def initial_command(remote_url: str, name: str, version: str) -> str:
    """The command in `init`, as thin-edge's mapper creates it (no proxy here: no tedgeUrl)."""
    document = {"status": TE_INIT, "remoteUrl": remote_url, "name": name, "version": version}
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False)


def twin_topic(main_device_id: str, child_id: str) -> str | None:
    name = topics.te_child_name(child_id, main_device_id)
    return None if name is None else f"te/device/{name}///twin/firmware"


def twin(name: str, version: str, remote_url: str) -> str:
    document = {"name": name, "version": version, "url": remote_url}
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False)


def answer_of(topic: str, payload: bytes) -> FirmwareUpdateResponse | None:
    """The child's answer that a message on one of our commands carries: its `executing`,
    `successful` or `failed`, as a response to operation `<op id>`; None for anything else
    (another command, another state, a clear, a message that does not parse)."""
    try:
        where = parse_te_command_topic(topic)
        command = parse_te_command(payload)
    except MessageError:
        return None  # the participant logs it
    if command is None or not where.cmd_id.startswith(CMD_PREFIX):
        return None
    status = _STATUSES.get(command.status)
    if status is None:
        return None
    op_id = where.cmd_id[len(CMD_PREFIX) :]
    return FirmwareUpdateResponse(op_id, status, _reason(command))


def _reason(command: TeCommand) -> str | None:
    return command.text("reason") if command.status == TE_FAILED else None
