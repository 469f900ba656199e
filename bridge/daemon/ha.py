"""High availability: one active replica, chosen by a lease kept in Vault KV v2 with check-and-set.

The lease document is `{holder, address, expires_at, acquired_at, ttl_seconds}` at
`<state_mount>/<state_path>/<ha.lease_path>`. Every write is a check-and-set against the
version just read, so two replicas racing for it cannot both win: the loser gets `CasConflict`
and stays standby.

Time: a holder never acts past its own deadline, measured on its *own* monotonic clock from
just before the renewing read (so a Vault outage longer than the TTL demotes it even if Vault
never answers again). A standby does not trust the holder's wall clock either: it calls a lease
dead when the document has not changed for one TTL of its own monotonic time (as Kubernetes
leader election does), or when `expires_at` lies more than a TTL in the past (a long-dead
holder, tolerant of clock skew up to one TTL). Renewals every `ttl * renew_fraction` give a
takeover within TTL + 2 renew periods of the holder dying, under twice the TTL by default;
`release()` at shutdown makes it immediate.

The document is not trusted blindly (issue "Exactly once…", scenario 7): its `ttl_seconds` is
bounded by this replica's configured TTL, and its `address` is used only when it looks like an
advertise address (http or https, a host and a port, nothing else).

Also here: forwarding a standby's triggers to the leader's `/v1/sync` over httpx, signed with an
HMAC over timestamp and body under a key derived from the state key — never the webhook token,
which would go to whatever address the lease document names.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import httpx

from bridge.config import HASettings, looks_like_advertise_address
from bridge.errors import BridgeError, CasConflict, LeaseLost
from bridge.logs import get_logger
from bridge.metrics import Metrics
from bridge.ports import StateStore

log = get_logger(__name__)

FORWARD_HEADER = "X-Cybedefend-Bridge-Forwarded"  # `t=<unix seconds>,sig=<hex HMAC-SHA256>`
FORWARD_MAX_SKEW_SECONDS = 60.0  # a signed forward older or newer than this is refused (replay)
FORWARD_BATCH = 500  # below the server's MAX_SYNC_PATHS, so one batch is always accepted
WRITE_MARGIN_SECONDS = 1.0  # a write starts only if the lease outlives its timeout by this much


class LeasePort(Protocol):
    """What `LeaseKeeper` and the daemon use of a `Lease` (tests give a fake)."""

    @property
    def renew_interval(self) -> float: ...
    def acquire_or_renew(self) -> bool: ...
    def is_leader(self) -> bool: ...
    def leader_address(self) -> str | None: ...
    def release(self) -> None: ...


class Lease:
    """The HA lease. `acquire_or_renew()` is called every `ttl * renew_fraction` seconds by one thread."""

    def __init__(
        self,
        store: StateStore,
        settings: HASettings,
        *,
        identity: str,
        address: str | None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        metrics: Metrics | None = None,
    ) -> None:
        self._store = store
        self._settings = settings
        self._name = settings.lease_path
        self._identity = identity
        self._address = address
        self._clock = clock
        self._monotonic = monotonic
        self._metrics = metrics
        self._lock = threading.Lock()
        self._renewed = threading.Condition(self._lock)  # notified on every successful write of the lease
        self._leader = False
        self._deadline = 0.0  # monotonic: we act as leader only before this
        self._acquired_at: float | None = None
        self._doc: dict[str, Any] | None = None  # last lease document seen
        self._seen: tuple[int, float] | None = None  # (version, monotonic time first seen)
        self._set_gauge()

    @property
    def identity(self) -> str:
        return self._identity

    @property
    def renew_interval(self) -> float:
        return self._settings.ttl_seconds * self._settings.renew_fraction

    def is_leader(self) -> bool:
        """True while we hold the lease and our own deadline has not passed."""
        with self._lock:
            return self._leader and self._monotonic() < self._deadline

    def holder(self) -> str:
        """Who holds the lease, as last read ("" when vacant or unknown): for WriterBusy messages."""
        with self._lock:
            if self._leader and self._monotonic() < self._deadline:
                return self._identity
            doc = self._doc or {}
        holder = doc.get("holder")
        return holder if isinstance(holder, str) else ""

    def check(self, budget_seconds: float) -> None:
        """`WriteGuard`: return when the lease is ours for `budget_seconds` + margin more, by our
        own deadline (from before the last successful renewal's read, at the configured TTL).

        Short of that but still leader, wait for the renewal in flight, never past the point
        where the write could no longer finish in time; then `LeaseLost`. So no write starts
        that could land after the lease deadline, whatever Vault or a Retry-After did."""
        # Right after a renewal the lease has ttl*(1-renew_fraction) left at worst: asking more
        # would refuse every write. A TTL that short for the request timeout weakens the
        # guarantee (the composition root warns at start; docs/reliability.md says so).
        need = min(budget_seconds + WRITE_MARGIN_SECONDS, self._settings.ttl_seconds * (1 - self._settings.renew_fraction))
        with self._renewed:
            give_up = None
            while True:
                now = self._monotonic()
                left = self._deadline - now if self._leader else float("-inf")
                if left >= need:
                    return
                if give_up is None:
                    give_up = now + max(0.0, left)  # never wait past the deadline we started with
                if left <= 0 or now >= give_up:
                    break
                self._renewed.wait(min(0.25, give_up - now))
        raise LeaseLost(
            f"the HA lease is no longer held with {need:.1f}s to spare (holder now: {self.holder() or 'unknown'}); "
            "stopping writes: the new leader carries on"
        )

    def leader_address(self) -> str | None:
        """Where the current holder listens (its advertise_address), or None if unknown or vacant."""
        with self._lock:
            if self._leader and self._monotonic() < self._deadline:
                return self._address
            doc = self._doc
            if not doc or not doc.get("holder") or doc.get("holder") == self._identity:
                return None
            address = doc.get("address")
        if not isinstance(address, str) or not address:
            return None
        if not looks_like_advertise_address(address):
            log.warning("lease_address_ignored", reason="not an http(s)://host:port advertise address")
            return None
        return address

    def acquire_or_renew(self) -> bool:
        """One round: renew if ours, take it if vacant or dead, else stay standby. Returns is_leader()."""
        started = self._monotonic()
        try:
            current = self._store.read_state(self._name)
            if current is None:
                self._write(0, started, taking=True)
            else:
                data, version = current
                with self._lock:
                    self._doc = dict(data)
                    if self._seen is None or self._seen[0] != version:
                        self._seen = (version, started)
                if data.get("holder") == self._identity:
                    self._write(version, started, taking=not self._leader)
                elif self._is_dead(data, version, started):
                    log.info("lease_takeover", previous_holder=str(data.get("holder") or ""))
                    self._write(version, started, taking=True)
                else:
                    self._demote("held by another replica")
        except CasConflict:
            self._demote("lost the check-and-set race")
        except BridgeError as exc:
            # Vault unreachable: keep acting only until our own deadline.
            with self._lock:
                keep = self._leader and self._monotonic() < self._deadline
            log.warning("lease_renew_failed", error=f"{type(exc).__name__}: {exc}", still_leader=keep)
            if not keep:
                self._demote("lease unreachable past its deadline")
        self._set_gauge()
        return self.is_leader()

    def release(self) -> None:
        """Give the lease up (at shutdown) so a standby takes over at once instead of after a TTL."""
        with self._lock:
            was_leader = self._leader
            self._leader = False
            self._deadline = 0.0
        self._set_gauge()
        if not was_leader:
            return
        try:
            current = self._store.read_state(self._name)
            if current is None or current[0].get("holder") != self._identity:
                return
            vacant = {"holder": "", "address": None, "expires_at": 0.0, "acquired_at": None, "ttl_seconds": 0.0}
            self._store.write_state(self._name, vacant, cas=current[1])
            log.info("lease_released")
        except BridgeError as exc:
            log.warning("lease_release_failed", error=f"{type(exc).__name__}: {exc}")

    def _is_dead(self, data: dict[str, Any], version: int, now_mono: float) -> bool:
        if not data.get("holder"):
            return True
        # The document's own TTL may only shorten ours: whoever can write the lease must not be
        # able to park HA for a year by writing a huge one.
        claimed = _number(data.get("ttl_seconds"))
        ttl = min(self._settings.ttl_seconds, claimed) if claimed > 0 else self._settings.ttl_seconds
        if _number(data.get("expires_at")) + ttl < self._clock():
            return True
        seen = self._seen
        return seen is not None and seen[0] == version and now_mono - seen[1] >= ttl

    def _write(self, cas: int, started: float, *, taking: bool) -> None:
        now = self._clock()
        ttl = self._settings.ttl_seconds
        acquired_at = now if taking or self._acquired_at is None else self._acquired_at
        doc = {
            "holder": self._identity,
            "address": self._address,
            "expires_at": now + ttl,
            "acquired_at": acquired_at,
            "ttl_seconds": ttl,
        }
        version = self._store.write_state(self._name, doc, cas=cas)
        with self._lock:
            became = not self._leader
            self._leader = True
            self._deadline = started + ttl  # from before the read: never later than the holder's view
            self._acquired_at = acquired_at
            self._doc = doc
            self._seen = (version, started)
            self._renewed.notify_all()
        if became:
            log.info("lease_acquired", identity=self._identity)

    def _demote(self, why: str) -> None:
        with self._lock:
            was = self._leader
            self._leader = False
            self._deadline = 0.0
            self._acquired_at = None
        if was:
            log.warning("lease_lost", reason=why)

    def _set_gauge(self) -> None:
        if self._metrics is not None:
            self._metrics.leader.set(1 if self.is_leader() else 0)


class LeaseKeeper:
    """Runs `acquire_or_renew()` every `renew_interval` on its own thread and reports role changes.

    `on_gain` and `on_loss` run on that thread; they must be quick and must not raise.
    """

    def __init__(self, lease: LeasePort, *, on_gain: Callable[[], None], on_loss: Callable[[], None]) -> None:
        self._lease = lease
        self._on_gain = on_gain
        self._on_loss = on_loss
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="lease", daemon=True)
        self._thread.start()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop renewing (a Vault call in progress is not interrupted: bounded wait)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout)

    def _loop(self) -> None:
        was_leader = False
        while True:
            try:
                leader = self._lease.acquire_or_renew()
            except Exception as exc:  # the adapter translates errors, but this thread must survive
                log.error("lease_round_failed", error=type(exc).__name__)
                leader = self._lease.is_leader()
            if leader != was_leader:
                (self._on_gain if leader else self._on_loss)()
            was_leader = leader
            if self._stop.wait(self._lease.renew_interval):
                return


def _number(value: object) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


def sign_forward(key: bytes, body: bytes, now: float) -> str:
    """The forward header's value for `body` at `now`."""
    stamp = str(int(now))
    sig = hmac.new(key, stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"t={stamp},sig={sig}"


def verify_forward(key: bytes, header: str | None, body: bytes, now: float) -> bool:
    """Whether `header` signs `body` with `key`, within FORWARD_MAX_SKEW_SECONDS of `now`."""
    if not header:
        return False
    fields = dict(part.partition("=")[::2] for part in header.split(","))
    stamp, sig = fields.get("t", ""), fields.get("sig", "")
    if not stamp.isdigit() or abs(now - int(stamp)) > FORWARD_MAX_SKEW_SECONDS:
        return False
    want = hmac.new(key, stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(want, sig)


def forward_to_leader(address: str, paths: Sequence[str] | None, key: bytes, *, timeout: float = 2.0,
                      clock: Callable[[], float] = time.time) -> bool:
    """POST `paths` (None: a full pass) to the leader's `/v1/sync`, signed with the forward key.

    True if every batch got a 2xx.
    A standby hears writes too (its own audit tail, a shipper, a webhook behind a Service); only
    the leader acts, so the standby hands them over. On failure the caller drops and counts them:
    the leader's periodic pass is the safety net. No proxy (replicas talk pod to pod; HTTP_PROXY
    is meant for the outside world) and no redirects (a redirect target is not a replica).
    """
    if not looks_like_advertise_address(address):
        log.warning("forward_refused", reason="leader address is not an http(s)://host:port advertise address")
        return False
    url = address.rstrip("/") + "/v1/sync"
    ok = True
    bodies = (
        [b"{}"]
        if paths is None
        else [json.dumps({"paths": list(paths[i : i + FORWARD_BATCH])}).encode() for i in range(0, len(paths), FORWARD_BATCH)]
    )
    with httpx.Client(timeout=timeout, trust_env=False, follow_redirects=False) as client:
        for body in bodies:
            headers = {"Content-Type": "application/json", FORWARD_HEADER: sign_forward(key, body, clock())}
            try:
                response = client.post(url, content=body, headers=headers)
                if not 200 <= response.status_code < 300:
                    log.warning("forward_failed", status=response.status_code)
                    ok = False
            except httpx.HTTPError as exc:
                log.warning("forward_failed", error=type(exc).__name__)
                ok = False
    return ok
