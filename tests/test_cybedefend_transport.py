"""The CybeDefend client's lean HTTP/1.1 transport (`bridge.cybedefend.transport`, ADR 16).

Against scripted loopback servers (plain and TLS): what it sends, how it reads answers, and above
all which failures it reports as "never sent" (only connecting) and which as "may have been
processed" (everything after the first byte), since that decides whether a create is repeated
(ADR 4). And that the client really uses it where httpx's own pool would have been used.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import socket
import ssl
import struct
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from bridge.cybedefend.client import CybeDefendClient
from bridge.cybedefend.transport import LeanTransport
from bridge.errors import AmbiguousWrite, TransientError
from bridge.http1 import Pool
from bridge.metrics import Metrics
from bridge.model import Sensitive
from tests.support.cybedefend_mock import API_KEY, ORG, PROJECT, settings
from tests.test_server_tls import make_cert

DH_TOKEN = "dckr_pat_LeanTransportSecretToken0123"
MARKER = "[cybedefend-bridge:default:0123456789ab:v1]"
CREATED = json.dumps({"id": "9c1e4b2a-6d3f-4e8a-b7c5-1f2e3d4c5b6a", "dockerhubUsername": "alice",
                      "projectIds": [PROJECT], "description": MARKER}).encode()
TIMEOUT = {"connect": 5.0, "read": 5.0, "write": 5.0, "pool": 5.0}

Handler = Callable[["Server", socket.socket], None]


class Server:
    """A loopback server (TLS when given a context) running one handler per accepted connection,
    in order; it records every whole request (head and Content-Length body) it read."""

    def __init__(self, handlers: list[Handler], ctx: ssl.SSLContext | None = None) -> None:
        self._handlers = list(handlers)
        self._ctx = ctx
        self.requests: list[tuple[bytes, bytes]] = []
        self.connections = 0
        self._srv = socket.create_server(("127.0.0.1", 0))
        self._srv.settimeout(10)
        self.port = self._srv.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def read(self, conn: socket.socket) -> tuple[bytes, bytes] | None:
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = conn.recv(65536)
            if not chunk:
                return None
            buf += chunk
        head, _, body = buf.partition(b"\r\n\r\n")
        length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        while len(body) < length:
            body += conn.recv(65536)
        self.requests.append((head, body))
        return head, body

    def _serve(self) -> None:
        for handler in self._handlers:
            try:
                raw, _ = self._srv.accept()
            except OSError:
                return
            self.connections += 1
            try:
                conn = self._ctx.wrap_socket(raw, server_side=True) if self._ctx is not None else raw
            except (OSError, ssl.SSLError):
                raw.close()
                continue
            with conn:
                conn.settimeout(10)
                with contextlib.suppress(OSError):  # the client closed first, or a timeout: the test decides
                    handler(self, conn)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._srv.shutdown(socket.SHUT_RDWR)  # wakes an accept() waiting for a connection that never comes
        self._srv.close()
        self._thread.join(10)


@pytest.fixture
def serve() -> Iterator[Callable[..., Server]]:
    made: list[Server] = []

    def make(handlers: list[Handler], ctx: ssl.SSLContext | None = None) -> Server:
        made.append(Server(handlers, ctx))
        return made[-1]

    yield make
    for s in made:
        s.close()


def answers(*raws: bytes, then: str = "hold") -> Handler:
    """A handler: read a request and send each answer in turn; then hold the connection until the
    client closes it ("hold"), close it at once ("close"), or read one more request and close
    without answering it ("swallow")."""

    def handler(srv: Server, conn: socket.socket) -> None:
        for raw in raws:
            if srv.read(conn) is None:
                return
            conn.sendall(raw)
        if then == "hold":
            while conn.recv(65536):
                pass
        elif then == "swallow":
            srv.read(conn)

    return handler


def ok(body: bytes = b"{}", status: bytes = b"200 OK", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 %s\r\nContent-Type: application/json\r\n%sContent-Length: %d\r\n\r\n%s" % (
        status, extra, len(body), body)


def transport(ctx: ssl.SSLContext | None = None) -> LeanTransport:
    return LeanTransport(size=4, idle_expiry=5.0, ssl_context=ctx)


def request(method: str, url: str, **kwargs: Any) -> httpx.Request:
    return httpx.Request(method, url, extensions={"timeout": TIMEOUT}, **kwargs)


def send(tr: httpx.BaseTransport, req: httpx.Request) -> httpx.Response:
    resp = tr.handle_request(req)
    resp.read()
    resp.close()
    return resp


def client(port: int, scheme: str = "http", **overrides: Any) -> CybeDefendClient:
    return CybeDefendClient(settings("api_key", api_url=f"{scheme}://127.0.0.1:{port}", **overrides),
                            Sensitive(API_KEY), Metrics(), sleep=lambda _: None)


def create(c: CybeDefendClient) -> object:
    return c.create(ORG, PROJECT, "alice", Sensitive(DH_TOKEN), MARKER)


def no_secret(exc: BaseException) -> None:
    text = "".join(traceback.format_exception(exc)) + repr(exc)
    assert DH_TOKEN not in text and API_KEY not in text


def failed_create(c: CybeDefendClient, expected: type[Exception] = AmbiguousWrite) -> Exception:
    """`create` on `c`, which must raise `expected`; `c` is closed either way."""
    try:
        with pytest.raises(expected) as info:
            create(c)
    finally:
        c.close()
    return info.value


# ---- which transport the client uses -----------------------------------------------------------


def test_the_client_uses_the_lean_transport_only_where_httpx_would_use_its_own_pool(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy",
                 "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    plain = client(9)
    injected = CybeDefendClient(settings("api_key", api_url="http://127.0.0.1:9"), Sensitive(API_KEY), Metrics(),
                                transport=httpx.MockTransport(lambda r: httpx.Response(200)))
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:3128")
    proxied = client(9)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    bypassed = client(9)
    try:
        assert [type(c._routes["http://127.0.0.1:9"]).__name__ for c in (plain, injected, proxied, bypassed)] == [
            "LeanTransport", "MockTransport", "HTTPTransport", "LeanTransport"]
    finally:
        for c in (plain, injected, proxied, bypassed):
            c.close()


def test_one_ssl_context_serves_every_transport_of_a_client(monkeypatch: pytest.MonkeyPatch) -> None:
    # Each context loads the CA bundle (~20 ms at start-up): httpx's default transport, a proxy's
    # and the lean one share the one the client makes, with httpx's own function.
    import httpx._transports.default as httpx_default

    made: list[object] = []
    real = httpx.create_ssl_context

    def counting(*args: Any, **kwargs: Any) -> Any:
        made.append(ctx := real(*args, **kwargs))
        return ctx

    monkeypatch.setattr(httpx, "create_ssl_context", counting)
    monkeypatch.setattr(httpx_default, "create_ssl_context", counting)
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    c = client(9, "https")
    try:
        assert isinstance(c._routes["https://127.0.0.1:9"], LeanTransport)
        assert c._lean is not None and len({id(x) for x in made}) == 1 and c._lean._ctx is made[0]
    finally:
        c.close()


def test_the_registrar_contract_and_the_app_build_their_client_on_the_lean_transport() -> None:
    # The contract tests against the double (and app.build, which makes the client the same way:
    # no transport argument) go through the lean transport, so they test it too.
    from tests.test_registrar_contract import ORG as CONTRACT_ORG
    from tests.test_registrar_contract import P1, client_for, new_simulator

    with new_simulator() as sim:
        c = client_for(sim)
        try:
            assert isinstance(c._routes[sim.url], LeanTransport)
            made = c.create(CONTRACT_ORG, P1, "alice", Sensitive(DH_TOKEN), MARKER)
            assert [r.id for r in c.list_project(P1)] == [made.id]
        finally:
            c.close()
        assert [x.id for x in sim.credentials(CONTRACT_ORG)] == [made.id]


# ---- what it sends and how it reads ------------------------------------------------------------


@pytest.mark.parametrize("kind", ["json", "form", "none"])
def test_it_sends_what_httpx_sends(serve: Callable[..., Server], kind: str) -> None:
    """Same request line, headers and body as httpx's own transport (h11) for the same Request."""
    srv = serve([answers(ok()), answers(ok())])
    headers = {"Accept": "application/json", "User-Agent": "cybedefend-bridge", "x-api-key": API_KEY}
    body: dict[str, Any] = {"json": {"accessToken": DH_TOKEN, "é": "ü"}} if kind == "json" else (
        {"data": {"grant_type": "x y", "subject_token": "a&b=c"}} if kind == "form" else {})
    method = "GET" if kind == "none" else "POST"
    url = f"http://127.0.0.1:{srv.port}/credentials/a%20b?x=1"
    lean, reference = transport(), httpx.HTTPTransport()
    try:
        send(lean, request(method, url, headers=headers, **body))
        lean.close()  # the server takes the next connection once this one is closed
        send(reference, request(method, url, headers=headers, **body))
    finally:
        lean.close()
        reference.close()
    (ours_head, ours_body), (their_head, their_body) = srv.requests

    def parts(head: bytes) -> tuple[bytes, list[bytes]]:
        line, *fields = head.split(b"\r\n")
        return line, sorted(f.lower() for f in fields)

    assert parts(ours_head) == parts(their_head) and ours_body == their_body
    assert parts(ours_head)[0] == f"{method} /credentials/a%20b?x=1 HTTP/1.1".encode()
    if kind != "none":
        assert b"content-length: %d" % len(ours_body) in parts(ours_head)[1] and ours_body


def test_a_chunked_answer_is_read_whole_and_the_connection_reused(serve: Callable[..., Server]) -> None:
    chunked = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"7\r\n{\"a\": [\r\n5;ext=1\r\n1, 2]\r\n1\r\n}\r\n0\r\nX-Trailer: t\r\n\r\n")
    srv = serve([answers(chunked, ok(b'{"b": 1}'))])
    tr = transport()
    try:
        first = send(tr, request("GET", f"http://127.0.0.1:{srv.port}/x"))
        second = send(tr, request("GET", f"http://127.0.0.1:{srv.port}/y"))
    finally:
        tr.close()
    assert first.json() == {"a": [1, 2]} and second.json() == {"b": 1}
    assert srv.connections == 1


def test_status_reason_headers_and_a_gzip_body_reach_the_client(serve: Callable[..., Server]) -> None:
    zipped = gzip.compress(b'{"z": true}')
    srv = serve([answers(ok(b"{}", b"429 Slow Down", b"Retry-After: 7\r\nX-Two: a\r\nX-Two: b\r\n"),
                         b"HTTP/1.1 100 Continue\r\nX-Interim: 1\r\n\r\n" + ok(zipped, extra=b"Content-Encoding: gzip\r\n"))])
    tr = transport()
    try:
        limited = send(tr, request("GET", f"http://127.0.0.1:{srv.port}/x"))
        interim = send(tr, request("GET", f"http://127.0.0.1:{srv.port}/y"))
    finally:
        tr.close()
    assert (limited.status_code, limited.reason_phrase, limited.headers["retry-after"]) == (429, "Slow Down", "7")
    assert limited.headers.get_list("x-two") == ["a", "b"] and limited.extensions["http_version"] == b"HTTP/1.1"
    assert interim.status_code == 200 and interim.json() == {"z": True} and "x-interim" not in interim.headers


def test_a_body_running_to_the_close_is_read_and_the_connection_not_kept(serve: Callable[..., Server]) -> None:
    srv = serve([answers(b"HTTP/1.1 200 OK\r\n\r\n{\"to\": \"close\"}", then="close"), answers(ok())])
    tr = transport()
    try:
        assert send(tr, request("GET", f"http://127.0.0.1:{srv.port}/x")).json() == {"to": "close"}
        assert send(tr, request("GET", f"http://127.0.0.1:{srv.port}/x")).status_code == 200
    finally:
        tr.close()
    assert srv.connections == 2


def test_an_idle_connection_past_the_keepalive_expiry_is_not_reused(serve: Callable[..., Server]) -> None:
    srv = serve([answers(ok()), answers(ok())])
    now = [100.0]
    pool = Pool("127.0.0.1", srv.port, None, 5.0, 2, idle_expiry=5.0, clock=lambda: now[0])
    try:
        req = b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"
        assert pool.request(req, idempotent=True) == (200, b"{}")
        now[0] += 5.5
        conn, reused = pool.checkout(check=True)
        assert reused is False  # a new connection, the expired one closed
        conn.close()
    finally:
        pool.close()


# ---- never sent, or maybe processed ------------------------------------------------------------


def test_a_post_the_server_swallowed_is_ambiguous_and_sent_once(serve: Callable[..., Server]) -> None:
    """The server reads the create and closes without a word: it may have stored it."""
    srv = serve([answers(then="swallow"), answers(ok(CREATED, b"201 Created"))])
    err = failed_create(client(srv.port))
    assert [h.split(b" ", 1)[0] for h, _ in srv.requests] == [b"POST"] and srv.connections == 1
    assert isinstance(err.__cause__, httpx.RemoteProtocolError)
    no_secret(err)


def test_a_post_on_a_reused_connection_closed_under_it_is_ambiguous(serve: Callable[..., Server]) -> None:
    """A GET is answered, then the POST on the same (reused) connection meets a close: not resent."""
    srv = serve([answers(ok(b'{"dockerhub": []}'), then="swallow"), answers(ok(CREATED, b"201 Created"))])
    c = client(srv.port)
    try:
        assert c.all_credentials(ORG) == []
        with pytest.raises(AmbiguousWrite):
            create(c)
    finally:
        c.close()
    assert [h.split(b" ", 1)[0] for h, _ in srv.requests] == [b"GET", b"POST"] and srv.connections == 1


def test_a_post_skips_an_idle_connection_the_server_already_closed(serve: Callable[..., Server]) -> None:
    srv = serve([answers(ok(b'{"dockerhub": []}'), then="close"), answers(ok(CREATED, b"201 Created"))])
    c = client(srv.port)
    try:
        assert c.all_credentials(ORG) == []
        deadline = time.monotonic() + 5
        while not _idle_dropped(c) and time.monotonic() < deadline:  # the server's FIN arrives
            time.sleep(0.01)
        assert create(c) is not None
    finally:
        c.close()
    assert [h.split(b" ", 1)[0] for h, _ in srv.requests] == [b"GET", b"POST"] and srv.connections == 2


def _idle_dropped(c: CybeDefendClient) -> bool:
    assert c._lean is not None
    return all(conn.dropped() for pool in c._lean._pools.values() for conn in list(pool._idle.queue))


def test_a_get_on_a_stale_connection_is_sent_again_once_on_a_fresh_one(serve: Callable[..., Server]) -> None:
    srv = serve([answers(ok(b'{"dockerhub": []}'), then="swallow"), answers(ok(b'{"dockerhub": []}'))])
    tr = transport()
    url = f"http://127.0.0.1:{srv.port}/integrations/container-registry/organization/{ORG}/credentials"
    try:
        assert send(tr, request("GET", url)).status_code == 200
        assert send(tr, request("GET", url)).status_code == 200  # the first connection swallowed it
    finally:
        tr.close()
    assert len(srv.requests) == 3 and srv.connections == 2


def test_a_get_on_a_fresh_connection_closed_without_answer_is_not_resent_by_the_transport(
    serve: Callable[..., Server],
) -> None:
    srv = serve([answers(then="swallow")])
    tr = transport()
    try:
        with pytest.raises(httpx.RemoteProtocolError):
            send(tr, request("GET", f"http://127.0.0.1:{srv.port}/x"))
    finally:
        tr.close()
    assert len(srv.requests) == 1


def test_connection_refused_is_never_sent_and_a_create_is_retried() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tr = transport()
    try:
        with pytest.raises(httpx.ConnectError):
            send(tr, request("POST", f"http://127.0.0.1:{port}/x", json={}))
    finally:
        tr.close()
    metrics = Metrics()
    err = failed_create(CybeDefendClient(settings("api_key", api_url=f"http://127.0.0.1:{port}"), Sensitive(API_KEY),
                                         metrics, sleep=lambda _: None), TransientError)
    assert not isinstance(err, AmbiguousWrite) and "ConnectError" in str(err)
    assert metrics.registry.get_sample_value("cybedefend_bridge_retries_total", {"target": "cybedefend"}) == 3
    no_secret(err)


def test_a_create_whose_answer_times_out_is_ambiguous(serve: Callable[..., Server]) -> None:
    def holds(s: Server, conn: socket.socket) -> None:
        s.read(conn)
        time.sleep(1.5)

    srv = serve([holds])
    c = client(srv.port, timeout_seconds=0.5)
    started = time.monotonic()
    err = failed_create(c)
    assert isinstance(err.__cause__, httpx.ReadTimeout) and time.monotonic() - started < 1.4
    assert len(srv.requests) == 1


def test_a_truncated_answer_is_a_protocol_error(serve: Callable[..., Server]) -> None:
    srv = serve([answers(b"HTTP/1.1 201 Created\r\nContent-Length: 50\r\n\r\n{\"id\":", then="close")])
    err = failed_create(client(srv.port))
    assert isinstance(err.__cause__, httpx.RemoteProtocolError)


# ---- TLS and refusals --------------------------------------------------------------------------


def _tls_server(tmp_path: Path) -> tuple[Path, ssl.SSLContext]:
    cert, key = tmp_path / "cd.pem", tmp_path / "cd.key"
    make_cert(cert, key, "cybedefend-test")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert), str(key))
    return cert, ctx


def test_tls_verifies_against_the_ca_httpx_would_use(serve: Callable[..., Server], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    cert, ctx = _tls_server(tmp_path)
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "SSL_CERT_DIR"):
        monkeypatch.delenv(name, raising=False)
    srv = serve([answers(ok(b'{"dockerhub": []}'), then="close"), answers(ok(b'{"dockerhub": []}'))], ctx)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # httpx's trust_env CA source: the lean path must honour it
    trusted = client(srv.port, "https", retry={"max_attempts": 1})
    monkeypatch.delenv("SSL_CERT_FILE")
    untrusted = client(srv.port, "https", retry={"max_attempts": 1})
    try:
        assert isinstance(trusted._routes[f"https://127.0.0.1:{srv.port}"], LeanTransport)
        assert trusted.all_credentials(ORG) == []
        started = time.monotonic()
        with pytest.raises(TransientError) as info:
            untrusted.all_credentials(ORG)
    finally:
        trusted.close()
        untrusted.close()
    cause = info.value.__cause__
    assert isinstance(cause, httpx.ConnectError) and "CERTIFICATE_VERIFY_FAILED" in str(cause)
    assert time.monotonic() - started < 5  # refused by verification, not a timeout
    assert len(srv.requests) == 1  # the untrusted client sent nothing


def test_a_header_that_would_split_the_request_is_refused_without_showing_it() -> None:
    tr = transport()
    bad = f"{DH_TOKEN}\r\nX-Injected: 1"
    try:
        with pytest.raises(httpx.LocalProtocolError) as info:
            send(tr, request("GET", "http://127.0.0.1:9/x", headers={"Authorization": bad}))
    finally:
        tr.close()
    assert "Authorization" in str(info.value)
    no_secret(info.value)


def test_no_secret_in_a_failure_after_sending(serve: Callable[..., Server]) -> None:
    srv = serve([answers(b"HTTP/1.1 201 Created\r\nContent-Length: 500\r\n\r\n" + CREATED[:20] + DH_TOKEN.encode(),
                         then="close")])
    err = failed_create(client(srv.port))
    no_secret(err)
    assert DH_TOKEN.encode() in srv.requests[0][1]  # it was sent (in the body), never echoed


def test_a_post_answered_by_a_reset_is_ambiguous(serve: Callable[..., Server]) -> None:
    """The server reads the create and resets the connection (RST, not FIN): maybe processed."""

    def resets(s: Server, conn: socket.socket) -> None:
        s.read(conn)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close() sends RST

    srv = serve([resets, answers(ok(CREATED, b"201 Created"))])
    err = failed_create(client(srv.port))
    assert isinstance(err.__cause__, httpx.ReadError)
    assert len(srv.requests) == 1 and srv.connections == 1


def test_a_streamed_request_body_is_refused_before_anything_is_sent(serve: Callable[..., Server]) -> None:
    srv = serve([answers(ok())])
    tr = transport()
    try:
        with pytest.raises(httpx.LocalProtocolError, match="Content-Length"):
            send(tr, request("POST", f"http://127.0.0.1:{srv.port}/x", content=iter([b"{}"])))
    finally:
        tr.close()
    assert srv.requests == [] and srv.connections == 0
