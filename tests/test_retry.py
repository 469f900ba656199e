"""bridge.retry: backoff arithmetic, Retry-After parsing and the token bucket (pure; injected clock/rng)."""

from __future__ import annotations

import email.utils
import random
import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.retry import RetryPolicy, TokenBucket, backoff_ceiling, backoff_delay, parse_retry_after
from tests.support.cybedefend_mock import FakeClock

# ---- backoff ----------------------------------------------------------------------------------


def test_backoff_ceiling_doubles_then_caps() -> None:
    assert [backoff_ceiling(a, 0.5, 5.0) for a in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]


def test_backoff_ceiling_survives_huge_attempt_counts() -> None:
    assert backoff_ceiling(10_000, 30.0, 3600.0) == 3600.0


@pytest.mark.parametrize("attempt,base,cap", [(0, 1.0, 2.0), (1, 0.0, 2.0), (1, 1.0, 0.0), (-3, 1.0, 1.0)])
def test_backoff_rejects_nonsense(attempt: int, base: float, cap: float) -> None:
    with pytest.raises(ValueError):
        backoff_ceiling(attempt, base, cap)


@given(attempt=st.integers(1, 200), base=st.floats(0.001, 100), cap=st.floats(0.001, 10_000), seed=st.integers(0, 2**32))
def test_full_jitter_stays_within_zero_and_the_ceiling(attempt: int, base: float, cap: float, seed: int) -> None:
    delay = backoff_delay(attempt, base, cap, random.Random(seed))
    assert 0.0 <= delay <= min(cap, backoff_ceiling(attempt, base, cap))


def test_full_jitter_uses_the_whole_range_and_the_injected_rng() -> None:
    delays = [backoff_delay(4, 1.0, 100.0, random.Random(seed)) for seed in range(400)]
    # full jitter: spread over [0, 8], not clustered near the ceiling (equal jitter) or fixed
    assert min(delays) < 0.5
    assert max(delays) > 7.5
    assert backoff_delay(4, 1.0, 100.0, random.Random(7)) == backoff_delay(4, 1.0, 100.0, random.Random(7))


def test_policy_delay_never_undercuts_retry_after() -> None:
    policy = RetryPolicy(max_attempts=5, base_seconds=0.5, cap_seconds=30.0)
    rng = random.Random(1)
    for attempt in range(1, 6):
        assert policy.delay(attempt, rng, retry_after=12.0) >= 12.0
    assert policy.retry_after_too_long(31.0)
    assert not policy.retry_after_too_long(30.0)
    assert not policy.retry_after_too_long(None)


# ---- Retry-After ------------------------------------------------------------------------------


@pytest.mark.parametrize("value,expected", [("0", 0.0), ("120", 120.0), ("  7 ", 7.0), ("1.5", 1.5)])
def test_retry_after_delta_seconds(value: str, expected: float) -> None:
    assert parse_retry_after(value, now=5_000.0) == expected


def test_retry_after_http_date_is_relative_to_now() -> None:
    now = 1_700_000_000.0
    header = email.utils.formatdate(now + 90, usegmt=True)
    assert parse_retry_after(header, now) == pytest.approx(90.0)


def test_retry_after_rfc_example_and_a_date_in_the_past() -> None:
    # RFC 9110's example: Wed, 21 Oct 2015 07:28:00 GMT is 1445412480
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", 1445412480.0 - 30) == pytest.approx(30.0)
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", 1445412480.0 + 30) == 0.0


@pytest.mark.parametrize(
    "value", [None, "", "   ", "soon", "-5", "+5", "1e3", "12 seconds", "Wed, 99 Foo 2015 07:28:00 GMT", "0x10", "NaN"]
)
def test_retry_after_garbage_is_none(value: str | None) -> None:
    assert parse_retry_after(value, now=0.0) is None


@given(st.text(max_size=40))
def test_retry_after_never_raises_and_never_negative(value: str) -> None:
    result = parse_retry_after(value, now=1_700_000_000.0)
    assert result is None or result >= 0.0


# ---- token bucket -------------------------------------------------------------------------------


def test_bucket_allows_a_burst_then_paces_at_the_rate() -> None:
    clock = FakeClock(1000.0)
    bucket = TokenBucket(rate=2.0, burst=2, clock=clock, sleep=clock.sleep)
    waits = [bucket.acquire() for _ in range(6)]
    assert waits[:2] == [0.0, 0.0]
    assert waits[2:] == pytest.approx([0.5, 0.5, 0.5, 0.5])
    assert clock.now == pytest.approx(1002.0)  # 6 requests at 2/s with a burst of 2: 2 s


def test_bucket_refills_while_idle_but_not_beyond_burst() -> None:
    clock = FakeClock(1000.0)
    bucket = TokenBucket(rate=1.0, burst=3, clock=clock, sleep=clock.sleep)
    for _ in range(3):
        assert bucket.try_acquire()
    assert not bucket.try_acquire()
    clock.now += 100.0
    assert [bucket.try_acquire() for _ in range(4)] == [True, True, True, False]


def test_bucket_default_burst_is_the_rate() -> None:
    clock = FakeClock(1000.0)
    bucket = TokenBucket(rate=10.0, clock=clock, sleep=clock.sleep)
    assert sum(bucket.try_acquire() for _ in range(20)) == 10


def test_bucket_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate=0)
    with pytest.raises(ValueError):
        TokenBucket(rate=1.0, burst=0.5)


def test_bucket_is_thread_safe_and_never_exceeds_the_rate() -> None:
    clock = FakeClock(1000.0)
    bucket = TokenBucket(rate=5.0, burst=1, clock=clock, sleep=clock.sleep)
    reservations: list[float] = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(25):
            wait = bucket.reserve()
            with lock:
                reservations.append(wait)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # 200 reservations with the clock frozen: each one is 0.2 s after the previous, none shared
    assert sorted(reservations) == pytest.approx([0.2 * i for i in range(200)])


def test_bucket_with_the_default_burst_spaces_requests_as_the_vault_transport_uses_it() -> None:
    """bridge.vault.transport builds `TokenBucket(vault.max_requests_per_second)`: a burst of the rate."""
    clock = FakeClock(1000.0)
    bucket = TokenBucket(10.0, clock=clock, sleep=clock.sleep)
    for _ in range(30):
        bucket.acquire()
    assert clock.now - 1000.0 == pytest.approx(2.0, abs=0.01)  # 10 at once, then 20 at 10/s


def test_the_vault_transport_uses_the_one_token_bucket() -> None:
    from bridge.config import parse_settings
    from bridge.metrics import Metrics
    from bridge.vault import transport

    assert not hasattr(transport, "RateLimiter")
    raw = {"vault": {"address": "http://127.0.0.1:1", "max_requests_per_second": 7},
           "sources": [{"mount": "secret", "path": "dockerhub"}], "cybedefend": {"auth": {"credential_file": "/dev/null"}}}
    s = parse_settings(raw, env={})
    t = transport.VaultTransport(s.vault, Metrics(), clock=FakeClock(0.0), sleep=lambda _: None)
    assert isinstance(t._limiter, TokenBucket) and t._limiter.rate == 7
