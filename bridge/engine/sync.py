"""One sync pass: discover -> list what writes touch -> read changed values -> plan -> execute.

The engine gathers the facts and the planner decides (docs/adr/0007-decided-from-the-truth.md):
Vault is discovered, the organizations a write may touch are listed in CybeDefend (every one
when the drift check is due; none in a steady pass), values are read only where needed, then
`bridge.planner` turns (Vault, ledger, listings) into actions and the executor carries them out.
The engine owns the order and the failure boundaries: a source whose listing fails is left
out of the pass (none of its secrets is judged gone), an organization whose listing fails gets
no write, one secret's failure never stops the others, and a stop request lets the secrets in
flight finish and defers the rest.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, replace
from typing import Any

from bridge.config import Settings
from bridge.engine.executor import Executor
from bridge.errors import AuthenticationError, BridgeError, LeaseLost, LegacyApiKeyGone, NotFound, PassAbort, VaultError
from bridge.keyring import Keyring
from bridge.logs import get_logger
from bridge.metrics import Metrics
from bridge.model import Action, ActionKind, Outcome, RemoteCredential, Result, State, VaultEntry, iso8601
from bridge.planner import (
    RemoteView,
    Scope,
    count_deletions,
    plan,
    reconcile,
    source_of,
    touched_organizations,
    values_to_read,
    with_evidence,
    writing_organizations,
)
from bridge.ports import Failing, Ledger, LedgerRecord, PassReport, PassRequest, Registrar, SecretSource, TokenVerifier

log = get_logger(__name__)

_COUNT_NAMES = {
    ActionKind.CREATE: "created",
    ActionKind.ROTATE: "rotated",
    ActionKind.MOVE: "moved",
    ActionKind.RETIRE: "retired",
    ActionKind.ADOPT: "adopted",
    ActionKind.REFRESH: "refreshed",
    ActionKind.SKIP: "skipped",
    ActionKind.REJECT: "rejected",
    ActionKind.DELETE: "deleted",
}
SUMMARY_KEYS = ("created", "rotated", "moved", "retired", "adopted", "refreshed", "deleted", "skipped", "rejected", "failed",
                "deferred")


@dataclass(frozen=True, slots=True)
class _Planned:
    actions: list[Action]
    view: RemoteView
    drift: bool  # every organization was listed (the drift check)
    scope: Scope
    unseen_sources: list[str]  # sources whose discovery failed: "mount/path: why"
DRIFT_META = "last_drift_check"
_FAILING_STATES = frozenset({State.FAILED, State.REJECTED, State.PENDING})


def failing_rows(rows: list[LedgerRecord], now: float) -> tuple[Failing, ...]:
    """The tracked secrets not in a good state: failed, rejected, pending, or waiting in backoff.

    Read from the ledger after the pass, not from the pass's outcomes: a secret skipped because
    it is inside its backoff window is still unregistered, and a cron job must see that.
    """
    return tuple(
        Failing(r.key, r.last_action or "", r.reason or "", r.next_attempt_at, r.state.value)
        for r in sorted(rows, key=lambda r: r.key)
        if r.state in _FAILING_STATES or (r.next_attempt_at is not None and r.next_attempt_at > now
                                          and r.state not in (State.RETIRED, State.ORPHANED))
    )


class SyncEngine:
    """Runs passes; one at a time (a lock), whatever triggers them."""

    def __init__(
        self,
        settings: Settings,
        source: SecretSource,
        registrar: Registrar,
        ledger: Ledger,
        keyring: Keyring,
        metrics: Metrics,
        *,
        stop: threading.Event | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        progress: Callable[[int, int], None] | None = None,
        verifier: TokenVerifier | None = None,
    ) -> None:
        self._s = settings
        self.progress = progress  # (done, total) after each action; the CLI draws a bar on a terminal
        self._source = source
        self._api = registrar
        self._ledger = ledger
        self._keys = keyring
        self._m = metrics
        self._stop = stop or threading.Event()
        self._clock = clock
        self._mono = monotonic
        self._exec = Executor(settings, registrar, ledger, keyring, metrics, clock=clock, rng=rng, verifier=verifier)
        self._lock = threading.Lock()
        self._last: PassReport | None = None
        self._last_full: PassReport | None = None
        self._guard_tripped = False
        self._unread: set[str] = set()  # keys whose value read failed in the pass being planned
        self._unread_lock = threading.Lock()

    @property
    def last_report(self) -> PassReport | None:
        return self._last

    @property
    def last_full_report(self) -> PassReport | None:
        return self._last_full

    # -- discovery ------------------------------------------------------------------------
    def _discover(self, request: PassRequest) -> tuple[list[VaultEntry], Scope, list[str]]:
        """What Vault holds in the pass's scope, and which sources could not be seen (named)."""
        entries: list[VaultEntry] = []
        if request.paths is None:
            ok: set[int] = set()
            errors: list[str] = []
            for idx, src in enumerate(self._s.sources):
                try:
                    entries.extend(self._source.discover(src, idx))
                    ok.add(idx)
                except VaultError as exc:
                    errors.append(f"{src.mount}/{src.path} ({exc})")
                    log.error("source_discovery_failed", source=f"{src.mount}/{src.path}", error=str(exc))
            if not ok and errors:
                raise VaultError("; ".join(errors))
            return entries, Scope(sources=frozenset(ok)), errors
        keys: set[str] = set()
        for key in sorted(request.paths):
            found = source_of(key, self._s.sources)
            if found is None:
                log.debug("trigger_outside_sources", path=key)
                continue
            src = self._s.sources[found]
            entry = self._source.describe(src, found, key[len(src.mount) + 1 :])
            keys.add(key)
            if entry is not None:
                entries.append(entry)
        return entries, Scope(keys=frozenset(keys)), []

    def _read_values(self, todo: list[VaultEntry]) -> dict[str, Mapping[str, Any] | None]:
        """Values of the secrets that need a write, `vault.concurrency` at a time."""

        def one(entry: VaultEntry) -> tuple[str, Mapping[str, Any] | None]:
            if self._stop.is_set():
                return entry.ref.key, None
            try:
                # Empty: the version was deleted between the metadata read and now. Not a bad
                # value to reject (an undelete would not lift that): skip it this pass.
                return entry.ref.key, self._source.read_value(entry.ref, entry.version) or None
            except VaultError as exc:
                # The planner sees no value and skips the secret this pass; the next pass retries.
                # The pass counts it as failed: a secret never registered because its value
                # could not be read (e.g. a policy without `read` on data/) is not a good state.
                log.warning("value_read_failed", path=entry.ref.key, version=entry.version, error=str(exc))
                with self._unread_lock:
                    self._unread.add(entry.ref.key)
                return entry.ref.key, None

        if len(todo) <= 1:
            return dict(map(one, todo))
        out: dict[str, Mapping[str, Any] | None] = {}
        with ThreadPoolExecutor(max_workers=self._s.vault.concurrency, thread_name_prefix="read") as pool:
            for key, value in pool.map(one, todo):
                out[key] = value
                if self.progress is not None:
                    self.progress(len(out), len(todo))
        return out

    # -- what CybeDefend holds ---------------------------------------------------------
    def _drift_due(self, request: PassRequest) -> bool:
        if request.paths is not None:
            return False
        if request.force_drift_check:
            return True
        last = self._ledger.get_meta(DRIFT_META)
        return last is None or self._clock() - float(last) >= self._s.sync.drift_check_interval_seconds

    def _list(self, orgs: set[str]) -> RemoteView:
        """A fresh listing of each organization; a failed one is named, never taken as empty."""
        listings: dict[str, list[RemoteCredential]] = {}
        unlisted: dict[str, str] = {}
        for org in sorted(orgs):
            try:
                listings[org] = self._api.all_credentials(org)
            except (AuthenticationError, LegacyApiKeyGone) as exc:
                raise PassAbort(str(exc)) from exc
            except BridgeError as exc:
                unlisted[org] = str(exc)
                log.warning("organization_listing_failed", organization=org, error=str(exc))
        return RemoteView(listings=listings, unlisted=unlisted)

    def _links(self, view: RemoteView, need: set[tuple[str, str]]) -> RemoteView:
        links = dict(view.links)
        for org, cred_id in sorted(need):
            try:
                links[cred_id] = frozenset(self._api.linked_projects(org, cred_id))
            except NotFound:
                links[cred_id] = frozenset()
            except (AuthenticationError, LegacyApiKeyGone) as exc:
                raise PassAbort(str(exc)) from exc
        return replace(view, links=links)

    # -- a pass ---------------------------------------------------------------------------
    def plan(self, request: PassRequest) -> list[Action]:
        """Every action a pass would take now: reads Vault and CybeDefend, writes nothing."""
        with self._lock:
            return self._plan(request).actions

    def _plan(self, request: PassRequest) -> _Planned:
        entries, scope, unseen = self._discover(request)
        records = {r.key: r for r in self._ledger.all()}
        now = self._clock()
        # An explicit one-shot run is a request to try now: no secret waits out its backoff.
        retry_now = frozenset(e.ref.key for e in entries) if request.retry_backoff else request.paths or frozenset()
        hinted = {p.organization_id for p in self._ledger.pending_deletes()
                  if p.next_attempt_at is None or now >= p.next_attempt_at or request.force_drift_check}
        drift = self._drift_due(request)
        orgs = touched_organizations(entries, records, scope, self._s, hinted, everything=drift)
        view = self._list(orgs) if orgs else RemoteView()
        believed = with_evidence(records, view)
        todo = values_to_read(entries, believed, self._s, now, retry_now)
        self._unread = set()
        values = self._read_values(todo)
        intents = plan(entries, values, believed, scope, self._s, self._keys, now, retry_now)
        # Creates, rotations and moves are known once values are read: list where they write
        # before settling them, never create blind (the API has no idempotency key).
        extra = writing_organizations(intents) - set(view.listings) - set(view.unlisted)
        if extra:
            more = self._list(extra)
            view = replace(view, listings={**view.listings, **more.listings}, unlisted={**view.unlisted, **more.unlisted})
        actions, need = reconcile(intents, entries, believed, view, scope, self._s, self._keys)
        if need:
            view = self._links(view, need)
            actions, _ = reconcile(intents, entries, believed, view, scope, self._s, self._keys)
        return _Planned(actions, view, drift, scope, unseen)

    def run(self, request: PassRequest) -> PassReport:
        with self._lock:
            return self._run(request)

    def _run(self, request: PassRequest) -> PassReport:
        full = request.paths is None
        started, t0 = self._clock(), self._mono()
        counts: Counter[str] = Counter()
        error: str | None = None
        result = "ok"
        try:
            planned = self._plan(request)
            actions = planned.actions
            deletes = count_deletions(actions, self._s)
            allowed = not any(a.paused for a in actions)
            if not allowed:
                log.error(
                    "delete_guard_tripped",
                    deletions_planned=deletes,
                    max_deletes_per_pass=self._s.sync.max_deletes_per_pass,
                    hint="check the source paths and tags; raise sync.max_deletes_per_pass if this is intended",
                )
            if full:
                self._guard_tripped = not allowed
            self._m.delete_guard.set(1 if self._guard_tripped else 0)
            for outcome in self._execute(actions, request):
                if outcome.result == Result.FAILED:
                    counts["failed"] += 1
                elif outcome.result == Result.DEFERRED:
                    counts["deferred"] += 1
                elif outcome.kind == ActionKind.SKIP and outcome.action.ref.key in self._unread:
                    counts["failed"] += 1
                else:
                    counts[_COUNT_NAMES[outcome.kind]] += 1
            self._forget_settled_hints(planned.view)
            if planned.drift and not planned.view.unlisted and not self._stop.is_set():
                self._ledger.set_meta(DRIFT_META, repr(self._clock()))
            if self._stop.is_set():
                result = "aborted"
            elif counts["failed"] or planned.view.unlisted or planned.unseen_sources:
                # A pass that could not see all of Vault or CybeDefend is not "ok", even when
                # nothing failed in what it did see.
                result = "partial"
                unseen = [f"Vault source {s}" for s in planned.unseen_sources]
                unseen += [f"CybeDefend organization {o} ({why})" for o, why in sorted(planned.view.unlisted.items())]
                error = "could not see " + "; ".join(unseen) if unseen else None
        except LeaseLost as exc:
            # Another writer may lead now: stopping is the correct outcome, the next leader goes on.
            result, error = "aborted", str(exc)
            log.warning("pass_stopped_lease_lost", error=error)
        except PassAbort as exc:
            result, error = "failed", str(exc)
            log.error("pass_aborted", error=error, hint="fix the CybeDefend credential (see docs/cybedefend-setup.md)")
        except BridgeError as exc:
            result, error = "failed", str(exc)
            log.error("pass_failed", error=error)
        counts_out = {k: counts.get(k, 0) for k in SUMMARY_KEYS}
        finished = self._clock()
        report = PassReport(
            trigger=request.trigger, full=full, started_at=started, finished_at=finished, result=result,
            counts=counts_out, vault_requests=dict(self._source.request_counts()), error=error,
            # Only the unsettled rows are read back, not the whole ledger a second time.
            delete_guard_tripped=self._guard_tripped, failing=failing_rows(self._ledger.unsettled(finished), finished),
        )
        self._publish(report, self._mono() - t0)
        return report

    def _forget_settled_hints(self, view: RemoteView) -> None:
        """A reminder to delete is done with once the listing shows the credential gone."""
        for item in self._ledger.pending_deletes():
            creds = view.listings.get(item.organization_id)
            if creds is not None and all(c.id != item.credential_id for c in creds):
                self._ledger.remove_pending_delete(item.credential_id)

    def _execute(self, actions: list[Action], request: PassRequest) -> list[Outcome]:
        quiet = [a for a in actions if a.kind == ActionKind.SKIP and not a.deletes and a.blocked is None]
        busy = [a for a in actions if not (a.kind == ActionKind.SKIP and not a.deletes and a.blocked is None)]
        # Skips touch nothing: counted in one go (a steady pass is almost all skips).
        outcomes = [Outcome(a, Result.OK, a.kind, reason=a.reason) for a in quiet]
        if quiet:
            self._m.actions.labels(action=ActionKind.SKIP.value, result=Result.OK.value).inc(len(quiet))
        total = len(actions)
        if self.progress is not None:
            self.progress(len(outcomes), total)
        if not busy:
            return outcomes
        abort: PassAbort | None = None
        with ThreadPoolExecutor(max_workers=self._s.cybedefend.max_concurrency, thread_name_prefix="sync") as pool:
            pending: set[Future[Outcome]] = set()
            queue = list(busy)
            while queue or pending:
                while queue and len(pending) < self._s.cybedefend.max_concurrency and not self._stop.is_set() and abort is None:
                    pending.add(pool.submit(self._exec.execute, queue.pop(0)))
                if not pending:
                    break
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    try:
                        outcome = fut.result()
                    except PassAbort as exc:
                        abort = exc
                        continue
                    outcomes.append(outcome)
                    self._observe_latency(outcome, request)
                    if self.progress is not None:
                        self.progress(len(outcomes), total)
            for action in queue:  # not started: stop requested or the pass aborted
                outcomes.append(Outcome(action, Result.DEFERRED, action.kind, reason="not started this pass"))
        if abort is not None:
            raise abort
        return outcomes

    def _observe_latency(self, outcome: Outcome, request: PassRequest) -> None:
        heard = request.received_at.get(outcome.action.ref.key)
        if heard is not None and outcome.result == Result.OK and outcome.kind in (
            ActionKind.CREATE, ActionKind.ROTATE, ActionKind.MOVE, ActionKind.ADOPT
        ):
            self._m.write_latency.observe(max(0.0, self._mono() - heard))

    def _publish(self, report: PassReport, duration: float) -> None:
        self._last = report
        self._m.passes.labels(trigger=report.trigger, result=report.result).inc()
        self._m.pass_duration.labels(kind="full" if report.full else "targeted").observe(duration)
        if report.full:
            self._last_full = report
            self._m.last_pass.set(report.finished_at)
            if report.result == "ok":
                self._m.last_success.set(report.finished_at)
        states = self._ledger.counts_by_state()
        for st in State:
            self._m.secrets.labels(state=st.value).set(states.get(st.value, 0))
        self._m.pending_deletes.set(len(self._ledger.pending_deletes()))
        log.info(
            "pass_finished", trigger=report.trigger, full=report.full, result=report.result,
            duration_s=round(duration, 3), error=report.error, **report.counts,
            vault_requests=dict(report.vault_requests),
        )

    # -- status ---------------------------------------------------------------------------
    def status(self) -> Mapping[str, Any]:
        rows = sorted(self._ledger.all(), key=lambda r: r.key)
        return {
            "instance": self._s.sync.instance,
            "deletion_policy": self._s.sync.deletion_policy,
            "delete_guard_tripped": self._guard_tripped,
            "last_pass": self._last.to_json() if self._last else None,
            "last_full_pass": self._last_full.to_json() if self._last_full else None,
            "pending_deletes": len(self._ledger.pending_deletes()),
            "counts": dict(Counter(r.state.value for r in rows)),
            "secrets": [
                {
                    "path": r.key,
                    "version": r.version,
                    "seen_version": r.seen_version,
                    "organization_id": r.organization_id,
                    "project_id": r.project_id,
                    "credential_id": r.credential_id,
                    "state": r.state.value,
                    "last_action": r.last_action,
                    "last_result": r.last_result,
                    "reason": r.reason,
                    "attempts": r.attempts,
                    "next_attempt_at": iso8601(r.next_attempt_at),
                    "updated_at": iso8601(r.updated_at),
                }
                for r in rows
            ],
        }
