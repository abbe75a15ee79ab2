"""Cumulocity operations in their JSON form, `c8y_Firmware` ones: pure, no I/O.

Cumulocity delivers every operation to an MQTT device twice: as SmartREST (`515` on `c8y/s/ds`)
and as JSON on `c8y/devicecontrol/notifications`, which carries the operation's id. With
`c8y.smartrest.use_operation_id = true` tedge-firmware works from the JSON form (and reports
by id: `504`/`505`/`506`). One payload may hold several operations, one JSON object per line
(docs/thin-edge-te.md):

    {"id":"123456","status":"PENDING","deviceId":"...",
     "c8y_Firmware":{"name":"img","version":"1.1","url":"https://..."},
     "externalSource":{"externalId":"<gateway>:device:<child>","type":"c8y_Serial"}}

Everything here comes from the broker and is checked; a line that is not a `c8y_Firmware`
operation is skipped, one that is but cannot be used says why.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from tedge_firmware.core import smartrest
from tedge_firmware.core.text import one_line

OPERATIONS_TOPIC = "c8y/devicecontrol/notifications"
# Cumulocity sends at most 16 KiB per message; anything much larger is not from it.
MAX_PAYLOAD_BYTES = 64 * 1024
PROVIDED = "$PROVIDED"


@dataclass(frozen=True)
class FirmwareOperation:
    """A `c8y_Firmware` operation for the device with external id `device`."""

    c8y_id: str
    device: str
    name: str
    version: str
    url: str
    patch_of: str | None = None  # a patch: the version it applies to (`dependency`)


@dataclass(frozen=True)
class Unusable:
    """A `c8y_Firmware` operation that cannot be carried out; `c8y_id` and `device` are set
    when it has them (so that it can be failed by id)."""

    problem: str
    c8y_id: str | None = None
    device: str | None = None


def firmware_operations(payload: bytes) -> list[FirmwareOperation | Unusable]:
    """The `c8y_Firmware` operations of one payload, in order; other operations are left out."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        return [Unusable(f"payload of {len(payload)} bytes is over {MAX_PAYLOAD_BYTES}")]
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        return [Unusable("payload is not UTF-8")]
    found: list[FirmwareOperation | Unusable] = []
    for line in text.splitlines():
        if line.strip():
            operation = _operation(line)
            if operation is not None:
                found.append(operation)
    return found


def _operation(line: str) -> FirmwareOperation | Unusable | None:
    try:
        document = json.loads(line)
    except (ValueError, RecursionError) as error:
        return Unusable(f"not JSON: {one_line(str(error), 200)}")
    if not isinstance(document, dict) or "c8y_Firmware" not in document:
        return None  # another operation (or not one at all)
    c8y_id = document.get("id")
    if isinstance(c8y_id, int) and not isinstance(c8y_id, bool):
        c8y_id = str(c8y_id)
    if not isinstance(c8y_id, str) or not smartrest.is_operation_id(c8y_id):
        return Unusable("'id' is missing or not a Cumulocity operation id (digits)")
    source = document.get("externalSource")
    device = source.get("externalId") if isinstance(source, dict) else None
    if not isinstance(device, str) or not device:
        return Unusable("'externalSource.externalId' is missing", c8y_id)
    fragment = document["c8y_Firmware"]
    if not isinstance(fragment, dict):
        return Unusable("'c8y_Firmware' is not an object", c8y_id, device)
    fields = {key: fragment.get(key) for key in ("name", "version", "url")}
    for key, value in fields.items():
        if not isinstance(value, str):
            return Unusable(f"'c8y_Firmware.{key}' is missing or not a string", c8y_id, device)
    dependency = fragment.get("dependency")
    patch_of = dependency if isinstance(dependency, str) and dependency else None
    if patch_of is None and fragment.get("isPatch") is True:
        patch_of = "?"
    return FirmwareOperation(
        c8y_id=c8y_id,
        device=device,
        name=str(fields["name"]),
        version=str(fields["version"]),
        url=str(fields["url"]),
        patch_of=patch_of,
    )


def cannot_do(name: str, version: str, url: str, patch_of: str | None) -> str | None:
    """Why tedge-firmware cannot carry out such an operation (the reason Cumulocity gets), or
    None when it can try."""
    if patch_of is not None:
        base = "" if patch_of == "?" else f" to {patch_of}"
        return (
            f"Firmware patch {name} {version}{base} is not supported by tedge-firmware: "
            "install a complete firmware image"
        )
    if url.strip() == PROVIDED:
        return (
            f"Firmware {name} {version} has no URL ({PROVIDED}: the device is expected to have "
            "it already); tedge-firmware needs a URL to download it for the child"
        )
    return None
