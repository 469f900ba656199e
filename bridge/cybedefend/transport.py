"""The CybeDefend client's lean transport: httpx's request and response over `bridge.http1`.

An `httpx.BaseTransport`, so the client's request loop and its reading of failures stay in
httpx's terms (docs/adr/0016-lean-cybedefend-http.md). Under it, instead of httpcore and h11 (pure
Python, about half of a cold pass's CPU), our own keep-alive connections and llhttp's parser, as
the Vault path has had since ADR 10. The client uses it only where httpx would have used its own
connection pool: not for a proxy from the environment, not for a transport a test injects.

Where a request fails decides whether a create may be repeated (ADR 4), so the exceptions say it:
- connecting (TCP connect, DNS, the TLS handshake): `httpx.ConnectError` / `ConnectTimeout`, the
  only "never sent" failures;
- anything after the first byte of the request was handed to the socket: `WriteError` /
  `WriteTimeout` while sending, `ReadError` / `ReadTimeout` / `RemoteProtocolError` after. A
  connection closed before any answer byte is among them: the server may have processed the
  request. A GET alone is sent again, once, on a fresh connection when a pooled one turns out
  stale; writes are never resent here (the client's loop decides, and asks its write guard first).
No message holds a header value, the request body or the answer's body.
"""

from __future__ import annotations

import http.client
import re
import ssl
import threading
from typing import Any

import httpx

from bridge.http1 import STALE, Conn, HeadedAnswer, Pool

_RESENT_IF_STALE = frozenset({"GET"})
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 token: a method or header name
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # what would split or break a header line
_BAD_TARGET = re.compile(rb"[\x00-\x20\x7f]")


class LeanTransport(httpx.BaseTransport):
    """HTTP/1.1 keep-alive pools (one per scheme, host and port), shared by threads.

    `size`: idle connections kept per pool (the client's concurrency). `idle_expiry`: httpx's
    keep-alive expiry (`Limits.keepalive_expiry`): an older idle connection is not reused.
    `ssl_context`: for https, made by the client with httpx's own function, so that certificates
    are verified against what httpx's default transport uses (certifi, or SSL_CERT_FILE /
    SSL_CERT_DIR under `trust_env`); None: http only.
    """

    def __init__(self, *, size: int, idle_expiry: float | None, ssl_context: ssl.SSLContext | None) -> None:
        self._size = size
        self._expiry = idle_expiry
        self._ctx = ssl_context
        if ssl_context is not None:
            ssl_context.set_alpn_protocols(["http/1.1"])  # what httpcore offers without http2
        self._pools: dict[tuple[bytes, bytes, int | None], Pool] = {}
        self._lock = threading.Lock()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        pool = self._pool(request.url)
        data = _encode(request)
        timeouts: dict[str, Any] = request.extensions.get("timeout", {})
        connect, write, read = timeouts.get("connect"), timeouts.get("write"), timeouts.get("read")
        resend = request.method in _RESENT_IF_STALE
        for attempt in (0, 1):
            # The retry after a stale connection takes a fresh one: after a server restart every
            # idle connection is dead, not just the first.
            conn, reused = _connect(pool, not resend, connect, fresh=attempt > 0)
            sending = True
            failure: Exception | None = None
            try:
                conn.sock.settimeout(write)
                conn.sock.sendall(data)
                sending = False
                conn.sock.settimeout(read)
                answer = conn.receive(HeadedAnswer())
            except Exception as exc:
                conn.close()
                if resend and reused and attempt == 0 and isinstance(exc, STALE):
                    continue
                failure = exc
            except BaseException:
                conn.close()
                raise
            if failure is not None:
                # Raised outside the handler, so that a parse error (whose arguments may hold the
                # part of the answer already read) is not chained to it even implicitly.
                cause = None if isinstance(failure, http.client.HTTPException) else failure
                raise _failure(failure, sending) from cause
            pool.checkin(conn, answer.keep)
            return httpx.Response(
                answer.status,
                headers=answer.headers,
                stream=httpx.ByteStream(b"".join(answer.body)),
                extensions={"reason_phrase": answer.reason,
                            "http_version": b"HTTP/" + answer.parser.get_http_version().encode("ascii")},
            )
        raise AssertionError("unreachable")  # pragma: no cover

    def _pool(self, url: httpx.URL) -> Pool:
        key = (url.raw_scheme, url.raw_host, url.port)
        pool = self._pools.get(key)
        if pool is not None:
            return pool
        https = url.scheme == "https"
        if (not https and url.scheme != "http") or (https and self._ctx is None):
            raise httpx.UnsupportedProtocol(f"this transport was not made for {url.scheme!r} URLs")
        with self._lock:
            pool = self._pools.get(key)
            if pool is None:
                port = url.port or (443 if https else 80)
                pool = Pool(url.raw_host.decode("ascii"), port, self._ctx if https else None, None, self._size,
                            idle_expiry=self._expiry)
                self._pools[key] = pool
        return pool

    def close(self) -> None:
        with self._lock:
            pools = list(self._pools.values())
        for pool in pools:
            pool.close()


def _connect(pool: Pool, check: bool, timeout: float | None, *, fresh: bool) -> tuple[Conn, bool]:
    """A pooled or new connection; a failure here means no byte of the request was sent."""
    try:
        return (pool.new(timeout), False) if fresh else pool.checkout(check, timeout)
    except TimeoutError as exc:
        raise httpx.ConnectTimeout(f"connecting timed out ({type(exc).__name__})") from exc
    except OSError as exc:  # refused, unreachable, DNS, and the TLS handshake (ssl.SSLError)
        raise httpx.ConnectError(str(exc) or type(exc).__name__) from exc


def _failure(exc: Exception, sending: bool) -> Exception:
    """The httpx exception for a failure after the request began to be sent."""
    kind = type(exc).__name__
    if isinstance(exc, http.client.RemoteDisconnected):
        return httpx.RemoteProtocolError(f"the server closed the connection without answering ({kind})")
    if isinstance(exc, http.client.HTTPException):
        return httpx.RemoteProtocolError(f"the answer could not be read ({kind})")
    if isinstance(exc, TimeoutError):
        return httpx.WriteTimeout("sending timed out") if sending else httpx.ReadTimeout("the answer timed out")
    if isinstance(exc, OSError):
        return httpx.WriteError(f"sending failed ({kind})") if sending else httpx.ReadError(f"reading failed ({kind})")
    return exc


def _encode(request: httpx.Request) -> bytes:
    """The whole request: request line, the request's headers as httpx prepared them (Host,
    Content-Length, Content-Type, the client's defaults and auth), the body. A character that
    would split or break the request is refused, naming the header, never its value."""
    method = request.method.encode("ascii")
    target = request.url.raw_path
    if method == b"HEAD" or not _TOKEN.fullmatch(method):
        raise httpx.LocalProtocolError(f"the lean transport does not send {request.method!r} requests")
    if _BAD_TARGET.search(target):
        raise httpx.LocalProtocolError("the request target holds a character HTTP/1.1 cannot carry")
    parts = [method, b" ", target, b" HTTP/1.1\r\n"]
    length = False
    for name, value in request.headers.raw:
        if not _TOKEN.fullmatch(name):
            raise httpx.LocalProtocolError("a request header name is not an HTTP token")
        if _BAD_VALUE.search(value):
            raise httpx.LocalProtocolError(
                f"request header {name.decode('ascii')} holds a character HTTP/1.1 cannot carry"
            )
        lowered = name.lower()
        if lowered == b"transfer-encoding":
            raise httpx.LocalProtocolError("the lean transport sends bodies with a Content-Length only")
        length = length or lowered == b"content-length"
        parts += (name, b": ", value, b"\r\n")
    body = request.read()
    if body and not length:
        raise httpx.LocalProtocolError("a request body without a Content-Length")
    parts += (b"\r\n", body)
    return b"".join(parts)
