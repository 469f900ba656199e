"""Scenario 7, HA: two `cybedefend-bridge run` replicas (ha.enabled) on one OpenBao; the leader
is killed with SIGKILL again and again while it registers and rotates; zero duplicates, ever;
the failover time is measured.

Each replica keeps its own ledger and shares the instance name, the Vault-held fingerprint key
and the lease (TTL 3 s). Passes run every 5 s on the leader; the double is slowed down so that
each kill lands while the leader writes. After each kill, the killed replica is restarted (it
must come back as the standby). At the end the shared invariant must hold with the leader's
ledger, and nothing secret may appear in either replica's output, /metrics or /v1/status.
"""

from __future__ import annotations

import random
import signal
import time
from typing import Any

import pytest

from cybedefend_double.simulator import Fault
from tests.chaos.rig import ChaosRig
from tests.support.daemon import DaemonProc, free_port, wait_for
from tests.support.data import PROJECTS

pytestmark = [pytest.mark.integration, pytest.mark.slow]
TTL = 3.0
KILLS = 4
LEADER = "cybedefend_bridge_leader"
WEBHOOK = "whk_chaos_" + "5" * 32


def replica(rig: ChaosRig, name: str) -> DaemonProc:
    port = free_port()
    raw = {**rig.raw}
    raw["ledger"] = {**rig.raw["ledger"], "path": str(rig.tmp / name / "ledger.sqlite3")}
    raw["ha"] = {"enabled": True, "ttl_seconds": TTL, "advertise_address": f"http://127.0.0.1:{port}"}
    raw["server"] = {"bind": "127.0.0.1", "port": port, "webhook_token_file": str(rig.tmp / "webhook-token")}
    raw["schedule"] = {"interval_seconds": 5, "jitter_fraction": 0, "first_run_max_delay_seconds": 0}
    return DaemonProc(rig.tmp, raw, name)


def leader_of(a: DaemonProc, b: DaemonProc) -> DaemonProc | None:
    roles = []
    for d in (a, b):
        try:
            roles.append(d.metric(LEADER) if d.alive() else 0.0)
        except (OSError, AssertionError):
            roles.append(0.0)
    if roles.count(1.0) > 1:
        raise AssertionError("two replicas claim the lease at once")
    return a if roles[0] == 1.0 else b if roles[1] == 1.0 else None


@pytest.mark.timeout(300)
def test_kill_the_leader_repeatedly_zero_duplicates_failover_measured(make_rig: Any) -> None:
    rig: ChaosRig = make_rig(policy="delete")
    (rig.tmp / "webhook-token").write_text(WEBHOOK)
    rig.extra_secrets.append(WEBHOOK)
    rig.sim.inject("create", Fault.delay(0.03), times=10**6)
    rng = random.Random(7)
    for i in range(120):
        rig.put(f"ha{i:03d}", i, PROJECTS[i % 4])
    a, b = replica(rig, "a").start(), replica(rig, "b").start()
    try:
        leader = wait_for(lambda: leader_of(a, b), 40, 0.1)
        failovers: list[float] = []
        for kill in range(KILLS):
            rig.sim.reset_requests()
            for i in rng.sample(range(120), 30):
                rig.put(f"ha{i:03d}", f"k{kill}-{i}", PROJECTS[i % 4])
            for j in range(5):
                rig.put(f"new{kill}-{j}", f"new{kill}-{j}", PROJECTS[j % 4])
            wait_for(lambda: any(r.endpoint == "create" for r in rig.sim.requests), 30, 0.02)
            standby = b if leader is a else a
            t0 = time.monotonic()
            leader.signal(signal.SIGKILL)
            leader.wait(10)
            new = wait_for(lambda: leader_of(a, b), 4 * TTL + 10, 0.05)
            failovers.append(time.monotonic() - t0)
            assert new is standby, f"kill {kill}: the lease went to a dead replica"
            rig.assert_no_duplicates(f"HA kill {kill}")
            leader.start()  # the killed replica comes back, as the standby
            leader = new
        wait_for(lambda: leader_of(a, b) is leader and not (b if leader is a else a).metric(LEADER), 20, 0.1)

        def settled() -> bool:
            try:
                rig.raw["ledger"]["path"] = leader.raw["ledger"]["path"]
                rig.assert_invariant("HA, settled")
                return True
            except AssertionError:
                return False

        wait_for(settled, 40, 0.5)
        texts = [d.metrics_text() for d in (a, b)] + [str(d.status()) for d in (a, b)]
        texts += [d.stdout() + d.stderr() for d in (a, b)]
        print(f"\nHA: {KILLS} leader kills; failover after SIGKILL {', '.join(f'{f:.2f}' for f in failovers)} s "
              f"(max {max(failovers):.2f} s, TTL {TTL:.0f} s)")
        assert max(failovers) < 3 * TTL + 2, f"failover took {max(failovers):.1f} s"
        rig.assert_invariant("HA", texts=texts)
    finally:
        a.close()
        b.close()
