"""Composition root: builds the parts from settings and wires them. Nothing else does wiring.

Every other module receives what it needs (settings, metrics, clock, transport, stop event);
only here are concrete adapters chosen. Tests build the same parts with fakes or with their
own transport instead of calling this module.
"""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bridge.config import Settings
from bridge.cybedefend.client import CybeDefendClient, read_credential_file
from bridge.daemon.server import Hooks, HttpServer
from bridge.dockerhub import DockerHubVerifier
from bridge.engine.sync import SyncEngine
from bridge.errors import BridgeError, ConfigError, KeyIdentityError, VaultInvalidRequest, VaultPermissionDenied, WriterBusy
from bridge.keyring import KEY_STATE_NAME, Keyring, KeyStore, load_key_file, load_key_from_vault
from bridge.ledger import ProcessLock, SqliteLedger
from bridge.logs import get_logger, register_secret
from bridge.metrics import Metrics
from bridge.model import Marker, Sensitive
from bridge.ports import Registrar, WriteGuard
from bridge.retry import backoff_delay
from bridge.validation import REJECT_CODES
from bridge.vault.source import StateArea, VaultSource

log = get_logger(__name__)


def count_our_credentials(settings: Settings, registrar: Registrar) -> int:
    """Credentials carrying this instance's marker in each configured organization (before minting a key)."""
    orgs = sorted({o for o in (settings.cybedefend.organization_id, *(s.organization_id for s in settings.sources)) if o})
    if not orgs:
        log.warning("key_mint_unchecked", reason="no organization configured (only per-secret tags): "
                    "cannot look for credentials made with a previous key")
    n = 0
    for org in orgs:
        for cred in registrar.all_credentials(org):
            marker = Marker.parse(cred.description)
            n += marker is not None and marker.instance == settings.sync.instance
    return n


def load_keyring(settings: Settings, vault: VaultSource, registrar: Registrar | None = None) -> Keyring:
    """The key, from a file or Vault; logs its short id (never the key).

    With Vault, a key found only at the old default location (the first source's mount) is used
    from there, and all state (the HA lease too) stays there, with a warning. A key is minted
    only after `registrar` shows no credential with this instance's marker (none without one)."""
    if settings.ledger.key_source == "file":
        keyring = Keyring(load_key_file(settings.ledger.key_file))
        log.info("state_key", key_id=keyring.key_id, source="file")
        return keyring
    legacy_loc = settings.legacy_state_location
    legacy = vault.state_area(*legacy_loc) if legacy_loc is not None else None
    primary = vault.state_area(settings.state_mount, settings.state_path)
    store: KeyStore = primary
    if legacy is not None and "state_mount" not in settings.ledger.model_fields_set:
        # The fixed default may not be readable by an old policy (or the `secret` mount may not
        # exist): then the old location is where the key is, if anywhere.
        try:
            primary.read_state(KEY_STATE_NAME)
        except (VaultPermissionDenied, VaultInvalidRequest) as exc:
            log.warning("state_default_unreadable", location=primary.location, error=str(exc))
            store, legacy = legacy, None

    def ours() -> int:
        if registrar is None:
            raise KeyIdentityError(f"no fingerprint key at {store.location} yet, and CybeDefend cannot be asked "
                                   "whether credentials made with an earlier key exist: none is minted")
        return count_our_credentials(settings, registrar)

    key, found = load_key_from_vault(store, instance=settings.sync.instance, legacy=legacy, our_credentials=ours)
    if found is not primary:
        assert isinstance(found, StateArea)
        vault.use_state_area(found)
        log.warning(
            "state_at_old_location", location=found.location, default=primary.location,
            hint=f"the key and lease stay at {found.location}; to keep them there set ledger.state_mount: "
                 f"{found.mount} (and ledger.state_path: {found.path}) explicitly, or move them: copy "
                 f"{found.location}/{KEY_STATE_NAME} to {primary.location}/{KEY_STATE_NAME} with all replicas stopped",
        )
    keyring = Keyring(key)
    log.info("state_key", key_id=keyring.key_id, source="vault", location=vault.state_location)
    return keyring


def load_api_credential(settings: Settings, vault: VaultSource) -> Sensitive:
    auth = settings.cybedefend.auth
    if auth.credential_file is not None:
        cred = read_credential_file(auth.credential_file)
    else:
        assert auth.credential_vault_path is not None  # settings validation guarantees one of them
        try:
            cred = vault.read_secret_field(auth.credential_vault_path)
        except BridgeError as exc:
            raise ConfigError("cybedefend.auth.credential_vault_path", f"cannot read it from Vault: {exc}") from None
    register_secret(cred.reveal(), pinned=True)
    return cred


@dataclass
class Bridge:
    """The built parts of one bridge, closed together."""

    settings: Settings
    metrics: Metrics
    vault: VaultSource
    client: CybeDefendClient
    ledger: SqliteLedger
    keyring: Keyring
    engine: SyncEngine
    stop: threading.Event
    ledger_path: Path | None = None
    _closers: list[Callable[[], None]] = field(default_factory=list)

    def close(self, *, revoke: bool = True) -> None:
        for closer in reversed(self._closers):
            try:
                closer()
            except BridgeError as exc:
                log.warning("close_failed", error=str(exc))
        self._closers.clear()
        if revoke and self.settings.vault.revoke_on_shutdown:
            try:
                self.vault.revoke_self()
            except BridgeError as exc:
                log.warning("vault_revoke_failed", error=str(exc))
        self.vault.close()


def build(
    settings: Settings,
    *,
    metrics: Metrics | None = None,
    stop: threading.Event | None = None,
    ledger_path: Path | str | None = None,
    rng: random.Random | None = None,
) -> Bridge:
    """Log in to Vault, load the key and the CybeDefend credential, open the ledger."""
    metrics = metrics or Metrics()
    stop = stop or threading.Event()
    vault = VaultSource(settings, metrics)
    closers: list[Callable[[], None]] = []
    try:
        vault.login()
        credential = load_api_credential(settings, vault)
        client = CybeDefendClient(settings.cybedefend, credential, metrics, rng=rng)
        closers.append(client.close)
        keyring = load_keyring(settings, vault, client)  # after the client: it checks CybeDefend before minting
        ledger = SqliteLedger(ledger_path if ledger_path is not None else settings.ledger.path)
        closers.append(ledger.close)
    except BaseException:
        for closer in reversed(closers):
            closer()
        vault.close()
        raise
    verifier = None
    if settings.sync.verify_with_dockerhub:
        verifier = DockerHubVerifier(settings.sync.dockerhub_auth_url, timeout=settings.cybedefend.timeout_seconds)
        closers.append(verifier.close)
    engine = SyncEngine(settings, vault, client, ledger, keyring, metrics, stop=stop, rng=rng, verifier=verifier)
    path = Path(ledger_path if ledger_path is not None else settings.ledger.path)
    return Bridge(settings, metrics, vault, client, ledger, keyring, engine, stop, path, closers)


def _warn_short_ttl(settings: Settings) -> None:
    from bridge.daemon.ha import WRITE_MARGIN_SECONDS

    fresh = settings.ha.ttl_seconds * (1 - settings.ha.renew_fraction)
    if fresh < settings.cybedefend.timeout_seconds + WRITE_MARGIN_SECONDS:
        log.warning("ha_ttl_short_for_writes", lease_left_after_renewal=round(fresh, 1),
                    request_timeout=settings.cybedefend.timeout_seconds,
                    hint="a slow write could end after the lease deadline; raise ha.ttl_seconds")


@contextlib.contextmanager
def one_writer(bridge: Bridge, command: str, wait_seconds: float = 0.0,
               *, sleep: Callable[[float], None] = time.sleep) -> Iterator[WriteGuard]:
    """Be the one writer of this configuration while the block runs (issue 11, scenario 5).

    Without HA: the process lock next to the ledger. With HA: the same lease in Vault as the
    daemon's replicas, renewed by a thread while the block runs and released after. Waits up to
    `wait_seconds`, then WriterBusy naming the holder. The client checks the guard before each write.
    """
    settings = bridge.settings
    if not settings.ha.enabled:
        lock = ProcessLock(bridge.ledger_path or settings.ledger.path)
        lock.acquire(command, wait_seconds)
        bridge.client.write_guard = lock
        try:
            yield lock
        finally:
            bridge.client.write_guard = None
            lock.release()
        return
    from bridge.daemon.ha import Lease, LeaseKeeper

    identity = f"{socket.gethostname()}-{command.split()[0]}-{os.getpid()}"
    lease = Lease(bridge.vault, settings.ha, identity=identity, address=None, metrics=bridge.metrics)
    deadline = time.monotonic() + max(0.0, wait_seconds)
    while not lease.acquire_or_renew():
        left = deadline - time.monotonic()
        if left <= 0:
            raise WriterBusy(
                f"the HA lease at {bridge.vault.state_location}/{settings.ha.lease_path} is held by replica "
                f"{lease.holder() or 'unknown'}; wait for it (sync --wait SECONDS) or run the pass through it"
            )
        sleep(min(lease.renew_interval, left))
    _warn_short_ttl(settings)
    keeper = LeaseKeeper(lease, on_gain=lambda: None, on_loss=lambda: log.warning("lease_lost_during_pass", command=command))
    keeper.start()
    bridge.client.write_guard = lease
    try:
        yield lease
    finally:
        bridge.client.write_guard = None
        keeper.stop()
        lease.release()


def _read_token_file(path: Path | None, key: str) -> Sensitive | None:
    if path is None:
        return None
    try:
        value = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path}: {exc.strerror}") from None
    if not value:
        raise ConfigError(key, f"{path} is empty")
    register_secret(value, pinned=True)
    return Sensitive(value)


def _build_with_retry(settings: Settings, metrics: Metrics, stop: threading.Event) -> Bridge | None:
    """Start even when Vault or CybeDefend is still coming up: retry transient failures with backoff.

    Returns None when a stop was requested while waiting.
    """
    attempt = 0
    rng = random.Random()
    while True:
        try:
            return build(settings, metrics=metrics, stop=stop)
        except ConfigError:
            raise
        except BridgeError as exc:
            if not exc.retryable:
                raise
            attempt += 1
            wait = backoff_delay(attempt, 1.0, 30.0, rng) + 0.5
            log.warning("startup_waiting", error=str(exc), retry_in_s=round(wait, 1))
            if stop.wait(wait):
                return None


def startup_hooks(metrics: Metrics, *, audit_ingest: bool, max_lines: int = 10_000) -> Hooks:
    """What the port answers while the bridge still waits for Vault and CybeDefend.

    The replica is live and Ready: it accepts work. POST /v1/sync and /v1/audit answer 202 and
    count what they deferred (`trigger_events_deferred`): the first pass of the daemon is a
    full pass that reads Vault after them, so nothing is lost. This matters for OpenBao, which
    sends a test entry to every declared HTTP audit device when it starts or reloads and refuses
    to start when that POST is not answered 2xx — a bridge waiting for that very OpenBao must
    not answer 503.
    """
    from bridge.daemon.audit import parse_ingest_body

    def on_sync(paths: list[str] | None, source: str) -> bool:
        metrics.ingest_deferred.labels(source="forwarded" if source == "forwarded" else "webhook").inc(len(paths) if paths else 1)
        return True

    def on_audit(body: bytes) -> dict[str, int]:
        lines = len(parse_ingest_body(body, max_lines))  # an unacceptable body is still 400/413
        metrics.ingest_deferred.labels(source="audit_ingest").inc(lines)
        return {"accepted": lines, "keys": 0, "rejected": 0, "deferred": lines}

    return Hooks(
        live=lambda: [("startup", True, "")],
        ready=lambda: [("config", True, ""), ("http", True, ""), ("triggers", True, "")],
        status=lambda: {"starting": True, "waiting_for": "vault and cybedefend"},
        on_sync=on_sync,
        on_audit=on_audit if audit_ingest else None,
    )


def _start_up(settings: Settings, metrics: Metrics, stop: threading.Event, server: HttpServer) -> Bridge | None:
    """Build the bridge while already serving (`server` is started and keeps serving afterwards).

    Without this, a pod starting during a Vault outage would fail its liveness probe and be
    restarted in a loop — the bridge's liveness must not depend on an upstream. SIGTERM/SIGINT
    during the wait end it cleanly (as PID 1, SIGTERM has no default action).
    """
    previous: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.signal(signum, lambda *_: stop.set())
    server.start()
    try:
        return _build_with_retry(settings, metrics, stop)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def run_daemon(config_path: Path) -> int:
    """`cybedefend-bridge run`: build everything, then hand over to `Daemon.run()` (main thread)."""
    from bridge.config import load_settings
    from bridge.daemon.audit_file import AuditFileTailer
    from bridge.daemon.audit_socket import AuditSocketListener
    from bridge.daemon.ha import Lease
    from bridge.daemon.loop import Daemon, DaemonParts, ServerHooks
    from bridge.daemon.scheduler import Scheduler
    from bridge.daemon.server import make_audit_ingest
    from bridge.daemon.triggers import AuditMatcher, TriggerQueue, line_handler
    from bridge.logs import configure

    settings = load_settings(config_path)
    configure(settings.logging.level, settings.logging.format)
    metrics = Metrics(reject_reasons=REJECT_CODES)
    stop = threading.Event()
    services_stop = threading.Event()
    webhook_token = _read_token_file(settings.server.webhook_token_file, "server.webhook_token_file")
    metrics_token = _read_token_file(settings.server.metrics_token_file, "server.metrics_token_file")
    # One server for the whole life of the process, bound before Vault is reached (see
    # `startup_hooks`); the daemon swaps in its own hooks once the bridge is built.
    server = HttpServer(settings.server, metrics=metrics, hooks=startup_hooks(metrics, audit_ingest=settings.triggers.audit_ingest),
                        webhook_token=webhook_token, metrics_token=metrics_token)
    # Listen for a socket audit device *before* waiting for Vault: a Vault whose config declares
    # one refuses to start until this address accepts connections, so binding only after Vault
    # answered would deadlock a joint start. Until the daemon starts the listener's thread,
    # Vault's lines wait in the kernel; the handler is bound below, before that thread runs.
    socket_handler: list[Callable[[bytes], None]] = []
    listener: AuditSocketListener | None = None
    if settings.triggers.audit_socket is not None:
        sock = settings.triggers.audit_socket
        listener = AuditSocketListener(sock.bind, sock.port, sock.allowed_peers, lambda line: socket_handler[0](line),
                                       services_stop, metrics=metrics, max_connections=sock.max_connections,
                                       idle_timeout_seconds=sock.idle_timeout_seconds)
    try:
        built = _start_up(settings, metrics, stop, server)
    except BaseException:
        server.stop()
        if listener is not None:
            listener.close()
        raise
    if built is None:  # stopped while waiting for Vault or CybeDefend
        server.stop()
        if listener is not None:
            listener.close()
        log.info("stopped", during="start-up")
        return 0
    bridge = built
    renewer_stop = threading.Event()
    renewer = threading.Thread(target=bridge.vault.run_renewer, args=(renewer_stop,), name="vault-renewer", daemon=True)
    renewer.start()

    queue = TriggerQueue(settings.triggers.debounce_seconds, settings.triggers.queue_size, metrics,
                         leading_edge=settings.triggers.leading_edge)
    kv_versions = {}
    for src in settings.sources:
        try:
            kv_versions[src.mount] = bridge.vault.kv_version(src.mount)
        except BridgeError as exc:
            log.warning("kv_version_unknown", hint="audit lines are matched by the shape of their path", mount=src.mount, error=str(exc))
    # The bridge's own state path changes on every lease renewal: never a trigger.
    matcher = AuditMatcher(settings.sources, kv_versions, namespace=settings.vault.namespace,
                           exclude=[bridge.vault.state_location])
    services: list[AuditFileTailer | AuditSocketListener] = []
    if settings.triggers.audit_file is not None:
        tail = settings.triggers.audit_file
        services.append(AuditFileTailer(tail.path, line_handler(matcher, queue, "audit_file"), poll_seconds=tail.poll_seconds,
                                        stop=services_stop, watch=tail.watch, recheck_seconds=tail.recheck_seconds))
    if listener is not None:
        socket_handler.append(line_handler(matcher, queue, "audit_socket"))
        services.append(listener)
    ingest = make_audit_ingest(matcher.match, max_lines=10_000) if settings.triggers.audit_ingest else None
    lease = None
    lock: ProcessLock | None = None
    if settings.ha.enabled:
        server.accept_forwards(bridge.keyring.forward_key())
        identity = f"{socket.gethostname()}-{secrets.token_hex(3)}"
        lease = Lease(bridge.vault, settings.ha, identity=identity, address=settings.ha.advertise_address, metrics=metrics)
        bridge.client.write_guard = lease
        _warn_short_ttl(settings)
    else:
        # Without HA, the daemon is the one writer of this ledger for its whole life: a
        # `sync --once` or a second daemon on the same configuration is refused (scenario 5).
        lock = ProcessLock(bridge.ledger_path or settings.ledger.path)
        try:
            lock.acquire("run", 0.0)
        except BridgeError:
            services_stop.set()
            renewer_stop.set()
            bridge.close()
            raise
        bridge.client.write_guard = lock

    def make_server(hooks: ServerHooks) -> HttpServer:
        server.set_hooks(hooks)  # already serving; start() returns its port
        return server

    def reload() -> Settings:
        new = load_settings(config_path)
        configure(new.logging.level, new.logging.format)
        return new

    def on_shutdown() -> None:
        services_stop.set()
        renewer_stop.set()
        bridge.close()
        if lock is not None:
            lock.release()

    parts = DaemonParts(
        engine=bridge.engine, queue=queue, stop=stop, metrics=metrics,
        make_scheduler=lambda sched, tick: Scheduler(sched, tick, metrics, rng=random.Random()),
        make_server=make_server, vault_healthy=bridge.vault.healthy, lease=lease,
        forward_key=bridge.keyring.forward_key() if lease is not None else None,
        audit_ingest=ingest, services=services, reload=reload, on_shutdown=on_shutdown,
    )
    return Daemon(settings, parts).run()
