"""In-memory fakes of the bridge's ports, for unit tests of the sync engine.

`FakeRegistrar` has the observable semantics of CybeDefend (and of `cybedefend_double.simulator`): create
links the new credential to its project, list returns the credentials linked to a project, get
answers None for a credential not linked to that project, delete answers False when the
credential is already gone, unknown or forbidden projects answer 403. The same contract tests
run against it and against the real client talking to the simulator
(`tests/test_registrar_contract.py`), so a sync test passing on the fake means something.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from bridge.errors import NotFound, PermissionDenied
from bridge.model import RemoteCredential, Sensitive

T = TypeVar("T")
OPERATIONS = ("create", "list_project", "get", "delete", "linked_projects", "set_linked_projects", "all_credentials")


@dataclass(slots=True)
class FakeCredential:
    """What the fake stores for one credential. The token stays a `Sensitive`."""

    id: str
    organization_id: str
    username: str
    description: str | None
    created_at: str
    token: Sensitive = field(repr=False)
    links: list[str] = field(default_factory=list)

    def remote(self) -> RemoteCredential:
        return RemoteCredential(self.id, self.username, self.description, self.created_at)


@dataclass(slots=True)
class _Injected:
    operation: str
    error: BaseException
    remaining: int
    after: bool  # True: perform the operation, then raise (like a connection dropped after the write)


class FakeRegistrar:
    """`bridge.ports.Registrar` in memory; thread-safe; counts calls per operation.

    `projects` maps organization id -> its project ids. When it is None (the default), any
    organization and project is accepted, which keeps small sync tests short; give it to get
    the API's 403 for an unknown organization or a project outside the organization.
    """

    def __init__(
        self,
        projects: Mapping[str, Iterable[str]] | None = None,
        *,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._lock = threading.Lock()
        self._rng = rng if rng is not None else random.Random(0)
        self._clock = clock
        self._org_of: dict[str, str] | None = None
        if projects is not None:
            self._org_of = {p.lower(): org.lower() for org, ps in projects.items() for p in ps}
            self._orgs = {org.lower() for org in projects}
        self.forbidden: set[str] = set()
        self.store: dict[str, FakeCredential] = {}
        self.calls: Counter[str] = Counter()
        self._injected: list[_Injected] = []

    # ---- configuration and inspection ---------------------------------------------------------

    def forbid_project(self, project_id: str) -> None:
        """Every call naming this project answers PermissionDenied (403)."""
        with self._lock:
            self.forbidden.add(project_id.lower())

    def allow_project(self, project_id: str) -> None:
        with self._lock:
            self.forbidden.discard(project_id.lower())

    def inject(self, operation: str, error: BaseException, *, times: int = 1, after: bool = False) -> None:
        """Make the next `times` calls of `operation` raise `error`.

        `after=True` performs the call first (a create really creates), then raises: this is how
        an `AmbiguousWrite` whose write did happen looks to the sync engine.
        """
        if operation not in OPERATIONS:
            raise ValueError(f"unknown operation {operation!r}")
        with self._lock:
            self._injected.append(_Injected(operation, error, times, after))

    def credentials(self, organization_id: str | None = None) -> list[FakeCredential]:
        """The stored credentials (of one organization), in creation order."""
        with self._lock:
            return [c for c in self.store.values() if organization_id is None or c.organization_id == organization_id]

    def token_of(self, credential_id: str) -> Sensitive:
        with self._lock:
            return self.store[credential_id].token

    def reset_calls(self) -> None:
        with self._lock:
            self.calls.clear()

    # ---- Registrar --------------------------------------------------------------------------

    def create(
        self, organization_id: str, project_id: str, username: str, token: Sensitive, description: str
    ) -> RemoteCredential:
        org, project = organization_id.lower(), project_id.lower()

        def do() -> RemoteCredential:
            self._require_project(org, project)
            cred = FakeCredential(
                id=str(uuid.UUID(int=self._rng.getrandbits(128), version=4)),
                organization_id=org,
                username=username,
                description=description or None,
                created_at=time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(self._clock())),
                token=token,
                links=[project],
            )
            self.store[cred.id] = cred
            return cred.remote()

        return self._call("create", do)

    def list_project(self, project_id: str) -> list[RemoteCredential]:
        project = project_id.lower()

        def do() -> list[RemoteCredential]:
            self._require_project(self._org_of_project(project), project)
            return [c.remote() for c in self.store.values() if project in c.links]

        return self._call("list_project", do)

    def get(self, project_id: str, credential_id: str) -> RemoteCredential | None:
        project = project_id.lower()

        def do() -> RemoteCredential | None:
            self._require_project(self._org_of_project(project), project)
            cred = self.store.get(credential_id.lower())
            return cred.remote() if cred is not None and project in cred.links else None

        return self._call("get", do)

    def delete(self, organization_id: str, credential_id: str) -> bool:
        org = organization_id.lower()

        def do() -> bool:
            self._require_org(org)
            cred = self.store.get(credential_id.lower())
            if cred is None or cred.organization_id != org:
                return False
            del self.store[cred.id]
            return True

        return self._call("delete", do)

    def linked_projects(self, organization_id: str, credential_id: str) -> list[str]:
        org = organization_id.lower()

        def do() -> list[str]:
            return list(self._existing(org, credential_id).links)

        return self._call("linked_projects", do)

    def set_linked_projects(self, organization_id: str, credential_id: str, project_ids: Sequence[str]) -> None:
        org = organization_id.lower()

        def do() -> None:
            cred = self._existing(org, credential_id)
            wanted = list(dict.fromkeys(p.lower() for p in project_ids))
            for project in wanted:
                self._require_project(org, project)
            cred.links = wanted

        self._call("set_linked_projects", do)

    def all_credentials(self, organization_id: str) -> list[RemoteCredential]:
        org = organization_id.lower()

        def do() -> list[RemoteCredential]:
            self._require_org(org)
            return [c.remote() for c in self.store.values() if c.organization_id == org]

        return self._call("all_credentials", do)

    # ---- internals ----------------------------------------------------------------------------

    def _call(self, operation: str, do: Callable[[], T]) -> T:
        with self._lock:
            self.calls[operation] += 1
            injected = next((i for i in self._injected if i.operation == operation), None)
            if injected is not None:
                injected.remaining -= 1
                if injected.remaining == 0:
                    self._injected.remove(injected)
                if not injected.after:
                    raise injected.error
            result = do()
            if injected is not None:
                raise injected.error
            return result

    def _org_of_project(self, project: str) -> str:
        if self._org_of is None:
            return ""  # permissive mode: any project exists
        org = self._org_of.get(project)
        if org is None:
            raise PermissionDenied("Forbidden resource", status=403, endpoint="fake")
        return org

    def _require_org(self, org: str) -> None:
        if self._org_of is not None and org not in self._orgs:
            raise PermissionDenied("Forbidden resource", status=403, endpoint="fake")

    def _require_project(self, org: str, project: str) -> None:
        self._require_org(org)
        if project in self.forbidden:
            raise PermissionDenied("Forbidden resource", status=403, endpoint="fake")
        if self._org_of is not None and self._org_of.get(project) != org:
            raise PermissionDenied("Forbidden resource", status=403, endpoint="fake")

    def _existing(self, org: str, credential_id: str) -> FakeCredential:
        self._require_org(org)
        cred = self.store.get(credential_id.lower())
        if cred is None or cred.organization_id != org:
            raise NotFound("Credential not found", status=404, endpoint="fake")
        return cred
