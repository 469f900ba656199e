"""The Helm chart: lint, schema, rendered manifests for every value set, and the rendered bridge config."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from bridge.config import parse_settings
from tests.deploy.deploy_tools import (
    CHART,
    RELEASE,
    ROOT,
    VALUE_SETS,
    by_kind,
    helm_template,
    module,
    one,
    render,
    run,
    tool,
)

SETS = list(VALUE_SETS)


def _container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    containers = [c for c in pod["containers"] if c["name"] == "bridge"]
    assert len(containers) == 1
    container: dict[str, Any] = containers[0]
    return container


def _bridge_config(docs: list[dict[str, Any]]) -> dict[str, Any]:
    cm = next(d for d in by_kind(docs, "ConfigMap") if "config.yaml" in d.get("data", {}))
    cfg: dict[str, Any] = yaml.safe_load(cm["data"]["config.yaml"])
    return cfg


@pytest.mark.parametrize("value_set", SETS)
def test_helm_lint_strict(value_set: str) -> None:
    args = [tool("helm"), "lint", "--strict", str(CHART)]
    values = VALUE_SETS[value_set]
    if values is not None:
        args += ["--values", str(values)]
    proc = run(args)
    assert "1 chart(s) linted, 0 chart(s) failed" in proc.stdout


@pytest.mark.parametrize("value_set", SETS)
def test_manifests_pass_kubernetes_validate_strict(value_set: str, tmp_path: Path) -> None:
    out = tmp_path / f"{value_set}.yaml"
    out.write_text(helm_template(VALUE_SETS[value_set]).stdout, encoding="utf-8")
    proc = run([tool("kubernetes-validate"), "--strict", "-k", "1.35.0", "--quiet", str(out)], check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_kubernetes_validate_catches_an_unknown_field(tmp_path: Path) -> None:
    # Guards the test above against passing vacuously (wrong flags, no schemas).
    docs = render("default")
    deployment = json.loads(json.dumps(one(docs, "Deployment")))
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolice"] = "Always"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(deployment), encoding="utf-8")
    proc = run([tool("kubernetes-validate"), "--strict", "-k", "1.35.0", "--quiet", str(bad)], check=False)
    assert proc.returncode != 0
    assert "imagePullPolice" in proc.stdout + proc.stderr


def _strict_model_check(cls: Any, doc: dict[str, Any]) -> None:
    # The cloudcoil models ignore unknown keys; a lossless round trip proves there are none.
    obj = cls.model_validate(doc)
    assert obj.model_dump(mode="json", by_alias=True, exclude_unset=True) == doc


@pytest.mark.parametrize("value_set", ["ha", "full"])
def test_monitoring_objects_match_the_prometheus_operator_models(value_set: str) -> None:
    models = module("cloudcoil.models.prometheus_operator.v1")
    docs = render(value_set)
    _strict_model_check(models.ServiceMonitor, one(docs, "ServiceMonitor"))
    _strict_model_check(models.PrometheusRule, one(docs, "PrometheusRule"))


def test_prometheus_operator_round_trip_catches_a_typo() -> None:
    models = module("cloudcoil.models.prometheus_operator.v1")
    sm = json.loads(json.dumps(one(render("full"), "ServiceMonitor")))
    sm["spec"]["endpoints"][0]["intervall"] = "30s"
    with pytest.raises(AssertionError):
        _strict_model_check(models.ServiceMonitor, sm)


@pytest.mark.parametrize("value_set", SETS)
def test_rendered_config_is_a_valid_bridge_config(value_set: str) -> None:
    cfg = _bridge_config(render(value_set))
    settings = parse_settings(cfg, env={})
    assert settings.server.port == 8080
    assert str(settings.ledger.path).startswith("/var/lib/cybedefend-bridge/")
    container = _container(render(value_set))
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    cred = settings.cybedefend.auth.credential_file
    assert cred is not None and str(cred.parent) in mounts


@pytest.mark.parametrize("value_set", SETS)
def test_pod_is_locked_down_and_probed(value_set: str) -> None:
    docs = render(value_set)
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    c = _container(docs)
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert isinstance(pod["securityContext"]["runAsUser"], int) and pod["securityContext"]["runAsUser"] > 0
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["args"] == ["run", "--config", "/etc/cybedefend-bridge/config.yaml"]
    # The only writable paths are volumes: the ledger and /tmp.
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert "/tmp" in mounts and "/var/lib/cybedefend-bridge" in mounts
    # The kubelet's SIGKILL must come after the bridge's own drain.
    grace = parse_settings(_bridge_config(docs), env={}).sync.shutdown_grace_seconds
    assert pod["terminationGracePeriodSeconds"] > grace


def test_no_secret_values_in_the_chart() -> None:
    for value_set in SETS:
        assert not by_kind(render(value_set), "Secret"), "the chart must only reference existing Secrets"


def test_sidecar_mode_uses_the_agent_token_file() -> None:
    docs = render("sidecar")
    cfg = _bridge_config(docs)
    assert cfg["vault"]["auth"] == {"method": "token", "token_file": "/vault/secrets/token"}
    annotations = one(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["vault.hashicorp.com/agent-inject"] == "true"
    assert annotations["vault.hashicorp.com/agent-inject-token"] == "true"
    assert annotations["vault.hashicorp.com/role"] == "cybedefend-bridge"
    assert "vault.hashicorp.com/agent-inject" not in one(render("default"), "Deployment")["spec"]["template"]["metadata"]["annotations"]


def test_cluster_mode_uses_kubernetes_auth() -> None:
    cfg = _bridge_config(render("default"))
    assert cfg["vault"]["auth"] == {"method": "kubernetes", "role": "cybedefend-bridge"}
    full = _bridge_config(render("full"))
    assert full["vault"]["auth"]["mount"] == "kubernetes-prod"
    assert full["vault"]["tls"]["ca_cert"] == "/etc/cybedefend-bridge-vault-ca/ca.crt"


def test_ha_advertises_the_pod_ip() -> None:
    docs = render("ha")
    deployment = one(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    env = {e["name"]: e for e in _container(docs)["env"]}
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert env["BRIDGE_HA_ADVERTISE_ADDRESS"]["value"] == "http://$(POD_IP):8080"
    assert _bridge_config(docs)["ha"]["enabled"] is True
    # The bridge reads that variable when the file leaves ha.advertise_address unset.
    settings = parse_settings(_bridge_config(docs), env={"BRIDGE_HA_ADVERTISE_ADDRESS": "http://10.1.2.3:8080"})
    assert settings.ha.advertise_address == "http://10.1.2.3:8080"


def test_full_value_set_renders_every_template() -> None:
    kinds = {d["kind"] for d in render("full")}
    assert kinds >= {
        "ServiceAccount", "ConfigMap", "Service", "Deployment", "PersistentVolumeClaim", "ServiceMonitor",
        "PrometheusRule", "NetworkPolicy", "PodDisruptionBudget",
    }
    dashboards = [d for d in by_kind(render("full"), "ConfigMap") if d["metadata"]["name"].endswith("-dashboard")]
    assert len(dashboards) == 1
    assert dashboards[0]["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboards[0]["data"]["cybedefend-bridge.json"]) == json.loads(
        (CHART / "files" / "dashboard.json").read_text(encoding="utf-8")
    )
    ports = {p["name"] for p in one(render("full"), "Service")["spec"]["ports"]}
    assert ports == {"http", "audit"}


@pytest.mark.parametrize(
    ("flag", "where"),
    [
        ("mode=vaultless", "/mode"),
        ("replicaCount=0", "/replicaCount"),
        ("image.pullPolicy=Sometimes", "/image/pullPolicy"),
        ("imageTag=latest", "imageTag"),
        ("config.sources[0].mout=secret", "/config/sources/0"),
        ("config.schedule.interval_seconds=1", "/config/schedule/interval_seconds"),
        ("config.cybedefend.region=mars", "/config/cybedefend/region"),
        ("metrics.prometheusRule.noSuccessfulPassIntervals=0", "/metrics/prometheusRule/noSuccessfulPassIntervals"),
    ],
)
def test_values_schema_rejects_wrong_values(flag: str, where: str) -> None:
    proc = helm_template(None, "--set", flag, check=False)
    assert proc.returncode != 0, f"--set {flag} was accepted"
    assert "schema" in proc.stderr and where in proc.stderr, proc.stderr


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["ha.enabled=true"], "ha.enabled needs replicaCount >= 2"),
        (["replicaCount=2"], "needs ha.enabled"),
        (["ha.enabled=true", "replicaCount=2", "persistence.enabled=true"], "cannot share one ledger volume"),
        (["ha.enabled=true", "replicaCount=2", "podDisruptionBudget.enabled=true"], "block evicting it forever"),
        (["config.ledger.key_source=file"], "needs persistence.enabled"),
        (["cybedefend.existingSecret="], "cybedefend.existingSecret"),
        (["auditSocket.enabled=true"], "allowedPeers"),
    ],
)
def test_template_refuses_inconsistent_values(flags: list[str], message: str) -> None:
    args: list[str] = []
    for f in flags:
        args += ["--set", f]
    proc = helm_template(None, *args, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr


def test_values_schema_config_part_is_generated_from_bridge_config() -> None:
    proc = run(["python3", str(ROOT / "scripts" / "gen-values-schema.py"), "--check"], check=False)
    assert proc.returncode == 0, proc.stderr


# Objects whose keys are Kubernetes' (checked by kubernetes-validate on the output) or free-form maps.
_OPEN_OBJECTS = {
    "global", "podSecurityContext", "securityContext", "resources", "affinity",
}


def test_values_schema_closes_every_chart_object() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text(encoding="utf-8"))
    values = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))

    def walk(node: dict[str, Any], path: str) -> None:
        if node.get("type") == "object" and "properties" in node:
            assert node.get("additionalProperties") is False, f"{path or '(top)'} accepts unknown keys"
        for key, sub in node.get("properties", {}).items():
            if key in _OPEN_OBJECTS or "$ref" in sub:
                continue
            walk(sub, f"{path}.{key}".lstrip("."))

    walk(schema, "")
    # And every value in values.yaml has a schema entry (helm lint enforces it too; this names the key).
    def covered(vals: dict[str, Any], node: dict[str, Any], path: str) -> None:
        for key, value in vals.items():
            props = node.get("properties", {})
            assert key in props, f"{path}{key} has no schema"
            if isinstance(value, dict) and "properties" in props[key]:
                covered(value, props[key], f"{path}{key}.")

    covered(values, schema, "")


def test_release_name_selects_job_label() -> None:
    sm = one(render("ha"), "ServiceMonitor")
    relabel = sm["spec"]["endpoints"][0]["relabelings"]
    assert {"targetLabel": "job", "replacement": RELEASE} in relabel
