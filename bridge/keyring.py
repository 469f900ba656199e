"""Keyed fingerprints of tokens and ownership markers, and where their key comes from.

Change detection compares HMAC-SHA256 fingerprints, never tokens (the idea of
vault-secrets-operator's `helpers/hmac.go`). The same secret key, through a second derived
key, makes the path digest of the ownership marker. The key therefore has to survive the loss
of the local volume and be the same on every replica, or markers would stop matching and
tokens would be registered twice: by default it lives in Vault (docs/adr/0002-key-in-vault.md).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from bridge.errors import CasConflict, ConfigError, KeyIdentityError, VaultInvalidRequest, VaultPermissionDenied
from bridge.model import Marker, SecretRef, Sensitive
from bridge.ports import StateStore

KEY_BYTES = 32
KEY_STATE_NAME = "fingerprint-key"


class Keyring:
    """Derives the fingerprint key and the marker key from one secret key."""

    __slots__ = ("_forward_key", "_fp_key", "_marker_key", "key_id")

    def __init__(self, key: bytes) -> None:
        if len(key) < KEY_BYTES:
            raise ValueError(f"the fingerprint key must be at least {KEY_BYTES} bytes")
        # Two derived keys, so a fingerprint can never be confused with a marker digest.
        self._fp_key = hmac.new(key, b"cybedefend-bridge/fingerprint/v1", hashlib.sha256).digest()
        self._marker_key = hmac.new(key, b"cybedefend-bridge/marker/v1", hashlib.sha256).digest()
        self._forward_key = derive_forward_key(key)
        self.key_id = key_id(key)

    def __repr__(self) -> str:
        return "Keyring(***)"

    def forward_key(self) -> bytes:
        """The HMAC key for forwarded triggers (bridge.daemon.ha); derived, never the key itself."""
        return self._forward_key

    def fingerprint(self, token: Sensitive) -> str:
        return hmac.new(self._fp_key, token.reveal().encode("utf-8"), hashlib.sha256).hexdigest()

    def path_digest(self, ref: SecretRef) -> str:
        return hmac.new(self._marker_key, ref.key.encode("utf-8"), hashlib.sha256).hexdigest()[:12]

    def marker(self, instance: str, ref: SecretRef, version: int | None, fingerprint: str) -> Marker:
        # KV v1 has no versions: the fingerprint's first 8 hex characters stand in for one. KV v2
        # carries them too, since versions restart at 1 when a secret is deleted and recreated.
        revision = f"v{version}.{fingerprint[:8]}" if version is not None else f"f{fingerprint[:8]}"
        return Marker(instance, self.path_digest(ref), revision)


def load_key_file(path: Path) -> bytes:
    """Read the key file, creating it (0600, in a 0700 directory) with a fresh key if absent."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        key = secrets.token_bytes(KEY_BYTES)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return load_key_file(path)  # another process created it first
        with os.fdopen(fd, "wb") as fh:
            fh.write(base64.b64encode(key))
            fh.flush()
            os.fsync(fh.fileno())
        return key
    except OSError as exc:
        raise ConfigError("ledger.key_file", f"cannot read {path}: {exc.strerror}") from None
    try:
        key = base64.b64decode(data.strip(), validate=True)
    except ValueError:
        raise ConfigError("ledger.key_file", f"{path} does not hold a base64 key") from None
    if len(key) < KEY_BYTES:
        raise ConfigError("ledger.key_file", f"{path} holds a key shorter than {KEY_BYTES} bytes")
    return key


def key_id(key: bytes) -> str:
    """A short, non-secret identity of the key for logs: 8 hex of HMAC(key, "key-id").

    Two replicas (or a restarted pod) logging different ids are using different keys: their
    markers will not match. One-way, so it tells nothing about the key itself."""
    return hmac.new(key, b"key-id", hashlib.sha256).hexdigest()[:8]


def derive_forward_key(key: bytes) -> bytes:
    """The key that authenticates triggers a standby forwards to the leader (never the webhook token)."""
    return hmac.new(key, b"cybedefend-bridge/forward/v1", hashlib.sha256).digest()


class KeyStore(StateStore, Protocol):
    """A `StateStore` that can also tell "absent" from "current version deleted or destroyed"."""

    @property
    def location(self) -> str: ...

    def state_status(self, name: str) -> tuple[str, int]:
        """("absent" | "present" | "deleted" | "destroyed", current version)."""
        ...

    def write_state(self, name: str, data: Mapping[str, Any], cas: int, *, overwrite_deleted: bool = True) -> int: ...


def _decode(found: tuple[dict[str, Any], int], where: str) -> bytes:
    encoded = found[0].get("key")
    if not isinstance(encoded, str):
        raise ConfigError("ledger.key_source", f"the Vault state entry {where} has no 'key' field")
    try:
        key = base64.b64decode(encoded, validate=True)
    except ValueError:
        raise ConfigError("ledger.key_source", f"the Vault state entry {where} does not hold a base64 key") from None
    if len(key) < KEY_BYTES:
        raise ConfigError("ledger.key_source", f"the key in Vault at {where} is shorter than {KEY_BYTES} bytes")
    return key


def _refuse_deleted(store: KeyStore, status: str, version: int) -> KeyIdentityError:
    mount, _, path = store.location.partition("/")
    return KeyIdentityError(
        f"the fingerprint key at {store.location}/{KEY_STATE_NAME} has its current version {version} {status}; "
        "a new key would orphan every credential registered with it, so none is minted. Restore it: "
        + (f"`bao kv undelete -mount={mount} -versions={version} {path}/{KEY_STATE_NAME}`"
           if status == "deleted" else
           f"`bao kv rollback -mount={mount} -version=<an earlier version> {path}/{KEY_STATE_NAME}` "
           "(a destroyed version cannot come back)")
        + ", or point ledger.state_mount/ledger.state_path at where the key is kept"
    )


def load_key_from_vault(
    store: KeyStore,
    *,
    instance: str = "default",
    legacy: KeyStore | None = None,
    our_credentials: Callable[[], int] | None = None,
) -> tuple[bytes, KeyStore]:
    """The key from the bridge's Vault state, and the store it was found in.

    Order: the configured location; else the old default `legacy` (the first source's mount),
    used from there; else mint one (check-and-set) — but never when the current version is
    deleted or destroyed, and never when `our_credentials()` says CybeDefend already holds
    credentials with this instance's markers (they were made with a key that must be restored,
    not replaced). `our_credentials=None`: no such check is possible (the caller says why)."""
    for _ in range(3):
        found = store.read_state(KEY_STATE_NAME)
        if found is not None:
            return _decode(found, f"{store.location}/{KEY_STATE_NAME}"), store
        status, version = store.state_status(KEY_STATE_NAME)
        if status in ("deleted", "destroyed"):
            raise _refuse_deleted(store, status, version)
        if status == "present":
            continue  # written between our read and the metadata read: read it again
        if legacy is not None:
            try:
                old = legacy.read_state(KEY_STATE_NAME)
                old_status, old_version = ("present", 0) if old is not None else legacy.state_status(KEY_STATE_NAME)
            except (VaultPermissionDenied, VaultInvalidRequest):
                # A policy made for the new default need not reach the old place (or its mount is
                # gone): nothing to migrate from that we may see. The marker check below still holds.
                old, old_status, old_version = None, "absent", 0
            if old is not None:
                return _decode(old, f"{legacy.location}/{KEY_STATE_NAME}"), legacy
            if old_status in ("deleted", "destroyed"):
                raise _refuse_deleted(legacy, old_status, old_version)
        if our_credentials is not None:
            n = our_credentials()
            if n:
                raise KeyIdentityError(
                    f"no fingerprint key at {store.location}/{KEY_STATE_NAME}, but {n} credential(s) in CybeDefend "
                    f"carry instance {instance!r}'s marker: they were registered with a key that must be restored, "
                    "not replaced (a new one would register every token again). Restore it: undelete its version, "
                    "or point ledger.state_mount/ledger.state_path at the location it is kept in "
                    "(before the fixed default, it was the first source's mount, cybedefend-bridge/<instance>)"
                )
        key = secrets.token_bytes(KEY_BYTES)
        try:
            store.write_state(KEY_STATE_NAME, {"key": base64.b64encode(key).decode("ascii")}, cas=0,
                              overwrite_deleted=False)
            return key, store
        except CasConflict:
            continue  # another replica created it between our read and write (or it was deleted): look again
    raise ConfigError("ledger.key_source", "could not read or create the fingerprint key in Vault")
