"""Helpers of the deployment tests: find the external tools, render the chart, list PromQL metrics.

Tools come from .tools/bin (installed by .ci/install-tools.sh) or PATH. A missing tool fails the
test when CI=true and skips it, with the reason, on a developer machine.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "cybedefend-bridge"
TOOLS_BIN = ROOT / ".tools" / "bin"
RELEASE = "cybedefend-bridge"
NAMESPACE = "monitoring"
# Value sets CI renders; None is the chart's defaults.
VALUE_SETS: dict[str, Path | None] = {
    "default": None,
    "sidecar": CHART / "ci" / "sidecar-values.yaml",
    "ha": CHART / "ci" / "ha-values.yaml",
    "full": CHART / "ci" / "full-values.yaml",
    "vault-server-sidecar": CHART / "ci" / "vault-server-sidecar-values.yaml",
}
# What a cluster with the Prometheus Operator announces; helm template passes them unless told not
# to, so the CRD-aware templates (ServiceMonitor, PrometheusRule) render as on such a cluster.
MONITORING_APIS = ("monitoring.coreos.com/v1/ServiceMonitor", "monitoring.coreos.com/v1/PrometheusRule")
# The range of Chart.yaml's kubeVersion that CI renders and validates against (oldest claimed, newest).
KUBE_VERSIONS = ("1.25.0", "1.35.0")
# Prometheus' own series the rules and dashboard may use besides the bridge's.
PROMETHEUS_SERIES = frozenset({"up"})
# Vendored (tests/deploy/data/README.md names its source): nothing under tests/ reads outside the clone.
GRAFANA_SCHEMA = ROOT / "tests" / "deploy" / "data" / "grafana-dashboard.schema.json"


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing(what: str, how: str) -> None:
    """Fail in CI, skip elsewhere: a deployment check must never pass silently in CI."""
    msg = f"{what} is not available ({how})"
    if in_ci():
        pytest.fail(msg + "; CI=true, so this is an error", pytrace=False)
    pytest.skip(msg)


def tool(name: str) -> str:
    local = TOOLS_BIN / name
    if local.exists() and os.access(local, os.X_OK):
        return str(local)
    found = shutil.which(name)
    if found is None:
        missing(f"`{name}`", "run: bash .ci/install-tools.sh")
        raise AssertionError("unreachable")  # missing() always raises
    return found


def module(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError:
        missing(f"Python module {name}", "run: bash .ci/install-tools.sh")
        raise AssertionError("unreachable") from None


def run(args: list[str], *, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def helm_template(
    values: Path | None = None, *extra: str, check: bool = True, monitoring_apis: bool = True
) -> subprocess.CompletedProcess[str]:
    args = [tool("helm"), "template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    if monitoring_apis:
        for api in MONITORING_APIS:
            args += ["--api-versions", api]
    if values is not None:
        args += ["--values", str(values)]
    return run([*args, *extra], check=check)


@cache
def _render_cached(value_set: str, extra: tuple[str, ...]) -> str:
    return helm_template(VALUE_SETS[value_set], *extra).stdout


def render(value_set: str, *extra: str) -> list[dict[str, Any]]:
    """The manifests of one value set, parsed (cached per arguments: helm is the slow part)."""
    return [d for d in yaml.safe_load_all(_render_cached(value_set, extra)) if d]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d.get("kind") == kind]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def rules_spec(*extra: str) -> dict[str, Any]:
    """The PrometheusRule spec (a plain Prometheus rules file) rendered with default values."""
    docs = render("default", "--set", "metrics.prometheusRule.enabled=true", *extra)
    spec: dict[str, Any] = one(docs, "PrometheusRule")["spec"]
    return spec


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((CHART / "files" / "dashboard.json").read_text(encoding="utf-8"))
    return data


def dashboard_exprs(dash: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for panel in dash.get("panels", []):
        for target in panel.get("targets", []):
            if "expr" in target:
                out.append(target["expr"])
    for var in dash.get("templating", {}).get("list", []):
        query = var.get("query")
        if isinstance(query, dict) and "query" in query:
            out.append(query["query"])
    return out


@cache
def exported_series() -> frozenset[str]:
    """Sample names the bridge exposes: counters with _total, histograms with _bucket/_sum/_count."""
    from bridge.metrics import METRIC_NAMES, Metrics

    names: set[str] = set()
    for family in Metrics().registry.collect():
        assert family.name in METRIC_NAMES
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names.update(family.name + s for s in ("_bucket", "_sum", "_count"))
        else:
            names.add(family.name)
    return frozenset(names)


# The bridge's own names share a prefix; the standard process collector's are exported by the bridge too.
_METRIC_RE = re.compile(r"\b(?:cybedefend_bridge|process|python)_[a-zA-Z0-9_]+")
_LABEL_VALUES_RE = re.compile(r"^label_values\((.*),\s*[a-zA-Z_][a-zA-Z0-9_]*\)$")


def metrics_in(expr: str) -> set[str]:
    """Bridge metric names an expression refers to (by prefix: cybedefend_bridge_, process_, python_)."""
    return set(_METRIC_RE.findall(expr))


def grafana_to_promql(expr: str) -> str:
    """Replace Grafana's variables so promtool can parse the expression; unwrap label_values()."""
    m = _LABEL_VALUES_RE.match(expr.strip())
    if m:
        expr = m.group(1)
    for var, value in (("$__rate_interval", "5m"), ("$__interval", "1m"), ("$__range", "1h")):
        expr = expr.replace(var, value)
    return re.sub(r"\$[a-zA-Z_][a-zA-Z0-9_]*", ".*", expr)
