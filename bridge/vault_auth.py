"""The bridge's authenticated session to Vault: its token's lifecycle and the HTTP paths to Vault.

One of the two modules allowed to import hvac and requests (with `bridge.vault`). It owns:
- the token, like Vault Agent: token (VAULT_TOKEN or a file re-read when it changes), approle,
  kubernetes and jwt logins; renewal at `renew_fraction` of the TTL; a new login when renewal
  fails, the max TTL nears, or a request is refused with a token that no longer works;
  capped exponential backoff with jitter between failed logins; revoke at shutdown;
- a lean, pooled keep-alive HTTP path (stdlib `http.client`) for the hot, read-only requests
  (list, scan, metadata, read), because hvac/requests costs 2-3x more CPU per request and
  discovery makes thousands of them; hvac is used for logins, token calls, capabilities and
  KV writes, where convenience beats speed;
- translation of every library exception and error status into `bridge.errors`, with messages
  that name the operation and the path, never a token or a value.
"""

from __future__ import annotations

import http.client
import json
import os
import queue
import random
import ssl
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import hvac
import hvac.exceptions
import requests

from bridge.config import VaultSettings
from bridge.errors import VaultAuthError, VaultError, VaultInvalidRequest, VaultPermissionDenied, VaultUnavailable
from bridge.logs import get_logger, redact_text, register_secret
from bridge.metrics import Metrics
from bridge.model import Sensitive

log = get_logger(__name__)
T = TypeVar("T")

# Request kinds: the keys of request_counts() and the `operation` label of vault_requests.
KINDS = ("list", "scan", "metadata", "read", "login", "renew", "lookup", "revoke", "capabilities", "mounts", "state")
DEFAULT_K8S_JWT = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
_IDEMPOTENT = frozenset({"GET", "LIST", "SCAN"})
_STALE = (http.client.RemoteDisconnected, http.client.BadStatusLine, ConnectionResetError, BrokenPipeError)
LOGIN_BACKOFF_BASE = 1.0  # seconds; doubles per consecutive failed login
LOGIN_BACKOFF_CAP = 60.0
VALIDATED_FOR = 5.0  # a token proven valid this recently is not looked up again after a 403


def _vault_message(errors: Any) -> str:
    """Vault's own error text, short and redacted (it names paths, never tokens, but be sure)."""
    if isinstance(errors, list | tuple):
        text = "; ".join(str(e).strip() for e in errors if str(e).strip())
    else:
        text = str(errors or "").strip()
    text = " ".join(text.replace("1 error occurred:", "").split())
    return redact_text(text[:200])


def error_for_status(status: int, operation: str, path: str, errors: Any = None) -> VaultError:
    """The bridge error for a Vault HTTP error status (404 is handled by callers: not an error)."""
    detail = _vault_message(errors)
    where = f"Vault {operation} {path}: HTTP {status}" + (f" {detail}" if detail else "")
    if status in (401, 403):
        return VaultPermissionDenied(f"{where} (permission denied)")
    if status in (400, 405, 404):
        return VaultInvalidRequest(where)
    if status == 429 or status == 412 or status >= 500:
        # 503: sealed or standby; 412: a performance standby not yet consistent; 429: rate limited
        return VaultUnavailable(where)
    return VaultInvalidRequest(where)


def translate(exc: BaseException, operation: str, path: str) -> VaultError:
    """Map an hvac, requests or socket exception to the bridge's tree. Never includes a token."""
    if isinstance(exc, VaultError):
        return exc
    if isinstance(exc, hvac.exceptions.VaultError):
        status = {
            hvac.exceptions.InvalidRequest: 400,
            hvac.exceptions.Unauthorized: 401,
            hvac.exceptions.Forbidden: 403,
            hvac.exceptions.InvalidPath: 404,
            hvac.exceptions.UnsupportedOperation: 405,
            hvac.exceptions.PreconditionFailed: 412,
            hvac.exceptions.RateLimitExceeded: 429,
            hvac.exceptions.InternalServerError: 500,
            hvac.exceptions.VaultNotInitialized: 501,
            hvac.exceptions.BadGateway: 502,
            hvac.exceptions.VaultDown: 503,
        }.get(type(exc), 500)
        return error_for_status(status, operation, path, exc.errors)
    if isinstance(exc, requests.exceptions.Timeout | TimeoutError):
        return VaultUnavailable(f"Vault {operation} {path}: timed out")
    if isinstance(exc, requests.exceptions.SSLError | ssl.SSLError):
        return VaultUnavailable(f"Vault {operation} {path}: TLS error ({type(exc).__name__})")
    if isinstance(exc, requests.exceptions.RequestException | OSError | http.client.HTTPException):
        return VaultUnavailable(f"Vault {operation} {path}: connection failed ({type(exc).__name__})")
    if isinstance(exc, ValueError):  # a JSON body that does not parse: a proxy page, a truncated answer
        return VaultUnavailable(f"Vault {operation} {path}: unreadable response")
    return VaultError(f"Vault {operation} {path}: unexpected {type(exc).__name__}")


def ssl_context(settings: VaultSettings) -> ssl.SSLContext:
    tls = settings.tls
    ctx = ssl.create_default_context(cafile=str(tls.ca_cert) if tls.ca_cert else None)
    if tls.client_cert is not None:
        ctx.load_cert_chain(str(tls.client_cert), str(tls.client_key) if tls.client_key else None)
    if tls.skip_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


class RateLimiter:
    """Token bucket shared by all threads; a reservation model, so waiters queue fairly."""

    def __init__(self, rate: float | None, clock: Callable[[], float], sleep: Callable[[float], None]) -> None:
        self._rate = rate
        self._clock, self._sleep = clock, sleep
        self._burst = max(1.0, rate or 1.0)
        self._tokens = self._burst
        self._last = clock()
        self._lock = threading.Lock()

    def acquire(self) -> None:
        if self._rate is None:
            return
        with self._lock:
            now = self._clock()
            self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
            self._last = now
            self._tokens -= 1
            wait = -self._tokens / self._rate if self._tokens < 0 else 0.0
        if wait > 0:
            self._sleep(wait)


class ConnectionPool:
    """Keep-alive `http.client` connections to one Vault address, reused across threads.

    Proxies are not used (Vault is normally reached directly or through a sidecar).
    """

    def __init__(self, settings: VaultSettings, size: int) -> None:
        url = urlsplit(settings.address)
        self._https = url.scheme == "https"
        self._host = url.hostname or "127.0.0.1"
        self._port = url.port or (443 if self._https else 80)
        self.prefix = url.path.rstrip("/")
        self._timeout = settings.timeout_seconds
        self._ctx = ssl_context(settings) if self._https else None
        self._idle: queue.LifoQueue[http.client.HTTPConnection] = queue.LifoQueue(maxsize=size)

    def _new(self) -> http.client.HTTPConnection:
        if self._https:
            return http.client.HTTPSConnection(self._host, self._port, timeout=self._timeout, context=self._ctx)
        return http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)

    def request(self, method: str, target: str, headers: Mapping[str, str], body: bytes | None) -> tuple[int, bytes]:
        for attempt in (0, 1):
            try:
                conn, reused = self._idle.get_nowait(), True
            except queue.Empty:
                conn, reused = self._new(), False
            try:
                conn.request(method, self.prefix + target, body=body, headers=dict(headers))
                resp = conn.getresponse()
                data = resp.read()
            except _STALE:
                conn.close()
                # A pooled connection the server closed while idle: try once on a fresh one.
                if reused and attempt == 0 and method in _IDEMPOTENT:
                    continue
                raise
            except BaseException:
                conn.close()
                raise
            if resp.will_close:
                conn.close()
            else:
                try:
                    self._idle.put_nowait(conn)
                except queue.Full:
                    conn.close()
            return resp.status, data
        raise AssertionError("unreachable")  # pragma: no cover

    def close(self) -> None:
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                return


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


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    doc: dict[str, Any] | None


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
        self._pool = ConnectionPool(settings, size=settings.concurrency + 2)
        self._limiter = RateLimiter(settings.max_requests_per_second, clock, sleep)
        self._auth_lock = threading.RLock()
        self._hvac_lock = threading.Lock()
        self._count_lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._token: _Token | None = None
        self._generation = 0
        self._validated_at: float | None = None
        self._file_sig: tuple[int, int, int] | None = None
        self._login_failures = 0
        self._login_not_before = float("-inf")
        self._client = hvac.Client(
            url=settings.address,
            token="",  # never let hvac read VAULT_TOKEN or ~/.vault-token on its own
            verify=False if settings.tls.skip_verify else (str(settings.tls.ca_cert) if settings.tls.ca_cert else True),
            cert=(str(settings.tls.client_cert), str(settings.tls.client_key)) if settings.tls.client_cert else (),
            timeout=settings.timeout_seconds,
            namespace=settings.namespace,
        )
        self._client.session.trust_env = False  # same behaviour as the lean path: no proxy, no netrc
        self._headers = {"Content-Type": "application/json"}
        if settings.namespace:
            self._headers["X-Vault-Namespace"] = settings.namespace
        if settings.tls.skip_verify:
            log.warning("vault_tls_verify_disabled", address=settings.address, reason="vault.tls.skip_verify is set")

    # --- accounting ----------------------------------------------------------------------

    def _record(self, kind: str, result: str) -> None:
        with self._count_lock:
            self._counts[kind] += 1
        self._metrics.vault_requests.labels(operation=kind, result=result).inc()

    def request_counts(self) -> dict[str, int]:
        with self._count_lock:
            out = dict(self._counts)
            self._counts.clear()
        return out

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

    def current(self) -> tuple[Sensitive, int]:
        """The token to use now and its generation; logs in or renews first when due."""
        tok = self._token
        if tok is not None and (tok.renew_at is None or self._clock() < tok.renew_at) and not self._token_file_changed():
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

    def _token_file_changed(self) -> bool:
        path = self._auth.token_file
        if self._auth.method != "token" or path is None or self._token is None:
            return False
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
        register_secret(value)
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
                log.warning("vault_login_failed", method=self._auth.method, reason=reason, error=str(exc), retry_in=round(delay, 2))
                if isinstance(exc, VaultUnavailable) and attempt < 2:
                    self._sleep(delay)
                    continue
                if isinstance(exc, VaultAuthError):
                    raise
                raise VaultAuthError(f"Vault login ({self._auth.method}) failed: {exc}") from exc
            self._login_failures = 0
            self._login_not_before = float("-inf")
            self._validated_at = self._clock()
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
                register_secret(value)
            token = Sensitive(value)
            try:
                data = self._hvac("lookup", "auth/token/lookup-self", lambda c: c.auth.token.lookup_self(), token=token)
            except VaultPermissionDenied:
                raise VaultAuthError("Vault refused the configured token (expired, revoked or wrong)") from None
            d = (data or {}).get("data") or {}
            ttl = float(d.get("ttl") or 0)
            return self._new_token(token, False, ttl, bool(d.get("renewable")), float(d.get("creation_ttl") or ttl))
        if a.method == "approle":
            assert a.role_id_file is not None and a.secret_id_file is not None  # validated by config
            role_id = self._read_file(a.role_id_file, "vault.auth.role_id_file")
            secret_id = self._read_file(a.secret_id_file, "vault.auth.secret_id_file")
            resp = self._hvac(
                "login", f"auth/{mount}/login",
                lambda c: c.auth.approle.login(role_id=role_id, secret_id=secret_id, use_token=False, mount_point=mount),
                token=None,
            )
        else:
            path = a.jwt_file or DEFAULT_K8S_JWT
            jwt = self._read_file(path, "vault.auth.jwt_file")
            if a.method == "kubernetes":
                fn: Callable[[Any], Any] = lambda c: c.auth.kubernetes.login(role=a.role, jwt=jwt, use_token=False, mount_point=mount)  # noqa: E731
            else:
                fn = lambda c: c.auth.jwt.jwt_login(role=a.role, jwt=jwt, use_token=False, path=mount)  # noqa: E731
            resp = self._hvac("login", f"auth/{mount}/login", fn, token=None)
        auth = (resp or {}).get("auth") or {}
        value = auth.get("client_token")
        if not value:
            raise VaultAuthError(f"Vault login at auth/{mount}/login returned no token")
        register_secret(value)
        ttl = float(auth.get("lease_duration") or 0)
        return self._new_token(Sensitive(value), True, ttl, bool(auth.get("renewable")), ttl)

    def _new_token(self, value: Sensitive, self_issued: bool, ttl: float, renewable: bool, increment: float) -> _Token:
        self._generation += 1
        now = self._clock()
        return _Token(
            value, self._generation, self_issued, ttl, renewable, increment,
            expires_at=now + ttl if ttl > 0 else None,
            renew_at=now + ttl * self.settings.renew_fraction if ttl > 0 else None,
        )

    def _renew_locked(self, tok: _Token) -> None:
        now = self._clock()
        increment = int(tok.increment or tok.ttl)
        try:
            resp = self._hvac(
                "renew", "auth/token/renew-self", lambda c: c.auth.token.renew_self(increment=f"{increment}s"), token=tok.value
            )
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
        if ttl + 1 < increment:  # capped by the max TTL: renewing will not get us further
            tok.relogin_due = self.can_login
            if tok.relogin_due and tok.renew_at is None:
                tok.renew_at = now
        log.info("vault_token_renewed", ttl=ttl, max_ttl_near=ttl + 1 < increment)

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
                    self._hvac("lookup", "auth/token/lookup-self", lambda c: c.auth.token.lookup_self(), token=tok.value)
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
                self._hvac("revoke", "auth/token/revoke-self", lambda c: c.auth.token.revoke_self(), token=tok.value)
                log.info("vault_token_revoked")
            except VaultError as exc:
                log.warning("vault_revoke_failed", error=str(exc))
            self._token = None

    def close(self) -> None:
        if self.settings.revoke_on_shutdown:
            self.revoke_self()
        self._pool.close()
        with self._hvac_lock:
            self._client.adapter.close()

    # --- requests ------------------------------------------------------------------------

    def _hvac(self, kind: str, path: str, fn: Callable[[Any], T], *, token: Sensitive | None) -> T:
        """One hvac call with a given token, its exceptions translated, counted and measured."""
        self._limiter.acquire()
        with self._hvac_lock:
            self._client.token = token.reveal() if token is not None else ""
            try:
                with warnings.catch_warnings():
                    if self.settings.tls.skip_verify:  # already said once, at start
                        warnings.simplefilter("ignore")
                    result = fn(self._client)
            except Exception as exc:
                err = translate(exc, kind, path)
                self._record(kind, _result_label(err))
                raise err from exc
            finally:
                self._client.token = ""
        self._record(kind, "ok")
        return result

    def call_hvac(self, kind: str, path: str, fn: Callable[[Any], T], *, missing: T) -> T:
        """An hvac call with the current token; `missing` on 404; one fresh token after a refusal."""
        for attempt in (0, 1):
            token, gen = self.current()
            try:
                return self._hvac(kind, path, fn, token=token)
            except VaultInvalidRequest as exc:
                if isinstance(exc.__cause__, hvac.exceptions.InvalidPath):
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
            token, gen = self.current()
            status, doc = self._send(kind, method, path, query, token)
            if status < 300 or status == 404 or status in passthrough:
                return Response(status, doc)
            if status in (401, 403) and attempt == 0 and self.on_denied(gen):
                continue
            raise error_for_status(status, kind, path, (doc or {}).get("errors"))
        raise AssertionError("unreachable")  # pragma: no cover

    def _send(self, kind: str, method: str, path: str, query: str, token: Sensitive) -> tuple[int, dict[str, Any] | None]:
        self._limiter.acquire()
        headers = dict(self._headers)
        headers["X-Vault-Token"] = token.reveal()
        target = f"/v1/{path}" + (f"?{query}" if query else "")
        try:
            status, raw = self._pool.request(method, target, headers, None)
            doc = json.loads(raw) if raw else None
        except Exception as exc:
            err = translate(exc, kind, path)
            self._record(kind, "unavailable")
            raise err from None  # the socket error adds nothing and may carry request details
        self._record(kind, _status_label(status))
        return status, doc if isinstance(doc, dict) else None


def _status_label(status: int) -> str:
    if status < 300:
        return "ok"
    if status == 404:
        return "not_found"
    if status in (401, 403):
        return "denied"
    if status >= 500 or status in (412, 429):
        return "unavailable"
    return "invalid"


def _result_label(err: VaultError) -> str:
    if isinstance(err, VaultPermissionDenied):
        return "denied"
    if isinstance(err, VaultUnavailable):
        return "unavailable"
    if isinstance(err, VaultInvalidRequest) and "HTTP 404" in str(err):
        return "not_found"
    return "invalid"
