"""Routing, request validation and error bodies of the CybeDefend double, driven by the contract file.

The route table names each CybeDefend endpoint the way fault injection does ("create",
"list", …). Bodies are validated with jsonschema against the OpenAPI subset shipped in
`bridge/contract/`, and failures are worded the way NestJS' class-validator words them, so a
client sees the same 400 it would get from the real API.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator

CONTRACT_FILE = Path(__file__).parent / "contract" / "cybedefend-openapi-subset.json"

ENDPOINTS = (
    "create", "list", "get", "delete", "get_links", "set_links", "all_credentials",
    "client_apps", "token_exchange",
)

_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_SEG = r"(?P<{}>[^/]+)"
_DH = "/integrations/dockerhub/container-registry"
_CR = "/integrations/container-registry"


def _route(pattern: str) -> re.Pattern[str]:
    return re.compile("^" + re.sub(r"\{(\w+)\}", lambda m: _SEG.format(m[1]), pattern) + "/?$")


# (method, compiled path, endpoint name, path parameters that must be UUIDs, body schema)
_ROUTES: tuple[tuple[str, re.Pattern[str], str, tuple[str, ...], str | None], ...] = (
    ("GET", _route("/client-apps"), "client_apps", (), None),
    ("POST", _route("/oidc/token"), "token_exchange", (), None),
    ("POST", _route(_DH + "/organization/{organizationId}/credentials"), "create",
     ("organizationId",), "DockerhubStoreCredentialsDto"),
    ("DELETE", _route(_DH + "/organization/{organizationId}/credentials/{credentialId}"), "delete",
     ("organizationId", "credentialId"), None),
    ("GET", _route(_DH + "/project/{projectId}/credentials"), "list", ("projectId",), None),
    ("GET", _route(_DH + "/project/{projectId}/credentials/{credentialId}"), "get",
     ("projectId", "credentialId"), None),
    ("GET", _route(_CR + "/organization/{organizationId}/credentials"), "all_credentials",
     ("organizationId",), None),
    ("GET", _route(_CR + "/organization/{organizationId}/credentials/{registryType}/{credentialId}/projects"),
     "get_links", ("organizationId", "credentialId"), None),
    ("PUT", _route(_CR + "/organization/{organizationId}/credentials/{registryType}/{credentialId}/projects"),
     "set_links", ("organizationId", "credentialId"), "SetCredentialProjectsBodyDto"),
)

REGISTRY_TYPES = ("gitlab", "dockerhub", "acr", "gcr", "ecr", "quay", "harbor", "jfrog", "scaleway")


@dataclass(frozen=True, slots=True)
class Route:
    endpoint: str
    params: Mapping[str, str]
    uuid_params: tuple[str, ...]
    body_schema: str | None


def match(method: str, path: str) -> Route | None:
    """The route for `method path` (path without query), or None: NestJS answers 404 "Cannot …"."""
    for verb, pattern, endpoint, uuids, schema in _ROUTES:
        if verb == method:
            m = pattern.match(path)
            if m is not None:
                return Route(endpoint, m.groupdict(), uuids, schema)
    return None


def is_uuid(value: str) -> bool:
    return _UUID.match(value) is not None


def iso_timestamp(seconds: float) -> str:
    """`2025-02-18T12:31:18.491Z`, the form CybeDefend's error bodies and createdAt use."""
    moment = datetime.fromtimestamp(seconds, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def error_body(status: int, message: str | list[str], path: str, at: float) -> bytes:
    return encode({"message": message, "statusCode": status, "timestamp": iso_timestamp(at), "path": path})


def encode(document: Any) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()


@cache
def load_contract() -> dict[str, Any]:
    """The OpenAPI subset; read once (it never changes while running)."""
    document: dict[str, Any] = json.loads(CONTRACT_FILE.read_text(encoding="utf-8"))
    return document


def validator_for(schema: Mapping[str, Any]) -> Draft202012Validator:
    """A validator for a schema taken from the contract; its `#/components/schemas/X` refs resolve.

    The subset file keeps schemas at top-level `schemas` while its refs keep the OpenAPI
    spelling, so the schemas are re-homed under `components` inside the validated root.
    """
    root = dict(schema)
    root["components"] = {"schemas": load_contract()["schemas"]}
    return Draft202012Validator(root)


@cache
def _body_validator(schema_name: str) -> Draft202012Validator:
    return validator_for({"$ref": f"#/components/schemas/{schema_name}"})


def _article(type_name: str) -> str:
    return "an" if type_name[:1] in "aeiou" else "a"


def validate_body(schema_name: str, body: Any) -> list[str]:
    """Class-validator style messages for everything wrong with `body`; empty when it is valid."""
    schema = load_contract()["schemas"][schema_name]
    props: Mapping[str, Any] = schema.get("properties", {})
    messages: list[str] = []
    for error in sorted(_body_validator(schema_name).iter_errors(body), key=lambda e: list(e.absolute_path)):
        path = [str(p) for p in error.absolute_path]
        if error.validator == "required" and isinstance(error.instance, Mapping):
            for name in error.validator_value:
                if name not in error.instance:
                    expected = str(props.get(name, {}).get("type", "string"))
                    messages.append(f"{name} should not be empty")
                    messages.append(f"{name} must be {_article(expected)} {expected}")
        elif error.validator == "type":
            expected = str(error.validator_value)
            if not path:
                messages.append(f"body must be {_article(expected)} {expected}")
            elif len(path) >= 2 and path[-1].isdigit():
                owner = ".".join(path[:-1])
                messages.append(f"each value in {owner} must be {_article(expected)} {expected}")
            else:
                messages.append(f"{'.'.join(path)} must be {_article(expected)} {expected}")
        else:
            # error.message would quote the offending value, which may be a token
            messages.append(f"{'.'.join(path) or 'body'} is invalid ({error.validator})")
    return list(dict.fromkeys(messages))  # required errors can repeat per missing name
