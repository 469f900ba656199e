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
from pathlib import Path

from bridge.errors import CasConflict, ConfigError
from bridge.model import Marker, SecretRef, Sensitive
from bridge.ports import StateStore

KEY_BYTES = 32
KEY_STATE_NAME = "fingerprint-key"


class Keyring:
    """Derives the fingerprint key and the marker key from one secret key."""

    __slots__ = ("_fp_key", "_marker_key")

    def __init__(self, key: bytes) -> None:
        if len(key) < KEY_BYTES:
            raise ValueError(f"the fingerprint key must be at least {KEY_BYTES} bytes")
        # Two derived keys, so a fingerprint can never be confused with a marker digest.
        self._fp_key = hmac.new(key, b"cybedefend-bridge/fingerprint/v1", hashlib.sha256).digest()
        self._marker_key = hmac.new(key, b"cybedefend-bridge/marker/v1", hashlib.sha256).digest()

    def __repr__(self) -> str:
        return "Keyring(***)"

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


def load_key_from_vault(store: StateStore) -> bytes:
    """Read the key from the bridge's Vault state path, creating it once (check-and-set)."""
    for _ in range(3):
        found = store.read_state(KEY_STATE_NAME)
        if found is not None:
            encoded = found[0].get("key")
            if not isinstance(encoded, str):
                raise ConfigError("ledger.key_source", f"the Vault state entry {KEY_STATE_NAME!r} has no 'key' field")
            key = base64.b64decode(encoded)
            if len(key) < KEY_BYTES:
                raise ConfigError("ledger.key_source", f"the key in Vault is shorter than {KEY_BYTES} bytes")
            return key
        key = secrets.token_bytes(KEY_BYTES)
        try:
            store.write_state(KEY_STATE_NAME, {"key": base64.b64encode(key).decode("ascii")}, cas=0)
            return key
        except CasConflict:
            continue  # another replica created it between our read and write: read theirs
    raise ConfigError("ledger.key_source", "could not read or create the fingerprint key in Vault")
