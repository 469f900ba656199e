"""Carries out planned actions against CybeDefend and records their outcomes in the ledger.

It decides nothing (docs/adr/0007-decided-from-the-truth.md): every credential it creates,
relinks or deletes is named by the action `bridge.planner.reconcile` settled from a fresh
listing. What it owns is the order that makes crashes harmless (docs/adr/0003):
1. each credential the action will delete is written to the ledger's pending deletes first: a
   reminder that makes the next pass list that organization (the listing, not the reminder,
   then says whether it still goes);
2. a secret unknown to the ledger gets a `pending` row before the POST, so a credential created
   just before a crash can be traced back to a secret of ours;
3. the create (or nothing, when adopting), then the links the plan names, then the ledger row;
4. only then the deletions.
A create whose answer was lost is looked for by marker in a fresh listing before anything else.

Group commit (docs/adr/0011-group-commit-and-pipeline.md): the row recording a successful
create, adoption or refresh is *staged* (`durable=False`), because what precedes it on disk (the
`pending` row, or the secret's previous row) already makes a crash before its commit cost only a
re-adoption by marker. Everything else is committed before the next request: the pending rows
(several at once, by `prepare`), pending deletes, failures and rejections; and every staged row
is committed before any deletion is sent.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from bridge.config import Settings
from bridge.errors import (
    AmbiguousWrite,
    AuthenticationError,
    BridgeError,
    InvalidRequest,
    LegacyApiKeyGone,
    PassAbort,
    PermissionDenied,
    RateLimited,
    RemoteRejected,
)
from bridge.keyring import Keyring
from bridge.logs import get_logger
from bridge.metrics import Metrics
from bridge.model import Action, ActionKind, Candidate, Doomed, Marker, Outcome, RemoteCredential, Result, State
from bridge.ports import Ledger, LedgerRecord, PendingDelete, Registrar, TokenVerifier
from bridge.retry import backoff_delay

log = get_logger(__name__)


class Executor:
    def __init__(
        self,
        settings: Settings,
        registrar: Registrar,
        ledger: Ledger,
        keyring: Keyring,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        verifier: TokenVerifier | None = None,
    ) -> None:
        self._s = settings
        self._verifier = verifier
        self._api = registrar
        self._ledger = ledger
        self._keys = keyring
        self._m = metrics
        self._clock = clock
        self._rng = rng or random.Random()
        # Keys whose pending row `prepare` committed, so `_register` need not read it back.
        self._prepared: set[str] = set()
        self._prepared_lock = threading.Lock()
        self._action_children: dict[tuple[ActionKind, Result], Any] = {}

    # -- before the actions ---------------------------------------------------------------
    def prepare(self, actions: list[Action]) -> list[str]:
        """Write the `pending` rows of the creates of secrets the ledger does not know, all in
        one commit, before any of their POSTs. Returns the keys it wrote (see `unprepare`)."""
        now = self._clock()
        written: list[str] = []
        for action in actions:
            cand = action.candidate
            if (cand is None or action.blocked is not None or action.credential_id is not None
                    or action.kind not in (ActionKind.CREATE, ActionKind.ROTATE, ActionKind.MOVE)
                    or self._ledger.get(cand.ref.key) is not None):
                continue
            self._ledger.put(self._pending_row(action, cand, now), durable=False)
            written.append(cand.ref.key)
        if written:
            self._ledger.flush()
            with self._prepared_lock:
                self._prepared.update(written)
        return written

    def unprepare(self, keys: list[str]) -> None:
        """Remove pending rows `prepare` wrote for creates that were never started (a stop or an
        abort): no POST was sent for them, so there is nothing to trace."""
        with self._prepared_lock:
            self._prepared.difference_update(keys)
        for key in keys:
            rec = self._ledger.get(key)
            if rec is not None and rec.state == State.PENDING and rec.credential_id is None and rec.attempts == 0:
                self._ledger.remove(key)

    def _pending_row(self, action: Action, cand: Candidate, now: float) -> LedgerRecord:
        return LedgerRecord(
            key=cand.ref.key, mount=cand.ref.mount, path=cand.ref.path, kv_version=cand.ref.kv_version,
            state=State.PENDING, organization_id=cand.organization_id, project_id=cand.project_id,
            last_action=action.kind.value, reason="registering", created_at=now, updated_at=now)

    # -- one action -----------------------------------------------------------------------
    def execute(self, action: Action) -> Outcome:
        started = time.monotonic()
        permanent = False  # a retry without a change cannot succeed: logged at error
        status: int | None = None  # CybeDefend's HTTP status, when a failure had one
        try:
            outcome = self._dispatch(action)
        except (AuthenticationError, LegacyApiKeyGone) as exc:
            raise PassAbort(str(exc)) from exc
        except RateLimited as exc:
            wait = exc.retry_after if exc.retry_after is not None else self._s.sync.retry_base_seconds
            outcome = self._failed(action, f"rate limited by CybeDefend; next attempt in {wait:.0f} s", wait=wait)
        except RemoteRejected as exc:
            self._record_reject(action, "remote_rejected", str(exc),
                                retry_at=self._clock() + self._s.sync.retry_cap_seconds)
            outcome = Outcome(action, Result.FAILED, ActionKind.REJECT, reason=str(exc))
            permanent = True
        except PassAbort:
            raise
        except BridgeError as exc:
            permanent = isinstance(exc, PermissionDenied)
            outcome = self._failed(action, str(exc), permanent=permanent)
            status = getattr(exc, "status", None)
        duration = time.monotonic() - started
        child = self._action_children.get((outcome.kind, outcome.result))
        if child is None:  # looked up once per (kind, result): labels() locks and builds a key per call
            child = self._action_children[(outcome.kind, outcome.result)] = self._m.actions.labels(
                action=outcome.kind.value, result=outcome.result.value)
        child.inc()
        if outcome.kind != ActionKind.SKIP or outcome.result != Result.OK:
            # A failure is never quieter than `warning`: with logging.level warning a refused
            # registration must still print a line naming the path and the reason.
            emit = log.info if outcome.result != Result.FAILED else log.error if permanent else log.warning
            emit(
                "action",
                action=outcome.kind.value,
                result=outcome.result.value,
                status=status,
                path=action.ref.key,
                version=action.version,
                project=action.project_id,
                credential_id=outcome.credential_id,
                replaces=[d.credential_id for d in action.deletes] or None,
                reason=outcome.reason or action.reason,
                duration_ms=round(duration * 1000, 1),
            )
        return outcome

    def _dispatch(self, action: Action) -> Outcome:
        kind = action.kind
        if action.blocked is not None:
            return self._failed(action, action.blocked, wait=self._s.sync.retry_base_seconds)
        if kind in (ActionKind.CREATE, ActionKind.ROTATE, ActionKind.MOVE) and action.credential_id is None:
            return self._register(action)
        if kind in (ActionKind.ADOPT, ActionKind.MOVE):
            return self._adopt(action)
        if kind == ActionKind.RETIRE:
            return self._retire(action)
        if kind == ActionKind.REFRESH:
            assert action.candidate is not None
            rec = self._ledger.get(action.ref.key)
            cred = rec.credential_id if rec else None
            self._put_registered(action.candidate, cred, action, "refresh")
            return self._finish(action, Outcome(action, Result.OK, kind, credential_id=cred, reason=action.reason))
        if kind == ActionKind.DELETE:
            return self._finish(action, Outcome(action, Result.OK, kind, credential_id=action.credential_id,
                                                reason=action.reason))
        if kind == ActionKind.REJECT:
            self._record_reject(action, action.reject_code or "rejected", action.reason)
            return Outcome(action, Result.OK, kind, reason=action.reason)
        return Outcome(action, Result.OK, kind, reason=action.reason)

    # -- create, rotate, move, adopt --------------------------------------------------------
    def _register(self, action: Action) -> Outcome:
        cand = action.candidate
        assert cand is not None
        if self._verifier is not None and not self._verifier.accepts(cand.username, cand.token):
            reason = "DockerHub does not accept this token for this username (sync.verify_with_dockerhub)"
            self._record_reject(action, "dockerhub_rejected", reason)
            return Outcome(action, Result.OK, ActionKind.REJECT, reason=reason)
        self._remember_deletes(action)
        with self._prepared_lock:
            prepared = cand.ref.key in self._prepared
            self._prepared.discard(cand.ref.key)
        # Not prepared (and new): the pending row is committed on its own, before the POST.
        if not prepared and self._ledger.get(cand.ref.key) is None:
            self._ledger.put(self._pending_row(action, cand, self._clock()))
        marker = self._keys.marker(self._s.sync.instance, cand.ref, cand.version, cand.fingerprint)
        cred, adopted = self._create(cand, marker)
        if action.links is not None:
            self._api.set_linked_projects(cand.organization_id, cred.id, list(action.links))
        kind = ActionKind.ADOPT if adopted else action.kind
        self._put_registered(cand, cred.id, action, kind.value)
        return self._finish(action, Outcome(action, Result.OK, kind, credential_id=cred.id, reason=action.reason))

    def _adopt(self, action: Action) -> Outcome:
        assert action.credential_id is not None and action.organization_id is not None
        self._remember_deletes(action)
        if action.links is not None:
            self._api.set_linked_projects(action.organization_id, action.credential_id, list(action.links))
        if action.candidate is not None:
            self._put_registered(action.candidate, action.credential_id, action, action.kind.value)
        else:
            rec = self._ledger.get(action.ref.key)
            if rec is not None:
                # Staged: lost in a crash, the same adoption is planned again from the listing.
                self._ledger.put(replace(rec, state=State.REGISTERED, credential_id=action.credential_id,
                                         organization_id=action.organization_id, project_id=action.project_id,
                                         last_action=action.kind.value, last_result="ok", reason=action.reason,
                                         attempts=0, next_attempt_at=None, updated_at=self._clock()), durable=False)
        return self._finish(action, Outcome(action, Result.OK, action.kind, credential_id=action.credential_id,
                                            reason=action.reason))

    def _create(self, cand: Candidate, marker: Marker) -> tuple[RemoteCredential, bool]:
        """Create the credential; (credential, adopted). Adopted when the POST's fate was
        unknown and a fresh listing shows it landed (the plan's listing had no such credential)."""
        # Marker first: if CybeDefend ever cut long descriptions, the marker would survive.
        description = f"{marker.render()} {cand.description}" if cand.description else marker.render()
        try:
            return self._api.create(cand.organization_id, cand.project_id, cand.username, cand.token, description), False
        except InvalidRequest as exc:
            raise RemoteRejected(f"CybeDefend refused the create: {exc.api_message}") from exc
        except AmbiguousWrite:
            for cred in self._api.all_credentials(cand.organization_id):
                found = Marker.parse(cred.description)
                if found is not None and found.same_secret(marker) and found.token_part == marker.token_part:
                    return cred, True
            raise

    # -- retire and delete ----------------------------------------------------------------
    def _retire(self, action: Action) -> Outcome:
        rec = self._ledger.get(action.ref.key)
        if rec is None:
            return self._finish(action, Outcome(action, Result.OK, ActionKind.RETIRE, reason="not tracked"))
        now = self._clock()
        cred = rec.credential_id if rec.state != State.MISSING else None
        if action.paused:
            return Outcome(action, Result.DEFERRED, ActionKind.RETIRE, credential_id=cred,
                           reason="deletion paused: the delete guard rail tripped this pass")
        # The planner said what stays (deletion_policy retain) and what goes; the row follows.
        state = State.ORPHANED if action.keeps else State.RETIRED
        self._remember_deletes(action)
        self._ledger.put(replace(rec, state=state, credential_id=cred if action.keeps else None, last_action="retire",
                                 last_result="ok", reason=action.reason, attempts=0, next_attempt_at=None, updated_at=now))
        return self._finish(action, Outcome(action, Result.OK, ActionKind.RETIRE, credential_id=cred, reason=action.reason))

    def _remember_deletes(self, action: Action) -> None:
        if action.paused:
            return
        for d in action.deletes:
            self._ledger.add_pending_delete(PendingDelete(d.credential_id, d.organization_id, action.ref.key, d.why))

    def _finish(self, action: Action, outcome: Outcome) -> Outcome:
        """The action's deletions, after its own write. A failed one stays a reminder, retried."""
        if action.paused:
            if action.deletes:
                log.warning("deletes_paused", path=action.ref.key, credentials=[d.credential_id for d in action.deletes],
                            reason="the delete guard rail tripped this pass")
            return outcome if action.kind != ActionKind.DELETE else replace(outcome, result=Result.DEFERRED)
        if action.deletes:
            # A deletion is the one step a lost ledger row cannot be replanned around for free:
            # the row naming its replacement goes to disk first (ADR 3, step 3 before step 4).
            self._ledger.flush()
        failed = [d for d in action.deletes if not self._delete(action.ref.key, d)]
        if failed and outcome.result == Result.OK:
            return replace(outcome, result=Result.FAILED, retryable=True,
                           reason=f"deleting {', '.join(d.credential_id for d in failed)} failed; retried next pass")
        return outcome

    def _delete(self, key: str, doomed: Doomed) -> bool:
        item = PendingDelete(doomed.credential_id, doomed.organization_id, key, doomed.why)
        stored = next((p for p in self._ledger.pending_deletes() if p.credential_id == doomed.credential_id), None)
        try:
            gone_now = self._api.delete(doomed.organization_id, doomed.credential_id)
        except PassAbort:
            raise
        except (AuthenticationError, LegacyApiKeyGone):
            raise
        except BridgeError as exc:
            attempts = (stored.attempts if stored else 0) + 1
            wait = backoff_delay(attempts, self._s.sync.retry_base_seconds, self._s.sync.retry_cap_seconds, self._rng)
            self._ledger.update_pending_delete(replace(stored or item, attempts=attempts, next_attempt_at=self._clock() + wait))
            log.warning("delete_failed", path=key, credential_id=doomed.credential_id, why=doomed.why, error=str(exc),
                        next_attempt_in_s=round(wait))
            return False
        self._ledger.remove_pending_delete(doomed.credential_id)
        self._m.deletions.labels(why=doomed.why).inc()
        log.info("credential_deleted", path=key, credential_id=doomed.credential_id, why=doomed.why, already_gone=not gone_now)
        return True

    # -- ledger rows ----------------------------------------------------------------------
    def _put_registered(self, cand: Candidate, credential_id: str | None, action: Action, how: str) -> None:
        now = self._clock()
        # Only a refresh keeps the registration time; created_at=0 keeps the stored one (the
        # ledger's upsert), so a create or rotation needs no read first.
        rec = self._ledger.get(cand.ref.key) if how == "refresh" else None
        # Staged (group commit): the pending row or the previous row is already on disk, so a
        # crash before this one's commit costs a re-adoption by marker, never a second create.
        self._ledger.put(
            LedgerRecord(
                key=cand.ref.key, mount=cand.ref.mount, path=cand.ref.path, kv_version=cand.ref.kv_version,
                state=State.REGISTERED, version=cand.version, fingerprint=cand.fingerprint,
                organization_id=cand.organization_id, project_id=cand.project_id, credential_id=credential_id,
                last_action=how, last_result="ok", reason=action.reason, attempts=0, next_attempt_at=None,
                created_at=rec.created_at if rec else 0.0, updated_at=now,
                registered_at=now if how != "refresh" or rec is None else rec.registered_at,
                seen_version=cand.version, tags_digest=action.tags_digest, seen_stamp=cand.stamp,
            ),
            durable=False,
        )

    def _record_reject(self, action: Action, code: str, reason: str, *, retry_at: float | None = None) -> None:
        now = self._clock()
        rec = self._ledger.get(action.ref.key)
        is_new = (rec is None or rec.state != State.REJECTED or rec.last_result != code
                  or rec.seen_version != action.version or rec.seen_stamp != action.stamp)
        if not is_new and retry_at is None:
            return  # the same rejection as before: already counted, logged and recorded
        if is_new:
            self._m.rejects.labels(reason=code).inc()
            log.warning("secret_rejected", path=action.ref.key, version=action.version, reject_code=code, reason=reason)
        base = rec or LedgerRecord(key=action.ref.key, mount=action.ref.mount, path=action.ref.path,
                                   kv_version=action.ref.kv_version, state=State.REJECTED, created_at=now)
        # A rejected secret keeps the credential (and its version) it may have had: bad new
        # input must not unregister a good old token.
        self._ledger.put(replace(base, state=State.REJECTED, seen_version=action.version,
                                 last_action="reject", last_result=code, reason=reason, updated_at=now,
                                 next_attempt_at=retry_at, tags_digest=action.tags_digest, seen_stamp=action.stamp))

    def _failed(self, action: Action, reason: str, *, wait: float | None = None, permanent: bool = False) -> Outcome:
        now = self._clock()
        rec = self._ledger.get(action.ref.key)
        attempts = (rec.attempts if rec else 0) + 1
        if wait is None:
            wait = backoff_delay(attempts, self._s.sync.retry_base_seconds, self._s.sync.retry_cap_seconds, self._rng)
        base = rec or LedgerRecord(key=action.ref.key, mount=action.ref.mount, path=action.ref.path,
                                   kv_version=action.ref.kv_version, state=State.FAILED, created_at=now)
        # The row keeps the credential it had, so the next attempt still knows what to replace.
        state = base.state if action.kind == ActionKind.RETIRE else State.FAILED
        self._ledger.put(replace(base, state=state, last_action=action.kind.value, last_result="failed", reason=reason,
                                 attempts=attempts, next_attempt_at=now + wait, updated_at=now,
                                 seen_version=action.version if action.kind != ActionKind.RETIRE else base.seen_version,
                                 seen_stamp=action.stamp if action.kind != ActionKind.RETIRE else base.seen_stamp))
        return Outcome(action, Result.FAILED, action.kind, reason=reason, retryable=not permanent)
