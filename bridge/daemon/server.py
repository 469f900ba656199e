"""The daemon's one HTTP port: /metrics, /healthz, /readyz, /v1/status, POST /v1/sync and /v1/audit.

Stdlib `ThreadingHTTPServer` with daemon threads: the endpoints are few and small, and the
server must keep answering /healthz while a pass runs. Everything it knows comes through
callables, so it holds no state of its own. Protections: the bearer token is compared in
constant time; a body's size is judged from Content-Length before a byte is read; sockets
time out so a slow client cannot hold a thread forever; HTTP/1.0, so every response closes the
connection and an unread body can never be parsed as a next request. Access logs name the
method, path (without query) and status, never a header or body.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import socket
import threading
import time
from collections.abc import Callable, Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from bridge.config import ServerSettings
from bridge.daemon.audit import parse_ingest_body
from bridge.daemon.ha import FORWARD_HEADER
from bridge.errors import BadRequest, IngestRejected
from bridge.logs import get_logger
from bridge.metrics import CONTENT_TYPE, Metrics
from bridge.model import Sensitive

log = get_logger(__name__)

MAX_SYNC_PATHS = 1000
MAX_PATH_LENGTH = 1024
SOCKET_TIMEOUT_SECONDS = 10.0
# After an early answer (401, 404, 413, …) what the client still sends is read and dropped, within
# these bounds, so that it sees our answer rather than a connection reset.
_LINGER_BYTES = 8 << 20
_LINGER_SECONDS = 2.0

OnSync = Callable[[list[str] | None, str], bool]


def parse_sync_body(body: bytes) -> list[str] | None:
    """`{"paths": ["mount/path", …]}` -> the paths; an empty body or no `paths` -> None (full pass)."""
    if not body.strip():
        return None
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest("body is not valid JSON") from exc
    if not isinstance(doc, dict):
        raise BadRequest("body must be a JSON object")
    unknown = set(doc) - {"paths"}
    if unknown:
        raise BadRequest("unknown keys in body (only 'paths' is accepted)")
    paths = doc.get("paths")
    if paths is None:
        return None
    if not isinstance(paths, list) or not paths:
        raise BadRequest("'paths' must be a non-empty list of strings")
    if len(paths) > MAX_SYNC_PATHS:
        raise BadRequest(f"'paths' has more than {MAX_SYNC_PATHS} entries")
    out: list[str] = []
    for p in paths:
        if not isinstance(p, str):
            raise BadRequest("'paths' must be a non-empty list of strings")
        key = p.strip("/")
        if not key or len(key) > MAX_PATH_LENGTH or "/" not in key:
            raise BadRequest(f"each path must look like mount/path and be at most {MAX_PATH_LENGTH} characters")
        if ".." in key.split("/") or any(ord(c) < 32 or ord(c) == 127 for c in key):
            raise BadRequest("paths may not contain '..' segments or control characters")
        out.append(key)
    return out


def make_audit_ingest(match: Callable[[bytes], list[str]], max_lines: int) -> Callable[[bytes], tuple[int, list[str]]]:
    """Split a POST /v1/audit body and match each line -> (lines accepted, keys written).

    Raises `IngestRejected` (answered 413 or 400) for a body it will not take.
    """

    def ingest(body: bytes) -> tuple[int, list[str]]:
        lines = parse_ingest_body(body, max_lines)
        keys = dict.fromkeys(k for line in lines for k in match(line))
        return len(lines), list(keys)

    return ingest


class HttpServer:
    """Serves the endpoints on `settings.bind:settings.port` until `stop()`."""

    def __init__(
        self,
        settings: ServerSettings,
        *,
        metrics: Metrics,
        live: Callable[[], bool],
        ready: Callable[[], tuple[bool, str]],
        status: Callable[[], Mapping[str, Any]],
        on_sync: OnSync,
        on_audit: Callable[[bytes], int] | None,
        webhook_token: Sensitive | None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.live = live
        self.ready = ready
        self.status = status
        self.on_sync = on_sync
        self.on_audit = on_audit
        self._token = webhook_token if webhook_token else None  # kept wrapped: vars(server) shows no value
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def webhooks_enabled(self) -> bool:
        return self._token is not None

    def authorized(self, header: str | None) -> bool:
        """Constant-time check of an `Authorization: Bearer <token>` header."""
        if self._token is None or not header:
            return False
        scheme, _, value = header.strip().partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(value.strip().encode(), self._token.reveal().encode())

    def start(self) -> int:
        """Bind and serve on a daemon thread; returns the bound port (useful with port 0)."""
        handler = type("BoundHandler", (_Handler,), {"app": self})
        httpd = ThreadingHTTPServer((self.settings.bind, self.settings.port), handler)
        httpd.daemon_threads = True
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, name="http", kwargs={"poll_interval": 0.2}, daemon=True)
        self._thread.start()
        port = int(httpd.server_address[1])
        log.info("http_listening", bind=self.settings.bind, port=port)
        return port

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


class _Handler(BaseHTTPRequestHandler):
    app: HttpServer
    _consumed = True  # no request body left unread (set False while a POST is handled)
    protocol_version = "HTTP/1.0"
    timeout = SOCKET_TIMEOUT_SECONDS
    server_version = "cybedefend-bridge"
    sys_version = ""

    # -- plumbing ---------------------------------------------------------------------------

    def _send(self, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _text(self, status: int, text: str) -> None:
        self._send(status, (text + "\n").encode())

    def _json(self, status: int, doc: Any) -> None:
        self._send(status, json.dumps(doc, default=str).encode(), "application/json")

    def _path(self) -> str:
        return self.path.split("?", 1)[0]

    def log_message(self, format: str, *args: Any) -> None:  # stdlib's signature
        pass  # replaced by log_request/log_error below, which never print headers or bodies

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        log.debug("http_request", method=self.command, path=self._path(), status=str(code))

    def log_error(self, format: str, *args: Any) -> None:
        log.debug("http_error", client=self.client_address[0])

    def _content_length(self) -> int | None:
        """The declared body size, or None after answering 400/411 for a bad or chunked one."""
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            self._text(HTTPStatus.LENGTH_REQUIRED, "Content-Length is required")
            return None
        raw = self.headers.get("Content-Length")
        if raw is None:
            return 0
        if not raw.strip().isdigit():
            self._text(HTTPStatus.BAD_REQUEST, "invalid Content-Length")
            return None
        return int(raw)

    def _linger(self) -> None:
        if self._consumed or not (self.headers.get("Content-Length", "0").strip() not in ("", "0") or self.headers.get("Transfer-Encoding")):
            return
        with contextlib.suppress(OSError, ValueError):
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(_LINGER_SECONDS)
            deadline, left = time.monotonic() + _LINGER_SECONDS, _LINGER_BYTES
            while left > 0 and time.monotonic() < deadline:
                chunk = self.rfile.read1(min(1 << 16, left))
                if not chunk:
                    break
                left -= len(chunk)

    def _read_authorized_body(self) -> bytes | None:
        """Auth, then size, then the body; answers and returns None when any of them fails."""
        app = self.app
        if not app.authorized(self.headers.get("Authorization")):
            self._send(HTTPStatus.UNAUTHORIZED, b"unauthorized\n")
            return None
        length = self._content_length()
        if length is None:
            return None
        if length > app.settings.max_body_bytes:
            self._text(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body larger than {app.settings.max_body_bytes} bytes")
            return None
        body = self.rfile.read(length) if length else b""
        self._consumed = True
        if len(body) != length:
            self._text(HTTPStatus.BAD_REQUEST, "body shorter than Content-Length")
            return None
        return body

    # -- routes -----------------------------------------------------------------------------

    def do_GET(self) -> None:
        path, app = self._path(), self.app
        if path == "/metrics":
            self._send(HTTPStatus.OK, app.metrics.exposition(), CONTENT_TYPE)
        elif path == "/healthz":
            # Only our own threads count: never Vault or CybeDefend (a dead upstream must not
            # get the pod restarted).
            try:
                ok = bool(app.live())
            except Exception:  # a broken probe callback is "not live", never a 500 loop
                ok = False
            self._text(HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE, "ok" if ok else "not live")
        elif path == "/readyz":
            try:
                ready, reason = app.ready()
            except Exception as exc:
                ready, reason = False, f"readiness check failed: {type(exc).__name__}"
            self._text(HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE, reason or ("ready" if ready else "not ready"))
        elif path == "/v1/status":
            if app.settings.status_requires_token:
                if not app.webhooks_enabled:
                    self._text(HTTPStatus.NOT_FOUND, "status needs a token but no webhook_token_file is set")
                    return
                if not app.authorized(self.headers.get("Authorization")):
                    self._send(HTTPStatus.UNAUTHORIZED, b"unauthorized\n")
                    return
            try:
                doc = dict(app.status())
            except Exception as exc:  # e.g. the ledger is busy or broken: say so, keep serving
                log.warning("status_failed", error=type(exc).__name__)
                self._text(HTTPStatus.INTERNAL_SERVER_ERROR, "status unavailable")
                return
            self._json(HTTPStatus.OK, doc)
        elif path in ("/v1/sync", "/v1/audit"):
            self._method_not_allowed("POST")
        else:
            self._text(HTTPStatus.NOT_FOUND, "not found")

    do_HEAD = do_GET

    def do_POST(self) -> None:
        self._consumed = False
        try:
            self._post()
        finally:
            self._linger()

    def _post(self) -> None:
        path, app = self._path(), self.app
        if path == "/v1/sync":
            if not app.webhooks_enabled:
                self._text(HTTPStatus.NOT_FOUND, "webhook disabled (no webhook_token_file)")
                return
            body = self._read_authorized_body()
            if body is None:
                return
            try:
                paths = parse_sync_body(body)
            except BadRequest as exc:
                self._text(HTTPStatus.BAD_REQUEST, str(exc))
                return
            source = "forwarded" if self.headers.get(FORWARD_HEADER) else "webhook"
            if not app.on_sync(paths, source):
                self._text(HTTPStatus.SERVICE_UNAVAILABLE, "not accepting triggers (shutting down)")
                return
            self._json(HTTPStatus.ACCEPTED, {"accepted": True, "full": paths is None, "paths": len(paths or ())})
        elif path == "/v1/audit":
            if app.on_audit is None or not app.webhooks_enabled:
                self._text(HTTPStatus.NOT_FOUND, "audit ingest disabled")
                return
            body = self._read_authorized_body()
            if body is None:
                return
            try:
                accepted = app.on_audit(body)
            except IngestRejected as exc:  # its messages are fixed texts, never body content
                self._text(HTTPStatus.REQUEST_ENTITY_TOO_LARGE if exc.too_large else HTTPStatus.BAD_REQUEST, str(exc))
                return
            except ValueError:
                self._text(HTTPStatus.BAD_REQUEST, "bad audit body")
                return
            if accepted < 0:
                self._text(HTTPStatus.SERVICE_UNAVAILABLE, "not accepting triggers (shutting down)")
                return
            self._json(HTTPStatus.ACCEPTED, {"accepted": accepted})
        elif path in ("/metrics", "/healthz", "/readyz", "/v1/status"):
            self._method_not_allowed("GET")
        else:
            self._text(HTTPStatus.NOT_FOUND, "not found")

    def _method_not_allowed(self, allow: str) -> None:
        self.send_response(HTTPStatus.METHOD_NOT_ALLOWED)
        self.send_header("Allow", allow)
        self.send_header("Content-Length", "0")
        self.end_headers()
