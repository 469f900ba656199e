"""Lean HTTP/1.1 client connections: our own socket, httptools' parser (llhttp), a keep-alive pool.

Shared by the Vault transport (`bridge.vault.transport`, ADR 10) and the CybeDefend transport
(`bridge.cybedefend.transport`, ADR 16): the one module that imports httptools. It moves bytes and
frames answers; it knows nothing of either API, of tokens or of retries beyond one rule: only the
caller's idempotent requests are sent again, once, after a pooled connection turned out stale.

Failures are the standard library's own exceptions: `OSError` (and `ssl.SSLError`, `TimeoutError`)
from the socket, `http.client`'s (`RemoteDisconnected`, `BadStatusLine`, `IncompleteRead`,
`LineTooLong`, `HTTPException`) for an answer that is not one. No message holds request bytes.
"""

from __future__ import annotations

import http.client
import queue
import select
import socket
import ssl
import time
from collections.abc import Callable
from typing import TypeVar

import httptools

MAX_HEAD = 64 * 1024  # the APIs' headers are a few hundred bytes; more is not an API answer
A = TypeVar("A", bound="Answer")
# A pooled connection the server closed while it sat idle shows up as one of these on its next use.
STALE = (http.client.RemoteDisconnected, http.client.BadStatusLine, ConnectionResetError, BrokenPipeError)


class Answer:
    """The parser's callbacks for one answer: httptools (llhttp, the C parser Node.js uses)
    calls them while `feed_data` runs; what it parsed is read off this object afterwards.
    Headers are not kept (the Vault path needs none): see `HeadedAnswer`."""

    __slots__ = ("begun", "body", "complete", "extra", "headers_done", "keep", "parser", "status", "status_seen")

    def __init__(self) -> None:
        self.body: list[bytes] = []
        self.begun = self.complete = self.extra = self.headers_done = self.status_seen = self.keep = False
        self.status = 0
        self.parser = httptools.HttpResponseParser(self)

    def on_message_begin(self) -> None:
        if self.complete:
            self.extra = True  # a second answer nobody asked for: the stream cannot be trusted
        self.begun = True

    def on_status(self, status: bytes) -> None:
        self.status_seen = True

    def on_headers_complete(self) -> None:
        # Read now: llhttp answers keep-alive and status only for the message being parsed.
        self.headers_done = True
        self.status = self.parser.get_status_code()
        self.keep = self.parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        if self.status < 200:  # a 1xx interim answer: the real one follows
            self.interim()
            return
        self.keep = self.keep and self.parser.should_keep_alive()
        self.complete = True

    def interim(self) -> None:
        self.body.clear()
        self.headers_done = False


class HeadedAnswer(Answer):
    """An answer whose reason phrase and headers are kept (raw bytes, in the order received).
    httptools hands a header over whole; the status text may come in pieces."""

    __slots__ = ("headers", "reason")

    def __init__(self) -> None:
        super().__init__()
        self.headers: list[tuple[bytes, bytes]] = []
        self.reason = b""

    def on_status(self, status: bytes) -> None:
        self.status_seen = True
        self.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def interim(self) -> None:
        super().interim()
        self.headers.clear()
        self.reason = b""


class Conn:
    """One keep-alive HTTP/1.1 connection: a request in one `sendall`, a whole answer back.

    The socket is ours (one `sendall`, `recv` into the parser); the parsing is httptools', a
    binding of llhttp: `http.client` parses every answer's headers with the `email` package and
    h11 in pure Python, most of a request's CPU under the one GIL (ADR 10, ADR 16).
    """

    __slots__ = ("idle_since", "sock")

    def __init__(self, host: str, port: int, timeout: float | None, ctx: ssl.SSLContext | None) -> None:
        sock = socket.create_connection((host, port), timeout)
        try:
            # Small requests, each waiting for its answer: Nagle would only add delay.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if ctx is not None:
                sock = ctx.wrap_socket(sock, server_hostname=host)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self.idle_since = 0.0

    def close(self) -> None:
        self.sock.close()

    def dropped(self) -> bool:
        """True when the idle connection is readable: the server closed it (or sent what nobody
        asked for). Looked at before a request that must not be retried (urllib3 does the same)."""
        if isinstance(self.sock, ssl.SSLSocket) and self.sock.pending():
            return True
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(readable)

    def exchange(self, request: bytes) -> tuple[int, bytes, bool]:
        """Send one request; (status, body, connection reusable)."""
        self.sock.sendall(request)
        r = self.receive(Answer())
        return r.status, b"".join(r.body), r.keep and not r.extra

    def receive(self, r: A) -> A:
        """Read one whole answer into `r` (its `keep` already says whether the connection may be
        reused: llhttp's keep-alive, and nothing after the answer)."""
        received = 0
        while not r.complete:
            chunk = self.sock.recv(65536)
            if not chunk:
                return self._closed(r, received)
            received += len(chunk)
            if not r.headers_done and received > MAX_HEAD:
                raise http.client.LineTooLong("response headers")
            try:
                r.parser.feed_data(chunk)
            except httptools.HttpParserError:
                if r.complete:  # bytes after the answer that are no answer at all
                    r.extra = True
                    break
                if not r.status_seen:
                    raise http.client.BadStatusLine("unreadable status line") from None
                if r.headers_done:
                    raise http.client.IncompleteRead(b"".join(r.body)) from None
                raise http.client.HTTPException("unreadable response headers") from None
        r.keep = r.keep and not r.extra
        return r

    @staticmethod
    def _closed(r: A, received: int) -> A:
        """The server closed the connection before the answer was complete."""
        if not received:
            # Nothing at all: for a pooled connection, most likely closed while idle.
            raise http.client.RemoteDisconnected("the server closed the connection without answering")
        if r.headers_done and not r.keep:
            r.complete = True  # no framing: the body ran to the close
            return r
        raise http.client.IncompleteRead(b"".join(r.body))


def host_header(host: str, port: int, https: bool) -> str:
    """The Host header for (host, port): the port only when it is not the scheme's default, an
    IPv6 literal in brackets."""
    default = 443 if https else 80
    shown = f"[{host}]" if ":" in host else host
    return shown if port == default else f"{shown}:{port}"


class Pool:
    """Keep-alive connections (`Conn`) to one host and port, reused across threads.

    `size`: the idle connections kept. `idle_expiry`: an idle connection older than this is
    closed instead of reused (servers close idle connections after a few seconds; a request sent
    just as that happens is lost in between). Proxies are not this module's business.
    """

    def __init__(
        self, host: str, port: int, ctx: ssl.SSLContext | None, timeout: float | None, size: int,
        *, idle_expiry: float | None = None, clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.host = host
        self.port = port
        self.ctx = ctx
        self.timeout = timeout
        self._expiry = idle_expiry
        self._clock = clock
        self._idle: queue.LifoQueue[Conn] = queue.LifoQueue(maxsize=size)

    def new(self, timeout: float | None = None) -> Conn:
        """A fresh connection (`timeout`: for connecting, and the socket's until changed)."""
        return Conn(self.host, self.port, self.timeout if timeout is None else timeout, self.ctx)

    def checkout(self, check: bool, timeout: float | None = None) -> tuple[Conn, bool]:
        """An idle connection (and True), or a new one (and False). `check`: skip idle
        connections the server already closed (for a request that is not retried: they would
        fail it for nothing)."""
        while True:
            try:
                conn = self._idle.get_nowait()
            except queue.Empty:
                return self.new(timeout), False
            if self._expiry is not None and self._clock() - conn.idle_since > self._expiry:
                conn.close()
                continue
            if not check or not conn.dropped():
                return conn, True
            conn.close()

    def checkin(self, conn: Conn, keep: bool) -> None:
        """Give `conn` back after a whole answer (`keep`: the answer allows reuse)."""
        if not keep:
            conn.close()
            return
        if self._expiry is not None:
            conn.idle_since = self._clock()
        try:
            self._idle.put_nowait(conn)
        except queue.Full:
            conn.close()

    def request(self, request: bytes, *, idempotent: bool) -> tuple[int, bytes]:
        """Send `request` (a whole HTTP/1.1 request) on a pooled connection: (status, body).

        Only an `idempotent` request is sent again, once, after a stale pooled connection: one
        that may have reached the server is never repeated blindly."""
        for attempt in (0, 1):
            # The retry after a stale connection takes a fresh one: after a server restart
            # every idle pooled connection is dead, not just the first.
            conn, reused = self.checkout(not idempotent) if attempt == 0 else (self.new(), False)
            try:
                status, data, keep = conn.exchange(request)
            except STALE:
                conn.close()
                # A pooled connection the server closed while idle: try once on a fresh one.
                if reused and attempt == 0 and idempotent:
                    continue
                raise
            except BaseException:
                conn.close()
                raise
            self.checkin(conn, keep)
            return status, data
        raise AssertionError("unreachable")  # pragma: no cover

    def close(self) -> None:
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                return
