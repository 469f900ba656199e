"""Audit line sources: forwarded bodies, the file tailer (real files), the socket listener (real OpenBao)."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bridge.config import SourceSettings
from bridge.daemon.audit import LineSplitter, decode_audit_line, parse_ingest_body
from bridge.daemon.audit_file import AuditFileTailer
from bridge.daemon.audit_socket import AuditSocketListener
from bridge.daemon.triggers import AuditMatcher, TriggerQueue, line_handler
from bridge.errors import ConfigError, IngestRejected
from bridge.metrics import Metrics
from tests.support.openbao import OpenBao
from tests.support.procs import eventually

FIXTURE = Path(__file__).parent / "data" / "audit" / "openbao-file.jsonl"
REAL = FIXTURE.read_bytes().splitlines()


# --- forwarded bodies --------------------------------------------------------------------------


def test_ingest_ndjson_and_arrays() -> None:
    body = b"\n".join(REAL[:5]) + b"\r\n\n"
    assert parse_ingest_body(body, 10) == [ln.strip() for ln in REAL[:5]]
    objs = [json.loads(ln) for ln in REAL[:5]]
    arr = parse_ingest_body(json.dumps(objs).encode(), 10)
    assert [json.loads(x) for x in arr] == objs
    assert parse_ingest_body(json.dumps(["a", {"b": 1}, 3]).encode(), 10) == [b"a", b'{"b":1}']
    assert parse_ingest_body(b"  \n ", 10) == []


def test_ingest_bounds_and_bad_arrays() -> None:
    with pytest.raises(IngestRejected) as exc:
        parse_ingest_body(b"{}\n" * 11, 10)
    assert exc.value.too_large
    with pytest.raises(IngestRejected) as exc:
        parse_ingest_body(json.dumps([{}] * 11).encode(), 10)
    assert exc.value.too_large
    with pytest.raises(IngestRejected) as exc:
        parse_ingest_body(b"[{,", 10)
    assert not exc.value.too_large


def test_fluent_bit_array_of_real_lines_matches() -> None:
    # Fluent Bit's `json` format: an array of records, each the parsed audit entry plus "date"
    records = [{**json.loads(ln), "date": 1.5} for ln in REAL]
    m = AuditMatcher([SourceSettings(mount="secret", path="dockerhub")], {"secret": 2})
    keys = {k for ln in parse_ingest_body(json.dumps(records).encode(), 1000) for k in m.match(ln)}
    assert keys == {"secret/dockerhub/team-a", "secret/dockerhub/nested/deep/team-b"}


def test_decode_audit_line_shapes() -> None:
    assert decode_audit_line(REAL[0]) == json.loads(REAL[0])
    assert decode_audit_line(b"2026-01-01 host vault: " + REAL[0]) == json.loads(REAL[0])
    assert decode_audit_line(b"[]") is None and decode_audit_line(b"nothing") is None
    assert decode_audit_line(REAL[0], max_bytes=10) is None


def test_line_splitter_partial_oversized_and_failing_callback() -> None:
    got: list[bytes] = []

    def on_line(b: bytes) -> None:
        if b == b"boom":
            raise RuntimeError("handler bug")
        got.append(b)

    s = LineSplitter(on_line, max_line_bytes=16)
    s.feed(b"one\ntw")
    s.feed(b"o\n\n")
    s.feed(b"x" * 10)
    s.feed(b"y" * 10)  # 20 bytes without a newline: dropped up to the next newline
    s.feed(b"zz\nboom\nthree\n")
    s.feed(b"a" * 17 + b"\nfour\n")  # oversized in a single chunk
    assert got == [b"one", b"two", b"three", b"four"]
    assert s.oversized == 2


# --- file tailer -------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make_tailer(path: Path, got: list[bytes], clock: Clock | None = None) -> AuditFileTailer:
    return AuditFileTailer(
        path, got.append, poll_seconds=0.01, stop=threading.Event(), clock=clock or Clock(), rotate_grace_seconds=0.5
    )


def append(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


def test_tailer_starts_at_the_end_and_follows_appends_and_partial_lines(tmp_path: Path) -> None:
    log_file = tmp_path / "audit.log"
    log_file.write_bytes(b"old1\nold2\npartial-old")
    got: list[bytes] = []
    t = make_tailer(log_file, got)
    t.poll_once()
    t.poll_once()
    assert got == []  # no replay of what was there before the start
    append(log_file, b"-rest\nnew1\n")
    t.poll_once()
    assert got == [b"new1"]  # the end of a line begun before the start is not a whole entry
    got.clear()
    append(log_file, b'{"half":')
    t.poll_once()
    assert got == []
    append(log_file, b" 1}\n")
    t.poll_once()
    assert got == [b'{"half": 1}']
    t.close()


def test_tailer_rename_rotation_drains_the_old_file_first(tmp_path: Path) -> None:
    log_file = tmp_path / "audit.log"
    log_file.write_bytes(b"")
    got: list[bytes] = []
    clock = Clock()
    t = make_tailer(log_file, got, clock)
    t.poll_once()
    with open(log_file, "ab", buffering=0) as writer:  # Vault keeps its handle until SIGHUP
        writer.write(b"a1\n")
        t.poll_once()
        os.rename(log_file, tmp_path / "audit.log.1")
        writer.write(b"a2\n")  # still written to the renamed file
        log_file.write_bytes(b"b1\n")  # the new file after the writer reopened
        t.poll_once()
        assert got == [b"a1", b"a2"]
        writer.write(b"a3\n")
        clock.now += 0.3
        t.poll_once()
        assert got == [b"a1", b"a2", b"a3"]  # the old file is still being written: stay on it
        clock.now += 0.3
        t.poll_once()
        assert got == [b"a1", b"a2", b"a3"]  # quiet for 0.3 s only
        clock.now += 0.3
        t.poll_once()  # quiet long enough: switch, and read the new file from its start
        t.poll_once()
        assert got == [b"a1", b"a2", b"a3", b"b1"]
        append(log_file, b"b2\n")
        t.poll_once()
        assert got[-1] == b"b2"
    t.close()


def test_tailer_copytruncate_rotation(tmp_path: Path) -> None:
    log_file = tmp_path / "audit.log"
    log_file.write_bytes(b"x" * 100 + b"\n")
    got: list[bytes] = []
    t = make_tailer(log_file, got)
    t.poll_once()
    append(log_file, b"before\n")
    t.poll_once()
    assert got == [b"before"]
    with open(log_file, "r+b") as f:  # logrotate copytruncate
        f.truncate(0)
    append(log_file, b"after\n")
    t.poll_once()
    t.poll_once()
    assert got == [b"before", b"after"]
    t.close()


def test_tailer_waits_for_the_file_and_reads_it_from_the_start(tmp_path: Path) -> None:
    log_file = tmp_path / "later" / "audit.log"
    got: list[bytes] = []
    t = make_tailer(log_file, got)
    for _ in range(3):
        assert t.poll_once() is False
    log_file.parent.mkdir()
    log_file.write_bytes(b"first\nsecond\n")
    t.poll_once()
    t.poll_once()
    assert got == [b"first", b"second"]
    log_file.unlink()  # gone and not recreated: keep the old handle, do not fail
    for _ in range(3):
        t.poll_once()
    assert got == [b"first", b"second"]
    t.close()


def test_polling_tailer_thread_stops_promptly_and_does_not_busy_loop(tmp_path: Path) -> None:
    log_file = tmp_path / "audit.log"
    log_file.write_bytes(b"")
    got: list[bytes] = []
    sleeps: list[float] = []
    stop = threading.Event()

    def sleep(s: float) -> None:
        sleeps.append(s)
        stop.wait(s)

    t = AuditFileTailer(log_file, got.append, poll_seconds=0.05, stop=stop, sleep=sleep, watch="poll")
    started = time.monotonic()
    t.start()
    time.sleep(0.1)
    append(log_file, b"live\n")
    deadline = time.monotonic() + 3
    while not got and time.monotonic() < deadline:
        time.sleep(0.01)
    polls = len(sleeps)
    assert eventually(lambda: len(sleeps) >= polls + 5, timeout=3)  # five more polls, nothing more to deliver
    t0 = time.monotonic()
    stop.set()
    t.join(2)
    assert got == [b"live"]
    assert time.monotonic() - t0 < 0.5
    ran = time.monotonic() - started
    assert 3 <= len(sleeps) <= ran / 0.05 + 3  # one sleep per poll interval: sleeping, not spinning
    assert all(s == 0.05 for s in sleeps)


@pytest.mark.integration
def test_tailer_on_a_real_openbao_file_device(openbao_factory: Callable[..., OpenBao], tmp_path: Path) -> None:
    audit_log = tmp_path / "audit.log"
    bao = openbao_factory(audit_log=audit_log)
    bao.write_secret("secret", "dockerhub/before", {"accessToken": "dckr_pat_BEFORESTARTVALUE"})
    q = TriggerQueue(0.05, 100, Metrics())
    matcher = AuditMatcher([SourceSettings(mount="secret", path="dockerhub")], {"secret": 2})
    stop = threading.Event()
    t = AuditFileTailer(audit_log, line_handler(matcher, q, "audit_file"), poll_seconds=0.05, stop=stop)
    t.start()
    try:
        time.sleep(0.2)
        bao.write_secret("secret", "dockerhub/live", {"accessToken": "dckr_pat_LIVEWRITEVALUE"})
        bao.write_secret("secret", "elsewhere/x", {"accessToken": "dckr_pat_ELSEWHEREVALUE"})
        req = q.take(5)
        assert req is not None and req.paths == frozenset({"secret/dockerhub/live"})  # not `before`
        assert req.trigger == "audit_file"
        assert q.take(0.3) is None
    finally:
        stop.set()
        t.join(2)
    assert b"LIVEWRITEVALUE" not in audit_log.read_bytes()  # Vault HMACs values


# --- socket listener ---------------------------------------------------------------------------


@pytest.fixture
def stop() -> Iterator[threading.Event]:
    ev = threading.Event()
    yield ev
    ev.set()


def socket_config(port: int) -> str:
    return f'audit "socket" "s" {{\n  options {{\n    address = "127.0.0.1:{port}"\n    socket_type = "tcp"\n  }}\n}}\n'


@pytest.mark.integration
def test_socket_listener_with_a_real_openbao_socket_device(
    openbao_factory: Callable[..., OpenBao], stop: threading.Event
) -> None:
    m = Metrics()
    q = TriggerQueue(0.05, 100, m)
    matcher = AuditMatcher(
        [SourceSettings(mount="secret", path="dockerhub"), SourceSettings(mount="kv1", kv_version=1)], {"secret": 2}
    )
    lines: list[bytes] = []
    handle = line_handler(matcher, q, "audit_socket")

    def on_line(b: bytes) -> None:
        lines.append(b)
        handle(b)

    listener = AuditSocketListener("127.0.0.1", 0, ["127.0.0.0/8"], on_line, stop, metrics=m)
    listener.start()  # must be listening before the server starts, or it refuses to start
    try:
        bao = openbao_factory(extra_config=socket_config(listener.port))
        bao.write_secret("secret", "dockerhub/sock-a", {"accessToken": "dckr_pat_SOCKETVALUE1"})
        bao.set_metadata("secret", "dockerhub/sock-a", {"cybedefend-project-id": "p"})
        bao.enable_kv("kv1", 1)
        bao.write_kv1("kv1", "team/b", {"accessToken": "dckr_pat_SOCKETVALUE2"})
        bao.client().secrets.kv.v2.read_secret_version(
            path="dockerhub/sock-a", mount_point="secret", raise_on_deleted_version=True
        )
        seen: set[str] = set()
        deadline = time.monotonic() + 5
        while seen != {"secret/dockerhub/sock-a", "kv1/team/b"} and time.monotonic() < deadline:
            req = q.take(0.5)
            if req is not None and req.paths:
                seen |= req.paths
        assert seen == {"secret/dockerhub/sock-a", "kv1/team/b"}
        assert all(decode_audit_line(b) is not None for b in lines)  # every line was a whole entry
        assert not any(b"SOCKETVALUE" in b for b in lines)
        assert listener.refused == 0
    finally:
        listener.close()


def test_socket_listener_refuses_peers_outside_the_allow_list(
    stop: threading.Event, caplog: pytest.LogCaptureFixture
) -> None:
    m = Metrics()
    got: list[bytes] = []
    listener = AuditSocketListener("127.0.0.1", 0, ["10.0.0.0/8", "::1/128"], got.append, stop, metrics=m)
    listener.start()
    caplog.set_level(logging.WARNING, logger="bridge")
    try:
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", listener.port), timeout=2) as c:
                try:
                    c.sendall(REAL[0] + b"\n")
                    data = c.recv(10)  # closed by the listener: EOF (or a reset)
                except ConnectionError:
                    data = b""
                assert data == b""
        deadline = time.monotonic() + 2
        while listener.refused < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert got == []
        assert listener.refused == 3
        assert m.registry.get_sample_value("cybedefend_bridge_audit_connections_refused_total") == 3
        refusals = [r for r in caplog.records if "audit_socket_refused" in r.getMessage()]
        assert len(refusals) == 1  # logged once per peer, counted every time
    finally:
        listener.close()


def test_socket_listener_splits_lines_across_packets_and_stops(stop: threading.Event) -> None:
    got: list[bytes] = []
    listener = AuditSocketListener("127.0.0.1", 0, ["127.0.0.1/32"], got.append, stop, max_line_bytes=64)
    listener.start()
    with socket.create_connection(("127.0.0.1", listener.port), timeout=2) as c:
        c.sendall(b'{"a":')
        time.sleep(0.05)
        c.sendall(b"1}\n" + b"z" * 100 + b"\n" + b'{"b":2}\n')
        deadline = time.monotonic() + 2
        while len(got) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert got == [b'{"a":1}', b'{"b":2}']  # the oversized line is dropped
        t0 = time.monotonic()
        stop.set()
        listener.close()
        assert time.monotonic() - t0 < 1.5  # the open connection did not hold the stop up


def test_socket_listener_rejects_bad_cidrs(stop: threading.Event) -> None:
    with pytest.raises(ConfigError) as exc:
        AuditSocketListener("127.0.0.1", 0, ["not-a-cidr"], lambda b: None, stop)
    assert exc.value.key == "triggers.audit_socket.allowed_peers"


def test_line_contents_never_reach_the_logs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # An audit device with log_raw=true writes values in clear; the bridge must not echo a line.
    clear = "RAWAUDITVALUE0123456789"
    entry = json.loads(REAL[4])
    entry["request"]["data"] = {"data": {"accessToken": clear}}
    raw = json.dumps(entry).encode()

    def failing(b: bytes) -> None:
        raise RuntimeError(b.decode())  # a handler bug whose message carries the line

    caplog.set_level(logging.DEBUG, logger="bridge")
    log_file = tmp_path / "audit.log"
    log_file.write_bytes(b"")
    t = AuditFileTailer(log_file, failing, poll_seconds=0.01, stop=threading.Event(), max_line_bytes=len(raw) + 10)
    t.poll_once()
    append(log_file, raw + b"\n" + raw + raw + b"\n")  # one line handled, one oversized
    t.poll_once()
    t.close()
    assert any("audit_line_handler_failed" in r.getMessage() for r in caplog.records)
    assert clear not in caplog.text
