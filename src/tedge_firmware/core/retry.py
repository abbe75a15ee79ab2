"""Pure retry policy for cloud downloads: how long to wait, and whether a failure is worth
another try.

Nothing here does I/O or knows about aiohttp. Between attempts the downloader waits
`RetryPolicy.delay(n)` (or longer when the server sent `Retry-After`), and gives up when the
next wait would end past `max_elapsed` (counted from the last progress) or past `max_total`
(counted from the start, whatever the progress). How an answer continues a partial file, and
what survives a restart, is `core.resume`; header values are read by `core.http`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus

from tedge_firmware.core.text import one_line


@dataclass(frozen=True)
class RetryPolicy:
    """Capped exponential backoff with jitter, within a budget of elapsed seconds.

    `delay(0)` is the wait after the first failure, about `initial`; each further failure
    multiplies it by `multiplier` up to `max_interval`. Jitter spreads every wait uniformly over
    +/- `jitter` (a fraction) so that many clients do not retry in lockstep.

    Two budgets, in seconds:

    - `max_elapsed` is how long the downloader keeps retrying *without progress*: every attempt
      that brings new bytes starts it afresh, so a slow but advancing transfer over a flaky
      link is never given up.
    - `max_total` (None: unlimited) is a hard cap on the whole download, counted from its
      start whatever the progress: no retry is planned past it, and a transfer still running
      when it is reached is cut. It bounds how long one firmware can hold a download slot.
    """

    initial: float = 1.0
    multiplier: float = 2.0
    max_interval: float = 60.0
    max_elapsed: float = 600.0
    jitter: float = 0.1
    max_total: float | None = None

    def __post_init__(self) -> None:
        values = (self.initial, self.multiplier, self.max_interval, self.max_elapsed, self.jitter)
        if not all(math.isfinite(value) for value in values):
            raise ValueError(f"RetryPolicy values must be finite numbers: {self}")
        if self.initial < 0 or self.max_interval < self.initial or self.max_elapsed < 0:
            raise ValueError(
                f"RetryPolicy needs 0 <= initial <= max_interval and max_elapsed >= 0: {self}"
            )
        if self.multiplier < 1 or not 0 <= self.jitter < 1:
            raise ValueError(f"RetryPolicy needs multiplier >= 1 and 0 <= jitter < 1: {self}")
        total = self.max_total
        if total is not None and not (math.isfinite(total) and total > 0):
            raise ValueError(f"RetryPolicy needs max_total None or a finite number > 0: {self}")

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after failure number `attempt` (0 for the first failure)."""
        if attempt < 0:
            raise ValueError(f"attempt must be >= 0, not {attempt}")
        base = capped_exponential(attempt, self.initial, self.max_interval, self.multiplier)
        spread = (rng or random).uniform(-self.jitter, self.jitter)
        return base * (1.0 + spread)


def capped_exponential(
    attempt: int, initial: float, maximum: float, multiplier: float = 2.0
) -> float:
    """`initial * multiplier ** attempt`, at most `maximum` (never an overflow): the ceiling
    of every backoff here."""
    try:
        return min(initial * multiplier ** max(attempt, 0), maximum)
    except OverflowError:
        return maximum


def reconnect_delay(
    failures: int, initial: float, maximum: float, rand: Callable[[], float] = random.random
) -> float:
    """Seconds to wait before reconnecting after `failures` failed attempts in a row (0 for
    the first retry): drawn from the upper half below the capped exponential ceiling, so
    clients restarted together spread out but still back off."""
    ceiling = capped_exponential(failures, initial, maximum)
    return ceiling / 2 + ceiling / 2 * rand()


def plan_retry(
    policy: RetryPolicy,
    *,
    failures: int,
    elapsed: float,
    retry_after: float | None = None,
    rng: random.Random | None = None,
    total_elapsed: float = 0.0,
) -> float | None:
    """The wait before the next try, or None when it would end past a budget.

    `failures` counts failures since the last progress (1 after the first); `elapsed` is the
    time spent since then, `total_elapsed` the time since the download started (checked
    against `max_total`). A server's Retry-After is a lower bound: we never retry sooner than
    asked, but keep backing off if our own schedule is already longer.
    """
    wait = policy.delay(max(failures - 1, 0), rng)
    if retry_after is not None:
        wait = max(wait, retry_after)
    if elapsed + wait > policy.max_elapsed:
        return None
    if policy.max_total is not None and total_elapsed + wait > policy.max_total:
        return None
    return wait


def is_transient_status(status: int) -> bool:
    """Whether an HTTP status is worth retrying: 5xx, 408 Request Timeout, 429 Too Many Requests."""
    return status in (HTTPStatus.REQUEST_TIMEOUT, HTTPStatus.TOO_MANY_REQUESTS) or (
        500 <= status <= 599
    )


def describe_status(status: int, reason: str | None = None) -> str:
    """`HTTP 404 Not Found`: the standard phrase when known, else the server's (cleaned) one."""
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = one_line(reason or "", limit=60)
    return f"HTTP {status} {phrase}".rstrip()


def format_seconds(seconds: float) -> str:
    """`0.3s`, `1.5s`, `30s`, `3m12s`, `2m`, `1h2m5s`: one decimal below 10 s, then whole."""
    if seconds < 10:
        return f"{round(seconds, 1):g}s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    parts = [(hours, "h"), (minutes, "m"), (secs, "s")]
    return "".join(f"{value}{unit}" for value, unit in parts if value) or "0s"
