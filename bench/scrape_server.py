"""`python -m bench.scrape_server new|old`: serve the bridge's /metrics until stdin closes.

`new` is the shipped server (`bridge.daemon.server.HttpServer`, waitress). `old` is the server it
replaced, kept here only to be measured against: stdlib `ThreadingHTTPServer`, a daemon thread per
connection, HTTP/1.0, the same exposition bytes. It is the GET /metrics path of
`bridge/daemon/server.py` at commit c6a257c (the parent of 323393f, which moved the port to
waitress), with the routes a scrape never takes left out.

Both serve the same `bridge.metrics.Metrics` (every bounded label set created, the process
collectors on), so the exposition each one renders per scrape is the same size. Prints the port on
stdout, then blocks on stdin: the bench measures this process's CPU from /proc.
"""

from __future__ import annotations

import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from bridge.config import ServerSettings
from bridge.daemon.server import Hooks, HttpServer
from bridge.metrics import CONTENT_TYPE, Metrics


class _LegacyHandler(BaseHTTPRequestHandler):
    # As the old handler was: HTTP/1.0 (a connection per request), no server banner.
    protocol_version = "HTTP/1.0"
    server_version = "cybedefend-bridge"
    sys_version = ""
    metrics: Metrics

    def do_GET(self) -> None:
        body = self.metrics.render()  # as the old server did: a render per request
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # stdlib's signature
        pass


def _serve_old(metrics: Metrics) -> tuple[int, ThreadingHTTPServer]:
    handler = type("BoundHandler", (_LegacyHandler,), {"metrics": metrics})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True).start()
    return int(httpd.server_address[1]), httpd


def _serve_new(metrics: Metrics) -> tuple[int, HttpServer]:
    hooks = Hooks(live=lambda: [], ready=lambda: [], status=lambda: {}, on_sync=lambda paths, source: True, on_audit=None)
    server = HttpServer(ServerSettings(bind="127.0.0.1", port=0), metrics=metrics, hooks=hooks, webhook_token=None)
    return server.start(), server


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in ("new", "old"):
        print("usage: python -m bench.scrape_server new|old", file=sys.stderr)
        return 2
    metrics = Metrics()
    metrics.passes.labels(trigger="schedule", result="ok").inc(42)
    metrics.pass_duration.labels(kind="full").observe(0.3)
    port, server = (_serve_new if argv[0] == "new" else _serve_old)(metrics)
    print(port, flush=True)
    sys.stdin.read()  # until the bench closes our stdin
    if isinstance(server, HttpServer):
        server.stop()
    else:
        server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
