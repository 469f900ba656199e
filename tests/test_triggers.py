"""AuditMatcher on real OpenBao audit lines, and the debounced TriggerQueue with a fake clock."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.config import SourceSettings
from bridge.daemon.triggers import AuditMatcher, TriggerQueue, line_handler
from bridge.metrics import Metrics

FIXTURE = Path(__file__).parent / "data" / "audit" / "openbao-file.jsonl"
LINES = FIXTURE.read_bytes().splitlines()


def line(kind: str, op: str, path: str, *, error: bool = False, ns: str | None = None) -> bytes:
    """The one captured line with this type, operation and path (and error / namespace shape)."""
    found = []
    for raw in LINES:
        e = json.loads(raw)
        r = e["request"]
        if (e["type"], r["operation"], r["path"]) != (kind, op, path):
            continue
        if bool(e.get("error")) != error or r.get("namespace", {}).get("path") != ns:
            continue
        found.append(raw)
    assert len(found) >= 1, (kind, op, path)
    return found[0]


def make_matcher(**kw: Any) -> AuditMatcher:
    sources = [
        SourceSettings(mount="secret", path="dockerhub"),
        SourceSettings(mount="kv1", path="dockerhub", kv_version=1),
        SourceSettings(mount="team/kv", path="dockerhub"),
    ]
    return AuditMatcher(sources, {"secret": 2, "team/kv": 2}, **kw)


A = "secret/dockerhub/team-a"


@pytest.mark.parametrize(
    ("op", "path"),
    [
        ("create", "secret/data/dockerhub/team-a"),
        ("patch", "secret/data/dockerhub/team-a"),
        ("update", "secret/metadata/dockerhub/team-a"),  # kv metadata put
        ("patch", "secret/metadata/dockerhub/team-a"),  # kv metadata patch
        ("delete", "secret/data/dockerhub/team-a"),  # soft delete of the latest version
        ("update", "secret/undelete/dockerhub/team-a"),
        ("update", "secret/destroy/dockerhub/team-a"),
    ],
)
def test_kv2_writes_match(op: str, path: str) -> None:
    assert make_matcher().match(line("response", op, path)) == [A]


def test_metadata_delete_and_nested_paths_and_nested_mount() -> None:
    whole = AuditMatcher([SourceSettings(mount="secret")], {"secret": 2})
    assert whole.match(line("response", "delete", "secret/metadata/other/x")) == ["secret/other/x"]
    m = make_matcher()
    assert m.match(line("response", "create", "secret/data/dockerhub/nested/deep/team-b")) == [
        "secret/dockerhub/nested/deep/team-b"
    ]
    assert m.match(line("response", "create", "team/kv/data/dockerhub/team-c")) == ["team/kv/dockerhub/team-c"]


def test_kv1_writes_match_and_reads_do_not() -> None:
    m = make_matcher()
    assert m.match(line("response", "create", "kv1/dockerhub/team-d")) == ["kv1/dockerhub/team-d"]
    assert m.match(line("response", "delete", "kv1/dockerhub/team-d")) == ["kv1/dockerhub/team-d"]
    assert m.match(line("response", "read", "kv1/dockerhub/team-d")) == []


def test_reads_lists_requests_and_other_paths_are_ignored() -> None:
    m = make_matcher()
    assert m.match(line("response", "read", "secret/data/dockerhub/team-a")) == []
    assert m.match(line("response", "read", "secret/metadata/dockerhub/team-a")) == []
    assert m.match(line("response", "list", "secret/metadata/dockerhub/")) == []
    # the request entry is written before Vault acts: only the response counts
    assert m.match(line("request", "create", "secret/data/dockerhub/team-a")) == []
    assert m.match(line("response", "create", "secret/data/other/x")) == []  # outside the prefix
    assert m.match(line("response", "update", "sys/mounts/kv1")) == []
    assert m.match(line("response", "update", "auth/token/create")) == []


def test_failed_writes_are_ignored() -> None:
    m = make_matcher()
    errs = [raw for raw in LINES if json.loads(raw).get("error")]
    assert len(errs) >= 3  # the CAS mismatch and the permission-denied request + response
    texts = [json.loads(raw)["error"] for raw in errs]
    assert any("permission denied" in t for t in texts) and any("invalid request" in t for t in texts)
    for raw in errs:
        assert m.match(raw) == []


def test_every_captured_line_matches_only_expected_keys() -> None:
    # a whole-file sweep: nothing outside the configured sources is ever produced
    m = make_matcher()
    keys = {k for raw in LINES for k in m.match(raw)}
    assert keys == {A, "secret/dockerhub/nested/deep/team-b", "team/kv/dockerhub/team-c", "kv1/dockerhub/team-d"}


def test_namespaces() -> None:
    raw = line("response", "create", "secret/data/dockerhub/team-e", ns="ns1/")
    assert make_matcher().match(raw) == []  # a root-namespace bridge: a different secret
    assert make_matcher(namespace="ns1").match(raw) == ["secret/dockerhub/team-e"]
    assert make_matcher(namespace="/ns1/").match(raw) == ["secret/dockerhub/team-e"]
    assert make_matcher(namespace="ns1").match(line("response", "create", "secret/data/dockerhub/team-a")) == []
    # Vault Enterprise variants that keep the namespace in the path are stripped as well
    e = json.loads(raw)
    e["request"]["path"] = "ns1/secret/data/dockerhub/team-e"
    assert make_matcher(namespace="ns1").match(json.dumps(e)) == ["secret/dockerhub/team-e"]


def test_auto_version_mounts_are_guessed_from_the_path_shape() -> None:
    m = AuditMatcher([SourceSettings(mount="secret"), SourceSettings(mount="kv1")], {})
    assert m.match(line("response", "patch", "secret/data/dockerhub/team-a")) == [A]
    assert m.match(line("response", "update", "secret/destroy/dockerhub/team-a")) == [A]
    assert m.match(line("response", "create", "kv1/dockerhub/team-d")) == ["kv1/dockerhub/team-d"]


def test_minimal_hand_written_entry_matches() -> None:
    # what an older Vault or a shipper that drops fields may send: no namespace, no mount_point
    e = {"type": "response", "request": {"operation": "update", "path": "secret/data/dockerhub/x"}}
    assert make_matcher().match(json.dumps(e)) == ["secret/dockerhub/x"]


def test_exclude_keeps_the_bridges_own_state_quiet() -> None:
    m = AuditMatcher([SourceSettings(mount="secret")], {"secret": 2}, exclude=["secret/dockerhub"])
    assert m.match(line("response", "create", "secret/data/dockerhub/team-a")) == []
    assert m.match(line("response", "create", "secret/data/other/x")) == ["secret/other/x"]


def test_prefixed_and_enveloped_lines() -> None:
    raw = line("response", "create", "secret/data/dockerhub/team-a")
    m = make_matcher()
    assert m.match(b"vault-audit: " + raw) == [A]  # the file device's `prefix` option
    assert m.match(json.dumps({"message": raw.decode(), "host": "h"})) == [A]  # Vector file source
    assert m.match(json.dumps({"log": raw.decode()})) == [A]  # Fluent Bit tail without a parser
    assert m.match(raw.decode()) == [A]  # str works as well as bytes


@pytest.mark.parametrize(
    "bad",
    [
        b"",
        b"   ",
        b"not json",
        b"{",
        b"[1, 2]",
        b"null",
        b'{"type": "response"}',
        b'{"type": "response", "request": "x"}',
        b'{"type": "response", "request": {"operation": "create", "path": 7}}',
        b'{"type": "response", "request": {"operation": "create", "path": "secret/data/dockerhub/x", "namespace": 3}}',
        b"\xff\xfe\x00garbage",
        b"[" * 100_000 + b"]" * 100_000,
        b'{"a":' * 50_000,
    ],
)
def test_malformed_lines_are_ignored(bad: bytes) -> None:
    assert make_matcher().match(bad) == []


def test_huge_lines_are_ignored_without_parsing() -> None:
    e = json.loads(line("response", "create", "secret/data/dockerhub/team-a"))
    e["padding"] = "x" * (1 << 20)
    assert make_matcher().match(json.dumps(e).encode()) == []
    assert make_matcher(max_line_bytes=4 << 20).match(json.dumps(e).encode()) == [A]


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2000) | st.text(max_size=2000))
def test_match_never_raises(data: bytes | str) -> None:
    result = make_matcher().match(data)
    assert isinstance(result, list)


@settings(max_examples=100, deadline=None)
@given(st.integers(min_value=0, max_value=len(LINES) - 1), st.integers(min_value=0, max_value=4000))
def test_truncated_real_lines_never_raise_nor_match(index: int, cut: int) -> None:
    raw = LINES[index]
    if cut < len(raw):
        assert make_matcher().match(raw[:cut]) == []


# --- TriggerQueue ------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def sample(m: Metrics, name: str, source: str) -> float:
    return m.registry.get_sample_value(f"cybedefend_bridge_{name}_total", {"source": source}) or 0.0


def test_a_burst_on_one_key_is_one_request_after_it_settles() -> None:
    clock, m = FakeClock(), Metrics()
    q = TriggerQueue(0.25, 10, m, clock)
    for dt in (0.0, 0.1, 0.1, 0.05):
        clock.now += dt
        assert q.offer([A], "audit_file")
    assert q.take(0) is None  # the last write was just now
    clock.now += 0.2
    assert q.take(0) is None  # still inside the debounce window of the last write
    clock.now += 0.06
    req = q.take(0)
    assert req is not None
    assert req.trigger == "audit_file" and req.paths == frozenset({A})
    assert req.received_at == {A: 1000.0}  # when the burst was first heard
    assert q.take(0) is None
    assert sample(m, "trigger_events", "audit_file") == 4


def test_two_keys_settle_separately_and_together() -> None:
    clock, m = FakeClock(), Metrics()
    q = TriggerQueue(0.25, 10, m, clock)
    q.offer(["k/a"], "webhook", heard_at=5.0)
    clock.now += 0.2
    q.offer(["k/b"], "audit_socket")
    clock.now += 0.1
    first = q.take(0)
    assert first is not None and first.paths == frozenset({"k/a"}) and first.received_at == {"k/a": 5.0}
    assert first.trigger == "webhook"
    clock.now += 0.2
    second = q.take(0)
    assert second is not None and second.paths == frozenset({"k/b"}) and second.trigger == "audit_socket"
    # both ready at once: one request, named after the earliest source
    q.offer(["k/c"], "audit_ingest")
    clock.now += 0.01
    q.offer(["k/d"], "forwarded")
    clock.now += 1
    both = q.take(0)
    assert both is not None and both.paths == frozenset({"k/c", "k/d"}) and both.trigger == "audit_ingest"


def test_a_key_written_forever_is_still_synced_after_max_delay() -> None:
    clock = FakeClock()
    q = TriggerQueue(0.25, 10, Metrics(), clock, max_delay_seconds=2.0)
    for _ in range(19):
        q.offer([A], "audit_file")
        clock.now += 0.1
        assert q.take(0) is None
    clock.now += 0.1
    q.offer([A], "audit_file")
    req = q.take(0)
    assert req is not None and req.paths == frozenset({A})


def test_overflow_drops_keys_and_requests_one_full_pass() -> None:
    clock, m = FakeClock(), Metrics()
    q = TriggerQueue(0.25, 2, m, clock)
    assert q.offer(["k/a"], "audit_file")
    assert q.offer(["k/b", "k/a"], "webhook")  # k/a again is not a new key
    assert q.pending == 2
    assert q.offer(["k/c"], "audit_file") is False
    assert q.full_requested and q.pending == 0
    assert sample(m, "trigger_events_dropped", "audit_file") == 2  # k/a and k/c
    assert sample(m, "trigger_events_dropped", "webhook") == 1  # k/b
    assert q.offer(["k/d"], "audit_file")  # absorbed by the full pass already due
    assert q.pending == 0
    req = q.take(0)
    assert req is not None and req.paths is None and req.trigger == "audit_file"
    assert not q.full_requested and q.take(0) is None
    assert sample(m, "trigger_events", "audit_file") == 3


def test_request_full_wins_over_pending_keys() -> None:
    clock, m = FakeClock(), Metrics()
    q = TriggerQueue(0.0, 10, m, clock)
    q.offer(["k/a"], "audit_file")
    q.request_full("webhook")
    req = q.take(0)
    assert req is not None and req.paths is None and req.trigger == "webhook"
    assert q.take(0) is None  # k/a is covered by that full pass
    assert sample(m, "trigger_events", "webhook") == 1


def test_take_times_out_and_close_wakes_takers() -> None:
    q = TriggerQueue(0.25, 10, Metrics())
    t0 = time.monotonic()
    assert q.take(0.2) is None
    assert 0.19 <= time.monotonic() - t0 < 1.0
    got: list[object] = []
    taker = threading.Thread(target=lambda: got.append(q.take(30)))
    taker.start()
    time.sleep(0.05)
    t0 = time.monotonic()
    q.close()
    taker.join(2)
    assert not taker.is_alive() and got == [None] and time.monotonic() - t0 < 1.0
    assert q.offer(["k/a"], "audit_file") is False


def test_a_blocked_taker_gets_a_key_after_the_real_debounce() -> None:
    q = TriggerQueue(0.1, 10, Metrics())
    got: list[object] = []
    taker = threading.Thread(target=lambda: got.append(q.take(5)))
    taker.start()
    time.sleep(0.05)
    t0 = time.monotonic()
    q.offer([A], "audit_socket")
    taker.join(5)
    elapsed = time.monotonic() - t0
    assert len(got) == 1 and getattr(got[0], "paths", None) == frozenset({A})
    assert 0.09 <= elapsed < 1.0


def test_concurrent_offers_lose_nothing() -> None:
    q = TriggerQueue(0.01, 100_000, Metrics())
    keys = [f"m/k{i}" for i in range(2000)]
    seen: set[str] = set()
    done = threading.Event()

    def taker() -> None:
        while not done.is_set() or q.pending:
            req = q.take(0.05)
            if req is not None and req.paths is not None:
                seen.update(req.paths)

    t = threading.Thread(target=taker)
    t.start()
    producers = [threading.Thread(target=lambda s=s: [q.offer([k], "audit_file") for k in keys[s::4]]) for s in range(4)]
    for p in producers:
        p.start()
    for p in producers:
        p.join()
    done.set()
    t.join(10)
    assert seen == set(keys)


def test_unknown_sources_are_refused() -> None:
    q = TriggerQueue(0.25, 10, Metrics())
    with pytest.raises(ValueError):
        q.offer(["k/a"], "somewhere")
    with pytest.raises(ValueError):
        q.request_full("somewhere")
    with pytest.raises(ValueError):
        line_handler(make_matcher(), q, "somewhere")


def test_line_handler_feeds_matched_keys_to_the_queue() -> None:
    clock = FakeClock()
    q = TriggerQueue(0.0, 10, Metrics(), clock)
    handle = line_handler(make_matcher(), q, "audit_ingest")
    handle(line("response", "read", "secret/data/dockerhub/team-a"))
    handle(b"garbage")
    assert q.pending == 0
    handle(line("response", "create", "secret/data/dockerhub/team-a"))
    req = q.take(0)
    assert req is not None and req.paths == frozenset({A}) and req.trigger == "audit_ingest"


def test_fixture_holds_no_clear_secret() -> None:
    text = FIXTURE.read_text()
    assert "FIXTURECLEARVALUE" not in text and "dckr_pat_" not in text
    # every data value in a KV write is HMAC'd
    e = json.loads(line("request", "create", "secret/data/dockerhub/team-a"))
    assert all(str(v).startswith("hmac-sha256:") for v in e["request"]["data"]["data"].values())


# --- leading edge ----------------------------------------------------------------------------


def test_leading_edge_a_lone_write_is_due_at_once() -> None:
    clock = FakeClock()
    q = TriggerQueue(0.25, 10, Metrics(), clock, leading_edge=True)
    q.offer([A], "audit_file")
    req = q.take(0)  # no clock movement: no debounce to wait out
    assert req is not None and req.paths == frozenset({A}) and req.received_at == {A: 1000.0}


def test_leading_edge_a_burst_costs_the_leading_sync_and_one_follow_up() -> None:
    clock = FakeClock()
    q = TriggerQueue(0.25, 10, Metrics(), clock, leading_edge=True)
    q.offer([A], "audit_file")
    first = q.take(0)
    assert first is not None and first.paths == frozenset({A})
    # The pass for the first write runs; meanwhile the burst goes on and nobody takes.
    for _ in range(5):
        clock.now += 0.1
        q.offer([A], "audit_file")
        assert q.take(0) is None  # still within the debounce of the latest write
    clock.now += 0.26  # the burst settled
    follow_up = q.take(0)
    assert follow_up is not None and follow_up.paths == frozenset({A})
    assert follow_up.received_at == {A: 1000.1}  # the first write after the leading one
    assert q.take(0) is None  # one follow-up, not one per write


def test_leading_edge_writes_while_busy_coalesce_across_keys() -> None:
    clock = FakeClock()
    q = TriggerQueue(0.25, 10, Metrics(), clock, leading_edge=True)
    q.offer(["k/a"], "webhook")
    q.offer(["k/b"], "audit_socket")
    clock.now += 0.05
    q.offer(["k/a"], "webhook")  # while the worker is still busy elsewhere
    both = q.take(0)
    assert both is not None and both.paths == frozenset({"k/a", "k/b"}) and both.trigger == "webhook"
    assert q.take(0) is None


def test_leading_edge_again_after_a_quiet_period_and_max_delay_still_holds() -> None:
    clock = FakeClock()
    q = TriggerQueue(0.25, 10, Metrics(), clock, leading_edge=True, max_delay_seconds=1.0)
    q.offer([A], "audit_file")
    assert q.take(0) is not None
    clock.now += 0.3  # quiet for longer than the debounce: the next write leads again
    q.offer([A], "audit_file")
    assert q.take(0) is not None
    for _ in range(9):  # now written every 0.1 s (never quiet): debounced, yet bounded by max_delay
        clock.now += 0.1
        q.offer([A], "audit_file")
    assert q.take(0) is None
    clock.now += 0.15
    q.offer([A], "audit_file")
    assert q.take(0) is None  # 0.95 s after the first debounced write
    clock.now += 0.1
    q.offer([A], "audit_file")
    assert q.take(0) is not None  # 1.05 s after it: max_delay, though the writes never stopped


def test_leading_edge_memory_of_recent_writes_is_bounded() -> None:
    clock = FakeClock()
    q = TriggerQueue(0.25, 5, Metrics(), clock, leading_edge=True)
    for i in range(100):
        q.offer([f"k/{i}"], "audit_file")
        assert q.take(0) is not None
        clock.now += 0.3
    assert len(q._recent) <= 2 * 5 + 1
