"""A faithful CybeDefend double over real HTTP: the public face tests and the demo use.

`Simulator` keeps organizations, projects, PATs, API keys and credentials in memory behind one
lock, serves the API routes and the token service on one loopback server, injects faults on
demand and records every request it received (with nothing secret in the record). The
endpoint behaviour lives in `bridge.simulator_api`, routing and validation in
`bridge.simulator_routes`, the HTTP plumbing in `bridge.simulator_http`, and the standalone
command (`python -m bridge.simulator`) in `bridge.simulator_cli`.
"""

from __future__ import annotations

import hashlib
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal

from bridge.model import Sensitive
from bridge.simulator_http import HttpServer
from bridge.simulator_routes import ENDPOINTS, is_uuid

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


class Simulator:
    """The CybeDefend double. Configure it, `start()` it, point the client at `url`."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.time,
        token_ttl_seconds: int = 600,
        api_keys_gone: bool = True,
        links_as_array: bool = False,
        client_app_id: str = "cybedefend-cli-sim",
        expected_resource: str | None = None,
        id_factory: Callable[[], str] = lambda: str(uuid.uuid4()),
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if token_ttl_seconds <= 0:
            raise ValueError("token_ttl_seconds must be positive")
        self.clock = clock
        self.token_ttl_seconds = token_ttl_seconds
        self.api_keys_gone = api_keys_gone  # True: x-api-key gets 410, as the API since Feb 2026
        self.links_as_array = links_as_array  # True: linked projects come back as a bare array
        self.client_app_id = client_app_id
        self.expected_resource = expected_resource  # None: the simulator's own base URL
        self.id_factory = id_factory
        self.sleep = sleep
        self.lock = threading.Lock()  # the one lock around everything below
        self.projects_by_org: dict[str, list[str]] = {}
        self.org_of_project: dict[str, str] = {}
        self.forbidden: set[str] = set()
        self.pats: dict[str, Principal] = {}  # keyed by sha256 of the PAT, never the PAT itself
        self.api_keys: dict[str, Principal] = {}  # same, for API keys
        self.tokens: dict[str, Grant] = {}  # keyed by sha256 of the bearer token
        self.store: dict[str, Credential] = {}
        self._faults: list[_PendingFault] = []
        self._requests: list[RecordedRequest] = []
        from bridge.simulator_api import serve  # the endpoint logic uses this module's types: import late

        self._http = HttpServer(lambda request: serve(self, request))
        self._url: str | None = None

    # ----- setup -------------------------------------------------------------------------
    def add_organization(self, org_id: str) -> None:
        if not is_uuid(org_id):
            raise ValueError("organization ids are UUIDs")
        with self.lock:
            self.projects_by_org.setdefault(org_id.lower(), [])

    def add_project(self, org_id: str, project_id: str) -> None:
        if not is_uuid(project_id):
            raise ValueError("project ids are UUIDs")
        org, project = org_id.lower(), project_id.lower()
        with self.lock:
            if org not in self.projects_by_org:
                raise ValueError(f"unknown organization {org}")
            owner = self.org_of_project.get(project)
            if owner is not None and owner != org:
                raise ValueError(f"project {project} already belongs to organization {owner}")
            if owner is None:
                self.projects_by_org[org].append(project)
                self.org_of_project[project] = org

    def add_pat(self, pat: str, permissions: Mapping[str, str]) -> None:
        """Accept `pat` at the token exchange; `permissions`: organization id -> "manage" | "read"."""
        if not pat:
            raise ValueError("a PAT must not be empty")
        checked = _check_permissions(permissions)
        with self.lock:
            self.pats[sha256_hex(pat)] = Principal(checked)

    def add_api_key(self, key: str, permissions: Mapping[str, str]) -> None:
        if not key:
            raise ValueError("an API key must not be empty")
        checked = _check_permissions(permissions)
        with self.lock:
            self.api_keys[sha256_hex(key)] = Principal(checked)

    def revoke_pat(self, pat: str) -> None:
        """Later exchanges with this PAT get 401.

        Tokens already issued stay valid until they expire, as JWTs do.
        """
        with self.lock:
            principal = self.pats.get(sha256_hex(pat))
            if principal is None:
                raise KeyError("unknown PAT")
            principal.revoked = True

    def forbid_project(self, project_id: str) -> None:
        """Every call naming this project (in its path or body) answers 403."""
        with self.lock:
            self.forbidden.add(project_id.lower())

    def allow_project(self, project_id: str) -> None:
        with self.lock:
            self.forbidden.discard(project_id.lower())

    # ----- faults ------------------------------------------------------------------------
    def inject(self, endpoint: str, fault: Fault, times: int = 1) -> None:
        """Apply `fault` to the next `times` requests for `endpoint` ("*": any endpoint).

        Faults apply in the order they were injected; each request consumes at most one.
        """
        if endpoint != "*" and endpoint not in ENDPOINTS:
            raise ValueError(f"unknown endpoint {endpoint!r}; expected one of {', '.join(ENDPOINTS)} or '*'")
        if times < 1:
            raise ValueError("times must be at least 1")
        with self.lock:
            self._faults.append(_PendingFault(endpoint, fault, times))

    def pending_faults(self) -> int:
        """How many fault applications are still waiting."""
        with self.lock:
            return sum(p.remaining for p in self._faults)

    def clear_faults(self) -> None:
        with self.lock:
            self._faults.clear()

    def take_fault(self, endpoint: str) -> Fault | None:
        with self.lock:
            for pending in self._faults:
                if pending.endpoint in (endpoint, "*"):
                    pending.remaining -= 1
                    if pending.remaining == 0:
                        self._faults.remove(pending)
                    return pending.fault
        return None

    def expire_all_tokens(self) -> None:
        with self.lock:
            self.tokens.clear()

    # ----- observation -------------------------------------------------------------------
    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot of every request received so far, oldest first."""
        with self.lock:
            return list(self._requests)

    def reset_requests(self) -> None:
        with self.lock:
            self._requests.clear()

    def record(self, entry: RecordedRequest) -> None:
        with self.lock:
            self._requests.append(entry)

    def credentials(self, org_id: str | None = None) -> list[StoredCredential]:
        """Snapshots of the stored credentials (of one organization), in creation order."""
        with self.lock:
            return [c.snapshot() for c in self.store.values()
                    if org_id is None or c.organization_id == org_id.lower()]

    # ----- lifecycle ---------------------------------------------------------------------
    def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Start serving on a background thread; returns the base URL (API and token service)."""
        self._url = self._http.start(host, port)
        return self._url

    def stop(self) -> None:
        self._http.stop()

    @property
    def url(self) -> str:
        if self._url is None:
            raise RuntimeError("the simulator has not been started")
        return self._url

    @property
    def resource(self) -> str:
        """The `resource` the token exchange expects: the API base URL."""
        return (self.expected_resource or self.url).rstrip("/")

    def __enter__(self) -> Simulator:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def __repr__(self) -> str:
        with self.lock:
            counts = (len(self.projects_by_org), len(self.org_of_project), len(self.store))
        where = self._url if self._http.running else "stopped"
        return f"Simulator({where}, organizations={counts[0]}, projects={counts[1]}, credentials={counts[2]})"


if __name__ == "__main__":
    # Run through bridge.simulator_cli so that the classes used are `bridge.simulator`'s, not `__main__`'s.
    from bridge.simulator_cli import main

    raise SystemExit(main())
