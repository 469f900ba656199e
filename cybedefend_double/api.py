"""What the CybeDefend double answers: faults, authentication, permissions and each endpoint.

`serve(sim, request)` is the application the HTTP layer calls. The order of checks follows a
NestJS app: route (404 "Cannot …") -> injected fault -> authentication (401 / 410) -> path
and body validation (400) -> permission (403) -> the resource itself (404) -> success.
Every request is recorded once, after its answer is known, with secrets reduced to hashes.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Mapping
from http import HTTPStatus
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from bridge.model import Sensitive
from cybedefend_double.http_server import IncomingRequest, Reply
from cybedefend_double.routes import REGISTRY_TYPES, Route, encode, error_body, is_uuid, iso_timestamp, match
from cybedefend_double.routes import validate_body as schema_errors

if TYPE_CHECKING:  # the state calls `serve`; only the annotation points back
    from cybedefend_double.simulator import Simulator
from cybedefend_double.records import AuthKind, Credential, Grant, Principal, RecordedRequest, sha256_hex

REGISTRY_URL = "https://index.docker.io/v1/"
GRANT_TYPE = "urn:ietf:params:oauth:grant-type:token-exchange"
PAT_TOKEN_TYPE = "urn:logto:token-type:personal_access_token"
_FORM_FIELDS_KEPT = ("grant_type", "client_id", "subject_token_type", "resource", "scope")
_SECRET_WORDS = ("token", "secret", "password", "key")


class _Answer(Exception):
    """Raised inside a handler to answer early with an error reply."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.status)
        self.reply = reply


Fail = Callable[[int, str | list[str]], _Answer]  # builds the error answer for this request's path


def _json(status: int, document: Any, headers: tuple[tuple[str, str], ...] = ()) -> Reply:
    return Reply(status=status, body=encode(document), headers=headers)


def _auth_kind(headers: Mapping[str, str]) -> AuthKind | None:
    if headers.get("authorization", "").lower().startswith("bearer"):
        return "bearer"
    if "x-api-key" in headers:
        return "api_key"
    return None


def _scrub(document: Any) -> Any:
    """A copy safe to keep: any field named like a secret becomes `<name>_sha256`."""
    if isinstance(document, dict):
        clean: dict[str, Any] = {}
        for key, value in document.items():
            if any(word in str(key).lower() for word in _SECRET_WORDS):
                text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
                clean[f"{key}_sha256"] = sha256_hex(text)
            else:
                clean[str(key)] = _scrub(value)
        return clean
    if isinstance(document, list):
        return [_scrub(v) for v in document]
    return document


def _is_json(headers: Mapping[str, str]) -> bool:
    return "json" in headers.get("content-type", "").lower()


def _recorded_body(endpoint: str, request: IncomingRequest) -> dict[str, Any] | None:
    if not request.body:
        return None
    if endpoint == "token_exchange":  # a whitelist: subject_token must never be kept, not even hashed
        form = parse_qs(request.body.decode("utf-8", "replace"), keep_blank_values=True)
        return {k: form[k][0] for k in _FORM_FIELDS_KEPT if k in form}
    try:
        document = json.loads(request.body)
    except ValueError:
        return None
    scrubbed = _scrub(document)
    return scrubbed if isinstance(scrubbed, dict) else None


def serve(sim: Simulator, request: IncomingRequest) -> Reply:
    at = sim.clock()
    path = request.target.split("?", 1)[0]
    route = match(request.method, path)
    endpoint = route.endpoint if route is not None else "unknown"
    fault = sim.take_fault(endpoint) if route is not None else None
    reply: Reply | None = None
    if fault is not None and fault.kind == "status":
        code = fault.code or 500
        headers = (("Retry-After", fault.retry_after),) if fault.retry_after is not None else ()
        reply = Reply(code, error_body(code, fault.message or HTTPStatus(code).phrase, path, at), headers)
    elif fault is not None and fault.kind == "drop_before":
        reply = Reply(drop=True)
    else:
        if fault is not None and fault.kind == "delay":
            sim.sleep(fault.seconds)
        elif fault is not None and fault.kind == "expire_tokens":
            sim.expire_all_tokens()
        if route is None:
            reply = _json(404, {"message": f"Cannot {request.method} {path}", "error": "Not Found",
                                "statusCode": 404, "timestamp": iso_timestamp(at), "path": path})
        else:
            try:
                reply = _handle(sim, route, request, path, at)
            except _Answer as answer:
                reply = answer.reply
        if fault is not None and fault.kind == "drop_after":
            reply = Reply(drop=True)
    sim.record(RecordedRequest(
        method=request.method, path=path, endpoint=endpoint, status=None if reply.drop else reply.status,
        auth=_auth_kind(request.headers), body=_recorded_body(endpoint, request),
        fault=fault.kind if fault is not None else None, at=at,
    ))
    return reply


def _handle(sim: Simulator, route: Route, request: IncomingRequest, path: str, at: float) -> Reply:
    if route.endpoint == "client_apps":
        return _json(200, {"cli": {"appId": sim.client_app_id}, "vscode": {"appId": "cybedefend-vscode-sim"},
                           "intellij": {"appId": "cybedefend-intellij-sim"}})
    if route.endpoint == "token_exchange":
        return _token_exchange(sim, request, at)

    def fail(status: int, message: str | list[str]) -> _Answer:
        return _Answer(Reply(status, error_body(status, message, path, at)))

    principal = _authenticate(sim, request.headers, at, fail)
    bad = [f"{name} must be a UUID" for name in route.uuid_params if not is_uuid(route.params[name])]
    registry_type = route.params.get("registryType")
    if registry_type is not None and registry_type not in REGISTRY_TYPES:
        bad.append(f"registryType must be one of the following values: {', '.join(REGISTRY_TYPES)}")
    if bad:
        raise fail(400, bad)
    body: Any = None
    if route.body_schema is not None:
        body = {}  # like Express: no JSON content type, no parsed body
        if request.body and _is_json(request.headers):
            try:
                body = json.loads(request.body)
            except ValueError as exc:
                raise fail(400, f"Unexpected token in JSON at position {getattr(exc, 'pos', 0)}") from None
        messages = schema_errors(route.body_schema, body)
        if messages:
            raise fail(400, messages)
    params = {k: v.lower() for k, v in route.params.items()}
    with sim.lock:
        return _endpoint(sim, route.endpoint, params, body, principal, at, fail)


def _authenticate(sim: Simulator, headers: Mapping[str, str], at: float, fail: Fail) -> Principal:
    authorization = headers.get("authorization")
    if authorization is not None:
        scheme, _, token = authorization.partition(" ")
        with sim.lock:
            grant = sim.tokens.get(sha256_hex(token.strip())) if scheme.lower() == "bearer" else None
        if grant is None or at >= grant.expires_at:
            raise fail(401, "Unauthorized")
        return grant.principal
    api_key = headers.get("x-api-key")
    if api_key is not None:
        if sim.api_keys_gone:
            raise fail(410, "API keys are no longer supported; use a personal access token")
        with sim.lock:
            principal = sim.api_keys.get(sha256_hex(api_key))
        if principal is None or principal.revoked:
            raise fail(401, "Unauthorized")
        return principal
    raise fail(401, "Unauthorized")


def _oauth_error(status: int, error: str, description: str) -> _Answer:
    return _Answer(_json(status, {"error": error, "error_description": description}))


def _token_exchange(sim: Simulator, request: IncomingRequest, at: float) -> Reply:
    content_type = request.headers.get("content-type", "").lower()
    if "application/x-www-form-urlencoded" not in content_type:
        raise _oauth_error(400, "invalid_request", "the token endpoint takes a form-encoded body")
    parsed = parse_qs(request.body.decode("utf-8", "replace"), keep_blank_values=True)
    form = {k: v[0] for k, v in parsed.items()}
    if form.get("grant_type") != GRANT_TYPE:
        raise _oauth_error(400, "unsupported_grant_type", "grant_type must be the token-exchange grant")
    if form.get("client_id") != sim.client_app_id:
        raise _oauth_error(400, "invalid_grant", "token_exchange_not_allowed: only the cli app may exchange")
    if form.get("subject_token_type") != PAT_TOKEN_TYPE or not form.get("subject_token"):
        raise _oauth_error(400, "invalid_request", "subject_token and subject_token_type are required")
    if form.get("resource", "").rstrip("/") != sim.resource:
        raise _oauth_error(400, "invalid_target", "resource must be the API base URL")
    with sim.lock:
        principal = sim.pats.get(sha256_hex(form["subject_token"]))
        if principal is None or principal.revoked:
            raise _oauth_error(401, "invalid_grant", "the personal access token is invalid or revoked")
        access_token = secrets.token_urlsafe(32)
        sim.tokens[sha256_hex(access_token)] = Grant(principal, at + sim.token_ttl_seconds)
    return _json(200, {"access_token": access_token, "token_type": "Bearer",
                       "expires_in": sim.token_ttl_seconds, "scope": "",
                       "issued_token_type": "urn:ietf:params:oauth:token-type:access_token"},
                 headers=(("Cache-Control", "no-store"),))


def _item(cred: Credential, with_registry: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"id": cred.id, "dockerhubUsername": cred.username}
    if with_registry:
        out["registryUrl"] = REGISTRY_URL
    if cred.description is not None:
        out["description"] = cred.description
    out["createdAt"] = cred.created_at
    return out


def _endpoint(sim: Simulator, endpoint: str, params: Mapping[str, str], body: Any, principal: Principal,
              at: float, fail: Fail) -> Reply:
    """The endpoint itself; called with `sim.lock` held."""

    def allowed(org: str | None, need: str) -> bool:
        role = principal.permissions.get(org or "")
        return org in sim.projects_by_org and (role == "manage" or (need == "read" and role == "read"))

    def project_ok(org: str, project: str) -> bool:
        return sim.org_of_project.get(project) == org and project not in sim.forbidden

    def credential(org: str, cred_id: str, registry: str = "dockerhub") -> Credential:
        cred = sim.store.get(cred_id)
        if cred is None or cred.organization_id != org or registry != "dockerhub":
            raise fail(404, "Credential not found")
        return cred

    def links_reply(cred: Credential) -> Reply:
        return _json(200, list(cred.links) if sim.links_as_array else {"projectIds": list(cred.links)})

    org = params.get("organizationId")
    if endpoint in ("list", "get"):
        project = params["projectId"]
        org = sim.org_of_project.get(project)
        if org is None or project in sim.forbidden or not allowed(org, "read"):
            raise fail(403, "Forbidden resource")
        if endpoint == "list":
            return _json(200, [_item(c, False) for c in sim.store.values() if project in c.links])
        cred = sim.store.get(params["credentialId"])
        if cred is None or project not in cred.links:
            raise fail(404, "Credential not found")
        return _json(200, _item(cred, True))
    if org is None:  # unreachable: every other route has an organizationId
        raise fail(404, "Not Found")
    if endpoint == "all_credentials":
        if not allowed(org, "read"):
            raise fail(403, "Forbidden resource")
        items = [{"id": c.id, "projectId": c.links[0] if c.links else "", "linkedProjectIds": list(c.links),
                  "name": c.username, "registryUrl": REGISTRY_URL, "createdAt": c.created_at,
                  "dockerhubDetails": {"dockerhubUsername": c.username},
                  **({"description": c.description} if c.description is not None else {})}
                 for c in sim.store.values() if c.organization_id == org]
        document: dict[str, Any] = {"github": {"available": False, "githubOwner": ""}}
        document.update({kind: items if kind == "dockerhub" else [] for kind in REGISTRY_TYPES})
        return _json(200, document)
    if not allowed(org, "manage"):
        raise fail(403, "Forbidden resource")
    if endpoint == "create":
        project = str(body["projectId"]).lower()
        if not project_ok(org, project):
            raise fail(403, "Forbidden resource")
        cred = Credential(sim.id_factory(), org, body["dockerhubUsername"], body.get("description"),
                          iso_timestamp(at), Sensitive(body["accessToken"]), [project])
        sim.store[cred.id] = cred
        return _json(201, _item(cred, True))
    if endpoint == "delete":
        cred = credential(org, params["credentialId"])
        del sim.store[cred.id]
        return Reply(204)
    cred = credential(org, params["credentialId"], params["registryType"])
    if endpoint == "get_links":
        return links_reply(cred)
    wanted = list(dict.fromkeys(str(p).lower() for p in body["projectIds"]))
    if not all(project_ok(org, p) for p in wanted):
        raise fail(403, "Forbidden resource")
    cred.links = wanted
    return links_reply(cred)
