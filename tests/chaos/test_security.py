"""Scenario 6, security: TLS to OpenBao with a CA made here, the webhook's and the audit
listener's gates, least privilege, file modes, and the leak scan itself.

The leak scan runs at the end of every chaos scenario (tests/chaos/invariant.py); the test at the
bottom proves the scanner would catch a leak in each encoding it claims to look for, and scans
the daemon's HTTP endpoints (/metrics, /v1/status) served by bridge/server.py.
"""

from __future__ import annotations

import base64
import datetime as dt
import http.client
import ipaddress
import json
import re
import socket
import stat
import threading
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from bridge.config import ServerSettings
from bridge.daemon.audit import decode_audit_line
from bridge.daemon.audit_socket import AuditSocketListener
from bridge.daemon.server import Check, Hooks, HttpServer
from bridge.metrics import Metrics
from bridge.model import Sensitive
from tests.chaos.rig import ChaosRig
from tests.chaos.test_vault_outages import policy_for
from tests.support.data import PROJECTS, assert_no_leak, forms
from tests.support.openbao import OpenBao, free_port_pair
from tests.support.procs import eventually

pytestmark = pytest.mark.integration
AUDIT_SAMPLE = Path(__file__).resolve().parents[1] / "data" / "audit" / "openbao-file.jsonl"


# --- TLS ----------------------------------------------------------------------------------

def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(tmp: Path, label: str) -> tuple[Path, Any, Any]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(_name(f"chaos {label} CA")).issuer_name(_name(f"chaos {label} CA"))
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(key, hashes.SHA256())
    )
    path = tmp / f"{label}-ca.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path, cert, key


def make_server_cert(tmp: Path, ca_cert: Any, ca_key: Any) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(_name("127.0.0.1")).issuer_name(ca_cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                    x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "server.pem", tmp / "server-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_tls_to_openbao_verifies_with_the_right_ca_and_fails_clearly_with_a_wrong_one(
    openbao_factory: Callable[..., OpenBao], sim: Any, tmp_path: Path
) -> None:
    ca, ca_cert, ca_key = make_ca(tmp_path, "right")
    wrong, _, _ = make_ca(tmp_path, "wrong")
    cert, key = make_server_cert(tmp_path, ca_cert, ca_key)
    tls_port = free_port_pair()
    listener = (f'listener "tcp" {{\n  address = "127.0.0.1:{tls_port}"\n  cluster_address = "127.0.0.1:{tls_port + 1}"\n'
                f'  tls_cert_file = "{cert}"\n  tls_key_file = "{key}"\n}}\n')
    bao = openbao_factory("dev", extra_config=listener)
    bao.enable_kv("tls", 2)
    rig = ChaosRig(bao, "tls", sim, tmp_path / "rig")
    rig.seed_foreign()
    rig.raw["vault"]["address"] = f"https://127.0.0.1:{tls_port}"
    rig.raw["vault"]["tls"] = {"ca_cert": str(ca)}
    for i in range(3):
        rig.put(f"t{i}", i, PROJECTS[i])
    assert rig.sync_once() == 0, rig.runs[-1].stderr[-1500:]
    code, out, _ = rig.cli("check")
    assert "OK     vault login" in out, out
    rig.assert_invariant("TLS, right CA")

    rig.raw["vault"]["tls"] = {"ca_cert": str(wrong)}
    code, out, err = rig.cli("sync", "--once")
    assert code == 1, f"a wrong CA must fail the pass: exit {code}"
    text = (out + err).lower()
    assert "certificate" in text and "verify" in text, f"the error does not say the certificate failed: {(out + err)[-600:]}"
    assert "traceback" not in text
    code, out, _ = rig.cli("check")
    assert code == 1 and "FAILED vault login" in out and "certificate" in out.lower(), out
    rig.raw["vault"]["tls"] = {}
    code, out, err = rig.cli("sync", "--once")  # the system trust store does not know our CA either
    assert code == 1 and "certificate" in (out + err).lower()
    rig.assert_no_leak("TLS, wrong CA")


# --- the webhook ----------------------------------------------------------------------------

WEBHOOK_TOKEN = "whk_" + "7" * 40


def _ok() -> list[Check]:
    return [("test", True, "")]


@pytest.fixture
def webhook() -> Any:
    calls: list[Any] = []

    def on_sync(paths: list[str] | None, source: str) -> bool:
        calls.append((paths, source))
        return True

    server = HttpServer(
        ServerSettings(bind="127.0.0.1", port=0, max_body_bytes=4096), metrics=Metrics(),
        hooks=Hooks(live=_ok, ready=_ok, status=lambda: {"ok": True}, on_sync=on_sync, on_audit=None),
        webhook_token=Sensitive(WEBHOOK_TOKEN),
    )
    port = server.start()
    yield port, calls
    server.stop()


def post(port: int, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", "/v1/sync", body=body, headers={"Content-Type": "application/json", **headers})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_the_webhook_rejects_missing_and_wrong_tokens_and_oversized_bodies(webhook: Any) -> None:
    port, calls = webhook
    body = json.dumps({"paths": ["secret/dockerhub/a"]}).encode()
    assert post(port, body, {})[0] == 401
    assert post(port, body, {"Authorization": "Bearer wrong-token"})[0] == 401
    assert post(port, body, {"Authorization": WEBHOOK_TOKEN})[0] == 401  # no scheme
    assert post(port, body, {"Authorization": "Basic " + base64.b64encode(WEBHOOK_TOKEN.encode()).decode()})[0] == 401
    assert post(port, body, {"Authorization": f"Bearer {WEBHOOK_TOKEN[:-1]}"})[0] == 401
    huge = json.dumps({"paths": ["secret/dockerhub/a"] * 2000}).encode()
    status, answer = post(port, huge, {"Authorization": f"Bearer {WEBHOOK_TOKEN}"})
    assert status == 413 and WEBHOOK_TOKEN.encode() not in answer
    assert calls == [], "a refused request reached the engine"
    assert post(port, b'{"paths": ["secret/../sys/x"]}', {"Authorization": f"Bearer {WEBHOOK_TOKEN}"})[0] == 400
    assert post(port, body, {"Authorization": f"Bearer {WEBHOOK_TOKEN}"})[0] == 202
    assert calls == [(["secret/dockerhub/a"], "webhook")]


# --- the audit listener ----------------------------------------------------------------------

def send_lines(port: int, lines: list[bytes]) -> bool:
    """Send lines and wait for the listener to close; False when it cut us off first."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        try:
            for line in lines:
                s.sendall(line + b"\n")
            s.shutdown(socket.SHUT_WR)
            s.settimeout(2)
            s.recv(1)
        except OSError:  # reset, broken pipe, not connected: the listener closed on us
            return False
    return True




def test_the_audit_listener_refuses_peers_outside_the_allow_list_and_ignores_malformed_lines() -> None:
    good = AUDIT_SAMPLE.read_bytes().splitlines()[0]
    malformed = [b"", b"not json", b"{", b'{"type": ', b"[1,2,3]", b"\xff\xfe\x00garbage", b"{" * 100_000, b'"str"', b"null"]
    received: list[bytes] = []
    stop = threading.Event()
    outside = AuditSocketListener("127.0.0.1", 0, ["10.0.0.0/8", "fd00::/8"], received.append, stop)
    outside.start()
    try:
        send_lines(outside.port, [good])
        assert eventually(lambda: outside.refused >= 1), "a peer outside the allow-list was not refused"
        # The refusal closes the connection before counting it and starts no reader: nothing can
        # arrive later, so no wait is needed for this negative check.
        assert received == [], "a refused peer's line was delivered"
    finally:
        outside.close()
    inside = AuditSocketListener("127.0.0.1", 0, ["127.0.0.1/32"], received.append, stop)
    inside.start()
    try:
        send_lines(inside.port, [*malformed, good])
        assert eventually(lambda: good in received), "the allowed peer's valid line did not arrive"
        assert inside.refused == 0
    finally:
        inside.close()
    decoded = [decode_audit_line(line) for line in received]
    assert decoded[-1] is not None and "request" in decoded[-1]
    assert all(d is None for line, d in zip(received, decoded, strict=True) if line in malformed)


# --- least privilege and file modes ----------------------------------------------------------

ESSENTIAL = {  # policy block (as in config/vault-policy.hcl) -> what must be named when it is missing
    "metadata/dockerhub/*": "metadata/dockerhub",
    "data/dockerhub/*": "data/dockerhub",
    "data/cybedefend-bridge/*": "cybedefend-bridge",
}


def without_block(policy: str, mount: str, suffix: str) -> str:
    pattern = re.compile(r'path "' + re.escape(f"{mount}/{suffix}") + r'" \{[^}]*\}\n?', re.S)
    reduced, n = pattern.subn("", policy)
    assert n == 1, f"the policy has no block for {mount}/{suffix}"
    return reduced


def test_least_privilege_works_with_exactly_the_policy_and_fails_clearly_with_less(
    make_rig: Any, bao: OpenBao, mount: str
) -> None:
    full = policy_for(mount)
    bao.put_policy(f"lp-{mount}", full)
    token = bao.create_token([f"lp-{mount}"], no_default_policy=True)
    rig: ChaosRig = make_rig(vault_token=token)
    for i in range(4):
        rig.put(f"lp{i}", i, PROJECTS[i])
    assert rig.sync_once() == 0, rig.runs[-1].stderr[-1500:]
    code, out, _ = rig.cli("check")
    assert code == 0, out
    rig.assert_invariant("least privilege: exactly the policy")

    for suffix, named in ESSENTIAL.items():
        bao.put_policy(f"lp-{mount}", without_block(full, mount, suffix))
        rig.put("lp0", f"more-{suffix}", PROJECTS[0])  # a change that needs every capability
        rig.raw["ledger"]["path"] = str(rig.tmp / f"ledger-{len(rig.runs)}.sqlite3")  # a fresh start
        code, out, err = rig.cli("sync", "--once")
        assert code in (1, 2) and named in out + err, f"without {suffix}: exit {code}, path not named: {(out + err)[-800:]}"
        code, out, _ = rig.cli("check")
        assert code == 1 and re.search(r"FAILED.*" + re.escape(named), out), f"`check` without {suffix}: {out}"
    bao.put_policy(f"lp-{mount}", full)
    rig.raw["ledger"]["path"] = str(rig.tmp / "ledger.sqlite3")
    assert rig.sync_once() == 0
    rig.assert_invariant("least privilege: policy restored")


def test_ledger_and_key_files_are_created_0600(make_rig: Any) -> None:
    rig: ChaosRig = make_rig()
    rig.raw["ledger"] = {"path": str(rig.tmp / "state" / "ledger.sqlite3"), "key_source": "file",
                         "key_file": str(rig.tmp / "keys" / "fingerprint.key")}
    rig.put("m0", 0)
    assert rig.sync_once() == 0
    files = [rig.tmp / "keys" / "fingerprint.key", *(rig.tmp / "state").glob("ledger.sqlite3*")]
    assert len(files) >= 2
    for f in files:
        mode = stat.S_IMODE(f.stat().st_mode)
        assert mode == 0o600, f"{f.name} is {oct(mode)}"
    assert stat.S_IMODE((rig.tmp / "keys").stat().st_mode) == 0o700
    key = (rig.tmp / "keys" / "fingerprint.key").read_text().strip()
    rig.extra_secrets.append(key)
    rig.assert_no_leak("file modes")


# --- the scan itself, and the daemon's endpoints ----------------------------------------------

def test_the_leak_scan_catches_every_encoding_it_claims() -> None:
    secret = "dckr_pat_" + "Zz9-_" * 6
    for form in forms(secret):
        with pytest.raises(AssertionError) as info:
            assert_no_leak([f"ok … {form} … ok"], [secret])
        assert secret not in str(info.value), "the scanner's own message leaked the secret"
    assert base64.b64encode(secret.encode()).decode() in forms(secret)
    assert urllib.parse.quote(secret, safe="") in forms(secret)
    assert_no_leak(["nothing here"], [secret])


def test_metrics_and_status_served_over_http_hold_no_secret(rig: ChaosRig) -> None:
    for i in range(5):
        rig.put(f"h{i}", i, PROJECTS[i])
    bridge = rig.start()
    assert rig.run().result == "ok"
    assert rig.metrics is not None
    server = HttpServer(
        ServerSettings(bind="127.0.0.1", port=0), metrics=rig.metrics,
        hooks=Hooks(live=_ok, ready=_ok, status=bridge.engine.status, on_sync=lambda p, s: True, on_audit=None),
        webhook_token=Sensitive(WEBHOOK_TOKEN),
    )
    port = server.start()
    texts = []
    try:
        for path in ("/metrics", "/v1/status", "/healthz", "/readyz"):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", path)
            resp = conn.getresponse()
            assert resp.status == 200, path
            texts.append(resp.read().decode())
            conn.close()
    finally:
        server.stop()
    assert "cybedefend_bridge_" in texts[0] and json.loads(texts[1])["secrets"]
    rig.extra_secrets.append(WEBHOOK_TOKEN)
    rig.assert_invariant("metrics and status over HTTP", texts=texts)
