"""hvac, for the rare calls only: imported on first use, never by the daemon's routine paths.

The one module of the bridge that imports hvac and requests (pyproject.toml's import contracts
keep it so). Everything a daemon does routinely (token lookup, renewal and
revocation, logins, KV v2 reads and check-and-set writes of its state, the /readyz check) goes
through the lean transport of `bridge.vault.transport`; hvac with requests, urllib3 and
charset-normalizer costs ~6-7 MiB of resident memory for a handful of requests an hour
(docs/adr/0015-no-hvac-on-the-routine-path.md). What is left here is `check`'s
sys/capabilities-self, run once by an operator.
"""

from __future__ import annotations

import hvac
import hvac.exceptions
import requests

from bridge.config import VaultSettings
from bridge.errors import VaultError, VaultUnavailable

# hvac's exception classes and the HTTP status each stands for (hvac.exceptions.VaultError.from_status).
_STATUS = {
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
}


def new_client(settings: VaultSettings) -> hvac.Client:
    tls = settings.tls
    client = hvac.Client(
        url=settings.address,
        token="",  # never let hvac read VAULT_TOKEN or ~/.vault-token on its own
        verify=False if tls.skip_verify else (str(tls.ca_cert) if tls.ca_cert else True),
        cert=(str(tls.client_cert), str(tls.client_key)) if tls.client_cert else (),
        timeout=settings.timeout_seconds,
        namespace=settings.namespace,
    )
    client.session.trust_env = False  # same behaviour as the lean path: no proxy, no netrc
    return client


def translate_library(exc: BaseException, operation: str, path: str) -> VaultError | None:
    """The bridge error for an hvac or requests exception that needs its own reading; None:
    not one (the caller's generic translation applies: requests' errors are OSErrors)."""
    # Imported here, not at the top: bridge.vault.transport imports this module lazily.
    from bridge.vault.transport import ambiguous_404, error_for_status, is_vault_404, tls_detail

    if isinstance(exc, hvac.exceptions.InvalidPath) and not is_vault_404(getattr(exc, "json", None)):
        return ambiguous_404(operation, path)
    if isinstance(exc, hvac.exceptions.VaultError):
        return error_for_status(_STATUS.get(type(exc), 500), operation, path, exc.errors)
    if isinstance(exc, requests.exceptions.Timeout):
        return VaultUnavailable(f"Vault {operation} {path}: timed out")
    if isinstance(exc, requests.exceptions.SSLError):
        return VaultUnavailable(f"Vault {operation} {path}: TLS error ({tls_detail(exc)})")
    return None


def is_invalid_path(exc: BaseException | None) -> bool:
    """True for hvac's 404 (the call's `missing` answer), as kept in a translated error's __cause__."""
    return isinstance(exc, hvac.exceptions.InvalidPath)
