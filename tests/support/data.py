"""Test data shared by the suites and the benchmarks: ids, the token maker, tags, the seeded double, leaks."""

from __future__ import annotations

import base64
import datetime
import hashlib
import urllib.parse
import uuid
from collections.abc import Iterable

from cybedefend_double.simulator import Simulator

ORG = "5b0c6d7e-1f2a-4b3c-8d4e-5f6a7b8c9d0e"
ORG2 = "6c1d7e8f-2a3b-4c4d-9e5f-6a7b8c9d0e1f"
PROJECTS = [str(uuid.UUID(int=0x1000 + i, version=4)) for i in range(8)]


def token(i: int | str, salt: str = "") -> str:
    """A DockerHub-shaped token, unique per (i, salt), never a real one."""
    digest = hashlib.sha256(f"{i}/{salt}".encode()).hexdigest()[:27]
    return f"dckr_pat_{digest}"


def credential(kind: str, seed: str) -> str:
    """A fixed, recognisable non-DockerHub secret (`cdp_…` PAT, `whk_…` webhook token), unique per seed."""
    return f"{kind}_" + hashlib.sha256(seed.encode()).hexdigest()


def seeded_simulator(pat: str, *, org: str = ORG, projects: Iterable[str] = PROJECTS,
                     extra_orgs: Iterable[str] = ()) -> Simulator:
    """The CybeDefend double (not started) with an organization, its projects and a PAT that manages it."""
    sim = Simulator()
    sim.add_organization(org)
    for other in extra_orgs:
        sim.add_organization(other)
    for project in projects:
        sim.add_project(org, project)
    sim.add_pat(pat, {org: "manage"})
    return sim


def tagged(project: str, org: str | None = None, description: str | None = None) -> dict[str, str]:
    tags = {"cybedefend-project-id": project}
    if org is not None:
        tags["cybedefend-organization-id"] = org
    if description is not None:
        tags["cybedefend-description"] = description
    return tags


def forms(secret: str) -> list[str]:
    """The ways a secret could show up in output: as is, base64, URL-encoded."""
    raw = secret.encode()
    return [secret, base64.b64encode(raw).decode(), base64.urlsafe_b64encode(raw).decode().rstrip("="),
            urllib.parse.quote(secret, safe=""), urllib.parse.quote_plus(secret)]


def assert_no_leak(texts: Iterable[str], secrets: Iterable[str]) -> None:
    blob = "\n".join(texts)
    for s in secrets:
        for form in set(forms(s)):
            # Fail with the *position*, never by printing the secret itself.
            assert form not in blob, f"a secret leaked (form #{forms(s).index(form)}) at offset {blob.find(form)}"


def unix(stamp: object) -> float:
    """Unix seconds from an ISO 8601 timestamp of a JSON surface (`/v1/status`, `-o json`); it must
    carry its offset, so a naive local time (which would silently shift by the zone) fails here."""
    assert isinstance(stamp, str), f"not an ISO 8601 string: {stamp!r}"
    when = datetime.datetime.fromisoformat(stamp)
    assert when.utcoffset() == datetime.timedelta(0), f"not UTC: {stamp!r}"
    return when.timestamp()
