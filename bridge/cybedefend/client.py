"""The CybeDefend API client: the only module that imports httpx to talk to CybeDefend.

It implements `bridge.ports.Registrar` over the endpoints in `CYBEDEFEND_API.md`, with both
authentication generations (legacy `x-api-key`, PAT exchanged for short-lived bearer tokens),
bounded concurrency, a request-rate cap, retries of transient failures only, and translation of
every httpx exception and HTTP status into `bridge.errors`. Errors name a status, a path template
and CybeDefend's message; never a body, a header, a token, the PAT or the API key.
"""

from __future__ import annotations

import functools
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn

import httpx

from bridge.config import CybeDefendSettings
from bridge.cybedefend.api import (
    ALL_CREDENTIALS,
    CLIENT_APPS,
    CREATE,
    DELETE,
    GET,
    GET_LINKS,
    LIST,
    PAT_TOKEN_TYPE,
    SET_LINKS,
    TOKEN_EXCHANGE,
    TOKEN_EXCHANGE_GRANT,
    Endpoint,
    api_message,
    credential,
    credential_list,
    project_ids,
    scrub_chain,
    status_error,
    unwrap,
)
from bridge.cybedefend.auth import (
    BearerCache,
    exchange_error,
    header_safe,
    parse_token_response,
    read_credential_file,
)
from bridge.cybedefend.transport import LeanTransport
from bridge.errors import (
    AmbiguousWrite,
    AuthenticationError,
    ConfigError,
    CybeDefendError,
    RateLimited,
    TransientError,
)
from bridge.logs import get_logger, register_secret
from bridge.metrics import Metrics
from bridge.model import RemoteCredential, Sensitive
from bridge.ports import WriteGuard
from bridge.retry import RetryPolicy, TokenBucket, parse_retry_after

__all__ = ["CybeDefendClient", "Endpoint", "read_credential_file"]

log = get_logger(__name__)


# The endpoints that change CybeDefend: each attempt is preceded by the write guard's check.
_WRITES = frozenset({CREATE.name, DELETE.name, SET_LINKS.name})
WAIT_SLICE_SECONDS = 0.25  # how often a write's retry wait asks whether the lease still holds

# Failures after which the request certainly never reached CybeDefend's application: safe to
# repeat even for the create POST, which has no idempotency key.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.ProxyError)
# Failures that retrying cannot fix (a bad URL scheme, a request h11 refuses to encode).
_PERMANENT = (httpx.UnsupportedProtocol, httpx.LocalProtocolError, httpx.InvalidURL)


class CybeDefendClient:
    """`bridge.ports.Registrar` over CybeDefend's REST API; safe to share between threads."""

    def __init__(
        self,
        settings: CybeDefendSettings,
        credential: Sensitive,
        metrics: Metrics,
        *,
        transport: httpx.BaseTransport | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
        wall_clock: Callable[[], float] = time.time,
        write_guard: WriteGuard | None = None,
    ) -> None:
        if not credential or not header_safe(credential.reveal()):
            key = "credential_file" if settings.auth.credential_file is not None else "credential_vault_path"
            raise ConfigError(
                f"cybedefend.auth.{key}", "the credential is empty or holds whitespace/control characters"
            )
        register_secret(credential.reveal(), pinned=True)
        self._settings = settings
        self._credential = credential
        self._mode = settings.auth.mode
        self._metrics = metrics
        self._sleep = sleep
        self._clock = clock
        self._wall_clock = wall_clock
        self._rng = rng if rng is not None else random.Random()
        self._rng_lock = threading.Lock()  # random.Random is not documented as thread-safe
        self._policy = RetryPolicy(settings.retry.max_attempts, settings.retry.base_seconds, settings.retry.cap_seconds)
        self._timeout = httpx.Timeout(settings.timeout_seconds)
        self._slots = threading.BoundedSemaphore(settings.max_concurrency)
        self._bucket = TokenBucket(settings.max_requests_per_second, clock=clock, sleep=sleep)
        self._api_url = settings.resolved_api_url
        self._auth_url = settings.resolved_auth_url
        limits = httpx.Limits(max_connections=settings.max_concurrency, max_keepalive_connections=settings.max_concurrency)
        # One SSL context for every transport (httpx's default one, a proxy's, the lean one), made
        # by httpx's own function as `verify=True` would: each context loads the CA bundle, ~40-60 ms
        # at start-up, and httpx would otherwise make one per transport.
        tls = httpx.create_ssl_context(trust_env=True)
        self._http = httpx.Client(
            base_url=self._api_url,
            transport=transport,
            verify=tls,
            timeout=self._timeout,
            follow_redirects=False,  # a redirect would resend the credential to another place
            limits=limits,
            headers={"Accept": "application/json", "User-Agent": "cybedefend-bridge"},
        )
        # Requests go straight to the client's transport (`_send`): the client is kept for what
        # it resolves once at construction (the connection pool, or a proxy from the environment
        # for that URL, TLS settings), not for its per-request machinery (ADR 13). Where that is
        # httpx's own connection pool (no proxy for the URL, no injected transport), our lean
        # HTTP/1.1 transport takes its place: httpcore and h11 were about half of a cold pass's
        # CPU (ADR 16).
        routes = {base: self._http._transport_for_url(httpx.URL(base)) for base in {self._api_url, self._auth_url}}
        lean = [base for base, route in routes.items() if transport is None and route is self._http._transport
                and type(route) is httpx.HTTPTransport]
        self._lean: LeanTransport | None = None
        if lean:
            https = any(httpx.URL(base).scheme == "https" for base in lean)
            self._lean = LeanTransport(
                size=settings.max_concurrency, idle_expiry=limits.keepalive_expiry,
                ssl_context=tls if https else None,
            )
            routes.update(dict.fromkeys(lean, self._lean))
        self._routes: dict[str, httpx.BaseTransport] = routes
        self._base_headers = dict(self._http.headers)
        self._timeouts = self._timeout.as_dict()
        # Labelled metric children, looked up once (as bridge.vault.transport does): `labels()`
        # takes a lock and builds a key, ~10 us per call, twice per request.
        self._children: dict[tuple[str, str], Any] = {}
        self._app_id: str | None = None
        # Confirms before every write attempt that we are still the one writer (HA lease or
        # process lock); set by the composition root once the lease or lock exists.
        self.write_guard = write_guard
        self._bearers = BearerCache(self._exchange, settings.token_renew_margin_seconds, clock) if self._mode == "pat" else None

    # ---- Registrar -------------------------------------------------------------------------

    def create(
        self, organization_id: str, project_id: str, username: str, token: Sensitive, description: str
    ) -> RemoteCredential:
        """POST /integrations/dockerhub/container-registry/organization/{organizationId}/credentials

        Stores the token and links the credential to `project_id`. There is no idempotency key,
        so a failure after the request may have been processed raises `AmbiguousWrite`.
        """
        body: dict[str, Any] = {"projectId": project_id, "dockerhubUsername": username, "accessToken": token.reveal()}
        if description:
            body["description"] = description
        secrets = (token.reveal(),)
        resp = self._request(CREATE, {"organizationId": organization_id}, json_body=body, unsafe=True, secrets=secrets)
        self._check(CREATE, resp, secrets, {"organizationId": organization_id})
        try:
            return credential(CREATE, self._json(CREATE, resp))
        except CybeDefendError as exc:
            raise AmbiguousWrite(
                f"the create answered {resp.status_code} but its body was unreadable ({exc.api_message})",
                status=resp.status_code,
                endpoint=CREATE.label,
            ) from exc

    def list_project(self, project_id: str) -> list[RemoteCredential]:
        """GET /integrations/dockerhub/container-registry/project/{projectId}/credentials"""
        resp = self._request(LIST, {"projectId": project_id})
        self._check(LIST, resp, params={"projectId": project_id})
        return credential_list(LIST, self._json(LIST, resp))

    def get(self, project_id: str, credential_id: str) -> RemoteCredential | None:
        """GET /integrations/dockerhub/container-registry/project/{projectId}/credentials/{credentialId}

        None when the credential does not exist (404).
        """
        resp = self._request(GET, {"projectId": project_id, "credentialId": credential_id})
        if resp.status_code == 404:
            return None
        self._check(GET, resp, params={"projectId": project_id, "credentialId": credential_id})
        return credential(GET, self._json(GET, resp))

    def delete(self, organization_id: str, credential_id: str) -> bool:
        """DELETE /integrations/dockerhub/container-registry/organization/{organizationId}/credentials/{credentialId}

        True if deleted now, False if it was already gone (404).
        """
        resp = self._request(DELETE, {"organizationId": organization_id, "credentialId": credential_id})
        if resp.status_code == 404:
            return False
        self._check(DELETE, resp, params={"organizationId": organization_id, "credentialId": credential_id})
        return True

    def linked_projects(self, organization_id: str, credential_id: str) -> list[str]:
        """GET /integrations/container-registry/organization/{organizationId}/credentials/dockerhub/{credentialId}/projects"""
        resp = self._request(GET_LINKS, {"organizationId": organization_id, "credentialId": credential_id})
        self._check(GET_LINKS, resp, params={"organizationId": organization_id, "credentialId": credential_id})
        return project_ids(GET_LINKS, self._json(GET_LINKS, resp))

    def set_linked_projects(self, organization_id: str, credential_id: str, project_ids: Sequence[str]) -> None:
        """PUT /integrations/container-registry/organization/{organizationId}/credentials/dockerhub/{credentialId}/projects

        Replaces the whole set of linked projects with `project_ids`.
        """
        params = {"organizationId": organization_id, "credentialId": credential_id}
        resp = self._request(SET_LINKS, params, json_body={"projectIds": list(project_ids)})
        self._check(SET_LINKS, resp, params=params)

    def all_credentials(self, organization_id: str) -> list[RemoteCredential]:
        """GET /integrations/container-registry/organization/{organizationId}/credentials

        The organization's DockerHub credentials (the `dockerhub` array of the answer).
        """
        resp = self._request(ALL_CREDENTIALS, {"organizationId": organization_id})
        self._check(ALL_CREDENTIALS, resp, params={"organizationId": organization_id})
        body = self._json(ALL_CREDENTIALS, resp)
        return credential_list(ALL_CREDENTIALS, body.get("dockerhub", []) if isinstance(body, dict) else body)

    # ---- check command and lifecycle ---------------------------------------------------------

    def authenticate(self) -> str:
        """Force authentication now and describe the result (for the `check` command).

        PAT mode: GET /client-apps and POST {auth_url}/oidc/token. API-key mode: GET
        /integrations/container-registry/organization/{organizationId}/credentials when an
        organization is configured, else GET /client-apps carrying the key (which a server that
        dropped API keys answers with 410).
        """
        if self._bearers is not None:
            bearer = self._bearers.force()
            return f"PAT exchanged; bearer valid for {bearer.expires_in:.0f} s"
        org = self._settings.organization_id
        if org is not None:
            self.all_credentials(org)
            return "API key accepted"
        resp = self._request(CLIENT_APPS, {})
        self._check(CLIENT_APPS, resp)
        return "API key not rejected (set cybedefend.organization_id to verify its permissions)"

    def close(self) -> None:
        if self._lean is not None:
            self._lean.close()
        self._http.close()

    def __enter__(self) -> CybeDefendClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- authentication ----------------------------------------------------------------------

    def _client_app_id(self) -> str:
        """GET /client-apps (no auth): the `cli` appId, the only client allowed to exchange a PAT."""
        if self._app_id is None:
            resp = self._request(CLIENT_APPS, {}, auth=False)
            self._check(CLIENT_APPS, resp)
            body = self._json(CLIENT_APPS, resp)
            cli = body.get("cli") if isinstance(body, dict) else None
            app_id = cli.get("appId") if isinstance(cli, dict) else None
            if not isinstance(app_id, str) or not app_id:
                raise AuthenticationError("the answer does not name the cli appId", endpoint=CLIENT_APPS.label)
            self._app_id = app_id
        return self._app_id

    def _exchange(self) -> tuple[Sensitive, float]:
        """POST {auth_url}/oidc/token: exchange the PAT for a bearer token (runs under the cache lock)."""
        form = {
            "grant_type": TOKEN_EXCHANGE_GRANT,
            "client_id": self._client_app_id(),
            "subject_token": self._credential.reveal(),
            "subject_token_type": PAT_TOKEN_TYPE,
            "resource": self._api_url,
        }
        resp = self._request(TOKEN_EXCHANGE, {}, form=form, auth=False, base=self._auth_url)
        if not resp.is_success:
            if resp.status_code == 400:
                self._app_id = None  # the cli appId may have changed: ask /client-apps again next time
            raise exchange_error(resp.status_code, _json_or_none(resp))
        token, expires_in = parse_token_response(_json_or_none(resp))
        log.info("cybedefend_token_exchanged", expires_in_seconds=expires_in)
        return token, expires_in

    def _auth_headers(self, auth: bool) -> tuple[dict[str, str], Sensitive | None]:
        if not auth:
            return {}, None
        if self._bearers is None:
            return {"x-api-key": self._credential.reveal()}, None
        bearer = self._bearers.get()
        return {"Authorization": f"Bearer {bearer.reveal()}"}, bearer

    # ---- the request loop --------------------------------------------------------------------

    def _request(
        self,
        ep: Endpoint,
        params: Mapping[str, str],
        *,
        json_body: Any = None,
        form: Mapping[str, str] | None = None,
        auth: bool = True,
        unsafe: bool = False,
        base: str | None = None,
        secrets: Sequence[str] = (),
    ) -> httpx.Response:
        """Send with retries of transient failures; return the first non-transient answer.

        `unsafe` marks a request that must not be repeated once it may have been processed
        (the create POST): then only "never sent" failures and 429 are retried.
        """
        base = base or self._api_url
        url = _url(base.rstrip("/") + ep.path(params))
        transport = self._routes[base]
        failures = 0
        reauthenticated = False
        while True:
            headers, bearer = self._auth_headers(auth)
            guard = self.write_guard if ep.name in _WRITES else None
            if guard is not None:
                guard.check(self._settings.timeout_seconds)  # LeaseLost: not sent, and no retry
            try:
                resp = self._send(ep, transport, url, headers, json_body, form)
            except httpx.HTTPError as exc:
                err = self._transport_error(ep, exc, unsafe)
                scrub_chain(exc, self._secrets(secrets), isinstance(exc, httpx.LocalProtocolError))
                failures += 1
                if not err.retryable or isinstance(err, AmbiguousWrite) or failures >= self._policy.max_attempts:
                    raise err from exc
                self._wait(ep, failures, None, type(exc).__name__, guard)
                continue
            status = resp.status_code
            if status == 401 and bearer is not None and self._bearers is not None and not reauthenticated:
                # The token may have been revoked or expired early: one fresh exchange, then one retry.
                reauthenticated = True
                self._bearers.invalidate(bearer)
                log.info("cybedefend_reauthenticate", endpoint=ep.label)
                continue
            if status != 429 and status < 500:
                return resp
            retry_after = parse_retry_after(resp.headers.get("Retry-After"), self._wall_clock())
            if unsafe and status >= 500:
                raise AmbiguousWrite(
                    f"the server failed while handling the create ({self._message(resp, secrets)}); "
                    "list the project and adopt by marker before creating again",
                    status=status,
                    endpoint=ep.label,
                )
            failures += 1
            if self._policy.retry_after_too_long(retry_after) or failures >= self._policy.max_attempts:
                self._raise_transient(ep, resp, retry_after, secrets)
            delay = self._wait(ep, failures, retry_after, f"HTTP {status}", guard)
            if status == 429:
                self._metrics.rate_limited.inc()
                self._metrics.rate_limited_seconds.inc(delay)

    def _send(
        self, ep: Endpoint, transport: httpx.BaseTransport, url: httpx.URL, headers: dict[str, str], json_body: Any,
        form: Mapping[str, str] | None,
    ) -> httpx.Response:
        # The transport, not `httpx.Client.send`: the client's per-request work (merging the URL
        # with base_url, which parses it again, the auth and redirect flows, the cookie jar) cost
        # ~30 % of the CPU of a create POST, and a cold pass is CPU-bound under one GIL
        # (docs/benchmarks.md). What it did that matters is done here: its default headers, the
        # timeout, reading the body, closing the stream. Redirects were not followed before either
        # (docs/adr/0013-cybedefend-requests-on-the-transport.md).
        self._bucket.acquire()
        request = httpx.Request(ep.method, url, headers={**self._base_headers, **headers}, json=json_body, data=form,
                                extensions={"timeout": self._timeouts})
        with self._slots:
            started = self._clock()
            status_class = "error"
            try:
                resp = transport.handle_request(request)
                try:
                    resp.read()
                finally:
                    resp.close()
                resp.request = request
                status_class = f"{resp.status_code // 100}xx"
                return resp
            finally:
                self._child(ep.name, status_class).inc()
                self._child(ep.name, "").observe(max(0.0, self._clock() - started))

    def _child(self, endpoint: str, status_class: str) -> Any:
        """The `api_requests` child of (endpoint, status class), or with "" the `api_duration` one."""
        child = self._children.get((endpoint, status_class))
        if child is None:
            child = (self._metrics.api_requests.labels(endpoint=endpoint, status_class=status_class) if status_class
                     else self._metrics.api_duration.labels(endpoint=endpoint))
            self._children[(endpoint, status_class)] = child
        return child

    def _wait(
        self, ep: Endpoint, failures: int, retry_after: float | None, reason: str, guard: WriteGuard | None = None
    ) -> float:
        with self._rng_lock:
            delay = self._policy.delay(failures, self._rng, retry_after)
        self._metrics.retries.labels(target="cybedefend").inc()
        log.warning(
            "cybedefend_retry", endpoint=ep.label, attempt=failures + 1, reason=reason, delay_seconds=round(delay, 3)
        )
        if guard is None:
            self._sleep(delay)
            return delay
        # A write's wait (a Retry-After of up to 30 s) ends as soon as the lease is lost, in
        # slices, instead of sleeping through the new leader's writes.
        end = self._clock() + delay
        while True:
            guard.check(0.0)
            left = end - self._clock()
            if left <= 0:
                return delay
            self._sleep(min(WAIT_SLICE_SECONDS, left))

    def _transport_error(self, ep: Endpoint, exc: httpx.HTTPError, unsafe: bool) -> CybeDefendError:
        kind = type(exc).__name__
        if isinstance(exc, _NOT_SENT):
            return TransientError(f"could not reach CybeDefend ({kind})", endpoint=ep.label)
        if isinstance(exc, _PERMANENT):
            return CybeDefendError(f"the request could not be sent ({kind})", endpoint=ep.label, retryable=False)
        if unsafe:
            return AmbiguousWrite(
                f"no answer after the create was sent ({kind}); list the project and adopt by marker before creating again",
                endpoint=ep.label,
            )
        return TransientError(f"no usable answer from CybeDefend ({kind})", endpoint=ep.label)

    def _raise_transient(self, ep: Endpoint, resp: httpx.Response, retry_after: float | None, secrets: Sequence[str]) -> NoReturn:
        message = self._message(resp, secrets)
        if resp.status_code == 429 or retry_after is not None:
            raise RateLimited(message, retry_after=retry_after, status=resp.status_code, endpoint=ep.label)
        raise TransientError(message, status=resp.status_code, endpoint=ep.label)

    # ---- answers -----------------------------------------------------------------------------

    def _check(
        self, ep: Endpoint, resp: httpx.Response, secrets: Sequence[str] = (), params: Mapping[str, str] | None = None
    ) -> None:
        """Raise the bridge error for a non-2xx answer (transient ones were handled already)."""
        status = resp.status_code
        if resp.is_success:
            return
        raise status_error(ep, status, self._message(resp, secrets), pat_mode=self._bearers is not None, params=params)

    def _json(self, ep: Endpoint, resp: httpx.Response) -> Any:
        if not resp.content:
            return None
        try:
            body = resp.json()
        except ValueError:
            raise CybeDefendError("the answer is not JSON", status=resp.status_code, endpoint=ep.label) from None
        return unwrap(body)

    def _secrets(self, extra: Sequence[str]) -> tuple[str, ...]:
        return (self._credential.reveal(), *extra)

    def _message(self, resp: httpx.Response, secrets: Sequence[str]) -> str:
        return api_message(_json_or_none(resp), resp.reason_phrase, self._secrets(secrets))


@functools.lru_cache(maxsize=256)
def _url(text: str) -> httpx.URL:
    """Parsed once per distinct URL (a create's is the same for every secret of an organization):
    httpx's URL parser is a noticeable share of a request's CPU. Ids with their own URL
    (deletes, links) only rotate through the bounded cache."""
    return httpx.URL(text)


def _json_or_none(resp: httpx.Response) -> Any:
    try:
        return resp.json() if resp.content else None
    except ValueError:
        return None
