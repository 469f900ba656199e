"""The shapes of CybeDefend's API, without HTTP: endpoint table, tolerant decoding, error text.

Pure functions used by `bridge.cybedefend.client` (the module that owns httpx). Decoding is tolerant
where the contract is unsure (`CYBEDEFEND_API.md`, marks [?] and [I]): a `{"data": ...}`
envelope is unwrapped, linked projects come as `{"projectIds": [...]}` or a bare array, and an
error `message` may be a string or a list of strings.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from bridge.errors import (
    AuthenticationError,
    CybeDefendError,
    InvalidRequest,
    LegacyApiKeyGone,
    NotFound,
    PermissionDenied,
)
from bridge.logs import get_logger, redact_text
from bridge.model import REDACTED, RemoteCredential

log = get_logger(__name__)
MAX_MESSAGE = 300


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One API operation: its metric label, HTTP method and path template."""

    name: str  # one of bridge.metrics.ENDPOINTS
    method: str
    template: str

    @property
    def label(self) -> str:
        return f"{self.method} {self.template}"

    def label_for(self, params: Mapping[str, str]) -> str:
        """The label with its path parameters filled in, for error messages.

        Organization, project and credential ids are identifiers, not secrets: an operator
        needs to know which organization refused, not the template.
        """
        return f"{self.method} {self.path(params)}" if params else self.label

    def path(self, params: Mapping[str, str]) -> str:
        # quote(safe="") keeps an odd id from adding path segments or a query string
        return self.template.format(**{k: quote(v, safe="") for k, v in params.items()})


_DH = "/integrations/dockerhub/container-registry"
_LINKS = "/integrations/container-registry/organization/{organizationId}/credentials/dockerhub/{credentialId}/projects"
CLIENT_APPS = Endpoint("client_apps", "GET", "/client-apps")
TOKEN_EXCHANGE = Endpoint("token_exchange", "POST", "/oidc/token")
CREATE = Endpoint("create", "POST", _DH + "/organization/{organizationId}/credentials")
LIST = Endpoint("list", "GET", _DH + "/project/{projectId}/credentials")
GET = Endpoint("get", "GET", _DH + "/project/{projectId}/credentials/{credentialId}")
DELETE = Endpoint("delete", "DELETE", _DH + "/organization/{organizationId}/credentials/{credentialId}")
GET_LINKS = Endpoint("get_links", "GET", _LINKS)
SET_LINKS = Endpoint("set_links", "PUT", _LINKS)
ALL_CREDENTIALS = Endpoint("all_credentials", "GET", "/integrations/container-registry/organization/{organizationId}/credentials")

TOKEN_EXCHANGE_GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
PAT_TOKEN_TYPE = "urn:logto:token-type:personal_access_token"
_MAX_MESSAGE = 300

def redact(text: str, secrets: Sequence[str]) -> str:
    for s in secrets:
        if s:
            text = text.replace(s, REDACTED)
    return redact_text(text)


def scrub_chain(exc: BaseException, secrets: Sequence[str], withhold: bool) -> None:
    """Redact secrets from the args of `exc` and of every exception chained below it.

    The translated error is raised `from exc`, so a traceback prints this whole chain. h11's
    "Illegal header value" quotes the header, so for local protocol errors the text is withheld.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if withhold:
            current.args = (f"{type(current).__name__} (message withheld: it may quote a request header)",)
        else:
            current.args = tuple(redact(a, secrets) if isinstance(a, str) else a for a in current.args)
        current = current.__cause__ or current.__context__


def unwrap(body: Any) -> Any:
    """Accept a `{"data": ...}` envelope although the API documents bare bodies."""
    if isinstance(body, dict) and "data" in body and "id" not in body and "projectIds" not in body:
        return body["data"]
    return body


def credential(ep: Endpoint, body: Any) -> RemoteCredential:
    found = _credential(body)
    if found is None:
        raise CybeDefendError("the answer is not a credential object", endpoint=ep.label)
    return found


def _credential(body: Any) -> RemoteCredential | None:
    # One call per listed credential, 1,000 of them in the listing before every create of a
    # targeted pass: positional arguments and no exception per item (docs/adr/0017).
    if not isinstance(body, dict):
        return None
    cred_id = body.get("id")
    if not isinstance(cred_id, str) or not cred_id:
        return None
    username = body.get("dockerhubUsername")
    if not isinstance(username, str):
        details = body.get("dockerhubDetails")
        username = details.get("dockerhubUsername") if isinstance(details, dict) else body.get("name")
        if not isinstance(username, str):
            username = ""
    description = body.get("description")
    created_at = body.get("createdAt")
    return RemoteCredential(cred_id, username, description if isinstance(description, str) else None,
                            created_at if isinstance(created_at, str) else None)


def credential_list(ep: Endpoint, body: Any) -> list[RemoteCredential]:
    body = unwrap(body)
    if isinstance(body, dict) and isinstance(body.get("items"), list):
        body = body["items"]
    if body is None:
        return []
    if not isinstance(body, list):
        raise CybeDefendError("the answer is not a list of credentials", endpoint=ep.label)
    out = [c for c in map(_credential, body) if c is not None]
    if len(out) < len(body):
        log.warning("cybedefend_list_item_skipped", endpoint=ep.label, reason="no id", count=len(body) - len(out))
    return out


def project_ids(ep: Endpoint, body: Any) -> list[str]:
    body = unwrap(body)
    if isinstance(body, dict):
        body = body.get("projectIds", body.get("projects"))
    if body is None:
        return []
    if not isinstance(body, list):
        raise CybeDefendError("the answer is not a list of project ids", endpoint=ep.label)
    out: list[str] = []
    for item in body:
        if isinstance(item, dict):
            item = item.get("projectId", item.get("id"))
        if isinstance(item, str) and item:
            out.append(item)
    return out


def api_message(body: Any, reason_phrase: str, secrets: Sequence[str]) -> str:
    """CybeDefend's error `message` (a string or a list of strings), redacted and shortened.

    Only the `message` (or OAuth `error_description`/`error`) field is used, never the raw
    body, which could echo what was sent.
    """
    text = ""
    if isinstance(body, dict):
        msg = body.get("message", body.get("error_description", body.get("error")))
        if isinstance(msg, list):
            text = "; ".join(str(m) for m in msg if isinstance(m, str | int | float))
        elif isinstance(msg, str):
            text = msg
    text = redact(text or reason_phrase or "no message", secrets)
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 1] + "…"


def _permission_hint(params: Mapping[str, str]) -> str:
    org, project = params.get("organizationId"), params.get("projectId")
    if org:
        return f"the PAT's user needs manage_integration on organization {org} (CybeDefend: organization settings, members)"
    if project:
        return f"the PAT's user needs access to project {project} and manage_integration on its organization"
    return "the PAT's user lacks a permission this call needs (see docs/cybedefend-setup.md)"


def status_error(
    ep: Endpoint, status: int, message: str, *, pat_mode: bool, params: Mapping[str, str] | None = None
) -> CybeDefendError:
    """The bridge error for a non-2xx, non-transient answer (400, 401 after re-auth, 403, 404, 410, …).

    `params` are the request's path parameters (ids, never a secret): the message names the
    organization or project that answered, and a 403 says which permission to grant.
    """
    params = params or {}
    label = ep.label_for(params)
    if status == 400:
        return InvalidRequest(message, status=status, endpoint=label)
    if status == 401:
        if pat_mode:
            message = "CybeDefend rejected the bearer token twice; check that the PAT is valid and not revoked"
        else:
            message = "CybeDefend rejected the API key; check it, or switch cybedefend.auth.mode to pat"
        return AuthenticationError(message, status=status, endpoint=label)
    if status == 403:
        return PermissionDenied(f"{message}; {_permission_hint(params)}", status=status, endpoint=label)
    if status == 404:
        return NotFound(message, status=status, endpoint=label)
    if status == 410 and not pat_mode:
        return LegacyApiKeyGone(
            "CybeDefend no longer accepts API keys (410 Gone): set cybedefend.auth.mode to `pat` and "
            "provide a personal access token in the credential file",
            status=status,
            endpoint=label,
        )
    return CybeDefendError(message, status=status, endpoint=label, retryable=False)
