"""Every MQTT topic name tedge-firmware uses, and the one place child ids are validated."""

from __future__ import annotations

import re
from collections.abc import Collection

from tedge_firmware.errors import TopicError

PLUGIN_NAME = "c8y-firmware-plugin"

C8Y_DOWNSTREAM = "c8y/s/ds"
C8Y_UPSTREAM = "c8y/s/us"
C8Y_JWT_REQUEST = "c8y/s/uat"
C8Y_JWT_RESPONSE = "c8y/s/dat"
HEALTH_CHECK = "tedge/health-check"
FIRMWARE_RESPONSES = "tedge/+/commands/res/firmware_update"

_MAX_CHILD_ID_BYTES = 200
MAX_TOPIC_BYTES = 65_535
# What Mosquitto refuses in a topic (its UTF-8 check, stricter than MQTT 3.1.1 §1.5.3 asks):
# the C0 controls with NUL, DEL and the C1 controls, UTF-16 surrogates, and the Unicode
# non-characters (U+FDD0-U+FDEF and the last two code points of every plane). A PUBLISH with
# any of them makes Mosquitto drop the connection, so none may reach a topic we publish to.
_REFUSED_BY_BROKERS = re.compile(
    "[\x00-\x1f\x7f-\x9f\ud800-\udfff\ufdd0-\ufdef"
    + "".join(chr(plane << 16 | 0xFFFE) + chr(plane << 16 | 0xFFFF) for plane in range(17))
    + "]"
)
# MQTT wildcards, the topic separator and the path separators can never be part of a child
# id either: the id is used verbatim in topics and as a directory name on the gateway.
_FORBIDDEN_IN_CHILD_ID = re.compile(r"[+#/\\]")


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


def firmware_declaration_topic(child_id: str) -> str:
    """Where a retained `{}` declares that `child_id` supports firmware_update (thin-edge 1.x
    style capability; an empty retained payload removes it)."""
    return f"te/device/{child_id}///cmd/firmware_update"


def te_command_filter(child_id: str) -> str:
    """Every `te/` firmware_update command of a child (thin-edge 1.x/2.x)."""
    return f"te/device/{child_id}///cmd/firmware_update/+"


def te_command_topic(child_id: str, cmd_id: str) -> str:
    return f"te/device/{child_id}///cmd/firmware_update/{cmd_id}"


TE_CHILD_INFIX = ":device:"


def te_child_external_id(main_device_id: str, name: str) -> str:
    """The Cumulocity external id thin-edge's mapper gives the child `device/<name>//`."""
    return f"{main_device_id}{TE_CHILD_INFIX}{name}"


def te_child_name(external_id: str, main_device_id: str | None) -> str | None:
    """`<name>` of an external id `<main_device_id>:device:<name>`; None for any other id."""
    if main_device_id is None:
        return None
    prefix = f"{main_device_id}{TE_CHILD_INFIX}"
    name = external_id[len(prefix) :] if external_id.startswith(prefix) else ""
    return name or None


def request_addressee(topic: str, children: Collection[str]) -> tuple[str, str] | None:
    """(child, address) of a firmware_update request topic `tedge/<address>/commands/req/...`
    for one of `children`: the address is the child's id itself, or the external id a
    gateway gives a child registered over `te/` (`<main device id>:device:<child>`, as
    thin-edge's python-tedge-agent accepts it). None for any other topic."""
    prefix, suffix = "tedge/", "/commands/req/firmware_update"
    if not topic.startswith(prefix) or not topic.endswith(suffix):
        return None
    address = topic[len(prefix) : -len(suffix)]
    if address in children:
        return address, address
    _, infix, name = address.rpartition(TE_CHILD_INFIX)
    if infix and name in children and "/" not in address:
        return name, address
    return None


def mqtt_text_problem(text: str) -> str | None:
    """Why a broker would refuse `text` in a topic, or None when it is fine.

    Mosquitto answers such a PUBLISH by dropping the connection: checked before anything
    built from outside data is queued.
    """
    refused = _REFUSED_BY_BROKERS.search(text)
    if refused is not None:
        return f"{text[:100]!r} contains U+{ord(refused[0]):04X}, which MQTT brokers refuse"
    if len(text.encode("utf-8")) > MAX_TOPIC_BYTES:
        return f"{text[:100]!r}... is longer than {MAX_TOPIC_BYTES} bytes"
    return None


def child_id_problem(child_id: str) -> str | None:
    """Why `child_id` is not usable as a child id, or None when it is fine."""
    if not child_id.strip():
        return "the child id is empty"
    if child_id in (".", ".."):
        return f"the child id {child_id!r} is a path component"
    if _FORBIDDEN_IN_CHILD_ID.search(child_id):
        return f"the child id {child_id!r} contains '/', '+', '#' or '\\\\'"
    if _REFUSED_BY_BROKERS.search(child_id):
        return f"the child id {child_id!r} contains a control character or a non-character"
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
