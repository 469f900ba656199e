"""A TCP listener for a Vault/OpenBao `socket` audit device: newline-delimited audit JSON in.

Caveats (also in the operator docs): Vault writes to a socket device synchronously, so a slow
reader slows Vault; the listener therefore only splits lines and hands them to `on_line`, which
must be fast (match, then a non-blocking queue offer). A server whose config declares a socket
device refuses to start while the address is unreachable ("audit backend failed test message"),
so this listener must be up before Vault. Prefer the file tailer or forwarded ingest in
production; this is for setups where neither is possible.

Only peers inside `allowed_peers` are served; others are closed at once, counted, and logged
once per address (a scanner must not flood the log).
"""

from __future__ import annotations

import ipaddress
import socket
import threading
from collections.abc import Callable, Sequence

from bridge.daemon.audit import MAX_LINE_BYTES, LineSplitter
from bridge.errors import ConfigError
from bridge.logs import get_logger
from bridge.metrics import Metrics

log = get_logger(__name__)

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_POLL = 0.2  # how often blocked accept/recv calls look at the stop flags, seconds
_MAX_LOGGED_PEERS = 256


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
    ) -> None:
        self._networks = _parse_networks(allowed_peers)
        self._on_line = on_line
        self._stop = stop
        self._closing = threading.Event()
        self._metrics = metrics
        self._max_line = max_line_bytes
        self._max_conn = max_connections
        self._lock = threading.Lock()
        self._handlers: set[threading.Thread] = set()
        self._logged_peers: set[str] = set()
        self.refused = 0  # connections refused since start (also a metric when one is given)
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
            handlers = list(self._handlers)
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
        with self._lock:
            busy = len(self._handlers) >= self._max_conn
        if not self._allowed(host) or busy:
            conn.close()
            self._refuse(host, "too_many_connections" if busy and self._allowed(host) else "peer_not_allowed")
            return
        t = threading.Thread(target=self._handle, args=(conn,), name="audit-socket-conn", daemon=True)
        with self._lock:
            self._handlers.add(t)
        t.start()

    def _refuse(self, host: str, reason: str) -> None:
        self.refused += 1
        if self._metrics is not None:
            self._metrics.audit_refused.inc()
        if host not in self._logged_peers and len(self._logged_peers) < _MAX_LOGGED_PEERS:
            self._logged_peers.add(host)
            log.warning("audit_socket_refused", peer=host, reason=reason)

    def _handle(self, conn: socket.socket) -> None:
        splitter = LineSplitter(self._on_line, self._max_line)
        try:
            conn.settimeout(_POLL)
            while not self._stopping():
                try:
                    data = conn.recv(1 << 16)
                except TimeoutError:
                    continue
                except OSError:
                    break
                if not data:
                    break
                splitter.feed(data)
        finally:
            conn.close()
            with self._lock:
                self._handlers.discard(threading.current_thread())
