"""Sizes and durations as people write them (`64MiB`, `2GB`, `500000`; `90`, `15min`, `7d`)
and back. Pure."""

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


_DURATION = re.compile(r" *([0-9]{1,12}) *([A-Za-z]*) *", re.ASCII)
_SECONDS = {"": 1, "S": 1, "MIN": 60, "H": 3600, "D": 86400, "W": 7 * 86400}
MAX_DURATION_S = 10 * 365 * 86400


def parse_duration(text: str) -> int:
    """'90' or '90s' → 90, '15min' → 900, '12h', '7d', '2w'; whole numbers of a unit.

    ValueError, naming the text and an example, for anything else, for 0, or for more than
    ten years.
    """
    match = _DURATION.fullmatch(text)
    unit = match.group(2).upper() if match else ""
    if match is None or unit not in _SECONDS:
        raise ValueError(f"not a duration: {_shown(text)} (e.g. 3600, 90s, 15min, 12h, 7d)")
    seconds = int(match.group(1)) * _SECONDS[unit]
    if not 1 <= seconds <= MAX_DURATION_S:
        raise ValueError(f"a duration must be between 1 s and 10 years: {_shown(text)}")
    return seconds
