"""The socket audit listener under connection pressure: eviction of idle connections, idle timeout, keepalive.

Eight silent local connections used to fill `max_connections` and lock Vault's own connection
out; now the longest-idle one makes room, and only busy connections cause a refusal.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from bridge.daemon.audit_socket import EVICT_MIN_IDLE_SECONDS, AuditSocketListener
from bridge.metrics import Metrics

LINE = b'{"type":"response","request":{"operation":"update","path":"secret/data/a"}}'


@pytest.fixture
def stop() -> Iterator[threading.Event]:
    ev = threading.Event()
    yield ev
    ev.set()


def until(cond: Callable[[], bool], timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def closed_by_peer(c: socket.socket, timeout: float = 3.0) -> bool:
    c.settimeout(timeout)
    try:
        return c.recv(1) == b""
    except ConnectionError:
        return True
    except TimeoutError:
        return False


def test_silent_connections_are_evicted_so_vault_still_gets_in(stop: threading.Event) -> None:
    got: list[bytes] = []
    m = Metrics()
    listener = AuditSocketListener("127.0.0.1", 0, ["127.0.0.0/8"], got.append, stop, metrics=m, max_connections=8)
    listener.start()
    silent = [socket.create_connection(("127.0.0.1", listener.port), timeout=2) for _ in range(8)]
    try:
        assert until(lambda: len(listener._conns) == 8)
        time.sleep(EVICT_MIN_IDLE_SECONDS + 0.1)  # they have been silent long enough to be evictable
        with socket.create_connection(("127.0.0.1", listener.port), timeout=2) as vault:
            vault.sendall(LINE + b"\n")
            assert until(lambda: got == [LINE])
        assert listener.refused == 0 and listener.evicted == 1
        assert m.registry.get_sample_value("cybedefend_bridge_audit_connections_refused_total") == 0
        assert sum(closed_by_peer(c, 0.5) for c in silent) == 1  # exactly the one evicted
    finally:
        for c in silent:
            c.close()
        listener.close()


def test_busy_connections_are_kept_and_the_newcomer_refused(stop: threading.Event) -> None:
    # A frozen clock: "just sent" stays just sent however slowly a loaded machine runs the test.
    got: list[bytes] = []
    listener = AuditSocketListener("127.0.0.1", 0, ["127.0.0.0/8"], got.append, stop, max_connections=2,
                                   monotonic=lambda: 1000.0)
    listener.start()
    busy = [socket.create_connection(("127.0.0.1", listener.port), timeout=2) for _ in range(2)]
    try:
        assert until(lambda: len(listener._conns) == 2)
        for c in busy:
            c.sendall(LINE + b"\n")  # both just sent: neither is idle
        assert until(lambda: len(got) == 2)
        with socket.create_connection(("127.0.0.1", listener.port), timeout=2) as extra:
            assert closed_by_peer(extra)
        assert until(lambda: listener.refused == 1)  # counted just after the close the client saw
        assert listener.evicted == 0
        assert not any(closed_by_peer(c, 0.3) for c in busy)
    finally:
        for c in busy:
            c.close()
        listener.close()


def test_a_silent_connection_is_closed_after_the_idle_timeout_and_has_keepalive(stop: threading.Event) -> None:
    got: list[bytes] = []
    listener = AuditSocketListener("127.0.0.1", 0, ["127.0.0.0/8"], got.append, stop, idle_timeout_seconds=1.0)
    listener.start()
    with socket.create_connection(("127.0.0.1", listener.port), timeout=2) as talker, \
         socket.create_connection(("127.0.0.1", listener.port), timeout=2) as quiet:
        assert until(lambda: len(listener._conns) == 2)
        conns = list(listener._conns)
        assert all(c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) for c in conns)
        if hasattr(socket, "TCP_KEEPIDLE"):
            assert all(c.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 60 for c in conns)
        t0 = time.monotonic()
        for _ in range(6):  # the talker keeps sending within the timeout: it stays open
            talker.sendall(LINE + b"\n")
            time.sleep(0.3)
        assert closed_by_peer(quiet, 0.1)  # closed after ~1 s of silence
        assert time.monotonic() - t0 < 3.0
        assert listener.timed_out == 1
        talker.sendall(LINE + b"\n")
        assert until(lambda: len(got) == 7)
    listener.close()
