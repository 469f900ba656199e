"""Scenario 1, crash anywhere: `kill -9` a `cybedefend-bridge sync --once` at random moments
while it registers and rotates 200 secrets, restart it, twenty times with different seeds.

Each round changes Vault (rotations, moves, untags, deletions, new secrets), starts the bridge
as a real subprocess and kills it with SIGKILL at a moment drawn from the round's seeded
random source: after a random delay (which may land in start-up, Vault login, discovery or
execution), or right after the k-th create or k-th delete reached the double (mid-registration,
mid-rotation). The double is slowed down (Fault.delay on create and delete) so that a pass lasts
seconds and kills land inside it. Between rounds no marker revision may be held twice; after
the last round one clean pass must converge to the invariant and the next pass must be quiet.

The base seed comes from CHAOS_SEED (default below); every assertion message names the seed.
"""

from __future__ import annotations

import os
import random
import time
from typing import Any

import pytest

from cybedefend_double.simulator import Fault
from tests.chaos.rig import ChaosRig
from tests.support.data import PROJECTS

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BASE_SEED = int(os.environ.get("CHAOS_SEED", "20261130"))
ROUNDS = 20
SECRETS = 200


def mutate(rig: ChaosRig, rng: random.Random, rnd: int) -> None:
    """One operator's worth of changes between two bridge runs: rotations and new secrets.

    Moves, untags and deletions right after a crashed write are left out on purpose: they
    expose the gap pinned by strict xfails in test_properties.py (a credential created by a killed
    pass is only found again in the project the *current* tags name).
    """
    for name in sorted(rig.secrets):
        if rng.random() < 0.25:
            rig.put(name, f"rot-{rnd}-{rng.random()}", rig.secrets[name].project or PROJECTS[0])
    for j in range(3):
        rig.put(f"new-{rnd:02d}-{j}", f"new-{rnd}-{j}", rng.choice(PROJECTS[:4]))


def kill_at_random(rig: ChaosRig, rng: random.Random, seed: int) -> dict[str, Any]:
    """Start `sync --once` and SIGKILL it at a random moment; report where the kill landed."""
    rig.sim.reset_requests()
    mode = rng.choice(["time", "time", "create", "delete"])
    k = rng.randint(1, 40) if mode == "create" else rng.randint(1, 8)
    delay = rng.uniform(0.05, 4.0)
    run = rig.spawn("sync", "--once")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and run.returncode is None:
        if mode == "time" and time.monotonic() - run.started >= delay:
            break
        if mode != "time" and sum(1 for r in rig.sim.requests if r.endpoint == mode) >= k:
            break
        time.sleep(0.005)
    crashed = run.kill9()
    writes = sum(1 for r in rig.sim.requests if r.endpoint in ("create", "delete"))
    assert run.returncode is not None, f"seed={seed}: the bridge survived SIGKILL"
    if not crashed:
        assert run.returncode in (0, 1), f"seed={seed}: sync --once exited {run.returncode}: {run.stderr[-1500:]}"
    return {"seed": seed, "mode": mode, "crashed": crashed, "mid_pass": crashed and writes > 0}


@pytest.mark.timeout(480)
def test_kill_9_anywhere_twenty_seeds_then_converge(make_rig: Any) -> None:
    rig: ChaosRig = make_rig(policy="delete")
    rig.sim.inject("create", Fault.delay(0.05), times=10**6)
    rig.sim.inject("delete", Fault.delay(0.03), times=10**6)
    for i in range(SECRETS):
        rig.put(f"s{i:03d}", i, PROJECTS[i % 4])
    results = []
    for rnd in range(ROUNDS):
        seed = BASE_SEED + rnd
        rng = random.Random(seed)
        if rnd:
            mutate(rig, rng, rnd)
        results.append(kill_at_random(rig, rng, seed))
        rig.assert_no_duplicates(f"seed={seed} after kill ({results[-1]['mode']})")
    mid = sum(1 for r in results if r["mid_pass"])
    crashed = sum(1 for r in results if r["crashed"])
    print(f"\ncrash rounds: {crashed}/{ROUNDS} killed while running, {mid} of them mid-write; base seed {BASE_SEED}")
    assert mid >= ROUNDS // 2, f"base seed {BASE_SEED}: only {mid} kills landed mid-pass: {results}"

    rig.sim.clear_faults()
    assert rig.sync_once() == 0, f"base seed {BASE_SEED}: the clean pass after the crashes did not succeed"
    rig.sim.reset_requests()
    assert rig.sync_once() == 0
    writes = [r for r in rig.sim.requests if r.endpoint in ("create", "delete", "set_links")]
    assert writes == [], f"base seed {BASE_SEED}: the pass after convergence still wrote {len(writes)} times"
    rig.assert_invariant(f"base seed {BASE_SEED}", cli_outputs=True)


@pytest.mark.timeout(240)
def test_kill_9_during_a_cold_registration_loses_only_rows_then_adopts_them(make_rig: Any) -> None:
    """Group commit (ADR 11): SIGKILL a first pass over 80 new secrets after 40 creates reached
    the double. The file it leaves has fewer `registered` rows than credentials created (rows
    staged or in flight died with it; their `pending` rows were committed before the POSTs).
    The restarted bridge creates only what was never created and adopts the rest by marker:
    exactly one credential per secret, nothing duplicated."""
    import sqlite3

    rig: ChaosRig = make_rig(policy="delete")
    rig.sim.inject("create", Fault.delay(0.02), times=10**6)
    n = 80
    for i in range(n):
        rig.put(f"c{i:03d}", f"cold-{i}", PROJECTS[i % 4])
    foreign = len(rig.creds())
    rig.sim.reset_requests()
    run = rig.spawn("sync", "--once")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and run.returncode is None:
        if sum(1 for r in rig.sim.requests if r.endpoint == "create") >= 40:
            break
        time.sleep(0.002)
    assert run.kill9(), f"the pass ended before the kill: {run.stderr[-1000:]}"
    # Creates in flight at the kill are still carried out by the double (its delay, then the
    # create): count once none has landed for a while, or the restart's adoption of a late one
    # looks like a missing create.
    created, settled_at = len(rig.creds()) - foreign, time.monotonic()
    while time.monotonic() - settled_at < 0.3:
        time.sleep(0.02)
        now_created = len(rig.creds()) - foreign
        if now_created != created:
            created, settled_at = now_created, time.monotonic()
    assert 40 <= created < n, created
    db = sqlite3.connect(f"file:{rig.ledger_path}?mode=ro", uri=True)
    try:
        states = dict(db.execute("SELECT state, COUNT(*) FROM secrets GROUP BY state").fetchall())
    finally:
        db.close()
    registered = states.get("registered", 0)
    # Every secret whose create was sent has a committed row; some of those rows still say pending.
    assert created <= registered + states.get("pending", 0), (states, created)
    # More rows lost than creates can be in flight: rows of answered creates were staged, not
    # yet committed, when the process died (a batch, not just the secret in flight).
    assert created - registered > rig.settings.cybedefend.max_concurrency, (states, created)
    print(f"\ncold kill: {created} credentials created, {registered} registered rows on disk, "
          f"{created - registered} rows lost with the process")
    rig.sim.clear_faults()
    rig.sim.reset_requests()
    assert rig.sync_once() == 0
    creates = sum(1 for r in rig.sim.requests if r.endpoint == "create")
    assert creates == n - created, f"the restart created {creates}, {n - created} were missing"
    rig.assert_no_duplicates("after the cold kill")
    rig.sim.reset_requests()
    assert rig.sync_once() == 0
    assert [r for r in rig.sim.requests if r.endpoint in ("create", "delete", "set_links")] == []
    rig.assert_invariant("cold kill with rows uncommitted", cli_outputs=True)
