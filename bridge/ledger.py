"""Durable state: what is registered, for which version and fingerprint; schema migrations.

`SqliteLedger` implements `bridge.ports.Ledger` on one SQLite file (WAL journal,
`synchronous=NORMAL`). Every write is committed before it returns, except a row put with
`durable=False`: such rows are *staged* in one open transaction and committed together (group
commit) once `batch_rows` are staged or `batch_seconds` have passed since the first, at the next
durable write, at `flush()` and at `close()`. Commits are in write order, so a crash loses a
suffix of the writes, never one from the middle (docs/adr/0011-group-commit-and-pipeline.md
says which rows may be staged and why losing them only costs a re-adoption). The file holds no
secret value, only HMAC fingerprints, ids, states and reasons; it is still created 0600 because
ids and paths are nobody else's business. Migrations are an ordered list applied at open.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import operator
import os
import re
import socket
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

from bridge.errors import LeaseLost, LedgerError, WriterBusy
from bridge.logs import get_logger, redact_text
from bridge.model import REDACTED, State
from bridge.ports import LedgerRecord, PendingDelete

MEMORY = ":memory:"
FILE_MODE = 0o600
DIR_MODE = 0o700
BUSY_TIMEOUT_MS = 5000  # `status` in another process may read while the daemon writes
# Group commit bounds for staged rows (`put(..., durable=False)`): whichever comes first. A
# commit costs a WAL append of the touched pages; 64 rows share one. 0.2 s bounds how stale
# another process's view (`status`) can be while a long pass registers at the shipped 10/s.
BATCH_ROWS = 64
BATCH_SECONDS = 0.2

# A DockerHub token prefix anywhere, even truncated: reasons are human text and never carry values.
# At least one token character after the prefix: the bare prefix in words that describe the
# shape ("expected dckr_pat_… or dckr_oat_…") is not a value and must stay readable in status.
_TOKEN_RE = re.compile(r"dckr_(?:pat|oat)_[A-Za-z0-9_-]+")

# Each entry upgrades the schema by one version; entry i produces version i + 1. Never edit a
# released entry: files in the field were made by it. Append a new one instead.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (  # 1: the initial schema
        """CREATE TABLE secrets (
            key TEXT PRIMARY KEY,
            mount TEXT NOT NULL,
            path TEXT NOT NULL,
            kv_version INTEGER NOT NULL,
            state TEXT NOT NULL,
            version INTEGER,
            fingerprint TEXT,
            organization_id TEXT,
            project_id TEXT,
            credential_id TEXT,
            last_action TEXT,
            last_result TEXT,
            reason TEXT,
            attempts INTEGER NOT NULL DEFAULT 0,
            next_attempt_at REAL,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL
        )""",
        "CREATE INDEX secrets_state ON secrets (state)",
        """CREATE TABLE pending_deletes (
            credential_id TEXT PRIMARY KEY,
            organization_id TEXT NOT NULL,
            key TEXT NOT NULL,
            reason TEXT NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            next_attempt_at REAL,
            created_at REAL NOT NULL
        )""",
        "CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
    ),
    (  # 2: when the current credential was registered (status shows its age)
        "ALTER TABLE secrets ADD COLUMN registered_at REAL",
        # Best guess for rows already registered: their last update.
        "UPDATE secrets SET registered_at = updated_at WHERE state = 'registered'",
    ),
    (  # 3: the latest Vault version evaluated, so a rejection or backoff stands until a newer one
        "ALTER TABLE secrets ADD COLUMN seen_version INTEGER",
        "UPDATE secrets SET seen_version = version",
    ),
    (  # 4: a digest of the tags last evaluated, so a remote rejection is retried when they change
        "ALTER TABLE secrets ADD COLUMN tags_digest TEXT",
    ),
    (  # 5: the created_time of the version last evaluated: versions restart at 1 after a destroy
        "ALTER TABLE secrets ADD COLUMN seen_stamp TEXT",
    ),
    (  # 6: a targeted pass looks up the rows holding a token by fingerprint, not by reading all
        "CREATE INDEX secrets_fingerprint ON secrets (fingerprint)",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)

# One column per field of the port's dataclasses: a field added there without a migration here
# fails every put with "no such column", which the round-trip test catches.
PAGE_CACHE_KIB = 256  # SQLite's page cache per connection (see _setup)
_RECORD_COLUMNS = tuple(f.name for f in dataclasses.fields(LedgerRecord))
_PENDING_COLUMNS = tuple(f.name for f in dataclasses.fields(PendingDelete))
_STATE_COLUMN = _RECORD_COLUMNS.index("state")
_REASON_COLUMN = _RECORD_COLUMNS.index("reason")
_UPDATED_COLUMN = _RECORD_COLUMNS.index("updated_at")
_CREATED_COLUMN = _RECORD_COLUMNS.index("created_at")
_record_values = operator.attrgetter(*_RECORD_COLUMNS)
# An upsert; a zero created_at on the record keeps the stored row's (`put`).
_PUT_KEEP_CREATED = (
    f"INSERT INTO secrets ({', '.join(_RECORD_COLUMNS)}) VALUES ({', '.join('?' for _ in _RECORD_COLUMNS)}) "  # noqa: S608  # constants
    "ON CONFLICT (key) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in _RECORD_COLUMNS if c not in ("key", "created_at"))
)
_PUT = _PUT_KEEP_CREATED + ", created_at = excluded.created_at"
_GET_ONE = f"SELECT {', '.join(_RECORD_COLUMNS)} FROM secrets WHERE key = ?"  # noqa: S608  # column names are constants
# Columns whose values repeat across rows (a few mounts, organizations, projects, states, actions,
# results, reasons); keys, paths, fingerprints, credential ids and stamps are per secret.
_SHARED_COLUMNS = frozenset(_RECORD_COLUMNS.index(c) for c in (
    "mount", "state", "organization_id", "project_id", "last_action", "last_result", "reason", "tags_digest"))
# Per-secret columns whose value discovery also holds during a pass, as the same string: the
# secret's path and the stamp of the version last seen (unchanged for almost every secret).
# Interned here and in bridge.vault.source, a pass holds one copy of each, not two (~145 B a
# tracked secret); interned strings are freed with their last reference.
_INTERNED_COLUMNS = frozenset(_RECORD_COLUMNS.index(c) for c in ("path", "seen_stamp"))
_PENDING_INSERT = (
    f"INSERT INTO pending_deletes ({', '.join(_PENDING_COLUMNS)}, created_at) "  # noqa: S608  # constants
    f"VALUES ({', '.join(':' + c for c in _PENDING_COLUMNS)}, :created_at) ON CONFLICT (credential_id)"
)
_PENDING_UPDATE = ", ".join(f"{c} = excluded.{c}" for c in _PENDING_COLUMNS if c != "credential_id")

_IN_CHUNK = 500  # bound parameters per `IN (...)`: far below SQLite's limit (999 before 3.32)

_log = get_logger(__name__)


def scrub_reason(reason: str) -> str:
    """`reason` without registered secrets or anything shaped like a DockerHub token."""
    return _TOKEN_RE.sub(REDACTED, redact_text(reason))


def _create_private(path: Path) -> None:
    """Create the file 0600 before SQLite opens it (SQLite would use the umask), or tighten it."""
    if not path.parent.exists():
        path.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        os.chmod(path.parent, DIR_MODE)  # mkdir's mode is filtered by the umask
    fd = os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE)
    try:
        if os.fstat(fd).st_mode & 0o077:
            os.fchmod(fd, FILE_MODE)
    finally:
        os.close(fd)


class SqliteLedger:
    """The SQLite ledger. One connection shared by all threads, serialised by a lock."""

    def __init__(
        self,
        path: Path | str,
        *,
        clock: Callable[[], float] = time.time,
        batch_rows: int = BATCH_ROWS,
        batch_seconds: float = BATCH_SECONDS,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._memory = str(path) == MEMORY
        self._path: Path | None = None if self._memory else Path(path)
        self._clock = clock
        self._mono = monotonic
        self._batch_rows = max(1, batch_rows)
        self._batch_seconds = batch_seconds
        self._staged = 0  # rows written in the open transaction, not yet committed
        self._staged_since = 0.0  # monotonic time of the first of them
        self.commits = 0  # transactions committed by writes (a figure for the benchmark and tests)
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        if self._path is not None:
            try:
                _create_private(self._path)
            except OSError as exc:
                why = exc.strerror or str(exc)
                raise LedgerError(f"ledger {self._path}: cannot create the file: {why}") from exc
        with self._op("open"):
            # isolation_level=None: we issue BEGIN/COMMIT ourselves, so a single statement is
            # committed on return and migrations are one transaction each (DDL included).
            self._conn = sqlite3.connect(
                MEMORY if self._memory else str(self._path), isolation_level=None, check_same_thread=False
            )
        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    # -- plumbing -------------------------------------------------------------------------------

    @property
    def path(self) -> str:
        """The file path, or `:memory:`."""
        return MEMORY if self._path is None else str(self._path)

    @contextlib.contextmanager
    def _op(self, what: str) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            # sqlite3 messages name tables and columns, never bound values.
            raise LedgerError(f"ledger {self.path}: {what} failed: {exc}") from exc

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise LedgerError(f"ledger {self.path}: used after close()")
        return self._conn

    @contextlib.contextmanager
    def _tx(self, what: str) -> Iterator[sqlite3.Connection]:
        """One locked transaction; rolled back if anything inside fails."""
        with self._lock, self._op(what):
            db = self._db()
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                if db.in_transaction:  # SQLite may already have rolled back (disk full, I/O error)
                    db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def _setup(self) -> None:
        db = self._db()
        with self._lock, self._op("configure"):
            db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            if not self._memory:
                mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    _log.warning("ledger_journal_mode", path=self.path, mode=str(mode), wanted="wal")
            # NORMAL in WAL mode: every commit survives a crash of the process (kill -9, OOM, pod
            # deletion); only an OS crash or power loss can roll back the last few, which the
            # ownership markers make harmless (ADR 5). FULL cost a disk flush per secret and made
            # a cold pass of 1,000 tokens 6x slower in ledger time (docs/benchmarks.md).
            db.execute("PRAGMA synchronous = NORMAL")
            db.execute("PRAGMA foreign_keys = ON")
            # SQLite's page cache, 2 MiB by default, filled by every pass's full read of the ledger
            # (10,000 rows are ~4 MB): 1.9 MiB of the daemon's peak RSS at 10,000 tracked. The
            # OS page cache holds the file anyway; a smaller one costs a pread per page missed.
            db.execute(f"PRAGMA cache_size = -{PAGE_CACHE_KIB}")
        self._migrate()
        self._tighten_side_files()

    def _migrate(self) -> None:
        with self._tx("reading the schema version") as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS schema_version "
                "(version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)"
            )
            current = db.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()[0]
        if current > SCHEMA_VERSION:
            raise LedgerError(
                f"ledger {self.path}: schema version {current} was written by a newer bridge "
                f"(this one knows up to {SCHEMA_VERSION}); refusing to open it"
            )
        for version in range(current + 1, SCHEMA_VERSION + 1):
            with self._tx(f"migration to schema version {version}") as db:
                for statement in MIGRATIONS[version - 1]:
                    db.execute(statement)
                db.execute(
                    "INSERT INTO schema_version (version, applied_at) VALUES (?, ?)", (version, self._clock())
                )
            if current:  # a new file is not news; an upgrade of a file in use is
                _log.info("ledger_migrated", path=self.path, schema_version=version)
        if not current:
            _log.debug("ledger_created", path=self.path, schema_version=SCHEMA_VERSION)

    def _tighten_side_files(self) -> None:
        # SQLite gives -wal/-shm the database's mode, but a file left by an older run may not.
        if self._path is None:
            return
        for suffix in ("-wal", "-shm", "-journal"):
            side = Path(f"{self._path}{suffix}")
            with contextlib.suppress(FileNotFoundError):
                if side.stat().st_mode & 0o077:
                    os.chmod(side, FILE_MODE)

    def schema_version(self) -> int:
        with self._lock, self._op("reading the schema version"):
            return int(self._db().execute("SELECT MAX(version) FROM schema_version").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                try:
                    self.flush()
                finally:
                    conn, self._conn = self._conn, None
                    with self._op("close"):
                        conn.close()

    # -- group commit ---------------------------------------------------------------------------

    def _write(self, what: str, sql: str, params: Any, *, durable: bool = True) -> sqlite3.Cursor:
        """One write statement: committed at once (with every staged row before it) when
        `durable`, else staged in the open transaction and committed when a bound is reached."""
        with self._lock, self._op(what):
            db = self._db()
            if self._staged == 0 and not durable:
                db.execute("BEGIN IMMEDIATE")
                self._staged_since = self._mono()
            try:
                cur = db.execute(sql, params)
            except BaseException:
                # A failed statement must not take the staged rows with it: SQLite rolls back
                # only the statement and keeps the transaction, unless it had to abort it
                # (disk full, I/O error). A transaction begun for this statement alone goes.
                if not db.in_transaction:
                    self._staged = 0
                elif self._staged == 0:
                    db.execute("ROLLBACK")
                raise
            if self._staged or not durable:
                self._staged += 1
                if durable or self._staged >= self._batch_rows or self._mono() - self._staged_since >= self._batch_seconds:
                    self._commit(db)
            else:
                self.commits += 1  # autocommit: the statement was its own transaction
            return cur

    def _commit(self, db: sqlite3.Connection) -> None:
        self._staged = 0
        if db.in_transaction:
            db.execute("COMMIT")
            self.commits += 1

    def flush(self) -> None:
        """Commit the staged rows now (no-op when there are none)."""
        with self._lock, self._op("commit"):
            if self._staged and self._conn is not None:
                self._commit(self._conn)

    def staged(self) -> int:
        """Rows written with `durable=False` and not committed yet."""
        return self._staged

    def discard_staged(self) -> None:
        """Roll the staged rows back, as a crash of the process would.

        Nothing in the bridge calls it: the property and crash tests use it to stand for SIGKILL
        (which never runs `flush` or `close`), on a ledger they keep using afterwards.
        """
        with self._lock, self._op("rollback"):
            db = self._db()
            self._staged = 0
            if db.in_transaction:
                db.execute("ROLLBACK")

    def __enter__(self) -> SqliteLedger:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SqliteLedger({self.path!r})"

    # -- checks ---------------------------------------------------------------------------------

    def _guard(self, key: str, fields: dict[str, Any]) -> None:
        """Refuse identifiers that look like a token: one there means a bug upstream."""
        for name, value in fields.items():
            if isinstance(value, str) and _TOKEN_RE.search(value):
                # The key is a Vault path, safe to name; the value is not repeated.
                raise LedgerError(
                    f"ledger {self.path}: refusing to store {name} of {redact_text(key)}: "
                    "it looks like a DockerHub token"
                )

    def _guard_all(self, key: str, values: list[Any], names: tuple[str, ...], *, skip: int) -> None:
        """`_guard` over a row's values in one regex search (NUL, which no token holds, between
        them, so no match can span two values); the slow path names the field."""
        joined = "\0".join(v for i, v in enumerate(values) if i != skip and isinstance(v, str))
        if _TOKEN_RE.search(joined):
            self._guard(key, {n: v for i, (n, v) in enumerate(zip(names, values, strict=True)) if i != skip})

    def _clean_reason(self, key: str, reason: str | None) -> str | None:
        if reason is None:
            return None
        clean = scrub_reason(reason)
        if clean != reason:
            _log.warning("ledger_reason_scrubbed", key=key)
        return clean

    # -- secrets --------------------------------------------------------------------------------

    @staticmethod
    def _to_record(row: tuple[Any, ...], shared: dict[str, str] | None = None) -> LedgerRecord:
        # Positional: the SELECT lists the columns in field order (_RECORD_COLUMNS), so no
        # per-row dict is built. `shared` hands out one string object per distinct value of the
        # low-cardinality columns: sqlite3 makes a new str per cell, and across 10,000 rows the
        # same mount, organization, project, action, result and reason were ~400 B a row.
        if len(row) != len(_RECORD_COLUMNS):
            raise ValueError(f"{len(row)} columns, expected {len(_RECORD_COLUMNS)}")
        if shared is None:
            values = list(row)
        else:
            values = [
                (shared.setdefault(v, v) if i in _SHARED_COLUMNS else sys.intern(v) if i in _INTERNED_COLUMNS else v)
                if isinstance(v, str) else v
                for i, v in enumerate(row)
            ]
        values[_STATE_COLUMN] = State(values[_STATE_COLUMN])
        return LedgerRecord(*values)

    def get(self, key: str) -> LedgerRecord | None:
        with self._lock, self._op("get"):
            row = self._db().execute(_GET_ONE, (key,)).fetchone()
        try:
            return None if row is None else self._to_record(row)
        except ValueError as exc:  # an unknown state: a newer bridge or a hand edit
            raise LedgerError(f"ledger {self.path}: unreadable row for {key}: {exc}") from exc

    def all(self) -> list[LedgerRecord]:
        cols = ", ".join(_RECORD_COLUMNS)
        shared: dict[str, str] = {}
        with self._lock, self._op("list"):
            # Rows are turned into records as the cursor yields them, not after a fetchall():
            # the tuples of every row never exist all at once beside the records.
            cursor = self._db().execute(f"SELECT {cols} FROM secrets ORDER BY key")  # noqa: S608  # constants
            try:
                return [self._to_record(r, shared) for r in cursor]
            except ValueError as exc:
                raise LedgerError(f"ledger {self.path}: unreadable row: {exc}") from exc

    def some(self, keys: Collection[str]) -> list[LedgerRecord]:
        """The rows of these keys (those that exist), by primary key: what a targeted pass reads
        instead of every row."""
        return self._where("key", sorted(keys), "list some")

    def holding(self, fingerprints: Collection[str]) -> list[LedgerRecord]:
        """The rows whose token has one of these fingerprints, in any state (indexed)."""
        return self._where("fingerprint", sorted(fingerprints), "list by fingerprint")

    def _where(self, column: str, values: list[str], what: str) -> list[LedgerRecord]:
        cols = ", ".join(_RECORD_COLUMNS)
        out: list[LedgerRecord] = []
        with self._lock, self._op(what):
            db = self._db()
            # In chunks: SQLite caps the number of bound parameters of one statement.
            for i in range(0, len(values), _IN_CHUNK):
                chunk = values[i : i + _IN_CHUNK]
                marks = ", ".join("?" * len(chunk))
                query = f"SELECT {cols} FROM secrets WHERE {column} IN ({marks}) ORDER BY key"  # noqa: S608  # constants
                try:
                    out += [self._to_record(r) for r in db.execute(query, chunk)]
                except ValueError as exc:
                    raise LedgerError(f"ledger {self.path}: unreadable row: {exc}") from exc
        return sorted(out, key=lambda r: r.key)

    def unsettled(self, now: float) -> list[LedgerRecord]:
        """Rows failed, rejected or pending, or waiting for a backoff past `now` (not retired or
        orphaned): the superset of what a pass report names as failing, read without loading
        every row (a steady pass over 10,000 secrets has none)."""
        cols = ", ".join(_RECORD_COLUMNS)
        query = (
            f"SELECT {cols} FROM secrets WHERE state IN (?, ?, ?) "  # noqa: S608  # constants
            "OR (next_attempt_at IS NOT NULL AND next_attempt_at > ? AND state NOT IN (?, ?)) ORDER BY key"
        )
        args = (State.FAILED.value, State.REJECTED.value, State.PENDING.value, now, State.RETIRED.value, State.ORPHANED.value)
        shared: dict[str, str] = {}
        with self._lock, self._op("list unsettled"):
            try:
                return [self._to_record(r, shared) for r in self._db().execute(query, args)]
            except ValueError as exc:
                raise LedgerError(f"ledger {self.path}: unreadable row: {exc}") from exc

    def put(self, record: LedgerRecord, *, durable: bool = True) -> None:
        """Insert or replace; committed before returning, or staged when not `durable`.

        A zero `created_at` keeps the stored row's creation time (or now for a new row); a zero
        `updated_at` becomes now. The reason is scrubbed of anything token-shaped. Reads on this
        ledger see staged rows at once; other processes see them once committed.
        """
        # Positional parameters and prebuilt statements: a cold pass puts two rows per secret,
        # and building the SQL and a dict of named parameters each time was most of a put's CPU.
        values = list(_record_values(record))
        self._guard_all(record.key, values, _RECORD_COLUMNS, skip=_REASON_COLUMN)
        now = self._clock()
        values[_STATE_COLUMN] = State(record.state).value
        values[_REASON_COLUMN] = self._clean_reason(record.key, record.reason)
        values[_UPDATED_COLUMN] = record.updated_at or now
        values[_CREATED_COLUMN] = record.created_at or now
        self._write(f"put {record.key}", _PUT_KEEP_CREATED if not record.created_at else _PUT, values, durable=durable)

    def remove(self, key: str) -> None:
        self._write(f"remove {key}", "DELETE FROM secrets WHERE key = ?", (key,))

    def counts_by_state(self) -> dict[str, int]:
        """Rows per state; every `State` is present, zero when it has no row (for the gauge)."""
        counts = {s.value: 0 for s in State}
        with self._lock, self._op("count"):
            for state, n in self._db().execute("SELECT state, COUNT(*) FROM secrets GROUP BY state"):
                counts[str(state)] = int(n)
        return counts

    def prune(self, older_than: float) -> int:
        """Delete RETIRED rows last updated before `older_than` (unix seconds); returns how many."""
        cur = self._write("prune", "DELETE FROM secrets WHERE state = ? AND updated_at < ?",
                          (State.RETIRED.value, older_than))
        return int(cur.rowcount)

    # -- pending deletes ------------------------------------------------------------------------

    def _pending_values(self, item: PendingDelete) -> dict[str, Any]:
        values: dict[str, Any] = {c: getattr(item, c) for c in _PENDING_COLUMNS}
        self._guard(item.key, {c: v for c, v in values.items() if c != "reason"})
        values["reason"] = self._clean_reason(item.key, item.reason) or ""
        values["created_at"] = self._clock()
        return values

    def add_pending_delete(self, item: PendingDelete) -> None:
        """Idempotent: an entry already queued for this credential keeps its attempts and backoff."""
        values = self._pending_values(item)
        self._write(f"queue the deletion of {item.credential_id}", f"{_PENDING_INSERT} DO NOTHING", values)

    def pending_deletes(self) -> list[PendingDelete]:
        cols = ", ".join(_PENDING_COLUMNS)
        with self._lock, self._op("list pending deletes"):
            rows = self._db().execute(
                f"SELECT {cols} FROM pending_deletes ORDER BY created_at, credential_id"  # noqa: S608  # constants
            ).fetchall()
        return [PendingDelete(**dict(zip(_PENDING_COLUMNS, r, strict=True))) for r in rows]

    def update_pending_delete(self, item: PendingDelete) -> None:
        """Replace the entry's fields (attempts, backoff, reason); inserts it if it is missing."""
        values = self._pending_values(item)
        self._write(f"update the deletion of {item.credential_id}", f"{_PENDING_INSERT} DO UPDATE SET {_PENDING_UPDATE}", values)

    def remove_pending_delete(self, credential_id: str) -> None:
        self._write(f"remove the deletion of {credential_id}", "DELETE FROM pending_deletes WHERE credential_id = ?",
                    (credential_id,))

    # -- meta -----------------------------------------------------------------------------------

    def get_meta(self, name: str) -> str | None:
        with self._lock, self._op(f"read meta {name}"):
            row = self._db().execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, name: str, value: str) -> None:
        self._guard(name, {"meta value": value})
        self._write(f"write meta {name}",
                    "INSERT INTO meta (name, value) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                    (name, value))


class ProcessLock:
    """One writer per ledger: an exclusive `flock` on `<ledger path>.lock` (a `WriteGuard`).

    Without HA, `run` and `sync --once` take it before writing, so two processes on one
    configuration (a cron job beside the daemon, two cron jobs) cannot register a token twice.
    The file holds who has it (pid, command, host, since), for the message of the one refused.
    The kernel drops the lock when the process dies, even by SIGKILL: no stale lock to clean.
    """

    def __init__(self, ledger_path: Path | str, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.path = Path(f"{ledger_path}.lock")
        self._clock, self._sleep = clock, sleep
        self._fd: int | None = None

    def holder(self) -> str:
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8") or "{}")
        except (OSError, ValueError):
            return "an unknown process"
        if not isinstance(doc, dict) or not doc:
            return "an unknown process"
        return f"pid {doc.get('pid')} (`{doc.get('command')}`) on {doc.get('host')} since {doc.get('since')}"

    def acquire(self, command: str, wait_seconds: float = 0.0) -> None:
        """Take the lock, waiting up to `wait_seconds`; WriterBusy naming the holder if not."""
        if self._fd is not None:
            return
        try:
            self.path.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, FILE_MODE)
        except OSError as exc:
            raise LedgerError(f"lock {self.path}: cannot open: {exc.strerror or exc}") from exc
        deadline = self._clock() + max(0.0, wait_seconds)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                left = deadline - self._clock()
                if left <= 0:
                    os.close(fd)
                    raise WriterBusy(
                        f"another writer holds {self.path}: {self.holder()}; wait for it to finish "
                        "(sync --wait SECONDS) or stop it"
                    ) from None
                self._sleep(min(0.2, left))
        doc = {"pid": os.getpid(), "command": command, "host": socket.gethostname(),
               "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(doc).encode(), 0)
        self._fd = fd
        _log.info("writer_lock_acquired", lock=str(self.path), command=command)

    def check(self, budget_seconds: float) -> None:
        # A flock does not expire: held until release or death. Only "not taken" fails.
        if self._fd is None:
            raise LeaseLost(f"the writer lock {self.path} is not held")

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)  # closing the descriptor drops the flock
