"""Editing `tedge.toml` (`config set`/`unset`, the demo's and tests' files) with `tomlkit`,
which keeps comments and layout; the file is replaced atomically.

tomlkit can misplace a table added below a table that was written with dotted keys (tomlkit
issue 557: the new table lands at the top level, or swallows the keys that follow it). So new
keys are added as dotted keys inside the deepest table that already exists, and every edit is
checked before it is written: the new text, read back with `tomllib`, must equal the old
document with exactly the intended change.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import stat
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tomlkit
import tomlkit.exceptions
from tomlkit.container import Container, OutOfOrderTableProxy
from tomlkit.items import InlineTable, Table

from tedge_firmware.core.config import (
    CONFIG_FILE_NAME,
    KeySpec,
    find_key,
    raw_values,
    validate_value,
)
from tedge_firmware.errors import ConfigError
from tedge_firmware.shell import durable
from tedge_firmware.shell.config_file import config_path, parse_document

log = logging.getLogger(__name__)

NEW_FILE_MODE = 0o644
_TableLike = Container | Table | InlineTable | OutOfOrderTableProxy


def set_value(config_dir: Path, key: str, value: str) -> None:
    """Validate `value` for `key` and write it under the key's canonical (v2) name.

    Other spellings of the same key (alias, v1) are removed so that they cannot shadow the new
    value. Integers are stored as TOML integers, everything else as strings. The file is
    created when missing; on any error it is left untouched.
    """
    spec = find_key(key)
    parsed = validate_value(spec.name, value)
    stored: int | str = parsed if isinstance(parsed, int) else str(parsed)
    path = config_path(config_dir)
    text, plain = _read_for_edit(path)
    if not text.strip():
        text, plain = '[config]\nversion = "2"\n', {"config": {"version": "2"}}
    elif _is_v1(plain):
        log.info("%s is a v1 file: writing %s in the v2 layout beside the v1 keys", path, spec.name)
    try:
        raw_values(plain, {})  # a plain value where a table belongs leaves no place for the key
    except ConfigError as error:
        raise ConfigError(f"{error} (in {path}); the file is unchanged") from None
    write_atomically(path, _edited(text, plain, spec, stored, path).encode("utf-8"))


def _edited(text: str, plain: dict[str, Any], spec: KeySpec, value: int | str, path: Path) -> str:
    """`text` with `spec` set to `value` and its other spellings removed, checked."""
    others = _spellings(spec)[1:]
    expected = copy.deepcopy(plain)
    _del_plain(expected, [name.split(".") for name in others])
    _set_plain(expected, spec.name.split("."), value)
    failure = ""
    for style in _STYLES:  # the nicest layout first; the next one when tomlkit misplaces it
        document = tomlkit.parse(text)
        removed = _remove_spellings(document, others)
        _put(document, spec.name.split("."), value, path, style)
        failure = _check(document, expected)
        if not failure:
            if removed:
                log.info("%s: removed the other spellings of %s", path, spec.name)
            return tomlkit.dumps(document)
    raise ConfigError(f"cannot edit {path} safely ({failure}); the file is unchanged")


def unset_value(config_dir: Path, key: str) -> bool:
    """Remove every spelling of `key` from the file. False when it was not there."""
    spec = find_key(key)
    path = config_path(config_dir)
    text, plain = _read_for_edit(path)
    document = tomlkit.parse(text)
    if not _remove_spellings(document, _spellings(spec)):
        return False
    expected = copy.deepcopy(plain)
    _del_plain(expected, [name.split(".") for name in _spellings(spec)])
    failure = _check(document, expected)
    if failure:
        raise ConfigError(f"cannot edit {path} safely ({failure}); the file is unchanged")
    write_atomically(path, tomlkit.dumps(document).encode("utf-8"))
    return True


def _spellings(spec: KeySpec) -> tuple[str, ...]:
    return (spec.name, *spec.aliases, *spec.v1)


def _is_v1(plain: Mapping[str, Any]) -> bool:
    section = plain.get("config")
    version = section.get("version") if isinstance(section, Mapping) else None
    return version is None or str(version) == "1"


def _read_for_edit(path: Path) -> tuple[str, dict[str, Any]]:
    """The file's text and its `tomllib` reading; ("", {}) when it does not exist."""
    if not path.parent.is_dir():
        raise ConfigError(f"cannot write {path}: the directory {path.parent} does not exist")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return "", {}
    except OSError as error:
        raise ConfigError(f"cannot read {path}: {error.strerror or error}") from None
    plain = parse_document(data, path)
    return data.decode("utf-8-sig"), plain


def _remove_spellings(document: tomlkit.TOMLDocument, names: tuple[str, ...]) -> bool:
    """Delete every one of `names` present in the document, and tables left empty by that."""
    removed = False
    for name in names:
        parts = name.split(".")
        tables = _tables_along(document, parts[:-1])
        if len(tables) == len(parts) and parts[-1] in tables[-1]:
            del tables[-1][parts[-1]]
            removed = True
            _prune_empty(tables, parts)
    return removed


def _tables_along(document: tomlkit.TOMLDocument, parts: list[str]) -> list[_TableLike]:
    """The document and the tables at each prefix of `parts`, as far as they exist."""
    tables: list[_TableLike] = [document]
    for part in parts:
        item = tables[-1].get(part)
        if not isinstance(item, _TableLike):
            break
        tables.append(item)
    return tables


def _prune_empty(tables: list[_TableLike], parts: list[str]) -> None:
    # A table's length counts its sub-tables too, so `[http]` above `[http.bind]` stays.
    for depth in range(len(tables) - 1, 0, -1):
        if len(tables[depth]) > 0:
            return
        del tables[depth - 1][parts[depth - 1]]


_STYLES = ("tables", "dotted")


def _put(
    document: tomlkit.TOMLDocument, parts: list[str], value: int | str, path: Path, style: str
) -> None:
    """Set `parts` to `value`, creating only what is missing, in the given layout style."""
    container: _TableLike = document
    for depth, part in enumerate(parts[:-1]):
        if part not in container:
            _add_missing(container, parts[depth:], value, style)
            return
        item = container[part]
        if not isinstance(item, _TableLike):
            where = ".".join(parts[: depth + 1])
            raise ConfigError(f"cannot set {'.'.join(parts)}: '{where}' in {path} is not a table")
        container = item
    if isinstance(container.get(parts[-1]), dict | list):
        raise ConfigError(
            f"cannot set {'.'.join(parts)}: it is a table or array in {path}; fix the file by hand"
        )
    container[parts[-1]] = value


def _add_missing(container: _TableLike, rest: list[str], value: int | str, style: str) -> None:
    """Add `rest` (at least two parts) to `container`, where `rest[0]` is missing."""
    if isinstance(container, tomlkit.TOMLDocument):
        # A new top-level table goes after everything else: always well placed, and
        # rendered as `[a.b.c]` with the key inside, the layout thin-edge writes.
        container.append(rest[0], _nested_table(rest[1:], value))
    elif style == "tables":
        if isinstance(container, InlineTable):
            container[rest[0]] = _nested_dict(rest[1:], value)
        else:
            # tomlkit puts no blank line after a sub-table it adds; add one for readability.
            container[rest[0]] = _nested_table(rest[1:], value, blank_line=True)
    else:
        container[tomlkit.key(rest)] = value  # a dotted key stays inside its table


def _nested_table(rest: list[str], value: int | str, blank_line: bool = False) -> Table:
    table = tomlkit.table()
    if len(rest) == 1:
        table.add(rest[0], value)
        if blank_line:
            table.add(tomlkit.nl())
    else:
        table.add(rest[0], _nested_table(rest[1:], value, blank_line))
    return table


def _nested_dict(rest: list[str], value: object) -> dict[str, object]:
    return {rest[0]: value if len(rest) == 1 else _nested_dict(rest[1:], value)}


def _set_plain(plain: dict[str, Any], parts: list[str], value: object) -> None:
    for part in parts[:-1]:
        plain = plain.setdefault(part, {})
        if not isinstance(plain, dict):
            raise ConfigError(f"cannot set {'.'.join(parts)}: '{part}' is not a table")
    plain[parts[-1]] = value


def _del_plain(plain: dict[str, Any], paths: list[list[str]]) -> None:
    for parts in paths:
        table: Any = plain
        for part in parts[:-1]:
            table = table.get(part) if isinstance(table, dict) else None
        if isinstance(table, dict):
            table.pop(parts[-1], None)


def _without_empty_tables(plain: Mapping[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in plain.items():
        if isinstance(value, Mapping):
            value = _without_empty_tables(value)
            if not value:
                continue
        result[key] = value
    return result


def _check(document: tomlkit.TOMLDocument, expected: dict[str, Any]) -> str:
    """Why the rendered document does not read back (with tomllib) as `expected`; "" if it does."""
    try:
        reread = tomllib.loads(tomlkit.dumps(document))
    except (tomllib.TOMLDecodeError, tomlkit.exceptions.TOMLKitError) as error:
        return f"the edited text would not parse: {error}"
    if _without_empty_tables(reread) != _without_empty_tables(expected):
        return "the edited file would not read back as intended"
    return ""


def write_atomically(path: Path, data: bytes) -> None:
    """Replace `path` by `data` atomically (`durable.write_atomically`), keeping the mode (and,
    when allowed, the owner) of the file being replaced, and writing through a symlink to its
    target rather than replacing the link."""
    target = path.resolve() if path.is_symlink() else path
    try:
        previous: os.stat_result | None = target.stat()
    except FileNotFoundError:
        previous = None
    except OSError as error:
        raise ConfigError(f"cannot write {path}: {error.strerror or error}") from None

    def keep_owner(fd: int) -> None:
        if previous is not None:
            # Only root may give the file away; others keep their own ownership.
            with contextlib.suppress(PermissionError):
                os.fchown(fd, previous.st_uid, previous.st_gid)

    mode = NEW_FILE_MODE if previous is None else stat.S_IMODE(previous.st_mode)
    try:
        durable.write_atomically(target, data, mode=mode, prepare=keep_owner)
    except OSError as error:
        raise ConfigError(f"cannot write {path}: {error.strerror or error}") from None


def write_local_config(
    config_dir: Path,
    *,
    device_id: str,
    tenant: str,
    mqtt_port: int,
    http_port: int,
    data_path: Path,
    child_timeout: int = 3600,
    extra: str = "",
) -> Path:
    """A tedge.toml for a gateway whose broker and file transfer are on 127.0.0.1 (the demo,
    the benchmarks, the tests). `extra`: more TOML appended as it is. Values are quoted by
    tomlkit, so any data path works."""
    document = {
        "config": {"version": "2"},
        "device": {"id": device_id},
        "c8y": {"url": tenant},
        "mqtt": {"client": {"host": "127.0.0.1", "port": mqtt_port}},
        "http": {"bind": {"address": "127.0.0.1", "port": http_port}},
        "data": {"path": str(data_path)},
        "firmware": {"child": {"update": {"timeout": child_timeout}}},
    }
    config_dir.mkdir(parents=True, exist_ok=True)
    path = config_dir / CONFIG_FILE_NAME
    path.write_text(tomlkit.dumps(document) + extra)
    return path
