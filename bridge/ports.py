"""The small interfaces the core (`planner`, `sync`) talks to; adapters implement them.

The sync engine never sees hvac, httpx or sqlite3: it sees these. Tests fake at this level,
and the same contract tests run against the fake and the real adapter.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from bridge.config import SourceSettings
from bridge.model import RemoteCredential, SecretRef, Sensitive, State, VaultEntry, iso8601


class SecretSource(Protocol):
    """Vault, seen by the sync engine. Implemented by `bridge.vault.source.VaultSource`."""

    def discover(self, source: SourceSettings, source_index: int) -> Iterable[VaultEntry]:
        """List the source recursively and read metadata only (KV v2) or data (KV v1, no metadata).

        KV v2 entries come back without payload. Order is not specified.
        """
        ...

    def describe(self, source: SourceSettings, source_index: int, path: str) -> VaultEntry | None:
        """Metadata (or KV v1 data) of one secret, for a targeted sync; None if it does not exist."""
        ...

    def read_value(self, ref: SecretRef, version: int | None) -> Mapping[str, Any]:
        """The data of one KV v2 version (or the KV v1 secret). Only called for secrets that need a write."""
        ...

    def request_counts(self) -> Mapping[str, int]:
        """Vault requests made since the last call, by kind (list, metadata, read, login, …); resets."""
        ...


class Registrar(Protocol):
    """CybeDefend, seen by the sync engine. Implemented by `bridge.cybedefend.client.CybeDefendClient`."""

    def create(
        self, organization_id: str, project_id: str, username: str, token: Sensitive, description: str
    ) -> RemoteCredential: ...

    def list_project(self, project_id: str) -> list[RemoteCredential]: ...

    def get(self, project_id: str, credential_id: str) -> RemoteCredential | None: ...

    def delete(self, organization_id: str, credential_id: str) -> bool:
        """True if deleted now, False if it was already gone (404)."""
        ...

    def linked_projects(self, organization_id: str, credential_id: str) -> list[str]: ...

    def set_linked_projects(self, organization_id: str, credential_id: str, project_ids: Sequence[str]) -> None: ...

    def all_credentials(self, organization_id: str) -> list[RemoteCredential]:
        """Every DockerHub credential of the organization, whatever project it is linked to."""
        ...


class TokenVerifier(Protocol):
    """Optional: asks DockerHub whether a token is valid before it is registered."""

    def accepts(self, username: str, token: Sensitive) -> bool: ...


@dataclass(frozen=True, slots=True)
class LedgerRecord:
    """One row of the ledger: what the bridge believes about one source secret. No values."""

    key: str  # SecretRef.key
    mount: str
    path: str
    kv_version: int
    state: State
    version: int | None = None  # the KV version `credential_id` was registered for
    fingerprint: str | None = None  # HMAC of that version's token
    organization_id: str | None = None
    project_id: str | None = None
    credential_id: str | None = None
    last_action: str | None = None
    last_result: str | None = None
    reason: str | None = None
    attempts: int = 0
    next_attempt_at: float | None = None  # unix seconds
    created_at: float = 0.0
    updated_at: float = 0.0
    registered_at: float | None = None
    # The latest Vault version the bridge evaluated, whatever came of it. It differs from
    # `version` while a new version is rejected or failing; a rejection or a backoff stands
    # until Vault has a version newer than this.
    seen_version: int | None = None
    # A digest of the (project, organization, description) last evaluated: tags change without
    # a new KV version, and a rejection by CybeDefend may have been about them.
    tags_digest: str | None = None
    seen_stamp: str | None = None  # VaultEntry.stamp of `seen_version` (versions restart at 1 after a destroy)

    @property
    def ref(self) -> SecretRef:
        return SecretRef(self.mount, self.path, self.kv_version)


@dataclass(frozen=True, slots=True)
class PendingDelete:
    """A superseded or retired credential that still has to be deleted (survives a crash)."""

    credential_id: str
    organization_id: str
    key: str  # the secret it belonged to
    reason: str
    attempts: int = 0
    next_attempt_at: float | None = None


class Ledger(Protocol):
    """Durable state. Implemented by `bridge.ledger.SqliteLedger`; `tests` have an in-memory one."""

    def get(self, key: str) -> LedgerRecord | None: ...

    def all(self) -> list[LedgerRecord]: ...

    def some(self, keys: Collection[str]) -> list[LedgerRecord]:
        """The rows of these keys that exist, ordered by key (a targeted pass: O(k), not O(N))."""
        ...

    def holding(self, fingerprints: Collection[str]) -> list[LedgerRecord]:
        """The rows whose fingerprint is one of these, any state, ordered by key."""
        ...

    def unsettled(self, now: float) -> list[LedgerRecord]:
        """At least every row failed, rejected or pending, or in a backoff past `now`; fewer rows
        than `all()` (the pass report filters them again)."""
        ...

    def put(self, record: LedgerRecord, *, durable: bool = True) -> None:
        """Insert or replace, durably (committed before returning).

        `durable=False` stages the row: it is committed with the next durable write, at
        `flush()`, or when the implementation's batch bound is reached, and a crash before then
        loses it (and only rows staged after it). Only a row whose loss costs a re-adoption may
        be staged (docs/adr/0011-group-commit-and-pipeline.md).
        """
        ...

    def flush(self) -> None:
        """Commit every staged row now."""
        ...

    def remove(self, key: str) -> None: ...

    def add_pending_delete(self, item: PendingDelete) -> None: ...

    def pending_deletes(self) -> list[PendingDelete]: ...

    def update_pending_delete(self, item: PendingDelete) -> None: ...

    def remove_pending_delete(self, credential_id: str) -> None: ...

    def counts_by_state(self) -> dict[str, int]:
        """Rows per state (every state present, 0 when empty): the `secrets` gauge, cheaply."""
        ...

    def get_meta(self, name: str) -> str | None: ...

    def set_meta(self, name: str, value: str) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class PassRequest:
    """What to sync: everything (paths is None) or a few `mount/path` keys from a trigger."""

    trigger: str  # bounded: one of bridge.metrics.TRIGGERS
    paths: frozenset[str] | None = None
    force_drift_check: bool = False
    # An explicit one-shot run (`sync --once`) is a request to try now: every key skips its backoff.
    retry_backoff: bool = False
    received_at: Mapping[str, float] = field(default_factory=dict)  # key -> monotonic time the write was heard


class StateStore(Protocol):
    """A small KV v2 area in Vault for the bridge's own state (HMAC key, HA lease).

    Vault is the one store every replica and every rescheduled pod shares, which is why the
    fingerprint/marker key and the lease live there (docs/adr/0002-key-in-vault.md).
    Implemented by `bridge.vault.source.VaultSource`.
    """

    def read_state(self, name: str) -> tuple[dict[str, Any], int] | None:
        """The data and KV version at `<state_mount>/<state_path>/<name>`; None when absent or deleted."""
        ...

    def write_state(self, name: str, data: Mapping[str, Any], cas: int) -> int:
        """Check-and-set write (cas=0: only if absent). Returns the new version.

        Raises `bridge.errors.CasConflict` when someone else wrote first.
        """
        ...


@dataclass(frozen=True, slots=True)
class Failing:
    """A tracked secret not in a good state after a pass: what the CLI and `-o json` name."""

    path: str
    action: str  # the last action tried (create, rotate, reject, …); "" if none yet
    reason: str
    next_attempt: float | None  # unix seconds; None when not scheduled (a rejection waits for a change)
    state: str  # failed | rejected | pending | registered (a registered row waiting in backoff)


@dataclass(frozen=True, slots=True)
class PassReport:
    """The summary of one pass, for the CLI table, metrics, logs and /v1/status."""

    trigger: str
    full: bool  # a full pass (every source) rather than a targeted one
    started_at: float  # unix seconds
    finished_at: float
    result: str  # ok | partial (some secrets failed, or part of Vault/CybeDefend could not be seen) | failed (the pass itself failed) | aborted (shutdown)
    counts: Mapping[str, int] = field(default_factory=dict)  # created, rotated, moved, retired, adopted, refreshed, skipped, rejected, failed, deferred
    vault_requests: Mapping[str, int] = field(default_factory=dict)
    error: str | None = None  # why a pass failed as a whole (Vault down, …); never a value
    delete_guard_tripped: bool = False
    # Every tracked secret that after the pass is failed, rejected, pending or waiting in backoff.
    failing: tuple[Failing, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """The report as `sync --once -o json` and `/v1/status` show it: times in ISO 8601."""
        return {
            "trigger": self.trigger, "full": self.full, "result": self.result, "error": self.error,
            "started_at": iso8601(self.started_at), "finished_at": iso8601(self.finished_at),
            "duration_seconds": round(self.finished_at - self.started_at, 3),
            "counts": dict(self.counts), "vault_requests": dict(self.vault_requests),
            "delete_guard_tripped": self.delete_guard_tripped,
            "failing": [{"path": f.path, "state": f.state, "action": f.action, "reason": f.reason,
                         "next_attempt": iso8601(f.next_attempt)} for f in self.failing],
        }


class PassRunner(Protocol):
    """The sync engine as the daemon sees it. Implemented by `bridge.engine.sync.SyncEngine`."""

    def run(self, request: PassRequest) -> PassReport: ...

    def status(self) -> Mapping[str, Any]:
        """The /v1/status document: per secret path, version, project, credential id, state, last
        outcome and reason, next attempt; plus the last pass report and flags. Never a value."""
        ...


class WriteGuard(Protocol):
    """Confirms, before each CybeDefend write, that this process is still the one writer.

    Implemented by the HA lease (`bridge.daemon.ha.Lease`) and the process lock
    (`bridge.ledger.ProcessLock`). The CybeDefend client calls `check` before every write attempt,
    each retry included, with the request timeout as the budget.
    """

    def check(self, budget_seconds: float) -> None:
        """Return when the lease or lock still holds for `budget_seconds` plus a margin; else
        raise `bridge.errors.LeaseLost` (it may wait, bounded by the lease's own deadline, for
        a renewal in flight)."""
        ...
