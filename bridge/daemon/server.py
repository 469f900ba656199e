"""The daemon's one HTTP port: /metrics, /healthz, /readyz, /v1/status, POST /v1/sync and /v1/audit.

Served by waitress, the only module importing it: one asyncore loop reads and writes every
connection and a fixed pool of `server.threads` workers runs the handlers, so a thousand
trickling clients cost a thousand sockets in that loop, not a thousand threads (the stdlib's
`ThreadingHTTPServer` this replaced started one thread per connection). A request reaches a
worker only once its headers and body are complete; `server.connection_limit` bounds open
connections and `server.channel_timeout_seconds` closes idle ones. Bodies are bounded by
`server.max_body_bytes` from Content-Length (or while de-chunking) before they are buffered;
waitress answers 413 and closes without draining the rest, so a client still sending a body far
past the limit may see a connection reset instead of the 413 (the stdlib server drained up to
8 MiB; not draining is what keeps an oversized sender from holding the loop).

With `server.tls_cert_file` and `server.tls_key_file` the port speaks HTTPS only, terminated by
`bridge.daemon.tls.TlsFront` in front of waitress (which has no TLS, and why it cannot simply be
handed ssl sockets is explained there); the certificate is re-read when its files change.

Everything the server knows comes through callables (`Hooks`), which `set_hooks` may replace
while it serves: the composition root binds the port with start-up hooks before Vault answers,
then hands the same server to the daemon. Bearer tokens are compared in constant time. Access
logs name the method, path (without query) and status, never a header or body.
"""

from __future__ import annotations

import hmac
import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs

from waitress.server import create_server

from bridge.config import ServerSettings
from bridge.daemon.audit import parse_ingest_body
from bridge.daemon.ha import FORWARD_HEADER, verify_forward
from bridge.daemon.tls import TlsFront, private_socket_dir
from bridge.errors import BadRequest, IngestRejected
from bridge.logs import get_logger
from bridge.metrics import CONTENT_TYPE, Metrics
from bridge.model import Sensitive

log = get_logger(__name__)

MAX_SYNC_PATHS = 1000
MAX_PATH_LENGTH = 1024

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


@dataclass(frozen=True, slots=True)
class IngestResult:
    """What one POST /v1/audit body gave: lines read, keys to sync, lines that could not be judged."""

    lines: int
    keys: list[str]
    rejected: int = 0  # a line whose matching failed (malformed shape): skipped, the rest still counts

    def counts(self) -> dict[str, int]:
        return {"accepted": self.lines, "keys": len(self.keys), "rejected": self.rejected}


def make_audit_ingest(match: Callable[[bytes], list[str]], max_lines: int) -> Callable[[bytes], IngestResult]:
    """Split a POST /v1/audit body and match each line on its own -> `IngestResult`.

    Raises `IngestRejected` (answered 413 or 400) for a body it will not take as a whole; a line
    the matcher chokes on is counted as rejected and never costs the other lines their sync.
    """

    def ingest(body: bytes) -> IngestResult:
        lines = parse_ingest_body(body, max_lines)
        keys: dict[str, None] = {}
        rejected = 0
        for line in lines:
            try:
                keys.update(dict.fromkeys(match(line)))
            except Exception as exc:  # one odd line must not lose the batch; the full pass is the safety net
                rejected += 1
                log.debug("audit_line_rejected", error=type(exc).__name__)
        return IngestResult(len(lines), list(keys), rejected)

    return ingest


Check = tuple[str, bool, str]  # (name, ok, reason when not ok): one line of /healthz or /readyz?verbose


@dataclass(frozen=True, slots=True)
class Hooks:
    """What the server asks the rest of the bridge; replaced as a whole by `HttpServer.set_hooks`."""

    live: Callable[[], Sequence[Check]]
    ready: Callable[[], Sequence[Check]]
    status: Callable[[], Mapping[str, Any]]
    on_sync: Callable[[list[str] | None, str], bool]  # False: not accepting (shutting down)
    on_audit: Callable[[bytes], Mapping[str, int] | None] | None  # None result: not accepting; None hook: ingest off


def probe_text(kind: str, checks: Sequence[Check], verbose: bool) -> tuple[bool, str]:
    """Kubernetes-style probe body: `ok`, or with `?verbose` one `[+]name ok` / `[-]name failed: reason` line per check."""
    ok = all(c[1] for c in checks)
    lines = [f"[+]{name} ok" if good else f"[-]{name} failed: {reason or 'failed'}" for name, good, reason in checks]
    if verbose:
        return ok, "\n".join([*lines, f"{kind} check passed" if ok else f"{kind} check failed"])
    if ok:
        return ok, "ok"
    return ok, "\n".join([*(ln for ln in lines if ln.startswith("[-]")), f"{kind} check failed"])


_Response = tuple[int, bytes, str, list[tuple[str, str]]]
_TEXT = "text/plain; charset=utf-8"


class _QueueCounter:
    """What waitress's task dispatcher calls as its `waitress.queue` logger: counts, never prints."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def warning(self, msg: str, *args: object) -> None:
        self._metrics.http_queued.inc()


class HttpServer:
    """Serves the endpoints on `settings.bind:settings.port` from `start()` until `stop()`."""

    def __init__(
        self,
        settings: ServerSettings,
        *,
        metrics: Metrics,
        hooks: Hooks,
        webhook_token: Sensitive | None,
        metrics_token: Sensitive | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self._hooks = hooks
        self._token = webhook_token if webhook_token else None  # kept wrapped: vars(server) shows no value
        self._metrics_token = metrics_token if metrics_token else None
        self._server: Any = None  # waitress's server object (untyped internals kept to this module)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._tls: TlsFront | None = None
        self._socket_dir: str | None = None
        self._forward_key: bytes | None = None  # HA: verifies standbys' signed forwards
        self._clock: Callable[[], float] = time.time
        self.port: int | None = None

    def set_hooks(self, hooks: Hooks) -> None:
        """Swap what the endpoints answer with, e.g. from start-up hooks to the daemon's; atomic per request."""
        self._hooks = hooks

    def accept_forwards(self, key: bytes, clock: Callable[[], float] = time.time) -> None:
        """Accept `/v1/sync` requests a standby signed with `key` (bridge.daemon.ha.sign_forward)."""
        self._forward_key, self._clock = key, clock

    @property
    def webhooks_enabled(self) -> bool:
        return self._token is not None

    def authorized(self, header: str | None, token: Sensitive | None = None) -> bool:
        """Constant-time check of an `Authorization: Bearer <token>` header (the webhook token by default)."""
        token = token if token is not None else self._token
        if token is None or not header:
            return False
        scheme, _, value = header.strip().partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(value.strip().encode(), token.reveal().encode())

    def start(self) -> int:
        """Bind and serve on a daemon thread; returns the bound port (useful with port 0). Idempotent."""
        with self._lock:
            if self._server is not None and self.port is not None:
                return self.port
            s = self.settings
            if s.tls_cert_file is not None and s.tls_key_file is not None:
                # waitress has no TLS and cannot be handed ssl sockets (see bridge.daemon.tls): it
                # serves a private Unix socket, and the TLS front owns the public address.
                self._socket_dir = private_socket_dir()
                listen: dict[str, Any] = {"unix_socket": os.path.join(self._socket_dir, "http.sock"), "unix_socket_perms": "600"}
            else:
                listen = {"host": s.bind, "port": s.port}
            server: Any = create_server(
                self._wsgi,
                **listen,
                threads=s.threads,
                connection_limit=s.connection_limit,
                channel_timeout=s.channel_timeout_seconds,
                cleanup_interval=max(1, min(30, s.channel_timeout_seconds // 2)),
                max_request_body_size=s.max_body_bytes + 1,  # waitress refuses a length >= this
                ident="cybedefend-bridge",
                expose_tracebacks=False,
                clear_untrusted_proxy_headers=True,
                asyncore_use_poll=True,  # select() fails past fd 1024; poll() does not
                asyncore_loop_timeout=1,
            )
            # waitress logs a warning for every request that finds all workers busy: under a burst
            # of scrapes, a log line per request. Counted instead (the dispatcher's attribute is
            # its class's logger; this instance gets its own).
            server.task_dispatcher.queue_logger = _QueueCounter(self.metrics)
            self._server = server
            if "unix_socket" in listen:
                assert s.tls_cert_file is not None and s.tls_key_file is not None
                try:
                    self._tls = TlsFront(s.bind, s.port, listen["unix_socket"], s.tls_cert_file, s.tls_key_file,
                                         max_connections=s.connection_limit, idle_timeout=s.channel_timeout_seconds)
                except BaseException:
                    server.close()
                    self._server = None
                    shutil.rmtree(listen["unix_socket"].rsplit("/", 1)[0], ignore_errors=True)
                    self._socket_dir = None
                    raise
                self._tls.start()
                self.port = self._tls.port
            else:
                self.port = int(server.effective_port)
            self._thread = threading.Thread(target=server.run, name="http", daemon=True)
            self._thread.start()
        log.info("http_listening", bind=s.bind, port=self.port, threads=s.threads, tls=self._tls is not None)
        return self.port

    def stop(self) -> None:
        with self._lock:
            server, self._server = self._server, None
            thread, self._thread = self._thread, None
        if server is None:
            return
        tls, self._tls = self._tls, None
        if tls is not None:
            tls.close()
        # Closing sockets from this thread while the loop polls them races with it; the trigger
        # runs the close inside the loop's own thread, and the loop ends once its map is empty.
        from waitress import wasyncore

        try:
            server.trigger.pull_trigger(lambda: wasyncore.close_all(server._map))
        except OSError:
            wasyncore.close_all(server._map)
        if thread is not None:
            thread.join(timeout=5)
        server.task_dispatcher.shutdown(cancel_pending=True, timeout=5)
        socket_dir, self._socket_dir = self._socket_dir, None
        if socket_dir is not None:
            shutil.rmtree(socket_dir, ignore_errors=True)

    # -- WSGI -------------------------------------------------------------------------------

    def _wsgi(self, environ: Mapping[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        method = str(environ.get("REQUEST_METHOD", "GET"))
        path = str(environ.get("PATH_INFO", "")) or "/"
        try:
            status, body, ctype, extra = self._route(method, path, environ)
        except Exception as exc:  # never a traceback to the client or to waitress's logger
            log.error("http_handler_failed", path=path, error=type(exc).__name__)
            status, body, ctype, extra = 500, b"internal error\n", _TEXT, []
        log.debug("http_request", method=method, path=path, status=str(status))
        headers = [("Content-Type", ctype), ("Content-Length", str(len(body))), ("Cache-Control", "no-store"), *extra]
        start_response(f"{status} {HTTPStatus(status).phrase}", headers)
        return [b"" if method == "HEAD" else body]

    def _route(self, method: str, path: str, environ: Mapping[str, Any]) -> _Response:
        if method in ("GET", "HEAD"):
            if path in ("/v1/sync", "/v1/audit"):
                return 405, b"", _TEXT, [("Allow", "POST")]
            return self._get(path, environ)
        if method == "POST":
            if path in ("/metrics", "/healthz", "/readyz", "/v1/status"):
                return 405, b"", _TEXT, [("Allow", "GET")]
            return self._post(path, environ)
        allow = "POST" if path in ("/v1/sync", "/v1/audit") else "GET"
        return 405, b"", _TEXT, [("Allow", allow)]

    def _get(self, path: str, environ: Mapping[str, Any]) -> _Response:
        hooks, auth = self._hooks, environ.get("HTTP_AUTHORIZATION")
        if path == "/metrics":
            if self._metrics_token is not None and not self.authorized(auth, self._metrics_token):
                return _unauthorized()
            return 200, self.metrics.exposition(), CONTENT_TYPE, []
        if path in ("/healthz", "/livez", "/readyz"):
            kind = "readyz" if path == "/readyz" else "livez"
            try:
                checks = list((hooks.ready if kind == "readyz" else hooks.live)())
            except Exception as exc:  # a broken probe callback is "not ok", never a 500 loop
                checks = [("probe", False, f"check raised {type(exc).__name__}")]
            if kind == "readyz":
                self.metrics.ready.set(1 if all(c[1] for c in checks) else 0)
            verbose = "verbose" in parse_qs(str(environ.get("QUERY_STRING", "")), keep_blank_values=True)
            ok, text = probe_text(kind, checks, verbose)
            return (200 if ok else 503), (text + "\n").encode(), _TEXT, []
        if path == "/v1/status":
            allowed = [t for t in (self._metrics_token, self._token if self.settings.status_requires_token else None) if t]
            if self.settings.status_requires_token and not self.webhooks_enabled and self._metrics_token is None:
                return _text(404, "status needs a token but no webhook_token_file is set")
            if allowed and not any(self.authorized(auth, t) for t in allowed):
                return _unauthorized()
            try:
                doc = dict(hooks.status())
            except Exception as exc:  # e.g. the ledger is busy or broken: say so, keep serving
                log.warning("status_failed", error=type(exc).__name__)
                return _text(500, "status unavailable")
            return 200, json.dumps(doc, default=str).encode(), "application/json", []
        return _text(404, "not found")

    def _post(self, path: str, environ: Mapping[str, Any]) -> _Response:
        hooks = self._hooks
        forward_header = environ.get("HTTP_" + FORWARD_HEADER.upper().replace("-", "_"))
        if path == "/v1/sync" and forward_header is not None:
            # A standby's forward: signed with the key derived from the state key, never the
            # webhook token (which would travel to whatever address a lease document names).
            body = _read_body(environ)
            key = self._forward_key
            if key is None or not verify_forward(key, forward_header, body, self._clock()):
                return _unauthorized()
            return _sync(hooks, body, "forwarded")
        if path == "/v1/sync":
            if not self.webhooks_enabled:
                return _text(404, "webhook disabled (no webhook_token_file)")
        elif path == "/v1/audit":
            if hooks.on_audit is None or not self.webhooks_enabled:
                return _text(404, "audit ingest disabled")
        else:
            return _text(404, "not found")
        if not self.authorized(environ.get("HTTP_AUTHORIZATION")):
            return _unauthorized()
        body = _read_body(environ)
        if path == "/v1/sync":
            return _sync(hooks, body, "webhook")
        assert hooks.on_audit is not None  # checked above
        try:
            counts = hooks.on_audit(body)
        except IngestRejected as exc:  # its messages are fixed texts, never body content
            return _text(413 if exc.too_large else 400, str(exc))
        if counts is None:
            return _text(503, "not accepting triggers (shutting down)")
        return _json(202, dict(counts))


def _sync(hooks: Hooks, body: bytes, source: str) -> _Response:
    """A POST /v1/sync body, authenticated by the caller, handed to the daemon as `source`."""
    try:
        paths = parse_sync_body(body)
    except BadRequest as exc:
        return _text(400, str(exc))
    if not hooks.on_sync(paths, source):
        return _text(503, "not accepting triggers (shutting down)")
    return _json(202, {"accepted": True, "full": paths is None, "paths": len(paths or ())})


def _read_body(environ: Mapping[str, Any]) -> bytes:
    # waitress has read and bounded the whole body (max_request_body_size) before calling us.
    stream = environ["wsgi.input"]
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        length = 0
    return bytes(stream.read(length)) if length > 0 else b""


def _text(status: int, text: str) -> _Response:
    return status, (text + "\n").encode(), _TEXT, []


def _json(status: int, doc: Any) -> _Response:
    return status, json.dumps(doc, default=str).encode(), "application/json", []


def _unauthorized() -> _Response:
    return 401, b"unauthorized\n", _TEXT, [("WWW-Authenticate", "Bearer")]
