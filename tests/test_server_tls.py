"""HTTPS on the HTTP port (server.tls_cert_file / tls_key_file): real TLS with self-signed certificates.

Checks what the TLS front in bridge/daemon/tls.py promises: the port speaks only TLS, requests
and large answers pass both ways (keep-alive included), a changed certificate is served to new
connections without a restart, a broken new one is refused while the old one stays, and clients
that never finish a handshake cost neither a thread nor other clients their answers.
"""

from __future__ import annotations

import datetime
import http.client
import ipaddress
import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from bridge.config import ServerSettings
from bridge.daemon.server import HttpServer
from bridge.errors import ConfigError
from bridge.metrics import Metrics
from bridge.model import Sensitive
from tests.test_server import TOKEN, Hooks, auth


def make_cert(cert: Path, key: Path, name: str) -> bytes:
    """A self-signed certificate for 127.0.0.1 with common name `name`; returns its DER bytes."""
    private = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(private, hashes.SHA256())
    )
    key.write_bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return certificate.public_bytes(serialization.Encoding.DER)


def client_context(*certs: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    for c in certs:
        ctx.load_verify_locations(str(c))
    return ctx


def peer_der(port: int, ctx: ssl.SSLContext) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
        der = s.getpeercert(binary_form=True)
        assert der is not None
        return der


def https(port: int, ctx: ssl.SSLContext, method: str, path: str, body: bytes | None = None,
          headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=5, context=ctx)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@pytest.fixture
def hooks() -> Hooks:
    return Hooks()


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[Path, Path, bytes]:
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    return cert, key, make_cert(cert, key, "bridge-one")


@pytest.fixture
def served(hooks: Hooks, tls_files: tuple[Path, Path, bytes]) -> Iterator[tuple[HttpServer, int]]:
    cert, key, _ = tls_files
    settings = ServerSettings(bind="127.0.0.1", port=0, tls_cert_file=cert, tls_key_file=key, threads=2)
    server = HttpServer(settings, metrics=Metrics(), hooks=hooks.server_hooks(), webhook_token=Sensitive(TOKEN))
    port = server.start()
    try:
        yield server, port
    finally:
        server.stop()


def test_requests_and_large_answers_pass_over_tls(served: tuple[HttpServer, int], hooks: Hooks,
                                                   tls_files: tuple[Path, Path, bytes]) -> None:
    port, ctx = served[1], client_context(tls_files[0])
    assert https(port, ctx, "GET", "/healthz") == (200, b"ok\n")
    status, body = https(port, ctx, "GET", "/metrics")
    assert status == 200 and len(body) > 30_000 and body.rstrip().endswith(b"1.0")  # whole, through the 64 KiB chunks
    status, body = https(port, ctx, "POST", "/v1/sync", json.dumps({"paths": ["secret/a"]}).encode(), auth())
    assert status == 202 and hooks.syncs == [(["secret/a"], "webhook")]
    big = b"\n" * (900 << 10)  # a body larger than the per-direction buffer
    assert https(port, ctx, "POST", "/v1/audit", big, auth())[0] == 202 and len(hooks.audits[0]) == len(big)
    # keep-alive: two requests on one TLS connection
    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=5, context=ctx)
    try:
        for _ in range(2):
            conn.request("GET", "/readyz")
            resp = conn.getresponse()
            assert (resp.status, resp.read()) == (200, b"ok\n")
    finally:
        conn.close()


def test_the_port_speaks_only_tls(served: tuple[HttpServer, int]) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", served[1], timeout=5)
    try:
        with pytest.raises((ConnectionError, http.client.RemoteDisconnected, http.client.BadStatusLine)):
            conn.request("GET", "/healthz")
            conn.getresponse()
    finally:
        conn.close()


def test_a_changed_certificate_is_served_without_a_restart(served: tuple[HttpServer, int], tmp_path: Path,
                                                           tls_files: tuple[Path, Path, bytes]) -> None:
    port = served[1]
    cert, key, first = tls_files
    old_copy = tmp_path / "old.crt"
    old_copy.write_bytes(cert.read_bytes())
    assert peer_der(port, client_context(cert)) == first
    second = make_cert(cert, key, "bridge-two")
    both = client_context(old_copy, cert)
    deadline = time.monotonic() + 5
    while peer_der(port, both) != second:
        assert time.monotonic() < deadline, "the new certificate was not served within 5 s"
        time.sleep(0.1)
    # A broken pair is refused; the last good certificate keeps being served.
    key.write_text("not a key", encoding="utf-8")
    time.sleep(1.5)
    assert peer_der(port, both) == second
    assert https(port, both, "GET", "/healthz")[0] == 200


def test_clients_that_never_handshake_cost_no_thread_and_block_no_one(served: tuple[HttpServer, int],
                                                                      tls_files: tuple[Path, Path, bytes]) -> None:
    port, ctx = served[1], client_context(tls_files[0])
    before = threading.active_count()
    silent = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(100)]
    try:
        for s in silent[:50]:
            s.sendall(b"\x16\x03\x01")  # the first bytes of a ClientHello, then nothing
        for _ in range(5):
            t0 = time.monotonic()
            assert https(port, ctx, "GET", "/healthz")[0] == 200
            assert time.monotonic() - t0 < 2.0
        assert threading.active_count() == before
    finally:
        for s in silent:
            s.close()


def test_tls_settings_come_in_pairs_and_a_bad_certificate_is_a_config_error(tmp_path: Path, hooks: Hooks) -> None:
    with pytest.raises(ValueError, match="tls_cert_file and tls_key_file"):
        ServerSettings(tls_cert_file=tmp_path / "c.pem")
    (tmp_path / "c.pem").write_text("garbage", encoding="utf-8")
    (tmp_path / "k.pem").write_text("garbage", encoding="utf-8")
    settings = ServerSettings(bind="127.0.0.1", port=0, tls_cert_file=tmp_path / "c.pem", tls_key_file=tmp_path / "k.pem")
    server = HttpServer(settings, metrics=Metrics(), hooks=hooks.server_hooks(), webhook_token=None)
    with pytest.raises(ConfigError) as exc:
        server.start()
    assert exc.value.key == "server.tls_cert_file"
    server.stop()
