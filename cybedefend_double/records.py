"""The double's records: faults to inject, requests it received, credentials and principals.

Plain data, shared by `simulator` (the state) and `api` (the endpoints).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from bridge.model import Sensitive
from cybedefend_double.routes import is_uuid

FaultKind = Literal["status", "delay", "drop_before", "drop_after", "expire_tokens"]
AuthKind = Literal["bearer", "api_key"]
_ROLES = ("read", "manage")


def sha256_hex(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Fault:
    """One injected misbehaviour; build it with the class methods."""

    kind: FaultKind
    code: int | None = None
    retry_after: str | None = None
    seconds: float = 0.0
    message: str | None = None

    @classmethod
    def status(cls, code: int, retry_after: str | None = None, message: str | None = None) -> Fault:
        """Answer `code` with the usual error body (and `Retry-After` if given); do nothing else."""
        if not 100 <= code <= 599:
            raise ValueError("status code must be between 100 and 599")
        return cls("status", code=code, retry_after=retry_after, message=message)

    @classmethod
    def delay(cls, seconds: float) -> Fault:
        """Sleep `seconds` of real time, then handle the request normally."""
        if seconds < 0:
            raise ValueError("delay must not be negative")
        return cls("delay", seconds=seconds)

    @classmethod
    def drop_before(cls) -> Fault:
        """Close the connection without handling the request or answering."""
        return cls("drop_before")

    @classmethod
    def drop_after(cls) -> Fault:
        """Handle the request (a create really creates), then close without answering."""
        return cls("drop_after")

    @classmethod
    def expire_tokens(cls) -> Fault:
        """Invalidate every bearer token issued so far, then handle the request (a bearer call gets 401)."""
        return cls("expire_tokens")


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One request as received. `body` never holds a secret: token-like fields become `<name>_sha256`."""

    method: str
    path: str
    endpoint: str  # one of ENDPOINTS, or "unknown"
    status: int | None  # None when the connection was dropped without an answer
    auth: AuthKind | None
    body: dict[str, Any] | None
    fault: FaultKind | None
    at: float  # the injected clock's time when the request arrived


@dataclass(frozen=True, slots=True)
class StoredCredential:
    """A snapshot of one stored DockerHub credential. The token is a `Sensitive`."""

    id: str
    organization_id: str
    username: str
    description: str | None
    created_at: str  # ISO-8601, as the API returns it
    linked_projects: frozenset[str]
    token: Sensitive = field(repr=False)


@dataclass(slots=True)
class Credential:
    """The mutable record behind a `StoredCredential`.

    Links keep their order because the first one is what the API reports as the legacy `projectId`.
    """

    id: str
    organization_id: str
    username: str
    description: str | None
    created_at: str
    token: Sensitive = field(repr=False)
    links: list[str] = field(default_factory=list)

    def snapshot(self) -> StoredCredential:
        return StoredCredential(self.id, self.organization_id, self.username, self.description,
                                self.created_at, frozenset(self.links), self.token)


@dataclass(slots=True)
class Principal:
    """A PAT or API key holder: organization id -> "manage" | "read"."""

    permissions: dict[str, str]
    revoked: bool = False


@dataclass(frozen=True, slots=True)
class Grant:
    principal: Principal
    expires_at: float


@dataclass(slots=True)
class _PendingFault:
    endpoint: str
    fault: Fault
    remaining: int


def _check_permissions(permissions: Mapping[str, str]) -> dict[str, str]:
    checked: dict[str, str] = {}
    for org_id, role in permissions.items():
        if not is_uuid(org_id) or role not in _ROLES:
            raise ValueError('permissions map organization UUIDs to "manage" or "read"')
        checked[org_id.lower()] = role
    return checked
