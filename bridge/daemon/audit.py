"""Vault audit lines: decode one line, split a forwarded body, split a byte stream into lines.

Three ways in, one output: each complete audit line (bytes, no newline) is handed to an
`on_line` callback, which matches it and offers keys to the trigger queue (`bridge.daemon.triggers`).
The file tailer lives in `bridge.daemon.audit_file`, the socket listener in `bridge.daemon.audit_socket`. Nothing here raises on bad input: a
malformed, truncated or oversized line is dropped, because the periodic full pass is the
safety net and the audit stream must never stop the bridge (or slow Vault down).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from bridge.errors import IngestRejected
from bridge.logs import get_logger

log = get_logger(__name__)

# Vault audit lines are a few KiB; a response to a large list can reach hundreds of KiB.
# Anything past this is not a KV write the bridge cares about, and buffering it is a memory risk.
MAX_LINE_BYTES = 1 << 20


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
