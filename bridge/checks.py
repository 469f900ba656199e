"""The `check` command's checks: configuration, Vault login and capabilities, key, CybeDefend auth, ledger.

Each check reports OK or FAILED with a reason an operator can act on; a failed check does not
stop the ones that do not depend on it.
"""

from __future__ import annotations

from bridge.app import load_api_credential, load_keyring
from bridge.config import Settings
from bridge.cybedefend.client import CybeDefendClient
from bridge.errors import BridgeError
from bridge.ledger import SqliteLedger
from bridge.metrics import Metrics
from bridge.vault.source import VaultSource

Check = tuple[str, bool, str]


def run_checks(settings: Settings) -> list[Check]:
    out: list[Check] = [("configuration", True, f"{len(settings.sources)} source(s), instance {settings.sync.instance!r}")]
    metrics = Metrics()
    vault = VaultSource(settings, metrics)
    try:
        try:
            vault.login()
            out.append(("vault login", True, f"{settings.vault.address} ({settings.vault.auth.method})"))
        except BridgeError as exc:
            out.append(("vault login", False, f"{exc} (check vault.address and vault.auth)"))
            return out
        for name, ok, detail in vault.check_capabilities():
            out.append((f"vault capability {name}", ok, detail))
        client: CybeDefendClient | None = None
        try:
            credential = load_api_credential(settings, vault)
        except BridgeError as exc:
            out.append(("cybedefend credential", False, str(exc)))
        else:
            client = CybeDefendClient(settings.cybedefend, credential, metrics)
            try:
                out.append(("cybedefend authentication", True, client.authenticate()))
            except BridgeError as exc:
                out.append(("cybedefend authentication", False, str(exc)))
        try:
            # With the client: a key is only minted after CybeDefend shows no credential of ours.
            keyring = load_keyring(settings, vault, client)
            out.append(("fingerprint key", True, f"from {settings.ledger.key_source} ({vault.state_location}), "
                                                 f"id {keyring.key_id}"))
        except BridgeError as exc:
            out.append(("fingerprint key", False, str(exc)))
        finally:
            if client is not None:
                client.close()
        try:
            SqliteLedger(settings.ledger.path).close()
            out.append(("ledger", True, f"{settings.ledger.path} is writable"))
        except BridgeError as exc:
            out.append(("ledger", False, str(exc)))
    finally:
        vault.close()
    return out
