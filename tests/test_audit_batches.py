"""A POST /v1/audit batch with odd lines: each line is judged alone, nothing else is lost, nothing is printed.

Over real HTTP with the real matcher and ingest (`make_audit_ingest`), as the daemon wires them.
"""

from __future__ import annotations

import http.client
import json
import logging
from collections.abc import Callable
from typing import Any

import pytest

from bridge.config import ServerSettings, SourceSettings
from bridge.daemon.server import Check, Hooks, HttpServer, IngestResult, make_audit_ingest
from bridge.daemon.triggers import AuditMatcher
from bridge.metrics import Metrics
from bridge.model import Sensitive

TOKEN = "whk_9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d"
MARK = "dckr_pat_BATCH_LINE_MUST_NOT_BE_PRINTED"


def entry(path: Any, operation: Any = "update", **request: Any) -> bytes:
    doc = {"type": "response", "request": {"operation": operation, "path": path, **request}, "response": {"data": MARK}}
    return json.dumps(doc).encode()


def matcher() -> AuditMatcher:
    return AuditMatcher([SourceSettings(mount="secret", path="dockerhub")], {"secret": 2})


@pytest.mark.parametrize(
    "odd",
    [
        entry("secret/data/dockerhub/x", operation=[]),
        entry("secret/data/dockerhub/x", operation={"a": 1}),
        entry(["secret/data/dockerhub/x"]),
        entry("secret/data/dockerhub/./x"),
        entry("secret/data/dockerhub/../x"),
        entry("secret/data/dockerhub//x"),
        entry("secret/data/dockerhub/x", namespace=[]),
        b'{"type": "response", "request": []}',
        b"not json " + MARK.encode(),
    ],
    ids=["op-list", "op-dict", "path-list", "dot", "dotdot", "double-slash", "namespace-list", "request-list", "not-json"],
)
def test_the_matcher_ignores_an_odd_line_without_raising(odd: bytes) -> None:
    assert matcher().match(odd) == []


def test_a_batch_keeps_every_good_line_around_odd_ones() -> None:
    good_a, good_b = entry("secret/data/dockerhub/a"), entry("secret/data/dockerhub/b")
    body = b"\n".join([good_a, entry("secret/data/dockerhub/x", operation=[]), entry("secret/data/dockerhub//y"), good_b])
    result = make_audit_ingest(matcher().match, 100)(body)
    assert result == IngestResult(4, ["secret/dockerhub/a", "secret/dockerhub/b"], 0)


def test_a_line_the_matcher_chokes_on_is_counted_and_the_rest_still_counts() -> None:
    def fragile(line: bytes) -> list[str]:
        if b"boom" in line:
            raise TypeError("unhashable")  # what `[] in frozenset` raised before the matcher checked types
        return matcher().match(line)

    body = b"\n".join([entry("secret/data/dockerhub/a"), b'{"boom": 1}', entry("secret/data/dockerhub/b")])
    result = make_audit_ingest(fragile, 100)(body)
    assert result.keys == ["secret/dockerhub/a", "secret/dockerhub/b"] and result.rejected == 1
    assert result.counts() == {"accepted": 3, "keys": 2, "rejected": 1}


def _serve(on_audit: Callable[[bytes], dict[str, int] | None]) -> tuple[HttpServer, int]:
    ok: Callable[[], list[Check]] = lambda: [("x", True, "")]  # noqa: E731
    hooks = Hooks(live=ok, ready=ok, status=dict, on_sync=lambda paths, source: True, on_audit=on_audit)
    server = HttpServer(ServerSettings(bind="127.0.0.1", port=0), metrics=Metrics(), hooks=hooks, webhook_token=Sensitive(TOKEN))
    return server, server.start()


def test_over_http_the_answer_is_2xx_with_counts_and_nothing_is_printed(
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG)
    ingest = make_audit_ingest(matcher().match, 100)
    offered: list[list[str]] = []

    def on_audit(body: bytes) -> dict[str, int]:
        result = ingest(body)
        offered.append(result.keys)
        return result.counts()

    server, port = _serve(on_audit)
    body = b"\n".join(
        [entry("secret/data/dockerhub/a"), entry("secret/data/dockerhub/x", operation=[]), entry("secret/data/dockerhub/./x"),
         b"garbage " + MARK.encode(), entry("secret/data/dockerhub/b")]
    )
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("POST", "/v1/audit", body=body, headers={"Authorization": f"Bearer {TOKEN}"})
        resp = conn.getresponse()
        status, answer = resp.status, json.loads(resp.read())
        conn.close()
    finally:
        server.stop()
    assert status == 202 and answer == {"accepted": 5, "keys": 2, "rejected": 0}
    assert offered == [["secret/dockerhub/a", "secret/dockerhub/b"]]
    out, err = capfd.readouterr()
    assert out == "" and err == ""  # no traceback or print outside the (redacting) log pipeline
    assert MARK not in caplog.text


def test_a_handler_that_raises_is_a_500_in_the_log_pipeline_never_a_printed_traceback(
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    def broken(body: bytes) -> dict[str, int]:
        raise RuntimeError(MARK)

    server, port = _serve(broken)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("POST", "/v1/audit", body=b"{}\n", headers={"Authorization": f"Bearer {TOKEN}"})
        assert conn.getresponse().status == 500
        conn.close()
    finally:
        server.stop()
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    assert "http_handler_failed" in caplog.text and MARK not in caplog.text
