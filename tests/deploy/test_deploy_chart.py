"""The Helm chart: lint, schema, rendered manifests for every value set, and the rendered bridge config."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from bridge.config import looks_like_advertise_address, parse_settings
from bridge.daemon.ha import WRITE_MARGIN_SECONDS
from tests.deploy.deploy_tools import (
    CHART,
    KUBE_VERSIONS,
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
# Value sets that render the bridge as a Deployment (vault-server-sidecar renders a Vault chart
# snippet instead; tests/deploy/test_deploy_topologies.py covers it).
DEPLOYMENT_SETS = [s for s in SETS if s != "vault-server-sidecar"]


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


@pytest.mark.parametrize("value_set", DEPLOYMENT_SETS)
def test_rendered_config_is_a_valid_bridge_config(value_set: str) -> None:
    cfg = _bridge_config(render(value_set))
    settings = parse_settings(cfg, env={})
    assert settings.server.port == 8080
    assert str(settings.ledger.path).startswith("/var/lib/cybedefend-bridge/")
    container = _container(render(value_set))
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    cred = settings.cybedefend.auth.credential_file
    assert cred is not None and str(cred.parent) in mounts


@pytest.mark.parametrize("value_set", DEPLOYMENT_SETS)
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
    # The injector's agent-run-as-same-user reads the container's runAsUser (test_deploy_injector.py).
    assert sc["runAsUser"] == pod["securityContext"]["runAsUser"]
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
    # The HA example must not start with the short-TTL warning: a renewed lease outlives a write.
    ha = parse_settings(_bridge_config(docs), env={"BRIDGE_HA_ADVERTISE_ADDRESS": "http://10.1.2.3:8080"})
    assert ha.ha.ttl_seconds * (1 - ha.ha.renew_fraction) >= ha.cybedefend.timeout_seconds + WRITE_MARGIN_SECONDS
    # The bridge reads that variable when the file leaves ha.advertise_address unset.
    settings = parse_settings(_bridge_config(docs), env={"BRIDGE_HA_ADVERTISE_ADDRESS": "http://10.1.2.3:8080"})
    assert settings.ha.advertise_address == "http://10.1.2.3:8080"
    # An IPv6 pod: Kubernetes substitutes the bare address; the bridge adds the brackets a URL needs.
    settings = parse_settings(_bridge_config(docs), env={"BRIDGE_HA_ADVERTISE_ADDRESS": "http://fd00:10:244::5:8080"})
    assert settings.ha.advertise_address == "http://[fd00:10:244::5]:8080"
    assert looks_like_advertise_address(settings.ha.advertise_address)


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


# --- kubeVersion tells the truth ------------------------------------------------------------


def test_kube_version_range_is_the_one_ci_checks() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text(encoding="utf-8"))
    oldest = KUBE_VERSIONS[0]
    assert chart["kubeVersion"] == f">={oldest}-0", "Chart.yaml's kubeVersion and the oldest version CI validates against differ"
    below = helm_template(None, "--kube-version", "1.24.0", check=False)
    assert below.returncode != 0 and "kubeVersion" in below.stderr + below.stdout


@pytest.mark.parametrize("kube", KUBE_VERSIONS)
@pytest.mark.parametrize("value_set", SETS)
def test_manifests_validate_against_oldest_and_newest_kubernetes(value_set: str, kube: str, tmp_path: Path) -> None:
    out = tmp_path / f"{value_set}-{kube}.yaml"
    out.write_text(helm_template(VALUE_SETS[value_set], "--kube-version", kube).stdout, encoding="utf-8")
    proc = run([tool("kubernetes-validate"), "--strict", "-k", kube, "--quiet", str(out)], check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_pdb_eviction_policy_is_gated_on_the_kubernetes_version() -> None:
    new = one(render("full", "--kube-version", "1.31.0"), "PodDisruptionBudget")
    assert new["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    old = one(render("full", "--kube-version", "1.25.0"), "PodDisruptionBudget")
    assert "unhealthyPodEvictionPolicy" not in old["spec"]


def test_kubernetes_1_25_rejects_the_ungated_field(tmp_path: Path) -> None:
    # Guards the gate above: the field is really unknown to 1.25's schema.
    pdb = json.loads(json.dumps(one(render("full", "--kube-version", "1.25.0"), "PodDisruptionBudget")))
    pdb["spec"]["unhealthyPodEvictionPolicy"] = "AlwaysAllow"
    bad = tmp_path / "pdb.yaml"
    bad.write_text(yaml.safe_dump(pdb), encoding="utf-8")
    proc = run([tool("kubernetes-validate"), "--strict", "-k", "1.25.0", "--quiet", str(bad)], check=False)
    assert proc.returncode != 0


# --- CRD-aware monitoring objects ------------------------------------------------------------

_MONITORING = ["--set", "metrics.serviceMonitor.enabled=true", "--set", "metrics.prometheusRule.enabled=true"]


def test_monitoring_objects_are_skipped_without_their_api_and_notes_warn() -> None:
    docs = [d for d in yaml.safe_load_all(helm_template(None, *_MONITORING, monitoring_apis=False).stdout) if d]
    assert not by_kind(docs, "ServiceMonitor") and not by_kind(docs, "PrometheusRule")
    # NOTES are rendered by install, not template; --dry-run=client needs no cluster.
    notes = run([tool("helm"), "install", RELEASE, str(CHART), "--dry-run=client", *_MONITORING]).stdout
    assert "does not serve monitoring.coreos.com/v1 ServiceMonitor" in notes
    assert "does not serve monitoring.coreos.com/v1 PrometheusRule" in notes
    with_api = [d for d in yaml.safe_load_all(helm_template(None, *_MONITORING).stdout) if d]
    assert by_kind(with_api, "ServiceMonitor") and by_kind(with_api, "PrometheusRule")


def test_monitoring_objects_can_be_forced_without_their_api() -> None:
    forced = ["--set", "metrics.serviceMonitor.forceRender=true", "--set", "metrics.prometheusRule.forceRender=true"]
    docs = [d for d in yaml.safe_load_all(helm_template(None, *_MONITORING, *forced, monitoring_apis=False).stdout) if d]
    assert len(by_kind(docs, "ServiceMonitor")) == 1 and len(by_kind(docs, "PrometheusRule")) == 1


# --- the knobs teams use to avoid forking ------------------------------------------------------


def test_full_value_set_uses_every_pod_knob() -> None:
    docs = render("full")
    deployment = one(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert deployment["metadata"]["annotations"] == {"example.com/owner": "platform"}
    assert pod["runtimeClassName"] == "runc"
    assert pod["schedulerName"] == "default-scheduler"
    assert pod["dnsPolicy"] == "ClusterFirst"
    assert pod["dnsConfig"]["options"] == [{"name": "ndots", "value": "2"}]
    assert pod["hostAliases"] == [{"ip": "10.0.0.10", "hostnames": ["vault.example.internal"]}]
    assert [c["name"] for c in pod["initContainers"]] == ["wait-for-vault"]
    names = {d["metadata"]["name"] for d in by_kind(docs, "ConfigMap")}
    assert {f"{RELEASE}-extra", f"{RELEASE}-extra-from-string"} <= names
    from_string = next(d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"] == f"{RELEASE}-extra-from-string")
    assert from_string["data"]["namespace"] == "monitoring"


def test_defaults_leave_the_optional_pod_fields_out() -> None:
    pod = one(render("default"), "Deployment")["spec"]["template"]["spec"]
    for key in ("runtimeClassName", "schedulerName", "dnsPolicy", "dnsConfig", "hostAliases", "initContainers"):
        assert key not in pod
    assert "annotations" not in one(render("default"), "Deployment")["metadata"]


def test_extra_args_follow_the_bridge_arguments_and_parse() -> None:
    from bridge.cli import _parser

    c = _container(render("default", "--set-json", 'extraArgs=["--config","/etc/other.yaml"]'))
    assert c["args"] == ["run", "--config", "/etc/cybedefend-bridge/config.yaml", "--config", "/etc/other.yaml"]
    # The bridge's own parser accepts the rendered arguments (argparse: the last --config wins).
    assert str(_parser().parse_args(c["args"]).config) == "/etc/other.yaml"


def test_service_monitor_knobs() -> None:
    sm = one(render("full"), "ServiceMonitor")
    assert sm["metadata"]["namespace"] == "monitoring"
    assert sm["spec"]["targetLabels"] == ["app.kubernetes.io/instance"]
    endpoint = sm["spec"]["endpoints"][0]
    assert endpoint["honorLabels"] is True
    assert endpoint["relabelings"][0] == {"targetLabel": "job", "replacement": RELEASE}
    assert {"sourceLabels": ["__meta_kubernetes_pod_node_name"], "targetLabel": "node"} in endpoint["relabelings"]
    assert endpoint["metricRelabelings"] == [{"sourceLabels": ["__name__"], "regex": "python_gc_.*", "action": "drop"}]


# --- NetworkPolicy, TLS and the metrics token ---------------------------------------------------


def test_network_policy_is_on_by_default() -> None:
    policy = one(render("default"), "NetworkPolicy")
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]


def _server_config(*flags: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    docs = render("default", *flags)
    return _bridge_config(docs)["server"], docs


def test_tls_and_metrics_token_are_rendered_only_when_set() -> None:
    server, _ = _server_config()
    # The bridge's settings forbid unknown keys: unset options must not appear at all.
    assert not {"tls_cert_file", "tls_key_file", "metrics_token_file"} & set(server)
    flags = ("--set", "tls.enabled=true", "--set", "tls.existingSecret=bridge-tls",
             "--set", "metricsAuth.existingSecret=bridge-metrics", "--set", "metrics.serviceMonitor.enabled=true",
             "--set", "ha.enabled=true", "--set", "replicaCount=2")
    server, docs = _server_config(*flags)
    assert server["tls_cert_file"] == "/var/run/secrets/cybedefend-bridge/tls/tls.crt"
    assert server["tls_key_file"] == "/var/run/secrets/cybedefend-bridge/tls/tls.key"
    assert server["metrics_token_file"] == "/var/run/secrets/cybedefend-bridge/metrics/token"
    c = _container(docs)
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    for path in (server["tls_cert_file"], server["tls_key_file"], server["metrics_token_file"]):
        assert path.rsplit("/", 1)[0] in mounts
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"]["scheme"] == "HTTPS"
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["BRIDGE_HA_ADVERTISE_ADDRESS"] == "https://$(POD_IP):8080"
    endpoint = one(docs, "ServiceMonitor")["spec"]["endpoints"][0]
    assert endpoint["scheme"] == "https"
    assert endpoint["authorization"] == {"type": "Bearer", "credentials": {"name": "bridge-metrics", "key": "token"}}
    secrets = {v["secret"]["secretName"] for v in one(docs, "Deployment")["spec"]["template"]["spec"]["volumes"] if "secret" in v}
    assert {"bridge-tls", "bridge-metrics"} <= secrets
    # With a bridge that knows these settings (the HTTP part of issue 12), the config must parse.
    from bridge.config import ServerSettings

    if {"tls_cert_file", "tls_key_file", "metrics_token_file"} <= set(ServerSettings.model_fields):
        parse_settings(_bridge_config(docs), env={})


def test_tls_needs_a_secret() -> None:
    proc = helm_template(None, "--set", "tls.enabled=true", check=False)
    assert proc.returncode != 0 and "tls.existingSecret" in proc.stderr


def test_ha_value_set_has_a_pdb_and_rolls() -> None:
    # Every replica that can accept work is Ready (/readyz), so a PDB and rolling updates are safe.
    docs = render("ha")
    assert one(docs, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1
    assert one(docs, "Deployment")["spec"]["strategy"]["type"] == "RollingUpdate"
