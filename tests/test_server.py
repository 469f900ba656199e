"""The HTTP endpoints, over real HTTP on 127.0.0.1: probes, metrics, status, webhook and audit ingest."""

from __future__ import annotations

import hmac
import http.client
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bridge.config import ServerSettings
from bridge.daemon.ha import FORWARD_HEADER
from bridge.daemon.server import MAX_SYNC_PATHS, HttpServer
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

    def live(self) -> bool:
        return self.live_ok

    def ready(self) -> tuple[bool, str]:
        return self.ready_state

    def status(self) -> dict[str, Any]:
        return {"secrets": [{"path": "secret/a", "state": "registered"}], "last_pass": None}

    def on_sync(self, paths: list[str] | None, source: str) -> bool:
        self.syncs.append((paths, source))
        return self.accept

    def on_audit(self, body: bytes) -> int:
        if self.audit_error is not None:
            raise self.audit_error
        self.audits.append(body)
        return len(body.splitlines())


def start(hooks: Hooks, *, token: str | None = TOKEN, audit: bool = True, **kw: Any) -> tuple[HttpServer, int]:
    settings = ServerSettings(bind="127.0.0.1", port=0, **kw)
    server = HttpServer(
        settings,
        metrics=Metrics(),
        live=hooks.live,
        ready=hooks.ready,
        status=hooks.status,
        on_sync=hooks.on_sync,
        on_audit=hooks.on_audit if audit else None,
        webhook_token=Sensitive(token) if token else None,
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
    assert status == 503 and b"not live" in body


def test_readyz_answers_503_with_the_reason(served: tuple[HttpServer, int], hooks: Hooks) -> None:
    assert call(served[1], "GET", "/readyz")[:3:2] == (200, b"ready\n")
    hooks.ready_state = (False, "no full pass has finished yet")
    status, _, body = call(served[1], "GET", "/readyz")
    assert status == 503 and body == b"no full pass has finished yet\n"


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

    def spy(a: Any, b: Any) -> bool:
        compared.append((a, b))
        return bool(real(a, b))

    monkeypatch.setattr(hmac, "compare_digest", spy)  # the module object bridge.daemon.server uses
    status, _, body = call(served[1], "POST", "/v1/sync", json.dumps({"paths": ["/secret/team/a/", "secret/b"]}).encode(), auth())
    assert status == 202 and json.loads(body) == {"accepted": True, "full": False, "paths": 2}
    assert hooks.syncs == [(["secret/team/a", "secret/b"], "webhook")]
    assert compared, "the token must be compared with hmac.compare_digest"
    status, _, body = call(served[1], "POST", "/v1/sync", b"", auth())
    assert status == 202 and json.loads(body)["full"] is True
    assert hooks.syncs[-1] == (None, "webhook")


def test_a_forwarded_sync_is_labelled_forwarded(served: tuple[HttpServer, int], hooks: Hooks) -> None:
    headers = auth() | {FORWARD_HEADER: "1"}
    assert call(served[1], "POST", "/v1/sync", b'{"paths": ["secret/a"]}', headers)[0] == 202
    assert hooks.syncs == [(["secret/a"], "forwarded")]


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
    big = b"x" * ((1 << 20) + 1)
    assert call(served[1], "POST", "/v1/audit", big, auth())[0] == 413
    assert hooks.syncs == [] and hooks.audits == []


def test_chunked_bodies_need_a_length(served: tuple[HttpServer, int]) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", served[1], timeout=5)
    try:
        conn.putrequest("POST", "/v1/sync")
        conn.putheader("Authorization", f"Bearer {TOKEN}")
        conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()  # the answer must not wait for (or try to parse) the chunks
        assert conn.getresponse().status == 411
    finally:
        conn.close()


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
