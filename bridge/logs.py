"""Structured logging and redaction; the only module importing structlog.

Modules log through `get_logger(__name__)` with an event name and keyword fields:
`log.info("action", action="create", result="ok", path="secret/a")`. `configure()` decides the
rendering: JSON lines (`{"ts": …, "level": …, "logger": …, "event": …, <fields>}`, one object a
line) or a console form for people. Records of other libraries' stdlib loggers (httpx, hvac,
urllib3, apscheduler) go through the same renderer and the same redaction.

Redaction replaces every registered secret value, and, as defence in depth, anything shaped like
a DockerHub token, a bearer token, a Vault token, a JWT or a `password=`-style assignment, with
`***`. It runs on the event, on every field value (recursively) and on exception text and
tracebacks, before a record reaches any handler, so a mistake upstream cannot print a token.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
from collections.abc import Iterable, Mapping
from typing import Any, TextIO

import structlog
from structlog.types import EventDict, Processor, WrappedLogger

from bridge.model import REDACTED, Sensitive

# Shorter strings would redact ordinary words.
MIN_SECRET_LENGTH = 6
# Rotated tokens keep arriving for the life of the daemon; the oldest are forgotten past this.
# Long-lived secrets (PAT, webhook token, Vault token, AppRole ids) are pinned and never evicted.
MAX_REGISTERED_SECRETS = 4096

# Loggers of libraries whose INFO lines are per-request chatter (httpx logs every request line).
NOISY_LOGGERS = ("httpx", "httpcore", "hvac", "urllib3", "requests", "apscheduler", "asyncio")

# Shapes of credentials that must never be printed even if nobody registered them.
_DOCKERHUB_TOKEN = re.compile(r"dckr_(?:pat|oat)_[A-Za-z0-9_-]+")
_SHAPES = re.compile(
    r"(?P<dockerhub>dckr_(?:pat|oat)_[A-Za-z0-9_-]+)"
    r"|(?P<bearer_kw>\b(?:[Bb]earer|[Bb]asic)\s+)(?P<bearer>[A-Za-z0-9._~+/=-]+)"
    r"|(?P<vault>(?<![A-Za-z0-9_.-])(?:hv[sbr]|[sbr])\.[A-Za-z0-9_-]{20,})"
    r"|(?P<jwt>\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]+)"
    r"|(?P<logto_pat>\bpat_[A-Za-z0-9]{16,})"
    r"|(?P<assign_kw>\b(?:access_token|refresh_token|subject_token|id_token|client_secret|secret_id"
    r"|api_?key|x-api-key|password|accessToken|apiKey)[\"']?\s*[:=]\s*[\"']?)(?P<assign>[^\s\"'&,;}]+)"
)

# Field names whose string values are credentials whatever they look like.
_SENSITIVE_KEYS = frozenset(
    {
        "token", "access_token", "accesstoken", "refresh_token", "subject_token", "id_token",
        "password", "api_key", "apikey", "x-api-key", "authorization", "client_secret", "secret_id",
        "pat", "jwt",
    }
)


def _shape_sub(m: re.Match[str]) -> str:
    # Keep the keyword so the line still says what was there.
    if m["bearer_kw"] is not None:
        return m["bearer_kw"] + REDACTED
    if m["assign_kw"] is not None:
        return m["assign_kw"] + REDACTED
    return REDACTED


class SecretRegistry:
    """Values that must never be printed. Thread-safe; the matcher is rebuilt only on change."""

    def __init__(self, limit: int = MAX_REGISTERED_SECRETS) -> None:
        self._lock = threading.Lock()
        self._limit = limit
        self._values: dict[str, None] = {}  # insertion-ordered set: oldest first
        self._pinned: set[str] = set()  # never evicted, not counted against the limit
        self._matcher: re.Pattern[str] | None = None
        self._stale = False  # values changed since the matcher was built

    def add(self, value: str, *, pinned: bool = False) -> None:
        if len(value) < MIN_SECRET_LENGTH or _DOCKERHUB_TOKEN.fullmatch(value):
            # DockerHub-shaped tokens are redacted by shape already. Keeping thousands of them in
            # the alternation made every newly read token cost a recompile (~0.1 s at 10k).
            return
        with self._lock:
            if pinned:
                if value not in self._pinned:
                    self._pinned.add(value)
                    self._values.pop(value, None)
                    self._stale = True
                return
            if value in self._values or value in self._pinned:
                return
            self._values[value] = None
            while len(self._values) > self._limit:
                del self._values[next(iter(self._values))]
            # Built on the next redact, not here: compiling N alternatives on each of N adds made
            # registering a pass's values O(N^2) (1,000 tokens: 22 s; see docs/benchmarks.md).
            self._stale = True

    def _current(self) -> re.Pattern[str] | None:
        if self._stale:
            with self._lock:
                if self._stale:
                    # Longest first, so a secret containing another is replaced whole.
                    alternatives = sorted({*self._values, *self._pinned}, key=len, reverse=True)
                    self._matcher = re.compile("|".join(re.escape(v) for v in alternatives)) if alternatives else None
                    self._stale = False
        return self._matcher

    def __len__(self) -> int:
        with self._lock:
            return len(self._values) + len(self._pinned)

    def redact(self, text: str) -> str:
        matcher = self._current()  # an immutable compiled pattern: no lock needed once built
        if matcher is not None:
            text = matcher.sub(REDACTED, text)
        return _SHAPES.sub(_shape_sub, text)


# Process-wide on purpose, like logging's own logger registry: a value registered by the Vault
# adapter must be redacted from every logger, including other libraries' stdlib loggers.
_REGISTRY = SecretRegistry()


def register_secret(value: str | Sensitive, *, pinned: bool = False) -> None:
    """Remember a value that must never be printed (tokens read from Vault, the PAT, the API key).

    `pinned=True` for the long-lived secrets (the PAT or API key, the webhook token, the Vault
    token, AppRole ids): they are never evicted, however many rotated tokens pass through.
    """
    _REGISTRY.add(value.reveal() if isinstance(value, Sensitive) else value, pinned=pinned)


def redact_text(text: str) -> str:
    """`text` with registered secrets and credential-shaped substrings replaced by `***`."""
    return _REGISTRY.redact(text)


def redact_value(value: Any, key: str | None = None) -> Any:
    """A JSON-friendly copy of `value` with every string redacted (containers recursively)."""
    if isinstance(value, Sensitive):
        return REDACTED
    if isinstance(value, bool | int | float) or value is None:
        return value
    if isinstance(value, str):
        if key is not None and key.lower() in _SENSITIVE_KEYS and value:
            return REDACTED
        return redact_text(value)
    if isinstance(value, Mapping):
        return {str(k): redact_value(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [redact_value(v) for v in value]
    if isinstance(value, BaseException):
        return redact_text(f"{type(value).__name__}: {value}")
    return redact_text(str(value))


def _redact_processor(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    return {k: redact_value(v, k) for k, v in event_dict.items()}


def _order_keys(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    # ts, level, logger, event first, so a line reads left to right; fields keep call order.
    head = {k: event_dict.pop(k) for k in ("ts", "level", "logger", "event") if k in event_dict}
    return {**head, **event_dict}


def _drop_meta(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    event_dict.pop("_record", None)
    event_dict.pop("_from_structlog", None)
    return event_dict


def _stringify_event(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    event = event_dict.get("event")
    if not isinstance(event, str):
        event_dict["event"] = str(event)
    return event_dict


# Runs on both our records (before they become stdlib records, so even a handler we did not
# install, such as pytest's caplog, only ever sees redacted text) and foreign ones.
_SHARED_CHAIN: tuple[Processor, ...] = (
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
    structlog.processors.StackInfoRenderer(),
    structlog.processors.format_exc_info,  # tracebacks become text here, then get redacted
    _stringify_event,
    _redact_processor,
)
_OWN_CHAIN: tuple[Processor, ...] = (*_SHARED_CHAIN, structlog.stdlib.ProcessorFormatter.wrap_for_formatter)


_RESERVED = frozenset({"ts", "level", "logger"})


class BoundLogger:
    """Keyword-argument logging for one logger name; thread-safe, and cheap when the level is off."""

    __slots__ = ("_logger", "_stdlib")

    def __init__(self, stdlib_logger: logging.Logger, context: Mapping[str, Any] | None = None) -> None:
        self._stdlib = stdlib_logger
        # Built explicitly rather than through structlog.configure(): no global structlog state.
        self._logger = structlog.stdlib.BoundLogger(stdlib_logger, list(_OWN_CHAIN), dict(context or {}))

    @property
    def name(self) -> str:
        return self._stdlib.name

    def bind(self, **fields: Any) -> BoundLogger:
        """A logger that adds `fields` to every line."""
        bound = BoundLogger.__new__(BoundLogger)
        bound._stdlib = self._stdlib
        bound._logger = self._logger.bind(**fields)
        return bound

    def is_enabled_for(self, level: int) -> bool:
        return self._stdlib.isEnabledFor(level)

    def _log(self, level: int, method: str, event: str, fields: dict[str, Any]) -> None:
        if self._stdlib.isEnabledFor(level):  # stdlib caches this per level
            for clash in _RESERVED.intersection(fields):  # would overwrite the line's own keys
                fields[f"{clash}_"] = fields.pop(clash)
            getattr(self._logger, method)(event, **fields)

    def debug(self, event: str, **fields: Any) -> None:
        self._log(logging.DEBUG, "debug", event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._log(logging.INFO, "info", event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._log(logging.WARNING, "warning", event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._log(logging.ERROR, "error", event, fields)

    def exception(self, event: str, **fields: Any) -> None:
        """`error` with the current exception's traceback (redacted) attached."""
        fields.setdefault("exc_info", True)
        self._log(logging.ERROR, "error", event, fields)


def get_logger(name: str) -> BoundLogger:
    return BoundLogger(logging.getLogger(name))


def _renderer(fmt: str, colors: bool) -> Processor:
    if fmt == "console":
        return structlog.dev.ConsoleRenderer(
            colors=colors, timestamp_key="ts", exception_formatter=structlog.dev.plain_traceback
        )
    return structlog.processors.JSONRenderer(default=str)


class _BridgeHandler(logging.StreamHandler[TextIO]):
    """Marks the handler `configure()` installed, so a second call replaces it."""


def configure(
    level: str = "info",
    fmt: str = "auto",
    stream: TextIO | None = None,
    *,
    quiet_loggers: Iterable[str] = NOISY_LOGGERS,
) -> None:
    """Route every stdlib logger through one redacting renderer. Safe to call again (SIGHUP).

    `level`: debug | info | warning | error. `fmt`: json | console | auto (console on a terminal).
    Colours only on a terminal, and never when `NO_COLOR` is set.
    The noisy libraries' loggers are held at WARNING, or INFO when `level` is debug (their DEBUG
    is wire-level tracing).
    """
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    out: TextIO = stream if stream is not None else sys.stderr
    tty = bool(getattr(out, "isatty", lambda: False)())
    if fmt == "auto":
        fmt = "console" if tty else "json"
    if fmt not in ("json", "console"):
        raise ValueError(f"unknown log format {fmt!r}")

    # NO_COLOR (https://no-color.org): set to anything non-empty, no ANSI colour even on a terminal.
    colors = tty and fmt == "console" and not os.environ.get("NO_COLOR")
    post: list[Processor] = [_drop_meta, _order_keys, _renderer(fmt, colors=colors)]
    formatter = structlog.stdlib.ProcessorFormatter(
        processors=post, foreign_pre_chain=list(_SHARED_CHAIN), pass_foreign_args=False
    )
    handler = _BridgeHandler(out)
    handler.setFormatter(formatter)

    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _BridgeHandler)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(numeric)
    quiet = logging.INFO if numeric <= logging.DEBUG else logging.WARNING
    for name in quiet_loggers:
        logging.getLogger(name).setLevel(max(quiet, numeric))


__all__: list[str] = [
    "MIN_SECRET_LENGTH",
    "NOISY_LOGGERS",
    "BoundLogger",
    "SecretRegistry",
    "configure",
    "get_logger",
    "redact_text",
    "redact_value",
    "register_secret",
]
