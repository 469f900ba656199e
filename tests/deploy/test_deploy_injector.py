"""The sidecar topology against the real Vault Agent injector's admission rules (hashicorp/vault-k8s).

The injector (a mutating webhook) parses the pod's vault.hashicorp.com/* annotations and refuses
the pod when one of its rules fails. Every rule of agent-inject/agent/annotations.go (and of
agent.go's New/Validate, which call it) that the chart's annotations trigger is quoted below,
verbatim, from hashicorp/vault-k8s at commit fbc5b1f0cd4d1c7dd5a8830e32c8ed636d7318d7
("VAULT-48553 Suppress GO-2026-5932 (#880)", 2026-08-06), and checked on the rendered pod.
The quotes are vendored here (tests never read outside the repository); re-check them when the
injector version of your clusters moves. Rules for annotations the chart does not set (templates,
AWS auth, JSON patches, cache, telemetry) are not triggered and are not checked.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from tests.deploy.deploy_tools import helm_template, one, render

# --- the quoted rules ---------------------------------------------------------------------------

RUN_AS_SAME_ID = """\
# agent-inject/agent/annotations.go, lines 788-813
func (a *Agent) runAsSameID(pod *corev1.Pod) (bool, error) {
    raw, ok := a.Annotations[AnnotationAgentRunAsSameUser]
    if !ok {
        return DefaultAgentRunAsSameUser, nil
    }
    runAsSameID, err := parseutil.ParseBool(raw)
    if err != nil {
        return DefaultAgentRunAsSameUser, err
    }
    if runAsSameID {
        if len(pod.Spec.Containers) == 0 {
            return DefaultAgentRunAsSameUser, errors.New("No containers found in Pod Spec")
        }
        if pod.Spec.Containers[0].SecurityContext == nil {
            return DefaultAgentRunAsSameUser, errors.New("No SecurityContext found for Container 0")
        }
        if pod.Spec.Containers[0].SecurityContext.RunAsUser == nil {
            return DefaultAgentRunAsSameUser, errors.New("RunAsUser is nil for Container 0's SecurityContext")
        }
        if *pod.Spec.Containers[0].SecurityContext.RunAsUser == 0 {
            return DefaultAgentRunAsSameUser, errors.New("container not allowed to run as root")
        }
        a.RunAsUser = *pod.Spec.Containers[0].SecurityContext.RunAsUser
    }
    return runAsSameID, nil
}
"""

INJECT = """\
# agent-inject/agent/annotations.go, lines 709-716
func (a *Agent) inject() (bool, error) {
    raw, ok := a.Annotations[AnnotationAgentInject]
    if !ok {
        return true, nil
    }

    return parseutil.ParseBool(raw)
}
"""

PRE_POPULATE = """\
# agent-inject/agent/annotations.go, lines 727-734
func (a *Agent) prePopulate() (bool, error) {
    raw, ok := a.Annotations[AnnotationAgentPrePopulate]
    if !ok {
        return true, nil
    }

    return parseutil.ParseBool(raw)
}
"""

INJECT_TOKEN = """\
# agent-inject/agent/annotations.go, lines 916-922
func (a *Agent) injectToken() (bool, error) {
    raw, ok := a.Annotations[AnnotationAgentInjectToken]
    if !ok {
        return DefaultAgentInjectToken, nil
    }
    return parseutil.ParseBool(raw)
}
"""

INIT_DEFAULTS = """\
# agent-inject/agent/annotations.go, lines 420-422
    if _, ok := pod.ObjectMeta.Annotations[AnnotationVaultAuthPath]; !ok {
        pod.ObjectMeta.Annotations[AnnotationVaultAuthPath] = cfg.AuthPath
    }
...
# agent-inject/agent/annotations.go, lines 496-521

        if cfg.UserID == "" {
            cfg.UserID = strconv.Itoa(DefaultAgentRunAsUser)
        }
        pod.ObjectMeta.Annotations[AnnotationAgentRunAsUser] = cfg.UserID
    }

    if _, runAsSameUserIsSet = pod.ObjectMeta.Annotations[AnnotationAgentRunAsSameUser]; !runAsSameUserIsSet {
        pod.ObjectMeta.Annotations[AnnotationAgentRunAsSameUser] = strconv.FormatBool(cfg.SameID)
    }

    if _, runAsGroupIsSet = pod.ObjectMeta.Annotations[AnnotationAgentRunAsGroup]; !runAsGroupIsSet {
        if cfg.GroupID == "" {
            cfg.GroupID = strconv.Itoa(DefaultAgentRunAsGroup)
        }
        pod.ObjectMeta.Annotations[AnnotationAgentRunAsGroup] = cfg.GroupID
    }

    // If the SetSecurityContext startup option is false, and the analogous
    // annotation isn't set, but one of the user or group annotations is set,
    // flip SetSecurityContext to true so that the user and group options are
    // set in the containers.
    if !cfg.SetSecurityContext && !securityContextIsSet && (runAsUserIsSet || runAsSameUserIsSet || runAsGroupIsSet) {
        pod.ObjectMeta.Annotations[AnnotationAgentSetSecurityContext] = strconv.FormatBool(true)
    }

"""

NEW_PARSE_INT = """\
# agent-inject/agent/agent.go, lines 465-478
    agent.RunAsUser, err = parseutil.ParseInt(pod.Annotations[AnnotationAgentRunAsUser])
    if err != nil {
        return agent, err
    }

    agent.RunAsGroup, err = parseutil.ParseInt(pod.Annotations[AnnotationAgentRunAsGroup])
    if err != nil {
        return agent, err
    }

    agent.RunAsSameID, err = agent.runAsSameID(pod)
    if err != nil {
        return agent, err
    }
"""

VALIDATE = """\
# agent-inject/agent/agent.go, lines 739-776
// Validate the instance of Agent to ensure we have everything needed
// for basic functionality.
func (a *Agent) Validate() error {
    if a.Namespace == "" {
        return errors.New("namespace missing from request")
    }

    if a.ServiceAccountTokenVolume == nil ||
        a.ServiceAccountTokenVolume.Name == "" ||
        a.ServiceAccountTokenVolume.MountPath == "" ||
        a.ServiceAccountTokenVolume.TokenPath == "" {
        return errors.New("no service account token volume name, mount path or token path found")
    }

    if a.ImageName == "" {
        return errors.New("no Vault image found")
    }

    if a.ConfigMapName == "" {
        if a.Vault.AuthType == "" {
            return errors.New("no Vault Auth Type found")
        }

        if a.Vault.AuthType == DefaultVaultAuthType &&
            a.Vault.Role == "" && a.Annotations[fmt.Sprintf("%s-role", AnnotationVaultAuthConfig)] == "" {
            return errors.New("no Vault role found")
        }

        if a.Vault.AuthPath == "" {
            return errors.New("no Vault Auth Path found")
        }

        if a.Vault.Address == "" {
            return errors.New("no Vault address found")
        }
    }
    return nil
}
"""

SERVICEACCOUNT = """\
# agent-inject/agent/agent.go, lines 815-828
    // Fallback to searching for normal service account token
    for _, container := range pod.Spec.Containers {
        for _, volumes := range container.VolumeMounts {
            if strings.Contains(volumes.MountPath, "serviceaccount") {
                return &ServiceAccountTokenVolume{
                    Name:      volumes.Name,
                    MountPath: volumes.MountPath,
                    TokenPath: "token",
                }, nil
            }
        }
    }

    return nil, fmt.Errorf("failed to find service account volume mount")
"""

TOKEN_SINK = """\
# agent-inject/agent/config.go, lines 277-284
    if a.InjectToken {
        config.AutoAuth.Sinks = append(config.AutoAuth.Sinks, &Sink{
            Type: "file",
            Config: map[string]interface{}{
                "path": path.Join(a.Annotations[AnnotationVaultSecretVolumePath], "token"),
            },
        })
    }
"""

AGENT_SECURITY_CONTEXT = """\
# agent-inject/agent/container_sidecar.go, lines 230-246
func (a *Agent) securityContext() *corev1.SecurityContext {
    runAsNonRoot := true

    if a.RunAsUser == 0 || a.RunAsGroup == 0 {
        runAsNonRoot = false
    }
    return &corev1.SecurityContext{
        RunAsUser:              pointerutil.Int64Ptr(a.RunAsUser),
        RunAsGroup:             pointerutil.Int64Ptr(a.RunAsGroup),
        RunAsNonRoot:           pointerutil.BoolPtr(runAsNonRoot),
        ReadOnlyRootFilesystem: pointerutil.BoolPtr(DefaultAgentReadOnlyRoot),
        Capabilities: &corev1.Capabilities{
            Drop: []corev1.Capability{DefaultAgentDropCapabilities},
        },
        AllowPrivilegeEscalation: pointerutil.BoolPtr(DefaultAgentAllowPrivilegeEscalation),
    }
}
"""


# github.com/hashicorp/go-secure-stdlib/parseutil v0.2.0 ParseBool on a string is Go's
# strconv.ParseBool, which accepts exactly these spellings:
GO_PARSE_BOOL = {"1": True, "t": True, "T": True, "TRUE": True, "true": True, "True": True,
                 "0": False, "f": False, "F": False, "FALSE": False, "false": False, "False": False}
P = "vault.hashicorp.com/"
DEFAULT_AGENT_RUN_AS_GROUP = 1000  # agent.go line 24: DefaultAgentRunAsGroup = 1000
# The ServiceAccount admission plugin runs before mutating webhooks and mounts the token here in
# every container when automountServiceAccountToken is true.
SA_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
SECRET_VOLUME_PATH = "/vault/secrets"  # container_volume.go line 22: secretVolumePath


def _parse_bool(raw: str, annotation: str) -> bool:
    assert raw in GO_PARSE_BOOL, f"{annotation}={raw!r}: parseutil.ParseBool would fail and the injector refuse the pod"
    return GO_PARSE_BOOL[raw]


def _parse_int(raw: str, annotation: str) -> int:
    try:
        return int(raw, 10)
    except ValueError:
        raise AssertionError(f"{annotation}={raw!r}: parseutil.ParseInt would fail") from None


def admitted_pod(deployment: dict[str, Any]) -> dict[str, Any]:
    """The pod as the injector sees it: the template after the ServiceAccount admission plugin."""
    pod = copy.deepcopy(deployment["spec"]["template"])
    spec = pod["spec"]
    if spec.get("automountServiceAccountToken", True):
        for c in spec["containers"]:
            c.setdefault("volumeMounts", []).append({"name": "kube-api-access-x", "mountPath": SA_MOUNT, "readOnly": True})
    out: dict[str, Any] = pod
    return out


def injector_errors(pod: dict[str, Any]) -> list[str]:
    """The quoted rules, applied to a pod; the injector's own error messages where it has one."""
    errors: list[str] = []
    ann: dict[str, str] = pod["metadata"].get("annotations", {})
    containers = pod["spec"].get("containers", [])
    try:
        # INJECT / PRE_POPULATE / INJECT_TOKEN / RUN_AS_SAME_ID: ParseBool on each boolean annotation set.
        for name in ("agent-inject", "agent-pre-populate", "agent-inject-token", "agent-run-as-same-user"):
            if P + name in ann:
                _parse_bool(ann[P + name], P + name)
        # NEW_PARSE_INT: run-as-user / run-as-group (INIT_DEFAULTS fills them in when absent).
        run_as_group = DEFAULT_AGENT_RUN_AS_GROUP
        for name in ("agent-run-as-user", "agent-run-as-group"):
            if P + name in ann:
                value = _parse_int(ann[P + name], P + name)
                if name == "agent-run-as-group":
                    run_as_group = value
    except AssertionError as exc:
        return [str(exc)]
    # RUN_AS_SAME_ID
    if GO_PARSE_BOOL.get(ann.get(P + "agent-run-as-same-user", "false")):
        sc = containers[0].get("securityContext") if containers else None
        if not containers:
            errors.append("No containers found in Pod Spec")
        elif sc is None:
            errors.append("No SecurityContext found for Container 0")
        elif sc.get("runAsUser") is None:
            errors.append("RunAsUser is nil for Container 0's SecurityContext")
        elif sc["runAsUser"] == 0:
            errors.append("container not allowed to run as root")
        else:
            # AGENT_SECURITY_CONTEXT: the agent would run as root-ish when either id is 0.
            if run_as_group == 0:
                errors.append("agent-run-as-group 0: the agent container would get runAsNonRoot false")
    # SERVICEACCOUNT (called by New, before Validate)
    if not any("serviceaccount" in m.get("mountPath", "") for c in containers for m in c.get("volumeMounts", [])):
        errors.append("failed to find service account volume mount")
    # VALIDATE: with no agent-configmap the auth type defaults to kubernetes, which needs a role;
    # INIT_DEFAULTS sets auth-path only when absent, so a present but empty one stays empty.
    if not ann.get(P + "agent-configmap"):
        auth_type = ann.get(P + "auth-type", "kubernetes")
        if auth_type == "kubernetes" and not ann.get(P + "role") and not ann.get(P + "auth-config-role"):
            errors.append("no Vault role found")
        if P + "auth-path" in ann and not ann[P + "auth-path"]:
            errors.append("no Vault Auth Path found")
    return errors


def _sidecar(*extra: str) -> dict[str, Any]:
    return one(render("sidecar", *extra), "Deployment")


def test_rules_are_quoted_from_the_source() -> None:
    # The checks above are only as good as the quotes; these are the lines the checks rely on.
    assert 'errors.New("RunAsUser is nil for Container 0\'s SecurityContext")' in RUN_AS_SAME_ID
    assert "pod.Spec.Containers[0].SecurityContext.RunAsUser" in RUN_AS_SAME_ID
    assert 'errors.New("no Vault role found")' in VALIDATE
    assert 'strings.Contains(volumes.MountPath, "serviceaccount")' in SERVICEACCOUNT
    assert '"path": path.Join(a.Annotations[AnnotationVaultSecretVolumePath], "token")' in TOKEN_SINK
    assert "RunAsGroup:             pointerutil.Int64Ptr(a.RunAsGroup)" in AGENT_SECURITY_CONTEXT


def test_sidecar_pod_passes_every_triggered_injector_rule() -> None:
    deployment = _sidecar()
    pod = admitted_pod(deployment)
    ann = pod["metadata"]["annotations"]
    # The rules are triggered: the chart sets these annotations.
    assert ann[P + "agent-inject"] == "true"
    assert ann[P + "agent-run-as-same-user"] == "true"
    assert injector_errors(pod) == []
    bridge = pod["spec"]["containers"][0]
    assert bridge["name"] == "bridge", "the bridge must be container 0 (RUN_AS_SAME_ID reads Containers[0])"
    uid = bridge["securityContext"]["runAsUser"]
    assert uid == deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == 10001
    # AGENT_SECURITY_CONTEXT: the agent runs as the bridge's UID and the annotated group.
    assert int(ann[P + "agent-run-as-group"]) == bridge["securityContext"]["runAsGroup"] == 10001


def test_agent_token_sink_is_the_bridges_token_file() -> None:
    # TOKEN_SINK: agent-inject-token sinks to <secret volume path>/token (INIT_DEFAULTS: /vault/secrets).
    import yaml

    docs = render("sidecar")
    cm = next(d for d in docs if d["kind"] == "ConfigMap" and "config.yaml" in d.get("data", {}))
    cfg = yaml.safe_load(cm["data"]["config.yaml"])
    assert cfg["vault"]["auth"]["token_file"] == f"{SECRET_VOLUME_PATH}/token"


def test_checker_reproduces_the_reported_denial() -> None:
    # The pod of the previous chart (runAsUser only on the pod) is refused with the injector's message.
    pod = admitted_pod(_sidecar())
    del pod["spec"]["containers"][0]["securityContext"]["runAsUser"]
    assert injector_errors(pod) == ["RunAsUser is nil for Container 0's SecurityContext"]
    root = admitted_pod(_sidecar())
    root["spec"]["containers"][0]["securityContext"]["runAsUser"] = 0
    assert "container not allowed to run as root" in injector_errors(root)
    bad_bool = admitted_pod(_sidecar())
    bad_bool["metadata"]["annotations"][P + "agent-inject-token"] = "yes"
    assert "parseutil.ParseBool would fail" in injector_errors(bad_bool)[0]
    no_role = admitted_pod(_sidecar())
    no_role["metadata"]["annotations"][P + "role"] = ""
    assert injector_errors(no_role) == ["no Vault role found"]
    no_sa = _sidecar()
    no_sa["spec"]["template"]["spec"]["automountServiceAccountToken"] = False
    assert injector_errors(admitted_pod(no_sa)) == ["failed to find service account volume mount"]


def test_custom_mount_renders_a_nonempty_auth_path() -> None:
    pod = admitted_pod(_sidecar("--set", "vault.kubernetesAuth.mount=kubernetes-prod"))
    assert pod["metadata"]["annotations"][P + "auth-path"] == "auth/kubernetes-prod"
    assert injector_errors(pod) == []


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("securityContext.runAsUser=null", "securityContext.runAsUser must be set and non-zero"),
        ("securityContext.runAsUser=0", "securityContext.runAsUser must be set and non-zero"),
        ("serviceAccount.automountServiceAccountToken=false", "automountServiceAccountToken must be true"),
        ("vault.kubernetesAuth.role=", "/vault/kubernetesAuth/role"),  # the schema already refuses it
    ],
)
def test_chart_refuses_values_the_injector_would_deny(flag: str, message: str) -> None:
    from tests.deploy.deploy_tools import VALUE_SETS

    proc = helm_template(VALUE_SETS["sidecar"], "--set", flag, check=False)
    assert proc.returncode != 0, f"--set {flag} rendered a pod the injector refuses"
    assert message in proc.stderr, proc.stderr
