"""Scenario 7 against real OpenBao: a lease document written by someone who may write Vault KV.

A standby daemon reads a forged lease naming an attacker's listener as the leader's address.
It forwards the trigger it receives there only signed (HMAC over time and body with a key
derived from the state key), so the attacker never sees the webhook token; and the leader's
server refuses a forward whose signature does not verify.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from bridge.daemon.ha import FORWARD_HEADER, sign_forward
from cybedefend_double.simulator import Simulator
from tests.support.daemon import WEBHOOK_TOKEN, Stack, bearer, new_simulator
from tests.support.openbao import OpenBao
from tests.support.procs import eventually, http

pytestmark = [pytest.mark.integration, pytest.mark.slow]


class _Attacker(BaseHTTPRequestHandler):
    seen: list[dict[str, Any]] = []

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        type(self).seen.append({"headers": {k.lower(): v for k, v in self.headers.items()},
                                "body": self.rfile.read(length).decode(errors="replace")})
        self.send_response(202)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_a_forged_lease_never_receives_the_webhook_token(openbao: OpenBao, kv_mount: str, tmp_path: Path) -> None:
    attacker = ThreadingHTTPServer(("127.0.0.1", 0), _Attacker)
    _Attacker.seen = []
    threading.Thread(target=attacker.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    evil = f"http://127.0.0.1:{attacker.server_address[1]}"
    sim: Simulator = new_simulator()
    stack = Stack(openbao, sim, tmp_path, kv_mount)
    try:
        lease_path = "cybedefend-bridge/default/leader"
        # Written by anyone with KV write on the state path: a holder that never renews, far
        # expiry, a huge TTL, our listener as its address.
        openbao.write_secret(kv_mount, lease_path, {"holder": "mallory", "address": evil, "expires_at": time.time() + 1e9,
                                                    "acquired_at": time.time(), "ttl_seconds": 1e9})
        d = stack.daemon("standby", ha={"enabled": True, "ttl_seconds": 30})
        d.start()
        port = d.port
        assert eventually(lambda: d.code("/readyz") == 200, timeout=60)
        # Triggers that arrive before the daemon took over from the start-up hooks are deferred.
        assert eventually(lambda: bool(d.events("daemon_started")), timeout=60)
        body = json.dumps({"paths": [f"{kv_mount}/dockerhub/x"]}).encode()
        assert http("POST", f"http://127.0.0.1:{port}/v1/sync", body, bearer() | {"Content-Type": "application/json"})[0] == 202
        assert eventually(lambda: len(_Attacker.seen) >= 1, timeout=20), "the standby did not forward at all"
        for req in _Attacker.seen:
            assert "authorization" not in req["headers"]
            assert WEBHOOK_TOKEN not in json.dumps(req)
            assert req["headers"][FORWARD_HEADER.lower()].startswith("t=")
        # A forward signed with any other key is refused by a bridge's server.
        forged = sign_forward(b"not-the-derived-key", body, time.time())
        status, _ = http("POST", f"http://127.0.0.1:{port}/v1/sync", body, {FORWARD_HEADER: forged})
        assert status == 401
        d.stop(grace=20)
        assert WEBHOOK_TOKEN not in d.stdout() + d.stderr()
    finally:
        stack.close()
        sim.stop()
        attacker.shutdown()
        attacker.server_close()
