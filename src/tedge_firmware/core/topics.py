"""Every MQTT topic name tedge-firmware uses, and the one place child ids are validated."""

from __future__ import annotations

import re

from tedge_firmware.errors import TopicError

PLUGIN_NAME = "c8y-firmware-plugin"

C8Y_DOWNSTREAM = "c8y/s/ds"
C8Y_UPSTREAM = "c8y/s/us"
C8Y_JWT_REQUEST = "c8y/s/uat"
C8Y_JWT_RESPONSE = "c8y/s/dat"
HEALTH_CHECK = "tedge/health-check"
FIRMWARE_RESPONSES = "tedge/+/commands/res/firmware_update"

_MAX_CHILD_ID_BYTES = 200
# MQTT wildcards, the topic separator, NUL and control characters can never be part of a child
# id: the id is used verbatim in topics and as a directory name on the gateway.
_FORBIDDEN = re.compile(r"[+#/\\\x00-\x1f\x7f]")


def health_topic(service: str = PLUGIN_NAME) -> str:
    return f"tedge/health/{service}"


def health_check_topic(service: str = PLUGIN_NAME) -> str:
    return f"{HEALTH_CHECK}/{service}"


def c8y_upstream(child_id: str | None = None) -> str:
    """`c8y/s/us` for the main device, `c8y/s/us/<child>` for a child."""
    return C8Y_UPSTREAM if child_id is None else f"{C8Y_UPSTREAM}/{child_id}"


def firmware_request_topic(child_id: str) -> str:
    return f"tedge/{child_id}/commands/req/firmware_update"


def firmware_response_topic(child_id: str) -> str:
    return f"tedge/{child_id}/commands/res/firmware_update"


def child_id_problem(child_id: str) -> str | None:
    """Why `child_id` is not usable as a child id, or None when it is fine."""
    if not child_id.strip():
        return "the child id is empty"
    if child_id in (".", ".."):
        return f"the child id {child_id!r} is a path component"
    if _FORBIDDEN.search(child_id):
        return f"the child id {child_id!r} contains '/', '+', '#', '\\\\' or a control character"
    if len(child_id.encode()) > _MAX_CHILD_ID_BYTES:
        return f"the child id is longer than {_MAX_CHILD_ID_BYTES} bytes"
    return None


def validate_child_id(child_id: str) -> str:
    problem = child_id_problem(child_id)
    if problem is not None:
        raise TopicError(problem)
    return child_id


def child_id_from_response_topic(topic: str) -> str:
    """`tedge/<child>/commands/res/firmware_update` → `<child>`; TopicError otherwise."""
    parts = topic.split("/")
    if (
        len(parts) != 5
        or parts[0] != "tedge"
        or parts[2:] != ["commands", "res", "firmware_update"]
    ):
        raise TopicError(f"not a firmware_update response topic: {topic!r}")
    return validate_child_id(parts[1])
