"""TLS on the HTTP port: a small terminating front in the process, because waitress has no TLS.

Waitress serves every connection from one asyncore loop (`waitress.wasyncore`) on non-blocking
sockets, and its own documentation sends TLS to a reverse proxy. Handing it `ssl`-wrapped
sockets is not sound, which is why this module exists rather than a wrapped listener:
- `SSLSocket.accept()` runs the handshake on the accepted socket, which is blocking: one client
  that connects and never sends a ClientHello would stop the loop, and every other connection
  with it.
- OpenSSL decrypts whole records and keeps what the caller did not read inside the SSL object,
  where `poll()` cannot see it: waitress would sit on a complete request until the client sent
  more. Non-blocking SSL also raises `SSLWantReadError` / `SSLWantWriteError` (errno 2 and 3),
  which waitress's `recv`/`send` do not expect and would treat as fatal.

So `TlsFront` owns the public address with one selector thread: it accepts, drives each
handshake without blocking (bounded by `handshake_timeout`), drains `pending()` bytes that the
selector cannot see, and pumps plaintext to and from waitress over a Unix socket in a private
(0700) directory. Slow or silent TLS clients therefore cost a socket, never a thread, as with
waitress itself; connections are bounded by `max_connections`, idle ones closed after
`idle_timeout`. The certificate and key are re-read when either file changes (checked every
`RELOAD_CHECK_SECONDS`; Kubernetes Secret volumes swap a symlink, which changes the stat): new
connections get the new certificate, open ones keep theirs, and a broken new pair is logged and
the previous one kept.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path

from bridge.errors import ConfigError
from bridge.logs import get_logger

log = get_logger(__name__)

RELOAD_CHECK_SECONDS = 1.0
_CHUNK = 64 << 10
_BUFFER_LIMIT = 256 << 10  # per direction and connection: past it, stop reading that side
_POLL = 0.25
_R, _W = selectors.EVENT_READ, selectors.EVENT_WRITE

_Signature = tuple[int, int, int, int]


def _signature(cert: Path, key: Path) -> _Signature:
    c, k = cert.stat(), key.stat()
    return (c.st_mtime_ns, c.st_size, k.st_mtime_ns, k.st_size)


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server-side context with the certificate chain and key from PEM files (TLS 1.2 at least)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


class _Pair:
    """One client connection: its TLS socket, the plaintext socket to waitress, and both buffers."""

    __slots__ = ("backend", "backend_eof", "backend_mask", "backend_shut", "client", "client_eof", "client_mask",
                 "closed", "hs_want", "last", "read_wants_write", "started", "to_backend", "to_client", "write_wants_read")

    def __init__(self, client: ssl.SSLSocket, now: float) -> None:
        self.client = client
        self.backend: socket.socket | None = None  # connected once the handshake is done
        self.hs_want = _R  # what the unfinished handshake waits for; 0 once it is done
        self.to_backend = bytearray()
        self.to_client = bytearray()
        self.client_eof = self.backend_eof = self.backend_shut = self.closed = False
        self.read_wants_write = self.write_wants_read = False  # SSL may need the other direction
        self.client_mask = self.backend_mask = 0
        self.started = self.last = now


class TlsFront:
    """Terminates TLS on `bind:port` and forwards plaintext to the Unix socket `backend`."""

    def __init__(
        self,
        bind: str,
        port: int,
        backend: str,
        cert_file: Path,
        key_file: Path,
        *,
        max_connections: int,
        idle_timeout: float,
        handshake_timeout: float = 10.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._backend = backend
        self._cert, self._key = Path(cert_file), Path(key_file)
        self._max = max_connections
        self._idle = idle_timeout
        self._hs_timeout = handshake_timeout
        self._mono = monotonic
        try:
            self._sig = _signature(self._cert, self._key)
            self._ctx = server_context(self._cert, self._key)
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise ConfigError("server.tls_cert_file", f"a readable PEM certificate and matching key: {type(exc).__name__}") from None
        self._next_check = self._mono() + RELOAD_CHECK_SECONDS
        family = socket.AF_INET6 if ":" in bind else socket.AF_INET
        try:
            self._sock = socket.create_server((bind, port), family=family, backlog=128)
        except OSError as exc:
            raise ConfigError("server.port", f"a free address to listen on, {bind}:{port}: {exc.strerror}") from None
        self._sock.setblocking(False)
        self._pairs: set[_Pair] = set()
        self._sel = selectors.DefaultSelector()
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None
        self.refused = 0  # connections closed at once: over max_connections or waitress not accepting
        self.reloads = 0  # certificate pairs loaded after the first

    @property
    def port(self) -> int:
        return int(self._sock.getsockname()[1])

    @property
    def connections(self) -> int:
        return len(self._pairs)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._serve, name="https", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        self._closing.set()
        if self._thread is not None:
            self._thread.join(timeout)
        else:
            self._sock.close()
            self._sel.close()

    # -- the loop ---------------------------------------------------------------------------

    def _serve(self) -> None:
        sel = self._sel
        sel.register(self._sock, _R, None)
        try:
            while not self._closing.is_set():
                # Bytes already decrypted inside an SSL object are invisible to select(): do not sleep on them.
                busy = any(p.client.pending() for p in self._pairs if not p.hs_want and not p.closed)
                for key, mask in sel.select(0 if busy else _POLL):
                    if key.data is None:
                        self._accept()
                    else:
                        pair, is_client = key.data
                        self._event(pair, is_client, mask)
                for pair in list(self._pairs):
                    if not pair.hs_want and not pair.closed and pair.client.pending():
                        self._read_client(pair)
                        self._pump(pair)
                self._maintain()
                for pair in list(self._pairs):
                    self._register(sel, pair)
        except Exception as exc:  # the loop must not die silently: the port would hang
            log.error("https_loop_failed", error=type(exc).__name__)
        finally:
            for pair in list(self._pairs):
                self._close(pair)
            sel.close()
            self._sock.close()

    def _accept(self) -> None:
        for _ in range(64):  # a bounded burst per wake-up, so existing connections are not starved
            try:
                raw, _peer = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. EMFILE: keep serving the open connections
                log.warning("https_accept_failed", error=type(exc).__name__)
                return
            if len(self._pairs) >= self._max:
                self.refused += 1
                raw.close()
                continue
            raw.setblocking(False)
            try:
                client = self._ctx.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
            except (OSError, ssl.SSLError):
                raw.close()
                continue
            pair = _Pair(client, self._mono())
            self._pairs.add(pair)
            self._handshake(pair)

    def _handshake(self, pair: _Pair) -> None:
        try:
            pair.client.do_handshake()
        except ssl.SSLWantReadError:
            pair.hs_want = _R
            return
        except ssl.SSLWantWriteError:
            pair.hs_want = _W
            return
        except (ssl.SSLError, OSError):  # bad client, plaintext on the TLS port, a scanner: just close
            self._close(pair)
            return
        pair.hs_want = 0
        pair.last = self._mono()
        backend = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        backend.setblocking(False)
        try:
            backend.connect(self._backend)
        except OSError:  # waitress's backlog is full (it is at connection_limit) or it is gone
            backend.close()
            self.refused += 1
            self._close(pair)
            return
        pair.backend = backend

    def _event(self, pair: _Pair, is_client: bool, mask: int) -> None:
        if pair.closed:
            return
        if is_client:
            if pair.hs_want:
                self._handshake(pair)
                return
            if mask & _R:
                if pair.write_wants_read:
                    pair.write_wants_read = False
                    self._write_client(pair)
                self._read_client(pair)
            if mask & _W:
                if pair.read_wants_write:
                    pair.read_wants_write = False
                    self._read_client(pair)
                self._write_client(pair)
        else:
            if mask & _R:
                self._read_backend(pair)
            if mask & _W:
                self._write_backend(pair)
        self._pump(pair)

    def _pump(self, pair: _Pair) -> None:
        """Move what is buffered as far as the sockets take it now, then close what is finished."""
        if pair.closed or pair.backend is None:
            return
        if pair.to_backend:
            self._write_backend(pair)
        if pair.to_client:
            self._write_client(pair)
        if pair.closed:
            return
        if pair.client_eof and not pair.to_backend and not pair.backend_shut:
            pair.backend_shut = True
            with contextlib.suppress(OSError):
                pair.backend.shutdown(socket.SHUT_WR)  # waitress sees the client's EOF
        if pair.backend_eof and not pair.to_client:
            self._close(pair)  # waitress closed (Connection: close, or it saw our EOF): done
        elif pair.client_eof and pair.backend_eof:
            self._close(pair)

    def _read_client(self, pair: _Pair) -> None:
        while not pair.closed and not pair.client_eof and len(pair.to_backend) < _BUFFER_LIMIT:
            try:
                data = pair.client.recv(_CHUNK)
            except ssl.SSLWantReadError:
                return
            except ssl.SSLWantWriteError:
                pair.read_wants_write = True
                return
            except ssl.SSLZeroReturnError:
                data = b""
            except (ssl.SSLError, OSError):
                self._close(pair)
                return
            if not data:
                pair.client_eof = True
                return
            pair.to_backend += data
            pair.last = self._mono()

    def _write_client(self, pair: _Pair) -> None:
        while not pair.closed and pair.to_client:
            # A retried SSL write must pass the same bytes: the slice is unchanged until it succeeds.
            try:
                sent = pair.client.send(pair.to_client[:_CHUNK])
            except ssl.SSLWantWriteError:
                return
            except ssl.SSLWantReadError:
                pair.write_wants_read = True
                return
            except (ssl.SSLError, OSError):
                self._close(pair)
                return
            del pair.to_client[:sent]
            pair.last = self._mono()

    def _read_backend(self, pair: _Pair) -> None:
        assert pair.backend is not None
        while not pair.closed and not pair.backend_eof and len(pair.to_client) < _BUFFER_LIMIT:
            try:
                data = pair.backend.recv(_CHUNK)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                pair.backend_eof = True
                return
            if not data:
                pair.backend_eof = True
                return
            pair.to_client += data
            pair.last = self._mono()

    def _write_backend(self, pair: _Pair) -> None:
        assert pair.backend is not None
        while not pair.closed and pair.to_backend:
            try:
                sent = pair.backend.send(pair.to_backend[:_CHUNK])
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._close(pair)
                return
            del pair.to_backend[:sent]

    # -- bookkeeping ------------------------------------------------------------------------

    def _register(self, sel: selectors.BaseSelector, pair: _Pair) -> None:
        if pair.closed:
            return
        if pair.hs_want:
            want_c = pair.hs_want
        else:
            want_c = 0
            if (not pair.client_eof and len(pair.to_backend) < _BUFFER_LIMIT) or pair.write_wants_read:
                want_c |= _R
            if pair.to_client or pair.read_wants_write:
                want_c |= _W
        pair.client_mask = _sync(sel, pair.client, pair.client_mask, want_c, (pair, True))
        if pair.backend is not None:
            want_b = 0
            if not pair.backend_eof and len(pair.to_client) < _BUFFER_LIMIT:
                want_b |= _R
            if pair.to_backend:
                want_b |= _W
            pair.backend_mask = _sync(sel, pair.backend, pair.backend_mask, want_b, (pair, False))

    def _close(self, pair: _Pair) -> None:
        if pair.closed:
            return
        pair.closed = True
        self._pairs.discard(pair)
        # Unregister before closing: a closed fd's number is reused by the next accept, and the
        # selector would still hold the old registration under it.
        for sock, mask in ((pair.client, pair.client_mask), (pair.backend, pair.backend_mask)):
            if sock is None:
                continue
            if mask:
                with contextlib.suppress(KeyError, ValueError, OSError):
                    self._sel.unregister(sock)
            with contextlib.suppress(OSError):
                sock.close()
        pair.client_mask = pair.backend_mask = 0

    def _maintain(self) -> None:
        now = self._mono()
        for pair in list(self._pairs):
            handshake_late = bool(pair.hs_want) and now - pair.started > self._hs_timeout
            if handshake_late or now - pair.last > self._idle:
                self._close(pair)
        if now >= self._next_check:
            self._next_check = now + RELOAD_CHECK_SECONDS
            self._maybe_reload()

    def _maybe_reload(self) -> None:
        try:
            sig = _signature(self._cert, self._key)
        except OSError:
            return  # mid-swap (a Secret volume's symlink flip): look again next time
        if sig == self._sig:
            return
        self._sig = sig  # also after a failure: one warning per change, not one per second
        try:
            self._ctx = server_context(self._cert, self._key)
        except (OSError, ssl.SSLError, ValueError) as exc:
            log.warning("tls_reload_failed", error=type(exc).__name__, kept="previous certificate")
            return
        self.reloads += 1
        log.info("tls_reloaded")


def _sync(sel: selectors.BaseSelector, sock: socket.socket, current: int, want: int, data: object) -> int:
    if want == current:
        return current
    if current == 0:
        sel.register(sock, want, data)
    elif want == 0:
        sel.unregister(sock)
    else:
        sel.modify(sock, want, data)
    return want


def private_socket_dir() -> str:
    """A fresh 0700 directory for waitress's Unix socket (only this process may connect)."""
    import tempfile

    path = tempfile.mkdtemp(prefix="cybedefend-bridge-http-")
    os.chmod(path, 0o700)
    return path
