"""Topology B: the bridge as a container of the Vault server pod, rendered into the real Vault chart.

This chart (values ci/vault-server-sidecar-values.yaml) renders a values snippet for the Vault Helm
chart (server.extraContainers, server.volumes, server.auditStorage). The test renders the vendored
hashicorp/vault-helm chart (tests/deploy/vendor/vault-helm, see its SOURCE.md) with that snippet,
validates the result with kubernetes-validate --strict, and checks that the bridge follows the file
Vault's own container writes on the shared audit volume. Topology A (Vault Agent sidecar in the
bridge's pod) is ci/sidecar-values.yaml: test_deploy_chart.py and test_deploy_injector.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from bridge.config import parse_settings
from tests.deploy.deploy_tools import KUBE_VERSIONS, VALUE_SETS, by_kind, one, render, run, tool

VAULT_CHART = Path(__file__).resolve().parent / "vendor" / "vault-helm"
SET = "vault-server-sidecar"


def _snippet() -> dict[str, Any]:
    cm = next(d for d in by_kind(render(SET), "ConfigMap") if d["metadata"]["name"].endswith("-vault-helm-values"))
    data: dict[str, Any] = yaml.safe_load(cm["data"]["values.yaml"])
    return data


def _bridge_config() -> dict[str, Any]:
    cm = next(d for d in by_kind(render(SET), "ConfigMap") if "config.yaml" in d.get("data", {}))
    cfg: dict[str, Any] = yaml.safe_load(cm["data"]["config.yaml"])
    return cfg


def _vault_render(tmp_path: Path, *extra: str) -> str:
    values = tmp_path / "bridge-values.yaml"
    values.write_text(yaml.safe_dump(_snippet()), encoding="utf-8")
    return run([tool("helm"), "template", "vault", str(VAULT_CHART), "--namespace", "vault", "--values", str(values), *extra]).stdout


def test_no_deployment_only_config_and_snippet() -> None:
    docs = render(SET)
    assert {d["kind"] for d in docs} == {"ConfigMap"}
    assert len(docs) == 2


def test_bridge_config_follows_the_audit_file_and_parses() -> None:
    cfg = _bridge_config()
    assert cfg["triggers"]["audit_file"]["path"] == "/vault/audit/vault_audit.log"
    settings = parse_settings(cfg, env={})
    assert settings.triggers.audit_file is not None
    assert str(settings.triggers.audit_file.path) == "/vault/audit/vault_audit.log"
    assert settings.vault.auth.method == "kubernetes"


@pytest.mark.parametrize("kube", KUBE_VERSIONS)
def test_vault_chart_with_the_snippet_validates(tmp_path: Path, kube: str) -> None:
    out = tmp_path / "vault.yaml"
    out.write_text(_vault_render(tmp_path, "--kube-version", kube), encoding="utf-8")
    proc = run([tool("kubernetes-validate"), "--strict", "-k", kube, "--quiet", str(out)], check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_bridge_shares_the_audit_volume_with_vault(tmp_path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(_vault_render(tmp_path)) if d]
    sts = one(docs, "StatefulSet")
    pod = sts["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in pod["containers"]}
    assert set(containers) == {"vault", "cybedefend-bridge"}
    vault_audit = next(m for m in containers["vault"]["volumeMounts"] if m["name"] == "audit")
    bridge_audit = next(m for m in containers["cybedefend-bridge"]["volumeMounts"] if m["name"] == "audit")
    assert vault_audit["mountPath"] == bridge_audit["mountPath"] == "/vault/audit"
    assert bridge_audit.get("readOnly") is True
    # The audit volume is the Vault chart's PVC; the bridge's own volumes are prefixed, so no name clash.
    assert "audit" in {t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]}
    names = [v["name"] for v in pod["volumes"]]
    assert len(names) == len(set(names)), names
    # The bridge reads the file Vault writes with mode=0640: its groups include the pod's fsGroup.
    bridge_sc = containers["cybedefend-bridge"]["securityContext"]
    assert bridge_sc["runAsUser"] != 0 and bridge_sc["readOnlyRootFilesystem"] is True
    assert isinstance(pod["securityContext"]["fsGroup"], int)
    # Its config is the ConfigMap this chart renders in the same namespace.
    config_volume = next(v for v in pod["volumes"] if v["name"] == "bridge-config")
    assert config_volume["configMap"]["name"] == one([d for d in render(SET) if "config.yaml" in d.get("data", {})], "ConfigMap")["metadata"]["name"]


def test_values_file_exists_for_each_topology() -> None:
    for name in ("sidecar", SET):
        path = VALUE_SETS[name]
        assert path is not None and path.exists(), name
