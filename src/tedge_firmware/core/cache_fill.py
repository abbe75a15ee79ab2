"""The `cache_fill` command on the gateway's service topic: pure, no I/O.

Anyone on the local broker (`tedge-firmware cache fill`, a site's scheduler) asks the gateway to
download a firmware before any child needs it, thin-edge's command way:

    te/device/main/service/tedge-firmware/cmd/cache_fill/<id>   (retained)
    {"status":"init","url":"https://…/firmware.bin","pin":"7d"}

`url` is required; `pin` (optional: seconds, or `90s`, `15min`, `12h`, `7d`, `2w`) keeps the
firmware from eviction that long after it is in the cache. The gateway moves the command to
`executing`, then to `successful` with `sha256` and `size` (and `pinnedUntil`, seconds since the
epoch, when pinned), or to `failed` with a `reason`; every other field stays as it was. The
requester clears the command (an empty retained message) once it has read the end.
"""

from __future__ import annotations

from dataclasses import dataclass

from tedge_firmware.core.firmware_update import TeCommand, is_usable_id
from tedge_firmware.core.units import MAX_DURATION_S, parse_duration
from tedge_firmware.core.urls import firmware_url_problem
from tedge_firmware.errors import MessageError

CACHE_FILL_PREFIX = "te/device/main/service/tedge-firmware/cmd/cache_fill/"
CACHE_FILL_FILTER = CACHE_FILL_PREFIX + "+"


def cache_fill_topic(cmd_id: str) -> str:
    return CACHE_FILL_PREFIX + cmd_id


def is_cache_fill_topic(topic: str) -> bool:
    return topic.startswith(CACHE_FILL_PREFIX)


def cache_fill_id(topic: str) -> str:
    """The command id of a cache_fill topic; MessageError when it is not a usable one."""
    cmd_id = topic.removeprefix(CACHE_FILL_PREFIX)
    if topic == cmd_id or "/" in cmd_id or not is_usable_id(cmd_id) or cmd_id in (".", ".."):
        raise MessageError(f"not a cache_fill command topic with a usable id: {topic[:200]!r}")
    return cmd_id


@dataclass(frozen=True)
class FillRequest:
    url: str
    pin_seconds: int | None  # None: not pinned


def fill_request(command: TeCommand) -> FillRequest:
    """What a cache_fill command asks for; MessageError names the field that is wrong."""
    url = command.fields.get("url")
    if not isinstance(url, str):
        raise MessageError("'url' is missing or not a string")
    problem = firmware_url_problem(url)
    if problem is not None:
        raise MessageError(f"'url': {problem}")
    return FillRequest(url, _pin(command.fields.get("pin")))


def _pin(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise MessageError("'pin' must be seconds or a duration such as 7d")
    if isinstance(value, int):
        if not 1 <= value <= MAX_DURATION_S:
            raise MessageError("'pin' must be between 1 s and 10 years")
        return value
    if isinstance(value, str):
        try:
            return parse_duration(value)
        except ValueError as error:
            raise MessageError(f"'pin': {error}") from None
    raise MessageError("'pin' must be seconds or a duration such as 7d")
