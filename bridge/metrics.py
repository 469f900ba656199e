"""Every Prometheus metric the bridge exports, in one place; the only module importing prometheus_client.

Labels are bounded sets only (trigger, action, result, reason code, endpoint name, status
class, operation): never a path, username, token or credential id. `docs/metrics.md` is
checked against `METRIC_NAMES` by a test, and the Grafana dashboard and alert rules are checked
against a live /metrics.

Every bounded label set is created at zero when `Metrics` is built, so that a panel or an
`increase()` sees 0 before the first event rather than no series at all (and a counter's first
increment is not lost to `increase()`, which needs two samples). `_created` series are off: they
doubled the sample count for a timestamp nobody graphs. The process and platform collectors give
`process_resident_memory_bytes`, `process_cpu_seconds_total`, `process_start_time_seconds` and
`python_info`, as every Prometheus exporter does.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from bridge import __version__
from bridge.model import ActionKind, Result, State

PREFIX = "cybedefend_bridge_"
CONTENT_TYPE = CONTENT_TYPE_LATEST

# Bounded label values, so that a caller's typo cannot create a new series.
TRIGGERS = ("schedule", "startup", "audit_file", "audit_socket", "audit_ingest", "webhook", "manual", "forwarded")
ENDPOINTS = (
    "client_apps", "token_exchange", "create", "list", "get", "delete", "get_links", "set_links", "all_credentials"
)
STATUS_CLASSES = ("2xx", "3xx", "4xx", "5xx", "error")
PASS_KINDS = ("full", "targeted")
LOGIN_RESULTS = ("ok", "failed")
RETRY_TARGETS = ("vault", "cybedefend")
UPSTREAMS = ("vault", "cybedefend")
TRIGGER_SOURCES = ("audit_file", "audit_socket", "audit_ingest", "webhook", "forwarded")

# Process-wide in prometheus_client (it has no per-registry switch); the bridge never wants them.
disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped in prometheus_client


PASS_RESULTS = ("ok", "partial", "failed", "aborted")  # PassReport.result
DELETION_WHYS = ("superseded", "duplicate", "retired", "moved")


class Metrics:
    """All of the bridge's metrics, registered in the registry it is given (tests pass their own)."""

    def __init__(self, registry: CollectorRegistry | None = None, *, reject_reasons: Sequence[str] = (),
                 process_collectors: bool = True) -> None:
        """`reject_reasons`: the validation's reason codes (given by the composition root, which
        knows them), created at zero like every other bounded label set."""
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self._flight_lock = threading.Lock()
        self._flight: _Flight | None = None
        r = self.registry
        if process_collectors:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
        p = PREFIX
        self.passes = Counter(p + "passes", "Sync passes by trigger and result.", ["trigger", "result"], registry=r)
        self.pass_duration = Histogram(
            p + "pass_duration_seconds",
            "Wall time of a sync pass.",
            ["kind"],  # full | targeted
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
            registry=r,
        )
        self.last_success = Gauge(
            p + "last_successful_pass_timestamp_seconds", "Unix time the last full pass finished without failures.", registry=r
        )
        self.last_pass = Gauge(p + "last_pass_timestamp_seconds", "Unix time the last full pass finished.", registry=r)
        self.actions = Counter(p + "actions", "Executed actions by action and result.", ["action", "result"], registry=r)
        self.rejects = Counter(p + "rejects", "Secrets rejected as bad input, by reason code.", ["reason"], registry=r)
        self.secrets = Gauge(p + "secrets", "Secrets tracked in the ledger, by state.", ["state"], registry=r)
        self.pending_deletes = Gauge(p + "pending_deletes", "Superseded or retired credentials waiting to be deleted.", registry=r)
        self.deletions = Counter(
            p + "credential_deletions",
            "Credentials of ours deleted, by why: superseded (an older token), duplicate (a second credential for the "
            "same token), retired (the secret is untagged or deleted), moved (it now targets another organization).",
            ["why"],
            registry=r,
        )
        for why in DELETION_WHYS:  # zero before the first deletion, so increase() sees it
            self.deletions.labels(why=why)
        self.delete_guard = Gauge(
            p + "delete_guard_tripped", "1 while deletions are paused by the max_deletes_per_pass guard rail.", registry=r
        )
        self.vault_requests = Counter(
            p + "vault_requests", "Vault requests by operation and result.", ["operation", "result"], registry=r
        )
        self.vault_logins = Counter(p + "vault_logins", "Vault logins by result.", ["result"], registry=r)
        self.vault_renewals = Counter(p + "vault_token_renewals", "Vault token renewals by result.", ["result"], registry=r)
        self.vault_token_ttl = Gauge(p + "vault_token_ttl_seconds", "Remaining TTL of the bridge's Vault token.", registry=r)
        self.api_requests = Counter(
            p + "cybedefend_requests", "CybeDefend API requests by endpoint and status class.", ["endpoint", "status_class"], registry=r
        )
        self.api_duration = Histogram(
            p + "cybedefend_request_duration_seconds",
            "CybeDefend API request latency.",
            ["endpoint"],
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.retries = Counter(p + "retries", "Retried requests by target.", ["target"], registry=r)  # vault | cybedefend
        self.rate_limited = Counter(p + "rate_limited_waits", "Waits caused by CybeDefend 429 answers.", registry=r)
        self.rate_limited_seconds = Counter(
            p + "rate_limited_wait_seconds", "Seconds spent waiting after CybeDefend 429 answers.", registry=r
        )
        self.trigger_events = Counter(p + "trigger_events", "Trigger events received, by source.", ["source"], registry=r)
        self.trigger_dropped = Counter(
            p + "trigger_events_dropped", "Trigger events dropped (queue full: a full pass was scheduled instead).", ["source"], registry=r
        )
        self.audit_refused = Counter(
            p + "audit_connections_refused",
            "Connections to the socket audit listener refused (peer outside allowed_peers, or too many).",
            registry=r,
        )
        self.http_queued = Counter(
            p + "http_requests_queued",
            "HTTP requests that waited for a worker thread because all server.threads were busy.",
            registry=r,
        )
        self.write_latency = Histogram(
            p + "write_to_registered_seconds",
            "From hearing a Vault write to the credential being registered in CybeDefend.",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300),
            registry=r,
        )
        self.scheduler_events = Counter(
            p + "scheduler_events", "Scheduler events: executed, missed, skipped (already running), error.", ["event"], registry=r
        )
        self.leader = Gauge(p + "leader", "1 when this replica holds the HA lease (always 1 without HA).", registry=r)
        self.ready = Gauge(p + "ready", "1 when /readyz answers 200 (the replica accepts work; not leadership, not upstream health).", registry=r)
        self.upstream_healthy = Gauge(
            p + "upstream_healthy",
            "1 when the upstream looks healthy: vault = the token works (probed every 5 s); cybedefend = the last pass did not fail.",
            ["upstream"],
            registry=r,
        )
        self.full_pass_fresh = Gauge(
            p + "full_pass_fresh", "1 when the last full pass finished within server.ready_max_intervals scheduler periods.", registry=r
        )
        self.ingest_deferred = Counter(
            p + "trigger_events_deferred",
            "Trigger requests answered while the bridge was still starting (Vault not reached yet): covered by the first full pass.",
            ["source"],
            registry=r,
        )
        self.build_info = Gauge(p + "build_info", "Build information; the value is always 1.", ["version"], registry=r)
        self.build_info.labels(version=__version__).set(1)
        self._zero(reject_reasons)

    def _zero(self, reject_reasons: Sequence[str]) -> None:
        for trigger in TRIGGERS:
            for result in PASS_RESULTS:
                self.passes.labels(trigger=trigger, result=result)
            self.trigger_events.labels(source=trigger)
        for kind in PASS_KINDS:
            self.pass_duration.labels(kind=kind)
        for action in ActionKind:
            for outcome in Result:
                self.actions.labels(action=action.value, result=outcome.value)
        for state in State:
            self.secrets.labels(state=state.value)
        for reason in reject_reasons:
            self.rejects.labels(reason=reason)
        for result in LOGIN_RESULTS:
            self.vault_logins.labels(result=result)
            self.vault_renewals.labels(result=result)
        for endpoint in ENDPOINTS:
            self.api_duration.labels(endpoint=endpoint)
            for status_class in STATUS_CLASSES:
                self.api_requests.labels(endpoint=endpoint, status_class=status_class)
        for target in RETRY_TARGETS:
            self.retries.labels(target=target)
        for source in TRIGGER_SOURCES:
            self.trigger_dropped.labels(source=source)
            self.ingest_deferred.labels(source=source)
        for upstream in UPSTREAMS:
            self.upstream_healthy.labels(upstream=upstream)

    def render(self) -> bytes:
        """The text exposition, rendered now (a few ms of CPU for the whole registry)."""
        return generate_latest(self.registry)

    def exposition(self) -> bytes:
        """The text exposition for one scrape. Scrapes that arrive while a render is in flight
        share its result (single flight) instead of each rendering the same document: several
        Prometheus replicas scraping at once cost one render. No result is ever kept after its
        render ends, so a scrape never sees values older than the render it waited for."""
        with self._flight_lock:
            flight = self._flight
            leader = flight is None
            if flight is None:
                flight = self._flight = _Flight()
        if not leader:
            flight.done.wait()
            return flight.body if flight.body is not None else self.render()  # its render failed: our own
        try:
            flight.body = self.render()
            return flight.body
        finally:
            with self._flight_lock:
                self._flight = None
            flight.done.set()


class _Flight:
    """One render in progress, and what it produced (None until done, or if it raised)."""

    __slots__ = ("body", "done")

    def __init__(self) -> None:
        self.body: bytes | None = None
        self.done = threading.Event()


def _names() -> tuple[str, ...]:
    m = Metrics(CollectorRegistry())  # the process collectors' names are included
    return tuple(sorted({mf.name for mf in m.registry.collect()}))


# Family names as Prometheus exposes them (counters without the _total suffix).
METRIC_NAMES: tuple[str, ...] = _names()
