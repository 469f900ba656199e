"""Getting Vault audit lines into the bridge: decode one line, split a forwarded body, tail a file.

Three ways in, one output: each complete audit line (bytes, no newline) is handed to an
`on_line` callback, which matches it and offers keys to the trigger queue (`bridge.triggers`).
The socket listener lives in `bridge.audit_socket`. Nothing here raises on bad input: a
malformed, truncated or oversized line is dropped, because the periodic full pass is the
safety net and the audit stream must never stop the bridge (or slow Vault down).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from bridge.logs import get_logger

log = get_logger(__name__)

# Vault audit lines are a few KiB; a response to a large list can reach hundreds of KiB.
# Anything past this is not a KV write the bridge cares about, and buffering it is a memory risk.
MAX_LINE_BYTES = 1 << 20
_READ_CHUNK = 1 << 16
_MAX_READ_PER_POLL = 4 << 20  # so a huge backlog cannot starve the stop check


class IngestRejected(ValueError):
    """A POST /v1/audit body the bridge will not take. `too_large`: answer 413, else 400."""

    def __init__(self, message: str, *, too_large: bool = False) -> None:
        super().__init__(message)
        self.too_large = too_large


def decode_audit_line(line: bytes | str, max_bytes: int = MAX_LINE_BYTES, *, _depth: int = 0) -> dict[str, Any] | None:
    """The audit entry as a dict, or None for anything that is not one.

    Tolerates a text prefix before the JSON (the file device's `prefix` option, syslog
    framing) and one level of shipper envelope: `{"message": "<audit json>"}` (Vector's file
    source) or `{"log": "<audit json>"}` (Fluent Bit's tail input without a JSON parser).
    """
    raw = line.encode("utf-8", "replace") if isinstance(line, str) else line
    if len(raw) > max_bytes:
        return None
    raw = raw.strip()
    if not raw.startswith(b"{"):
        start = raw.find(b'{"')
        if start < 0:
            return None
        raw = raw[start:]
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError too
        return None
    if not isinstance(obj, dict):
        return None
    if "request" not in obj and "type" not in obj and _depth == 0:
        for wrapper in ("message", "log"):
            inner = obj.get(wrapper)
            if isinstance(inner, str):
                return decode_audit_line(inner, max_bytes, _depth=1)
            if isinstance(inner, dict) and "request" in inner:
                return inner
    return obj


def parse_ingest_body(body: bytes, max_lines: int) -> list[bytes]:
    """The audit lines in a POST /v1/audit body.

    Accepts newline-delimited JSON (Vector's and Fluent Bit's `json_lines` HTTP output) or one
    JSON array of objects (Fluent Bit's `json` format); array items are re-encoded as one line
    each. Raises `IngestRejected` for more than `max_lines` lines (the caller should answer 413
    and request a full pass, since writes were lost) or for an array that is not valid JSON.
    Individual bad lines are not an error: the matcher ignores them.
    """
    text = body.strip()
    if not text:
        return []
    if text.startswith(b"["):
        try:
            items = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise IngestRejected("body starts with '[' but is not a JSON array") from exc
        if not isinstance(items, list):
            raise IngestRejected("body is not a JSON array")
        if len(items) > max_lines:
            raise IngestRejected(f"more than {max_lines} audit lines in one request", too_large=True)
        out: list[bytes] = []
        for item in items:
            if isinstance(item, dict):
                out.append(json.dumps(item, separators=(",", ":")).encode())
            elif isinstance(item, str):
                out.append(item.encode("utf-8", "replace"))
        return out
    lines = [ln.strip() for ln in text.split(b"\n")]
    lines = [ln for ln in lines if ln]
    if len(lines) > max_lines:
        raise IngestRejected(f"more than {max_lines} audit lines in one request", too_large=True)
    return lines


class LineSplitter:
    """Turns a byte stream into complete lines; buffers a partial line; drops oversized lines.

    `on_line` errors are logged and swallowed: one bad callback must not stop the stream.
    """

    def __init__(self, on_line: Callable[[bytes], None], max_line_bytes: int = MAX_LINE_BYTES) -> None:
        self._on_line = on_line
        self._max = max_line_bytes
        self._buf = bytearray()
        self._discarding = False  # inside an oversized line: drop bytes up to the next newline
        self.oversized = 0

    def feed(self, data: bytes) -> None:
        start = 0
        while True:
            nl = data.find(b"\n", start)
            if nl < 0:
                if not self._discarding:
                    self._buf += data[start:]
                    if len(self._buf) > self._max:
                        self._drop_oversized()
                return
            piece = data[start:nl]
            start = nl + 1
            if self._discarding:
                self._discarding = False
                continue
            if self._buf:
                self._buf += piece
                line = bytes(self._buf)
                self._buf.clear()
            else:
                line = piece
            if len(line) > self._max:
                self.oversized += 1
            elif line.strip():
                self._emit(line)

    def skip_to_next_line(self) -> None:
        """Drop bytes up to the next newline: the stream was joined in the middle of a line."""
        self._buf.clear()
        self._discarding = True

    def reset(self) -> None:
        """Forget a partial line (its file was rotated away or its connection closed)."""
        self._buf.clear()
        self._discarding = False

    def _drop_oversized(self) -> None:
        self._buf.clear()
        self._discarding = True
        self.oversized += 1

    def _emit(self, line: bytes) -> None:
        try:
            self._on_line(line)
        except Exception as exc:  # the stream outlives one bad line
            log.warning("audit_line_handler_failed", error=type(exc).__name__)


class AuditFileTailer:
    """Follows a file audit device like `tail -F`, handing each new complete line to `on_line`.

    - Starts at the end of a file that exists when it starts: after a restart the periodic
      full pass covers the gap, so replaying the log would only cause a burst of syncs.
    - A file that appears later (or after a rotation) is read from its start: all of it is new.
    - Rename rotation (a new inode at the path): the old file is drained until it has been quiet
      for `rotate_grace_seconds`, because Vault keeps writing to it until it reopens the file
      on SIGHUP; then the new file is read from its start.
    - Copy-truncate rotation (the size drops below the read position): read again from 0.
      Lines written between the copy and the truncation are lost; the periodic pass covers them.
    - Polls every `poll_seconds` (no inotify: it works on every filesystem, including shared
      volumes), sleeping through `sleep`, which by default waits on `stop` so a stop is immediate.
    """

    def __init__(
        self,
        path: Path,
        on_line: Callable[[bytes], None],
        *,
        poll_seconds: float,
        stop: threading.Event,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], object] | None = None,
        max_line_bytes: int = MAX_LINE_BYTES,
        rotate_grace_seconds: float = 1.0,
    ) -> None:
        self.path = Path(path)
        self._stop = stop
        self._poll = poll_seconds
        self._clock = clock
        self._sleep: Callable[[float], object] = sleep if sleep is not None else stop.wait
        self._grace = rotate_grace_seconds
        self._splitter = LineSplitter(on_line, max_line_bytes)
        self._fh: BinaryIO | None = None
        self._ident: tuple[int, int] | None = None
        self._pos = 0
        self._first_open = True  # only the file present at start is skipped to its end
        self._old_quiet_since: float | None = None
        self._warned: set[str] = set()
        self._thread: threading.Thread | None = None

    def start(self) -> threading.Thread:
        self._thread = threading.Thread(target=self.run, name="audit-file-tailer", daemon=True)
        self._thread.start()
        return self._thread

    def run(self) -> None:
        log.info("audit_tail_started", file=str(self.path))
        try:
            while not self._stop.is_set():
                if not self.poll_once():
                    self._sleep(self._poll)
        finally:
            self.close()

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def poll_once(self) -> bool:
        """One look at the file; True when there is probably more to read right away."""
        try:
            st: os.stat_result | None = os.stat(self.path)
        except FileNotFoundError:
            st = None
        except OSError as exc:
            self._warn_once("stat", exc)
            st = None
        if self._fh is None:
            return self._open(st)
        ident = None if st is None else (st.st_dev, st.st_ino)
        if ident == self._ident and st is not None and st.st_size < self._pos:
            log.info("audit_tail_truncated", file=str(self.path))
            self._fh.seek(0)
            self._pos = 0
            self._splitter.reset()
        more, got = self._read()
        if ident is not None and ident != self._ident:
            # A new file is at the path. Drain the old one until the writer has moved over.
            now = self._clock()
            if got or self._old_quiet_since is None:
                self._old_quiet_since = now
            elif now - self._old_quiet_since >= self._grace:
                log.info("audit_tail_rotated", file=str(self.path))
                self.close()
                self._splitter.reset()
                self._old_quiet_since = None
                return self._open(st)
        else:
            self._old_quiet_since = None
        return more

    def _open(self, st: os.stat_result | None) -> bool:
        skip_to_end = self._first_open
        self._first_open = False
        if st is None:
            return False
        try:
            fh = open(self.path, "rb", buffering=0)  # noqa: SIM115 (kept open across polls)
        except OSError as exc:
            self._warn_once("open", exc)
            return False
        fst = os.fstat(fh.fileno())  # the file actually opened, not the one stat() saw
        self._fh = fh
        self._ident = (fst.st_dev, fst.st_ino)
        self._pos = fh.seek(0, os.SEEK_END) if skip_to_end else 0
        if self._pos > 0:
            # Started mid-line (Vault was writing): the rest of that line is not a whole entry.
            fh.seek(self._pos - 1)
            if fh.read(1) != b"\n":
                self._splitter.skip_to_next_line()
        self._warned.clear()
        return True

    def _read(self) -> tuple[bool, bool]:
        assert self._fh is not None
        total = 0
        while total < _MAX_READ_PER_POLL:
            try:
                data = self._fh.read(_READ_CHUNK)
            except OSError as exc:
                self._warn_once("read", exc)
                return False, total > 0
            if not data:
                return False, total > 0
            total += len(data)
            self._pos += len(data)
            self._splitter.feed(data)
        return True, True

    def _warn_once(self, what: str, exc: OSError) -> None:
        # A missing permission on the audit file would otherwise log every poll.
        if what not in self._warned:
            self._warned.add(what)
            log.warning("audit_tail_error", file=str(self.path), op=what, error=type(exc).__name__)
