"""The bridge's Vault session: its token's lifecycle, and every request made with that token.

Every routine call (token lookup, renewal, revocation, logins, the KV v2 state) goes through the
lean path of `bridge.vault.transport`, never hvac (docs/adr/0015-no-hvac-on-the-routine-path.md).
Like Vault Agent: token auth (VAULT_TOKEN, or a file re-read when it changes, e.g. an Agent
sink), approle, kubernetes and jwt logins; renewal at `vault.renew_fraction` of the TTL; a new
login when renewal fails, the max TTL nears, or a request is refused with a token that no
longer works (a 403 with a working token is the policy's answer and is not retried); capped
exponential backoff with jitter between failed logins, never a tight loop; revoke at shutdown.
Tokens are registered for log redaction the moment they are read.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

from bridge.config import VaultSettings
from bridge.errors import VaultAuthError, VaultError, VaultInvalidRequest, VaultPermissionDenied, VaultUnavailable
from bridge.logs import get_logger, register_secret
from bridge.metrics import Metrics
from bridge.model import Sensitive
from bridge.vault.transport import Response, VaultTransport, ambiguous_404, error_for_status, is_vault_404, routine_error

log = get_logger(__name__)
T = TypeVar("T")

DEFAULT_K8S_JWT = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
LOGIN_BACKOFF_BASE = 1.0  # seconds; doubles per consecutive failed login
LOGIN_BACKOFF_CAP = 60.0
VALIDATED_FOR = 2.0  # a token a lookup proved valid this recently is not looked up again after a 403
# A steady pass makes thousands of requests; a stat of the token file before each one was ~20 µs
# of a ~200 µs request. Within a pass it is looked at this often; each pass's first request
# looks at it again (`recheck_token_file`), so a rewritten sink is still adopted by the next pass.
TOKEN_FILE_RECHECK = 0.05


@dataclass
class _Token:
    value: Sensitive
    generation: int
    self_issued: bool  # logged in by the bridge (ours to renew by re-login and to revoke)
    ttl: float  # seconds, as last reported; 0: does not expire
    renewable: bool
    increment: float  # what to ask for at renewal: the token's creation TTL
    expires_at: float | None  # clock() time
    renew_at: float | None  # clock() time of the next renewal or re-login; None: nothing to do
    relogin_due: bool = False  # the max TTL nears: the next maintenance logs in again


class VaultSession:
    """The token and every request made with it. Thread-safe: discovery calls it from workers."""

    def __init__(
        self,
        settings: VaultSettings,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.settings = settings
        self._auth = settings.auth
        self._metrics = metrics
        self._clock, self._sleep = clock, sleep
        self._rng = rng or random.Random()
        self._env = os.environ if env is None else env
        self.transport = VaultTransport(settings, metrics, clock=clock, sleep=sleep)
        self._auth_lock = threading.RLock()
        self._token: _Token | None = None
        self._generation = 0
        self._validated_at: float | None = None
        self._file_sig: tuple[int, int, int] | None = None
        self._file_checked = float("-inf")  # time.monotonic() of the last look at the token file
        self._login_failures = 0
        self._login_not_before = float("-inf")

    # --- state ---------------------------------------------------------------------------

    def request_counts(self) -> dict[str, int]:
        return self.transport.request_counts()

    @property
    def can_login(self) -> bool:
        return self._auth.method != "token"

    @property
    def generation(self) -> int:
        return self._generation

    # --- the token -----------------------------------------------------------------------

    def token_ttl(self) -> float | None:
        """Seconds left on the token (None: not logged in or it does not expire); sets the gauge."""
        tok = self._token
        if tok is None or tok.expires_at is None:
            return None
        left = max(0.0, tok.expires_at - self._clock())
        self._metrics.vault_token_ttl.set(left)
        return left

    def recheck_token_file(self) -> None:
        """The next request looks at the token file, however recently it was looked at (a pass starts)."""
        self._file_checked = float("-inf")

    def current(self, *, throttled: bool = False) -> tuple[Sensitive, int]:
        """The token to use now and its generation; logs in or renews first when due.

        `throttled` (the lean reads of a pass): the token file is looked at no more often than
        every TOKEN_FILE_RECHECK seconds, and at each pass's start."""
        tok = self._token
        if tok is not None and (tok.renew_at is None or self._clock() < tok.renew_at) and not self._token_file_changed(
            throttled=throttled
        ):
            return tok.value, tok.generation
        self.maintain()
        tok = self._token
        if tok is None:  # pragma: no cover - maintain() raises instead
            raise VaultAuthError("not logged in to Vault")
        return tok.value, tok.generation

    def login(self) -> None:
        with self._auth_lock:
            self._login_locked("requested")

    def maintain(self) -> float:
        """Log in, adopt a changed token file, renew or log in again, whichever is due.

        Returns the seconds until something is next due, for a renewer loop.
        """
        with self._auth_lock:
            tok = self._token
            if tok is None:
                self._login_locked("start")
            elif self._token_file_changed():
                self._login_locked("token_file_changed")
            elif tok.renew_at is not None and self._clock() >= tok.renew_at:
                if tok.relogin_due or not tok.renewable:
                    if self.can_login:
                        self._relogin_soft(tok, "max_ttl" if tok.relogin_due else "ttl")
                    else:
                        tok.renew_at = None  # a static token: use it until Vault refuses it
                else:
                    self._renew_locked(tok)
            tok = self._token
            self.token_ttl()
            nxt = 60.0 if tok is None or tok.renew_at is None else max(0.0, tok.renew_at - self._clock())
            return min(nxt, 5.0) if self._auth.token_file is not None else nxt

    def _token_file_changed(self, *, throttled: bool = False) -> bool:
        path = self._auth.token_file
        if self._auth.method != "token" or path is None or self._token is None:
            return False
        if throttled:
            # The real clock, not the injected one: this only spaces out a syscall, and a test's
            # frozen clock must not stop the file from ever being looked at again.
            now = time.monotonic()
            if now - self._file_checked < TOKEN_FILE_RECHECK:
                return False
            self._file_checked = now
        try:
            st = path.stat()
        except OSError:
            return False  # a sink being rewritten; keep the current token
        return (st.st_ino, st.st_mtime_ns, st.st_size) != self._file_sig

    def _read_file(self, path: Path, what: str) -> str:
        try:
            value = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise VaultAuthError(f"cannot read {what} file {path}: {exc.strerror}") from None
        if not value:
            raise VaultAuthError(f"{what} file {path} is empty")
        register_secret(value, pinned=True)
        return value

    def _login_locked(self, reason: str) -> None:
        now = self._clock()
        if now < self._login_not_before:
            raise VaultAuthError(
                f"Vault login ({self._auth.method}) backing off for {self._login_not_before - now:.1f}s "
                f"after {self._login_failures} failure(s)"
            )
        for attempt in range(3):
            try:
                self._token = self._do_login()
            except VaultError as exc:
                self._metrics.vault_logins.labels(result="failed").inc()
                self._login_failures += 1
                delay = min(LOGIN_BACKOFF_CAP, LOGIN_BACKOFF_BASE * 2 ** (self._login_failures - 1))
                delay *= 0.5 + self._rng.random() / 2  # jitter, never below half: no tight loop
                self._login_not_before = self._clock() + delay
                log.warning(
                    "vault_login_failed", method=self._auth.method, reason=reason, error=str(exc), retry_in=round(delay, 2)
                )
                if isinstance(exc, VaultUnavailable) and attempt < 2:
                    self._sleep(delay)
                    continue
                if isinstance(exc, VaultAuthError):
                    raise
                raise VaultAuthError(f"Vault login ({self._auth.method}) failed: {exc}") from exc
            self._login_failures = 0
            self._login_not_before = float("-inf")
            self._validated_at = None
            self._metrics.vault_logins.labels(result="ok").inc()
            log.info("vault_login", method=self._auth.method, reason=reason, ttl=self._token.ttl, renewable=self._token.renewable)
            return

    def _do_login(self) -> _Token:
        a = self._auth
        mount = a.mount or a.method
        if a.method == "token":
            if a.token_file is not None:
                st = a.token_file.stat() if a.token_file.exists() else None
                value = self._read_file(a.token_file, "vault.auth.token_file")
                self._file_sig = (st.st_ino, st.st_mtime_ns, st.st_size) if st else None
            else:
                value = self._env.get("VAULT_TOKEN", "").strip()
                if not value:
                    raise VaultAuthError("token auth: neither VAULT_TOKEN nor vault.auth.token_file is set")
                register_secret(value, pinned=True)
            token = Sensitive(value)
            try:
                data = self._routine("lookup", "GET", "auth/token/lookup-self", token=token)
            except VaultPermissionDenied:
                raise VaultAuthError("Vault refused the configured token (expired, revoked or wrong)") from None
            d = (data or {}).get("data") or {}
            ttl = float(d.get("ttl") or 0)
            return self._new_token(token, False, ttl, bool(d.get("renewable")), float(d.get("creation_ttl") or ttl))
        if a.method == "approle":
            assert a.role_id_file is not None and a.secret_id_file is not None  # validated by config
            role_id = self._read_file(a.role_id_file, "vault.auth.role_id_file")
            secret_id = self._read_file(a.secret_id_file, "vault.auth.secret_id_file")
            body: dict[str, Any] = {"role_id": role_id, "secret_id": secret_id}
        else:
            # kubernetes and jwt send the same body (as hvac's kubernetes.login and jwt.jwt_login did)
            body = {"role": a.role, "jwt": self._read_file(a.jwt_file or DEFAULT_K8S_JWT, "vault.auth.jwt_file")}
        resp = self._routine("login", "POST", f"auth/{quote(mount)}/login", token=None, body=body)
        auth = (resp or {}).get("auth") or {}
        client_token = auth.get("client_token")
        if not isinstance(client_token, str) or not client_token:
            raise VaultAuthError(f"Vault login at auth/{mount}/login returned no token")
        register_secret(client_token, pinned=True)
        ttl = float(auth.get("lease_duration") or 0)
        return self._new_token(Sensitive(client_token), True, ttl, bool(auth.get("renewable")), ttl)

    def _new_token(self, value: Sensitive, self_issued: bool, ttl: float, renewable: bool, increment: float) -> _Token:
        self._generation += 1
        now = self._clock()
        return _Token(
            value,
            self._generation,
            self_issued,
            ttl,
            renewable,
            increment,
            expires_at=now + ttl if ttl > 0 else None,
            renew_at=now + ttl * self.settings.renew_fraction if ttl > 0 else None,
        )

    def _renew_locked(self, tok: _Token) -> None:
        now = self._clock()
        increment = int(tok.increment or tok.ttl)
        try:
            resp = self._routine("renew", "POST", "auth/token/renew-self", token=tok.value, body={"increment": f"{increment}s"})
        except VaultError as exc:
            self._metrics.vault_renewals.labels(result="failed").inc()
            log.warning("vault_renew_failed", method=self._auth.method, error=str(exc))
            if self.can_login:
                self._relogin_soft(tok, "renew_failed")
            else:
                left = (tok.expires_at - now) if tok.expires_at is not None else 0.0
                tok.renew_at = now + max(1.0, left / 2) if left > 2 else None
            return
        ttl = float(((resp or {}).get("auth") or {}).get("lease_duration") or 0)
        self._metrics.vault_renewals.labels(result="ok").inc()
        tok.ttl, tok.expires_at = ttl, (now + ttl if ttl > 0 else None)
        tok.renew_at = now + ttl * self.settings.renew_fraction if ttl > 2 else None
        if ttl < increment:  # capped by the max TTL: renewing will not get us further (as Vault Agent judges)
            tok.relogin_due = self.can_login
            if tok.relogin_due and tok.renew_at is None:
                tok.renew_at = now
        log.info("vault_token_renewed", ttl=ttl, max_ttl_near=ttl < increment)

    def _relogin_soft(self, tok: _Token, reason: str) -> None:
        """Log in again ahead of expiry; if that fails, keep the old token while it lasts."""
        try:
            self._login_locked(reason)
        except VaultAuthError:
            now = self._clock()
            if tok.expires_at is not None and tok.expires_at - now <= 1:
                raise
            tok.renew_at = max(self._login_not_before, now + 1.0)

    def on_denied(self, generation: int) -> bool:
        """A request with token `generation` got 403. True: retry with a fresh token.

        A 403 means either the policy says no (retrying is pointless) or the token no longer
        works (expired or revoked). A lookup-self tells them apart; only the second logs in again.
        """
        with self._auth_lock:
            if self._generation != generation:
                return True  # another thread already replaced the token
            now = self._clock()
            if self._validated_at is not None and now - self._validated_at < VALIDATED_FOR:
                return False
            tok = self._token
            if tok is not None:
                try:
                    self._routine("lookup", "GET", "auth/token/lookup-self", token=tok.value)
                    self._validated_at = now
                    return False
                except VaultPermissionDenied:
                    pass
            self._login_locked("token_refused")
            return True

    def revoke_self(self) -> None:
        """Revoke the token if the bridge logged in itself (a given token belongs to someone else)."""
        with self._auth_lock:
            tok = self._token
            if tok is None or not tok.self_issued:
                return
            try:
                self._routine("revoke", "POST", "auth/token/revoke-self", token=tok.value)
                log.info("vault_token_revoked")
            except VaultError as exc:
                log.warning("vault_revoke_failed", error=str(exc))
            self._token = None

    def close(self) -> None:
        if self.settings.revoke_on_shutdown:
            self.revoke_self()
        self.transport.close()

    # --- requests ------------------------------------------------------------------------

    def _routine(
        self, kind: str, method: str, path: str, *, token: Sensitive | None, body: Mapping[str, Any] | None = None
    ) -> dict[str, Any] | None:
        """One routine call made with `token` (None: a login), its answer read as hvac's was:
        the JSON document of a 2xx, else the error `routine_error` gives (a bare 404: ambiguous)."""
        status, doc = self.transport.send(kind, method, path, "", token, _json(body), lenient_errors=True)
        if status < 300:
            return doc
        if status == 404 and not is_vault_404(doc):
            raise ambiguous_404(kind, path)
        raise routine_error(status, kind, path, (doc or {}).get("errors"))

    def call(
        self, kind: str, method: str, path: str, *, body: Mapping[str, Any] | None = None,
        passthrough: frozenset[int] = frozenset(),
    ) -> Response | None:
        """A routine call with the current token to `/v1/<path>` (already quoted), read as
        `call_hvac` read hvac's answers: None on Vault's own 404 (a missing path, a deleted
        version, no handler: hvac's InvalidPath, the callers' "missing"), VaultAmbiguous on a bare
        404 (a proxy's: never "gone"), `passthrough` statuses returned, other errors raised
        (`routine_error`); one fresh token after a refusal."""
        data = _json(body)
        for attempt in (0, 1):
            token, gen = self.current()
            status, doc = self.transport.send(kind, method, path, "", token, data, lenient_errors=True)
            if status == 404:
                if not is_vault_404(doc):
                    raise ambiguous_404(kind, path)
                return None
            if status < 300 or status in passthrough:
                return Response(status, doc)
            if status in (401, 403) and attempt == 0 and self.on_denied(gen):
                continue
            raise routine_error(status, kind, path, (doc or {}).get("errors"))
        raise AssertionError("unreachable")  # pragma: no cover

    def call_hvac(self, kind: str, path: str, fn: Callable[[Any], T], *, missing: T) -> T:
        """An hvac call with the current token (rare calls only: ADR 15); `missing` on 404; one
        fresh token after a refusal."""
        for attempt in (0, 1):
            token, gen = self.current()
            try:
                return self.transport.hvac(kind, path, fn, token)
            except VaultInvalidRequest as exc:
                from bridge.vault.hvac_client import is_invalid_path  # loaded already: hvac just ran

                if is_invalid_path(exc.__cause__):
                    return missing
                raise
            except VaultPermissionDenied:
                if attempt == 0 and self.on_denied(gen):
                    continue
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    def request(
        self, kind: str, method: str, path: str, *, query: str = "", passthrough: frozenset[int] = frozenset()
    ) -> Response:
        """A lean request to `/v1/<path>` (path already quoted). 404 and `passthrough` statuses
        come back as a Response; other errors raise. One fresh token after a refusal."""
        for attempt in (0, 1):
            token, gen = self.current(throttled=True)
            status, doc = self.transport.send(kind, method, path, query, token)
            if status == 404 and not is_vault_404(doc):
                raise ambiguous_404(kind, path)
            if status == 404 and (doc or {}).get("errors"):
                # "no handler for route": the mount itself is gone (disabled, moved, mid-restore).
                # A missing secret or empty folder answers 404 with `"errors": []`; this must not
                # be read as "no secrets", or every credential of the source would be retired.
                raise error_for_status(status, kind, path, (doc or {}).get("errors"))
            if status < 300 or status == 404 or status in passthrough:
                return Response(status, doc)
            if status in (401, 403) and attempt == 0 and self.on_denied(gen):
                continue
            raise error_for_status(status, kind, path, (doc or {}).get("errors"))
        raise AssertionError("unreachable")  # pragma: no cover


def _json(body: Mapping[str, Any] | None) -> bytes | None:
    return None if body is None else json.dumps(body, separators=(",", ":")).encode("utf-8")
