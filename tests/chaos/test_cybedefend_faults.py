"""Scenario 3, CybeDefend misbehaves: 429 storms (with and without Retry-After), 5xx bursts,
timeouts, a response lost after the POST was processed, bearer tokens expiring mid-pass, one
forbidden project, and 404 on delete.

The bridge is built in-process by the composition root (`build(settings)`, as the CLI does) and
talks HTTP to the double; OpenBao is real. Timing claims are checked from the double's own record
of when each request arrived, never from the bridge's logs.
"""

from __future__ import annotations

import email.utils
import itertools
import logging
import time
from collections.abc import Callable
from typing import Any

import pytest

from bridge.model import Sensitive
from cybedefend_double.simulator import Fault, RecordedRequest
from tests.chaos.rig import PAT, ChaosRig
from tests.support.data import ORG, PROJECTS

pytestmark = pytest.mark.integration
SLACK = 0.02  # clock granularity between the double's record and the sleep that preceded the retry


def fill(rig: ChaosRig, n: int, projects: int = 4) -> None:
    for i in range(n):
        rig.put(f"s{i:02d}", i, PROJECTS[i % projects])


def converge(rig: ChaosRig, passes: int = 4) -> list[Any]:
    reports = []
    for _ in range(passes):
        reports.append(rig.run())
        if reports[-1].result == "ok" and not rig.bridge.ledger.pending_deletes():  # type: ignore[union-attr]
            break
        time.sleep(0.1)  # past the per-secret backoff (retry_cap_seconds is 0.05 in the rig)
    return reports


def creates_by_token(rig: ChaosRig) -> dict[str, list[RecordedRequest]]:
    out: dict[str, list[RecordedRequest]] = {}
    for r in rig.sim.requests:
        if r.endpoint == "create" and r.body:
            out.setdefault(r.body["accessToken_sha256"], []).append(r)
    return out


def retry_gaps(rig: ChaosRig, status: int = 429) -> list[float]:
    """For each create answered `status`, how long until the same token was POSTed again."""
    gaps = []
    for reqs in creates_by_token(rig).values():
        for first, nxt in itertools.pairwise(reqs):
            if first.status == status:
                gaps.append(nxt.at - first.at)
    return gaps


@pytest.fixture
def logged(caplog: pytest.LogCaptureFixture) -> Callable[[], list[str]]:
    caplog.set_level(logging.INFO, logger="bridge")
    return lambda: [caplog.text]


def test_429_storm_with_retry_after_seconds_is_honoured(rig: ChaosRig, logged: Callable[[], list[str]]) -> None:
    fill(rig, 8)
    rig.sim.inject("create", Fault.status(429, retry_after="0.4"), times=6)
    rig.sim.inject("all_credentials", Fault.status(429, retry_after="0.3"), times=3)
    report = rig.run()
    assert report.result == "ok" and report.counts["created"] == 8
    gaps = retry_gaps(rig)
    assert len(gaps) == 6, gaps
    assert min(gaps) >= 0.4 - SLACK, f"a create was retried {min(gaps):.3f}s after a 429 with Retry-After: 0.4"
    print(f"\n429 + Retry-After 0.4 s: earliest retry of a create {min(gaps):.3f} s after the 429")
    by_path: dict[str, list[RecordedRequest]] = {}
    for r in rig.sim.requests:
        if r.endpoint == "all_credentials":
            by_path.setdefault(r.path, []).append(r)
    list_gaps = [b.at - a.at for v in by_path.values() for a, b in itertools.pairwise(v) if a.status == 429]
    assert len(list_gaps) == 3 and min(list_gaps) >= 0.3 - SLACK, list_gaps
    rig.assert_invariant("429 + Retry-After seconds", texts=logged())


def test_429_with_an_http_date_retry_after_is_honoured(rig: ChaosRig, logged: Callable[[], list[str]]) -> None:
    rig.raw["cybedefend"]["retry"]["cap_seconds"] = 5
    fill(rig, 2)
    until = time.time() + 2
    rig.sim.inject("create", Fault.status(429, retry_after=email.utils.formatdate(until, usegmt=True)), times=1)
    assert rig.run().result == "ok"
    [(first, retry)] = [(a, b) for reqs in creates_by_token(rig).values() for a, b in itertools.pairwise(reqs)]
    assert first.status == 429 and retry.at >= int(until) - SLACK, "retried before the advertised HTTP date"
    print(f"\n429 + HTTP-date: retried {retry.at - int(until):+.3f} s after the advertised time")
    rig.assert_invariant("429 + HTTP-date", texts=logged())


def test_retry_after_beyond_the_cap_defers_the_secret_to_a_later_pass(rig: ChaosRig, logged: Callable[[], list[str]]) -> None:
    """A Retry-After longer than cybedefend.retry.cap_seconds is not slept through inside the pass;
    the secret waits in the ledger, and no pass before the advertised time POSTs it again."""
    fill(rig, 3)
    rig.sim.inject("create", Fault.status(429, retry_after="2"), times=1)
    first = rig.run()
    assert first.counts["failed"] == 1 and first.counts["created"] == 2
    t429 = next(r.at for r in rig.sim.requests if r.status == 429)
    while time.time() < t429 + 2.3:
        rig.run()
        time.sleep(0.2)
    assert converge(rig)[-1].result == "ok"
    gaps = retry_gaps(rig)
    assert gaps and min(gaps) >= 2 - SLACK, f"retried {min(gaps):.2f}s after a 429 with Retry-After: 2"
    print(f"\n429 + Retry-After 2 s (beyond the cap): the next POST came {min(gaps):.2f} s later, in a later pass")
    rig.assert_invariant("429 beyond the cap", texts=logged())


def test_429_storm_without_retry_after_backs_off_and_never_loops(rig: ChaosRig, logged: Callable[[], list[str]]) -> None:
    fill(rig, 6)
    rig.sim.inject("create", Fault.status(429), times=14)
    reports = converge(rig, passes=6)
    assert reports[-1].result == "ok"
    per_token = [len(v) for v in creates_by_token(rig).values()]
    max_attempts = rig.settings.cybedefend.retry.max_attempts
    assert max(per_token) <= max_attempts * len(reports), f"attempts per secret {per_token}: a tight retry loop"
    gaps = retry_gaps(rig)
    assert gaps and min(gaps) > 0, "a 429 was retried with no wait at all"
    print(f"\n429 storm without Retry-After: {len(reports)} passes, at most {max(per_token)} POSTs per secret, "
          f"shortest wait {min(gaps) * 1000:.0f} ms")
    rig.assert_invariant("429 storm, no Retry-After", texts=logged())


def test_5xx_bursts_on_every_endpoint_converge_without_duplicates(rig: ChaosRig, logged: Callable[[], list[str]]) -> None:
    fill(rig, 10)
    assert rig.run().result == "ok"
    for i in range(0, 10, 2):
        rig.put(f"s{i:02d}", f"rot{i}", PROJECTS[i % 4])  # rotations: list, create, links, delete
    for code in (500, 502, 503):
        rig.sim.inject("create", Fault.status(code), times=1)
        rig.sim.inject("list", Fault.status(code), times=2)
        rig.sim.inject("get_links", Fault.status(code), times=1)
        rig.sim.inject("delete", Fault.status(code), times=2)
    reports = converge(rig)
    assert reports[-1].result == "ok", [r.result for r in reports]
    assert sum(r.counts["rotated"] + r.counts["adopted"] for r in reports) >= 5
    assert not rig.bridge.ledger.pending_deletes()  # type: ignore[union-attr]
    rig.assert_invariant("5xx bursts", texts=logged())


def test_timeouts_on_create_are_adopted_on_a_later_pass_not_duplicated(rig: ChaosRig, logged: Callable[[], list[str]]) -> None:
    rig.raw["cybedefend"]["timeout_seconds"] = 0.5
    fill(rig, 4)
    rig.sim.inject("create", Fault.delay(1.0), times=2)  # processed after the client gave up
    rig.sim.inject("list", Fault.delay(0.8), times=1)  # a GET timing out is simply retried
    first = rig.run()
    assert first.counts["failed"] == 2 and first.counts["created"] == 2, first.counts
    time.sleep(1.2)  # the delayed creates land in the double
    reports = converge(rig)
    assert reports[-1].result == "ok" and sum(r.counts["adopted"] for r in reports) == 2
    assert len([c for c in rig.creds() if c.id not in rig.foreign]) == 4
    rig.assert_invariant("timeouts", texts=logged())


def test_response_lost_after_the_post_is_adopted_not_duplicated(rig: ChaosRig, logged: Callable[[], list[str]]) -> None:
    fill(rig, 6)
    rig.sim.inject("create", Fault.drop_after(), times=3)
    rig.sim.inject("delete", Fault.drop_after(), times=1)
    report = rig.run()
    assert report.counts["adopted"] == 3 and report.counts["created"] == 3
    rig.put("s00", "rotated", PROJECTS[0])
    assert converge(rig)[-1].result == "ok"
    rig.assert_invariant("drop after POST", texts=logged())


def test_connection_dropped_before_handling_is_created_once(rig: ChaosRig, logged: Callable[[], list[str]]) -> None:
    fill(rig, 4)
    rig.sim.inject("create", Fault.drop_before(), times=2)
    assert converge(rig)[-1].result == "ok"
    rig.assert_invariant("drop before", texts=logged())


def test_bearer_expiring_mid_pass_is_exchanged_again(rig: ChaosRig, logged: Callable[[], list[str]]) -> None:
    fill(rig, 12)
    rig.sim.inject("create", Fault.delay(0), times=5)  # let five creates through first
    rig.sim.inject("create", Fault.expire_tokens(), times=1)
    report = rig.run()
    assert report.result == "ok" and report.counts["created"] == 12
    exchanges = [r for r in rig.sim.requests if r.endpoint == "token_exchange" and r.status == 200]
    assert len(exchanges) >= 2, "the PAT was not exchanged again after the 401"
    assert [r for r in rig.sim.requests if r.status == 401], "the fault did not fire"
    rig.assert_invariant("401 mid-pass", texts=logged())


def test_403_on_one_project_does_not_stop_the_others(rig: ChaosRig, logged: Callable[[], list[str]]) -> None:
    fill(rig, 12)
    rig.sim.forbid_project(PROJECTS[2])
    report = rig.run()
    assert report.result == "partial" and report.counts["created"] == 9 and report.counts["failed"] == 3
    rig.sim.allow_project(PROJECTS[2])
    time.sleep(0.1)
    assert converge(rig)[-1].result == "ok"
    rig.assert_invariant("403 on one project", texts=logged())


def test_404_on_delete_is_treated_as_done(rig: ChaosRig, logged: Callable[[], list[str]]) -> None:
    """Credentials deleted by someone else: what the listing shows gone is not deleted again,
    and one that goes between the listing and the DELETE (a 404) counts as done."""
    fill(rig, 4)
    assert rig.run().result == "ok"
    by_key = {r.key: r.credential_id for r in rig.bridge.ledger.all()}  # type: ignore[union-attr]
    from bridge.cybedefend.client import CybeDefendClient
    from bridge.metrics import Metrics

    client = CybeDefendClient(rig.settings.cybedefend, Sensitive(PAT), Metrics())
    try:
        for name in ("s00", "s01"):
            client.delete(ORG, by_key[f"{rig.mount}/dockerhub/{name}"] or "")
    finally:
        client.close()
    rig.put("s00", "rotated", PROJECTS[0])  # rotation: its old credential is already gone
    rig.untag("s01")  # retirement under `delete`: already gone too
    rig.put("s02", "rotated", PROJECTS[0])  # its old credential goes just before our DELETE
    rig.sim.reset_requests()
    rig.sim.inject("delete", Fault.status(404), times=1)
    report = rig.run()
    assert report.result == "ok", report
    deletes = [r for r in rig.sim.requests if r.endpoint == "delete"]
    assert [r.status for r in deletes] == [404], deletes  # only s02's; s00's and s01's were seen gone
    assert not rig.bridge.ledger.pending_deletes()  # type: ignore[union-attr]
    old = by_key[f"{rig.mount}/dockerhub/s02"]
    client = CybeDefendClient(rig.settings.cybedefend, Sensitive(PAT), Metrics())
    try:
        client.delete(ORG, old or "")  # the real "someone else" (the fault only answered 404)
    finally:
        client.close()
    rig.assert_invariant("404 on delete", texts=logged())
