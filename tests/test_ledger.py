"""bridge.ledger.SqliteLedger: round trips, durability, concurrency, migrations, file modes, errors."""

from __future__ import annotations

import dataclasses
import os
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from bridge.engine.sync import failing_rows
from bridge.errors import LedgerError
from bridge.ledger import SCHEMA_VERSION, SqliteLedger
from bridge.model import State
from bridge.ports import Ledger, LedgerRecord, PendingDelete

REPO = Path(__file__).resolve().parent.parent


class FakeClock:
    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def full_record(key: str = "secret/team/a", **changes: object) -> LedgerRecord:
    mount, _, path = key.partition("/")
    rec = LedgerRecord(
        key=key,
        mount=mount,
        path=path,
        kv_version=2,
        state=State.FAILED,
        version=7,
        fingerprint="ab" * 32,
        organization_id="11111111-1111-4111-8111-111111111111",
        project_id="22222222-2222-4222-8222-222222222222",
        credential_id="cred-42",
        last_action="rotate",
        last_result="failed",
        reason="HTTP 503 create: upstream unavailable",
        attempts=3,
        next_attempt_at=1_234.5,
        created_at=100.25,
        updated_at=200.75,
        registered_at=150.5,
        seen_version=8,
        tags_digest="0123456789abcdef",
        seen_stamp="2026-01-01T00:00:00Z",
    )
    return dataclasses.replace(rec, **changes)  # type: ignore[arg-type]


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[SqliteLedger]:
    led = SqliteLedger(tmp_path / "state" / "ledger.sqlite3", clock=FakeClock())
    yield led
    led.close()


def test_implements_the_port(ledger: SqliteLedger) -> None:
    port: Ledger = ledger  # mypy checks the structural match
    assert port.get("nope") is None


def test_round_trip_of_every_field(ledger: SqliteLedger) -> None:
    rec = full_record()
    # Every field of the port's record differs from its default, so a field the ledger forgets
    # (e.g. one added to bridge.ports without a migration) comes back wrong.
    defaults = LedgerRecord(key="", mount="", path="", kv_version=0, state=State.PENDING)
    unset = [f.name for f in dataclasses.fields(LedgerRecord) if getattr(rec, f.name) == getattr(defaults, f.name)]
    assert unset == [], f"full_record() leaves {unset} at their defaults"
    ledger.put(rec)
    got = ledger.get(rec.key)
    assert got == rec
    assert got is not None and got.state is State.FAILED and got.ref.key == rec.key
    # None everywhere that allows it, too
    bare = LedgerRecord(key="kv1/x", mount="kv1", path="x", kv_version=1, state=State.PENDING, created_at=1, updated_at=2)
    ledger.put(bare)
    assert ledger.get("kv1/x") == bare
    assert ledger.all() == [bare, rec]  # ordered by key


def test_unsettled_holds_every_row_a_pass_report_names_and_no_settled_one(ledger: SqliteLedger) -> None:
    now = 1_000.0
    rows = {
        "s/failed": full_record("s/failed", state=State.FAILED, next_attempt_at=None),
        "s/rejected": full_record("s/rejected", state=State.REJECTED, next_attempt_at=None),
        "s/pending": full_record("s/pending", state=State.PENDING, next_attempt_at=now - 1),
        "s/backoff": full_record("s/backoff", state=State.REGISTERED, next_attempt_at=now + 60),
        "s/ok": full_record("s/ok", state=State.REGISTERED, next_attempt_at=None),
        "s/ok-past": full_record("s/ok-past", state=State.REGISTERED, next_attempt_at=now - 60),
        "s/retired": full_record("s/retired", state=State.RETIRED, next_attempt_at=now + 60),
        "s/orphaned": full_record("s/orphaned", state=State.ORPHANED, next_attempt_at=now + 60),
        "s/missing": full_record("s/missing", state=State.MISSING, next_attempt_at=None),
    }
    for rec in rows.values():
        ledger.put(rec)
    unsettled = ledger.unsettled(now)
    assert [r.key for r in unsettled] == ["s/backoff", "s/failed", "s/pending", "s/rejected"]
    # The pass report reads these instead of every row, and must name the same secrets.
    assert failing_rows(unsettled, now) == failing_rows(ledger.all(), now)
    assert all(r == rows[r.key] for r in unsettled)


def test_rows_read_together_are_equal_to_what_was_put(ledger: SqliteLedger) -> None:
    # all() hands out one string object per repeated value of a column; the records are unchanged.
    recs = [full_record(f"secret/team/{i:03d}", credential_id=f"cred-{i}", reason=f"why {i % 3}") for i in range(50)]
    for rec in recs:
        ledger.put(rec)
    assert ledger.all() == recs
    assert ledger.all()[0].state is State.FAILED


def test_put_is_an_upsert_and_keeps_created_at(tmp_path: Path) -> None:
    clock = FakeClock(10.0)
    with SqliteLedger(tmp_path / "l.db", clock=clock) as led:
        led.put(full_record(created_at=0.0, updated_at=0.0))
        first = led.get("secret/team/a")
        assert first is not None and first.created_at == 10.0 and first.updated_at == 10.0
        clock.now = 20.0
        led.put(full_record(created_at=0.0, updated_at=0.0, state=State.REGISTERED, attempts=0))
        second = led.get("secret/team/a")
        assert second is not None
        assert (second.created_at, second.updated_at, second.state, second.attempts) == (10.0, 20.0, State.REGISTERED, 0)
        assert len(led.all()) == 1


def test_remove(ledger: SqliteLedger) -> None:
    ledger.put(full_record())
    ledger.remove("secret/team/a")
    ledger.remove("secret/team/a")  # removing what is gone is not an error
    assert ledger.get("secret/team/a") is None


def test_durable_across_close_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    with SqliteLedger(path) as led:
        led.put(full_record())
        led.add_pending_delete(PendingDelete("old-cred", "org", "secret/team/a", "superseded"))
        led.set_meta("key_id", "k1")
    with SqliteLedger(path) as led:
        assert led.get("secret/team/a") == full_record()
        assert [p.credential_id for p in led.pending_deletes()] == ["old-cred"]
        assert led.get_meta("key_id") == "k1"


def test_put_is_durable_when_it_returns_even_if_the_process_dies(tmp_path: Path) -> None:
    # The child writes and then exits without close(), atexit or flushing: a crash after put().
    path = tmp_path / "crash.db"
    code = textwrap.dedent(
        f"""
        import os
        from bridge.ledger import SqliteLedger
        from bridge.model import State
        from bridge.ports import LedgerRecord
        led = SqliteLedger({str(path)!r})
        led.put(LedgerRecord(key="secret/a", mount="secret", path="a", kv_version=2,
                             state=State.REGISTERED, version=3, credential_id="c-1"))
        os._exit(0)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)
    with SqliteLedger(path) as led:
        got = led.get("secret/a")
    assert got is not None and got.version == 3 and got.credential_id == "c-1"


def test_journal_is_wal_and_sync_is_full(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    with SqliteLedger(path) as led:
        led.put(full_record())
        conn = sqlite3.connect(path)
        try:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        finally:
            conn.close()
        assert led._db().execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL: durable across process crashes in WAL mode


def test_concurrent_puts_from_threads(ledger: SqliteLedger) -> None:
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(40):
                ledger.put(full_record(f"secret/t{t}/s{i:02d}", attempts=i))
                assert ledger.get(f"secret/t{t}/s{i:02d}") is not None
        except BaseException as exc:  # surfaced below; a thread's exception is otherwise lost
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    rows = ledger.all()
    assert len(rows) == 8 * 40
    assert {(r.key, r.attempts) for r in rows} == {(f"secret/t{t}/s{i:02d}", i) for t in range(8) for i in range(40)}


def test_pending_delete_round_trip_of_every_field(ledger: SqliteLedger) -> None:
    item = PendingDelete("cred-9", "org-9", "secret/z", "superseded", attempts=4, next_attempt_at=12.5)
    defaults = PendingDelete("", "", "", "")
    assert [f.name for f in dataclasses.fields(PendingDelete) if getattr(item, f.name) == getattr(defaults, f.name)] == []
    ledger.add_pending_delete(item)
    assert ledger.pending_deletes() == [item]


def test_pending_deletes_lifecycle(ledger: SqliteLedger) -> None:
    first = PendingDelete("cred-1", "org-1", "secret/a", "superseded by rotation")
    ledger.add_pending_delete(first)
    ledger.add_pending_delete(PendingDelete("cred-2", "org-1", "secret/b", "retired"))
    assert ledger.pending_deletes() == [first, PendingDelete("cred-2", "org-1", "secret/b", "retired")]
    # adding again keeps the existing backoff state
    retried = dataclasses.replace(first, attempts=2, next_attempt_at=99.0, reason="HTTP 503")
    ledger.update_pending_delete(retried)
    ledger.add_pending_delete(first)
    assert ledger.pending_deletes()[0] == retried
    ledger.remove_pending_delete("cred-1")
    ledger.remove_pending_delete("cred-1")
    assert [p.credential_id for p in ledger.pending_deletes()] == ["cred-2"]


def test_meta(ledger: SqliteLedger) -> None:
    assert ledger.get_meta("instance") is None
    ledger.set_meta("instance", "prod")
    ledger.set_meta("instance", "prod-2")
    assert ledger.get_meta("instance") == "prod-2"


def test_counts_by_state_and_prune(tmp_path: Path) -> None:
    with SqliteLedger(":memory:") as led:
        led.put(full_record("secret/a", state=State.RETIRED, updated_at=10.0))
        led.put(full_record("secret/b", state=State.RETIRED, updated_at=500.0))
        led.put(full_record("secret/c", state=State.REGISTERED, updated_at=10.0))
        counts = led.counts_by_state()
        assert counts["retired"] == 2 and counts["registered"] == 1 and counts["pending"] == 0
        assert set(counts) == {s.value for s in State}
        assert led.prune(older_than=100.0) == 1
        assert [r.key for r in led.all()] == ["secret/b", "secret/c"]  # only old RETIRED rows go


def test_memory_ledger_works_and_is_private(tmp_path: Path) -> None:
    a = SqliteLedger(":memory:")
    b = SqliteLedger(":memory:")
    a.put(full_record())
    assert a.get("secret/team/a") == full_record()
    assert b.get("secret/team/a") is None
    assert a.path == ":memory:" and a.schema_version() == SCHEMA_VERSION
    a.close()
    b.close()


def test_reason_carrying_a_token_is_scrubbed(ledger: SqliteLedger) -> None:
    token = "dckr_pat_" + "Zq9" * 10
    ledger.put(full_record(reason=f"CybeDefend said: invalid token {token}"))
    got = ledger.get("secret/team/a")
    assert got is not None and got.reason == "CybeDefend said: invalid token ***"
    ledger.add_pending_delete(PendingDelete("c9", "o", "secret/team/a", f"x dckr_oat_{'Q' * 20}"))
    assert ledger.pending_deletes()[0].reason == "x ***"
    raw = Path(ledger.path).read_bytes() + Path(ledger.path + "-wal").read_bytes()
    assert b"dckr_pat_" not in raw and b"dckr_oat_" not in raw


def test_token_in_an_identifier_is_refused_without_echoing_it(ledger: SqliteLedger) -> None:
    token = "dckr_pat_" + "Xy7" * 10
    with pytest.raises(LedgerError) as info:
        ledger.put(full_record(fingerprint=token))
    assert token not in str(info.value) and "fingerprint" in str(info.value)
    with pytest.raises(LedgerError):
        ledger.set_meta("oops", token)
    assert ledger.get("secret/team/a") is None


def test_files_are_private(tmp_path: Path) -> None:
    old = os.umask(0o022)  # a permissive umask must not matter
    try:
        parent = tmp_path / "new-dir"
        with SqliteLedger(parent / "l.db") as led:
            led.put(full_record())  # the WAL and shared-memory files exist while open
            files = [parent / "l.db", parent / "l.db-wal", parent / "l.db-shm"]
            for f in files:
                assert f.exists(), f
                assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
            assert stat.S_IMODE(parent.stat().st_mode) == 0o700
    finally:
        os.umask(old)


def test_existing_loose_files_are_tightened(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    with SqliteLedger(path) as led:
        led.put(full_record())
    path.chmod(0o644)
    wal = Path(f"{path}-wal")
    wal.touch()
    wal.chmod(0o644)
    with SqliteLedger(path) as led:
        assert led.get("secret/team/a") == full_record()
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(wal.stat().st_mode) == 0o600


def test_ledger_error_on_unusable_paths(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(LedgerError, match="a-file") as info:
        SqliteLedger(blocker / "ledger.db")
    assert "cannot create" in str(info.value)

    a_dir = tmp_path / "dir.db"
    a_dir.mkdir()
    with pytest.raises(LedgerError, match=r"dir\.db"):
        SqliteLedger(a_dir)

    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(LedgerError, match=r"garbage\.db.*failed"):
        SqliteLedger(garbage)


def test_use_after_close_is_a_ledger_error(tmp_path: Path) -> None:
    led = SqliteLedger(tmp_path / "l.db")
    led.close()
    led.close()  # idempotent
    with pytest.raises(LedgerError, match="after close"):
        led.get("x")


V1_SCHEMA = """
CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at REAL NOT NULL);
CREATE TABLE secrets (
    key TEXT PRIMARY KEY, mount TEXT NOT NULL, path TEXT NOT NULL, kv_version INTEGER NOT NULL,
    state TEXT NOT NULL, version INTEGER, fingerprint TEXT, organization_id TEXT, project_id TEXT,
    credential_id TEXT, last_action TEXT, last_result TEXT, reason TEXT,
    attempts INTEGER NOT NULL DEFAULT 0, next_attempt_at REAL,
    created_at REAL NOT NULL, updated_at REAL NOT NULL);
CREATE INDEX secrets_state ON secrets (state);
CREATE TABLE pending_deletes (
    credential_id TEXT PRIMARY KEY, organization_id TEXT NOT NULL, key TEXT NOT NULL,
    reason TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, next_attempt_at REAL,
    created_at REAL NOT NULL);
CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO schema_version VALUES (1, 5.0);
INSERT INTO secrets (key, mount, path, kv_version, state, version, credential_id, created_at, updated_at)
    VALUES ('secret/a', 'secret', 'a', 2, 'registered', 4, 'cred-a', 1.0, 42.0);
INSERT INTO secrets (key, mount, path, kv_version, state, created_at, updated_at)
    VALUES ('secret/b', 'secret', 'b', 2, 'pending', 1.0, 43.0);
INSERT INTO pending_deletes VALUES ('cred-old', 'org', 'secret/a', 'superseded', 1, NULL, 2.0);
INSERT INTO meta VALUES ('instance', 'prod');
"""


def test_upgrade_from_a_v1_file(tmp_path: Path) -> None:
    path = tmp_path / "v1.db"
    conn = sqlite3.connect(path)
    conn.executescript(V1_SCHEMA)
    conn.close()

    with SqliteLedger(path, clock=FakeClock(77.0)) as led:
        assert led.schema_version() == SCHEMA_VERSION == 6
        a, b = led.get("secret/a"), led.get("secret/b")
        assert a is not None and (a.state, a.version, a.credential_id) == (State.REGISTERED, 4, "cred-a")
        assert a.registered_at == 42.0  # migration 2 backfills registered rows from updated_at
        assert a.seen_version == 4  # migration 3 starts from the registered version
        assert b is not None and b.registered_at is None and b.seen_version is None
        assert led.pending_deletes() == [PendingDelete("cred-old", "org", "secret/a", "superseded", 1, None)]
        assert led.get_meta("instance") == "prod"
        led.put(dataclasses.replace(a, registered_at=50.0))
        assert (led.get("secret/a") or a).registered_at == 50.0

    conn = sqlite3.connect(path)
    try:
        versions = conn.execute("SELECT version, applied_at FROM schema_version ORDER BY version").fetchall()
    finally:
        conn.close()
    assert versions == [(1, 5.0), (2, 77.0), (3, 77.0), (4, 77.0), (5, 77.0), (6, 77.0)]
    with SqliteLedger(path) as led:  # reopening applies nothing more
        assert led.schema_version() == 6


def test_a_file_from_a_newer_bridge_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "future.db"
    with SqliteLedger(path) as led:
        led.put(full_record())
    conn = sqlite3.connect(path)
    conn.execute("INSERT INTO schema_version VALUES (?, 0)", (SCHEMA_VERSION + 1,))
    conn.commit()
    conn.close()
    with pytest.raises(LedgerError, match="newer bridge"):
        SqliteLedger(path)


def test_failed_migration_rolls_back(tmp_path: Path) -> None:
    # A v1 file whose secrets table already has the v2 column: migration 2's ALTER fails,
    # and the version must stay 1 rather than half-applied.
    path = tmp_path / "odd.db"
    conn = sqlite3.connect(path)
    conn.executescript(V1_SCHEMA + "ALTER TABLE secrets ADD COLUMN registered_at REAL;")
    conn.close()
    with pytest.raises(LedgerError, match="schema version 2"):
        SqliteLedger(path)
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("SELECT MAX(version) FROM schema_version").fetchone()[0] == 1
    finally:
        conn.close()


# ---- group commit (ADR 11) ----------------------------------------------------------------------


def registered(key: str) -> LedgerRecord:
    return full_record(key, state=State.REGISTERED)


def _on_disk(path: Path) -> dict[str, str]:
    """key -> state as another process sees the file (committed rows only)."""
    conn = sqlite3.connect(path)
    try:
        return dict(conn.execute("SELECT key, state FROM secrets").fetchall())
    finally:
        conn.close()


class FakeMono:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_staged_rows_are_read_back_at_once_and_reach_the_file_at_the_next_durable_write(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    with SqliteLedger(path, batch_rows=100, batch_seconds=3600) as led:
        led.put(full_record("secret/a", state=State.PENDING))
        led.put(registered("secret/a"), durable=False)
        led.put(registered("secret/b"), durable=False)
        assert led.staged() == 2
        got = led.get("secret/a")
        assert got is not None and got.state == State.REGISTERED  # this ledger reads what it staged
        assert _on_disk(path) == {"secret/a": "pending"}  # nobody else does yet
        led.add_pending_delete(PendingDelete("cred-0", "org", "secret/a", "superseded"))  # a durable write
        assert led.staged() == 0
        assert _on_disk(path) == {"secret/a": "registered", "secret/b": "registered"}


def test_staged_rows_are_committed_at_the_row_bound_or_the_time_bound(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    mono = FakeMono()
    with SqliteLedger(path, batch_rows=3, batch_seconds=0.2, monotonic=mono) as led:
        for i in range(3):
            led.put(registered(f"secret/r{i}"), durable=False)
        assert led.staged() == 0 and len(_on_disk(path)) == 3  # three rows: one commit
        commits = led.commits
        led.put(registered("secret/t0"), durable=False)
        mono.now += 0.1
        led.put(registered("secret/t1"), durable=False)
        assert led.staged() == 2 and "secret/t1" not in _on_disk(path)
        mono.now += 0.15  # 0.25 s since the first staged row
        led.put(registered("secret/t2"), durable=False)
        assert led.staged() == 0 and {"secret/t0", "secret/t1", "secret/t2"} <= set(_on_disk(path))
        assert led.commits == commits + 1


def test_a_crash_loses_only_the_staged_suffix(tmp_path: Path) -> None:
    """Commits are in write order: what the file keeps is a prefix of the writes."""
    path = tmp_path / "l.db"
    code = textwrap.dedent(
        f"""
        import os
        from bridge.ledger import SqliteLedger
        from bridge.model import State
        from bridge.ports import LedgerRecord
        def rec(key, state):
            return LedgerRecord(key=key, mount="secret", path=key[7:], kv_version=2, state=state)
        led = SqliteLedger({str(path)!r}, batch_rows=100, batch_seconds=3600)
        led.put(rec("secret/a", State.PENDING))
        led.put(rec("secret/a", State.REGISTERED), durable=False)
        led.put(rec("secret/b", State.PENDING))   # durable: commits a's row with it
        led.put(rec("secret/b", State.REGISTERED), durable=False)
        led.put(rec("secret/c", State.REGISTERED), durable=False)
        os._exit(0)   # a kill: neither flush() nor close() runs
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)
    assert _on_disk(path) == {"secret/a": "registered", "secret/b": "pending"}


def test_close_and_flush_commit_what_is_staged_and_discard_drops_it(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    led = SqliteLedger(path, batch_rows=100, batch_seconds=3600)
    led.put(registered("secret/a"), durable=False)
    led.flush()
    assert _on_disk(path) == {"secret/a": "registered"}
    led.put(registered("secret/b"), durable=False)
    led.discard_staged()
    assert led.get("secret/b") is None and led.staged() == 0
    led.put(registered("secret/c"), durable=False)
    led.close()
    assert _on_disk(path) == {"secret/a": "registered", "secret/c": "registered"}


def test_a_refused_row_inside_a_batch_keeps_the_staged_rows(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    with SqliteLedger(path, batch_rows=100, batch_seconds=3600) as led:
        led.put(registered("secret/a"), durable=False)
        with pytest.raises(LedgerError):
            led.put(full_record("secret/b", credential_id="dckr_pat_" + "x" * 20), durable=False)
        led.flush()
        assert set(_on_disk(path)) == {"secret/a"}


def test_some_and_holding_read_only_the_rows_asked_for() -> None:
    """A targeted pass's reads: by key and by fingerprint, in key order, across the IN chunks."""
    with SqliteLedger(":memory:") as led:
        for i in range(1200):
            led.put(LedgerRecord(key=f"secret/s{i:04d}", mount="secret", path=f"s{i:04d}", kv_version=2,
                                 state=State.REGISTERED, fingerprint=f"fp{i % 600}"), durable=False)
        led.flush()
        keys = {f"secret/s{i:04d}" for i in range(0, 1200, 2)} | {"secret/absent"}
        got = led.some(keys)
        assert [r.key for r in got] == sorted(keys - {"secret/absent"})
        assert led.some(()) == [] and led.holding(()) == []
        held = led.holding({"fp5", "fp599", "fp-none"})
        assert [r.key for r in held] == ["secret/s0005", "secret/s0599", "secret/s0605", "secret/s1199"]
        many = led.holding({f"fp{i}" for i in range(600)})
        assert len(many) == 1200 and [r.key for r in many] == sorted(r.key for r in many)
