"""The `SecretSource` contract, run against the fake and against the real adapter on OpenBao.

`FakeSecretSource` stands in for Vault in the engine's scenario tests (tests/test_sync.py and
others); it is only worth that if it answers as `bridge.vault.source.VaultSource` does on a real
OpenBao. Every test here runs twice, once per side (tests/support/vault_side.py); the `openbao`
runs are marked `integration`. What is compared is what the engine relies on: which secrets a
discovery returns, their versions, tags, deleted flag and stamp, what a value read returns, and
the `read` / `metadata` request counts (the transport-level kinds, such as `scan` or `mounts`,
belong to the real adapter and are tested in tests/test_vault.py).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bridge.config import Settings
from bridge.model import SecretRef, VaultEntry
from bridge.ports import SecretSource
from tests.support.config import raw_config, settings
from tests.support.data import PROJECTS, tagged
from tests.support.openbao import OpenBao
from tests.support.vault_side import FakeVault, OpenBaoVault, VaultSide

TAGS = tagged(PROJECTS[0])
SIDES = [pytest.param("fake", id="fake"), pytest.param("openbao", id="openbao", marks=pytest.mark.integration)]


def _side(kind: str, kv: int, request: pytest.FixtureRequest) -> Iterator[VaultSide]:
    side: VaultSide
    if kind == "fake":
        side = FakeVault(kv=kv)
    else:
        bao: OpenBao = request.getfixturevalue("openbao")
        side = OpenBaoVault(bao, kv)
    try:
        yield side
    finally:
        side.close()


@pytest.fixture(params=SIDES)
def kv2(request: pytest.FixtureRequest) -> Iterator[VaultSide]:
    yield from _side(request.param, 2, request)


@pytest.fixture(params=SIDES)
def kv1(request: pytest.FixtureRequest) -> Iterator[VaultSide]:
    yield from _side(request.param, 1, request)


def _settings(side: VaultSide) -> Settings:
    raw = raw_config(vault_addr=side.address, mount=side.mount)
    return settings(vault=raw["vault"], sources=raw["sources"])


def _open(side: VaultSide) -> tuple[SecretSource, Settings]:
    s = _settings(side)
    source = side.attach(s)
    source.request_counts()  # whatever attaching cost (a login, a mount lookup) is not the contract's
    return source, s


def _discover(source: SecretSource, s: Settings, index: int = 0) -> dict[str, VaultEntry]:
    return {e.ref.path: e for e in source.discover(s.sources[0], index)}


def test_discovery_lists_the_source_recursively_and_nothing_else(kv2: VaultSide) -> None:
    kv2.put("dockerhub/a", {"accessToken": "t-a"}, TAGS)
    kv2.put("dockerhub/team/deep/b", {"accessToken": "t-b"}, TAGS)
    kv2.put("dockerhub/untagged", {"accessToken": "t-c"})
    kv2.put("elsewhere/x", {"accessToken": "t-x"}, TAGS)
    kv2.put("dockerhubby/y", {"accessToken": "t-y"}, TAGS)  # shares the prefix's letters, not its folder
    source, s = _open(kv2)
    entries = _discover(source, s, index=3)
    assert set(entries) == {"dockerhub/a", "dockerhub/team/deep/b", "dockerhub/untagged"}
    a = entries["dockerhub/a"]
    assert (a.ref, a.version, dict(a.tags), a.deleted, a.payload, a.source_index) == (
        SecretRef(kv2.mount, "dockerhub/a", 2), 1, TAGS, False, None, 3)
    assert dict(entries["dockerhub/untagged"].tags) == {}


def test_discovery_reads_metadata_only_one_request_per_secret_and_counts_reset(kv2: VaultSide) -> None:
    for i in range(4):
        kv2.put(f"dockerhub/s{i}", {"accessToken": f"t-{i}"}, TAGS)
    source, s = _open(kv2)
    assert len(_discover(source, s)) == 4
    counts = source.request_counts()
    assert counts.get("metadata") == 4 and "read" not in counts
    assert source.request_counts() == {}  # the counts reset on reading them


def test_versions_stamps_and_a_tags_only_change(kv2: VaultSide) -> None:
    kv2.put("dockerhub/a", {"accessToken": "first"}, TAGS)
    source, s = _open(kv2)
    first = _discover(source, s)["dockerhub/a"]
    kv2.put("dockerhub/a", {"accessToken": "second"})
    second = _discover(source, s)["dockerhub/a"]
    assert (first.version, second.version) == (1, 2)
    assert dict(second.tags) == TAGS  # a data write keeps the tags
    assert isinstance(first.stamp, str) and isinstance(second.stamp, str) and first.stamp != second.stamp
    kv2.set_tags("dockerhub/a", {**TAGS, "owner": "ops"})
    third = _discover(source, s)["dockerhub/a"]
    assert third.version == 2 and third.stamp == second.stamp and third.tags["owner"] == "ops"


def test_a_deleted_latest_version_is_listed_as_deleted_and_a_removed_secret_is_gone(kv2: VaultSide) -> None:
    kv2.put("dockerhub/soft", {"accessToken": "v1"}, TAGS)
    kv2.put("dockerhub/soft", {"accessToken": "v2"})
    kv2.delete_current("dockerhub/soft")
    kv2.put("dockerhub/hard", {"accessToken": "x"}, TAGS)
    kv2.delete_all("dockerhub/hard")
    source, s = _open(kv2)
    entries = _discover(source, s)
    assert set(entries) == {"dockerhub/soft"}
    assert (entries["dockerhub/soft"].version, entries["dockerhub/soft"].deleted) == (2, True)
    assert source.describe(s.sources[0], 0, "dockerhub/hard") is None


def test_describe_one_secret_inside_the_source_only(kv2: VaultSide) -> None:
    kv2.put("dockerhub/a", {"accessToken": "one"}, TAGS)
    kv2.put("dockerhub/a", {"accessToken": "two"})
    kv2.put("elsewhere/a", {"accessToken": "x"}, TAGS)
    source, s = _open(kv2)
    entry = source.describe(s.sources[0], 5, "dockerhub/a")
    assert entry is not None and (entry.version, dict(entry.tags), entry.source_index, entry.payload) == (2, TAGS, 5, None)
    assert source.describe(s.sources[0], 0, "dockerhub/missing") is None
    assert source.describe(s.sources[0], 0, "elsewhere/a") is None
    assert source.request_counts().get("metadata") == 2  # the one outside the source costs nothing


def test_read_value_by_version_latest_and_gone(kv2: VaultSide) -> None:
    kv2.put("dockerhub/a", {"accessToken": "one", "dockerhubUsername": "u"}, TAGS)
    kv2.put("dockerhub/a", {"accessToken": "two", "dockerhubUsername": "u"})
    kv2.put("dockerhub/b", {"accessToken": "b1"}, TAGS)
    kv2.put("dockerhub/b", {"accessToken": "b2"})
    kv2.delete_current("dockerhub/b")
    source, _ = _open(kv2)
    ref = SecretRef(kv2.mount, "dockerhub/a", 2)
    assert dict(source.read_value(ref, 1)) == {"accessToken": "one", "dockerhubUsername": "u"}
    assert dict(source.read_value(ref, 2))["accessToken"] == "two"
    assert dict(source.read_value(ref, None))["accessToken"] == "two"
    assert source.request_counts().get("read") == 3
    assert dict(source.read_value(SecretRef(kv2.mount, "dockerhub/b", 2), 2)) == {}  # deleted: no data
    assert dict(source.read_value(SecretRef(kv2.mount, "dockerhub/b", 2), 1)) == {"accessToken": "b1"}
    assert dict(source.read_value(SecretRef(kv2.mount, "dockerhub/none", 2), 1)) == {}


def test_kv1_discovery_reads_the_data_and_tags_are_its_values_as_text(kv1: VaultSide) -> None:
    kv1.put("dockerhub/a", {"accessToken": "kv1-token", **TAGS})
    kv1.put("dockerhub/x/b", {"accessToken": "t2", "n": 5})
    kv1.put("elsewhere/c", {"accessToken": "t3"})
    source, s = _open(kv1)
    entries = _discover(source, s)
    assert set(entries) == {"dockerhub/a", "dockerhub/x/b"}
    a = entries["dockerhub/a"]
    assert a.ref.kv_version == 1 and a.version is None and not a.deleted
    assert dict(a.payload or {}) == {"accessToken": "kv1-token", **TAGS}
    assert a.tags["cybedefend-project-id"] == TAGS["cybedefend-project-id"]
    assert entries["dockerhub/x/b"].tags["n"] == "5"
    counts = source.request_counts()
    assert counts.get("read") == 2 and "metadata" not in counts  # KV v1 has no metadata: data is read
    assert dict(source.read_value(a.ref, None)) == {"accessToken": "kv1-token", **TAGS}
    kv1.put("dockerhub/a", {"accessToken": "kv1-rotated", **TAGS})
    assert dict(source.read_value(a.ref, None))["accessToken"] == "kv1-rotated"
    kv1.delete_all("dockerhub/a")
    assert source.describe(s.sources[0], 0, "dockerhub/a") is None
