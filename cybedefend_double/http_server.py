"""The HTTP/1.1 plumbing of the CybeDefend double: a threaded keep-alive server around one callable.

It knows nothing about CybeDefend. It reads a request (Content-Length or chunked), hands
`(method, target, headers, body)` to the application callable and writes the `Reply` back in
one piece, or closes the connection without answering when the reply says `drop`. It tracks
open connections so that `stop()` really ends keep-alive sessions instead of leaving them
served by orphaned handler threads.
"""

from __future__ import annotations

import contextlib
import socket
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MAX_BODY_BYTES = 1 << 20  # the API's bodies are tiny; a bigger one is a client bug


@dataclass(frozen=True, slots=True)
class Reply:
    """What to answer. `drop=True` closes the connection without writing anything."""

    status: int = 200
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    content_type: str = "application/json; charset=utf-8"
    drop: bool = False


@dataclass(frozen=True, slots=True)
class IncomingRequest:
    method: str
    target: str  # path plus query, as sent
    headers: Mapping[str, str] = field(repr=False)  # lower-cased names; may carry secrets
    body: bytes = field(repr=False)


Application = Callable[[IncomingRequest], Reply]


class _BodyError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the client's connection pool is part of what is tested
    disable_nagle_algorithm = True  # headers and body are two writes; Nagle would add ~40 ms each
    timeout = 60  # an idle keep-alive connection releases its thread after this
    server: _Server

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks: list[bytes] = []
            total = 0
            while True:
                size_line = self.rfile.readline(1024)
                try:
                    size = int(size_line.split(b";")[0].strip(), 16)
                except ValueError as exc:
                    raise _BodyError(400, "malformed chunked body") from exc
                if size == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass  # trailers are ignored
                    return b"".join(chunks)
                total += size
                if total > MAX_BODY_BYTES:
                    raise _BodyError(413, "request body too large")
                chunks.append(self.rfile.read(size))
                self.rfile.readline(1024)
        raw_length = self.headers.get("Content-Length")
        if raw_length is None:
            return b""
        try:
            length = int(raw_length)
        except ValueError as exc:
            raise _BodyError(400, "bad Content-Length") from exc
        if length < 0 or length > MAX_BODY_BYTES:
            raise _BodyError(413, "request body too large")
        return self.rfile.read(length)

    def _serve(self) -> None:
        try:
            body = self._read_body()
        except _BodyError as exc:
            self.close_connection = True
            self._write(Reply(status=exc.status, body=str(exc).encode(), content_type="text/plain"))
            return
        headers = {k.lower(): v for k, v in self.headers.items()}
        request = IncomingRequest(self.command, self.path, headers, body)
        try:
            reply = self.server.application(request)
        except Exception:  # a bug in the double must answer 500, not kill the connection thread
            reply = Reply(status=500, body=b'{"message":"simulator error","statusCode":500}')
        if reply.drop:
            self.close_connection = True
            self.wfile.flush()
            # SHUT_RDWR makes the peer see the close at once, even if it still has bytes in flight
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        self._write(reply)

    def _write(self, reply: Reply) -> None:
        self.send_response(reply.status)
        for name, value in reply.headers:
            self.send_header(name, value)
        if reply.status == 204:
            self.end_headers()  # 204 carries neither a body nor a Content-Length
            return
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(reply.body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(reply.body)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _serve

    def version_string(self) -> str:
        return "cybedefend-simulator"

    def log_message(self, format: str, *args: Any) -> None:
        """Silent: the double records requests itself, and must never echo what a client sent."""


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256  # benchmarks open many connections at once

    def __init__(self, address: tuple[str, int], application: Application) -> None:
        self.application = application
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """One line, no traceback: a client that hung up mid-answer (after a timeout) is routine."""
        exc = sys.exc_info()[1]
        if not isinstance(exc, ConnectionError | TimeoutError):
            print(f"cybedefend-simulator: connection handler failed: {type(exc).__name__}", file=sys.stderr)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def close_all_connections(self) -> None:
        with self._open_lock:
            open_sockets = list(self._open)
            self._open.clear()
        for sock in open_sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class HttpServer:
    """Runs `application` on a background thread; `start()` returns the base URL."""

    def __init__(self, application: Application) -> None:
        self._application = application
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self, host: str, port: int) -> str:
        if self._server is not None:
            raise RuntimeError("the simulator is already running")
        server = _Server((host, port), self._application)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                  name="cybedefend-simulator", daemon=True)
        thread.start()
        self._server, self._thread = server, thread
        bound_host, bound_port = server.server_address[:2]
        shown = bound_host if isinstance(bound_host, str) else bound_host.decode()
        if ":" in shown:
            shown = f"[{shown}]"
        return f"http://{shown}:{bound_port}"

    def stop(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        server.close_all_connections()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    @property
    def running(self) -> bool:
        return self._server is not None
