"""Issue 11, the Vault side and the one-writer half, against a real OpenBao and the double.

Scenario 3: a 404 that is not Vault's own answer is not "gone". Scenario 2: the key has an
identity. Scenario 5: two processes on one configuration. Scenario 4: a leader that lost its
lease stops writing. Scenario 7: the lease is not trusted blindly.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hvac.exceptions
import pytest

from bridge.errors import VaultAmbiguous
from bridge.metrics import Metrics
from bridge.vault.source import VaultSource
from cybedefend_double.simulator import Fault
from tests.chaos.rig import ChaosRig
from tests.chaos.vault_proxy import BareNotFoundProxy
from tests.support.openbao import OpenBao

pytestmark = pytest.mark.integration


def _deletes(rig: ChaosRig) -> list[str]:
    return [r.path for r in rig.sim.requests if r.endpoint == "delete"]


def _ours(rig: ChaosRig) -> set[str]:
    return {c.id for c in rig.creds() if c.id not in rig.foreign}


# --- scenario 3: a bare 404 -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("where", "body", "content_type"),
    [
        ("listing", b"", None),  # no body at all
        ("listing", b"404 page not found\n", "text/plain; charset=utf-8"),  # a Go proxy's text
        ("metadata", b"<html><body><h1>404 Not Found</h1></body></html>", "text/html"),  # an ingress page
        ("metadata", b"", None),
    ],
)
def test_a_bare_404_is_not_gone_nothing_is_deleted_and_sync_exits_non_zero(
    make_rig: Callable[..., ChaosRig], bao: OpenBao, where: str, body: bytes, content_type: str | None
) -> None:
    with BareNotFoundProxy(bao.addr) as proxy:
        rig = make_rig(policy="delete", vault={"address": proxy.url})
        for i, name in enumerate(("alpha", "beta", "gamma")):
            rig.put(name, i)
        assert rig.sync_once() == 0
        before = _ours(rig)
        assert len(before) == 3
        deletes_before = len(_deletes(rig))

        proxy.body, proxy.content_type = body, content_type
        if where == "listing":  # SCAN (OpenBao) and the LIST fallback of the source's folder
            proxy.bare_404(f"/v1/{rig.mount}/metadata/dockerhub/", ("SCAN", "LIST", "GET"))
        else:  # one secret's metadata read: a partial blip
            proxy.bare_404(f"/v1/{rig.mount}/metadata/dockerhub/beta")
        code, out, err = rig.cli("sync", "--once", "-o", "json")
        assert proxy.hits, "the proxy never answered a bare 404: the test proves nothing"
        assert code == 1, f"a pass that could not tell absence from a proxy's 404 must fail: {out} {err[-800:]}"
        report = json.loads(out)
        assert report["result"] != "ok"
        assert "no Vault error document" in (report["error"] or "") + err
        assert len(_deletes(rig)) == deletes_before, "a credential was deleted on a bare 404"
        assert _ours(rig) == before
        rig.assert_invariant("after the bare 404 pass")


def test_targeted_describe_raises_on_a_bare_404_and_returns_none_on_vaults_own(
    make_rig: Callable[..., ChaosRig], bao: OpenBao
) -> None:
    with BareNotFoundProxy(bao.addr) as proxy:
        rig = make_rig(policy="delete", vault={"address": proxy.url})
        rig.put("alpha", 1)
        proxy.bare_404(f"/v1/{rig.mount}/metadata/dockerhub/alpha")
        source = VaultSource(rig.settings, Metrics())
        try:
            src = rig.settings.sources[0]
            with pytest.raises(VaultAmbiguous) as info:
                source.describe(src, 0, "dockerhub/alpha")
            assert f"{rig.mount}/metadata/dockerhub/alpha" in str(info.value)
            assert "no Vault error document" in str(info.value)
            assert info.value.retryable
            # Vault's own 404 ({"errors": []}) for a secret that really does not exist: absent.
            assert source.describe(src, 0, "dockerhub/never-written") is None
        finally:
            source.close()


# --- scenario 2: the key has an identity ---------------------------------------------------------


def _default_state(rig: ChaosRig) -> str:
    """Give the rig the product's default state location (secret/cybedefend-bridge/<instance>),
    with an instance of its own so that tests sharing the OpenBao do not share a key."""
    rig.raw["ledger"].pop("state_mount", None)
    instance = f"t{secrets.token_hex(6)}"
    rig.raw["sync"]["instance"] = instance
    return instance


def _key_doc(rig: ChaosRig, mount: str, path: str) -> dict[str, Any] | None:
    try:
        doc = rig.client().secrets.kv.v2.read_secret_version(path=f"{path}/fingerprint-key", mount_point=mount,
                                                             raise_on_deleted_version=True)
    except hvac.exceptions.InvalidPath:
        return None
    return dict(doc["data"])


def _key_ids(stderr: str) -> list[str]:
    return re.findall(r'"key_id": "([0-9a-f]+)"', stderr)


def _creates(rig: ChaosRig) -> int:
    """Credentials the bridge created (the rig's hand-made ones are not counted)."""
    return sum(1 for r in rig.sim.requests if r.endpoint == "create" and r.status == 201) - len(rig.foreign)


def test_adding_a_source_in_front_keeps_the_key_and_registers_nothing_twice(make_rig: Callable[..., ChaosRig],
                                                                            bao: OpenBao) -> None:
    rig = make_rig(policy="delete")
    instance = _default_state(rig)
    for i, name in enumerate(("alpha", "beta", "gamma")):
        rig.put(name, i)
    code, _, err1 = rig.cli("sync", "--once", "-o", "json")
    assert code == 0, err1[-800:]
    doc = _key_doc(rig, "secret", f"cybedefend-bridge/{instance}")
    assert doc is not None, "the key is not at the fixed default location"
    key = base64.b64decode(doc["data"]["key"])
    rig.extra_secrets += [doc["data"]["key"], key.hex()]
    key_id = hmac.new(key, b"key-id", hashlib.sha256).hexdigest()[:8]
    assert _key_ids(err1) == [key_id], "the short key id is not logged at start"
    created = _creates(rig)
    assert created == 3

    # A source added in front, and the ledger lost (the chart's emptyDir, pod restarted).
    front = f"front-{secrets.token_hex(3)}"
    bao.enable_kv(front, 2)
    try:
        rig.raw["sources"].insert(0, {"mount": front, "path": "team"})
        rig.ledger_path.unlink()
        code, _, err2 = rig.cli("sync", "--once", "-o", "json")
        assert code == 0, err2[-800:]
        assert _key_ids(err2) == [key_id], "a different key after adding a source"
        assert _creates(rig) == created, "tokens were registered a second time"
        assert _key_doc(rig, front, f"cybedefend-bridge/{instance}") is None
        rig.assert_invariant("after adding a source in front")
    finally:
        rig.raw["sources"].pop(0)
        bao.disable_mount(front)


def test_a_key_at_the_old_default_location_is_used_from_there_with_a_warning(make_rig: Callable[..., ChaosRig]) -> None:
    rig = make_rig(policy="delete")
    instance = _default_state(rig)
    rig.raw["ledger"]["state_mount"] = rig.mount  # an installation made when the key lived in the source's mount
    for i, name in enumerate(("alpha", "beta")):
        rig.put(name, i)
    code, _, err1 = rig.cli("sync", "--once")
    assert code == 0, err1[-800:]
    old = _key_doc(rig, rig.mount, f"cybedefend-bridge/{instance}")
    assert old is not None
    rig.extra_secrets.append(old["data"]["key"])
    rig.raw["ledger"].pop("state_mount")  # upgraded: the default is now the fixed one
    rig.ledger_path.unlink()
    code, _, err2 = rig.cli("sync", "--once")
    assert code == 0, err2[-800:]
    assert "state_at_old_location" in err2 and "ledger.state_mount" in err2
    assert _key_ids(err2) == _key_ids(err1)
    assert _creates(rig) == 2, "the old key was not used: tokens registered twice"
    assert _key_doc(rig, "secret", f"cybedefend-bridge/{instance}") is None, "a new key was minted at the default"
    rig.raw["ledger"]["state_mount"] = rig.mount  # where the rig's invariant finds the key
    rig.assert_invariant("after the upgrade")


def test_no_key_is_minted_while_credentials_with_our_markers_exist(make_rig: Callable[..., ChaosRig]) -> None:
    rig = make_rig(policy="delete")
    instance = _default_state(rig)
    rig.put("alpha", 1)
    assert rig.cli("sync", "--once")[0] == 0
    doc = _key_doc(rig, "secret", f"cybedefend-bridge/{instance}")
    assert doc is not None
    rig.extra_secrets.append(doc["data"]["key"])
    # The key is gone for good (metadata and all versions): a new one must not be minted.
    rig.client().secrets.kv.v2.delete_metadata_and_all_versions(path=f"cybedefend-bridge/{instance}/fingerprint-key",
                                                                mount_point="secret")
    rig.ledger_path.unlink()
    code, out, err = rig.cli("sync", "--once")
    assert code == 1, out + err[-800:]
    assert "carry instance" in err and "ledger.state_mount" in err and "undelete" in err
    assert _key_doc(rig, "secret", f"cybedefend-bridge/{instance}") is None, "a key was minted"
    assert _creates(rig) == 1
    rig.assert_no_leak("refused to mint")


@pytest.mark.parametrize("how", ["deleted", "destroyed"])
def test_a_deleted_or_destroyed_key_version_is_never_overwritten(make_rig: Callable[..., ChaosRig], how: str) -> None:
    rig = make_rig(policy="delete")
    instance = _default_state(rig)
    rig.put("alpha", 1)
    assert rig.cli("sync", "--once")[0] == 0
    path = f"cybedefend-bridge/{instance}/fingerprint-key"
    doc = _key_doc(rig, "secret", f"cybedefend-bridge/{instance}")
    assert doc is not None
    rig.extra_secrets.append(doc["data"]["key"])
    kv = rig.client().secrets.kv.v2
    if how == "deleted":
        kv.delete_latest_version_of_secret(path=path, mount_point="secret")
    else:
        kv.destroy_secret_versions(path=path, versions=[1], mount_point="secret")
    code, out, err = rig.cli("sync", "--once")
    assert code == 1, out + err[-800:]
    assert f"version 1 {how}" in err
    assert ("bao kv undelete" if how == "deleted" else "bao kv rollback") in err
    meta = kv.read_secret_metadata(path=path, mount_point="secret")["data"]
    assert meta["current_version"] == 1, "the key's deleted version was overwritten by a new key"
    assert _creates(rig) == 1
    if how == "deleted":  # restored as the error says: the bridge carries on with the same key
        kv.undelete_secret_versions(path=path, versions=[1], mount_point="secret")
        code, _, err = rig.cli("sync", "--once")
        assert code == 0, err[-800:]
        assert _creates(rig) == 1
    rig.assert_no_leak(how)


def test_a_state_path_inside_a_source_prefix_is_a_configuration_error(make_rig: Callable[..., ChaosRig]) -> None:
    rig = make_rig(policy="delete")
    rig.raw["ledger"].update({"state_mount": rig.mount, "state_path": "dockerhub/bridge-state"})
    code, out, err = rig.cli("sync", "--once")
    assert code == 2, out + err
    assert "ledger.state_path" in err and "inside sources[0]" in err


# --- scenario 5: two processes on one configuration ---------------------------------------------


def test_two_sync_once_at_once_register_every_new_token_exactly_once(make_rig: Callable[..., ChaosRig]) -> None:
    rig = make_rig(policy="delete")
    for i in range(8):
        rig.put(f"s{i}", i)
    # Slow creates, so that the two passes overlap for seconds rather than milliseconds.
    rig.sim.inject("create", Fault.delay(0.3), times=100)
    first = rig.spawn("sync", "--once", "--wait", "60", "-o", "json")
    second = rig.spawn("sync", "--once", "--wait", "60", "-o", "json")
    assert first.wait(120) == 0, first.stderr[-800:]
    assert second.wait(120) == 0, second.stderr[-800:]
    assert _creates(rig) == 8, f"{_creates(rig)} creates for 8 new tokens"
    rig.assert_invariant("two sync --once at once")


def test_a_second_sync_once_without_wait_exits_1_naming_the_holder(make_rig: Callable[..., ChaosRig]) -> None:
    rig = make_rig(policy="delete")
    for i in range(4):
        rig.put(f"s{i}", i)
    rig.sim.inject("create", Fault.delay(4.0), times=100)  # the first pass writes for ~16 s
    first = rig.spawn("sync", "--once")
    lock = Path(f"{rig.ledger_path}.lock")
    _wait_for(lambda: lock.exists() and "sync --once" in lock.read_text(), 30, "the first sync to take the lock")
    code, out, err = rig.cli("sync", "--once")
    assert code == 1, out + err
    assert f"pid {first.proc.pid}" in err and "sync --once" in err and "--wait" in err
    assert first.wait(120) == 0
    assert _creates(rig) == 4
    rig.assert_invariant("second writer refused")


def test_sync_once_beside_a_running_daemon_exits_1_naming_it(make_rig: Callable[..., ChaosRig]) -> None:
    rig = make_rig(policy="delete")
    rig.raw["server"] = {"bind": "127.0.0.1", "port": 0}
    rig.raw["schedule"] = {"interval_seconds": 600, "first_run_max_delay_seconds": 0}
    rig.put("alpha", 1)
    daemon = rig.spawn("run")
    lock = Path(f"{rig.ledger_path}.lock")
    _wait_for(lambda: lock.exists() and '"run"' in lock.read_text(), 60, "the daemon to take the lock")
    code, out, err = rig.cli("sync", "--once", "--wait", "1")
    assert code == 1, out + err
    assert f"pid {daemon.proc.pid}" in err and "(`run`)" in err
    daemon.proc.terminate()
    daemon.wait(30)
    rig.assert_invariant("beside the daemon")


def test_with_ha_sync_once_takes_the_lease_and_a_running_leader_refuses_it(make_rig: Callable[..., ChaosRig]) -> None:
    rig = make_rig(policy="delete")
    rig.raw["ha"] = {"enabled": True, "ttl_seconds": 6}
    rig.raw["server"] = {"bind": "127.0.0.1", "port": 0}
    rig.raw["schedule"] = {"interval_seconds": 600, "first_run_max_delay_seconds": 0}
    rig.put("alpha", 1)
    # Alone, sync --once takes the lease and gives it back.
    code, _, err = rig.cli("sync", "--once")
    assert code == 0, err[-800:]
    assert "lease_acquired" in err and "lease_released" in err
    daemon = rig.spawn("run")
    state = rig.settings

    def holder() -> str:
        try:
            doc = rig.client().secrets.kv.v2.read_secret_version(path=f"{state.state_path}/leader",
                                                                 mount_point=state.state_mount, raise_on_deleted_version=True)
        except hvac.exceptions.InvalidPath:
            return ""
        return str(doc["data"]["data"].get("holder") or "")

    _wait_for(lambda: holder() != "" and "-sync-" not in holder(), 60, "the daemon to lead")
    leader = holder()
    code, out, err = rig.cli("sync", "--once", "--wait", "1")
    assert code == 1, out + err
    assert f"held by replica {leader}" in err
    daemon.proc.terminate()
    assert daemon.wait(30) == 0
    rig.put("beta", 2)
    code, _, err = rig.cli("sync", "--once", "--wait", "20")  # released at shutdown: taken at once
    assert code == 0, err[-800:]
    rig.assert_invariant("after the daemon left")


def _wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


# --- scenario 4: a leader that lost its lease stops writing --------------------------------------


def test_a_leader_whose_lease_expires_during_a_retry_after_wait_never_posts_after_its_deadline(
    make_rig: Callable[..., ChaosRig],
) -> None:
    from bridge.cybedefend.client import CybeDefendClient
    from bridge.daemon.ha import Lease
    from bridge.errors import LeaseLost
    from bridge.model import Sensitive
    from tests.chaos.rig import PAT
    from tests.support.data import ORG, PROJECTS

    rig = make_rig(policy="delete")
    rig.raw["ha"] = {"enabled": True, "ttl_seconds": 3}
    rig.raw["cybedefend"]["retry"] = {"base_seconds": 0.01, "cap_seconds": 5, "max_attempts": 5}
    settings = rig.settings
    vault = VaultSource(settings, Metrics())
    client = None
    try:
        lease = Lease(vault, settings.ha, identity="old-leader", address=None)
        assert lease.acquire_or_renew()  # and never renewed again: the lease runs out in 3 s
        wall_deadline = time.time() + (lease._deadline - time.monotonic())
        seen = len(rig.sim.requests)  # the rig's hand-made credentials were created before
        rig.sim.inject("create", Fault.status(429, retry_after="1"), times=10)
        client = CybeDefendClient(settings.cybedefend, Sensitive(PAT), Metrics(), write_guard=lease)
        with pytest.raises(LeaseLost):
            client.create(ORG, PROJECTS[0], "u-x", Sensitive("dckr_pat_" + "a" * 27), "d")
        creates = [r for r in rig.sim.requests[seen:] if r.endpoint == "create"]
        assert creates, "no attempt at all: the test proves nothing"
        assert all(r.at <= wall_deadline for r in creates), "a POST after the lease deadline"
        assert not any(r.status == 201 for r in creates)
    finally:
        if client is not None:
            client.close()
        vault.close()
