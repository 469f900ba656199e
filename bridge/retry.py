"""Pure retry arithmetic: capped exponential backoff with full jitter, Retry-After, a token bucket.

No I/O and no hidden state: the random source, the clock and the sleep function are injected,
so callers (the CybeDefend client, the sync engine's per-secret backoff, the Vault adapter) get
the same behaviour and tests get determinism without monkeypatching.
"""

from __future__ import annotations

import email.utils
import math
import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

# 2**62 seconds is far beyond any cap; stopping the exponent there keeps the float finite
# for absurd attempt counts (a secret failing for years).
_MAX_EXPONENT = 62
_DELTA_SECONDS_RE = re.compile(r"^\s*(\d{1,10})(?:\.\d+)?\s*$")


def backoff_ceiling(attempt: int, base: float, cap: float) -> float:
    """The largest wait before retry number `attempt` (1 = the first retry): min(cap, base * 2**(attempt-1))."""
    if attempt < 1:
        raise ValueError("attempt counts from 1")
    if base <= 0 or cap <= 0:
        raise ValueError("base and cap must be positive")
    exponent = min(attempt - 1, _MAX_EXPONENT)
    return min(cap, base * math.ldexp(1.0, exponent))


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """A "full jitter" wait before retry number `attempt`: uniform in [0, backoff_ceiling].

    Full jitter (rather than equal or decorrelated jitter) spreads simultaneous failures best,
    so many workers hit by the same outage do not come back in lock-step.
    """
    return rng.uniform(0.0, backoff_ceiling(attempt, base, cap))


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait according to a Retry-After header, or None if absent or unparseable.

    `value` is delta-seconds (`"120"`) or an HTTP-date (`"Wed, 21 Oct 2015 07:28:00 GMT"`);
    `now` is the current Unix time, used for the date form. A date in the past means 0.
    Fractional seconds are tolerated although RFC 9110 only allows integers.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    m = _DELTA_SECONDS_RE.match(text)
    if m is not None:
        return float(text)
    if text.lstrip().startswith(("-", "+")):
        return None
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # an HTTP-date is always GMT; a naive result means "-0000" or no zone
        return None
    return max(0.0, when.timestamp() - now)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how long to retry one request; mirrors `config.RetrySettings`."""

    max_attempts: int
    base_seconds: float
    cap_seconds: float

    def delay(self, attempt: int, rng: random.Random, retry_after: float | None = None) -> float:
        """The wait before retry `attempt`; never shorter than a server-advertised Retry-After."""
        jittered = backoff_delay(attempt, self.base_seconds, self.cap_seconds, rng)
        if retry_after is None:
            return jittered
        return max(retry_after, jittered)

    def retry_after_too_long(self, retry_after: float | None) -> bool:
        """A wait above the cap is not slept through: the caller defers the work instead."""
        return retry_after is not None and retry_after > self.cap_seconds


class TokenBucket:
    """A thread-safe token bucket: at most `rate` acquisitions per second, bursts up to `burst`.

    A caller that finds the bucket empty reserves the next token (the level goes negative)
    and sleeps outside the lock for exactly its deficit, so waiters are served in order and
    the lock is never held while sleeping.
    """

    def __init__(
        self,
        rate: float,
        burst: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.burst = burst if burst is not None else max(1.0, rate)
        if self.burst < 1:
            raise ValueError("burst must be at least 1")
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._tokens = self.burst
        self._last = clock()

    def _refill(self) -> None:
        now = self._clock()
        elapsed = max(0.0, now - self._last)
        self._last = now
        self._tokens = min(self.burst, self._tokens + elapsed * self.rate)

    def try_acquire(self) -> bool:
        """Take a token if one is available now; never waits."""
        with self._lock:
            self._refill()
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return True
            return False

    def reserve(self) -> float:
        """Take a token, returning how long the caller must wait before using it (0 if none)."""
        with self._lock:
            self._refill()
            self._tokens -= 1.0
            if self._tokens >= 0.0:
                return 0.0
            return -self._tokens / self.rate

    def acquire(self) -> float:
        """Wait until a token is available, take it, and return the time waited (seconds)."""
        wait = self.reserve()
        if wait > 0:
            self._sleep(wait)
        return wait
