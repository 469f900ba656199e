"""Carries out one planned action against CybeDefend and records it in the ledger.

The order of steps is what makes crashes harmless (docs/adr/0003-create-before-delete.md):
1. a credential that will be replaced is written to the ledger's pending deletes first, with
   the condition "only once the secret's current credential is another one";
2. before any create, the project's credentials are listed and one carrying this secret's
   marker for this version is adopted instead (a crash between POST and ledger write, or a
   response lost on the wire, therefore never duplicates);
3. links are copied from the credential being replaced, then the ledger row is written;
4. only then is the old credential deleted.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections.abc import Callable
from dataclasses import replace

from bridge.config import Settings
from bridge.errors import (
    AmbiguousWrite,
    AuthenticationError,
    BridgeError,
    InvalidRequest,
    LegacyApiKeyGone,
    NotFound,
    PassAbort,
    PermissionDenied,
    RateLimited,
    RemoteRejected,
)
from bridge.keyring import Keyring
from bridge.logs import get_logger
from bridge.metrics import Metrics
from bridge.model import Action, ActionKind, Candidate, Marker, Outcome, RemoteCredential, Result, State
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
        self._lists: dict[str, list[RemoteCredential]] = {}
        self._project_locks: dict[str, threading.Lock] = {}
        self._lists_lock = threading.Lock()

    def begin_pass(self) -> None:
        with self._lists_lock:
            self._lists.clear()
            self._project_locks.clear()

    # -- one action -----------------------------------------------------------------------
    def execute(self, action: Action, *, deletes_allowed: bool) -> Outcome:
        started = time.monotonic()
        permanent = False  # a retry without a change cannot succeed: logged at error
        status: int | None = None  # CybeDefend's HTTP status, when a failure had one
        try:
            outcome = self._dispatch(action, deletes_allowed)
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
        except BridgeError as exc:
            outcome = self._failed(action, str(exc))
            permanent = isinstance(exc, PermissionDenied)
            status = getattr(exc, "status", None)
        duration = time.monotonic() - started
        outcome = replace(outcome, duration_seconds=duration)
        self._m.actions.labels(action=outcome.kind.value, result=outcome.result.value).inc()
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
                reason=outcome.reason or action.reason,
                duration_ms=round(duration * 1000, 1),
            )
        return outcome

    def _dispatch(self, action: Action, deletes_allowed: bool) -> Outcome:
        kind = action.kind
        if kind in (ActionKind.CREATE, ActionKind.ROTATE, ActionKind.MOVE):
            return self._register(action, deletes_allowed)
        if kind == ActionKind.RETIRE:
            return self._retire(action, deletes_allowed)
        if kind == ActionKind.REFRESH:
            assert action.candidate is not None
            rec = self._ledger.get(action.ref.key)
            self._put_registered(action.candidate, rec.credential_id if rec else None, action, "refresh")
            return Outcome(action, Result.OK, kind, credential_id=rec.credential_id if rec else None, reason=action.reason)
        if kind == ActionKind.REJECT:
            self._record_reject(action, action.reject_code or "rejected", action.reason)
            return Outcome(action, Result.OK, kind, reason=action.reason)
        return Outcome(action, Result.OK, kind, reason=action.reason)

    # -- create, rotate, move ---------------------------------------------------------------
    def _register(self, action: Action, deletes_allowed: bool) -> Outcome:
        cand = action.candidate
        assert cand is not None
        if self._verifier is not None and not self._verifier.accepts(cand.username, cand.token):
            reason = "DockerHub does not accept this token for this username (sync.verify_with_dockerhub)"
            self._record_reject(action, "dockerhub_rejected", reason)
            return Outcome(action, Result.OK, ActionKind.REJECT, reason=reason)
        marker = self._keys.marker(self._s.sync.instance, cand.ref, cand.version, cand.fingerprint)
        replaced: list[tuple[str, str]] = []  # (credential id, organization) to delete once replaced
        if action.old_credential_id and action.old_organization_id:
            retiring = action.kind == ActionKind.MOVE
            if not retiring or self._s.sync.deletion_policy == "delete":
                replaced.append((action.old_credential_id, action.old_organization_id))
            else:
                log.info("old_credential_kept", path=cand.ref.key, credential_id=action.old_credential_id,
                         reason="project changed; deletion_policy is retain")
        for cred_id, org in replaced:
            self._ledger.add_pending_delete(PendingDelete(cred_id, org, cand.ref.key, action.kind.value))
        if self._ledger.get(cand.ref.key) is None:
            # Known before the first POST, so that a credential created just before a crash can
            # always be traced back to a secret of ours (the stray sweep only touches those).
            now = self._clock()
            self._ledger.put(LedgerRecord(
                key=cand.ref.key, mount=cand.ref.mount, path=cand.ref.path, kv_version=cand.ref.kv_version,
                state=State.PENDING, organization_id=cand.organization_id, project_id=cand.project_id,
                last_action=action.kind.value, reason="registering", created_at=now, updated_at=now))

        mine = self._ours(cand.project_id, marker, fresh=False)
        # The credential a rotation replaces holds the old token even when its marker names the
        # same revision (KV v2 numbers versions from 1 again once a secret was destroyed and
        # written anew): adopting it would leave the stale token registered.
        stale = action.old_credential_id if action.kind == ActionKind.ROTATE else None
        current = sorted((c for c, m in mine if m.revision == marker.revision and c.id != stale),
                         key=lambda c: c.created_at or "")
        superseded = [c for c, m in mine if m.revision != marker.revision and c.id != action.old_credential_id]
        kind = action.kind
        if current:
            cred, kind = current[0], ActionKind.ADOPT
        else:
            cred, adopted = self._create(cand, marker, stale=action.old_credential_id)
            if adopted:  # the POST's fate was unknown, and a fresh listing found it
                kind = ActionKind.ADOPT
        extras = current[1:]  # earlier duplicates carrying our own marker: ours to remove
        for c in [*superseded, *extras]:
            self._ledger.add_pending_delete(PendingDelete(c.id, cand.organization_id, cand.ref.key, "superseded"))
            replaced.append((c.id, cand.organization_id))

        links = {cand.project_id}
        for old_id, old_org in replaced:
            if old_org == cand.organization_id and (old_id != action.old_credential_id or action.kind == ActionKind.ROTATE):
                with contextlib.suppress(NotFound):  # already gone: nothing to copy
                    links.update(self._api.linked_projects(old_org, old_id))
        if links != {cand.project_id}:
            self._api.set_linked_projects(cand.organization_id, cred.id, sorted(links))
        self._put_registered(cand, cred.id, action, kind.value)
        if kind == ActionKind.ADOPT:
            # An adopted credential may still sit in the pending deletes (a retire whose DELETE
            # failed, then the secret was tagged again): it is current now, so it stays. (A
            # credential created just now cannot be there.)
            self._ledger.remove_pending_delete(cred.id)
        for old_id, _ in replaced:
            self.delete_pending(old_id, allowed=True)
        return Outcome(action, Result.OK, kind, credential_id=cred.id, reason=action.reason)

    def _create(self, cand: Candidate, marker: Marker, *, stale: str | None) -> tuple[RemoteCredential, bool]:
        """Create the credential; (credential, adopted). Adopted when the POST's fate was
        unknown and a fresh listing shows it landed. `stale` (the credential being replaced)
        never counts as the new one."""
        # Marker first: if CybeDefend ever cut long descriptions, the marker would survive.
        description = f"{marker.render()} {cand.description}" if cand.description else marker.render()
        try:
            cred = self._api.create(cand.organization_id, cand.project_id, cand.username, cand.token, description)
        except InvalidRequest as exc:
            raise RemoteRejected(f"CybeDefend refused the create: {exc.api_message}") from exc
        except AmbiguousWrite:
            # The POST may have landed: look again before anything else may create.
            found = [c for c, m in self._ours(cand.project_id, marker, fresh=True)
                     if m.revision == marker.revision and c.id != stale]
            if found:
                return found[0], True
            raise
        with self._lists_lock:
            self._lists.setdefault(cand.project_id, []).append(cred)
        return cred, False

    def _ours(self, project_id: str, marker: Marker, *, fresh: bool) -> list[tuple[RemoteCredential, Marker]]:
        with self._lists_lock:
            project_lock = self._project_locks.setdefault(project_id, threading.Lock())
        # One listing per project per pass, even when several workers reach it at once.
        with project_lock:
            with self._lists_lock:
                cached = None if fresh else self._lists.get(project_id)
            if cached is None:
                cached = self._api.list_project(project_id)
                with self._lists_lock:
                    self._lists[project_id] = list(cached)
        out = []
        for cred in cached:
            m = Marker.parse(cred.description)
            if m is not None and m.same_secret(marker):
                out.append((cred, m))
        return out

    # -- retire and delete ----------------------------------------------------------------
    def _retire(self, action: Action, deletes_allowed: bool) -> Outcome:
        rec = self._ledger.get(action.ref.key)
        now = self._clock()
        if rec is None:
            return Outcome(action, Result.OK, ActionKind.RETIRE, reason="not tracked")
        cred = rec.credential_id if rec.state != State.MISSING else None
        if cred is None or self._s.sync.deletion_policy == "retain":
            state = State.ORPHANED if cred else State.RETIRED
            self._ledger.put(replace(rec, state=state, last_action="retire", last_result="ok", reason=action.reason,
                                     attempts=0, next_attempt_at=None, updated_at=now))
            return Outcome(action, Result.OK, ActionKind.RETIRE, credential_id=cred, reason=action.reason)
        if not deletes_allowed:
            return Outcome(action, Result.DEFERRED, ActionKind.RETIRE, credential_id=cred,
                           reason="deletion paused: the delete guard rail tripped this pass")
        # Every credential carrying this secret's marker goes, not only the ledger's: an
        # interrupted rotation may have left a newer one the ledger never recorded.
        doomed = [cred]
        if rec.project_id:
            anyrev = Marker(self._s.sync.instance, self._keys.path_digest(rec.ref), "")
            doomed += [c.id for c, _ in self._ours(rec.project_id, anyrev, fresh=True) if c.id != cred]
        for cid in doomed:
            self._ledger.add_pending_delete(PendingDelete(cid, rec.organization_id or "", rec.key, "retire"))
        self._ledger.put(replace(rec, state=State.RETIRED, credential_id=None, last_action="retire", last_result="ok",
                                 reason=action.reason, attempts=0, next_attempt_at=None, updated_at=now))
        for cid in doomed:
            self.delete_pending(cid, allowed=True)
        return Outcome(action, Result.OK, ActionKind.RETIRE, credential_id=cred, reason=action.reason)

    def delete_pending(self, credential_id: str, *, allowed: bool) -> bool:
        """Delete a pending credential if it is no longer any secret's current one. True when done."""
        item = next((p for p in self._ledger.pending_deletes() if p.credential_id == credential_id), None)
        if item is None:
            return True
        rec = self._ledger.get(item.key)
        if rec is not None and rec.credential_id == credential_id and rec.state != State.RETIRED:
            # Still (or again) the secret's current credential: the replacement never happened,
            # or the secret was tagged again and adopted it. Never delete what is in use.
            return False
        if not allowed:
            return False
        try:
            gone_now = self._api.delete(item.organization_id, credential_id)
        except BridgeError as exc:
            wait = backoff_delay(item.attempts + 1, self._s.sync.retry_base_seconds, self._s.sync.retry_cap_seconds, self._rng)
            self._ledger.update_pending_delete(replace(item, attempts=item.attempts + 1, next_attempt_at=self._clock() + wait))
            log.warning("delete_failed", credential_id=credential_id, error=str(exc), next_attempt_in_s=round(wait))
            return False
        self._ledger.remove_pending_delete(credential_id)
        log.info("credential_deleted", credential_id=credential_id, reason=item.reason, already_gone=not gone_now)
        return True

    # -- ledger rows ----------------------------------------------------------------------
    def _put_registered(self, cand: Candidate, credential_id: str | None, action: Action, how: str) -> None:
        now = self._clock()
        # Only a refresh keeps the registration time; created_at=0 keeps the stored one (the
        # ledger's upsert), so a create or rotation needs no read first.
        rec = self._ledger.get(cand.ref.key) if how == "refresh" else None
        self._ledger.put(
            LedgerRecord(
                key=cand.ref.key, mount=cand.ref.mount, path=cand.ref.path, kv_version=cand.ref.kv_version,
                state=State.REGISTERED, version=cand.version, fingerprint=cand.fingerprint,
                organization_id=cand.organization_id, project_id=cand.project_id, credential_id=credential_id,
                last_action=how, last_result="ok", reason=action.reason, attempts=0, next_attempt_at=None,
                created_at=rec.created_at if rec else 0.0, updated_at=now,
                registered_at=now if how != "refresh" or rec is None else rec.registered_at,
                seen_version=cand.version, tags_digest=action.tags_digest, seen_stamp=cand.stamp,
            )
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

    def _failed(self, action: Action, reason: str, *, wait: float | None = None) -> Outcome:
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
        return Outcome(action, Result.FAILED, action.kind, reason=reason, retryable=True)
