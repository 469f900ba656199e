"""What /metrics exposes before anything happened: process collectors, zeroes, no `_created` series."""

from __future__ import annotations

import threading
import time

from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from bridge.metrics import ENDPOINTS, PASS_RESULTS, TRIGGERS, Metrics
from bridge.model import ActionKind
from bridge.validation import REJECT_CODES


def samples(m: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(m.exposition().decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return out


def test_no_created_series() -> None:
    text = Metrics().exposition().decode()
    assert "_created" not in text
    assert "cybedefend_bridge_passes_total" in text  # counters are still there, just without their twin


def test_process_and_platform_collectors() -> None:
    names = {name for name, _ in samples(Metrics())}
    for wanted in ("process_resident_memory_bytes", "process_cpu_seconds_total", "process_start_time_seconds",
                   "process_open_fds", "python_info"):
        assert wanted in names


def test_bounded_label_sets_start_at_zero() -> None:
    got = samples(Metrics(reject_reasons=REJECT_CODES))

    def value(name: str, **labels: str) -> float | None:
        return got.get((name, tuple(sorted(labels.items()))))

    for trigger in TRIGGERS:
        for result in PASS_RESULTS:
            assert value("cybedefend_bridge_passes_total", trigger=trigger, result=result) == 0
    for action in (k.value for k in ActionKind):
        assert value("cybedefend_bridge_actions_total", action=action, result="failed") == 0
    for endpoint in ENDPOINTS:
        assert value("cybedefend_bridge_cybedefend_requests_total", endpoint=endpoint, status_class="5xx") == 0
    for reason in REJECT_CODES:
        assert value("cybedefend_bridge_rejects_total", reason=reason) == 0
    assert value("cybedefend_bridge_trigger_events_dropped_total", source="audit_ingest") == 0
    assert value("cybedefend_bridge_trigger_events_deferred_total", source="webhook") == 0
    assert value("cybedefend_bridge_vault_logins_total", result="failed") == 0
    assert value("cybedefend_bridge_upstream_healthy", upstream="vault") == 0
    assert value("cybedefend_bridge_secrets", state="failed") == 0


def test_without_reject_reasons_no_reason_series_is_invented() -> None:
    assert not any(name == "cybedefend_bridge_rejects_total" for name, _ in samples(Metrics()))


def _blocking_render(m: Metrics, release: threading.Event, fail: bool = False) -> list[int]:
    """Replace `m.render` with one that blocks until `release`; returns the list of its calls."""
    calls: list[int] = []
    real = m.render

    def render() -> bytes:
        calls.append(1)
        if len(calls) == 1:
            release.wait(5)
            if fail:
                raise RuntimeError("collector broke")
        return real()

    m.render = render  # type: ignore[method-assign]
    return calls


def test_scrapes_during_a_render_share_it() -> None:
    m = Metrics(CollectorRegistry())
    release = threading.Event()
    calls = _blocking_render(m, release)
    bodies: list[bytes] = []
    threads = [threading.Thread(target=lambda: bodies.append(m.exposition())) for _ in range(4)]
    threads[0].start()
    while not calls:
        time.sleep(0.001)
    for t in threads[1:]:
        t.start()
    time.sleep(0.05)  # the followers are waiting on the first render
    release.set()
    for t in threads:
        t.join(5)
    assert len(calls) == 1 and len(bodies) == 4 and len({id(b) for b in bodies}) == 1


def test_a_scrape_after_a_render_renders_again_with_fresh_values() -> None:
    m = Metrics(CollectorRegistry())
    first = m.exposition()
    m.passes.labels(trigger="manual", result="ok").inc(7)
    second = m.exposition()
    assert b'cybedefend_bridge_passes_total{result="ok",trigger="manual"} 7.0' in second
    assert b'cybedefend_bridge_passes_total{result="ok",trigger="manual"} 7.0' not in first


def test_a_failed_render_makes_each_waiting_scrape_render_its_own() -> None:
    m = Metrics(CollectorRegistry())
    release = threading.Event()
    calls = _blocking_render(m, release, fail=True)
    errors: list[BaseException] = []
    bodies: list[bytes] = []

    def leader() -> None:
        try:
            m.exposition()
        except RuntimeError as exc:
            errors.append(exc)

    lead = threading.Thread(target=leader)
    lead.start()
    while not calls:
        time.sleep(0.001)
    follower = threading.Thread(target=lambda: bodies.append(m.exposition()))
    follower.start()
    time.sleep(0.05)
    release.set()
    for t in (lead, follower):
        t.join(5)
    assert len(errors) == 1 and len(bodies) == 1 and b"cybedefend_bridge_passes_total" in bodies[0]
    assert m.exposition()  # and the next scrape is not stuck behind the failed one
