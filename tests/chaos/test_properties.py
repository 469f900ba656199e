"""Scenario 5b, property-based: for any sequence of Vault operations, passes converge.

Planner + executor + sync engine run on the in-memory fakes (FakeSecretSource, FakeRegistrar,
SqliteLedger(":memory:")). Hypothesis draws a sequence of operator actions — put a new secret,
rotate, move to another project, untag, tag again, soft-delete the latest version, delete the
secret with all its versions — interleaved with passes and with *crashes between steps* (the
next create, delete, link copy or listing raises a non-bridge exception before or after it took
effect, which unwinds the engine like a SIGKILL would, and the engine is rebuilt on the same
ledger). After the sequence, clean passes must converge to the shared invariant
(tests/chaos/invariant.py) under both deletion policies.

Runs are derandomized so CI sees the same examples every time. The gaps these tests once
found are kept at the bottom as regression tests.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.engine.sync import SyncEngine
from bridge.errors import AmbiguousWrite
from bridge.keyring import Keyring
from bridge.ledger import SqliteLedger
from bridge.metrics import Metrics
from bridge.model import Marker, RemoteCredential, SecretRef, Sensitive
from bridge.planner import writes_of
from bridge.ports import PassRequest
from tests.chaos.invariant import Cred, Expect, Want, check_invariant
from tests.support.config import settings as make_settings
from tests.support.data import ORG, PROJECTS, tagged, token
from tests.support.fake_source import FakeSecretSource
from tests.support.fakes import FakeRegistrar

FULL = PassRequest(trigger="manual")
NAMES = ("a", "b", "c", "d")
CRASH_OPS = ("create", "delete", "set_linked_projects", "all_credentials", "linked_projects")


class Crash(BaseException):
    """Stands for SIGKILL: not a BridgeError, so nothing in the bridge catches it."""


@dataclass
class Known:
    expect: Expect
    project: str | None = None
    version: int = 0
    token: str | None = None


@dataclass
class FakeWorld:
    policy: str = "delete"
    t: float = 1_700_000_000.0
    known: dict[str, Known] = field(default_factory=dict)
    tokens: list[str] = field(default_factory=list)
    n: int = 0

    def __post_init__(self) -> None:
        self.s = make_settings(sync={"deletion_policy": self.policy, "retry_base_seconds": 1, "retry_cap_seconds": 5,
                                     "max_deletes_per_pass": 1000})
        self.vault = FakeSecretSource()
        self.api = FakeRegistrar({ORG: PROJECTS}, clock=lambda: self.t)
        self.ledger = SqliteLedger(":memory:")
        self.keys = Keyring(b"chaos-property-key-0123456789abcdef")
        self.metrics = Metrics()
        self.engine = self._engine()
        self.foreign: dict[str, Cred] = {}
        for i, desc in enumerate(["made by hand", "[cybedefend-bridge:other:0123456789ab:v1]"]):
            tok = token(i, "hand")
            self.tokens.append(tok)
            self.api.create(ORG, PROJECTS[i], f"human{i}", Sensitive(tok), desc)
        self.foreign = {c.id: c for c in self.creds()}

    def _engine(self) -> SyncEngine:
        return SyncEngine(self.s, self.vault, self.api, self.ledger, self.keys, self.metrics,
                          stop=threading.Event(), clock=lambda: self.t)

    def creds(self) -> list[Cred]:
        return [Cred(c.id, c.description, c.username, frozenset(c.links), c.token.reveal())
                for c in self.api.credentials(ORG)]

    # -- operator actions ---------------------------------------------------------------------
    def put(self, name: str, project: str) -> None:
        self.n += 1
        tok = token(self.n, name)
        self.tokens.append(tok)
        version = self.vault.put("secret", f"dockerhub/{name}", {"accessToken": tok, "dockerhubUsername": f"u-{name}"},
                                 tagged(project))
        self.known[name] = Known(Expect.LIVE, project, version, tok)

    def retag(self, name: str, project: str) -> None:
        k = self.known.get(name)
        if k is None or k.version == 0 or k.token is None:
            return
        if k.expect is Expect.GONE and k.project is None:
            return  # soft-deleted: its latest version is gone, tags alone do not bring it back
        self.vault.set_tags("secret", f"dockerhub/{name}", tagged(project))
        self.known[name] = Known(Expect.LIVE, project, k.version, k.token)

    def untag(self, name: str) -> None:
        k = self.known.get(name)
        if k is None or k.version == 0:
            return
        self.vault.set_tags("secret", f"dockerhub/{name}", {"owner": "x"})
        self.known[name] = Known(Expect.GONE, k.project, k.version, k.token)

    def soft_delete(self, name: str) -> None:
        k = self.known.get(name)
        if k is None or k.version == 0:
            return
        self.vault.delete_current("secret", f"dockerhub/{name}")
        self.known[name] = Known(Expect.GONE, None, k.version, None)

    def destroy(self, name: str) -> None:
        if name not in self.known or self.known[name].version == 0:
            return
        self.vault.delete_all("secret", f"dockerhub/{name}")
        self.known[name] = Known(Expect.GONE, None, 0, None)

    # -- the bridge ---------------------------------------------------------------------------
    def run(self, crash: tuple[str, bool] | None = None) -> None:
        self.t += 60
        if crash is not None:
            self.api.inject(crash[0], Crash(), after=crash[1])
        try:
            self.engine.run(FULL)
        except Crash:
            # A killed process never commits what it staged (group commit, ADR 11): those rows
            # are lost, the rest of the ledger file is what the restarted process opens.
            self.ledger.discard_staged()
            self.engine = self._engine()  # a restarted process, same ledger file
        finally:
            self.api._injected.clear()  # a crash fault unused this pass must not fire later

    def sync(self, name: str, crash: tuple[str, bool] | None = None) -> None:
        """A targeted pass for one secret, as an audit event or a webhook asks for it (ADR 14:
        its own ledger rows only, its organization listed ahead), crashing like `run` can."""
        self.t += 1
        if crash is not None:
            self.api.inject(crash[0], Crash(), after=crash[1])
        try:
            self.engine.run(PassRequest(trigger="audit", paths=frozenset({f"secret/dockerhub/{name}"})))
        except Crash:
            self.ledger.discard_staged()
            self.engine = self._engine()
            return
        finally:
            self.api._injected.clear()
        # Not only eventually: right after a clean targeted pass, a live secret has exactly one
        # credential of ours, holding its latest token, whatever earlier crashes left behind.
        k = self.known.get(name)
        if k is not None and k.expect is Expect.LIVE:
            digest = self.keys.path_digest(SecretRef("secret", f"dockerhub/{name}"))
            mine = [c for c in self.creds() if (m := Marker.parse(c.description)) is not None
                    and m.instance == self.s.sync.instance and m.path_digest == digest]
            assert [c.token for c in mine] == [k.token], f"after sync {name}: {len(mine)} credentials"

    def converge(self, passes: int = 3) -> None:
        for _ in range(passes):
            self.t += 3600
            self.engine.run(FULL)

    def check(self, context: str) -> None:
        wants = []
        for name, k in self.known.items():
            ref = SecretRef("secret", f"dockerhub/{name}")
            wants.append(Want(ref.key, self.keys.path_digest(ref), k.expect, k.project, k.version, k.token))
        ledger = {r.key: r for r in self.ledger.all()}
        texts = [repr(ledger), self.metrics.exposition().decode(), repr(self.engine.status())]
        check_invariant(self.creds(), wants, instance=self.s.sync.instance, policy=self.policy, ledger=ledger,
                        foreign=self.foreign, texts=texts, secrets=self.tokens, context=context,
                        pending=[f"{p.credential_id[:8]}:{p.reason}" for p in self.ledger.pending_deletes()])


names = st.sampled_from(NAMES)
projects = st.sampled_from(PROJECTS[:3])
SAFE_OPS = st.one_of(
    st.tuples(st.just("put"), names, projects),
    st.tuples(st.just("retag"), names, projects),
    st.tuples(st.just("untag"), names, st.none()),
    st.tuples(st.just("soft_delete"), names, st.none()),
    st.tuples(st.just("destroy"), names, st.none()),
    st.tuples(st.just("pass"), st.none(), st.none()),
)
CRASH = st.tuples(st.just("crash"), st.sampled_from(CRASH_OPS), st.booleans())
PUTS = st.one_of(st.tuples(st.just("put"), names, projects), st.tuples(st.just("pass"), st.none(), st.none()))


def play_one(world: FakeWorld, op: str, a: Any, b: Any) -> None:
    if op == "crash":
        world.run(crash=(a, b))
    elif op == "pass":
        world.run()
    elif b is not None:
        getattr(world, op)(a, b)
    else:
        getattr(world, op)(a)


def play(world: FakeWorld, ops: list[tuple[str, Any, Any]]) -> None:
    """Apply `ops` in any order (crashes included), then converge and check the invariant."""
    for op, a, b in ops:
        play_one(world, op, a, b)
    world.converge()
    world.check(f"ops={ops}")


PROPS = settings(max_examples=120, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("policy", ["delete", "retain"])
@PROPS
@given(ops=st.lists(SAFE_OPS, max_size=14))
def test_any_sequence_of_vault_operations_converges(policy: str, ops: list[tuple[str, Any, Any]]) -> None:
    play(FakeWorld(policy), ops)


@pytest.mark.parametrize("policy", ["delete", "retain"])
@PROPS
@given(ops=st.lists(st.one_of(PUTS, CRASH), max_size=14))
def test_crashes_between_any_two_steps_of_registration_and_rotation_converge(
    policy: str, ops: list[tuple[str, Any, Any]]
) -> None:
    play(FakeWorld(policy), ops)


# --- gaps these tests found, now closed -------------------------------------------------------
# A credential created by a pass that crashed before its ledger write used to be found only by
# listing the project the *current* tags name: a move, untag or delete before the next pass left
# it behind. Closed by recording the secret before its first POST (and a pending-delete reminder
# that makes the next pass list the organization), and since docs/adr/0007 by deciding every
# deletion from a fresh organization listing and what Vault says of the marker's secret now.


@pytest.mark.parametrize("then", ["retag", "untag", "destroy"])
def test_crash_after_the_post_then_a_tag_change_leaves_no_stray(then: str) -> None:
    world = FakeWorld("delete")
    world.put("a", PROJECTS[0])
    world.run()
    world.retag("a", PROJECTS[1])
    world.run(crash=("create", True))  # the move's create landed in project 1, then the bridge died
    if then == "retag":
        world.retag("a", PROJECTS[2])
    else:
        getattr(world, then)("a")
    world.converge()
    world.check(f"move crashed, then {then}")


def test_crash_after_the_first_post_then_untag_leaves_no_stray() -> None:
    world = FakeWorld("delete")
    world.put("a", PROJECTS[0])
    world.run(crash=("create", True))
    world.untag("a")
    world.converge()
    world.check("first create crashed, then untag")


@pytest.mark.parametrize("policy", ["delete", "retain"])
@PROPS
@given(ops=st.lists(st.one_of(SAFE_OPS, CRASH), max_size=14))
def test_any_sequence_with_crashes_converges(policy: str, ops: list[tuple[str, Any, Any]]) -> None:
    play(FakeWorld(policy), ops)


# Each operator action followed, most of the time, by the targeted sync its audit event asks for
# (sometimes crashing at any step): every action is then synced the way the daemon syncs it.
AUDITED = st.tuples(st.one_of(SAFE_OPS, CRASH), st.sampled_from(["sync", "sync", "crash", "none"]),
                    st.sampled_from(CRASH_OPS), st.booleans())


@pytest.mark.parametrize("policy", ["delete", "retain"])
@PROPS
@given(ops=st.lists(AUDITED, max_size=12))
def test_any_sequence_with_targeted_syncs_and_crashes_converges(policy: str,
                                                               ops: list[tuple[Any, str, str, bool]]) -> None:
    """Targeted passes read only their own rows and list ahead (ADR 14): after each clean one the
    secret has exactly one credential holding its latest token (`FakeWorld.sync`), and the
    whole sequence converges like full passes do."""
    world = FakeWorld(policy)
    for (op, a, b), then, crash_op, crash_after in ops:
        play_one(world, op, a, b)
        if isinstance(a, str) and op != "crash" and then != "none":
            world.sync(a, (crash_op, crash_after) if then == "crash" else None)
    world.converge()
    world.check(f"ops={ops}")


# A pass used to compare KV v2 version *numbers* only: a secret destroyed and written anew
# before the next pass is version 1 again. Closed by comparing the version's created_time too.


@pytest.mark.parametrize("policy", ["delete", "retain"])
def test_destroyed_and_written_anew_between_two_passes_registers_the_new_token(policy: str) -> None:
    world = FakeWorld(policy)
    world.put("a", PROJECTS[0])
    world.run()
    world.destroy("a")
    world.put("a", PROJECTS[0])  # version 1 again, another token
    world.converge()
    world.check("destroyed and written anew between two passes")


@pytest.mark.parametrize("policy", ["delete", "retain"])
def test_an_orphan_with_the_same_revision_is_not_adopted(policy: str) -> None:
    """Regression (found by the property test above, fixed in bridge/executor.py): the secret was
    destroyed (retain: its credential orphaned, marker v1), then written anew as version 1 with
    another token. The rotation used to adopt the orphan, leaving the old token registered."""
    world = FakeWorld(policy)
    world.put("a", PROJECTS[0])
    world.run()
    world.destroy("a")
    world.run()
    world.put("a", PROJECTS[0])
    world.converge()
    world.check("destroyed, seen, written anew")



# --- `plan` is the whole truth, with two replicas that keep separate ledgers --------------------
DRIFT = PassRequest(trigger="schedule", force_drift_check=True)


class Recorder:
    """The shared FakeRegistrar as one replica sees it, noting every write it attempts."""

    def __init__(self, api: FakeRegistrar) -> None:
        self.api = api
        self.writes: list[tuple[str, ...]] = []
        self.created: set[str] = set()

    def create(self, organization_id: str, project_id: str, username: str, token: Sensitive,
               description: str) -> RemoteCredential:
        self.writes.append(("create", organization_id, project_id))
        before = {c.id for c in self.api.credentials()}
        try:
            cred = self.api.create(organization_id, project_id, username, token, description)
        finally:
            self.created |= {c.id for c in self.api.credentials()} - before
        return cred

    def set_linked_projects(self, organization_id: str, credential_id: str, project_ids: Any) -> None:
        self.writes.append(("set_links", "(new)" if credential_id in self.created else credential_id,
                            ",".join(sorted(project_ids))))
        self.api.set_linked_projects(organization_id, credential_id, project_ids)

    def delete(self, organization_id: str, credential_id: str) -> bool:
        self.writes.append(("delete", credential_id))
        return self.api.delete(organization_id, credential_id)

    def list_project(self, project_id: str) -> list[RemoteCredential]:
        return self.api.list_project(project_id)

    def get(self, project_id: str, credential_id: str) -> RemoteCredential | None:
        return self.api.get(project_id, credential_id)

    def linked_projects(self, organization_id: str, credential_id: str) -> list[str]:
        return self.api.linked_projects(organization_id, credential_id)

    def all_credentials(self, organization_id: str) -> list[RemoteCredential]:
        return self.api.all_credentials(organization_id)


def planned(actions: list[Any]) -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = []
    for a in actions:
        for w in writes_of(a):
            if w["op"] == "create":
                out.append(("create", w["organization_id"], w["project_id"]))
            elif w["op"] == "set_links":
                out.append(("set_links", w["credential_id"], ",".join(sorted(w["project_ids"]))))
            else:
                out.append(("delete", w["credential_id"]))
    return sorted(out)


class TwinWorld(FakeWorld):
    """Two replicas: one Vault, one CybeDefend, one key and instance, two ledgers."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.ledgers = [self.ledger, SqliteLedger(":memory:")]
        self.recorders = [Recorder(self.api), Recorder(self.api)]
        self.engines = [self._twin(0), self._twin(1)]
        self.compared = 0

    def _twin(self, i: int) -> SyncEngine:
        return SyncEngine(self.s, self.vault, self.recorders[i], self.ledgers[i], self.keys, self.metrics,
                          stop=threading.Event(), clock=lambda: self.t)

    def lead(self, i: int, drift: bool, lost: bool) -> None:
        """Replica i runs `plan`, then `sync --once` at once: it must send exactly what it planned."""
        self.t += 60
        request = DRIFT if drift else FULL
        want = planned(self.engines[i].plan(request))
        rec = self.recorders[i]
        rec.writes, rec.created = [], set()
        if lost:  # the next create lands but its answer is lost
            self.api.inject("create", AmbiguousWrite("connection reset after the request was sent", endpoint="create"),
                            after=True)
        try:
            self.engines[i].run(request)
        finally:
            self.api._injected.clear()
        assert sorted(rec.writes) == want, f"replica {i} planned {want} but sent {sorted(rec.writes)}"
        self.compared += 1

    def crash(self, i: int, op: str, after: bool) -> None:
        self.t += 60
        self.api.inject(op, Crash(), after=after)
        try:
            self.engines[i].run(FULL)
        except Crash:
            self.ledgers[i].discard_staged()  # what the kill took with it (ADR 11)
            self.engines[i] = self._twin(i)
        finally:
            self.api._injected.clear()

    def settle_and_check(self, context: str) -> None:
        for _ in range(3):
            for i in (1, 0):
                self.t += 3600
                self.engines[i].run(DRIFT)
        for i in (0, 1):
            self.engines[i].run(DRIFT)
            self.ledger, self.engine = self.ledgers[i], self.engines[i]
            self.check(f"replica {i}: {context}")


TWIN_OPS = st.one_of(
    SAFE_OPS.filter(lambda op: op[0] != "pass"),
    st.tuples(st.just("lead"), st.integers(0, 1), st.tuples(st.booleans(), st.booleans())),
    st.tuples(st.just("crash"), st.integers(0, 1), st.tuples(st.sampled_from(CRASH_OPS), st.booleans())),
)


@pytest.mark.parametrize("policy", ["delete", "retain"])
@settings(max_examples=600, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(TWIN_OPS, max_size=16))
def test_two_replicas_send_exactly_what_plan_listed_and_converge(policy: str, ops: list[tuple[str, Any, Any]]) -> None:
    """Random states: two replicas with separate ledgers, untag and re-tag, moves, deletes,
    crashes and lost responses. Each `plan` followed at once by `sync --once` on the same replica
    sends exactly the planned writes; in the end the invariant holds as seen from both ledgers."""
    world = TwinWorld(policy)
    for op, a, b in ops:
        if op == "lead":
            world.lead(a, *b)
        elif op == "crash":
            world.crash(a, *b)
        elif b is not None:
            getattr(world, op)(a, b)
        else:
            getattr(world, op)(a)
    world.lead(0, True, False)
    world.settle_and_check(f"ops={ops}")


# --- group commit: a kill with a batch of rows staged (ADR 11) -------------------------------


class _GatedRegistrar(FakeRegistrar):
    """Creates wait at a gate, then the `crash_at`-th create dies before it is sent (a kill)."""

    def __init__(self, crash_at: int, **kw: Any) -> None:
        super().__init__(**kw)
        self.gate = threading.Event()
        self.crash_at = crash_at
        self.started = 0
        self.staged_at_crash: int | None = None
        self.ledger: SqliteLedger | None = None
        self._count_lock = threading.Lock()

    def create(self, organization_id: str, project_id: str, username: str, token: Sensitive,
               description: str) -> RemoteCredential:
        assert self.gate.wait(10), "the gate never opened"
        with self._count_lock:
            self.started += 1
            mine = self.started
        if mine == self.crash_at:
            # Wait until every other create has answered and its row is staged, then die.
            assert self.ledger is not None
            deadline = time.monotonic() + 10
            while self.ledger.staged() < self.crash_at - 1 and time.monotonic() < deadline:
                time.sleep(0.001)
            self.staged_at_crash = self.ledger.staged()
            raise Crash()
        return super().create(organization_id, project_id, username, token, description)


@pytest.mark.parametrize("policy", ["delete", "retain"])
def test_a_kill_with_a_batch_of_rows_uncommitted_costs_only_readoption(policy: str, tmp_path: Path) -> None:
    """Six new secrets; their pending rows are committed before any POST, five POSTs answer and
    their rows stay staged (bounds too large to commit), the sixth create dies: the staged rows
    are lost with the process. The restarted bridge adopts the five by marker, creates the sixth
    once, and the invariant holds: nothing duplicated, nothing left unregistered."""
    n = 6
    path = tmp_path / "ledger.sqlite3"
    s = make_settings(sync={"deletion_policy": policy, "max_deletes_per_pass": 1000}, cybedefend={"max_concurrency": 4})
    vault = FakeSecretSource()
    api = _GatedRegistrar(crash_at=n, projects={ORG: PROJECTS})
    keys = Keyring(b"chaos-property-key-0123456789abcdef")
    tokens = {f"s{i}": token(i, "batch") for i in range(n)}
    for i, (name, tok) in enumerate(tokens.items()):
        vault.put("secret", f"dockerhub/{name}", {"accessToken": tok, "dockerhubUsername": f"u-{name}"}, tagged(PROJECTS[i % 3]))
    ledger = SqliteLedger(path, batch_rows=1000, batch_seconds=3600)
    api.ledger = ledger
    engine = SyncEngine(s, vault, api, ledger, keys, Metrics(), stop=threading.Event())
    died: list[BaseException] = []

    def run() -> None:
        try:
            engine.run(FULL)
        except Crash as exc:
            died.append(exc)

    killed = threading.Thread(target=run, daemon=True)
    killed.start()
    # Open the gate once every pending row is on disk, as another process sees the file.
    on_disk = sqlite3.connect(path)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if on_disk.execute("SELECT COUNT(*) FROM secrets WHERE state = 'pending'").fetchone()[0] == n:
                break
            time.sleep(0.002)
        api.gate.set()
        killed.join(20)
        assert not killed.is_alive() and died, "the pass was not killed"
        assert api.staged_at_crash == n - 1, api.staged_at_crash  # a batch of five rows was staged, not committed
        assert len(api.credentials()) == n - 1  # five credentials exist
        ledger.discard_staged()  # the kill: staged rows never reach the file
        ledger.close()
        rows = dict(on_disk.execute("SELECT key, state FROM secrets").fetchall())
        assert sorted(rows.values()) == ["pending"] * n  # what the restarted process finds
    finally:
        on_disk.close()
    api.crash_at = 0
    with SqliteLedger(path) as restarted:
        metrics = Metrics()
        report = SyncEngine(s, vault, api, restarted, keys, metrics, stop=threading.Event()).run(FULL)
        assert report.result == "ok", report
        assert report.counts["adopted"] == n - 1 and report.counts["created"] == 1, report.counts
        wants = []
        for i, (name, tok) in enumerate(tokens.items()):
            ref = SecretRef("secret", f"dockerhub/{name}")
            wants.append(Want(ref.key, keys.path_digest(ref), Expect.LIVE, PROJECTS[i % 3], 1, tok))
        creds = [Cred(c.id, c.description, c.username, frozenset(c.links), c.token.reveal()) for c in api.credentials(ORG)]
        ledger_rows = {r.key: r for r in restarted.all()}
        check_invariant(creds, wants, instance=s.sync.instance, policy=policy, ledger=ledger_rows, foreign={},
                        texts=[repr(ledger_rows), metrics.exposition().decode()], secrets=list(tokens.values()),
                        context=f"kill with {n - 1} rows staged ({policy})",
                        pending=[p.credential_id for p in restarted.pending_deletes()])
