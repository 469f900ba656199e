"""The optional DockerHub token check: the adapter over a mock transport, and its effect on a pass."""

from __future__ import annotations

import json
import logging

import httpx
import pytest

from bridge.dockerhub import DockerHubVerifier
from bridge.errors import TransientError
from bridge.model import Sensitive, State
from tests.support.data import assert_no_leak, token
from tests.support.fake_source import FakeSecretSource
from tests.support.world import World

GOOD, BAD = token(1, "hub-good"), token(2, "hub-bad")


def hub(request: httpx.Request) -> httpx.Response:
    body = json.loads(request.content)
    if request.url.path != "/v2/auth/token" or set(body) != {"identifier", "secret"}:
        return httpx.Response(400)
    if body["secret"] == GOOD and body["identifier"] == "alice":
        return httpx.Response(200, json={"access_token": "jwt"})
    if body["secret"] == "boom":
        return httpx.Response(503)
    return httpx.Response(401, json={"detail": "incorrect"})


def verifier() -> DockerHubVerifier:
    return DockerHubVerifier("https://hub.example/v2/auth/token", transport=httpx.MockTransport(hub))


def test_accepts_rejects_and_transient() -> None:
    v = verifier()
    assert v.accepts("alice", Sensitive(GOOD))
    assert not v.accepts("alice", Sensitive(BAD))
    with pytest.raises(TransientError) as err:
        v.accepts("alice", Sensitive("boom"))
    assert err.value.retryable and "503" in str(err.value)


def test_unreachable_is_transient_without_the_token() -> None:
    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    v = DockerHubVerifier("https://hub.example/v2/auth/token", transport=httpx.MockTransport(down))
    with pytest.raises(TransientError) as err:
        v.accepts("alice", Sensitive(GOOD))
    assert GOOD not in str(err.value) and err.value.__cause__ is None


def test_a_token_dockerhub_refuses_is_rejected_not_registered(caplog: pytest.LogCaptureFixture) -> None:
    w = World(sync={"verify_with_dockerhub": True})
    w.vault = FakeSecretSource()
    from bridge.engine.sync import SyncEngine

    w.engine = SyncEngine(w.s, w.vault, w.api, w.ledger, w.keys, w.metrics, stop=w.stop, clock=w.clock,
                          verifier=verifier())
    w.vault.put("secret", "dockerhub/good", {"accessToken": GOOD, "dockerhubUsername": "alice"},
                {"cybedefend-project-id": "0b7c5a3e-1d2f-4a6b-8c9d-0e1f2a3b4c5d"})
    w.vault.put("secret", "dockerhub/bad", {"accessToken": BAD, "dockerhubUsername": "alice"},
                {"cybedefend-project-id": "0b7c5a3e-1d2f-4a6b-8c9d-0e1f2a3b4c5d"})
    with caplog.at_level(logging.INFO, logger="bridge"):
        report = w.run()
    assert report.counts["created"] == 1 and report.counts["rejected"] == 1
    assert len(w.creds()) == 1
    rec = w.ledger.get("secret/dockerhub/bad")
    assert rec is not None and rec.state == State.REJECTED and rec.last_result == "dockerhub_rejected"
    assert_no_leak([caplog.text], [GOOD, BAD])
