"""Issue "Exactly once, decided from the truth": scenarios 1 and 6, and `plan` == what `sync` sends.

Real OpenBao and the CybeDefend double over HTTP. Two replicas are two bridges built from the
same configuration (same Vault mount, key and instance) with separate ledgers, as the chart's
per-pod emptyDir gives them; which one "leads" is simply which one runs a pass.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bridge.model import Marker
from bridge.planner import describe
from bridge.ports import PassRequest
from cybedefend_double.records import RecordedRequest
from cybedefend_double.simulator import Simulator
from tests.support.bridge_rig import PAT, Rig
from tests.support.data import ORG, PROJECTS, seeded_simulator, tagged, token
from tests.support.openbao import OpenBao

pytestmark = pytest.mark.integration
FULL = PassRequest(trigger="manual")
DRIFT = PassRequest(trigger="schedule", force_drift_check=True)
WRITES = ("create", "set_links", "delete")


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with seeded_simulator(PAT) as s:
        yield s


def replica(openbao: OpenBao, kv_mount: str, sim: Simulator, tmp: Path, name: str, **overrides: Any) -> Rig:
    home = tmp / name
    home.mkdir()
    rig = Rig(openbao, kv_mount, sim, home, **overrides)
    rig.start()
    return rig


def ours(sim: Simulator, rig: Rig, name: str) -> list[Any]:
    assert rig.bridge is not None
    digest = rig.bridge.keyring.path_digest(rig.bridge.ledger.get(f"{rig.mount}/dockerhub/{name}").ref)  # type: ignore[union-attr]
    return [c for c in sim.credentials(ORG) if (m := Marker.parse(c.description)) is not None and m.path_digest == digest]


def sent_writes(requests: list[RecordedRequest]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for r in requests:
        if r.endpoint not in WRITES or r.status is None or r.status >= 300:
            continue
        parts = r.path.strip("/").split("/")
        if r.endpoint == "create":
            assert r.body is not None
            out.append({"op": "create", "organization_id": parts[parts.index("organization") + 1],
                        "project_id": r.body["projectId"]})
        elif r.endpoint == "set_links":
            assert r.body is not None
            out.append({"op": "set_links", "credential_id": parts[-2], "project_ids": sorted(r.body["projectIds"])})
        else:
            out.append({"op": "delete", "credential_id": parts[-1]})
    return out


def planned_writes(rig: Rig, request: PassRequest) -> list[dict[str, Any]]:
    assert rig.bridge is not None
    rows = [describe(a, rig.bridge.settings) for a in rig.bridge.engine.plan(request)]
    out: list[dict[str, Any]] = []
    for row in rows:
        for w in row["writes"]:
            if w["op"] == "create":
                out.append({"op": "create", "organization_id": w["organization_id"], "project_id": w["project_id"]})
            elif w["op"] == "set_links":
                out.append({"op": "set_links", "credential_id": w["credential_id"], "project_ids": sorted(w["project_ids"])})
            else:
                out.append({"op": "delete", "credential_id": w["credential_id"]})
    return out


def same_writes(planned: list[dict[str, Any]], sent: list[dict[str, Any]]) -> None:
    """The writes match one for one; a link set on a credential created in the same action is `(new)`."""
    def norm(ws: list[dict[str, Any]]) -> list[str]:
        return sorted(f"{w['op']}:{w.get('project_id', '')}:{w.get('credential_id', '') if w['op'] != 'set_links' else ''}:"
                      f"{','.join(w.get('project_ids', []))}" for w in ws)
    assert norm(planned) == norm(sent), (planned, sent)
    new = [w for w in planned if w.get("credential_id") == "(new)"]
    created = [w for w in sent if w["op"] == "create"]
    assert len(new) <= len(created)


def test_scenario_1_a_stale_replica_never_deletes_the_live_credential(
    openbao: OpenBao, kv_mount: str, sim: Simulator, tmp_path: Path
) -> None:
    policy = {"sync": {"deletion_policy": "delete", "retry_base_seconds": 0.01, "retry_cap_seconds": 0.05}}
    a = replica(openbao, kv_mount, sim, tmp_path, "a", **policy)
    b = replica(openbao, kv_mount, sim, tmp_path, "b", **policy)
    try:
        b.put("s", 1)
        assert b.run().counts["created"] == 1
        [c1] = ours(sim, b, "s")
        a.run(DRIFT)  # A leads: it adopts C1 (same key, same instance: CybeDefend shows it)
        openbao.set_metadata(kv_mount, "dockerhub/s", {})  # untagged
        assert a.run().counts["retired"] == 1
        assert ours(sim, b, "s") == []
        openbao.set_metadata(kv_mount, "dockerhub/s", tagged(PROJECTS[0]))  # tagged again, no new KV version
        assert a.run().counts["created"] == 1
        [c2] = ours(sim, b, "s")
        assert c2.id != c1.id
        # B leads again with a ledger that still names C1: neither a steady pass nor the drift
        # check (which lists the organization) may delete C2, which carries the current token.
        for request in (FULL, DRIFT):
            report = b.run(request)
            assert report.result == "ok", report
            assert [c.id for c in ours(sim, b, "s")] == [c2.id]
        rec = b.bridge.ledger.get(f"{kv_mount}/dockerhub/s")  # type: ignore[union-attr]
        assert rec is not None and rec.credential_id == c2.id  # B learned the truth from the listing
        b.assert_invariant()
    finally:
        for r in (a, b):
            assert r.bridge is not None
            r.bridge.close(revoke=False)


@pytest.mark.parametrize("policy", ["delete", "retain"])
def test_scenario_6_a_move_keeps_the_links_an_operator_added(
    openbao: OpenBao, kv_mount: str, sim: Simulator, tmp_path: Path, policy: str
) -> None:
    rig = replica(openbao, kv_mount, sim, tmp_path, "r", sync={"deletion_policy": policy})
    try:
        rig.put("s", 1, PROJECTS[0])
        rig.run()
        [cred] = ours(sim, rig, "s")
        assert rig.bridge is not None
        rig.bridge.client.set_linked_projects(ORG, cred.id, [PROJECTS[0], PROJECTS[2]])  # by hand
        openbao.set_metadata(kv_mount, "dockerhub/s", tagged(PROJECTS[1]))  # moved, same token
        planned = planned_writes(rig, FULL)
        sim.reset_requests()
        report = rig.run()
        assert report.counts["moved"] == 1 and report.result == "ok"
        same_writes(planned, sent_writes(sim.requests))
        creds = ours(sim, rig, "s")
        assert len(creds) == 1, "one credential per secret and organization"
        links = creds[0].linked_projects
        assert PROJECTS[1] in links and PROJECTS[2] in links, links  # new project in, the hand-made link kept
        assert (PROJECTS[0] in links) == (policy == "retain")  # the old primary leaves only under delete
        rig.assert_invariant()
    finally:
        assert rig.bridge is not None
        rig.bridge.close(revoke=False)


def test_plan_lists_every_write_sync_then_sends(openbao: OpenBao, kv_mount: str, sim: Simulator, tmp_path: Path) -> None:
    """A pass mixing a create, a rotation, a move, a retire, a duplicate and a stray of a deleted secret."""
    rig = replica(openbao, kv_mount, sim, tmp_path, "r", sync={"deletion_policy": "delete"})
    try:
        for i, name in enumerate(("rot", "mov", "ret", "dup", "gone")):
            rig.put(name, i, PROJECTS[i % 3])
        rig.run()
        assert rig.bridge is not None
        [dup] = ours(sim, rig, "dup")
        extra = rig.bridge.client.create(ORG, PROJECTS[4], "u-dup", token_sensitive(3, "dup"), dup.description or "")
        rig.put("new", 10, PROJECTS[3])
        rig.put("rot", 11, PROJECTS[0])  # rotated: a new token in a new version
        openbao.set_metadata(kv_mount, "dockerhub/mov", tagged(PROJECTS[5]))
        openbao.set_metadata(kv_mount, "dockerhub/ret", {})
        openbao.client().secrets.kv.v2.delete_metadata_and_all_versions(path="dockerhub/gone", mount_point=kv_mount)
        planned = planned_writes(rig, DRIFT)
        rows = [describe(a, rig.bridge.settings) for a in rig.bridge.engine.plan(DRIFT)]
        assert any(d["credential_id"] == extra.id and d["why"] == "duplicate" for r in rows for d in r["deletes"])
        assert any(r["action"] == "retire" and r["retire"] == "delete" and r["deletes"] for r in rows)
        sim.reset_requests()
        report = rig.run(DRIFT)
        assert report.result == "ok", report
        same_writes(planned, sent_writes(sim.requests))
        assert extra.id not in {c.id for c in sim.credentials(ORG)}
        rig.assert_invariant()
        sim.reset_requests()
        assert planned_writes(rig, DRIFT) == [] and rig.run(DRIFT).result == "ok"
        assert sent_writes(sim.requests) == []
    finally:
        assert rig.bridge is not None
        rig.bridge.close(revoke=False)


def token_sensitive(i: int, name: str) -> Any:
    from bridge.model import Sensitive

    return Sensitive(token(i, name))
