"""One sync pass: discover -> (drift check) -> read changed values -> plan -> execute -> record.

The engine owns the order and the failure boundaries: a source whose listing fails is left
out of the pass (its ledger rows are not retired because of it), one secret's failure never
stops the others, and a stop request lets the secrets in flight finish and defers the rest.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, replace
from typing import Any

from bridge.config import Settings
from bridge.engine.executor import Executor
from bridge.errors import BridgeError, PassAbort, VaultError
from bridge.keyring import Keyring
from bridge.logs import get_logger
from bridge.metrics import Metrics
from bridge.model import Action, ActionKind, Marker, Outcome, Result, State, VaultEntry
from bridge.planner import Scope, count_deletions, plan, source_of, values_to_read
from bridge.ports import Ledger, LedgerRecord, PassReport, PassRequest, PendingDelete, Registrar, SecretSource, TokenVerifier
from bridge.validation import is_tagged

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
}
SUMMARY_KEYS = ("created", "rotated", "moved", "retired", "adopted", "refreshed", "skipped", "rejected", "failed", "deferred")
DRIFT_META = "last_drift_check"


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
    def _discover(self, request: PassRequest) -> tuple[list[VaultEntry], Scope]:
        entries: list[VaultEntry] = []
        if request.paths is None:
            ok: set[int] = set()
            errors: list[str] = []
            for idx, src in enumerate(self._s.sources):
                try:
                    entries.extend(self._source.discover(src, idx))
                    ok.add(idx)
                except VaultError as exc:
                    errors.append(f"{src.mount}/{src.path}: {exc}")
                    log.error("source_discovery_failed", source=f"{src.mount}/{src.path}", error=str(exc))
            if not ok and errors:
                raise VaultError("; ".join(errors))
            return entries, Scope(sources=frozenset(ok))
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
        return entries, Scope(keys=frozenset(keys))

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

    # -- drift ----------------------------------------------------------------------------
    def _drift_due(self, request: PassRequest) -> bool:
        if request.force_drift_check:
            return True
        last = self._ledger.get_meta(DRIFT_META)
        return last is None or self._clock() - float(last) >= self._s.sync.drift_check_interval_seconds

    def _check_drift(self) -> int:
        """Mark registered rows whose credential vanished from CybeDefend as missing."""
        rows = [r for r in self._ledger.all() if r.state == State.REGISTERED and r.credential_id and r.project_id]
        missing = 0
        by_project: dict[str, list[LedgerRecord]] = {}
        for r in rows:
            by_project.setdefault(r.project_id or "", []).append(r)
        for project, recs in by_project.items():
            try:
                present = {c.id for c in self._api.list_project(project)}
            except BridgeError as exc:
                log.warning("drift_check_skipped", project=project, error=str(exc))
                continue
            for r in recs:
                if r.credential_id not in present:
                    missing += 1
                    log.warning("credential_missing", path=r.key, credential_id=r.credential_id)
                    self._ledger.put(replace(r, state=State.MISSING, reason="the credential is gone from CybeDefend",
                                             updated_at=self._clock()))
        self._ledger.set_meta(DRIFT_META, repr(self._clock()))
        return missing

    # -- a pass ---------------------------------------------------------------------------
    def plan(self, request: PassRequest) -> list[Action]:
        """What a pass would do now: reads Vault (values only where needed), writes nothing."""
        with self._lock:
            actions, _, _ = self._plan(request)
            return actions

    def _plan(self, request: PassRequest) -> tuple[list[Action], list[VaultEntry], Scope]:
        entries, scope = self._discover(request)
        records = {r.key: r for r in self._ledger.all()}
        now = self._clock()
        retry_now = request.paths or frozenset()
        todo = values_to_read(entries, records, self._s, now, retry_now)
        self._unread = set()
        values = self._read_values(todo)
        actions = plan(entries, values, records, scope, self._s, self._keys, now, retry_now)
        return actions, entries, scope

    def run(self, request: PassRequest) -> PassReport:
        with self._lock:
            return self._run(request)

    def _run(self, request: PassRequest) -> PassReport:
        full = request.paths is None
        started, t0 = self._clock(), self._mono()
        counts: Counter[str] = Counter()
        error: str | None = None
        result = "ok"
        self._exec.begin_pass()
        try:
            if full and self._drift_due(request):
                self._check_drift()
            actions, entries, scope = self._plan(request)
            deletes = count_deletions(actions, self._s)
            allowed = deletes <= self._s.sync.max_deletes_per_pass
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
            for outcome in self._execute(actions, allowed, request):
                if outcome.result == Result.FAILED:
                    counts["failed"] += 1
                elif outcome.result == Result.DEFERRED:
                    counts["deferred"] += 1
                elif outcome.kind == ActionKind.SKIP and outcome.action.ref.key in self._unread:
                    counts["failed"] += 1
                else:
                    counts[_COUNT_NAMES[outcome.kind]] += 1
            if full and allowed and not self._stop.is_set():
                self._flush_pending_deletes()
                if self._s.sync.deletion_policy == "delete" and len(scope.sources) == len(self._s.sources):
                    budget = self._s.sync.max_deletes_per_pass - deletes
                    counts["retired"] += self._sweep_strays(entries, budget)
            if self._stop.is_set():
                result = "aborted"
            elif counts["failed"]:
                result = "partial"
            elif full and len(scope.sources) < len(self._s.sources):
                result = "partial"  # a source whose discovery failed: its secrets were not seen (issue 11)
        except PassAbort as exc:
            result, error = "failed", str(exc)
            log.error("pass_aborted", error=error, hint="fix the CybeDefend credential (see docs/cybedefend-setup.md)")
        except BridgeError as exc:
            result, error = "failed", str(exc)
            log.error("pass_failed", error=error)
        counts_out = {k: counts.get(k, 0) for k in SUMMARY_KEYS}
        report = PassReport(
            trigger=request.trigger, full=full, started_at=started, finished_at=self._clock(), result=result,
            counts=counts_out, vault_requests=dict(self._source.request_counts()), error=error,
            delete_guard_tripped=self._guard_tripped,
        )
        self._publish(report, self._mono() - t0)
        return report

    def _execute(self, actions: list[Action], allowed: bool, request: PassRequest) -> list[Outcome]:
        quiet = [a for a in actions if a.kind == ActionKind.SKIP]
        busy = [a for a in actions if a.kind != ActionKind.SKIP]
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
                    pending.add(pool.submit(self._exec.execute, queue.pop(0), deletes_allowed=allowed))
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

    def _sweep_strays(self, entries: list[VaultEntry], budget: int) -> int:
        """Delete credentials of our secrets that nothing accounts for; the number deleted.

        A crash right after a POST, followed by a move, untag or delete before the next pass,
        leaves a credential no later action looks at (it is in another project, or its secret
        is gone). Under the delete policy, once every source was discovered, each organization
        is listed and a credential carrying this instance's marker for a secret the ledger knows
        is deleted when it is not that secret's current credential (and the secret is settled,
        or gone). Credentials of secrets this bridge never recorded are not touched: another
        bridge with the same instance name but another key could own them.
        """
        rows = self._ledger.all()
        by_digest = {self._keys.path_digest(r.ref): r for r in rows}
        live = {self._keys.path_digest(e.ref) for e in entries if is_tagged(e, self._s.tags) and not e.deleted}
        current = {r.credential_id for r in rows if r.credential_id and r.state != State.RETIRED}
        pending = {p.credential_id for p in self._ledger.pending_deletes()}
        orgs = {r.organization_id for r in rows if r.organization_id}
        orgs |= {o for o in [self._s.cybedefend.organization_id, *(s.organization_id for s in self._s.sources)] if o}
        strays: list[tuple[str, str, str]] = []
        for org in sorted(orgs):
            try:
                creds = self._api.all_credentials(org)
            except BridgeError as exc:
                log.warning("stray_sweep_skipped", organization=org, error=str(exc))
                continue
            for cred in creds:
                marker = Marker.parse(cred.description)
                if marker is None or marker.instance != self._s.sync.instance:
                    continue
                row = by_digest.get(marker.path_digest)
                if row is None or cred.id in current or cred.id in pending:
                    continue
                if marker.path_digest in live and row.state != State.REGISTERED:
                    continue  # in flux (failing, rejected, missing): later passes settle it
                strays.append((org, cred.id, row.key))
        if not strays:
            return 0
        if len(strays) > budget:
            self._guard_tripped = True
            self._m.delete_guard.set(1)
            log.error("delete_guard_tripped", stray_credentials=len(strays), budget=budget,
                      hint="stray credentials are kept this pass; raise sync.max_deletes_per_pass if this is intended")
            return 0
        deleted = 0
        for org, cred_id, key in strays:
            log.warning("stray_credential", credential_id=cred_id, path=key, action="delete")
            self._ledger.add_pending_delete(PendingDelete(cred_id, org, key, "stray"))
            deleted += int(self._exec.delete_pending(cred_id, allowed=True))
        return deleted

    def _flush_pending_deletes(self) -> None:
        now = self._clock()
        for item in self._ledger.pending_deletes():
            if self._stop.is_set():
                return
            if item.next_attempt_at is not None and now < item.next_attempt_at:
                continue
            self._exec.delete_pending(item.credential_id, allowed=True)

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
            "last_pass": asdict(self._last) if self._last else None,
            "last_full_pass": asdict(self._last_full) if self._last_full else None,
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
                    "next_attempt_at": r.next_attempt_at,
                    "updated_at": r.updated_at,
                }
                for r in rows
            ],
        }
