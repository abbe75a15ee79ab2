"""A cap on the gateway's cloud downloads, in bytes per second over all of them (they share
the site's link): a token bucket. Pure: the caller says what time it is and sleeps."""

from __future__ import annotations

MIN_BURST = 16 * 1024


class TokenBucket:
    """`rate` bytes per second; at most `burst` bytes (default: a tenth of a second's worth,
    at least 16 KiB) may go at once after a pause."""

    def __init__(self, rate: float, burst: float | None = None) -> None:
        if not rate > 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.burst = burst if burst is not None else max(rate / 10, MIN_BURST)
        self._tokens = self.burst
        self._at: float | None = None

    def delay(self, amount: int, now: float) -> float:
        """`amount` bytes were received at `now`: seconds to wait before reading more. Bytes
        beyond what the bucket holds are a debt every later caller waits for as well, so
        concurrent downloads share the rate."""
        if self._at is not None and now > self._at:
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now if self._at is None else max(self._at, now)
        self._tokens -= amount
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate
