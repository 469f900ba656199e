"""One Registrar contract, run against the fake and against the real client talking to the double.

Part 1 runs the same tests over (a) `tests.support.fakes.FakeRegistrar` and (b) `CybeDefendClient`
against `cybedefend_double.simulator.Simulator` over real HTTP, so the sync engine's unit tests (on the
fake) assume nothing the API does not do. Part 2 drives the real client through the double's
faults: both auth generations, 429, 5xx, dropped connections, expired tokens, slow answers.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from bridge.config import CybeDefendSettings
from bridge.cybedefend.client import CybeDefendClient
from bridge.errors import (
    AmbiguousWrite,
    AuthenticationError,
    LegacyApiKeyGone,
    NotFound,
    PermissionDenied,
    TransientError,
)
from bridge.metrics import Metrics
from bridge.model import Sensitive
from bridge.ports import Registrar
from cybedefend_double.simulator import Fault, Simulator
from tests.support.fakes import FakeRegistrar

ORG = "11111111-1111-4111-8111-111111111111"
OTHER_ORG = "99999999-9999-4999-8999-999999999999"
P1 = "22222222-2222-4222-8222-222222222222"
P2 = "33333333-3333-4333-8333-333333333333"
P_FORBIDDEN = "66666666-6666-4666-8666-666666666666"
P_OTHER = "44444444-4444-4444-8444-444444444444"  # belongs to OTHER_ORG
UNKNOWN = "55555555-5555-4555-8555-555555555555"
PAT = "cdpat_contract_4e7a1c9b2d5f8a3e6c0b"
API_KEY = "cdkey_contract_0a9b8c7d6e5f4a3b2c1d"
DH_TOKEN = "dckr_pat_ContractTestToken_9Xk2Lm4Np6"
MARKER = "[cybedefend-bridge:default:0123456789ab:v1]"


@dataclass
class Env:
    registrar: Registrar
    forbid: Callable[[str], None]


class Sleeps:
    """The client's sleep: recorded, and real but short, so a retry really happens later."""

    def __init__(self) -> None:
        self.calls: list[float] = []
        self._lock = threading.Lock()

    def __call__(self, seconds: float) -> None:
        with self._lock:
            self.calls.append(seconds)
        time.sleep(min(seconds, 0.01))


def new_simulator(**kwargs: Any) -> Simulator:
    sim = Simulator(**kwargs)
    sim.add_organization(ORG)
    sim.add_organization(OTHER_ORG)
    for project in (P1, P2, P_FORBIDDEN):
        sim.add_project(ORG, project)
    sim.add_project(OTHER_ORG, P_OTHER)
    sim.add_pat(PAT, {ORG: "manage", OTHER_ORG: "manage"})
    sim.add_api_key(API_KEY, {ORG: "manage", OTHER_ORG: "manage"})
    return sim


def client_for(
    sim: Simulator, *, mode: str = "pat", sleep: Callable[[float], None] | None = None, metrics: Metrics | None = None,
    **overrides: Any,
) -> CybeDefendClient:
    raw: dict[str, Any] = {
        "api_url": sim.url,
        "auth_url": sim.url,
        "auth": {"mode": mode, "credential_file": "/nonexistent"},
        "timeout_seconds": 2,
        "max_requests_per_second": 1000,
        "retry": {"max_attempts": 4, "base_seconds": 0.05, "cap_seconds": 5},
        **overrides,
    }
    return CybeDefendClient(
        CybeDefendSettings.model_validate(raw),
        Sensitive(PAT if mode == "pat" else API_KEY),
        metrics or Metrics(),
        sleep=sleep or Sleeps(),
    )


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with new_simulator(api_keys_gone=False) as s:
        yield s


@pytest.fixture(params=["fake", "simulator"])
def env(request: pytest.FixtureRequest) -> Iterator[Env]:
    if request.param == "fake":
        fake = FakeRegistrar({ORG: [P1, P2, P_FORBIDDEN], OTHER_ORG: [P_OTHER]})
        yield Env(fake, fake.forbid_project)
        return
    with new_simulator() as sim:
        client = client_for(sim)
        try:
            yield Env(client, sim.forbid_project)
        finally:
            client.close()


# ---- part 1: the contract -------------------------------------------------------------------------


def test_create_then_list_and_get(env: Env) -> None:
    r = env.registrar
    cred = r.create(ORG, P1, "alice", Sensitive(DH_TOKEN), f"prod {MARKER}")
    assert cred.id and cred.username == "alice" and cred.description == f"prod {MARKER}"
    listed = r.list_project(P1)
    assert [(c.id, c.username, c.description) for c in listed] == [(cred.id, "alice", f"prod {MARKER}")]
    assert listed[0].created_at
    got = r.get(P1, cred.id)
    assert got is not None and got.id == cred.id and got.description == cred.description
    assert r.list_project(P2) == []
    assert r.get(P2, cred.id) is None  # not linked to that project
    assert r.get(P1, UNKNOWN) is None


def test_all_credentials_of_an_organization_whatever_their_project(env: Env) -> None:
    r = env.registrar
    a = r.create(ORG, P1, "alice", Sensitive(DH_TOKEN), f"a {MARKER}")
    b = r.create(ORG, P2, "bob", Sensitive(DH_TOKEN + "b"), "hand-made")
    other = r.create(OTHER_ORG, P_OTHER, "carol", Sensitive(DH_TOKEN + "c"), "elsewhere")
    got = {c.id: c for c in r.all_credentials(ORG)}
    assert set(got) == {a.id, b.id}
    assert got[a.id].description == f"a {MARKER}" and got[b.id].username == "bob"
    assert [c.id for c in r.all_credentials(OTHER_ORG)] == [other.id]
    r.delete(ORG, a.id)
    assert [c.id for c in r.all_credentials(ORG)] == [b.id]


def test_no_idempotency_two_creates_make_two_credentials(env: Env) -> None:
    r = env.registrar
    a = r.create(ORG, P1, "alice", Sensitive(DH_TOKEN), MARKER)
    b = r.create(ORG, P1, "alice", Sensitive(DH_TOKEN), MARKER)
    assert a.id != b.id
    assert {c.id for c in r.list_project(P1)} == {a.id, b.id}


def test_empty_description_is_absent(env: Env) -> None:
    cred = env.registrar.create(ORG, P1, "bob", Sensitive(DH_TOKEN), "")
    assert cred.description is None
    assert env.registrar.list_project(P1)[0].description is None


def test_links_are_replaced_as_a_whole(env: Env) -> None:
    r = env.registrar
    cred = r.create(ORG, P1, "alice", Sensitive(DH_TOKEN), MARKER)
    assert r.linked_projects(ORG, cred.id) == [P1]
    r.set_linked_projects(ORG, cred.id, [P1, P2])
    assert sorted(r.linked_projects(ORG, cred.id)) == sorted([P1, P2])
    assert [c.id for c in r.list_project(P2)] == [cred.id]
    r.set_linked_projects(ORG, cred.id, [P2])
    assert r.linked_projects(ORG, cred.id) == [P2]
    assert r.list_project(P1) == []
    assert r.get(P2, cred.id) is not None


def test_delete_then_already_gone(env: Env) -> None:
    r = env.registrar
    cred = r.create(ORG, P1, "alice", Sensitive(DH_TOKEN), MARKER)
    assert r.delete(OTHER_ORG, cred.id) is False  # not this organization's credential
    assert r.delete(ORG, cred.id) is True
    assert r.delete(ORG, cred.id) is False
    assert r.get(P1, cred.id) is None
    assert r.list_project(P1) == []


def test_unknown_credential_links_are_not_found(env: Env) -> None:
    with pytest.raises(NotFound):
        env.registrar.linked_projects(ORG, UNKNOWN)
    with pytest.raises(NotFound):
        env.registrar.set_linked_projects(ORG, UNKNOWN, [P1])


def test_forbidden_project_is_permission_denied(env: Env) -> None:
    r = env.registrar
    cred = r.create(ORG, P1, "alice", Sensitive(DH_TOKEN), MARKER)
    env.forbid(P_FORBIDDEN)
    for call in (
        lambda: r.create(ORG, P_FORBIDDEN, "alice", Sensitive(DH_TOKEN), MARKER),
        lambda: r.list_project(P_FORBIDDEN),
        lambda: r.get(P_FORBIDDEN, cred.id),
        lambda: r.set_linked_projects(ORG, cred.id, [P1, P_FORBIDDEN]),
    ):
        with pytest.raises(PermissionDenied) as info:
            call()
        assert info.value.status == 403 and not info.value.retryable
    assert r.linked_projects(ORG, cred.id) == [P1]  # the refused PUT changed nothing


def test_projects_outside_the_organization_are_permission_denied(env: Env) -> None:
    r = env.registrar
    with pytest.raises(PermissionDenied):
        r.create(ORG, P_OTHER, "alice", Sensitive(DH_TOKEN), MARKER)
    with pytest.raises(PermissionDenied):
        r.create(ORG, UNKNOWN, "alice", Sensitive(DH_TOKEN), MARKER)
    with pytest.raises(PermissionDenied):
        r.create(UNKNOWN, P1, "alice", Sensitive(DH_TOKEN), MARKER)
    with pytest.raises(PermissionDenied):
        r.list_project(UNKNOWN)
    cred = r.create(ORG, P1, "alice", Sensitive(DH_TOKEN), MARKER)
    with pytest.raises(PermissionDenied):
        r.set_linked_projects(ORG, cred.id, [P_OTHER])


# ---- part 2: the real client against the double's faults ------------------------------------------


def test_pat_generation_end_to_end(sim: Simulator) -> None:
    with client_for(sim) as client:
        assert client.authenticate() == "PAT exchanged; bearer valid for 600 s"
        cred = client.create(ORG, P1, "alice", Sensitive(DH_TOKEN), MARKER)
    reqs = sim.requests
    assert [(r.endpoint, r.status) for r in reqs] == [("client_apps", 200), ("token_exchange", 200), ("create", 201)]
    assert reqs[2].auth == "bearer"
    assert reqs[2].body == {
        "projectId": P1, "dockerhubUsername": "alice", "description": MARKER,
        "accessToken_sha256": hashlib.sha256(DH_TOKEN.encode()).hexdigest(),
    }
    stored = sim.credentials(ORG)
    assert [(c.id, c.username, c.token) for c in stored] == [(cred.id, "alice", Sensitive(DH_TOKEN))]


def test_api_key_generation_accepted_and_gone(sim: Simulator) -> None:
    with client_for(sim, mode="api_key", organization_id=ORG) as client:
        assert client.authenticate() == "API key accepted"
        client.create(ORG, P1, "alice", Sensitive(DH_TOKEN), MARKER)
        assert {r.auth for r in sim.requests} == {"api_key"}
        sim.api_keys_gone = True
        sim.reset_requests()
        with pytest.raises(LegacyApiKeyGone) as info:
            client.list_project(P1)
    assert "`pat`" in str(info.value) and not info.value.retryable
    assert [(r.endpoint, r.status) for r in sim.requests] == [("list", 410)]


def test_every_body_passes_the_doubles_validation(sim: Simulator) -> None:
    with client_for(sim) as client:
        cred = client.create(ORG, P1, "alice", Sensitive(DH_TOKEN), MARKER)
        client.create(ORG, P1, "bob", Sensitive(DH_TOKEN), "")
        client.set_linked_projects(ORG, cred.id, [P1, P2])
        client.set_linked_projects(ORG, cred.id, [])
        assert client.linked_projects(ORG, cred.id) == []
        client.delete(ORG, cred.id)
    statuses = [(r.endpoint, r.status) for r in sim.requests if r.endpoint not in ("client_apps", "token_exchange")]
    assert statuses == [("create", 201), ("create", 201), ("set_links", 200), ("set_links", 200),
                        ("get_links", 200), ("delete", 204)]


def test_links_as_a_bare_array(sim: Simulator) -> None:
    sim.links_as_array = True
    with client_for(sim) as client:
        cred = client.create(ORG, P1, "alice", Sensitive(DH_TOKEN), MARKER)
        assert client.linked_projects(ORG, cred.id) == [P1]


@pytest.mark.parametrize("retry_after", ["1", None])
def test_429_then_success(sim: Simulator, retry_after: str | None) -> None:
    sleeps = Sleeps()
    metrics = Metrics()
    sim.inject("create", Fault.status(429, retry_after=retry_after))
    with client_for(sim, sleep=sleeps, metrics=metrics) as client:
        client.create(ORG, P1, "alice", Sensitive(DH_TOKEN), MARKER)
    assert [r.status for r in sim.requests if r.endpoint == "create"] == [429, 201]
    assert len(sim.credentials()) == 1
    assert len(sleeps.calls) == 1
    if retry_after is not None:
        assert sleeps.calls[0] >= 1.0
    assert metrics.registry.get_sample_value("cybedefend_bridge_rate_limited_waits_total") == 1


def test_5xx_then_success_for_reads(sim: Simulator) -> None:
    sim.inject("list", Fault.status(503), times=2)
    with client_for(sim) as client:
        assert client.list_project(P1) == []
    assert [r.status for r in sim.requests if r.endpoint == "list"] == [503, 503, 200]


def test_5xx_on_create_is_ambiguous_and_not_resent(sim: Simulator) -> None:
    sim.inject("create", Fault.status(500))
    with client_for(sim) as client, pytest.raises(AmbiguousWrite):
        client.create(ORG, P1, "alice", Sensitive(DH_TOKEN), MARKER)
    assert [r.status for r in sim.requests if r.endpoint == "create"] == [500]


def test_drop_after_create_is_ambiguous_and_the_credential_exists(sim: Simulator) -> None:
    sim.inject("create", Fault.drop_after())
    with client_for(sim) as client:
        with pytest.raises(AmbiguousWrite):
            client.create(ORG, P1, "alice", Sensitive(DH_TOKEN), MARKER)
        # what the sync engine does next: list and adopt by marker
        adopted = [c for c in client.list_project(P1) if c.description and MARKER in c.description]
    assert [r.endpoint for r in sim.requests].count("create") == 1
    assert [c.id for c in sim.credentials()] == [a.id for a in adopted] and len(adopted) == 1


def test_slow_create_times_out_as_ambiguous(sim: Simulator) -> None:
    sim.inject("create", Fault.delay(1.0))
    with client_for(sim, timeout_seconds=0.3) as client, pytest.raises(AmbiguousWrite):
        client.create(ORG, P1, "alice", Sensitive(DH_TOKEN), MARKER)
    deadline = time.monotonic() + 5
    while not sim.credentials() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(sim.credentials()) == 1  # the double did create it after the client gave up


def test_dropped_and_slow_reads_are_retried(sim: Simulator) -> None:
    sim.inject("list", Fault.drop_before())
    sim.inject("list", Fault.delay(1.0))
    with client_for(sim, timeout_seconds=0.3) as client:
        assert client.list_project(P1) == []
    assert [r.status for r in sim.requests if r.endpoint == "list"][-1] == 200


def test_expired_tokens_are_re_exchanged_transparently(sim: Simulator) -> None:
    with client_for(sim) as client:
        client.list_project(P1)
        sim.inject("list", Fault.expire_tokens())
        assert client.list_project(P1) == []
    assert [(r.endpoint, r.status) for r in sim.requests] == [
        ("client_apps", 200), ("token_exchange", 200), ("list", 200),
        ("list", 401), ("token_exchange", 200), ("list", 200),
    ]


def test_revoked_pat_fails_clearly_after_expiry(sim: Simulator, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG), client_for(sim) as client:
        client.list_project(P1)
        sim.revoke_pat(PAT)
        sim.inject("list", Fault.expire_tokens())
        with pytest.raises(AuthenticationError) as info:
            client.list_project(P1)
    assert info.value.status == 401 and "revoked" in str(info.value)
    assert PAT not in str(info.value) and PAT not in caplog.text


def test_unreachable_api_is_transient_and_create_retried(sim: Simulator) -> None:
    url = sim.url
    sim.stop()
    sleeps = Sleeps()
    raw = {"api_url": url, "auth_url": url, "auth": {"mode": "api_key", "credential_file": "/x"},
           "retry": {"max_attempts": 3, "base_seconds": 0.01, "cap_seconds": 0.1}}
    client = CybeDefendClient(CybeDefendSettings.model_validate(raw), Sensitive(API_KEY), Metrics(), sleep=sleeps)
    with client, pytest.raises(TransientError) as info:
        client.create(ORG, P1, "alice", Sensitive(DH_TOKEN), MARKER)
    assert type(info.value) is TransientError and info.value.retryable
    assert len(sleeps.calls) == 2  # connection refused: certainly not processed, so retried


def test_concurrent_workers_share_one_exchange(sim: Simulator) -> None:
    with client_for(sim, max_concurrency=4) as client:
        threads = [
            threading.Thread(target=client.create, args=(ORG, P1, f"user{i}", Sensitive(DH_TOKEN), MARKER))
            for i in range(8)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(sim.credentials()) == 8
    assert [r.endpoint for r in sim.requests].count("token_exchange") == 1


def test_nothing_secret_reaches_the_double_records_or_logs(sim: Simulator, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG), client_for(sim) as client:
        sim.inject("create", Fault.status(429, retry_after="1"))
        client.create(ORG, P1, "alice", Sensitive(DH_TOKEN), MARKER)
    recorded = repr(sim.requests)
    for secret in (PAT, DH_TOKEN):
        assert secret not in recorded
        assert secret not in caplog.text
        assert all(secret not in str(getattr(r, "fields", "")) for r in caplog.records)


# ---- the fake's own test hooks ----------------------------------------------------------------------


def test_fake_injection_before_and_after_the_write() -> None:
    fake = FakeRegistrar()  # permissive: any organization and project
    fake.inject("create", AmbiguousWrite("dropped"), after=True)
    with pytest.raises(AmbiguousWrite):
        fake.create(ORG, P1, "alice", Sensitive(DH_TOKEN), MARKER)
    assert len(fake.credentials()) == 1  # the write happened
    fake.inject("create", AmbiguousWrite("dropped"))
    with pytest.raises(AmbiguousWrite):
        fake.create(ORG, P1, "alice", Sensitive(DH_TOKEN), MARKER)
    assert len(fake.credentials()) == 1  # this one did not
    fake.create(ORG, P1, "alice", Sensitive(DH_TOKEN), MARKER)
    assert fake.calls["create"] == 3 and len(fake.credentials()) == 2
    assert fake.token_of(fake.credentials()[0].id) == Sensitive(DH_TOKEN)
    assert DH_TOKEN not in repr(fake.credentials())
