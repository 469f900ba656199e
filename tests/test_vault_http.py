"""The lean HTTP/1.1 reader of the Vault hot path (`bridge.vault.transport._Conn` and the pool),
against a scripted loopback server: every framing Go's net/http uses, and what must not pass.

No OpenBao: each test serves exact bytes, so a framing bug shows as a wrong body, not a hang
(every socket has a timeout)."""

from __future__ import annotations

import http.client
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bridge.errors import VaultInvalidRequest, VaultPermissionDenied, VaultUnavailable
from bridge.metrics import Metrics
from bridge.model import Sensitive
from bridge.vault.transport import ConnectionPool, VaultTransport, _Conn, routine_error
from tests.support.config import parse, raw_config

TOKEN = "s.lean-path-test-token"

Script = Callable[[socket.socket], None]


class Scripted:
    """A loopback server that runs one script per accepted connection, in order."""

    def __init__(self, scripts: list[Script]) -> None:
        self._scripts = list(scripts)
        self.requests: list[bytes] = []
        self._srv = socket.create_server(("127.0.0.1", 0))
        self._srv.settimeout(5)
        self.port = self._srv.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def read_request(self, conn: socket.socket) -> bytes:
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = conn.recv(4096)
            if not chunk:
                break
            buf += chunk
        self.requests.append(buf)
        return buf

    def _serve(self) -> None:
        for script in self._scripts:
            try:
                conn, _ = self._srv.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                script(conn)

    def close(self) -> None:
        self._srv.close()
        self._thread.join(5)


@pytest.fixture
def serve() -> Iterator[Callable[[list[Script]], Scripted]]:
    made: list[Scripted] = []

    def make(scripts: list[Script]) -> Scripted:
        made.append(Scripted(scripts))
        return made[-1]

    yield make
    for s in made:
        s.close()


def answer(server_bytes: list[bytes], *, then_close: bool = False) -> Callable[[Scripted], Script]:
    """A script: for each entry, read one request and send those bytes back."""

    def bind(srv: Scripted) -> Script:
        def script(conn: socket.socket) -> None:
            for raw in server_bytes:
                srv.read_request(conn)
                conn.sendall(raw)
            if not then_close:
                srv.read_request(conn)  # hold the connection until the client closes it

        return script

    return bind


def one(serve: Callable[[list[Script]], Scripted], raw: bytes) -> tuple[int, bytes, bool]:
    holder: list[Scripted] = []
    srv = serve([lambda c: answer([raw])(holder[0])(c)])
    holder.append(srv)
    conn = _Conn("127.0.0.1", srv.port, 5.0, None)
    try:
        return conn.exchange(b"GET /v1/x HTTP/1.1\r\nHost: h\r\n\r\n")
    finally:
        conn.close()


def test_content_length_body_and_keep_alive(serve: Callable[[list[Script]], Scripted]) -> None:
    status, body, keep = one(serve, b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{\"data\":{}}")
    assert (status, body, keep) == (200, b'{"data":{}}', True)


def test_chunked_body_with_extension_and_trailer(serve: Callable[[list[Script]], Scripted]) -> None:
    raw = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"5;ext=1\r\n{\"a\":\r\n6\r\n [1,2]\r\n1\r\n}\r\n0\r\nX-Trailer: t\r\n\r\n")
    status, body, keep = one(serve, raw)
    assert (status, body, keep) == (200, b'{"a": [1,2]}', True)


def test_body_to_the_close_is_read_whole_and_not_kept(serve: Callable[[list[Script]], Scripted]) -> None:
    holder: list[Scripted] = []
    srv = serve([lambda c: answer([b"HTTP/1.1 200 OK\r\n\r\n{\"to\":\"close\"}"], then_close=True)(holder[0])(c)])
    holder.append(srv)
    conn = _Conn("127.0.0.1", srv.port, 5.0, None)
    try:
        assert conn.exchange(b"GET / HTTP/1.1\r\n\r\n") == (200, b'{"to":"close"}', False)
    finally:
        conn.close()


def test_connection_close_http10_and_no_body_statuses(serve: Callable[[list[Script]], Scripted]) -> None:
    assert one(serve, b"HTTP/1.1 404 Not Found\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}")[2] is False
    assert one(serve, b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n{}")[2] is False
    assert one(serve, b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\n{}")[2] is True
    assert one(serve, b"HTTP/1.1 204 No Content\r\n\r\n") == (204, b"", True)


def test_an_interim_1xx_is_skipped(serve: Callable[[list[Script]], Scripted]) -> None:
    raw = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"
    assert one(serve, raw) == (200, b"{}", True)


def test_bytes_after_the_body_make_the_connection_unusable(serve: Callable[[list[Script]], Scripted]) -> None:
    status, body, keep = one(serve, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}garbage")
    assert (status, body, keep) == (200, b"{}", False)


@pytest.mark.parametrize("raw", [
    b"SSH-2.0-OpenSSH\r\n\r\n",
    b"HTTP/1.1 2x0 OK\r\n\r\n",
    b"<html>proxy</html>\r\n\r\n",
])
def test_a_non_http_answer_is_a_bad_status_line(serve: Callable[[list[Script]], Scripted], raw: bytes) -> None:
    with pytest.raises(http.client.BadStatusLine):
        one(serve, raw)


def test_a_broken_chunk_or_length_is_an_error_not_a_short_body(serve: Callable[[list[Script]], Scripted]) -> None:
    with pytest.raises(http.client.IncompleteRead):
        one(serve, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
    with pytest.raises(http.client.HTTPException):
        one(serve, b"HTTP/1.1 200 OK\r\nContent-Length: -3\r\n\r\n")


def _transport(tmp_path: Path, port: int) -> VaultTransport:
    raw = raw_config(tmp_path, vault_addr=f"http://127.0.0.1:{port}", cybedefend_url="http://127.0.0.1:9")
    return VaultTransport(parse(raw).vault, Metrics())


def test_the_request_carries_host_and_token_and_the_pool_reuses_the_connection(
    serve: Callable[[list[Script]], Scripted], tmp_path: Path
) -> None:
    holder: list[Scripted] = []
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n{\"data\":{}}"
    srv = serve([lambda c: answer([ok, ok])(holder[0])(c)])  # one connection answers both
    holder.append(srv)
    tr = _transport(tmp_path, srv.port)
    try:
        for _ in range(2):
            assert tr.send("metadata", "GET", "kv/metadata/a%20b", "", Sensitive(TOKEN)) == (200, {"data": {}})
    finally:
        tr.close()
    first = srv.requests[0].decode()
    assert first.startswith("GET /v1/kv/metadata/a%20b HTTP/1.1\r\n")
    assert f"Host: 127.0.0.1:{srv.port}\r\n" in first and f"X-Vault-Token: {TOKEN}\r\n" in first
    assert tr.request_counts() == {"metadata": 2}


def _closes_after_one_answer(serve: Callable[[list[Script]], Scripted], tmp_path: Path) -> tuple[Scripted, VaultTransport]:
    """A server whose first connection answers once, then closes while the client keeps it idle;
    the next connection answers normally. And a transport to it."""
    holder: list[Scripted] = []
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"

    def first(conn: socket.socket) -> None:
        holder[0].read_request(conn)
        conn.sendall(ok)

    srv = serve([first, lambda c: answer([ok])(holder[0])(c)])
    holder.append(srv)
    return srv, _transport(tmp_path, srv.port)


def test_a_stale_pooled_connection_is_retried_once_on_a_fresh_one(
    serve: Callable[[list[Script]], Scripted], tmp_path: Path
) -> None:
    srv, tr = _closes_after_one_answer(serve, tmp_path)
    try:
        assert tr.send("metadata", "GET", "kv/metadata/a", "", Sensitive(TOKEN))[0] == 200
        assert tr.send("metadata", "GET", "kv/metadata/a", "", Sensitive(TOKEN))[0] == 200
    finally:
        tr.close()
    assert len(srv.requests) >= 2


def test_a_token_that_would_split_the_request_is_refused_without_showing_it(tmp_path: Path) -> None:
    tr = _transport(tmp_path, 9)
    bad = "s.abc\r\nX-Evil: 1"
    try:
        with pytest.raises(VaultInvalidRequest) as info:
            tr.send("metadata", "GET", "kv/metadata/a", "", Sensitive(bad))
    finally:
        tr.close()
    assert "X-Vault-Token" in str(info.value) and "abc" not in str(info.value)


def test_a_connection_refused_is_vault_unavailable(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tr = _transport(tmp_path, port)
    try:
        with pytest.raises(VaultUnavailable, match="connection failed"):
            tr.send("metadata", "GET", "kv/metadata/a", "", Sensitive(TOKEN))
    finally:
        tr.close()


def test_ipv6_and_default_port_host_headers(tmp_path: Path) -> None:
    def pool(addr: str) -> ConnectionPool:
        raw = raw_config(tmp_path, vault_addr=addr, cybedefend_url="http://127.0.0.1:9")
        return ConnectionPool(parse(raw).vault, 1)

    assert pool("http://vault.example:80").host_header == "vault.example"
    assert pool("http://[::1]:8200").host_header == "[::1]:8200"
    assert pool("http://127.0.0.1:8200/prefix/").prefix == "/prefix"


# --- the routine calls (ADR 15): JSON bodies, logins without a token, no blind re-send of a POST ----


def test_a_post_carries_its_json_body_and_a_login_no_token(serve: Callable[[list[Script]], Scripted], tmp_path: Path) -> None:
    holder: list[Scripted] = []
    bodies: list[bytes] = []
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"

    def script(conn: socket.socket) -> None:
        for _ in range(2):
            head = holder[0].read_request(conn)
            raw_head, _, rest = head.partition(b"\r\n\r\n")
            length = int(next(line.split(b":")[1] for line in raw_head.split(b"\r\n") if line.lower().startswith(b"content-length")))
            while len(rest) < length:
                rest += conn.recv(4096)
            bodies.append(rest)
            conn.sendall(ok)
        holder[0].read_request(conn)

    srv = serve([script])
    holder.append(srv)
    tr = _transport(tmp_path, srv.port)
    try:
        assert tr.send("login", "POST", "auth/approle/login", "", None, b'{"role_id":"r"}')[0] == 200
        assert tr.send("revoke", "POST", "auth/token/revoke-self", "", Sensitive(TOKEN))[0] == 200
    finally:
        tr.close()
    login, revoke = (r.decode() for r in srv.requests[:2])
    assert login.startswith("POST /v1/auth/approle/login HTTP/1.1\r\n") and "X-Vault-Token" not in login
    assert "Content-Length: 15\r\n" in login and "Content-Type: application/json\r\n" in login
    assert f"X-Vault-Token: {TOKEN}\r\n" in revoke and "Content-Length: 0\r\n" in revoke  # a POST always says its length
    assert bodies == [b'{"role_id":"r"}', b""]


def test_a_post_is_never_sent_twice(serve: Callable[[list[Script]], Scripted], tmp_path: Path) -> None:
    """A POST that met a connection closed under it may have reached Vault: it fails, it is not repeated."""
    holder: list[Scripted] = []
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"

    def first(conn: socket.socket) -> None:  # answers the GET, then takes the POST and closes without answering
        holder[0].read_request(conn)
        conn.sendall(ok)
        holder[0].read_request(conn)

    srv = serve([first, lambda c: answer([ok])(holder[0])(c)])
    holder.append(srv)
    tr = _transport(tmp_path, srv.port)
    try:
        assert tr.send("state", "GET", "kv/data/a", "", Sensitive(TOKEN))[0] == 200
        with pytest.raises(VaultUnavailable, match="connection failed"):
            tr.send("state", "POST", "kv/data/a", "", Sensitive(TOKEN), b"{}")
    finally:
        tr.close()
    assert len(srv.requests) == 2  # the GET and the one POST: no second connection was asked for it


def test_a_post_skips_a_pooled_connection_the_server_closed(serve: Callable[[list[Script]], Scripted],
                                                          tmp_path: Path) -> None:
    _, tr = _closes_after_one_answer(serve, tmp_path)
    try:
        assert tr.send("state", "GET", "kv/data/a", "", Sensitive(TOKEN))[0] == 200
        deadline = time.monotonic() + 5
        while not tr._pool._idle.queue[0].dropped() and time.monotonic() < deadline:  # the server's FIN arrives
            time.sleep(0.01)
        assert tr.send("state", "POST", "kv/data/a", "", Sensitive(TOKEN), b"{}")[0] == 200
    finally:
        tr.close()


def test_routine_errors_are_read_as_hvac_read_them() -> None:
    """The classes `translate` gave hvac's exceptions: its own for 400-404, 429, 500-503; any
    other status was its UnexpectedError, read as a 500. The message keeps the real status."""
    expected = {400: VaultInvalidRequest, 401: VaultPermissionDenied, 403: VaultPermissionDenied,
                404: VaultInvalidRequest, 405: VaultUnavailable, 409: VaultUnavailable, 412: VaultUnavailable,
                429: VaultUnavailable, 502: VaultUnavailable, 307: VaultUnavailable}
    for status, cls in expected.items():
        err = routine_error(status, "state", "kv/data/x", ["boom"])
        assert type(err) is cls, status
        assert f"HTTP {status} boom" in str(err)
