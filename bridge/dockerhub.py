"""Optional check of a token with DockerHub before it is registered (`sync.verify_with_dockerhub`).

`POST https://hub.docker.com/v2/auth/token` with the username and token: 200 means DockerHub
accepts them, 401/403 that it does not (the secret is rejected, nothing is sent to CybeDefend).
Anything else is transient: the secret is retried later rather than rejected on a hiccup.
"""

from __future__ import annotations

import httpx

from bridge.errors import TransientError
from bridge.logs import get_logger
from bridge.model import Sensitive

log = get_logger(__name__)
ENDPOINT = "POST /v2/auth/token"


class DockerHubVerifier:
    def __init__(self, url: str, *, timeout: float = 10.0, transport: httpx.BaseTransport | None = None) -> None:
        self._url = url
        self._client = httpx.Client(timeout=timeout, transport=transport, follow_redirects=False)

    def accepts(self, username: str, token: Sensitive) -> bool:
        """True when DockerHub accepts the token for the username. Calls POST /v2/auth/token."""
        try:
            resp = self._client.post(self._url, json={"identifier": username, "secret": token.reveal()})
        except httpx.HTTPError as exc:
            # The exception text names the URL only; the body (with the token) is never in it.
            raise TransientError(f"DockerHub unreachable ({type(exc).__name__})", endpoint=ENDPOINT) from None
        if resp.status_code == 200:
            return True
        if resp.status_code in (401, 403):
            return False
        raise TransientError("DockerHub answered unexpectedly", status=resp.status_code, endpoint=ENDPOINT,
                             retryable=True)

    def close(self) -> None:
        self._client.close()
