"""A faithful CybeDefend double over real HTTP: the public face tests and the demo use.

`Simulator` keeps organizations, projects, PATs, API keys and credentials in memory behind one
lock, serves the API routes and the token service on one loopback server, injects faults on
demand and records every request it received (with nothing secret in the record). The
endpoint behaviour lives in `cybedefend_double.api`, routing and validation in
`cybedefend_double.routes`, the HTTP plumbing in `cybedefend_double.http_server`, and the standalone
command (`python -m cybedefend_double`) in `cybedefend_double.cli`.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Mapping
from types import TracebackType

from cybedefend_double.api import serve
from cybedefend_double.http_server import HttpServer
from cybedefend_double.records import (
    Credential,
    Fault,
    FaultKind,
    Grant,
    Principal,
    RecordedRequest,
    StoredCredential,
    _check_permissions,
    _PendingFault,
    sha256_hex,
)
from cybedefend_double.routes import ENDPOINTS, is_uuid

# The public face of the double: tests and the demo import these from here.
__all__ = ["Fault", "FaultKind", "RecordedRequest", "Simulator", "StoredCredential"]


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
