"""A tiny HTTP proxy in front of a real OpenBao that answers bare 404s on chosen paths.

It stands for an ingress, a sidecar or a misrouted proxy: it forwards every request (any
method, headers and body) to OpenBao unchanged, except that a request whose path matches one
of `bare_404` (substring match, optionally restricted to methods) gets a 404 with the body
`body` (empty by default, or a proxy's text/HTML page) instead of Vault's `{"errors": []}`.
"""

from __future__ import annotations

import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit


class BareNotFoundProxy:
    def __init__(self, upstream: str) -> None:
        u = urlsplit(upstream)
        self._host, self._port = u.hostname or "127.0.0.1", u.port or 80
        self.rules: list[tuple[str, frozenset[str] | None]] = []  # (path substring, methods or None)
        self.body = b""
        self.content_type: str | None = None
        self.hits: list[tuple[str, str]] = []  # (method, path) answered with a bare 404
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def _any(self) -> None:
                for part, methods in proxy.rules:
                    if part in self.path and (methods is None or self.command in methods):
                        proxy.hits.append((self.command, self.path))
                        self.send_response(404)
                        if proxy.content_type:
                            self.send_header("Content-Type", proxy.content_type)
                        self.send_header("Content-Length", str(len(proxy.body)))
                        self.end_headers()
                        self.wfile.write(proxy.body)
                        return
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                conn = http.client.HTTPConnection(proxy._host, proxy._port, timeout=10)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("content-length", "connection", "transfer-encoding", "date", "server"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                conn.close()

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_LIST = do_SCAN = _any

            def log_message(self, format: str, *args: object) -> None:
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def bare_404(self, path_part: str, methods: tuple[str, ...] | None = None) -> None:
        self.rules.append((path_part, frozenset(methods) if methods else None))

    def __enter__(self) -> BareNotFoundProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
