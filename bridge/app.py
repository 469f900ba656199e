"""Composition root: builds the parts from settings and wires them. Nothing else does wiring.

Every other module receives what it needs (settings, metrics, clock, transport, stop event);
only here are concrete adapters chosen. Tests build the same parts with fakes or with their
own transport instead of calling this module.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bridge.config import Settings
from bridge.cybedefend import CybeDefendClient, read_credential_file
from bridge.errors import BridgeError, ConfigError
from bridge.fingerprint import Keyring, load_key_file, load_key_from_vault
from bridge.ledger import SqliteLedger
from bridge.logs import get_logger, register_secret
from bridge.metrics import Metrics
from bridge.model import Sensitive
from bridge.sync import SyncEngine
from bridge.vault import VaultSource

log = get_logger(__name__)


def load_keyring(settings: Settings, vault: VaultSource) -> Keyring:
    if settings.ledger.key_source == "file":
        return Keyring(load_key_file(settings.ledger.key_file))
    return Keyring(load_key_from_vault(vault))


def load_api_credential(settings: Settings, vault: VaultSource) -> Sensitive:
    auth = settings.cybedefend.auth
    if auth.credential_file is not None:
        cred = read_credential_file(auth.credential_file)
    else:
        assert auth.credential_vault_path is not None  # settings validation guarantees one of them
        try:
            cred = vault.read_secret_field(auth.credential_vault_path)
        except BridgeError as exc:
            raise ConfigError("cybedefend.auth.credential_vault_path", f"cannot read it from Vault: {exc}") from None
    register_secret(cred.reveal())
    return cred


@dataclass
class Bridge:
    """The built parts of one bridge, closed together."""

    settings: Settings
    metrics: Metrics
    vault: VaultSource
    client: CybeDefendClient
    ledger: SqliteLedger
    keyring: Keyring
    engine: SyncEngine
    stop: threading.Event
    _closers: list[Callable[[], None]] = field(default_factory=list)

    def close(self, *, revoke: bool = True) -> None:
        for closer in reversed(self._closers):
            try:
                closer()
            except BridgeError as exc:
                log.warning("error while closing", error=str(exc))
        self._closers.clear()
        if revoke and self.settings.vault.revoke_on_shutdown:
            try:
                self.vault.revoke_self()
            except BridgeError as exc:
                log.warning("could not revoke the Vault token", error=str(exc))
        self.vault.close()


def build(
    settings: Settings,
    *,
    metrics: Metrics | None = None,
    stop: threading.Event | None = None,
    ledger_path: Path | str | None = None,
    rng: random.Random | None = None,
) -> Bridge:
    """Log in to Vault, load the key and the CybeDefend credential, open the ledger."""
    metrics = metrics or Metrics()
    stop = stop or threading.Event()
    vault = VaultSource(settings, metrics)
    closers: list[Callable[[], None]] = []
    try:
        vault.login()
        keyring = load_keyring(settings, vault)
        credential = load_api_credential(settings, vault)
        client = CybeDefendClient(settings.cybedefend, credential, metrics, rng=rng)
        closers.append(client.close)
        ledger = SqliteLedger(ledger_path if ledger_path is not None else settings.ledger.path)
        closers.append(ledger.close)
    except BaseException:
        for closer in reversed(closers):
            closer()
        vault.close()
        raise
    engine = SyncEngine(settings, vault, client, ledger, keyring, metrics, stop=stop, rng=rng)
    return Bridge(settings, metrics, vault, client, ledger, keyring, engine, stop, closers)
