"""A TCP listener for a Vault/OpenBao `socket` audit device: newline-delimited audit JSON in.

Caveats (also in the operator docs): Vault writes to a socket device synchronously, so a slow
reader slows Vault; the listener therefore only splits lines and hands them to `on_line`, which
must be fast (match, then a non-blocking queue offer). A server whose config declares a socket
device refuses to start while the address is unreachable ("audit backend failed test message"),
so this listener must be up before Vault. Prefer the file tailer or forwarded ingest in
production; this is for setups where neither is possible.

Only peers inside `allowed_peers` are served; others are closed at once, counted, and logged
once per address (a scanner must not flood the log).

Connections are bounded (`max_connections`) but silent ones cannot lock Vault out: when a new
allowed peer arrives at the bound, the connection idle longest (silent at least
`EVICT_MIN_IDLE_SECONDS`) is closed to make room, and only when every connection is busy is the
new one refused. A connection silent for `idle_timeout_seconds` is closed, and TCP keepalive
finds peers that vanished without a FIN. Vault keeps one connection to a socket device and
reconnects when a write fails; the write that finds a closed connection may be lost, which the
periodic full pass covers — hence a generous idle timeout by default.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from bridge.daemon.audit import MAX_LINE_BYTES, LineSplitter
from bridge.errors import ConfigError
from bridge.logs import get_logger
from bridge.metrics import Metrics

log = get_logger(__name__)

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_POLL = 0.2  # how often blocked accept/recv calls look at the stop flags, seconds
_MAX_LOGGED_PEERS = 256
EVICT_MIN_IDLE_SECONDS = 1.0  # a connection that sent within this is busy, never evicted
# TCP keepalive: probe after 60 s of silence, every 10 s, give up after 3 unanswered probes.
_KEEPALIVE = (("TCP_KEEPIDLE", 60), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3))


def _keepalive(conn: socket.socket) -> None:
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in _KEEPALIVE:
        opt = getattr(socket, name, None)  # Linux has all three; other platforms keep their defaults
        if opt is not None:
            with contextlib.suppress(OSError):
                conn.setsockopt(socket.IPPROTO_TCP, opt, value)


@dataclass(eq=False)
class _Conn:
    sock: socket.socket
    peer: str
    last_activity: float
    thread: threading.Thread | None = None
    evicted: threading.Event = field(default_factory=threading.Event)


def _parse_networks(cidrs: Sequence[str]) -> list[_Network]:
    out: list[_Network] = []
    for c in cidrs:
        try:
            out.append(ipaddress.ip_network(c, strict=False))
        except ValueError as exc:
            raise ConfigError("triggers.audit_socket.allowed_peers", f"a list of CIDRs, got {c!r}") from exc
    return out


class AuditSocketListener:
    """Listens on `bind:port` (port 0: any free port, see `port`) as soon as it is constructed."""

    def __init__(
        self,
        bind: str,
        port: int,
        allowed_peers: Sequence[str],
        on_line: Callable[[bytes], None],
        stop: threading.Event,
        *,
        metrics: Metrics | None = None,
        max_line_bytes: int = MAX_LINE_BYTES,
        max_connections: int = 8,
        idle_timeout_seconds: float = 900.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._networks = _parse_networks(allowed_peers)
        self._on_line = on_line
        self._stop = stop
        self._closing = threading.Event()
        self._metrics = metrics
        self._max_line = max_line_bytes
        self._max_conn = max_connections
        self._idle_timeout = idle_timeout_seconds
        self._mono = monotonic
        self._lock = threading.Lock()
        self._conns: set[_Conn] = set()
        self._logged_peers: set[str] = set()
        self.refused = 0  # connections refused since start (also a metric when one is given)
        self.evicted = 0  # idle connections closed to make room for a new one
        self.timed_out = 0  # connections closed after idle_timeout_seconds of silence
        family = socket.AF_INET6 if ":" in bind else socket.AF_INET
        try:
            self._sock = socket.create_server((bind, port), family=family, backlog=16)
        except OSError as exc:
            raise ConfigError("triggers.audit_socket", f"a free address to listen on, {bind}:{port}: {exc.strerror}") from exc
        self._sock.settimeout(_POLL)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._sock.getsockname()[1])

    def start(self) -> threading.Thread:
        self._thread = threading.Thread(target=self.serve, name="audit-socket", daemon=True)
        self._thread.start()
        log.info("audit_socket_listening", port=self.port)
        return self._thread

    def serve(self) -> None:
        try:
            while not self._stopping():
                try:
                    conn, peer = self._sock.accept()
                except TimeoutError:
                    continue
                except OSError as exc:
                    if self._stopping():
                        break
                    # e.g. EMFILE: the listener must outlive it; back off instead of spinning
                    log.warning("audit_socket_accept_failed", error=type(exc).__name__)
                    self._stop.wait(_POLL)
                    continue
                self._admit(conn, str(peer[0]))
        finally:
            self._sock.close()

    def close(self, timeout: float = 5.0) -> None:
        """Stop accepting, end every connection, wait for the threads (each notices within 0.2 s)."""
        self._closing.set()
        if self._thread is not None:
            self._thread.join(timeout)
        else:
            self._sock.close()
        with self._lock:
            handlers = [c.thread for c in self._conns if c.thread is not None]
        for t in handlers:
            t.join(timeout)

    def _stopping(self) -> bool:
        return self._stop.is_set() or self._closing.is_set()

    def _allowed(self, host: str) -> bool:
        try:
            ip = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # a dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d
        return any(ip.version == n.version and ip in n for n in self._networks)

    def _admit(self, conn: socket.socket, host: str) -> None:
        if not self._allowed(host):
            conn.close()
            self._refuse(host, "peer_not_allowed")
            return
        victim: _Conn | None = None
        with contextlib.suppress(OSError):
            _keepalive(conn)  # before the connection is registered: whoever sees it sees it tuned
        with self._lock:
            live = [c for c in self._conns if not c.evicted.is_set()]
            if len(live) >= self._max_conn:
                idlest = min(live, key=lambda c: c.last_activity)
                if self._mono() - idlest.last_activity < EVICT_MIN_IDLE_SECONDS:
                    busy = True  # every connection is sending: refusing the newcomer loses less
                else:
                    busy, victim = False, idlest
                    victim.evicted.set()
                    self.evicted += 1
            else:
                busy = False
            if not busy:
                new = _Conn(conn, host, self._mono())
                thread = threading.Thread(target=self._handle, args=(new,), name="audit-socket-conn", daemon=True)
                new.thread = thread
                self._conns.add(new)
        if busy:
            conn.close()
            self._refuse(host, "too_many_connections")
            return
        if victim is not None:
            log.info("audit_socket_evicted_idle", peer=victim.peer, idle_seconds=round(self._mono() - victim.last_activity, 1))
            with contextlib.suppress(OSError):
                victim.sock.shutdown(socket.SHUT_RDWR)  # its thread sees EOF at once and cleans up
        thread.start()

    def _refuse(self, host: str, reason: str) -> None:
        self.refused += 1
        if self._metrics is not None:
            self._metrics.audit_refused.inc()
        if host not in self._logged_peers and len(self._logged_peers) < _MAX_LOGGED_PEERS:
            self._logged_peers.add(host)
            log.warning("audit_socket_refused", peer=host, reason=reason)

    def _handle(self, c: _Conn) -> None:
        splitter = LineSplitter(self._on_line, self._max_line)
        conn = c.sock
        try:
            conn.settimeout(_POLL)
            while not self._stopping() and not c.evicted.is_set():
                try:
                    data = conn.recv(1 << 16)
                except TimeoutError:
                    if self._mono() - c.last_activity >= self._idle_timeout:
                        self.timed_out += 1
                        log.info("audit_socket_idle_closed", peer=c.peer, idle_timeout_seconds=self._idle_timeout)
                        break
                    continue
                except OSError:
                    break
                if not data:
                    break
                c.last_activity = self._mono()
                splitter.feed(data)
        finally:
            conn.close()
            with self._lock:
                self._conns.discard(c)
