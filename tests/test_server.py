"""The HTTP endpoints, over real HTTP on 127.0.0.1: probes, metrics, status, webhook and audit ingest."""

from __future__ import annotations

import contextlib
import hmac
import http.client
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bridge.config import ServerSettings
from bridge.daemon.ha import FORWARD_HEADER, sign_forward
from bridge.daemon.server import MAX_SYNC_PATHS, Check, HttpServer
from bridge.daemon.server import Hooks as ServerHooks
from bridge.errors import IngestRejected
from bridge.metrics import CONTENT_TYPE, Metrics
from bridge.model import Sensitive

TOKEN = "whk_4f6b0c1d9e8a7b6c5d4e3f2a1b0c9d8e"
SECRET_BODY_MARK = "dckr_pat_THIS_MUST_NOT_BE_LOGGED"


@dataclass
class Hooks:
    live_ok: bool = True
    ready_state: tuple[bool, str] = (True, "ready")
    accept: bool = True
    syncs: list[tuple[list[str] | None, str]] = field(default_factory=list)
    audits: list[bytes] = field(default_factory=list)
    audit_error: Exception | None = None

    def live(self) -> list[Check]:
        return [("worker", self.live_ok, "thread not running")]

    def ready(self) -> list[Check]:
        return [("config", True, ""), ("triggers", self.ready_state[0], self.ready_state[1])]

    def status(self) -> dict[str, Any]:
        return {"secrets": [{"path": "secret/a", "state": "registered"}], "last_pass": None}

    def on_sync(self, paths: list[str] | None, source: str) -> bool:
        self.syncs.append((paths, source))
        return self.accept

    def on_audit(self, body: bytes) -> dict[str, int] | None:
        if self.audit_error is not None:
            raise self.audit_error
        if not self.accept:
            return None
        self.audits.append(body)
        return {"accepted": len(body.splitlines())}

    def server_hooks(self, audit: bool = True) -> ServerHooks:
        return ServerHooks(self.live, self.ready, self.status, self.on_sync, self.on_audit if audit else None)


def start(
    hooks: Hooks, *, token: str | None = TOKEN, audit: bool = True, metrics_token: str | None = None, **kw: Any
) -> tuple[HttpServer, int]:
    settings = ServerSettings(bind="127.0.0.1", port=0, **kw)
    server = HttpServer(
        settings,
        metrics=Metrics(),
        hooks=hooks.server_hooks(audit),
        webhook_token=Sensitive(token) if token else None,
        metrics_token=Sensitive(metrics_token) if metrics_token else None,
    )
    return server, server.start()


@pytest.fixture
def hooks() -> Hooks:
    return Hooks()


@pytest.fixture
def served(hooks: Hooks) -> Iterator[tuple[HttpServer, int]]:
    server, port = start(hooks)
    try:
        yield server, port
    finally:
        server.stop()


def call(port: int, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def auth(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}


def test_metrics_exposition_parses_with_the_prometheus_content_type(served: tuple[HttpServer, int]) -> None:
    status, headers, body = call(served[1], "GET", "/metrics")
    assert status == 200
    assert headers["content-type"] == CONTENT_TYPE
    families = {f.name for f in text_string_to_metric_families(body.decode())}
    assert "cybedefend_bridge_build_info" in families
    assert "cybedefend_bridge_scheduler_events" in families


def test_healthz_follows_live_only(served: tuple[HttpServer, int], hooks: Hooks) -> None:
    hooks.ready_state = (False, "vault unavailable")  # an upstream outage must not fail liveness
    assert call(served[1], "GET", "/healthz")[0] == 200
    hooks.live_ok = False
    status, _, body = call(served[1], "GET", "/healthz")
    assert status == 503 and body == b"[-]worker failed: thread not running\nlivez check failed\n"


def test_readyz_answers_503_with_the_reason(served: tuple[HttpServer, int], hooks: Hooks) -> None:
    assert call(served[1], "GET", "/readyz")[:3:2] == (200, b"ok\n")
    hooks.ready_state = (False, "shutting down")
    status, _, body = call(served[1], "GET", "/readyz")
    assert status == 503 and body == b"[-]triggers failed: shutting down\nreadyz check failed\n"


@pytest.mark.parametrize("query", ["?verbose", "?verbose=1", "?x=1&verbose="])
def test_probes_explain_themselves_when_verbose(served: tuple[HttpServer, int], hooks: Hooks, query: str) -> None:
    status, _, body = call(served[1], "GET", "/readyz" + query)
    assert status == 200 and body == b"[+]config ok\n[+]triggers ok\nreadyz check passed\n"
    hooks.ready_state = (False, "shutting down")
    status, _, body = call(served[1], "GET", "/readyz" + query)
    assert status == 503 and body == b"[+]config ok\n[-]triggers failed: shutting down\nreadyz check failed\n"
    status, _, body = call(served[1], "GET", "/healthz" + query)
    assert status == 200 and body == b"[+]worker ok\nlivez check passed\n"


def test_status_is_json(served: tuple[HttpServer, int]) -> None:
    status, headers, body = call(served[1], "GET", "/v1/status?x=1")
    assert status == 200 and headers["content-type"] == "application/json"
    assert json.loads(body)["secrets"][0]["path"] == "secret/a"


def test_status_behind_the_token_when_configured(hooks: Hooks) -> None:
    server, port = start(hooks, status_requires_token=True)
    try:
        assert call(port, "GET", "/v1/status")[0] == 401
        assert call(port, "GET", "/v1/status", headers=auth("nope"))[0] == 401
        assert call(port, "GET", "/v1/status", headers=auth())[0] == 200
    finally:
        server.stop()


def test_sync_with_the_right_token_is_accepted(served: tuple[HttpServer, int], hooks: Hooks, monkeypatch: pytest.MonkeyPatch) -> None:
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return bool(real(a, b))

    monkeypatch.setattr(hmac, "compare_digest", spy)  # the server calls it through the module
    status, _, body = call(served[1], "POST", "/v1/sync", json.dumps({"paths": ["/secret/team/a/", "secret/b"]}).encode(), auth())
    assert status == 202 and json.loads(body) == {"accepted": True, "full": False, "paths": 2}
    assert hooks.syncs == [(["secret/team/a", "secret/b"], "webhook")]
    assert compared, "the token must be compared with hmac.compare_digest"
    status, _, body = call(served[1], "POST", "/v1/sync", b"", auth())
    assert status == 202 and json.loads(body)["full"] is True
    assert hooks.syncs[-1] == (None, "webhook")


def test_a_forwarded_sync_needs_a_valid_signature_not_the_webhook_token(served: tuple[HttpServer, int], hooks: Hooks) -> None:
    server, port = served
    body = b'{"paths": ["secret/a"]}'
    key = b"forward-key-0123456789abcdef"
    # Before the daemon gives the server its key, no forward is accepted, with or without the token.
    assert call(port, "POST", "/v1/sync", body, auth() | {FORWARD_HEADER: sign_forward(key, body, time.time())})[0] == 401
    server.accept_forwards(key)
    assert call(port, "POST", "/v1/sync", body, {FORWARD_HEADER: sign_forward(key, body, time.time())})[0] == 202
    assert hooks.syncs == [(["secret/a"], "forwarded")]
    for bad in ("1", sign_forward(b"other-key", body, time.time()), sign_forward(key, body, time.time() - 3600),
                sign_forward(key, b'{"paths": ["secret/b"]}', time.time())):
        assert call(port, "POST", "/v1/sync", body, auth() | {FORWARD_HEADER: bad})[0] == 401, bad
    assert len(hooks.syncs) == 1


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}, {"Authorization": "Bearer"}, {"Authorization": f"Bearer {TOKEN}x"}],
)
def test_sync_without_the_right_token_is_401(served: tuple[HttpServer, int], hooks: Hooks, headers: dict[str, str]) -> None:
    assert call(served[1], "POST", "/v1/sync", b'{"paths": ["secret/a"]}', headers)[0] == 401
    assert call(served[1], "POST", "/v1/audit", b"{}\n", headers)[0] == 401
    assert hooks.syncs == [] and hooks.audits == []


def test_webhooks_are_404_without_a_token_file(hooks: Hooks) -> None:
    server, port = start(hooks, token=None)
    try:
        assert call(port, "POST", "/v1/sync", b"", auth())[0] == 404
        assert call(port, "POST", "/v1/audit", b"", auth())[0] == 404
    finally:
        server.stop()
    assert hooks.syncs == []


def test_audit_is_404_when_ingest_is_off(hooks: Hooks) -> None:
    server, port = start(hooks, audit=False)
    try:
        assert call(port, "POST", "/v1/audit", b"{}\n", auth())[0] == 404
        assert call(port, "POST", "/v1/sync", b"", auth())[0] == 202
    finally:
        server.stop()


def test_oversized_body_is_413_before_it_is_read(served: tuple[HttpServer, int], hooks: Hooks) -> None:
    # Only the headers are sent: the answer must come from Content-Length alone.
    conn = http.client.HTTPConnection("127.0.0.1", served[1], timeout=5)
    try:
        conn.putrequest("POST", "/v1/sync")
        conn.putheader("Authorization", f"Bearer {TOKEN}")
        conn.putheader("Content-Length", str(50 * 1024 * 1024))
        conn.endheaders()
        resp = conn.getresponse()
        assert resp.status == 413
    finally:
        conn.close()
    # Exactly the limit is taken; one byte more is refused from the header (waitress closes the
    # connection after a 413 without reading the body, so the client must not be sending it).
    limit = 1 << 20
    assert call(served[1], "POST", "/v1/audit", b"\n" * limit, auth())[0] == 202
    conn = http.client.HTTPConnection("127.0.0.1", served[1], timeout=5)
    try:
        conn.putrequest("POST", "/v1/audit")
        conn.putheader("Authorization", f"Bearer {TOKEN}")
        conn.putheader("Content-Length", str(limit + 1))
        conn.endheaders()
        assert conn.getresponse().status == 413
    finally:
        conn.close()
    assert hooks.syncs == [] and len(hooks.audits) == 1


def test_chunked_bodies_are_bounded_while_they_are_read(served: tuple[HttpServer, int], hooks: Hooks) -> None:
    # waitress de-chunks and counts as it reads: past max_body_bytes it answers 413 without buffering the rest.
    def chunked(chunks: list[bytes]) -> int:
        # A raw socket with a reader beside the writer: the server answers 413 and closes while the
        # client is still sending, and the rest of the body then draws a reset from the server's
        # kernel, which discards whatever the client had not yet read. Reading as the answer
        # arrives (not after sending everything, as http.client does) makes the status certain;
        # a CI run once failed with a broken pipe before it could read the 413.
        with socket.create_connection(("127.0.0.1", served[1]), timeout=5) as sock:
            got = bytearray()

            def read() -> None:
                with contextlib.suppress(OSError):
                    while b"\r\n" not in got and (data := sock.recv(65536)):
                        got.extend(data)

            reader = threading.Thread(target=read)
            reader.start()
            head = "".join(f"{k}: {v}\r\n" for k, v in {**auth(), "Transfer-Encoding": "chunked"}.items())
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(f"POST /v1/sync HTTP/1.1\r\nHost: 127.0.0.1\r\n{head}\r\n".encode())
                for chunk in chunks:
                    sock.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
                sock.sendall(b"0\r\n\r\n")
            reader.join(5)
            assert got.startswith(b"HTTP/1.1 "), bytes(got[:80])
            return int(got.split(b" ", 2)[1])

    assert chunked([b'{"paths": ', b'["secret/a"]}']) == 202
    assert hooks.syncs == [(["secret/a"], "webhook")]
    assert chunked([b"x" * (1 << 19)] * 3) == 413
    assert len(hooks.syncs) == 1


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"[]",
        b'{"paths": "secret/a"}',
        b'{"paths": []}',
        b'{"paths": [1]}',
        b'{"paths": ["noslash"]}',
        b'{"paths": ["secret/../x"]}',
        b'{"paths": ["secret/a\\u0000b"]}',
        b'{"paths": ["secret/a"], "extra": 1}',
        json.dumps({"paths": ["secret/" + "a" * 2000]}).encode(),
        json.dumps({"paths": [f"secret/{i}" for i in range(MAX_SYNC_PATHS + 1)]}).encode(),
    ],
    ids=["not-json", "array", "string", "empty", "number", "no-slash", "dotdot", "control", "extra-key", "too-long", "too-many"],
)
def test_malformed_sync_bodies_are_400(served: tuple[HttpServer, int], hooks: Hooks, body: bytes) -> None:
    assert call(served[1], "POST", "/v1/sync", body, auth())[0] == 400
    assert hooks.syncs == []


def test_sync_while_shutting_down_is_503(served: tuple[HttpServer, int], hooks: Hooks) -> None:
    hooks.accept = False
    assert call(served[1], "POST", "/v1/sync", b"", auth())[0] == 503
    assert call(served[1], "POST", "/v1/audit", b"{}\n", auth())[0] == 503


def test_audit_lines_are_handed_over_and_counted(served: tuple[HttpServer, int], hooks: Hooks) -> None:
    status, _, body = call(served[1], "POST", "/v1/audit", b'{"type":"response"}\n{"type":"request"}\n', auth())
    assert status == 202 and json.loads(body) == {"accepted": 2}
    assert len(hooks.audits) == 1
    hooks.audit_error = IngestRejected("more than 10 audit lines in one request", too_large=True)
    assert call(served[1], "POST", "/v1/audit", b"{}\n" * 11, auth())[0] == 413
    hooks.audit_error = IngestRejected("body is not a JSON array")
    assert call(served[1], "POST", "/v1/audit", b"[", auth())[0] == 400


def test_wrong_methods_and_paths(served: tuple[HttpServer, int]) -> None:
    status, headers, _ = call(served[1], "GET", "/v1/sync")
    assert status == 405 and headers["allow"] == "POST"
    assert call(served[1], "POST", "/metrics", b"")[0] == 405
    assert call(served[1], "GET", "/nope")[0] == 404


def test_neither_the_token_nor_bodies_are_logged(hooks: Hooks, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]) -> None:
    caplog.set_level(logging.DEBUG)
    server, port = start(hooks)
    try:
        body = json.dumps({"paths": [f"secret/{SECRET_BODY_MARK}"]}).encode()
        call(port, "POST", "/v1/sync", body, auth())
        call(port, "POST", "/v1/sync", body, auth("wrong-" + TOKEN))
        call(port, "POST", "/v1/audit", SECRET_BODY_MARK.encode(), auth())
        call(port, "GET", f"/v1/status?token={TOKEN}")
    finally:
        server.stop()
    out, err = capfd.readouterr()
    logged = caplog.text + out + err
    assert "http_request" in caplog.text  # access logging did happen
    assert TOKEN not in logged
    assert SECRET_BODY_MARK not in logged
    assert TOKEN not in repr(vars(server))  # the token stays wrapped in the object too


def test_metrics_and_status_behind_the_metrics_token(hooks: Hooks) -> None:
    metrics_token = "mtk_0a1b2c3d4e5f60718293a4b5c6d7e8f9"
    server, port = start(hooks, metrics_token=metrics_token)
    try:
        assert call(port, "GET", "/metrics")[0] == 401
        assert call(port, "GET", "/metrics", headers=auth())[0] == 401  # the webhook token is not the metrics token
        status, headers, _ = call(port, "GET", "/metrics", headers=auth(metrics_token))
        assert status == 200 and headers["content-type"] == CONTENT_TYPE
        assert call(port, "GET", "/v1/status")[0] == 401
        assert call(port, "GET", "/v1/status", headers=auth(metrics_token))[0] == 200
        assert call(port, "GET", "/healthz")[0] == 200  # probes never need a token (kubelet has none)
        assert call(port, "GET", "/readyz")[0] == 200
    finally:
        server.stop()
    assert metrics_token not in repr(vars(server))


@pytest.mark.slow
def test_requests_waiting_for_a_worker_are_counted_not_logged(hooks: Hooks, caplog: pytest.LogCaptureFixture) -> None:
    """waitress warns for every request that finds all workers busy; a scrape burst would be a log line each."""
    import threading

    release, entered = threading.Event(), threading.Event()

    def slow_status() -> dict[str, Any]:
        entered.set()
        release.wait(5)
        return {"secrets": []}

    hooks.status = slow_status  # type: ignore[method-assign]
    caplog.set_level(logging.DEBUG)
    server, port = start(hooks, threads=1)
    try:
        blocker = threading.Thread(target=call, args=(port, "GET", "/v1/status"))
        blocker.start()
        assert entered.wait(5)  # the one worker is busy
        waiting = [threading.Thread(target=call, args=(port, "GET", "/healthz")) for _ in range(3)]
        for t in waiting:
            t.start()
        deadline = time.monotonic() + 5
        while server.metrics.registry.get_sample_value("cybedefend_bridge_http_requests_queued_total") != 3.0:
            assert time.monotonic() < deadline, "the queued requests were not counted"
            time.sleep(0.01)
        release.set()
        for t in [blocker, *waiting]:
            t.join(5)
    finally:
        release.set()
        server.stop()
    assert not [r for r in caplog.records if r.name.startswith("waitress.queue")]


def test_trickling_clients_neither_hold_threads_nor_block_a_normal_client(hooks: Hooks) -> None:
    """200 clients that send a request one byte at a time cost sockets, not threads."""
    import socket
    import threading
    import time

    before = threading.active_count()
    server, port = start(hooks, threads=2, connection_limit=400)
    slow: list[socket.socket] = []
    try:
        started = threading.active_count()
        assert started - before <= 2 + 2  # the loop thread and the worker pool (threads=2), nothing per connection
        request = f"POST /v1/sync HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 20\r\n\r\n".encode()
        for _ in range(200):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(request[:5])
            slow.append(s)
        for i in range(5, 25):  # keep trickling, a byte per client per round, well within channel_timeout
            for s in slow:
                s.sendall(request[i : i + 1])
            assert threading.active_count() == started
            t0 = time.monotonic()
            assert call(port, "GET", "/healthz")[0] == 200
            assert time.monotonic() - t0 < 2.0
        # Past the headers, into the body: still no thread is spent on them.
        for s in slow:
            s.sendall(request[25:] + b'{"paths"')
        assert threading.active_count() == started
        assert call(port, "GET", "/metrics")[0] == 200
        assert hooks.syncs == []  # none of the slow requests was complete, so none reached a handler
    finally:
        for s in slow:
            s.close()
        server.stop()
    deadline = time.monotonic() + 5
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threading.active_count() <= before  # stop() ends the loop and the workers
