"""Fixtures of the chaos suite: one durable OpenBao (file storage, so it can be stopped,
sealed and restarted) for the whole run, a fresh KV v2 mount per test, the CybeDefend double
with its organization, projects and PAT, and a factory of `ChaosRig`s.

A test that stops or seals the shared server must bring it back (the `bao_guard` fixture
checks that it is up and unsealed after every test, and repairs it if not).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cybedefend_double.simulator import Simulator
from tests.chaos.rig import PAT, ChaosRig
from tests.support.data import ORG2, seeded_simulator
from tests.support.openbao import OpenBao

# No `pytestmark` here: in a conftest it marks nothing. Each chaos module that starts OpenBao is
# marked `integration` itself, and tests/conftest.py refuses a test that uses `chaos_bao` unmarked.


@pytest.fixture(scope="session")
def chaos_bao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenBao]:
    """OpenBao with durable (raft) storage, initialised once with one unseal key."""
    server = OpenBao("file", workdir=tmp_path_factory.mktemp("chaos-bao"))
    server.start(timeout=60)
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def bao(chaos_bao: OpenBao) -> Iterator[OpenBao]:
    yield chaos_bao
    # Repair whatever a scenario left behind, so one failure does not cascade.
    if not chaos_bao.running:
        chaos_bao.start(timeout=60)
    if chaos_bao._health() == 503:
        chaos_bao.unseal()


@pytest.fixture
def mount(bao: OpenBao) -> Iterator[str]:
    name = f"chaos-{secrets.token_hex(4)}"
    bao.enable_kv(name, 2)
    yield name
    if bao.running:
        bao.disable_mount(name)


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with seeded_simulator(PAT, extra_orgs=[ORG2]) as s:
        yield s


@pytest.fixture
def make_rig(bao: OpenBao, mount: str, sim: Simulator, tmp_path: Path) -> Iterator[Callable[..., ChaosRig]]:
    """`make_rig(policy=..., **config_overrides)`; hand-made credentials are seeded first."""
    made: list[ChaosRig] = []

    def make(**kwargs: Any) -> ChaosRig:
        rig = ChaosRig(bao, mount, sim, tmp_path / f"rig{len(made)}", **kwargs)
        rig.seed_foreign()
        made.append(rig)
        return rig

    yield make
    for rig in made:
        for run in rig.runs:
            if run.proc.poll() is None:
                run.kill9()
        rig.close()


@pytest.fixture
def rig(make_rig: Callable[..., ChaosRig]) -> ChaosRig:
    return make_rig()
