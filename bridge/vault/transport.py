"""The transport to Vault: pooled HTTP, the hvac client, rate limit, accounting, error translation.

Two paths reach Vault:
- a lean, pooled keep-alive path (`bridge.http1`: our socket, httptools' parser) for every routine request: the
  hot reads of discovery (list, scan, metadata, read), because hvac/requests costs 2-3x more CPU
  per request and discovery makes thousands of them (ADR 10), and the daemon's token calls,
  logins and KV v2 state reads and check-and-set writes (JSON bodies), because hvac with
  requests costs ~6-7 MiB of resident memory for a few requests an hour (ADR 15);
- hvac, imported on first use (`bridge.vault.hvac_client`), for the rare rest: `check`'s
  sys/capabilities-self.
Both share one rate limiter (the token bucket of `bridge.retry`), one request counter and the `vault_requests` metric, and every
library exception or error status leaves this module as a `bridge.errors.VaultError` whose
message names the operation and the path, never a token or a value. Tokens are passed per
call; this module keeps none.
"""

from __future__ import annotations

import http.client
import json
import ssl
import sys
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

from bridge.config import VaultSettings
from bridge.errors import VaultAmbiguous, VaultError, VaultInvalidRequest, VaultPermissionDenied, VaultUnavailable
from bridge.http1 import Conn, Pool, host_header
from bridge.logs import get_logger, redact_text
from bridge.metrics import Metrics
from bridge.model import Sensitive
from bridge.retry import TokenBucket

log = get_logger(__name__)
T = TypeVar("T")

# Request kinds: the keys of request_counts() and the `operation` label of vault_requests.
KINDS = ("list", "scan", "metadata", "read", "login", "renew", "lookup", "revoke", "capabilities", "mounts", "state")
_IDEMPOTENT = frozenset({"GET", "LIST", "SCAN"})


def _vault_message(errors: Any) -> str:
    """Vault's own error text, short and redacted (it names paths, never tokens, but be sure)."""
    if isinstance(errors, list | tuple):
        text = "; ".join(str(e).strip() for e in errors if str(e).strip())
    else:
        text = str(errors or "").strip()
    text = " ".join(text.replace("1 error occurred:", "").split())
    return redact_text(text[:200])


def is_vault_404(doc: Any) -> bool:
    """True when a 404's body is Vault's own answer: `{"errors": [...]}` (a missing path, an empty
    folder) or a KV v2 document with `data` (a deleted version's metadata). A bare 404 (no body,
    HTML, a proxy's text) is not proof that anything is gone."""
    return isinstance(doc, dict) and (isinstance(doc.get("errors"), list) or isinstance(doc.get("data"), dict))


def ambiguous_404(operation: str, path: str) -> VaultAmbiguous:
    return VaultAmbiguous(
        f"Vault {operation} {path}: HTTP 404 with no Vault error document (a proxy or ingress answered?); "
        "not treated as absent"
    )


def error_for_status(status: int, operation: str, path: str, errors: Any = None, *, judged_as: int | None = None) -> VaultError:
    """The bridge error for a Vault HTTP error status (404 is handled by callers: not an error).
    `judged_as`: the status whose class to give (the message keeps the real one)."""
    detail = _vault_message(errors)
    where = f"Vault {operation} {path}: HTTP {status}" + (f" {detail}" if detail else "")
    status = status if judged_as is None else judged_as
    if status in (401, 403):
        return VaultPermissionDenied(f"{where} (permission denied)")
    if status in (400, 405, 404):
        return VaultInvalidRequest(where)
    if status == 429 or status == 412 or status >= 500:
        # 503: sealed or standby; 412: a performance standby not yet consistent; 429: rate limited
        return VaultUnavailable(where)
    return VaultInvalidRequest(where)


# The statuses hvac gives an exception class of their own (hvac.exceptions.VaultError.from_status);
# any other error status is its UnexpectedError, which `translate` reads as a 500.
_HVAC_STATUSES = frozenset({400, 401, 403, 404, 429, 500, 501, 502, 503})


def routine_error(status: int, operation: str, path: str, errors: Any = None) -> VaultError:
    """The bridge error for an error status of a routine call that hvac used to make (token calls,
    logins, state reads and writes): the class `translate` gave hvac's exception for that status,
    so moving these calls to the lean path changed no caller's reading of a failure. A redirect
    counts as an error here (the lean path follows none, as for discovery: ADR 10)."""
    return error_for_status(status, operation, path, errors, judged_as=status if status in _HVAC_STATUSES else 500)


def tls_detail(exc: BaseException) -> str:
    """What OpenSSL said, found through requests' and urllib3's wrappers: the verification
    failure (with a hint) or the SSL reason code. Neither ever holds a token."""
    todo: list[object] = [exc]
    seen: set[int] = set()
    reason = type(exc).__name__
    while todo:
        cur = todo.pop(0)
        if not isinstance(cur, BaseException) or id(cur) in seen:
            continue
        seen.add(id(cur))
        if isinstance(cur, ssl.SSLCertVerificationError):
            return (f"certificate verify failed: {cur.verify_message or 'untrusted certificate'}; "
                    "check vault.tls.ca_cert (the CA that signed Vault's certificate)")
        if isinstance(cur, ssl.SSLError) and cur.reason:
            reason = f"{type(cur).__name__}: {cur.reason}"
        todo.extend([cur.__cause__, cur.__context__, getattr(cur, "reason", None), *cur.args])
    return reason


def translate(exc: BaseException, operation: str, path: str) -> VaultError:
    """Map an hvac, requests or socket exception to the bridge's tree. Never includes a token."""
    if isinstance(exc, VaultError):
        return exc
    if "hvac" in sys.modules:
        # Only once hvac is loaded can `exc` be one of its (or requests') exceptions: asking
        # before would import ~6 MiB of libraries the daemon never otherwise loads (ADR 15).
        from bridge.vault.hvac_client import translate_library

        found = translate_library(exc, operation, path)
        if found is not None:
            return found
    if isinstance(exc, TimeoutError):
        return VaultUnavailable(f"Vault {operation} {path}: timed out")
    if isinstance(exc, ssl.SSLError):
        return VaultUnavailable(f"Vault {operation} {path}: TLS error ({tls_detail(exc)})")
    # requests' exceptions are OSErrors: a connection failure of either path lands here.
    if isinstance(exc, OSError | http.client.HTTPException):
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


# The connection and its parser are `bridge.http1`'s (shared with the CybeDefend transport,
# ADR 16); the name stays for the tests that drive one connection directly.
_Conn = Conn


class ConnectionPool(Pool):
    """Keep-alive connections (`bridge.http1.Conn`) to one Vault address, reused across threads.

    Proxies are not used (Vault is normally reached directly or through a sidecar).
    """

    def __init__(self, settings: VaultSettings, size: int) -> None:
        url = urlsplit(settings.address)
        https = url.scheme == "https"
        host = url.hostname or "127.0.0.1"
        port = url.port or (443 if https else 80)
        super().__init__(host, port, ssl_context(settings) if https else None, settings.timeout_seconds, size)
        self.host_header = host_header(host, port, https)
        self.prefix = url.path.rstrip("/")

    def exchange(self, method: str, request: bytes) -> tuple[int, bytes]:
        """Send `request` (a whole HTTP/1.1 request) on a pooled connection: (status, body).

        Only an idempotent method is sent again, once, after a stale pooled connection: a POST
        that may have reached Vault is never repeated blindly (a check-and-set write would then
        lose to itself, a login mint a second token)."""
        return self.request(request, idempotent=method in _IDEMPOTENT)


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    doc: dict[str, Any] | None


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
    if isinstance(err, VaultAmbiguous):
        return "ambiguous"
    if isinstance(err, VaultUnavailable):
        return "unavailable"
    if isinstance(err, VaultInvalidRequest) and "HTTP 404" in str(err):
        return "not_found"
    return "invalid"


class VaultTransport:
    """Sends requests with a given token; counts and measures them. Thread-safe."""

    def __init__(
        self,
        settings: VaultSettings,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.settings = settings
        self._metrics = metrics
        self._pool = ConnectionPool(settings, size=settings.concurrency + 2)
        # The one token bucket (bridge.retry), shared by all threads; no limit when none is configured.
        rate = settings.max_requests_per_second
        self._limiter = TokenBucket(rate, clock=clock, sleep=sleep) if rate else None
        self._hvac_lock = threading.Lock()  # the hvac client holds the token as state
        self._count_lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        tls = settings.tls
        # Made (and hvac imported) on the first rare call only: see `hvac()`.
        # Typed Any: naming hvac.Client here, even for the type checker, is an import of hvac.
        self._client: Any = None
        self._headers = {"Content-Type": "application/json"}
        if settings.namespace:
            self._headers["X-Vault-Namespace"] = settings.namespace
        self._children: dict[tuple[str, str], Any] = {}
        # The header block of the lean path for the last token seen (the token changes on a
        # login only): built and checked once, not per request. A login sends none.
        self._head: tuple[str, str] = ("", "")
        self._anonymous_head = self._header_block(None)
        if tls.skip_verify:
            log.warning("vault_tls_verify_disabled", address=settings.address, reason="vault.tls.skip_verify is set")

    def _record(self, kind: str, result: str) -> None:
        # The labelled child is looked up once per (kind, result): `labels()` takes a lock and
        # builds a key on every call, a measurable part of a ~1 KB metadata read.
        child = self._children.get((kind, result))
        if child is None:
            child = self._children[(kind, result)] = self._metrics.vault_requests.labels(operation=kind, result=result)
        with self._count_lock:
            self._counts[kind] += 1
        child.inc()

    def request_counts(self) -> dict[str, int]:
        """Requests since the last call, by kind; resets."""
        with self._count_lock:
            out = dict(self._counts)
            self._counts.clear()
        return out

    def send(
        self, kind: str, method: str, path: str, query: str, token: Sensitive | None, body: bytes | None = None,
        *, lenient_errors: bool = False,
    ) -> tuple[int, dict[str, Any] | None]:
        """One lean request to `/v1/<path>` (already quoted): (status, JSON document).

        `token` None: no X-Vault-Token (a login). `body`: a JSON request body (it may hold
        credentials, e.g. a secret_id: it is sent, never logged nor put in an error).
        `lenient_errors`: an error status whose body is no JSON (a proxy's page) comes back as
        (status, None) for the caller to read by its status, as hvac did; otherwise it raises
        VaultUnavailable (a 404 always comes back: the session decides)."""
        if self._limiter is not None:
            self._limiter.acquire()
        if token is None:
            head = self._anonymous_head
        else:
            value = token.reveal()
            seen, head = self._head
            if value != seen:
                head = self._header_block(value)
                self._head = (value, head)
        target = f"/v1/{path}?{query}" if query else f"/v1/{path}"
        try:
            line = f"{method} {self._pool.prefix}{target} HTTP/1.1\r\n"
            if body is None and method in _IDEMPOTENT:
                request = (line + head).encode("latin-1")
            else:
                # The header block ends with the blank line: Content-Length goes before it (0 for
                # a POST without body, which some proxies refuse without a length).
                data = body or b""
                request = (line + head[:-2] + f"Content-Length: {len(data)}\r\n\r\n").encode("latin-1") + data
            status, raw = self._pool.exchange(method, request)
        except Exception as exc:
            err = translate(exc, kind, path)
            self._record(kind, "unavailable")
            raise err from None  # the socket error adds nothing and may carry request details
        try:
            doc = json.loads(raw) if raw else None
        except ValueError as exc:
            if status == 404 or (lenient_errors and status >= 300):
                # A proxy's page or text: not Vault's document. The session decides (ambiguous).
                self._record(kind, "ambiguous")
                return status, None
            err = translate(exc, kind, path)
            self._record(kind, "unavailable")
            raise err from None
        except Exception as exc:
            err = translate(exc, kind, path)
            self._record(kind, "unavailable")
            raise err from None  # the socket error adds nothing and may carry request details
        self._record(kind, _status_label(status))
        return status, doc if isinstance(doc, dict) else None

    def _header_block(self, token: str | None) -> str:
        """Host and the fixed headers with `token`, ending the request. A CR, LF or non-Latin-1
        character would split or break the request: refused, without showing the value."""
        headers = {"Host": self._pool.host_header, **self._headers}
        if token is not None:
            headers["X-Vault-Token"] = token
        for name, value in headers.items():
            if "\r" in value or "\n" in value or not value.isprintable() or not value.isascii():
                raise VaultInvalidRequest(f"Vault request header {name} holds a character HTTP cannot carry")
        return "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"

    def hvac(self, kind: str, path: str, fn: Callable[[Any], T], token: Sensitive | None) -> T:
        """One hvac call made with `token`; exceptions translated (the hvac one kept as __cause__)."""
        if self._limiter is not None:
            self._limiter.acquire()
        with self._hvac_lock:
            if self._client is None:
                from bridge.vault.hvac_client import new_client  # hvac and requests: rare calls only (ADR 15)

                self._client = new_client(self.settings)
            client = self._client
            client.token = token.reveal() if token is not None else ""
            try:
                with warnings.catch_warnings():
                    if self.settings.tls.skip_verify:  # already said once, at start
                        warnings.simplefilter("ignore")
                    result = fn(client)
            except Exception as exc:
                err = translate(exc, kind, path)
                self._record(kind, _result_label(err))
                raise err from exc
            finally:
                client.token = ""
        self._record(kind, "ok")
        return result

    def close(self) -> None:
        self._pool.close()
        with self._hvac_lock:
            if self._client is not None:
                self._client.adapter.close()
