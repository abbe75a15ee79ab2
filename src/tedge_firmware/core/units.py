"""Sizes as people write them (`64MiB`, `2GB`, `500000`) and back. Pure."""

from __future__ import annotations

import re

_SIZE = re.compile(r" *([0-9]+(?:\.[0-9]+)?) *([A-Za-z]*) *", re.ASCII)
_MAX_DIGITS = 20  # bigger than any disk, far below what float() cannot hold
_UNITS = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9,
          "GB": 10**9, "T": 10**12, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30,
          "TIB": 2**40}  # fmt: skip


def parse_size(text: str) -> int:
    """'64MiB' → 67108864, '1MB' → 1000000 (K/M/G/T decimal, KiB/MiB/GiB/TiB binary).

    ValueError, naming the text and an example, for anything else or for less than 1 byte.
    """
    match = _SIZE.fullmatch(text)
    unit = match.group(2).upper() if match else ""
    if match is None or unit not in _UNITS:
        raise ValueError(f"not a size: {_shown(text)} (e.g. 64MiB, 1MB, 500KiB)")
    if len(match.group(1)) > _MAX_DIGITS:  # float() would give inf, int(inf) OverflowError
        raise ValueError(f"too large a size: {_shown(text)}")
    size = int(float(match.group(1)) * _UNITS[unit])
    if size < 1:
        raise ValueError(f"the size must be at least 1 byte: {text!r}")
    return size


def _shown(text: str) -> str:
    """The text in an error message: quoted, and cut when it is long."""
    return repr(text) if len(text) <= 40 else repr(text[:40]) + "…"


def format_size(size: float) -> str:
    """1.5 GiB, 64.0 MiB, 12 B: binary units, one decimal."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size:.0f} B"
