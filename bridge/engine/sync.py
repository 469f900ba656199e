"""One sync pass: discover -> list what writes touch -> read changed values -> plan -> execute.

Reading values, planning and executing overlap (a pipeline, docs/adr/0011): values are read
`vault.concurrency` at a time, a bounded window ahead, and handed to the planner in key order;
a write the planner settles is started at once on the `cybedefend.max_concurrency` workers when
its result cannot change any more: every organization the rest of the pass could still list is
listed (a write never starts before the listing of its organization is in), it needs no links
not read yet, and it carries no deletion the guard rail could pause. Everything else waits for
the whole plan, as before. The whole plan is still computed, and is what `plan` prints.

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

import contextlib
import queue
import random
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Container, Generator, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from bridge.config import Settings
from bridge.engine.executor import Executor
from bridge.errors import AuthenticationError, BridgeError, LeaseLost, LegacyApiKeyGone, NotFound, PassAbort, VaultError
from bridge.keyring import Keyring
from bridge.logs import get_logger
from bridge.metrics import Metrics
from bridge.model import Action, ActionKind, Outcome, RemoteCredential, Result, SecretRef, State, VaultEntry, iso8601
from bridge.planner import (
    RETIRING,
    Owned,
    Planning,
    RemoteView,
    Scope,
    count_deletions,
    fingerprints,
    may_write_to,
    merge_owned,
    owned_credentials,
    reconcile,
    rotating_credentials,
    settle,
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
# Writes handed to the workers at once when they are busy: their pending rows share one commit.
START_BATCH = 16
# Values read ahead of the planner, per Vault connection: enough to keep the readers busy
# while the planner waits for a worker, few enough that a cold pass over 100k secrets does not
# hold every token in memory at once.
READ_AHEAD_PER_CONNECTION = 4
# Credentials whose links a targeted pass reads ahead at most (`_links_ahead`): a guess per rotation
# is cheap; a burst of rotations reads its links when `reconcile` asks, as a full pass does.
LINKS_AHEAD_MAX = 4
_EARLY_KINDS = frozenset({ActionKind.CREATE, ActionKind.ROTATE, ActionKind.MOVE, ActionKind.ADOPT, ActionKind.REFRESH})
_FAILING_STATES = frozenset({State.FAILED, State.REJECTED, State.PENDING})


class _EveryKey:
    """`key in _EVERY_KEY` is always true: "skip every backoff" without a set of every key (a
    one-shot run registering 10,000 held one, ~125 B a secret, for the whole pass)."""

    __slots__ = ()

    def __contains__(self, key: object) -> bool:
        return True


_EVERY_KEY = _EveryKey()

T = TypeVar("T")


def _wait_dropping(futures: Iterable[Future[Any]]) -> None:
    """Wait for reads a pass started and did not use; their answers and errors are dropped."""
    for fut in futures:
        with contextlib.suppress(Exception):
            fut.result()


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
        # Listings a targeted pass started before reading Vault (`_list_ahead`), by organization.
        self._ahead: dict[str, Future[list[RemoteCredential]]] = {}
        # Links a targeted rotation will most likely need, read while the listing is in flight
        # (`_links_ahead`), by (organization, credential).
        self._links_early: dict[tuple[str, str], Future[list[str]]] = {}
        self._links_unused: list[Future[list[str]]] = []  # in flight, unused: waited for at the pass's end
        self._ahead_pool: ThreadPoolExecutor | None = None

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

    def _read_one(self, entry: VaultEntry) -> tuple[str, Mapping[str, Any] | None]:
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

    def _values_in_order(self, todo: list[VaultEntry]) -> Generator[tuple[str, Mapping[str, Any] | None], None, None]:
        """The values of `todo`, in its order, `vault.concurrency` reads at a time, a bounded
        window ahead of the consumer (the planner)."""
        if len(todo) <= 1:  # a targeted pass: no thread to start for one read
            yield from map(self._read_one, todo)
            return
        window = self._s.vault.concurrency * READ_AHEAD_PER_CONNECTION
        pool = ThreadPoolExecutor(max_workers=self._s.vault.concurrency, thread_name_prefix="read")
        try:
            ahead = deque(pool.submit(self._read_one, e) for e in todo[:window])
            following = iter(todo[window:])
            while ahead:
                got = ahead.popleft().result()
                nxt = next(following, None)
                if nxt is not None:
                    ahead.append(pool.submit(self._read_one, nxt))
                yield got
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

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
                early = self._ahead.pop(org, None)
                listings[org] = early.result() if early is not None else self._api.all_credentials(org)
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
                early = self._links_early.pop((org, cred_id), None)
                got = early.result() if early is not None else self._api.linked_projects(org, cred_id)
                links[cred_id] = frozenset(got)
            except NotFound:
                links[cred_id] = frozenset()
            except (AuthenticationError, LegacyApiKeyGone) as exc:
                raise PassAbort(str(exc)) from exc
        return replace(view, links=links)

    def _list_ahead(self, paths: frozenset[str]) -> None:
        """Start listing the organizations a targeted pass will most likely write to.

        The listing before a create is what a write-to-registered wait is made of (ADR 7: no
        create without it); started now, it runs while the secret's metadata, its value and its
        ledger rows are read instead of after them. The guess is each path's default
        organization (its source's, else `cybedefend.organization_id`); a tag naming another one
        is listed when the planner asks, as before. The answer is only used where the pass
        would have listed that organization anyway, and dropped otherwise (one GET spent), so
        the plan is the same as without it; `_plan` forgets what it did not use.
        """
        guess: set[str] = set()
        for key in paths:
            idx = source_of(key, self._s.sources)
            if idx is not None:
                org = self._s.sources[idx].organization_id or self._s.cybedefend.organization_id
                if org:
                    guess.add(org)  # the settings hold it lowercased, as tags are read
        if not guess:
            return
        for org in sorted(guess):
            self._ahead[org] = self._ahead_submit(self._api.all_credentials, org)

    def _links_ahead(self, rotating: set[tuple[str, str]]) -> None:
        """Start reading the links of the credentials a targeted pass will most likely rotate.

        A rotation copies the old credential's projects to the new one (CYBEDEFEND_API.md), so
        after the listing names the credential `reconcile` asks for its links: a GET between the
        listing and the create, ~1 ms of every rotation's wait. The ledger already names that
        credential once the value read shows a new token (`rotating_credentials`), so its links
        are read now, beside the listing. Used only when `reconcile` asks for exactly that
        credential, from the listing (ADR 7); otherwise dropped, one GET spent. A value with the
        ledger's token starts nothing. (ADR 19.)
        """
        if not rotating or len(rotating) > LINKS_AHEAD_MAX:
            return  # a large targeted pass is a burst: no speculation at that scale
        for org, cred_id in sorted(rotating):
            self._links_early[(org, cred_id)] = self._ahead_submit(self._api.linked_projects, org, cred_id)

    def _ahead_submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        """Run a read ahead of the pass (a listing, a credential's links) on the read-ahead pool."""
        if self._ahead_pool is None:
            self._ahead_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="list-ahead")
        return self._ahead_pool.submit(fn, *args)

    def _forget_ahead(self) -> None:
        # Both maps are emptied first: nothing this pass started can be taken by the next one,
        # even if the waiting below is interrupted.
        unused, self._ahead = self._ahead, {}
        unused_links, self._links_early = self._links_early, {}
        # Links nobody asked for: a GET not started yet is cancelled; one in flight finishes on
        # its own and is waited for when the pass ends (`_drain_ahead`), not here, so the pass's
        # writes never wait for a GET their plan does not use (it may be retrying a 5xx).
        self._links_unused += [early for early in unused_links.values() if not early.cancel()]
        # Not cancelled midway (a request in flight finishes on its own); waited for, so a pass
        # never overlaps the next one's requests.
        _wait_dropping(unused.values())

    def _drain_ahead(self) -> None:
        """Wait for the unused links GETs still in flight: a pass never overlaps the next one's
        requests."""
        unused, self._links_unused = self._links_unused, []
        _wait_dropping(unused)

    # -- a pass ---------------------------------------------------------------------------
    def plan(self, request: PassRequest) -> list[Action]:
        """Every action a pass would take now: reads Vault and CybeDefend, writes nothing."""
        with self._lock:
            try:
                return self._plan(request).actions
            finally:
                self._drain_ahead()

    def _listed_too(self, view: RemoteView, orgs: set[str]) -> RemoteView:
        more = self._list(orgs)
        return replace(view, listings={**view.listings, **more.listings}, unlisted={**view.unlisted, **more.unlisted})

    def _plan(self, request: PassRequest, runner: _Runner | None = None) -> _Planned:
        """The whole plan; with a `runner`, writes whose outcome is settled start on the way."""
        if request.paths is not None:
            self._list_ahead(request.paths)
        try:
            return self._plan_listed(request, runner)
        finally:
            self._forget_ahead()

    def _plan_listed(self, request: PassRequest, runner: _Runner | None) -> _Planned:
        entries, scope, unseen = self._discover(request)
        targeted = request.paths is not None
        # A targeted pass reads the rows of its own keys (and, below, those holding its tokens),
        # not the whole ledger: at 1,000 tracked secrets `all()` was a third of a rotation's pass.
        records = {r.key: r for r in (self._ledger.some(scope.keys) if targeted else self._ledger.all())}
        now = self._clock()
        # An explicit one-shot run is a request to try now: no secret waits out its backoff.
        retry_now: Container[str] = _EVERY_KEY if request.retry_backoff else request.paths or frozenset()
        hinted = {p.organization_id for p in self._ledger.pending_deletes()
                  if p.next_attempt_at is None or now >= p.next_attempt_at or request.force_drift_check}
        drift = self._drift_due(request)
        orgs = touched_organizations(entries, records, scope, self._s, hinted, everything=drift)
        view = self._list(orgs) if orgs else RemoteView()
        believed = with_evidence(records, view)
        todo = values_to_read(entries, believed, self._s, now, retry_now)
        self._unread = set()
        ordered = sorted(entries, key=lambda e: e.ref.key)
        reads: dict[str, VaultEntry] = {}
        for e in sorted(todo, key=lambda e: e.ref.key):
            reads.setdefault(e.ref.key, e)
        # Organizations a write of a secret not decided yet could still make us list: while one
        # of them is unlisted, a settled write could still change (a credential of its secret
        # found there), so none starts early.
        ahead: Counter[str] = Counter()
        # Kept up to date as organizations are listed and handed to `reconcile`, so each listed
        # credential's marker is parsed once per pass, not once per use.
        # A targeted pass needs only its own secrets' credentials out of each listing (ADR 14).
        only = frozenset(self._keys.path_digest(ref) for ref in self._scope_refs(scope, entries, records)) \
            if targeted else None
        owned: Owned = owned_credentials(view.listings, self._s.sync.instance, only)
        if runner is not None:
            for e in ordered:
                if e.ref.key in reads or e.payload is not None:
                    ahead.update(may_write_to(e, believed.get(e.ref.key), self._s))
        values: Generator[tuple[str, Mapping[str, Any] | None], None, None]
        if targeted:
            # A few values: read them first, then the rows already holding one of their tokens
            # (the duplicate-token check), the only other rows the planner would consult.
            pre = [self._read_one(e) for e in reads.values()]
            tokens = fingerprints(ordered, dict(pre), self._s, self._keys)
            self._links_ahead(rotating_credentials(tokens, records))
            held = set(tokens.values())
            twins = [r for r in self._ledger.holding(held) if r.key not in records] if held else []
            if twins:
                records.update((r.key, r) for r in twins)
                believed = with_evidence(records, view)
            values = (pair for pair in pre)
        else:
            values = self._values_in_order(list(reads.values()))
        planning = Planning(believed, scope, self._s, self._keys, now, retry_now)
        unread = set(reads)
        intents: list[Action] = []
        ready: list[Action] = []
        try:
            for entry in ordered:
                key = entry.ref.key
                value: Mapping[str, Any] | None = None
                if key in unread:
                    unread.discard(key)
                    got, value = next(values)
                    assert got == key, (got, key)  # _values_in_order keeps the (key) order it was given
                if runner is not None and (key in reads or entry.payload is not None):
                    ahead.subtract(may_write_to(entry, believed.get(key), self._s))
                action = planning.decide(entry, value)
                if action is None:
                    continue
                intents.append(action)
                # Creates, rotations and moves are known once values are read: list where they
                # write before settling them, never create blind (the API has no idempotency key).
                new = writing_organizations([action]) - set(view.listings) - set(view.unlisted)
                if new:
                    view = self._listed_too(view, new)
                    merge_owned(owned, owned_credentials({o: view.listings[o] for o in new if o in view.listings},
                                                         self._s.sync.instance, only))
                if runner is None:
                    if self.progress is not None:
                        self.progress(len(intents), len(ordered))
                    continue
                if action.kind in _EARLY_KINDS and all(
                        n <= 0 or o in view.listings or o in view.unlisted for o, n in ahead.items()):
                    settled, needed = settle(action, believed.get(key), owned, view, self._s, self._keys)
                    if (not needed and settled.kind in _EARLY_KINDS and settled.blocked is None
                            and not any(d.why in RETIRING for d in settled.deletes)):
                        ready.append(settled)
                if ready and (len(ready) >= START_BATCH or runner.idle()):
                    runner.start(ready)
                    ready = []
            if ready and runner is not None:
                runner.start(ready)
        finally:
            values.close()  # stops the readers when planning ends early (an abort)
        intents += planning.rest()
        actions, need = reconcile(intents, entries, believed, view, scope, self._s, self._keys, owned=owned)
        if need:
            view = self._links(view, need)  # links only: the listings, hence `owned`, are unchanged
            actions, _ = reconcile(intents, entries, believed, view, scope, self._s, self._keys, owned=owned)
        return _Planned(actions, view, drift, scope, unseen)

    @staticmethod
    def _scope_refs(scope: Scope, entries: list[VaultEntry], records: Mapping[str, LedgerRecord]) -> list[SecretRef]:
        """The refs of a targeted pass's keys: from Vault's entries, else from the ledger's rows
        (a secret deleted from Vault has no entry)."""
        refs = {e.ref.key: e.ref for e in entries}
        for key in scope.keys:
            if key not in refs and key in records:
                refs[key] = records[key].ref
        return [refs[k] for k in sorted(refs) if k in scope.keys]

    def run(self, request: PassRequest) -> PassReport:
        with self._lock:
            try:
                return self._run(request)
            finally:
                self._drain_ahead()

    def _run(self, request: PassRequest) -> PassReport:
        full = request.paths is None
        started, t0 = self._clock(), self._mono()
        counts: Counter[str] = Counter()
        error: str | None = None
        result = "ok"
        runner = _Runner(self, request)
        try:
            try:
                planned = self._plan(request, runner)
            except BaseException:
                runner.abandon()
                raise
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
            for outcome in self._execute(actions, request, runner):
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
        try:
            # What the pass staged goes to disk before anyone is told it is done. A crash
            # (which never gets here) loses only rows whose loss costs a re-adoption (ADR 11).
            self._ledger.flush()
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

    def _execute(self, actions: list[Action], request: PassRequest, runner: _Runner) -> list[Outcome]:
        """Carry out the plan: what the pipeline already started is not started again."""
        started = runner.started
        rest: list[Action] = []
        for a in actions:
            first = started.get(a.ref.key)
            if first is None:
                rest.append(a)
            elif first != a:  # the pipeline's condition failed to hold: a bug, never a second write
                log.error("pipeline_plan_mismatch", path=a.ref.key, started=first.kind.value, planned=a.kind.value)
        quiet = [a for a in rest if a.kind == ActionKind.SKIP and not a.deletes and a.blocked is None]
        busy = [a for a in rest if not (a.kind == ActionKind.SKIP and not a.deletes and a.blocked is None)]
        # Skips touch nothing: counted in one go (a steady pass is almost all skips).
        runner.outcomes.extend(Outcome(a, Result.OK, a.kind, reason=a.reason) for a in quiet)
        if quiet:
            self._m.actions.labels(action=ActionKind.SKIP.value, result=Result.OK.value).inc(len(quiet))
        runner.total = len(actions)
        runner.start(busy, prepare=False)
        return runner.finish()

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


class _Runner:
    """The pass's `cybedefend.max_concurrency` workers, fed while the plan is still being made.

    `start` may block: at most twice the workers' number of actions are queued or running, so
    the planner (and, through its bounded read-ahead, the value reads) waits for CybeDefend
    instead of running ahead of it. A stop request or an aborting action defers what is not
    started; the pending rows `prepare` wrote for those are taken back.
    """

    def __init__(self, engine: SyncEngine, request: PassRequest) -> None:
        self._e = engine
        self._request = request
        self._workers = engine._s.cybedefend.max_concurrency
        self._pool: ThreadPoolExecutor | None = None
        self._running: set[Future[Outcome]] = set()
        # Finished futures, handed over by their done-callback: reaping takes them from here
        # instead of `concurrent.futures.wait`, which locks every running future and installs a
        # waiter on each, once per action started (a cold pass starts one per secret).
        self._done: queue.SimpleQueue[Future[Outcome]] = queue.SimpleQueue()
        self.started: dict[str, Action] = {}
        self.outcomes: list[Outcome] = []
        self.total = 0
        self._abort: PassAbort | None = None
        self._prepared: set[str] = set()

    def idle(self) -> bool:
        """A worker has nothing to do (so waiting for a fuller batch would waste it)."""
        self._reap(block=False)
        return len(self._running) < self._workers

    def _reap(self, *, block: bool) -> None:
        if not self._running:
            return
        done: list[Future[Outcome]] = []
        if block:
            done.append(self._done.get())
        with contextlib.suppress(queue.Empty):
            while True:
                done.append(self._done.get_nowait())
        # All out of `_running` before any result is looked at, as `wait` did: should one raise,
        # a later `finish` must not wait for a future already taken from the queue.
        self._running.difference_update(done)
        for fut in done:
            try:
                outcome = fut.result()
            except PassAbort as exc:
                self._abort = exc
                continue
            self.outcomes.append(outcome)
            self._e._observe_latency(outcome, self._request)
            if self._e.progress is not None:
                self._e.progress(len(self.outcomes), max(self.total, len(self.outcomes)))

    def start(self, actions: list[Action], *, prepare: bool = True) -> None:
        if not actions:
            return
        if prepare and not self._halted():
            self._prepared.update(self._e._exec.prepare(actions))
        for i, action in enumerate(actions):
            while len(self._running) >= 2 * self._workers:
                self._reap(block=True)
            if self._halted():
                self._defer(actions[i:])
                return
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix="sync")
            self.started[action.ref.key] = action
            self._prepared.discard(action.ref.key)
            fut = self._pool.submit(self._e._exec.execute, action)
            self._running.add(fut)
            fut.add_done_callback(self._done.put)

    def _halted(self) -> bool:
        return self._e._stop.is_set() or self._abort is not None

    def _defer(self, actions: list[Action]) -> None:
        for action in actions:  # not started: stop requested or the pass aborted
            self.started[action.ref.key] = action
            self.outcomes.append(Outcome(action, Result.DEFERRED, action.kind, reason="not started this pass"))
        self._unprepare()

    def _unprepare(self) -> None:
        if self._prepared:
            self._e._exec.unprepare(sorted(self._prepared))
            self._prepared.clear()

    def finish(self) -> list[Outcome]:
        """Wait for every started action; raise the abort one of them raised."""
        try:
            while self._running:
                self._reap(block=True)
            self._unprepare()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
        if self._abort is not None:
            raise self._abort
        return self.outcomes

    def abandon(self) -> None:
        """The plan failed: let what runs finish (their outcomes are recorded by the executor)."""
        with contextlib.suppress(PassAbort, BridgeError):
            self.finish()
