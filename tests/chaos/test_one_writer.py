"""Issue 11, the Vault side and the one-writer half, against a real OpenBao and the double.

Scenario 3: a 404 that is not Vault's own answer is not "gone". Scenario 2: the key has an
identity. Scenario 5: two processes on one configuration. Scenario 4: a leader that lost its
lease stops writing. Scenario 7: the lease is not trusted blindly.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from bridge.errors import VaultAmbiguous
from bridge.metrics import Metrics
from bridge.vault.source import VaultSource
from tests.chaos.rig import ChaosRig
from tests.chaos.vault_proxy import BareNotFoundProxy
from tests.openbao import OpenBao

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
