"""A scriptable CybeDefend stand-in for `httpx.MockTransport`, used by tests/test_cybedefend.py.

It plays the API well enough for unit tests of the client (token exchange, bearer checks, each
endpoint), and lets a test script the next answers per endpoint: an `httpx.Response`, an
exception to raise (a transport failure), or a callable. The faithful double over real HTTP is
`cybedefend_double.simulator`; this one exists for failure shapes a real socket cannot produce on demand.
"""

from __future__ import annotations

import json
import random
import re
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import httpx

from bridge.config import CybeDefendSettings
from bridge.cybedefend.client import CybeDefendClient
from bridge.metrics import Metrics
from bridge.model import Sensitive

API = "https://api.cybedefend.test"
AUTH = "https://auth.cybedefend.test"
PAT = "cdpat_Z2VuZXJhdGVkLXBhdC1mb3ItdGVzdHM"
API_KEY = "cdkey_bGVnYWN5LWFwaS1rZXktdmFsdWU"
CLI_APP = "cli-app-id"
ORG = "0b5a2c3e-7d7e-4a55-9f7c-2f6a1c9d4e01"
PROJECT = "5f2b9c1d-3e4a-4b6c-8d7e-9f0a1b2c3d4e"
Script = httpx.Response | BaseException | Callable[[httpx.Request], httpx.Response]

_ROUTES = (
    ("GET", re.compile(r"^/client-apps$"), "client_apps"),
    ("POST", re.compile(r"^/oidc/token$"), "token_exchange"),
    ("POST", re.compile(r"^/integrations/dockerhub/container-registry/organization/[^/]+/credentials$"), "create"),
    ("GET", re.compile(r"^/integrations/dockerhub/container-registry/project/[^/]+/credentials$"), "list"),
    ("GET", re.compile(r"^/integrations/dockerhub/container-registry/project/[^/]+/credentials/[^/]+$"), "get"),
    ("DELETE", re.compile(r"^/integrations/dockerhub/container-registry/organization/[^/]+/credentials/[^/]+$"), "delete"),
    ("GET", re.compile(r"^/integrations/container-registry/organization/[^/]+/credentials/dockerhub/[^/]+/projects$"), "get_links"),
    ("PUT", re.compile(r"^/integrations/container-registry/organization/[^/]+/credentials/dockerhub/[^/]+/projects$"), "set_links"),
    ("GET", re.compile(r"^/integrations/container-registry/organization/[^/]+/credentials$"), "all_credentials"),
)


def error(status: int, message: Any = None, headers: dict[str, str] | None = None) -> httpx.Response:
    body = {"message": message or "error", "statusCode": status, "timestamp": "2026-01-01T00:00:00Z", "path": "/x"}
    return httpx.Response(status, json=body, headers=headers)


class FakeClock:
    """Monotonic time that only moves when slept on (or by hand); records every sleep."""

    def __init__(self, start: float = 100.0) -> None:
        self.now = start
        self.sleeps: list[float] = []
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self.now

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self.sleeps.append(seconds)
            self.now += seconds


class MockApi:
    """The handler given to `httpx.MockTransport`; thread-safe."""

    def __init__(self, expires_in: float = 600) -> None:
        self.expires_in = expires_in
        self.lock = threading.Lock()
        self.requests: list[tuple[str, httpx.Request]] = []  # (endpoint, request)
        self.script: dict[str, list[Script]] = defaultdict(list)
        self.valid_tokens: set[str] = set()
        self.issued: list[str] = []

    def queue(self, endpoint: str, *items: Script) -> None:
        with self.lock:
            self.script[endpoint].extend(items)

    def count(self, endpoint: str) -> int:
        with self.lock:
            return sum(1 for e, _ in self.requests if e == endpoint)

    def of(self, endpoint: str) -> list[httpx.Request]:
        with self.lock:
            return [r for e, r in self.requests if e == endpoint]

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.raw_path.decode().split("?", 1)[0]  # still percent-encoded: %2F is not a separator
        endpoint = next((n for m, rx, n in _ROUTES if m == request.method and rx.match(path)), "unknown")
        with self.lock:
            self.requests.append((endpoint, request))
            item = self.script[endpoint].pop(0) if self.script[endpoint] else None
        if isinstance(item, BaseException):
            raise item
        if isinstance(item, httpx.Response):
            return item
        if item is not None:
            return item(request)
        return self.default(endpoint, request)

    def default(self, endpoint: str, request: httpx.Request) -> httpx.Response:
        if endpoint == "client_apps":
            return httpx.Response(200, json={"cli": {"appId": CLI_APP}, "vscode": {"appId": "v"}, "intellij": {"appId": "i"}})
        if endpoint == "token_exchange":
            form = {k: v[0] for k, v in parse_qs(request.content.decode()).items()}
            if form.get("client_id") != CLI_APP:
                return httpx.Response(400, json={"error": "invalid_grant", "error_description": "token_exchange_not_allowed"})
            if form.get("subject_token") != PAT:
                return httpx.Response(401, json={"error": "invalid_grant", "error_description": "bad PAT"})
            token = f"jwt.{uuid.uuid4().hex}.sig"
            with self.lock:
                self.valid_tokens.add(token)
                self.issued.append(token)
            return httpx.Response(200, json={"access_token": token, "token_type": "Bearer", "expires_in": self.expires_in})
        auth = request.headers.get("authorization", "")
        with self.lock:
            ok = auth.startswith("Bearer ") and auth[7:] in self.valid_tokens
        if not ok and request.headers.get("x-api-key") != API_KEY:
            return error(401, "Unauthorized")
        if endpoint == "create":
            body = json.loads(request.content)
            return httpx.Response(
                201,
                json={"id": str(uuid.uuid4()), "dockerhubUsername": body["dockerhubUsername"],
                      "registryUrl": "https://index.docker.io/v1/", "createdAt": "2026-01-01T00:00:00Z",
                      **({"description": body["description"]} if "description" in body else {})},
            )
        if endpoint == "list":
            return httpx.Response(200, json=[])
        if endpoint == "get":
            return httpx.Response(200, json={"id": request.url.path.rsplit("/", 1)[1], "dockerhubUsername": "u",
                                             "registryUrl": "r", "createdAt": "c"})
        if endpoint == "delete":
            return httpx.Response(204)
        if endpoint == "get_links":
            return httpx.Response(200, json={"projectIds": [PROJECT]})
        if endpoint == "set_links":
            return httpx.Response(200, json=json.loads(request.content))
        if endpoint == "all_credentials":
            return httpx.Response(200, json={"dockerhub": []})
        return error(404, "Cannot route")


def settings(mode: str = "pat", **overrides: Any) -> CybeDefendSettings:
    raw: dict[str, Any] = {
        "api_url": API,
        "auth_url": AUTH,
        "auth": {"mode": mode, "credential_file": str(Path("/nonexistent/credential"))},
        "max_requests_per_second": 10_000,
        "retry": {"max_attempts": 4, "base_seconds": 0.5, "cap_seconds": 30},
        "token_renew_margin_seconds": 60,
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return CybeDefendSettings.model_validate(raw)


def make_client(
    api: MockApi,
    mode: str = "pat",
    clock: FakeClock | None = None,
    metrics: Metrics | None = None,
    wall_clock: Callable[[], float] = time.time,
    **overrides: Any,
) -> tuple[CybeDefendClient, FakeClock, Metrics]:
    clock = clock or FakeClock()
    metrics = metrics or Metrics()
    credential = Sensitive(PAT if mode == "pat" else API_KEY)
    client = CybeDefendClient(
        settings(mode, **overrides), credential, metrics, transport=httpx.MockTransport(api),
        clock=clock, sleep=clock.sleep, rng=random.Random(42), wall_clock=wall_clock,
    )
    return client, clock, metrics
