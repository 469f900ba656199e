"""The bridge's exception tree. Adapters translate library exceptions into these at the boundary.

    BridgeError                      retryable? (class default)
    ├── ConfigError                  no   -> exit code 2
    ├── VaultError
    │   ├── VaultUnavailable         yes  connection refused, timeout, 5xx, sealed, standby
    │   ├── VaultAuthError           yes  login failed or the token was refused (403 on login)
    │   ├── VaultPermissionDenied    no   the policy does not allow this path
    │   ├── VaultInvalidRequest      no   400: a malformed request or a mount of the wrong type
    │   └── VaultAmbiguous           yes  a 404 without Vault's error document (a proxy's): not "gone"
    ├── CybeDefendError              (status, path template, CybeDefend's message; never a body)
    │   ├── TransientError           yes  5xx, timeouts, connection errors
    │   │   └── RateLimited          yes  429, with the server's Retry-After when it gave one
    │   ├── AmbiguousWrite           yes  a create whose fate is unknown: adopt by marker first
    │   ├── AuthenticationError      no   401 after one fresh exchange; a revoked PAT
    │   ├── LegacyApiKeyGone         no   410: API keys were removed; switch to a PAT
    │   ├── PermissionDenied         no   403
    │   ├── NotFound                 no   404
    │   └── InvalidRequest           no   400
    ├── LedgerError                  no   the SQLite file cannot be opened or written
    ├── LeaseError                   yes  the HA lease could not be read or written
    ├── WriterBusy                   no   another process or replica holds the writer lock or lease
    ├── KeyIdentityError             no   the state key is missing or deleted but ours is in use: refuse to mint
    ├── CasConflict                  no   a check-and-set write lost the race (HA lease, key creation)
    ├── PassAbort                    no   every remaining action would fail too (our identity is refused)
    │   └── LeaseLost                no   the writer no longer holds its lease with the margin a write needs
    ├── RemoteRejected               no   CybeDefend answered the create with 400: the input must change
    ├── IngestRejected               no   a POST /v1/audit body the bridge will not take (400 / 413)
    └── BadRequest                   no   a POST /v1/sync body without the documented shape (400)

Messages never contain a token, API key, PAT or request body: they name a path template,
a status and CybeDefend's own message.
"""

from __future__ import annotations


class BridgeError(Exception):
    retryable: bool = False

    def __init__(self, message: str, *, retryable: bool | None = None) -> None:
        super().__init__(message)
        if retryable is not None:
            self.retryable = retryable


class ConfigError(BridgeError):
    """A setting is missing or wrong. `key` names it, dotted (`cybedefend.auth.mode`)."""

    def __init__(self, key: str, expected: str) -> None:
        super().__init__(f"configuration error at {key!s}: {expected}")
        self.key = key
        self.expected = expected


class VaultError(BridgeError):
    pass


class VaultUnavailable(VaultError):
    retryable = True


class VaultAuthError(VaultError):
    retryable = True


class VaultPermissionDenied(VaultError):
    pass


class VaultInvalidRequest(VaultError):
    pass


class VaultAmbiguous(VaultError):
    """A 404 that is not Vault's own answer (no `{"errors": [...]}` document): an ingress, sidecar
    or proxy said it. Absence is not proven, so nothing may be retired on its strength."""

    retryable = True


class CybeDefendError(BridgeError):
    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        endpoint: str | None = None,
        retryable: bool | None = None,
    ) -> None:
        detail = message
        if endpoint is not None:
            detail = f"{endpoint}: {detail}"
        if status is not None:
            detail = f"HTTP {status} {detail}"
        super().__init__(detail, retryable=retryable)
        self.status = status
        self.endpoint = endpoint
        self.api_message = message


class TransientError(CybeDefendError):
    retryable = True


class RateLimited(TransientError):
    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None = None,
        status: int | None = 429,
        endpoint: str | None = None,
    ) -> None:
        super().__init__(message, status=status, endpoint=endpoint)
        self.retry_after = retry_after


class AmbiguousWrite(CybeDefendError):
    """The create may or may not have happened (timeout or dropped connection after sending).

    Retrying the POST blindly could register the token twice, so the caller must list the
    project's credentials and adopt the one carrying its marker before creating again.
    """

    retryable = True


class AuthenticationError(CybeDefendError):
    pass


class LegacyApiKeyGone(CybeDefendError):
    pass


class PermissionDenied(CybeDefendError):
    pass


class NotFound(CybeDefendError):
    pass


class InvalidRequest(CybeDefendError):
    pass


class LedgerError(BridgeError):
    pass


class LeaseError(BridgeError):
    retryable = True


class WriterBusy(BridgeError):
    """Another writer (a process on this host, or a replica holding the HA lease) is active.

    The message names the holder (pid, command, host, or the lease holder), never a secret."""


class KeyIdentityError(BridgeError):
    """Minting a new HMAC key would orphan the credentials already registered with the old one.

    The message says how to restore: undelete the key's version, or point `ledger.state_mount` /
    `ledger.state_path` at the old location."""


class CasConflict(BridgeError):
    """A KV v2 check-and-set write found a different version: another replica wrote first."""


class PassAbort(BridgeError):
    """A failure that every remaining action would hit too (CybeDefend refuses our identity)."""


class LeaseLost(PassAbort):
    """The writer's lease (HA) or lock no longer covers the next write with its margin: stop writing."""


class RemoteRejected(BridgeError):
    """CybeDefend answered the create POST with 400: the input, not the bridge, must change.

    Only the create's 400 means that; a 400 on a later step (links) is an ordinary failure,
    retried, since the credential may already exist.
    """


class IngestRejected(BridgeError, ValueError):
    """A POST /v1/audit body the bridge will not take. `too_large`: answer 413, else 400."""

    def __init__(self, message: str, *, too_large: bool = False) -> None:
        super().__init__(message)
        self.too_large = too_large


class BadRequest(BridgeError, ValueError):
    """A request body that does not have the documented shape; the message is safe to return."""
