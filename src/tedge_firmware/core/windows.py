"""Download windows: the times of day (the gateway's local time) when cloud downloads may run,
for sites that download at night or in a maintenance window. Pure.

`firmware.download.windows = "22:00-06:00,12:30-13:00"`: each window is `HH:MM[:SS]-HH:MM[:SS]`;
one whose end is before its start runs over midnight; `00:00-00:00` is the whole day. No
windows: downloads may run at any time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DAY_S = 24 * 3600
_TIME = re.compile(r"([01]?\d|2[0-3]):([0-5]\d)(?::([0-5]\d))?", re.ASCII)


@dataclass(frozen=True)
class Window:
    start: int  # seconds since midnight
    end: int

    def contains(self, second: float) -> bool:
        if self.start == self.end:
            return True
        if self.start < self.end:
            return self.start <= second < self.end
        return second >= self.start or second < self.end


def parse_windows(text: str) -> tuple[Window, ...]:
    """ValueError, naming the part and an example, for anything else."""
    windows = []
    for part in text.split(","):
        start, dash, end = part.strip().partition("-")
        first, last = _TIME.fullmatch(start.strip()), _TIME.fullmatch(end.strip())
        if not dash or first is None or last is None:
            raise ValueError(f"not a window: {part.strip()[:40]!r} (e.g. 22:00-06:00)")
        windows.append(Window(_seconds(first), _seconds(last)))
    return tuple(windows)


def _seconds(match: re.Match[str]) -> int:
    hours, minutes, seconds = match.groups()
    return int(hours) * 3600 + int(minutes) * 60 + int(seconds or 0)


def seconds_until_open(windows: tuple[Window, ...], second_of_day: float) -> float:
    """0 when a download may run now (or there are no windows); else the seconds until the
    next window opens."""
    if not windows or any(window.contains(second_of_day) for window in windows):
        return 0.0
    return min((window.start - second_of_day) % DAY_S for window in windows)


def describe(windows: tuple[Window, ...]) -> str:
    return ",".join(f"{_clock(w.start)}-{_clock(w.end)}" for w in windows)


def _clock(seconds: int) -> str:
    hours, rest = divmod(seconds, 3600)
    minutes, second = divmod(rest, 60)
    return f"{hours:02d}:{minutes:02d}" + (f":{second:02d}" if second else "")
