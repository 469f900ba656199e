"""Typed settings, validated once at start; every field documented (unit, default, why).

The YAML file is the only source of settings, plus the usual Vault environment variables
(`VAULT_ADDR`, `VAULT_TOKEN`, `VAULT_NAMESPACE`, `VAULT_CACERT`, `VAULT_CLIENT_CERT`,
`VAULT_CLIENT_KEY`, `VAULT_SKIP_VERIFY`) and `BRIDGE_HA_ADVERTISE_ADDRESS` (a pod's own IP cannot
be written in a file), which fill a key the file leaves unset. A wrong
setting raises `ConfigError` naming the dotted key and what was expected; the CLI turns that
into exit code 2. Secrets are never settings: only paths to files (or Vault paths) that hold them.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from bridge.errors import ConfigError

UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
REGIONS: dict[str, tuple[str, str]] = {
    "eu": ("https://api-eu.cybedefend.com", "https://auth-eu.cybedefend.com"),
    "us": ("https://api-us.cybedefend.com", "https://auth-us.cybedefend.com"),
}


class _Section(BaseModel):
    # Unknown keys are errors: a typo must not silently fall back to a default.
    model_config = ConfigDict(extra="forbid", frozen=True)


def _uuid(value: str | None, what: str = "a UUID") -> str | None:
    if value is not None and not UUID_RE.match(value):
        raise ValueError(f"expected {what}, got {value!r}")
    return value.lower() if value else value


class TLSSettings(_Section):
    ca_cert: Path | None = Field(None, description="PEM CA bundle that signs Vault's certificate. Env: VAULT_CACERT.")
    client_cert: Path | None = Field(None, description="PEM client certificate for mutual TLS. Env: VAULT_CLIENT_CERT.")
    client_key: Path | None = Field(None, description="PEM key of `client_cert`. Env: VAULT_CLIENT_KEY.")
    skip_verify: bool = Field(
        False,
        description="Do not verify Vault's certificate. Only for tests; logs a warning at start. Env: VAULT_SKIP_VERIFY.",
    )


class VaultAuthSettings(_Section):
    method: Literal["token", "approle", "kubernetes", "jwt"] = Field(
        "token", description="How the bridge logs in to Vault."
    )
    token_file: Path | None = Field(
        None,
        description=(
            "token: file holding the Vault token, re-read when it changes (a Vault Agent sink in "
            "sidecar mode). Without it the token comes from VAULT_TOKEN."
        ),
    )
    mount: str | None = Field(
        None, description="Auth mount path; default is the method's name (`approle`, `kubernetes`, `jwt`)."
    )
    role: str | None = Field(None, description="kubernetes/jwt: the Vault role to log in as.")
    role_id_file: Path | None = Field(None, description="approle: file holding the role_id.")
    secret_id_file: Path | None = Field(
        None, description="approle: file holding the secret_id; re-read at every login so it can be rotated."
    )
    jwt_file: Path | None = Field(
        None,
        description=(
            "kubernetes/jwt: file holding the JWT. Default for kubernetes is the projected "
            "service-account token, /var/run/secrets/kubernetes.io/serviceaccount/token."
        ),
    )

    @model_validator(mode="after")
    def _needs(self) -> VaultAuthSettings:
        if self.method == "approle" and (self.role_id_file is None or self.secret_id_file is None):
            raise ValueError("approle needs role_id_file and secret_id_file")
        if self.method in ("kubernetes", "jwt") and not self.role:
            raise ValueError(f"{self.method} needs role")
        if self.method == "jwt" and self.jwt_file is None:
            raise ValueError("jwt needs jwt_file")
        return self


class VaultSettings(_Section):
    address: str = Field("http://127.0.0.1:8200", description="Vault or OpenBao address. Env: VAULT_ADDR.")
    namespace: str | None = Field(None, description="Vault Enterprise namespace. Env: VAULT_NAMESPACE.")
    tls: TLSSettings = Field(default_factory=TLSSettings, description="TLS to Vault.")
    auth: VaultAuthSettings = Field(default_factory=VaultAuthSettings, description="Vault login.")
    timeout_seconds: float = Field(10.0, gt=0, le=300, description="Timeout of one Vault request, seconds.")
    concurrency: int = Field(
        8,
        ge=1,
        le=64,
        description=(
            "Vault requests in flight at once during discovery. Bounded so a large tree does not "
            "hammer Vault; 8 reaches most of a local server's throughput."
        ),
    )
    max_requests_per_second: float | None = Field(
        None, gt=0, description="Optional cap on Vault requests per second (token bucket). None: no cap."
    )
    renew_fraction: float = Field(
        2 / 3, gt=0.1, lt=0.95, description="Renew the bridge's own token at this fraction of its TTL, as Vault Agent does."
    )
    revoke_on_shutdown: bool = Field(
        True, description="Revoke the bridge's own token at exit when the bridge logged in itself (not for token auth)."
    )

    @field_validator("address")
    @classmethod
    def _addr(cls, v: str) -> str:
        if not re.match(r"^https?://[^/\s]+", v):
            raise ValueError(f"expected an http(s):// URL, got {v!r}")
        return v.rstrip("/")


class SourceSettings(_Section):
    mount: str = Field(description="KV mount path, e.g. `secret`.")
    path: str = Field("", description="Prefix inside the mount, searched recursively. Empty: the whole mount.")
    kv_version: Literal["auto", 1, 2] = Field(
        "auto", description="KV engine version; `auto` asks Vault once (needs read on sys/internal/ui/mounts)."
    )
    organization_id: str | None = Field(
        None, description="Default CybeDefend organization for this source's secrets (UUID)."
    )
    token_key: str = Field("accessToken", description="Data key holding the DockerHub token.")
    username_key: str = Field("dockerhubUsername", description="Data key holding the DockerHub username.")

    @field_validator("mount")
    @classmethod
    def _mount(cls, v: str) -> str:
        v = v.strip("/")
        if not v or ".." in v.split("/"):
            raise ValueError("expected a non-empty mount path without '..'")
        return v

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        v = v.strip("/")
        if ".." in v.split("/"):
            raise ValueError("expected a path without '..'")
        return v

    @field_validator("organization_id")
    @classmethod
    def _org(cls, v: str | None) -> str | None:
        return _uuid(v, "an organization UUID")


class TagSettings(_Section):
    project_id_key: str = Field(
        "cybedefend-project-id",
        description="custom_metadata key (KV v2) or data key (KV v1) carrying the CybeDefend project ID. Its presence makes a secret a candidate.",
    )
    organization_id_key: str = Field(
        "cybedefend-organization-id", description="Key carrying the organization ID; falls back to the source's, then the global default."
    )
    description_key: str = Field("cybedefend-description", description="Key carrying an optional description for the credential.")


class CybeDefendAuthSettings(_Section):
    mode: Literal["pat", "api_key"] = Field(
        "pat",
        description="`pat`: a personal access token exchanged for short-lived JWTs (current API). `api_key`: the legacy x-api-key header; CybeDefend answers 410 since February 2026.",
    )
    credential_file: Path | None = Field(None, description="File holding the PAT or API key (a mounted Kubernetes Secret).")
    credential_vault_path: str | None = Field(
        None, description="Or a KV v2 path `mount/path#field` holding the PAT or API key."
    )

    @model_validator(mode="after")
    def _one_source(self) -> CybeDefendAuthSettings:
        if (self.credential_file is None) == (self.credential_vault_path is None):
            raise ValueError("exactly one of credential_file or credential_vault_path is required")
        if self.credential_vault_path is not None and not re.match(r"^[^#\s]+/[^#\s]+#[^#\s]+$", self.credential_vault_path):
            raise ValueError("credential_vault_path must look like mount/path#field")
        return self


class RetrySettings(_Section):
    max_attempts: int = Field(5, ge=1, le=20, description="Attempts of one request on transient errors (5xx, 429, timeouts).")
    base_seconds: float = Field(0.5, gt=0, description="First backoff, seconds; doubles per attempt, full jitter.")
    cap_seconds: float = Field(30.0, gt=0, description="Longest single backoff or honoured Retry-After, seconds.")


class CybeDefendSettings(_Section):
    region: Literal["eu", "us"] = Field("eu", description="Picks the API and token-service URLs.")
    api_url: str | None = Field(None, description="Overrides the region's API URL (a gateway, or the local double).")
    auth_url: str | None = Field(None, description="Overrides the region's token-service URL.")
    organization_id: str | None = Field(None, description="Global default organization (UUID).")
    auth: CybeDefendAuthSettings = Field(description="How the bridge authenticates to CybeDefend.")
    timeout_seconds: float = Field(15.0, gt=0, le=300, description="Timeout of one API request, seconds.")
    max_concurrency: int = Field(4, ge=1, le=64, description="API requests in flight at once.")
    max_requests_per_second: float = Field(
        10.0, gt=0, description="Cap on API requests per second (token bucket). No limits are published; be gentle."
    )
    retry: RetrySettings = Field(default_factory=RetrySettings, description="Retry policy for transient failures.")
    token_renew_margin_seconds: float = Field(
        60.0, ge=0, description="Exchange the PAT again this long before the bearer token expires, seconds."
    )

    @field_validator("organization_id")
    @classmethod
    def _org(cls, v: str | None) -> str | None:
        return _uuid(v, "an organization UUID")

    @property
    def resolved_api_url(self) -> str:
        return (self.api_url or REGIONS[self.region][0]).rstrip("/")

    @property
    def resolved_auth_url(self) -> str:
        return (self.auth_url or REGIONS[self.region][1]).rstrip("/")


class SyncSettings(_Section):
    instance: str = Field(
        "default",
        pattern=r"^[a-z0-9][a-z0-9-]{0,31}$",
        description="Names this bridge in ownership markers. Two bridges sharing an organization need different names.",
    )
    deletion_policy: Literal["retain", "delete"] = Field(
        "retain", description="What happens to a credential whose secret was deleted or untagged: kept and marked orphaned, or deleted."
    )
    max_deletes_per_pass: int = Field(
        10, ge=0, description="Guard rail: more deletions than this in one pass pause all deletions (status flag, log line, metric)."
    )
    drift_check_interval_seconds: float = Field(
        3600.0, gt=0, description="How often to confirm that registered credentials still exist in CybeDefend, seconds."
    )
    allow_any_token_shape: bool = Field(
        False, description="Accept tokens that do not look like DockerHub tokens (dckr_pat_…, dckr_oat_…)."
    )
    token_max_length: int = Field(512, ge=16, le=65536, description="Longest accepted token, characters.")
    username_max_length: int = Field(255, ge=1, le=4096, description="Longest accepted DockerHub username, characters.")
    description_max_length: int = Field(
        200, ge=0, le=2000, description="Longest operator description kept (the marker is added after it), characters."
    )
    verify_with_dockerhub: bool = Field(
        False, description="Check each new token against DockerHub's auth endpoint before registering it."
    )
    dockerhub_auth_url: str = Field(
        "https://hub.docker.com/v2/auth/token", description="DockerHub token check endpoint (for verify_with_dockerhub)."
    )
    retry_base_seconds: float = Field(30.0, gt=0, description="First wait before a failed secret is tried again, seconds.")
    retry_cap_seconds: float = Field(3600.0, gt=0, description="Longest wait between attempts for one failing secret, seconds.")
    shutdown_grace_seconds: float = Field(20.0, gt=0, description="How long a stop waits for the secret in flight, seconds.")


class LedgerSettings(_Section):
    path: Path = Field(Path("/var/lib/cybedefend-bridge/ledger.sqlite3"), description="SQLite ledger file (created 0600).")
    key_source: Literal["vault", "file"] = Field(
        "vault",
        description=(
            "Where the HMAC key for fingerprints and markers lives. `vault` (default) survives the "
            "loss of the local volume and is shared by replicas; `file` only suits a single replica "
            "on a persistent volume."
        ),
    )
    key_file: Path = Field(Path("/var/lib/cybedefend-bridge/fingerprint.key"), description="Key file for key_source=file (0600).")
    # A fixed default, not "the first source's mount": the key's location must not move when a
    # source is added in front (that minted a new key and registered every token twice).
    state_mount: str = Field(
        "secret",
        description=(
            "KV v2 mount for the bridge's own state (HMAC key, HA lease). A fixed default, independent of the "
            "sources; the state path must lie outside every source prefix. Installations whose key is at the "
            "old default (the first source's mount) keep using it from there, with a warning."
        ),
    )
    state_path: str = Field(
        "cybedefend-bridge/{instance}", description="Path in state_mount for the bridge's own state; `{instance}` is sync.instance."
    )

    @field_validator("state_mount", "state_path")
    @classmethod
    def _state_loc(cls, v: str) -> str:
        v = v.strip("/")
        if not v or ".." in v.split("/"):
            raise ValueError("expected a non-empty path without '..'")
        return v


OLD_STATE_PATH = "cybedefend-bridge/{instance}"  # the state path's default, before and after the fixed mount


class ScheduleSettings(_Section):
    interval_seconds: float = Field(300.0, ge=5, description="Full pass every this many seconds.")
    jitter_fraction: float = Field(0.1, ge=0, le=0.5, description="Random spread added to each interval, as a fraction of it.")
    cron: str | None = Field(None, description="A crontab expression used instead of the interval (5 fields).")
    misfire_grace_seconds: float = Field(60.0, gt=0, description="A run late by more than this is skipped (the next one covers it).")
    first_run_max_delay_seconds: float = Field(10.0, ge=0, description="The first pass starts after a random delay up to this, seconds.")


class ServerSettings(_Section):
    bind: str = Field("0.0.0.0", description="Address the HTTP endpoints listen on.")  # noqa: S104 - a pod's port; probes and Prometheus come from outside
    port: int = Field(8080, ge=0, le=65535, description="Port for /metrics, /healthz, /readyz, /v1/*. 0: any free port.")
    webhook_token_file: Path | None = Field(
        None, description="File holding the bearer token for POST /v1/sync and /v1/audit. Unset: those endpoints are off."
    )
    status_requires_token: bool = Field(False, description="Require the webhook bearer token for /v1/status too.")
    metrics_token_file: Path | None = Field(
        None, description="File holding a bearer token required on GET /metrics and /v1/status. Unset: those are open (protect them with the NetworkPolicy)."
    )
    max_body_bytes: int = Field(1 << 20, ge=1024, description="Largest accepted request body, bytes.")
    ready_max_intervals: float = Field(
        3.0, gt=0, description="/v1/status and the pass_fresh metric call the last full pass stale past this many intervals (readiness does not depend on it)."
    )
    tls_cert_file: Path | None = Field(
        None, description="PEM certificate (chain) served on the HTTP port; with tls_key_file, the port speaks HTTPS only. Re-read when it changes."
    )
    tls_key_file: Path | None = Field(None, description="PEM private key of tls_cert_file (unencrypted). Re-read when it changes.")
    threads: int = Field(4, ge=1, le=64, description="Worker threads answering requests; connections beyond them wait without holding a thread.")
    connection_limit: int = Field(
        256, ge=8, le=10000, description="Open connections at most; past it new ones wait in the kernel's backlog until one closes."
    )
    channel_timeout_seconds: int = Field(
        30, ge=1, le=3600, description="A connection with no activity for this long is closed, seconds."
    )

    @model_validator(mode="after")
    def _tls_pair(self) -> ServerSettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file are set together or not at all")
        return self


class AuditFileSettings(_Section):
    path: Path = Field(description="The file audit device's log, followed like `tail -F`.")
    watch: Literal["auto", "poll"] = Field(
        "auto", description="auto: wake on Linux inotify events for the file, polling where inotify is missing, out of watches or blind (network file systems); poll: always poll."
    )
    poll_seconds: float = Field(0.2, gt=0, le=10, description="When polling (or draining a rotated file), how often the file is checked for new lines and rotation, seconds.")
    recheck_seconds: float = Field(
        1.0, gt=0, le=60, description="With inotify, the file is still checked this often without an event (inotify misses some rotations and remote writes), seconds."
    )


class AuditSocketSettings(_Section):
    bind: str = Field("127.0.0.1", description="Address of the TCP listener for a `socket` audit device.")
    port: int = Field(9514, ge=0, le=65535, description="Port of that listener (not 9090: that is Prometheus's default).")
    allowed_peers: list[str] = Field(
        default_factory=lambda: ["127.0.0.1/32", "::1/128"], description="CIDRs allowed to connect; others are refused."
    )
    max_connections: int = Field(
        8, ge=1, le=256, description="Connections served at once; past it the longest-idle one is evicted, else the new one is refused."
    )
    idle_timeout_seconds: float = Field(
        900.0, ge=1, le=86400, description="A connection silent this long is closed (Vault reconnects on its next write), seconds."
    )


class TriggerSettings(_Section):
    audit_file: AuditFileSettings | None = Field(None, description="Tail a file audit device (sidecar or Vault host).")
    audit_socket: AuditSocketSettings | None = Field(None, description="Listen for a socket audit device (see caveats in docs).")
    audit_ingest: bool = Field(False, description="Accept forwarded audit lines on POST /v1/audit (needs webhook_token_file).")
    debounce_seconds: float = Field(0.25, ge=0, le=60, description="A burst of writes to one path within this costs one sync, seconds.")
    leading_edge: bool = Field(
        True, description="The first write to a path after debounce_seconds of quiet syncs at once; the rest of a burst costs one follow-up sync."
    )
    queue_size: int = Field(1000, ge=1, description="Pending targeted syncs; on overflow a full pass is scheduled instead.")


# http(s)://host:port and an optional trailing slash; host a name, an IPv4 or a bracketed IPv6.
_ADVERTISE = re.compile(r"(https?)://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):([0-9]{1,5})/?")


def looks_like_advertise_address(address: str) -> bool:
    """`http(s)://host:port` and nothing more: no user info, path, query or fragment."""
    m = _ADVERTISE.fullmatch(address)
    if m is None or not 0 < int(m.group(3)) <= 65535:
        return False
    host = m.group(2)
    if host.startswith("["):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return False
    return True


class HASettings(_Section):
    enabled: bool = Field(False, description="Hold a lease in Vault so that only one replica acts.")
    lease_path: str = Field("leader", description="Name of the lease under ledger.state_path.")
    ttl_seconds: float = Field(
        30.0, ge=2,
        description=(
            "Lease lifetime; a standby takes over within about twice this. A lease document's own ttl_seconds "
            "is never trusted beyond it. Keep ttl_seconds * (1 - renew_fraction) above cybedefend.timeout_seconds "
            "+ 1, so that a write never has to wait for a renewal."
        ),
    )
    renew_fraction: float = Field(1 / 3, gt=0, lt=1, description="Renew the lease at this fraction of its TTL.")
    advertise_address: str | None = Field(
        None,
        description=(
            "URL other replicas use to forward triggers to this one: http(s)://host:port and nothing more "
            "(e.g. http://$(POD_IP):8080; an IPv6 literal gets its brackets added, so an IPv6 pod's "
            "http://fd00::5:8080 becomes http://[fd00::5]:8080). Standbys ignore a lease address of any other shape."
        ),
    )

    @field_validator("advertise_address", mode="before")
    @classmethod
    def _bracket_ipv6(cls, value: object) -> object:
        # Kubernetes substitutes a bare IPv6 pod IP into `http://$(POD_IP):8080` (single-stack IPv6
        # and dual-stack clusters whose primary family is IPv6): add the brackets a URL needs. The
        # port is required, so the last colon is the port's and the rest must be an IPv6 address.
        if not isinstance(value, str):
            return value
        scheme, sep, rest = value.partition("://")
        host, colon, port = rest.rstrip("/").rpartition(":")
        if not sep or not colon or host.startswith("[") or ":" not in host:
            return value
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return value
        return f"{scheme}://[{host}]:{port}"

    @field_validator("advertise_address")
    @classmethod
    def _advertise_shape(cls, value: str | None) -> str | None:
        # The same rule standbys apply to the address a lease names: what one replica writes,
        # the others must accept.
        if value is not None and not looks_like_advertise_address(value):
            raise ValueError("must be http(s)://host:port and nothing more (e.g. http://10.0.0.5:8080)")
        return value


class LoggingSettings(_Section):
    level: Literal["debug", "info", "warning", "error"] = Field("info", description="Lowest level logged.")
    format: Literal["json", "console", "auto"] = Field(
        "auto", description="`json`: one JSON object per line. `console`: for people. `auto`: console on a terminal, else json."
    )


class Settings(_Section):
    vault: VaultSettings = Field(default_factory=VaultSettings, description="Vault connection and login.")
    sources: list[SourceSettings] = Field(min_length=1, description="Where tagged DockerHub tokens live.")
    tags: TagSettings = Field(default_factory=TagSettings, description="Names of the tag keys.")
    cybedefend: CybeDefendSettings = Field(description="The CybeDefend API.")
    sync: SyncSettings = Field(default_factory=SyncSettings, description="What a pass does.")
    ledger: LedgerSettings = Field(default_factory=LedgerSettings, description="The bridge's local state.")
    schedule: ScheduleSettings = Field(default_factory=ScheduleSettings, description="When full passes run (daemon).")
    server: ServerSettings = Field(default_factory=ServerSettings, description="HTTP endpoints (daemon).")
    triggers: TriggerSettings = Field(default_factory=TriggerSettings, description="Event-driven targeted syncs (daemon).")
    ha: HASettings = Field(default_factory=HASettings, description="High availability (daemon).")
    logging: LoggingSettings = Field(default_factory=LoggingSettings, description="Logs.")

    @property
    def state_mount(self) -> str:
        return self.ledger.state_mount

    @property
    def state_path(self) -> str:
        return self.ledger.state_path.format(instance=self.sync.instance).strip("/")

    @property
    def legacy_state_location(self) -> tuple[str, str] | None:
        """Where the state lived before the fixed default: the first source's mount and the
        state path (the old default template when none is set). None when that is the current one."""
        path = self.state_path if "state_path" in self.ledger.model_fields_set else OLD_STATE_PATH.format(
            instance=self.sync.instance)
        old = (self.sources[0].mount, path.strip("/"))
        return None if old == (self.state_mount, self.state_path) else old

    @model_validator(mode="after")
    def _state_outside_sources(self) -> Settings:
        # Anyone who may write a tagged secret may write under its source prefix: the key and the
        # lease must not live there (issue 11, scenario 7). Raised as ConfigError (not a
        # ValueError) so that it names the key and is not rewrapped by pydantic.
        state = self.state_path
        for i, src in enumerate(self.sources):
            if src.mount != self.state_mount:
                continue
            inside = not src.path or state == src.path or state.startswith(src.path + "/") or src.path.startswith(state + "/")
            if inside:
                raise ConfigError(
                    "ledger.state_path",
                    f"the bridge's state ({self.state_mount}/{state}) lies inside sources[{i}] "
                    f"({src.mount}/{src.path}); set ledger.state_mount/ledger.state_path outside every source prefix",
                )
        return self


# Environment variables that fill a key the file leaves unset (Vault's usual names).
_ENV: dict[tuple[str, ...], str] = {
    ("vault", "address"): "VAULT_ADDR",
    ("vault", "namespace"): "VAULT_NAMESPACE",
    ("vault", "tls", "ca_cert"): "VAULT_CACERT",
    ("vault", "tls", "client_cert"): "VAULT_CLIENT_CERT",
    ("vault", "tls", "client_key"): "VAULT_CLIENT_KEY",
    ("vault", "tls", "skip_verify"): "VAULT_SKIP_VERIFY",
    # The Helm chart sets this to http://$(POD_IP):8080 (a file cannot hold the pod's own IP).
    ("ha", "advertise_address"): "BRIDGE_HA_ADVERTISE_ADDRESS",
}


def _apply_env(raw: dict[str, Any], env: Mapping[str, str]) -> None:
    for keys, var in _ENV.items():
        if var not in env or env[var] == "":
            continue
        node = raw
        for k in keys[:-1]:
            child = node.get(k)
            if child is None:
                child = node[k] = {}
            if not isinstance(child, dict):
                return  # the shape error is reported by validation
            node = child
        node.setdefault(keys[-1], env[var])


class ConfigErrors(ConfigError):
    """Every problem of one configuration, reported together: fixing one to meet the next wastes a day.

    `key` and `expected` are the first problem's (what callers that handle one error read);
    the message lists them all, one a line.
    """

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__(*problems[0])
        self.problems = list(problems)

    def __str__(self) -> str:
        return "\n".join(f"configuration error at {key}: {expected}" for key, expected in self.problems)


def _all_errors(exc: ValidationError) -> ConfigError:
    problems = [_problem(err) for err in exc.errors()]
    return ConfigErrors(problems) if len(problems) > 1 else ConfigError(*problems[0])


def _problem(err: Any) -> tuple[str, str]:
    key = ".".join(str(p) for p in err["loc"]) or "(top level)"
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown key (check the spelling; see docs/configuration.md)"
    elif err["type"] == "missing":
        msg = "required key is missing"
    else:
        msg = msg.removeprefix("Value error, ")
        expected = err.get("ctx", {}).get("expected")
        if expected and str(expected) not in msg:
            msg = f"{msg} (expected {expected})"
    return key, msg


def parse_settings(raw: Any, env: Mapping[str, str] | None = None) -> Settings:
    """Validate an already-parsed mapping. `env` defaults to the process environment."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError("(top level)", "expected a mapping of sections (vault, sources, cybedefend, …)")
    raw = dict(raw)
    _apply_env(raw, os.environ if env is None else env)
    try:
        return Settings.model_validate(raw)
    except ValidationError as exc:
        raise _all_errors(exc) from None


def load_settings(path: Path, env: Mapping[str, str] | None = None) -> Settings:
    """Read and validate the YAML file. Raises ConfigError for every problem, file errors included."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("--config", f"cannot read {path}: {exc.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError("--config", f"{path} is not valid YAML{where}") from None
    return parse_settings(raw, env)


def named_files(settings: Settings) -> list[tuple[str, Path]]:
    """The files the configuration names that must exist and be readable before a command runs.

    Not the ledger, the key file or the audit log: the bridge creates the first two, and the
    audit log may appear later (a Vault that has not written yet).
    """
    auth, tls = settings.vault.auth, settings.vault.tls
    files: list[tuple[str, Path | None]] = [
        ("vault.tls.ca_cert", tls.ca_cert),
        ("vault.tls.client_cert", tls.client_cert),
        ("vault.tls.client_key", tls.client_key),
        ("vault.auth.token_file", auth.token_file if auth.method == "token" else None),
        ("vault.auth.role_id_file", auth.role_id_file if auth.method == "approle" else None),
        ("vault.auth.secret_id_file", auth.secret_id_file if auth.method == "approle" else None),
        ("vault.auth.jwt_file", auth.jwt_file if auth.method in ("jwt", "kubernetes") else None),
        ("cybedefend.auth.credential_file", settings.cybedefend.auth.credential_file),
        ("server.webhook_token_file", settings.server.webhook_token_file),
    ]
    return [(key, path) for key, path in files if path is not None]


def check_named_files(settings: Settings) -> None:
    """Raise ConfigError listing every named file that is missing or unreadable (exit code 2 everywhere)."""
    problems: list[tuple[str, str]] = []
    for key, path in named_files(settings):
        try:
            with path.open("rb"):
                pass
        except OSError as exc:
            problems.append((key, f"cannot read {path}: {exc.strerror or type(exc).__name__}"))
    if len(problems) == 1:
        raise ConfigError(*problems[0])
    if problems:
        raise ConfigErrors(problems)


def iter_fields(model: type[BaseModel] = Settings, prefix: str = "") -> list[tuple[str, str]]:
    """Every dotted key with its description; docs/configuration.md is checked against this."""
    out: list[tuple[str, str]] = []
    for name, info in model.model_fields.items():
        key = f"{prefix}{name}"
        out.append((key, info.description or ""))
        ann = info.annotation
        for sub in _models_in(ann):
            out.extend(iter_fields(sub, key + ("[]." if _is_list(ann) else ".")))
    return out


def _models_in(ann: Any) -> list[type[BaseModel]]:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return [ann]
    return [a for a in getattr(ann, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)]


def _is_list(ann: Any) -> bool:
    return getattr(ann, "__origin__", None) is list
