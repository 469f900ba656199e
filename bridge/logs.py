"""Structured logging and redaction.

Modules log through `get_logger(__name__)` with an event name and keyword fields:
`log.info("action", action="create", result="ok", path="secret/a")`. `configure()` decides the
rendering (JSON lines or console). Field values pass through a redaction step that replaces any
registered secret value, so even a mistake upstream cannot print a token.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from typing import Any

from bridge.model import REDACTED, Sensitive

_secrets_lock = threading.Lock()
_known_secrets: set[str] = set()


def register_secret(value: str) -> None:
    """Remember a value that must never be printed (tokens read from Vault, the PAT, the API key)."""
    if len(value) >= 6:  # shorter strings would redact ordinary words
        with _secrets_lock:
            _known_secrets.add(value)


def redact_text(text: str) -> str:
    with _secrets_lock:
        secrets = tuple(_known_secrets)
    for s in secrets:
        if s in text:
            text = text.replace(s, REDACTED)
    return text


def _clean(value: Any) -> Any:
    if isinstance(value, Sensitive):
        return REDACTED
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, int | float | bool) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_clean(v) for v in value]
    return redact_text(str(value))


class BoundLogger:
    """A thin keyword-argument front for a stdlib logger."""

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger

    def _log(self, level: int, event: str, fields: dict[str, Any]) -> None:
        if self._logger.isEnabledFor(level):
            exc_info = fields.pop("exc_info", None)
            self._logger.log(level, event, extra={"fields": _clean(fields)}, exc_info=exc_info)

    def debug(self, event: str, **fields: Any) -> None:
        self._log(logging.DEBUG, event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._log(logging.INFO, event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._log(logging.WARNING, event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._log(logging.ERROR, event, fields)


def get_logger(name: str) -> BoundLogger:
    return BoundLogger(logging.getLogger(name))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": redact_text(record.getMessage()),
        }
        out.update(getattr(record, "fields", {}))
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            out["error"] = redact_text(f"{type(exc).__name__}: {exc}")
        return json.dumps(out, default=str)


class ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", {})
        kv = " ".join(f"{k}={v}" for k, v in fields.items())
        ts = time.strftime("%H:%M:%S", time.localtime(record.created))
        line = f"{ts} {record.levelname.lower():7s} {redact_text(record.getMessage())} {kv}".rstrip()
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            line += redact_text(f" error={type(exc).__name__}: {exc}")
        return line


def configure(level: str = "info", fmt: str = "auto", stream: Any = None) -> None:
    stream = stream if stream is not None else sys.stderr
    if fmt == "auto":
        fmt = "console" if getattr(stream, "isatty", lambda: False)() else "json"
    handler = logging.StreamHandler(stream)
    handler.setFormatter(ConsoleFormatter() if fmt == "console" else JsonFormatter())
    root = logging.getLogger("bridge")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
