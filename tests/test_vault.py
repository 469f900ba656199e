"""The Vault adapter against a real OpenBao server (mocks only for the error-translation units)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import hvac.exceptions
import pytest
import requests

from bridge.config import Settings, parse_settings
from bridge.errors import (
    CasConflict,
    VaultAuthError,
    VaultInvalidRequest,
    VaultPermissionDenied,
    VaultUnavailable,
)
from bridge.metrics import Metrics
from bridge.model import SecretRef
from bridge.vault.source import VaultSource
from bridge.vault.transport import error_for_status, translate
from tests.support.data import assert_no_leak
from tests.support.openbao import OpenBao

pytestmark = pytest.mark.timeout(60)
POLICY = Path(__file__).resolve().parent.parent / "config" / "vault-policy.hcl"
TAG = {"cybedefend-project-id": "6f1c0a52-8a4f-4d9e-9a43-0a8c5a8b1a11"}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def settings(addr: str, mount: str = "secret", path: str = "dockerhub", **vault: Any) -> Settings:
    raw: dict[str, Any] = {
        "vault": {"address": addr, **vault},
        "sources": [{"mount": mount, "path": path}],
        "cybedefend": {"auth": {"credential_file": "/dev/null"}},
        "ledger": {"state_mount": mount},
    }
    return parse_settings(raw, env={})


def source(bao: OpenBao, mount: str, token: str | None = None, path: str = "dockerhub", **kw: Any) -> VaultSource:
    clock = kw.pop("clock", None)
    extra = {"clock": clock, "sleep": clock.sleep} if clock else {}
    s = settings(bao.addr, mount, path, **kw)
    return VaultSource(s, Metrics(), env={"VAULT_TOKEN": token or bao.root_token}, **extra)


def allow_all(bao: OpenBao) -> list[str]:
    """A broad policy for login tests (auth methods cannot issue root tokens)."""
    bao.put_policy("test-all", 'path "*" {\n  capabilities = ["create", "read", "update", "delete", "list", "scan"]\n}\n')
    return ["test-all"]


def metric(vs: VaultSource, name: str, **labels: str) -> float:
    value = vs.session._metrics.registry.get_sample_value(name, labels)
    return value or 0.0


# --- discovery -----------------------------------------------------------------------------


@pytest.mark.integration
def test_discover_kv2_reads_metadata_only(openbao: OpenBao, kv_mount: str) -> None:
    openbao.write_secret(kv_mount, "dockerhub/a", {"accessToken": "dckr_pat_aaaaaaaa"}, TAG)
    openbao.write_secret(kv_mount, "dockerhub/team/deep/b", {"accessToken": "dckr_pat_bbbbbbbb"}, TAG)
    openbao.write_secret(kv_mount, "dockerhub/untagged", {"accessToken": "dckr_pat_cccccccc"})
    openbao.write_secret(kv_mount, "dockerhub/gone", {"accessToken": "v1"}, TAG)
    openbao.write_secret(kv_mount, "dockerhub/gone", {"accessToken": "v2"})
    openbao.client().secrets.kv.v2.delete_latest_version_of_secret(path="dockerhub/gone", mount_point=kv_mount)
    openbao.write_secret(kv_mount, "dockerhub/burnt", {"accessToken": "x"}, TAG)
    openbao.client().secrets.kv.v2.destroy_secret_versions(path="dockerhub/burnt", versions=[1], mount_point=kv_mount)
    openbao.write_secret(kv_mount, "elsewhere/x", {"accessToken": "x"}, TAG)

    vs = source(openbao, kv_mount)
    vs.login()
    vs.request_counts()
    entries = {e.ref.path: e for e in vs.discover(vs._settings.sources[0], 3)}

    assert set(entries) == {"dockerhub/a", "dockerhub/team/deep/b", "dockerhub/untagged", "dockerhub/gone", "dockerhub/burnt"}
    a = entries["dockerhub/a"]
    assert (a.ref, a.version, dict(a.tags), a.deleted, a.payload, a.source_index) == (
        SecretRef(kv_mount, "dockerhub/a", 2),
        1,
        TAG,
        False,
        None,
        3,
    )
    assert entries["dockerhub/untagged"].tags == {}
    assert (entries["dockerhub/gone"].version, entries["dockerhub/gone"].deleted) == (2, True)
    assert entries["dockerhub/burnt"].deleted is True
    assert entries["dockerhub/team/deep/b"].deleted is False
    counts = vs.request_counts()
    # the prefix has a sub-folder: one LIST, then one SCAN for the tree; one metadata GET per
    # secret, one mount lookup, and no value read
    assert counts == {"mounts": 1, "list": 1, "scan": 1, "metadata": 5}
    assert vs.request_counts() == {}
    vs.close()


@pytest.mark.integration
def test_discover_falls_back_to_recursive_list_without_scan(openbao: OpenBao, kv_mount: str) -> None:
    for p in ("dockerhub/a", "dockerhub/t/b", "dockerhub/t/u/c"):
        openbao.write_secret(kv_mount, p, {"accessToken": "x"}, TAG)
    policy = POLICY.read_text().replace('"list", "scan", "read"', '"list", "read"')
    openbao.put_policy("noscan", policy.replace('"secret/', f'"{kv_mount}/').replace("mounts/secret", f"mounts/{kv_mount}"))
    vs = source(openbao, kv_mount, openbao.create_token(["noscan"], no_default_policy=True))
    keys = sorted(e.ref.path for e in vs.discover(vs._settings.sources[0], 0))
    assert keys == ["dockerhub/a", "dockerhub/t/b", "dockerhub/t/u/c"]
    counts = vs.request_counts()
    assert counts["scan"] == 1 and counts["list"] == 3 and counts["metadata"] == 3 and "read" not in counts
    list(vs.discover(vs._settings.sources[0], 0))
    assert "scan" not in vs.request_counts()  # the refusal is remembered for this token
    vs.close()


@pytest.mark.integration
def test_a_flat_folder_is_listed_once_and_never_scanned(openbao: OpenBao, kv_mount: str) -> None:
    # OpenBao's SCAN of one large folder costs it ~10x a LIST of the same keys (ADR 18): a
    # folder without sub-folders is done with its one LIST.
    for p in ("dockerhub/a", "dockerhub/b", "dockerhub/c"):
        openbao.write_secret(kv_mount, p, {"accessToken": "x"}, TAG)
    vs = source(openbao, kv_mount)
    vs.login()
    vs.request_counts()
    assert sorted(e.ref.path for e in vs.discover(vs._settings.sources[0], 0)) == ["dockerhub/a", "dockerhub/b", "dockerhub/c"]
    assert vs.request_counts() == {"mounts": 1, "list": 1, "metadata": 3}
    vs.close()


@pytest.mark.integration
def test_a_policy_with_scan_but_no_list_still_discovers(openbao: OpenBao, kv_mount: str) -> None:
    for p in ("dockerhub/a", "dockerhub/t/b"):
        openbao.write_secret(kv_mount, p, {"accessToken": "x"}, TAG)
    policy = POLICY.read_text().replace('"list", "scan", "read"', '"scan", "read"')
    openbao.put_policy("nolist", policy.replace('"secret/', f'"{kv_mount}/').replace("mounts/secret", f"mounts/{kv_mount}"))
    token = openbao.create_token(["nolist"], no_default_policy=True)
    vs = source(openbao, kv_mount, token)
    assert sorted(e.ref.path for e in vs.discover(vs._settings.sources[0], 0)) == ["dockerhub/a", "dockerhub/t/b"]
    counts = vs.request_counts()
    assert counts["list"] == 1 and counts["scan"] == 1 and counts["metadata"] == 2
    vs.close()


@pytest.mark.integration
def test_a_policy_with_neither_list_nor_scan_names_the_listing(openbao: OpenBao, kv_mount: str) -> None:
    openbao.write_secret(kv_mount, "dockerhub/a", {"accessToken": "x"}, TAG)
    policy = POLICY.read_text().replace('"list", "scan", "read"', '"read"')
    openbao.put_policy("nolisting", policy.replace('"secret/', f'"{kv_mount}/').replace("mounts/secret", f"mounts/{kv_mount}"))
    token = openbao.create_token(["nolisting"], no_default_policy=True)
    vs = source(openbao, kv_mount, token)
    with pytest.raises(VaultPermissionDenied, match=f"list {kv_mount}/metadata/dockerhub/") as info:
        list(vs.discover(vs._settings.sources[0], 0))
    assert token not in str(info.value)
    vs.close()


@pytest.mark.integration
def test_discover_kv1_reads_data(openbao: OpenBao, kv1_mount: str) -> None:
    openbao.write_kv1(kv1_mount, "dockerhub/a", {"accessToken": "dckr_pat_kv1value", **TAG})
    openbao.write_kv1(kv1_mount, "dockerhub/x/b", {"accessToken": "t2", "n": 5})
    vs = source(openbao, kv1_mount)
    entries = {e.ref.path: e for e in vs.discover(vs._settings.sources[0], 0)}
    assert set(entries) == {"dockerhub/a", "dockerhub/x/b"}
    a = entries["dockerhub/a"]
    assert a.ref.kv_version == 1 and a.version is None and a.tags["cybedefend-project-id"] == TAG["cybedefend-project-id"]
    assert a.payload == {"accessToken": "dckr_pat_kv1value", **TAG}
    assert entries["dockerhub/x/b"].tags["n"] == "5"
    counts = vs.request_counts()
    assert counts["read"] == 2 and "metadata" not in counts  # KV v1 has no metadata: data is read
    vs.close()


@pytest.mark.integration
def test_kv1_counts_and_version_cache(openbao: OpenBao, kv1_mount: str) -> None:
    openbao.write_kv1(kv1_mount, "dockerhub/a", {"accessToken": "t"})
    vs = source(openbao, kv1_mount)
    vs.login()
    vs.request_counts()
    list(vs.discover(vs._settings.sources[0], 0))
    list(vs.discover(vs._settings.sources[0], 0))
    assert vs.request_counts() == {"mounts": 1, "list": 2, "read": 2}  # a flat folder: LIST only
    assert vs.kv_version(kv1_mount) == 1
    vs.close()


@pytest.mark.integration
def test_describe_and_read_value(openbao: OpenBao, kv_mount: str) -> None:
    openbao.write_secret(kv_mount, "dockerhub/a", {"accessToken": "first-version-token"}, TAG)
    openbao.write_secret(kv_mount, "dockerhub/a", {"accessToken": "second-version-token"})
    vs = source(openbao, kv_mount)
    src = vs._settings.sources[0]
    entry = vs.describe(src, 0, "dockerhub/a")
    assert entry is not None and entry.version == 2 and dict(entry.tags) == TAG
    assert vs.describe(src, 0, "dockerhub/missing") is None
    assert vs.describe(src, 0, "elsewhere/a") is None
    ref = SecretRef(kv_mount, "dockerhub/a", 2)
    assert vs.read_value(ref, 1) == {"accessToken": "first-version-token"}
    assert vs.read_value(ref, 2) == {"accessToken": "second-version-token"}
    assert vs.read_value(SecretRef(kv_mount, "dockerhub/none", 2), 1) == {}
    vs.close()


@pytest.mark.integration
def test_read_secret_field(openbao: OpenBao, kv_mount: str) -> None:
    openbao.write_secret(kv_mount, "cybedefend", {"pat": "cdpat_0123456789abcdef"})
    vs = source(openbao, kv_mount)
    value = vs.read_secret_field(f"{kv_mount}/cybedefend#pat")
    assert value.reveal() == "cdpat_0123456789abcdef" and "cdpat" not in repr(value)
    with pytest.raises(VaultInvalidRequest, match="field 'nope'"):
        vs.read_secret_field(f"{kv_mount}/cybedefend#nope")
    with pytest.raises(VaultInvalidRequest, match="no such secret"):
        vs.read_secret_field(f"{kv_mount}/absent#pat")
    vs.close()


# --- state store -----------------------------------------------------------------------------


@pytest.mark.integration
def test_state_store_check_and_set(openbao: OpenBao, kv_mount: str) -> None:
    vs = source(openbao, kv_mount)
    assert vs.read_state("key") is None
    assert vs.write_state("key", {"k": "v1"}, cas=0) == 1
    with pytest.raises(CasConflict, match="check-and-set"):
        vs.write_state("key", {"k": "other"}, cas=0)
    with pytest.raises(CasConflict):
        vs.write_state("key", {"k": "other"}, cas=5)
    assert vs.write_state("key", {"k": "v2"}, cas=1) == 2
    assert vs.read_state("key") == ({"k": "v2"}, 2)
    path = f"{vs._settings.state_path}/key"
    openbao.client().secrets.kv.v2.delete_latest_version_of_secret(path=path, mount_point=kv_mount)
    assert vs.read_state("key") is None
    assert vs.write_state("key", {"k": "v3"}, cas=0) == 3  # absent includes "current version deleted"
    vs.close()


# --- token lifecycle -----------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.slow  # waits out real token TTLs on the server
def test_renewal_at_fraction_of_ttl(openbao: OpenBao, kv_mount: str) -> None:
    token = openbao.create_token(["default"], ttl="4s", renewable=True)
    clock = FakeClock()
    vs = source(openbao, kv_mount, token, clock=clock)
    vs.login()
    assert vs.token_ttl() == pytest.approx(4, abs=1)
    assert vs.maintain() > 0  # not yet due
    assert metric(vs, "cybedefend_bridge_vault_token_renewals_total", result="ok") == 0
    time.sleep(2)  # real time passes on the server...
    clock.now += 3  # ...and the bridge's clock says 3/4 of the TTL went by: renewal is due (2/3)
    vs.maintain()
    assert metric(vs, "cybedefend_bridge_vault_token_renewals_total", result="ok") == 1
    server_ttl = openbao.client().auth.token.lookup(token)["data"]["ttl"]
    assert server_ttl >= 3  # renewed: without renewal it would be about 2
    vs.close()


@pytest.mark.integration
def test_approle_relogin_after_revoke_and_revoke_on_close(openbao: OpenBao, kv_mount: str, tmp_path: Path) -> None:
    openbao.write_secret(kv_mount, "dockerhub/a", {"accessToken": "x"}, TAG)
    role_id, secret_id = openbao.enable_approle("bridge-relogin", allow_all(openbao))
    (tmp_path / "role").write_text(role_id)
    (tmp_path / "secret").write_text(secret_id)
    auth = {"method": "approle", "role_id_file": str(tmp_path / "role"), "secret_id_file": str(tmp_path / "secret")}
    vs = source(openbao, kv_mount, auth=auth)
    vs.login()
    first = vs.session._token.value.reveal()  # type: ignore[union-attr]
    openbao.client().auth.token.revoke(first)
    assert [e.ref.path for e in vs.discover(vs._settings.sources[0], 0)] == ["dockerhub/a"]
    assert metric(vs, "cybedefend_bridge_vault_logins_total", result="ok") == 2
    second = vs.session._token.value.reveal()  # type: ignore[union-attr]
    assert second != first
    vs.close()  # revoke_on_shutdown defaults to true and the bridge logged in itself
    with pytest.raises(hvac.exceptions.Forbidden):
        openbao.client().auth.token.lookup(second)


@pytest.mark.integration
@pytest.mark.slow  # waits out real token TTLs on the server
def test_max_ttl_near_logs_in_again(openbao: OpenBao, kv_mount: str, tmp_path: Path) -> None:
    role_id, secret_id = openbao.enable_approle("bridge-maxttl", allow_all(openbao), token_ttl="4s", token_max_ttl="5s")
    (tmp_path / "role").write_text(role_id)
    (tmp_path / "secret").write_text(secret_id)
    auth = {"method": "approle", "role_id_file": str(tmp_path / "role"), "secret_id_file": str(tmp_path / "secret")}
    clock = FakeClock()
    vs = source(openbao, kv_mount, auth=auth, clock=clock)
    vs.login()
    time.sleep(2.5)
    clock.now += 3  # renewal due; the server can only extend to the max TTL (about 2.5 s left)
    vs.maintain()
    assert metric(vs, "cybedefend_bridge_vault_token_renewals_total", result="ok") == 1
    assert metric(vs, "cybedefend_bridge_vault_logins_total", result="ok") == 1
    clock.now += 3
    vs.maintain()  # the max TTL nears: a fresh login rather than a renewal that cannot help
    assert metric(vs, "cybedefend_bridge_vault_logins_total", result="ok") == 2
    assert metric(vs, "cybedefend_bridge_vault_token_renewals_total", result="ok") == 1
    vs.close()


@pytest.mark.integration
@pytest.mark.slow  # waits out real token TTLs on the server
def test_token_expiring_mid_pass(openbao: OpenBao, kv_mount: str, tmp_path: Path) -> None:
    for i in range(30):
        openbao.write_secret(kv_mount, f"dockerhub/s{i}", {"accessToken": "x"}, TAG)
    role_id, secret_id = openbao.enable_approle("bridge-short", allow_all(openbao), token_ttl="2s", token_max_ttl="2s")
    (tmp_path / "role").write_text(role_id)
    (tmp_path / "secret").write_text(secret_id)
    auth = {"method": "approle", "role_id_file": str(tmp_path / "role"), "secret_id_file": str(tmp_path / "secret")}
    clock = FakeClock()  # frozen: no proactive renewal, so the server expires the token under us
    vs = source(openbao, kv_mount, auth=auth, clock=clock, concurrency=1)  # lazy: one read per next()
    vs.login()
    it = iter(vs.discover(vs._settings.sources[0], 0))
    got = [next(it)]
    time.sleep(2.5)
    got += list(it)
    assert len(got) == 30
    assert metric(vs, "cybedefend_bridge_vault_logins_total", result="ok") == 2

    static = openbao.create_token(["root"], ttl="1s", renewable=False)
    vs2 = source(openbao, kv_mount, static, clock=FakeClock())
    vs2.login()
    time.sleep(1.5)
    with pytest.raises(VaultAuthError, match="refused the configured token") as info:
        list(vs2.discover(vs2._settings.sources[0], 0))
    assert static not in str(info.value)
    vs.close()
    vs2.close()


@pytest.mark.integration
def test_token_file_is_reread_when_it_changes(openbao: OpenBao, kv_mount: str, tmp_path: Path) -> None:
    openbao.write_secret(kv_mount, "dockerhub/a", {"accessToken": "x"}, TAG)
    first = openbao.create_token(["root"])
    second = openbao.create_token(["root"])
    tf = tmp_path / "sink"
    tf.write_text(first + "\n")
    vs = source(openbao, kv_mount, auth={"method": "token", "token_file": str(tf)})
    vs.login()
    assert vs.healthy()
    tf.write_text(second + "\n")  # what a Vault Agent sink does after re-authenticating
    openbao.client().auth.token.revoke(first)
    assert [e.ref.path for e in vs.discover(vs._settings.sources[0], 0)] == ["dockerhub/a"]
    assert vs.session._token.value.reveal() == second  # type: ignore[union-attr]
    vs.close()
    openbao.client().auth.token.lookup(second)  # a given token is not ours to revoke


def _signed_jwt(claims: dict[str, Any]) -> tuple[str, str]:
    """An RS256 JWT and the PEM public key that verifies it (no JWT library needed)."""
    import base64
    import json

    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def b64(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    signing_input = b64(json.dumps({"alg": "RS256", "typ": "JWT"}).encode()) + "." + b64(json.dumps(claims).encode())
    signature = key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return signing_input + "." + b64(signature), pem.decode()


@pytest.mark.integration
def test_jwt_login(openbao: OpenBao, kv_mount: str, tmp_path: Path) -> None:
    now = int(time.time())
    token, pem = _signed_jwt({"sub": "bridge", "aud": "cybedefend-bridge", "iat": now, "exp": now + 300})
    c = openbao.client()
    mount = f"jwt-{kv_mount}"
    c.sys.enable_auth_method("jwt", path=mount)
    c.write(f"auth/{mount}/config", jwt_validation_pubkeys=[pem])
    c.write(
        f"auth/{mount}/role/bridge",
        role_type="jwt",
        bound_audiences=["cybedefend-bridge"],
        user_claim="sub",
        token_policies=allow_all(openbao),
        token_ttl="1h",
    )
    (tmp_path / "jwt").write_text(token)
    auth = {"method": "jwt", "mount": mount, "role": "bridge", "jwt_file": str(tmp_path / "jwt")}
    vs = source(openbao, kv_mount, auth=auth)
    vs.login()
    assert vs.healthy() and vs.token_ttl() == pytest.approx(3600, abs=5)
    vs.close()
    c.sys.disable_auth_method(path=mount)


@pytest.mark.integration
def test_login_failure_backs_off(openbao: OpenBao, kv_mount: str, tmp_path: Path) -> None:
    role_id, _ = openbao.enable_approle("bridge-bad", ["default"])
    (tmp_path / "role").write_text(role_id)
    (tmp_path / "secret").write_text("not-the-secret-id-0000")
    auth = {"method": "approle", "role_id_file": str(tmp_path / "role"), "secret_id_file": str(tmp_path / "secret")}
    clock = FakeClock()
    vs = source(openbao, kv_mount, auth=auth, clock=clock)
    with pytest.raises(VaultAuthError, match="approle") as failed:
        vs.login()
    # The login body (the lean path's JSON, ADR 15) carried the secret_id: never its error.
    chain: list[str] = []
    exc: BaseException | None = failed.value
    while exc is not None:
        chain.append(repr(exc) + str(exc))
        exc = exc.__cause__ or exc.__context__
    assert_no_leak(chain, ["not-the-secret-id-0000"])
    with pytest.raises(VaultAuthError, match="backing off"):
        vs.login()
    assert vs.request_counts() == {"login": 1}  # the second attempt did not reach Vault
    clock.now += 61
    with pytest.raises(VaultAuthError, match="failed"):
        vs.login()
    assert metric(vs, "cybedefend_bridge_vault_logins_total", result="failed") == 2
    vs.close()


# --- least privilege -------------------------------------------------------------------------


def _policy_for(mount: str, text: str | None = None) -> str:
    text = POLICY.read_text() if text is None else text
    return text.replace('"secret/', f'"{mount}/').replace("mounts/secret", f"mounts/{mount}")


@pytest.mark.integration
def test_works_with_only_the_shipped_policy(openbao: OpenBao, kv_mount: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    openbao.write_secret(kv_mount, "dockerhub/a/b", {"accessToken": "dckr_pat_policytest"}, TAG)
    openbao.put_policy("bridge-least", _policy_for(kv_mount))
    token = openbao.create_token(["bridge-least"], ttl="1h", no_default_policy=True)
    vs = source(openbao, kv_mount, token)
    vs.login()
    assert vs.healthy()
    entries = list(vs.discover(vs._settings.sources[0], 0))
    assert [e.ref.path for e in entries] == ["dockerhub/a/b"]
    assert vs.read_value(entries[0].ref, entries[0].version)["accessToken"] == "dckr_pat_policytest"
    assert vs.write_state("key", {"k": "v"}, cas=0) == 1
    assert vs.read_state("key") == ({"k": "v"}, 1)
    rows = vs.check_capabilities()
    assert rows and all(ok for _, ok, _ in rows), rows
    assert any("scan allowed" in detail for _, _, detail in rows)
    vs.close()
    assert token not in caplog.text and "dckr_pat_policytest" not in caplog.text


@pytest.mark.integration
def test_less_than_the_policy_fails_clearly(openbao: OpenBao, kv_mount: str) -> None:
    openbao.write_secret(kv_mount, "dockerhub/a", {"accessToken": "x"}, TAG)
    text = _policy_for(kv_mount).replace('"list", "scan", "read"', '"list", "scan"')
    openbao.put_policy("bridge-less", text)
    token = openbao.create_token(["bridge-less"], no_default_policy=True)
    vs = source(openbao, kv_mount, token)
    with pytest.raises(VaultPermissionDenied, match=f"metadata {kv_mount}/metadata/dockerhub/a") as info:
        list(vs.discover(vs._settings.sources[0], 0))
    assert token not in str(info.value)
    rows = {label: ok for label, ok, _ in vs.check_capabilities()}
    assert rows[f"read {kv_mount}/metadata/dockerhub/*"] is False
    assert rows[f"list {kv_mount}/metadata/dockerhub/"] is True
    # a policy refusal with a working token is not a reason to log in again
    assert metric(vs, "cybedefend_bridge_vault_logins_total", result="ok") == 1
    vs.close()


# --- error translation (the only mocks) ------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (hvac.exceptions.InvalidRequest(errors=["bad"]), VaultInvalidRequest),
        (hvac.exceptions.Forbidden(errors=["permission denied"]), VaultPermissionDenied),
        (hvac.exceptions.Unauthorized(), VaultPermissionDenied),
        (hvac.exceptions.VaultDown(errors=["Vault is sealed"]), VaultUnavailable),
        (hvac.exceptions.InternalServerError(), VaultUnavailable),
        (hvac.exceptions.RateLimitExceeded(), VaultUnavailable),
        (hvac.exceptions.UnexpectedError(), VaultUnavailable),
        (requests.exceptions.ConnectionError("refused"), VaultUnavailable),
        (requests.exceptions.Timeout("slow"), VaultUnavailable),
        (requests.exceptions.SSLError("bad cert"), VaultUnavailable),
        (ConnectionRefusedError(111, "refused"), VaultUnavailable),
        (ValueError("not json"), VaultUnavailable),
    ],
)
def test_translate(exc: Exception, expected: type[Exception]) -> None:
    err = translate(exc, "metadata", "secret/metadata/x")
    assert type(err) is expected
    assert "metadata secret/metadata/x" in str(err)


def test_status_translation() -> None:
    assert isinstance(error_for_status(503, "read", "p", ["Vault is sealed"]), VaultUnavailable)
    assert isinstance(error_for_status(429, "read", "p"), VaultUnavailable)
    assert isinstance(error_for_status(400, "read", "p"), VaultInvalidRequest)
    assert isinstance(error_for_status(403, "read", "p"), VaultPermissionDenied)
    assert error_for_status(503, "read", "p").retryable and not error_for_status(403, "read", "p").retryable


@pytest.mark.integration
def test_hvac_exception_carrying_a_token_does_not_leak(openbao: OpenBao, kv_mount: str) -> None:
    vs = source(openbao, kv_mount)
    secret = "hvs.LEAKYTOKEN0123456789"

    def boom(_: Any) -> None:
        raise hvac.exceptions.InternalServerError(f"echo {secret}", url=f"http://x/?t={secret}")

    with pytest.raises(VaultUnavailable) as info:
        vs.session.transport.hvac("state", "secret/data/x", boom, None)
    assert secret not in str(info.value)
    vs.close()


def test_unreachable_vault_is_unavailable_not_a_library_error(tmp_path: Path) -> None:
    from tests.support.openbao import free_port_pair

    s = settings(f"http://127.0.0.1:{free_port_pair()}", timeout_seconds=2)
    vs = VaultSource(s, Metrics(), env={"VAULT_TOKEN": "hvs.unreachable-token"}, sleep=lambda _: None)
    with pytest.raises(VaultAuthError) as info:
        vs.login()
    assert isinstance(info.value.__cause__, VaultUnavailable) and "hvs.unreachable-token" not in str(info.value)
    assert vs.healthy() is False
    vs.close()


def test_a_failure_report_never_shows_an_issued_openbao_root_token() -> None:
    from tests.conftest import scrub_report
    from tests.support.openbao import ISSUED_TOKENS

    token = "root-" + "a1" * 12
    ISSUED_TOKENS.add(token)
    try:
        report = pytest.TestReport("t.py::t", ("t.py", 1, "t"), {}, "failed",
                                   f"hvac.exceptions.Forbidden: headers {{'X-Vault-Token': '{token}'}}", "call",
                                   [("Captured stdout call", f"token={token}\n")])
        scrub_report(report)
        assert token not in str(report.longrepr) and "X-Vault-Token': '***'" in str(report.longrepr)
        assert report.sections == [("Captured stdout call", "token=***\n")]
    finally:
        ISSUED_TOKENS.discard(token)
