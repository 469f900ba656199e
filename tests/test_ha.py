"""The HA lease: acquire, renew, expiry, takeover, CAS races, Vault outages; one run on real OpenBao."""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from bridge.config import HASettings, looks_like_advertise_address, parse_settings
from bridge.daemon.ha import (
    FORWARD_HEADER,
    FORWARD_MAX_SKEW_SECONDS,
    Lease,
    forward_to_leader,
    sign_forward,
    verify_forward,
)
from bridge.errors import CasConflict, ConfigError, VaultUnavailable
from bridge.metrics import Metrics
from tests.support.config import raw_config
from tests.support.openbao import OpenBao

TTL = 15.0


class MemoryStateStore:
    """`StateStore` in memory with KV v2 check-and-set semantics (cas=0: only if absent)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.docs: dict[str, tuple[dict[str, Any], int]] = {}
        self.fail = False
        self.before_write: Callable[[], None] | None = None  # to stage a race
        self.writes = 0

    def read_state(self, name: str) -> tuple[dict[str, Any], int] | None:
        if self.fail:
            raise VaultUnavailable("connection refused")
        with self._lock:
            doc = self.docs.get(name)
            return (copy.deepcopy(doc[0]), doc[1]) if doc else None

    def write_state(self, name: str, data: Mapping[str, Any], cas: int) -> int:
        if self.fail:
            raise VaultUnavailable("connection refused")
        hook, self.before_write = self.before_write, None
        if hook is not None:
            hook()
        with self._lock:
            current = self.docs.get(name, ({}, 0))[1]
            if cas != current:
                raise CasConflict("check-and-set lost")
            self.docs[name] = (copy.deepcopy(dict(data)), current + 1)
            self.writes += 1
            return current + 1


class Clocks:
    """A wall clock and a monotonic clock that only move when told (`skew` offsets the wall)."""

    def __init__(self, skew: float = 0.0) -> None:
        self.mono = 1000.0
        self.skew = skew

    def time(self) -> float:
        return 1_700_000_000.0 + self.mono + self.skew

    def monotonic(self) -> float:
        return self.mono


def make_lease(store: Any, clocks: Clocks, name: str, metrics: Metrics | None = None, **kw: Any) -> Lease:
    settings = HASettings(enabled=True, ttl_seconds=TTL, renew_fraction=1 / 3, **kw)
    return Lease(
        store,
        settings,
        identity=name,
        address=f"http://{name}:8080",
        clock=clocks.time,
        monotonic=clocks.monotonic,
        metrics=metrics,
    )


def test_first_replica_acquires_and_writes_the_lease_document() -> None:
    store, clocks, m = MemoryStateStore(), Clocks(), Metrics()
    a = make_lease(store, clocks, "a", m)
    assert m.registry.get_sample_value("cybedefend_bridge_leader") == 0
    assert a.acquire_or_renew() is True
    assert a.is_leader()
    assert m.registry.get_sample_value("cybedefend_bridge_leader") == 1
    doc, version = store.docs["leader"]
    assert version == 1
    assert doc["holder"] == "a" and doc["address"] == "http://a:8080"
    assert doc["expires_at"] == pytest.approx(clocks.time() + TTL)
    assert doc["acquired_at"] == pytest.approx(clocks.time())
    assert a.leader_address() == "http://a:8080"


def test_second_replica_stays_standby_and_knows_the_leader_address() -> None:
    store, clocks = MemoryStateStore(), Clocks()
    a, b = make_lease(store, clocks, "a"), make_lease(store, clocks, "b")
    assert a.acquire_or_renew()
    assert b.acquire_or_renew() is False
    assert not b.is_leader()
    assert b.leader_address() == "http://a:8080"


def test_renewal_keeps_leadership_and_the_acquired_time() -> None:
    store, clocks = MemoryStateStore(), Clocks()
    a, b = make_lease(store, clocks, "a"), make_lease(store, clocks, "b")
    a.acquire_or_renew()
    acquired = store.docs["leader"][0]["acquired_at"]
    for _ in range(10):  # 10 renew periods = 50 s, far beyond one TTL
        clocks.mono += a.renew_interval
        assert a.acquire_or_renew()
        assert b.acquire_or_renew() is False
    doc, version = store.docs["leader"]
    assert version == 11 and doc["acquired_at"] == acquired
    assert doc["expires_at"] == pytest.approx(clocks.time() + TTL)


def test_standby_takes_over_within_twice_the_ttl_after_the_leader_dies() -> None:
    store, clocks = MemoryStateStore(), Clocks()
    a, b = make_lease(store, clocks, "a"), make_lease(store, clocks, "b")
    a.acquire_or_renew()
    b.acquire_or_renew()
    clocks.mono += 4.9  # the leader renews once more, just before dying
    a.acquire_or_renew()
    died_at = clocks.mono
    took_over_at = None
    while clocks.mono - died_at < 3 * TTL:
        clocks.mono += b.renew_interval  # the standby's own polling rhythm
        if b.acquire_or_renew():
            took_over_at = clocks.mono
            break
        assert clocks.mono - died_at < TTL or not a.is_leader()  # never two acting leaders
    assert took_over_at is not None
    assert TTL <= took_over_at - died_at <= 2 * TTL
    assert store.docs["leader"][0]["holder"] == "b"
    assert not a.is_leader()  # its own deadline passed: it would not act even if it came back


def test_a_returning_old_leader_sees_the_takeover_and_stays_standby() -> None:
    store, clocks = MemoryStateStore(), Clocks()
    a, b = make_lease(store, clocks, "a"), make_lease(store, clocks, "b")
    a.acquire_or_renew()
    b.acquire_or_renew()
    clocks.mono += TTL + 1
    assert b.acquire_or_renew()  # unchanged for a TTL of b's own time
    assert a.acquire_or_renew() is False
    assert a.leader_address() == "http://b:8080"


def test_release_lets_a_standby_take_over_at_once() -> None:
    store, clocks = MemoryStateStore(), Clocks()
    a, b = make_lease(store, clocks, "a"), make_lease(store, clocks, "b")
    a.acquire_or_renew()
    b.acquire_or_renew()
    a.release()
    assert not a.is_leader()
    assert store.docs["leader"][0]["holder"] == ""
    assert b.acquire_or_renew()  # no TTL wait


def test_vault_outage_keeps_leadership_only_until_our_own_deadline() -> None:
    store, clocks, m = MemoryStateStore(), Clocks(), Metrics()
    a = make_lease(store, clocks, "a", m)
    a.acquire_or_renew()
    store.fail = True
    clocks.mono += 10
    assert a.acquire_or_renew() is True  # Vault down, but our lease is still valid
    clocks.mono += 5.5  # past acquired + TTL
    assert not a.is_leader()  # even without another round: never act past expires_at
    assert a.acquire_or_renew() is False
    assert m.registry.get_sample_value("cybedefend_bridge_leader") == 0
    store.fail = False
    assert a.acquire_or_renew() is True  # still our document: renewed, leader again


def test_losing_the_cas_race_means_standby() -> None:
    store, clocks = MemoryStateStore(), Clocks()
    a, b = make_lease(store, clocks, "a"), make_lease(store, clocks, "b")

    def b_wins_first() -> None:
        assert b.acquire_or_renew()  # b writes between a's read and a's write

    store.before_write = b_wins_first
    assert a.acquire_or_renew() is False
    assert b.is_leader() and not a.is_leader()
    assert store.docs["leader"][0]["holder"] == "b"


def test_concurrent_replicas_elect_exactly_one_leader() -> None:
    store, clocks = MemoryStateStore(), Clocks()
    leases = [make_lease(store, clocks, f"r{i}") for i in range(8)]
    barrier = threading.Barrier(len(leases))
    results: dict[str, bool] = {}

    def contend(lease: Lease) -> None:
        barrier.wait()
        results[lease.identity] = lease.acquire_or_renew()

    threads = [threading.Thread(target=contend, args=(lease,)) for lease in leases]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sum(results.values()) == 1
    assert sum(lease.is_leader() for lease in leases) == 1
    assert store.docs["leader"][0]["holder"] == next(k for k, v in results.items() if v)


def test_standby_with_a_fast_clock_does_not_steal_a_live_lease() -> None:
    store = MemoryStateStore()
    ca, cb = Clocks(), Clocks(skew=TTL * 0.9)  # b's wall clock runs almost a TTL ahead
    a, b = make_lease(store, ca, "a"), make_lease(store, cb, "b")
    a.acquire_or_renew()
    for _ in range(20):
        ca.mono += a.renew_interval
        cb.mono += a.renew_interval
        assert a.acquire_or_renew()
        assert b.acquire_or_renew() is False


def test_a_lease_dead_long_ago_is_taken_at_once_by_a_fresh_replica() -> None:
    store, clocks = MemoryStateStore(), Clocks()
    store.docs["leader"] = ({"holder": "gone", "address": None, "expires_at": clocks.time() - 3 * TTL, "acquired_at": 0.0}, 4)
    b = make_lease(store, clocks, "b")
    assert b.acquire_or_renew()
    assert store.docs["leader"][1] == 5


@pytest.mark.integration
def test_lease_against_real_openbao(openbao: OpenBao, kv_mount: str) -> None:
    from bridge.vault.source import VaultSource

    settings = parse_settings(
        {
            "vault": {"address": openbao.addr},
            "sources": [{"mount": kv_mount}],
            "cybedefend": {"auth": {"credential_file": "/dev/null"}},
        },
        env={"VAULT_TOKEN": openbao.root_token},
    )
    stores = [VaultSource(settings, Metrics(), env={"VAULT_TOKEN": openbao.root_token}) for _ in range(2)]
    try:
        for s in stores:
            s.login()
        clocks = Clocks()
        a, b = (make_lease(s, clocks, n) for s, n in zip(stores, ("a", "b"), strict=True))
        assert a.acquire_or_renew()
        assert b.acquire_or_renew() is False
        assert b.leader_address() == "http://a:8080"
        # A real check-and-set race: b's write carries a version a has already moved past.
        stale = stores[1].read_state("leader")
        assert stale is not None
        assert a.acquire_or_renew()
        with pytest.raises(CasConflict):
            stores[1].write_state("leader", {"holder": "b"}, cas=stale[1])
        a.release()
        assert b.acquire_or_renew()
        doc = openbao.client().secrets.kv.v2.read_secret_version(
            path=f"{settings.state_path}/leader", mount_point=settings.state_mount, raise_on_deleted_version=True
        )["data"]["data"]
        assert doc["holder"] == "b" and doc["address"] == "http://b:8080"
    finally:
        for s in stores:  # the lean path's pooled connections
            s.close()


class _Recorder(BaseHTTPRequestHandler):
    seen: list[dict[str, str]] = []
    redirect_to: str | None = None

    def do_POST(self) -> None:
        type(self).seen.append({k.lower(): v for k, v in self.headers.items()})
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.redirect_to:
            self.send_response(302)
            self.send_header("Location", self.redirect_to)
        else:
            self.send_response(202)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_POST

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _recorder(redirect_to: str | None = None) -> type[_Recorder]:
    """A handler class of its own (its own `seen` list), answering 202 or redirecting."""

    class Recorder(_Recorder):
        seen: list[dict[str, str]] = []

    Recorder.redirect_to = redirect_to
    return Recorder


def _serve(handler: type[BaseHTTPRequestHandler]) -> tuple[ThreadingHTTPServer, str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}"


KEY = b"forward-key-derived-from-the-state-key"


def test_forward_is_signed_never_carries_a_token_and_batches_paths() -> None:
    rec = _recorder()
    httpd, url = _serve(rec)
    try:
        assert forward_to_leader(url, [f"secret/p{i}" for i in range(1200)], KEY, clock=lambda: 1_000.0)
        assert forward_to_leader(url, None, KEY, clock=lambda: 1_000.0)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert len(rec.seen) == 3 + 1  # 500 + 500 + 200, then a full pass
    assert all("authorization" not in h for h in rec.seen)  # the webhook token stays home
    assert all(h[FORWARD_HEADER.lower()].startswith("t=1000,sig=") for h in rec.seen)


def test_a_signed_forward_is_accepted_only_with_the_key_the_body_and_a_fresh_time() -> None:
    body = b'{"paths": ["secret/a"]}'
    header = sign_forward(KEY, body, 1_000.0)
    assert verify_forward(KEY, header, body, 1_030.0)
    assert not verify_forward(KEY, header, body, 1_000.0 + FORWARD_MAX_SKEW_SECONDS + 1)  # replayed later
    assert not verify_forward(b"another-key", header, body, 1_000.0)
    assert not verify_forward(KEY, header, b'{"paths": ["secret/b"]}', 1_000.0)  # body changed
    assert not verify_forward(KEY, "t=1000,sig=00", body, 1_000.0)
    assert not verify_forward(KEY, "1", body, 1_000.0) and not verify_forward(KEY, None, body, 1_000.0)


@pytest.mark.parametrize("address", [
    "http://127.0.0.1:8080", "https://bridge-1.bridge.ns.svc:8443", "http://[::1]:9000/",
])
def test_advertise_addresses_that_look_like_one(address: str) -> None:
    assert looks_like_advertise_address(address)


@pytest.mark.parametrize(("given", "kept"), [
    ("http://fd00::5:8080", "http://[fd00::5]:8080"),  # a bare IPv6 pod IP from $(POD_IP)
    ("https://2001:db8::1:8443/", "https://[2001:db8::1]:8443"),
    ("http://[fd00::5]:8080", "http://[fd00::5]:8080"),
    ("http://10.0.0.1:8080", "http://10.0.0.1:8080"),
    ("http://bridge.ns.svc:8080", "http://bridge.ns.svc:8080"),
])
def test_an_ipv6_pod_address_gets_its_brackets(given: str, kept: str) -> None:
    settings = parse_settings(raw_config(ha={"enabled": True, "advertise_address": given}))
    assert settings.ha.advertise_address == kept and looks_like_advertise_address(kept)


@pytest.mark.parametrize("address", ["http://fd00::5", "http://fd00::zz:8080", "http://::1:8080/x"])
def test_an_address_that_is_not_ipv6_with_a_port_is_still_refused(address: str) -> None:
    with pytest.raises(ConfigError, match=r"ha\.advertise_address"):
        parse_settings(raw_config(ha={"enabled": True, "advertise_address": address}))


@pytest.mark.parametrize("address", [
    "file:///etc/passwd", "http://attacker.example", "http://user:pw@10.0.0.1:80", "http://10.0.0.1:80/steal",
    "http://10.0.0.1:80?x=1", "http://10.0.0.1:80#f", "gopher://10.0.0.1:70", "http://:80", "not a url", "http://h:99999",
])
def test_lease_addresses_that_are_not_advertise_addresses_are_refused(address: str) -> None:
    assert not looks_like_advertise_address(address)
    assert forward_to_leader(address, ["secret/a"], KEY, timeout=0.5) is False


def test_forward_never_follows_a_redirect(caplog: pytest.LogCaptureFixture) -> None:
    elsewhere = _recorder()
    target, target_url = _serve(elsewhere)
    bouncer = _recorder(redirect_to=target_url + "/steal")
    httpd, url = _serve(bouncer)
    try:
        assert forward_to_leader(url, ["secret/a"], KEY) is False
        assert forward_to_leader("http://127.0.0.1:9", ["secret/a"], KEY, timeout=1) is False
        assert forward_to_leader("file:///etc/passwd", ["secret/a"], KEY) is False
    finally:
        for s in (httpd, target):
            s.shutdown()
            s.server_close()
    assert len(bouncer.seen) == 1 and elsewhere.seen == []
    assert KEY.decode() not in caplog.text


# -- scenario 7: a forged lease neither parks HA nor draws the webhook token ---------------------


def test_a_forged_lease_with_a_huge_ttl_and_far_expiry_is_taken_over_within_our_ttl() -> None:
    store, clocks = MemoryStateStore(), Clocks()
    forged = {"holder": "mallory", "address": "http://127.0.0.1:1", "expires_at": clocks.time() + 10**9,
              "acquired_at": clocks.time(), "ttl_seconds": 10**9}
    store.docs["leader"] = (forged, 1)
    b = make_lease(store, clocks, "b")
    assert not b.acquire_or_renew()  # first sight: a live-looking holder
    start = clocks.mono
    while not b.acquire_or_renew():
        clocks.mono += b.renew_interval
        assert clocks.mono - start <= TTL + b.renew_interval, "the forged TTL parked HA"
    assert store.docs["leader"][0]["holder"] == "b"


def test_a_lease_address_that_is_not_an_advertise_address_is_never_a_leader_address() -> None:
    store, clocks = MemoryStateStore(), Clocks()
    for address in ("http://10.0.0.9:80/steal", "http://user:pw@10.0.0.9:80", "file:///etc/passwd"):
        store.docs["leader"] = ({"holder": "mallory", "address": address, "expires_at": clocks.time() + 5,
                                 "acquired_at": clocks.time(), "ttl_seconds": TTL}, 1)
        b = make_lease(store, clocks, "b")
        b.acquire_or_renew()
        assert b.leader_address() is None, address
