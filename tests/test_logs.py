"""bridge.logs: line shapes, redaction everywhere a value could slip through, reconfiguration."""

from __future__ import annotations

import io
import json
import logging
import re
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from bridge import logs
from bridge.model import Sensitive

ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """configure() changes the root logger; put it back so other tests see what they expect."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    noisy = {n: logging.getLogger(n).level for n in logs.NOISY_LOGGERS}
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)
    for n, lvl in noisy.items():
        logging.getLogger(n).setLevel(lvl)


def _json_lines(buf: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in buf.getvalue().splitlines() if line.strip()]


def fresh_token(kind: str = "pat") -> str:
    return f"dckr_{kind}_{secrets.token_urlsafe(24)}"


def test_json_line_shape() -> None:
    buf = io.StringIO()
    logs.configure("info", "json", buf)
    logs.get_logger("bridge.engine.sync").info("action", action="create", result="ok", count=3, ratio=0.5, ok=True)
    (line,) = _json_lines(buf)
    assert list(line)[:4] == ["ts", "level", "logger", "event"]
    assert ISO_UTC.match(str(line["ts"]))
    assert line["level"] == "info"
    assert line["logger"] == "bridge.engine.sync"
    assert line["event"] == "action"
    assert line["action"] == "create" and line["count"] == 3 and line["ratio"] == 0.5 and line["ok"] is True
    assert buf.getvalue().count("\n") == 1


def test_level_filters_and_disabled_level_does_no_work() -> None:
    buf = io.StringIO()
    logs.configure("warning", "json", buf)
    log = logs.get_logger("bridge.x")

    class Explodes:
        def __str__(self) -> str:  # would be called only if the line were rendered
            raise AssertionError("rendered a disabled line")

    log.info("quiet", thing=Explodes())
    log.debug("quieter", thing=Explodes())
    log.warning("loud")
    assert [line["event"] for line in _json_lines(buf)] == ["loud"]


def test_console_form() -> None:
    buf = io.StringIO()
    logs.configure("debug", "console", buf)
    logs.get_logger("bridge.cli").debug("plan_printed", actions=4)
    out = buf.getvalue()
    assert "plan_printed" in out and "actions=4" in out and "debug" in out and "bridge.cli" in out
    assert not out.lstrip().startswith("{")
    assert "\x1b[" not in out  # no colour codes when the stream is not a terminal


def test_auto_picks_json_off_a_terminal() -> None:
    buf = io.StringIO()
    logs.configure("info", "auto", buf)
    logs.get_logger("bridge.a").info("hello")
    assert _json_lines(buf)[0]["event"] == "hello"


def test_bad_level_or_format_is_refused() -> None:
    with pytest.raises(ValueError, match="level"):
        logs.configure("loud", "json", io.StringIO())
    with pytest.raises(ValueError, match="format"):
        logs.configure("info", "xml", io.StringIO())


def test_registered_secret_is_redacted_from_event_and_nested_fields() -> None:
    value = "registered-" + secrets.token_hex(12)
    logs.register_secret(value)
    buf = io.StringIO()
    logs.configure("info", "json", buf)
    logs.get_logger("bridge.t").info(
        f"saw {value}",
        plain=value,
        inside=f"prefix {value} suffix",
        nested={"a": [value, {"b": (value, 1)}]},
        sensitive=Sensitive("whatever-it-is"),
    )
    out = buf.getvalue()
    assert value not in out and "whatever-it-is" not in out
    (line,) = _json_lines(buf)
    assert line["event"] == "saw ***"
    assert line["plain"] == "***"
    assert line["inside"] == "prefix *** suffix"
    assert line["nested"] == {"a": ["***", {"b": ["***", 1]}]}
    assert line["sensitive"] == "***"


def test_register_secret_accepts_sensitive_and_ignores_short_values() -> None:
    value = "sens-" + secrets.token_hex(8)
    logs.register_secret(Sensitive(value))
    logs.register_secret("abc")  # too short: would redact ordinary words
    assert logs.redact_text(f"x {value} abc") == "x *** abc"


@pytest.mark.parametrize(
    ("text", "must_vanish"),
    [
        ("token dckr_pat_AbC-123_xyz here", "dckr_pat_AbC-123_xyz"),
        ("org token dckr_oat_ZZZ999", "dckr_oat_ZZZ999"),
        ("Authorization: Bearer eyJhbGciOi.abc.def", "eyJhbGciOi.abc.def"),
        ("vault hvs.CAESIJ3kq8Xh2bYxQ0m4Wn5rT7uV9pLsKd", "hvs.CAESIJ3kq8Xh2bYxQ0m4Wn5rT7uV9pLsKd"),
        ("legacy s.AbCdEfGhIjKlMnOpQrStUvWx", "s.AbCdEfGhIjKlMnOpQrStUvWx"),
        ("form subject_token=pat_0123456789abcdefXYZ&x=1", "pat_0123456789abcdefXYZ"),
        ('{"access_token": "opaque-value-1"}', "opaque-value-1"),
        ("jwt eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzYSJ9.c2lnbmF0dXJl", "eyJzdWIiOiJzYSJ9"),
    ],
)
def test_token_shapes_are_redacted_without_registration(text: str, must_vanish: str) -> None:
    out = logs.redact_text(text)
    assert must_vanish not in out
    assert "***" in out


def test_ordinary_text_is_left_alone() -> None:
    text = "secret/team-a/dockerhub rotated to version 12 in project 3f1c; reason=token_changed"
    assert logs.redact_text(text) == text


def test_sensitive_field_names_are_redacted_whatever_the_value_looks_like() -> None:
    buf = io.StringIO()
    logs.configure("info", "json", buf)
    logs.get_logger("bridge.t").info("login", password="hunter2", api_key="k-123", path="secret/a")
    (line,) = _json_lines(buf)
    assert line["password"] == "***" and line["api_key"] == "***" and line["path"] == "secret/a"


def test_exception_text_and_traceback_are_redacted() -> None:
    value = "exc-" + secrets.token_hex(10)
    logs.register_secret(value)
    shaped = fresh_token()
    buf = io.StringIO()
    logs.configure("info", "json", buf)
    log = logs.get_logger("bridge.t")
    try:
        raise RuntimeError(f"refused {value} and {shaped}")
    except RuntimeError:
        log.error("write_failed", exc_info=True)
        log.exception("write_failed_again")
    out = buf.getvalue()
    assert value not in out and shaped not in out
    lines = _json_lines(buf)
    assert len(lines) == 2
    for line in lines:
        assert "Traceback (most recent call last)" in str(line["exception"])
        assert "RuntimeError: refused *** and ***" in str(line["exception"])


def test_exception_as_a_field_value_is_redacted() -> None:
    shaped = fresh_token("oat")
    buf = io.StringIO()
    logs.configure("info", "json", buf)
    logs.get_logger("bridge.t").warning("failed", error=ValueError(f"bad {shaped}"))
    assert _json_lines(buf)[0]["error"] == "ValueError: bad ***"


def test_foreign_stdlib_records_share_renderer_and_redaction() -> None:
    value = "foreign-" + secrets.token_hex(10)
    logs.register_secret(value)
    shaped = fresh_token()
    buf = io.StringIO()
    logs.configure("info", "json", buf)
    foreign = logging.getLogger("hvac.adapters")
    foreign.warning("request to %s failed: %s", "https://vault", value)
    try:
        raise ConnectionError(f"reset while sending Bearer {shaped}")
    except ConnectionError:
        foreign.error("boom", exc_info=True)
    out = buf.getvalue()
    assert value not in out and shaped not in out
    first, second = _json_lines(buf)
    assert first["logger"] == "hvac.adapters" and first["level"] == "warning"
    assert first["event"] == "request to https://vault failed: ***"
    assert ISO_UTC.match(str(first["ts"]))
    assert "ConnectionError: reset while sending Bearer ***" in str(second["exception"])


def test_noisy_library_info_is_quietened() -> None:
    buf = io.StringIO()
    logs.configure("info", "json", buf)
    logging.getLogger("httpx").info("HTTP Request: GET https://api-eu.cybedefend.com/x 200")
    logging.getLogger("apscheduler.scheduler").info("Added job")
    logging.getLogger("urllib3.connectionpool").warning("retrying")
    assert [line["event"] for line in _json_lines(buf)] == ["retrying"]


def test_debug_lets_library_info_through() -> None:
    buf = io.StringIO()
    logs.configure("debug", "json", buf)
    logging.getLogger("httpx").info("HTTP Request: GET /x")
    logging.getLogger("httpcore.http11").debug("send_request_headers.started")  # wire chatter stays off
    assert [line["event"] for line in _json_lines(buf)] == ["HTTP Request: GET /x"]


def test_reconfigure_does_not_duplicate_lines_and_switches_stream() -> None:
    first, second = io.StringIO(), io.StringIO()
    logs.configure("info", "json", first)
    logs.configure("info", "json", first)
    logs.configure("info", "console", second)
    logs.get_logger("bridge.t").info("once")
    logging.getLogger("hvac").warning("foreign once")
    assert first.getvalue() == ""
    assert second.getvalue().count("once") == 2
    assert len(second.getvalue().splitlines()) == 2
    ours = [h for h in logging.getLogger().handlers if h.__class__.__name__ == "_BridgeHandler"]
    assert len(ours) == 1


def test_caplog_sees_only_redacted_values(caplog: pytest.LogCaptureFixture) -> None:
    # Handlers we did not install (pytest's, a library's) get the record after redaction.
    shaped = fresh_token()
    with caplog.at_level(logging.INFO):
        logs.get_logger("bridge.t").info("leak?", value=shaped, note=f"x {shaped}")
    assert caplog.records, "the record reached the capture handler"
    assert shaped not in caplog.text


def test_bind_adds_fields() -> None:
    buf = io.StringIO()
    logs.configure("info", "json", buf)
    log = logs.get_logger("bridge.t").bind(pass_id="p1")
    log.info("a", n=1)
    (line,) = _json_lines(buf)
    assert line["pass_id"] == "p1" and line["n"] == 1


def test_threads_log_whole_lines() -> None:
    buf = io.StringIO()
    logs.configure("info", "json", buf)
    log = logs.get_logger("bridge.t")

    def work(i: int) -> None:
        for j in range(50):
            log.info("tick", thread=i, j=j)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = _json_lines(buf)  # json.loads fails on an interleaved line
    assert len(lines) == 400
    assert {(line["thread"], line["j"]) for line in lines} == {(i, j) for i in range(8) for j in range(50)}


def test_registry_forgets_the_oldest_past_its_limit() -> None:
    reg = logs.SecretRegistry(limit=2)
    reg.add("first-secret")
    reg.add("second-secret")
    reg.add("third-secret")
    assert len(reg) == 2
    assert reg.redact("first-secret second-secret third-secret") == "first-secret *** ***"


def test_fields_named_like_the_line_keys_do_not_overwrite_them() -> None:
    buf = io.StringIO()
    logs.configure("info", "json", buf)
    logs.get_logger("bridge.t").info("a", level="custom", logger="other", ts="then")
    (line,) = _json_lines(buf)
    assert (line["level"], line["logger"]) == ("info", "bridge.t")
    assert (line["level_"], line["logger_"], line["ts_"]) == ("custom", "other", "then")


def test_pinned_secrets_are_never_forgotten_however_many_values_pass() -> None:
    reg = logs.SecretRegistry(limit=100)
    reg.add("long-lived-pat-value", pinned=True)
    for i in range(5000):
        reg.add(f"rotated-value-{i:05d}")
    assert len(reg) == 101  # the pinned one does not count against the limit
    text = reg.redact("long-lived-pat-value rotated-value-00000 rotated-value-04999")
    assert text == "*** rotated-value-00000 ***"  # the oldest rotating value is forgotten, the pin is not


def test_the_long_lived_secrets_are_registered_pinned(tmp_path: Path) -> None:
    from bridge.app import _read_token_file
    from bridge.cybedefend.auth import read_credential_file

    base = tmp_path
    pat, webhook = f"cdp_pinned_{secrets.token_hex(12)}", f"wh_pinned_{secrets.token_hex(12)}"
    (base / "pat").write_text(pat)
    (base / "webhook").write_text(webhook)
    read_credential_file(base / "pat")
    _read_token_file(base / "webhook", "server.webhook_token_file")
    for _ in range(logs.MAX_REGISTERED_SECRETS + 500):  # a long-running daemon's rotated values
        logs.register_secret(f"rotated-{secrets.token_hex(10)}")
    assert logs.redact_text(f"pat={pat} webhook {webhook}") == "pat=*** webhook ***"
    # The limit still applies to the rest (else the test above could pass by keeping everything).
    assert len(logs._REGISTRY) < logs.MAX_REGISTERED_SECRETS + 500


def test_stored_reasons_keep_the_words_that_describe_a_shape() -> None:
    from bridge.ledger import scrub_reason

    words = "the token does not look like a DockerHub token (expected dckr_pat_… or dckr_oat_…)"
    assert scrub_reason(words) == words
    value = "dckr_pat_" + secrets.token_hex(8)
    assert scrub_reason(f"bad token {value[:14]}… in the reason") == "bad token ***… in the reason"
