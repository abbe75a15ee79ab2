"""SmartREST codec: the Cumulocity CSV lines we read (515, 106, 71) and write (500-503, 115, ...).

Reading follows thin-edge byte for byte (records split on LF outside quotes, `\\"` is a
literal quote, 515 needs at least five fields and ignores extra ones), with one fix: the `\\r` of
CRLF input is dropped, so the url (and the cache key hashed from it) is the same whatever the
line ending. Writing quotes fields the CSV way when they need it, so a reason or a firmware name
with commas, quotes or newlines can no longer break the line (DESIGN.md item 9).
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass

from tedge_firmware.core.text import one_line
from tedge_firmware.errors import SmartRestError

FIRMWARE_OPERATION = "c8y_Firmware"
MAX_REASON_LENGTH = 500
# Cumulocity sends at most 16 KiB per MQTT message: a much bigger `c8y/s/ds` payload is not
# from Cumulocity and is not worth parsing.
MAX_DOWNSTREAM_BYTES = 64 * 1024
_NEEDS_QUOTES = frozenset(',"\n\r')
_OPERATION_ID = re.compile(r"[0-9]{1,20}", re.ASCII)


def split_records(payload: str) -> list[str]:
    """Split one `c8y/s/ds` payload into records: LF ends a record only outside quotes."""
    records: list[str] = []
    current: list[str] = []
    in_quotes = False
    escaped = False
    for char in payload:
        if escaped:
            escaped = False
            if char == '"':
                current.append('"')
                continue
            current.append("\\")
        if char == "\\":
            escaped = True
        elif char == '"':
            in_quotes = not in_quotes
            current.append(char)
        elif char == "\n" and not in_quotes:
            records.append(_drop_cr("".join(current)))
            current = []
        else:
            current.append(char)
    if escaped:
        current.append("\\")
    if current:
        records.append(_drop_cr("".join(current)))
    return [record for record in records if record]


def _drop_cr(record: str) -> str:
    return record[:-1] if record.endswith("\r") else record


def template_id(record: str) -> str:
    """The message id of a record: the text before its first comma."""
    return record.split(",", 1)[0].strip()


def parse_fields(record: str) -> list[str]:
    """CSV fields of one record (`"` quotes a field, `""` inside stands for one `"`)."""
    try:
        rows = list(csv.reader([record], strict=False))
    except csv.Error as error:
        raise SmartRestError(f"not a CSV record: {error}") from None
    return rows[0] if rows else []


@dataclass(frozen=True)
class FirmwareRequest:
    """A `515` c8y_Firmware operation for one device."""

    device: str
    name: str
    version: str
    url: str


def parse_firmware_request(record: str) -> FirmwareRequest:
    """Parse `515,<device>,<name>,<version>,<url>[,extra…]`; fewer fields is an error. A
    `525` (a patch: the same fields, then the version it applies to) parses the same way;
    `patch_of` tells it apart."""
    fields = parse_fields(record)
    if len(fields) < 5 or fields[0] not in ("515", "525"):
        raise SmartRestError(
            f"Incorrect c8y_Firmware SmartREST payload: expected "
            f"515,<device>,<name>,<version>,<url> but got {len(fields)} field(s)"
        )
    return FirmwareRequest(device=fields[1], name=fields[2], version=fields[3], url=fields[4])


def patch_of(record: str) -> str | None:
    """The version a `525` firmware patch applies to (`?` when it does not say); None for
    anything else."""
    fields = parse_fields(record)
    if not fields or fields[0] != "525":
        return None
    return fields[5] if len(fields) > 5 and fields[5] else "?"


def parse_jwt_response(record: str) -> str:
    """Parse `71,<token>`; anything else is an error (never a crash)."""
    fields = parse_fields(record)
    if len(fields) != 2 or fields[0] != "71" or not fields[1].strip():
        raise SmartRestError("expected '71,<token>' on c8y/s/dat")
    return fields[1].strip()


def parse_child_list(record: str) -> list[str]:
    """Parse `106,<child1>,<child2>,…` (the cloud's list of registered children)."""
    fields = parse_fields(record)
    if not fields or fields[0] != "106":
        raise SmartRestError("expected '106,<child ids…>'")
    return [field for field in fields[1:] if field]


def quote_field(value: str) -> str:
    """CSV-quote a field only when it needs it, doubling embedded quotes."""
    if _NEEDS_QUOTES.intersection(value):
        return '"' + value.replace('"', '""') + '"'
    return value


def get_pending_operations() -> str:
    """`500`: ask Cumulocity to re-deliver PENDING operations (3 bytes, no newline)."""
    return "500"


def set_executing() -> str:
    return f"501,{FIRMWARE_OPERATION}\n"


def set_failed(reason: str) -> str:
    """`502,c8y_Firmware,"<reason>"` — always quoted, as thin-edge sends it, but escaped."""
    text = one_line(reason, MAX_REASON_LENGTH).replace('"', '""')
    return f'502,{FIRMWARE_OPERATION},"{text}"\n'


def set_successful() -> str:
    return f"503,{FIRMWARE_OPERATION},\n"


def is_operation_id(text: str) -> bool:
    """A Cumulocity operation id: digits (at most 20)."""
    return _OPERATION_ID.fullmatch(text) is not None


def set_executing_by_id(c8y_id: str) -> str:
    """`504,<operation id>`: thin-edge's `c8y.smartrest.use_operation_id = true` form."""
    return f"504,{quote_field(c8y_id)}\n"


def set_failed_by_id(c8y_id: str, reason: str) -> str:
    text = one_line(reason, MAX_REASON_LENGTH).replace('"', '""')
    return f'505,{quote_field(c8y_id)},"{text}"\n'


def set_successful_by_id(c8y_id: str) -> str:
    return f"506,{quote_field(c8y_id)}\n"


def set_installed_firmware(name: str, version: str, url: str) -> str:
    """`115,<name>,<version>,<url>` (no trailing newline, as thin-edge sends it)."""
    return ",".join(["115", *(quote_field(field) for field in (name, version, url))])


def register_child(child_id: str, name: str | None = None) -> str:
    """`101,<id>,<name>,thin-edge.io-child` (no newline); the name defaults to the id."""
    return f"101,{quote_field(child_id)},{quote_field(name or child_id)},thin-edge.io-child"


def supported_operations(operations: list[str]) -> str:
    """`114,<op1>,<op2>,…\\n` with the names sorted."""
    return ",".join(["114", *sorted(operations)]) + "\n"
