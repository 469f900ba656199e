"""CybeDefend authentication state: the PAT/API key file, the cached bearer token, exchange errors.

Pure bookkeeping, no HTTP: `bridge.cybedefend.client` (the only module importing httpx for CybeDefend)
performs the `/client-apps` and `/oidc/token` calls and hands their results here. Keeping the
cache apart makes its thread-safety and expiry arithmetic testable with an injected clock.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bridge.errors import AuthenticationError, ConfigError
from bridge.logs import register_secret
from bridge.model import Sensitive

CREDENTIAL_FILE_KEY = "cybedefend.auth.credential_file"
# Visible ASCII only. A header value with a control character makes h11 raise an error whose
# text quotes the whole value; refusing such values up front keeps them out of exceptions.
_HEADER_SAFE_RE = re.compile(r"^[\x21-\x7e]+$")
# When the token service omits `expires_in`, assume a short life; a 401 re-exchanges anyway.
DEFAULT_EXPIRES_IN = 300.0


def header_safe(value: str) -> bool:
    """True when `value` can go into an HTTP header without any library quoting it in an error."""
    return bool(_HEADER_SAFE_RE.match(value))


def read_credential_file(path: Path) -> Sensitive:
    """Read the CybeDefend PAT or API key from a file (a mounted Kubernetes Secret).

    Surrounding whitespace (a trailing newline) is stripped. An unreadable or empty file, or a
    value with inner whitespace or control characters, raises `ConfigError` naming
    `cybedefend.auth.credential_file`; the value itself is never part of the message.
    """
    try:
        raw = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(CREDENTIAL_FILE_KEY, f"cannot read {path}: {exc.strerror or type(exc).__name__}") from None
    except UnicodeDecodeError:
        raise ConfigError(CREDENTIAL_FILE_KEY, f"{path} is not UTF-8 text") from None
    value = raw.strip()
    if not value:
        raise ConfigError(CREDENTIAL_FILE_KEY, f"{path} is empty; expected a CybeDefend personal access token")
    register_secret(value, pinned=True)
    if not header_safe(value):
        raise ConfigError(
            CREDENTIAL_FILE_KEY,
            f"{path} holds whitespace or control characters inside the value; expected one token on one line",
        )
    return Sensitive(value)


@dataclass(frozen=True, slots=True)
class Bearer:
    """A bearer token from the exchange, with when (monotonic clock) to renew it."""

    token: Sensitive
    expires_in: float
    obtained_at: float
    renew_at: float


def renew_time(obtained_at: float, expires_in: float, margin: float) -> float:
    """When to exchange again: `margin` before expiry, but never before half the token's life.

    The half-life floor matters when the margin is configured larger than the lifetime the
    token service grants (60 s margin, 30 s tokens): without it every call would exchange.
    """
    return obtained_at + max(expires_in - margin, expires_in / 2.0)


def parse_token_response(body: Any) -> tuple[Sensitive, float]:
    """Extract (access_token, expires_in) from a 200 of `POST /oidc/token`."""
    if not isinstance(body, dict):
        raise AuthenticationError("the token service answered 200 without a JSON object", endpoint=TOKEN_ENDPOINT)
    token = body.get("access_token")
    if not isinstance(token, str) or not token:
        raise AuthenticationError("the token service answered 200 without an access_token", endpoint=TOKEN_ENDPOINT)
    register_secret(token)
    if not header_safe(token):
        raise AuthenticationError("the token service returned a malformed access_token", endpoint=TOKEN_ENDPOINT)
    token_type = body.get("token_type", "Bearer")
    if isinstance(token_type, str) and token_type.lower() != "bearer":
        raise AuthenticationError(f"the token service returned token_type {token_type[:20]!r}, not Bearer", endpoint=TOKEN_ENDPOINT)
    expires_in = body.get("expires_in")
    if isinstance(expires_in, bool) or not isinstance(expires_in, int | float) or expires_in <= 0:
        expires_in = DEFAULT_EXPIRES_IN
    return Sensitive(token), float(expires_in)


TOKEN_ENDPOINT = "POST /oidc/token"


def exchange_error(status: int, body: Any) -> AuthenticationError:
    """Translate a non-200 answer of the token exchange (already known not to be transient)."""
    error = body.get("error") if isinstance(body, dict) else None
    description = body.get("error_description") if isinstance(body, dict) else None
    text = " ".join(str(x) for x in (error, description) if isinstance(x, str))
    if status in (401, 403):
        return AuthenticationError(
            "CybeDefend refused the personal access token: it is invalid, expired or revoked; "
            "create a new PAT and update cybedefend.auth",
            status=status,
            endpoint=TOKEN_ENDPOINT,
        )
    if status == 400 and "token_exchange_not_allowed" in text:
        return AuthenticationError(
            "token_exchange_not_allowed: the client id used is not CybeDefend's CLI app "
            "(GET /client-apps, field cli.appId)",
            status=status,
            endpoint=TOKEN_ENDPOINT,
        )
    code = error if isinstance(error, str) and re.match(r"^[a-z_]{1,40}$", error) else "unknown error"
    return AuthenticationError(f"the token exchange failed: {code}", status=status, endpoint=TOKEN_ENDPOINT)


class BearerCache:
    """The current bearer token, shared by every worker thread; one exchange at a time.

    `exchange` performs the HTTP exchange and returns (token, expires_in). It runs under the
    cache's lock, so concurrent callers that find the token stale wait for one exchange instead
    of each starting their own.
    """

    def __init__(
        self, exchange: Callable[[], tuple[Sensitive, float]], renew_margin: float, clock: Callable[[], float]
    ) -> None:
        self._exchange = exchange
        self._margin = renew_margin
        self._clock = clock
        self._lock = threading.Lock()
        self._bearer: Bearer | None = None

    def _fresh(self) -> Bearer:
        token, expires_in = self._exchange()
        now = self._clock()
        bearer = Bearer(token, expires_in, now, renew_time(now, expires_in, self._margin))
        self._bearer = bearer
        return bearer

    def get(self) -> Sensitive:
        """A token valid for a while yet, exchanging the PAT if needed."""
        with self._lock:
            bearer = self._bearer
            if bearer is None or self._clock() >= bearer.renew_at:
                bearer = self._fresh()
            return bearer.token

    def force(self) -> Bearer:
        """Exchange now, whatever the cache holds (the `check` command)."""
        with self._lock:
            return self._fresh()

    def invalidate(self, token: Sensitive) -> None:
        """Forget `token` after a 401, unless another thread has already replaced it."""
        with self._lock:
            if self._bearer is not None and self._bearer.token == token:
                self._bearer = None
