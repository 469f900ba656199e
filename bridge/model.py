"""Frozen value types shared by every part of the bridge.

Nothing here does I/O. Anything that holds a token, API key or PAT holds it inside a
`Sensitive`, whose repr and str never show the value, so that a stray `log.info(obj)` or an
exception message built from an object cannot leak it.
"""

from __future__ import annotations

import datetime
import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

REDACTED = "***"


class Sensitive:
    """A secret string. `reveal()` is the only way out, so every use is greppable."""

    __slots__ = ("__value",)

    def __init__(self, value: str) -> None:
        self.__value = value

    def reveal(self) -> str:
        return self.__value

    def __repr__(self) -> str:
        return f"Sensitive({REDACTED!r})"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sensitive) and other.__value == self.__value

    def __hash__(self) -> int:
        return hash(("Sensitive", self.__value))

    def __bool__(self) -> bool:
        return bool(self.__value)

    def __reduce__(self) -> Any:  # pickling would copy the value somewhere unexpected
        raise TypeError("Sensitive values cannot be pickled")


@dataclass(frozen=True, slots=True, order=True)
class SecretRef:
    """Where a secret lives: a KV mount and the path inside it (no `data/` or `metadata/`)."""

    mount: str
    path: str
    kv_version: int = 2

    @property
    def key(self) -> str:
        """The ledger key and the name used in logs and status: `mount/path`."""
        return f"{self.mount.strip('/')}/{self.path.strip('/')}"

    def __str__(self) -> str:
        return self.key


@dataclass(frozen=True, slots=True)
class VaultEntry:
    """What discovery saw of one secret, before validation.

    For KV v2 `tags` is the secret's `custom_metadata` and `payload` is None until a value is
    read. KV v1 has no metadata, so `tags` and `payload` are both the secret's data, and
    `version` is None.
    """

    ref: SecretRef
    version: int | None
    tags: Mapping[str, str] = field(repr=False)  # KV v1: the data itself, token included
    deleted: bool = False  # the current KV v2 version is deleted or destroyed
    payload: Mapping[str, Any] | None = field(default=None, repr=False)
    source_index: int = 0
    # The current KV v2 version's created_time: a secret destroyed and written anew restarts at
    # version 1, so (version, stamp) is what identifies a version's content.
    stamp: str | None = None


@dataclass(frozen=True, slots=True)
class Candidate:
    """A validated, tagged secret, ready to be registered."""

    ref: SecretRef
    version: int | None
    organization_id: str
    project_id: str
    username: str = field(repr=False)
    token: Sensitive = field(repr=False)
    fingerprint: str  # keyed HMAC of the token; safe to store and compare
    description: str | None = None
    stamp: str | None = None  # VaultEntry.stamp


class ActionKind(enum.StrEnum):
    CREATE = "create"
    ROTATE = "rotate"
    # The project or organization changed. Same organization: the current credential is relinked
    # (new project in, old primary out under `delete`); another organization: created there.
    MOVE = "move"
    RETIRE = "retire"
    # CybeDefend already holds a credential carrying this secret's current marker (a lost
    # ledger, a crash after the POST, another replica's work): the ledger learns it, no POST.
    ADOPT = "adopt"
    REFRESH = "refresh"  # metadata-only change (same token): the ledger learns the version
    DELETE = "delete"  # only credentials: one of ours that Vault's current state makes not current
    SKIP = "skip"
    REJECT = "reject"


@dataclass(frozen=True, slots=True)
class Doomed:
    """A credential an action deletes once its own write is done (create before delete).

    `why` is bounded (a metric label): superseded (an older token of the secret), duplicate
    (a second credential for the same token), retired (the secret is untagged or deleted),
    moved (the secret now targets another organization).
    """

    credential_id: str
    organization_id: str
    why: str


class State(enum.StrEnum):
    """A ledger row's state."""

    REGISTERED = "registered"  # the credential for `version` exists in CybeDefend
    PENDING = "pending"  # a write is due (new, rotated, or a failed write waiting for retry)
    FAILED = "failed"  # the last attempt failed; `next_attempt_at` says when it is tried again
    REJECTED = "rejected"  # bad input; never sent; re-examined when the secret changes
    ORPHANED = "orphaned"  # gone from Vault, credential kept (deletion policy `retain`)
    RETIRED = "retired"  # gone from Vault, credential deleted (deletion policy `delete`)
    MISSING = "missing"  # drift check found the credential gone; re-created on the next pass


@dataclass(frozen=True, slots=True)
class Action:
    """One decision of the planner for one secret."""

    kind: ActionKind
    ref: SecretRef
    reason: str
    candidate: Candidate | None = None
    version: int | None = None
    organization_id: str | None = None
    project_id: str | None = None
    # the credential this action replaces or removes (rotate, move, retire)
    old_credential_id: str | None = None
    old_organization_id: str | None = None
    reject_code: str | None = None  # bounded: used as a metric label
    tags_digest: str | None = None  # of the tags this decision used (see LedgerRecord.tags_digest)
    stamp: str | None = None  # VaultEntry.stamp of the version decided on
    # -- decided from a fresh CybeDefend listing (planner.reconcile); empty before it ----------
    credential_id: str | None = None  # adopt / move (relink) / delete: the credential it acts on
    links: tuple[str, ...] | None = None  # the exact project set to PUT afterwards; None: no PUT
    deletes: tuple[Doomed, ...] = ()  # deleted after this action's own write, in this order
    keeps: tuple[str, ...] = ()  # credentials left in place on purpose (deletion_policy retain)
    paused: bool = False  # its deletions are held back by the delete guard rail this pass
    blocked: str | None = None  # why it cannot be carried out this pass (e.g. a listing failed)

    @property
    def writes(self) -> bool:
        """Whether carrying this action out sends anything to CybeDefend."""
        if self.blocked is not None:
            return False
        if self.kind in (ActionKind.CREATE, ActionKind.ROTATE) and self.credential_id is None:
            return True
        if self.kind == ActionKind.MOVE and self.credential_id is None:
            return True
        return self.links is not None or (bool(self.deletes) and not self.paused)


class Result(enum.StrEnum):
    OK = "ok"
    FAILED = "failed"
    DEFERRED = "deferred"  # not attempted now (backoff pending, guard rail, shutdown)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What executing one action did."""

    action: Action
    result: Result
    kind: ActionKind  # may differ from action.kind: a create can end as an adopt
    credential_id: str | None = None
    reason: str = ""
    retryable: bool = False


@dataclass(frozen=True, slots=True)
class RemoteCredential:
    """A DockerHub credential as CybeDefend lists it. The token is never returned by the API."""

    id: str
    username: str
    description: str | None = None
    created_at: str | None = None


MARKER_PREFIX = "cybedefend-bridge"
_MARKER_RE = re.compile(
    r"\[cybedefend-bridge:(?P<instance>[a-z0-9][a-z0-9-]{0,31}):(?P<path>[0-9a-f]{12}):"
    r"(?P<rev>v[0-9]{1,10}\.[0-9a-f]{8}|f[0-9a-f]{8})\]"
)


@dataclass(frozen=True, slots=True)
class Marker:
    """The ownership marker the bridge writes into a credential's description.

    `[cybedefend-bridge:<instance>:<12 hex of HMAC(path)>:v<version>.<8 hex of the token's
    fingerprint>]` for KV v2, or `…:f<8 hex of the fingerprint>]` for KV v1, which has no
    versions. The fingerprint part matters for KV v2 too: a secret deleted and written again
    restarts at version 1, and its predecessor's credential must not pass for the new token.
    It is short, stable and names no Vault path in clear; it is how a credential is recognised
    after a crash or after the ledger is lost (there is no idempotency key in the API).
    """

    instance: str
    path_digest: str
    revision: str  # "v12.1a2b3c4d" (KV v2) or "f1a2b3c4" (KV v1)

    def render(self) -> str:
        return f"[{MARKER_PREFIX}:{self.instance}:{self.path_digest}:{self.revision}]"

    @classmethod
    def parse(cls, description: str | None) -> Marker | None:
        if not description:
            return None
        m = _MARKER_RE.search(description)
        if m is None:
            return None
        return cls(m["instance"], m["path"], m["rev"])

    def same_secret(self, other: Marker) -> bool:
        return self.instance == other.instance and self.path_digest == other.path_digest

    @property
    def token_part(self) -> str:
        """The 8 hex of the token's fingerprint: what says which token a credential holds.

        The version number beside it is informational: a new KV version holding the same token
        (a metadata-only change) keeps the same credential.
        """
        return self.revision.split(".", 1)[1] if self.revision.startswith("v") else self.revision[1:]


def iso8601(ts: float | None) -> str | None:
    """Unix seconds as an ISO 8601 UTC timestamp, the form every JSON surface uses (`-o json`,
    `/v1/status`): readable by people and by `date -d`/`jq` alike, unlike a bare float."""
    return None if ts is None else datetime.datetime.fromtimestamp(ts, datetime.UTC).isoformat()
