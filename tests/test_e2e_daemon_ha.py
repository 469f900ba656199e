"""Two `cybedefend-bridge run` replicas against one OpenBao: one leader, no duplicates, failover.

Both replicas tail the same file audit device (a sidecar each, sharing the audit volume), keep
their own ledger, share the instance name, the Vault-held fingerprint key and the HA lease
(TTL 3 s), and advertise their own URL for forwarding.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cybedefend_double.simulator import Simulator
from tests.support.daemon import DaemonProc, Stack, bearer, free_port, new_simulator, wait_for
from tests.support.data import PROJECTS
from tests.support.openbao import OpenBao

pytestmark = [pytest.mark.integration, pytest.mark.slow]
TTL = 3.0
LEADER = "cybedefend_bridge_leader"
FORWARDED = ("cybedefend_bridge_trigger_events_total", "forwarded")


@pytest.fixture
def stack(openbao_factory: Callable[..., OpenBao], tmp_path: Path) -> Iterator[Stack]:
    sim: Simulator = new_simulator()
    st = Stack(openbao_factory(audit_log=tmp_path / "audit.log"), sim, tmp_path)
    try:
        yield st
    finally:
        st.close()
        sim.stop()


def lease_version(stack: Stack) -> int:
    """The KV v2 version of the HA lease (every renewal writes one), read as root."""
    path = "cybedefend-bridge/default/leader"  # ledger.state_path with sync.instance, then ha.lease_path
    doc = stack.bao.api("GET", f"{stack.mount}/metadata/{path}", token=stack.bao.root_token)
    return int(doc["data"]["current_version"])


def replica(stack: Stack, name: str) -> DaemonProc:
    port = free_port()
    return stack.daemon(name, port,
                        ha={"enabled": True, "ttl_seconds": TTL, "advertise_address": f"http://127.0.0.1:{port}"},
                        triggers={"audit_file": {"path": str(stack.tmp / "audit.log"), "poll_seconds": 0.05}})


def roles(*daemons: DaemonProc) -> list[float]:
    return [d.metric(LEADER) for d in daemons]


def forwarded(d: DaemonProc) -> float:
    return d.metric(FORWARDED[0], source=FORWARDED[1])


def heard(d: DaemonProc) -> float:
    """Writes its audit-file tailer matched (both replicas tail the same file)."""
    return d.metric(FORWARDED[0], source="audit_file")


def passes(d: DaemonProc) -> float:
    return sum(s.value for f in text_string_to_metric_families(d.metrics_text()) for s in f.samples
               if s.name == "cybedefend_bridge_passes_total")


def quiet(d: DaemonProc, seconds: float = 0.6) -> bool:
    """No pass started or finished for `seconds` (more than the 0.25 s debounce)."""
    first = passes(d)
    time.sleep(seconds)
    return passes(d) == first


def forwarded_passes(d: DaemonProc) -> list[dict[str, object]]:
    return [e for e in d.events("pass_finished") if e.get("trigger") == "forwarded"]


def test_two_replicas_one_leader_no_duplicates_failover_and_forwarding(stack: Stack) -> None:
    names = [f"ha-{i}" for i in range(3)]
    for i, n in enumerate(names):
        stack.put(n, 1, PROJECTS[i % 3])
    a, b = replica(stack, "a").start(), replica(stack, "b").start()
    wait_for(lambda: sorted(roles(a, b)) == [0.0, 1.0], 30, 0.1)
    leader, standby = (a, b) if a.metric(LEADER) == 1 else (b, a)
    leader.wait_ready()
    # A replica still starting (logging in to Vault) also reports leader 0 and is Ready: wait until
    # the standby's daemon runs, i.e. it has seen the lease, before looking at its role.
    wait_for(lambda: "daemon" in standby.status(), 30, 0.1)
    for _ in range(3):  # stable: renewals do not flap
        assert roles(leader, standby) == [1.0, 0.0]
        # Every replica is Ready (rollouts and GitOps tools finish); leadership is in status and metrics.
        assert standby.code("/readyz") == 200 and leader.code("/readyz") == 200
        assert standby.status()["daemon"]["leader"] is False and leader.status()["daemon"]["leader"] is True
        time.sleep(0.5)
    assert standby.status()["daemon"]["leader_address"] == leader.base

    # Writes: both replicas hear them; only the leader acts, the standby forwards what it heard.
    for i in range(3, 6):
        names.append(f"ha-{i}")
        stack.put(names[-1], 1, PROJECTS[i % 3])
    stack.put("ha-0", 2)
    wait_for(lambda: stack.settled(leader, names) and len(stack.creds()) == len(names), 10)
    stack.assert_registered_once(names, leader.rows())
    assert standby.rows() == {}, "a standby ran a pass"
    assert wait_for(lambda: forwarded(leader) >= 1) and standby.events("forwarded_to_leader")

    # A webhook sent to the standby (say, through a Service before it re-routed) reaches the leader.
    # First let the leader go quiet: its own tailer may still hear a write the standby already
    # forwarded, and a pass for that late line would otherwise be the one looked at below.
    wait_for(lambda: heard(leader) >= heard(standby) >= 4, 10, 0.1)
    wait_for(lambda: quiet(leader), 10, 0.1)
    before = forwarded(leader)
    passes_before = len(forwarded_passes(leader))
    body = json.dumps({"paths": [stack.key("ha-1"), stack.key("ha-2")]}).encode()
    assert standby.post("/v1/sync", body, bearer())[0] == 202
    wait_for(lambda: forwarded(leader) >= before + 2)
    assert wait_for(lambda: len(forwarded_passes(leader)) > passes_before, 10), "the leader ran no forwarded pass"
    assert standby.rows() == {}
    stack.check_exposure(leader, standby)

    # The leader dies without releasing the lease; the standby takes over on its own.
    t0 = time.monotonic()
    leader.signal(signal.SIGKILL)
    leader.wait(5)
    wait_for(lambda: standby.metric(LEADER) == 1, 3 * TTL + 5, 0.1)
    took = time.monotonic() - t0
    assert took < 3 * TTL + 2, f"takeover took {took:.1f} s"
    print(f"takeover {took:.2f} s after SIGKILL (TTL {TTL:.0f} s)")
    standby.wait_ready(20)  # its first full pass (own empty ledger) adopts, never duplicates
    assert len(stack.creds()) == len(names)
    for i in range(6, 8):
        names.append(f"ha-{i}")
        stack.put(names[-1], 1, PROJECTS[i % 3])
    stack.put("ha-3", 2)
    wait_for(lambda: stack.settled(standby, names) and len(stack.creds()) == len(names), 10)
    stack.assert_registered_once(names, standby.rows())

    # The old leader comes back: it sees the live lease and stays standby.
    leader.start()
    wait_for(lambda: leader.code("/healthz") == 200, 20)
    # Not a fixed wait: the returning replica has read the live lease (it names its holder), and
    # the holder has since renewed it twice (a lease version is one renewal), so the returner has
    # had its turns at the lease while it was live and must have stayed standby.
    wait_for(lambda: leader.status()["daemon"]["leader_address"] == standby.base, 20)
    renewed_from = lease_version(stack)
    wait_for(lambda: lease_version(stack) >= renewed_from + 2, 4 * TTL, 0.1)
    assert roles(standby, leader) == [1.0, 0.0]
    assert leader.code("/readyz") == 200 and leader.status()["daemon"]["leader"] is False
    stack.check_exposure(standby, leader)
