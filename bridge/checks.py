"""The `check` command's checks: configuration, Vault, sources, key, CybeDefend, organizations, ledger.

Read-only: `check` changes nothing. Where a pass would create something (the fingerprint key,
the ledger file) the check says "would be created on first sync" instead of creating it. Every
check runs and is reported, OK or FAILED with a reason an operator can act on and the address
it tried; a check that needs an earlier one that failed is reported FAILED as "not run".
"""

from __future__ import annotations

import base64
import binascii
import os
from dataclasses import dataclass

from bridge.app import load_api_credential
from bridge.config import Settings
from bridge.cybedefend.client import CybeDefendClient
from bridge.errors import BridgeError, ConfigError
from bridge.keyring import KEY_BYTES, KEY_STATE_NAME, load_key_file
from bridge.metrics import Metrics
from bridge.model import Marker
from bridge.vault.source import VaultSource


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool
    detail: str
    # Failed because of the configuration (a named file unreadable or malformed): `check` then
    # exits 2 like every other command, after running the other checks.
    config_error: bool = False


def run_checks(settings: Settings) -> list[Check]:
    out = [Check("configuration", True, f"{len(settings.sources)} source(s), instance {settings.sync.instance!r}")]
    metrics = Metrics()
    vault = VaultSource(settings, metrics)
    addr = settings.vault.address
    try:
        try:
            vault.login()
            logged_in = True
            out.append(Check("vault login", True, f"{addr} ({settings.vault.auth.method})"))
        except BridgeError as exc:
            logged_in = False
            out.append(Check("vault login", False, f"{addr}: {exc} (check vault.address and vault.auth)"))
        if logged_in:
            out += [Check(f"vault capability {name}", ok, detail) for name, ok, detail in vault.check_capabilities()]
            out += _sources(settings, vault)
            out.append(_key(settings, vault))
        else:
            out.append(Check("vault sources", False, "not run: needs the Vault login"))
            out.append(_key(settings, None))
        out += _cybedefend(settings, vault if logged_in else None, metrics)
        out.append(_ledger(settings))
    finally:
        vault.close()
    return out


def _sources(settings: Settings, vault: VaultSource) -> list[Check]:
    out = []
    for src in settings.sources:
        where = f"{src.mount}/{src.path}".rstrip("/")
        try:
            keys = vault.list_keys(src)
            out.append(Check(f"vault source {where}", True, f"{len(keys)} secret(s) listed at {settings.vault.address}"))
        except BridgeError as exc:
            out.append(Check(f"vault source {where}", False, f"{settings.vault.address}: {exc}"))
    return out


def _key(settings: Settings, vault: VaultSource | None) -> Check:
    name = "fingerprint key"
    if settings.ledger.key_source == "file":
        path = settings.ledger.key_file
        if not path.exists():
            return Check(name, True, f"{path} does not exist yet: would be created on first sync")
        try:
            load_key_file(path)  # reads only: the file exists
        except ConfigError as exc:
            return Check(name, False, str(exc), config_error=True)
        except BridgeError as exc:
            return Check(name, False, str(exc))
        return Check(name, True, f"from {path}")
    where = f"{settings.state_mount}/{settings.state_path}/{KEY_STATE_NAME}"
    if vault is None:
        return Check(name, False, f"not run: needs the Vault login (key at {where})")
    try:
        found = vault.read_state(KEY_STATE_NAME)
    except BridgeError as exc:
        return Check(name, False, f"{where}: {exc}")
    if found is None:
        return Check(name, True, f"{where} does not exist yet: would be created on first sync")
    encoded = found[0].get("key")
    try:
        ok = isinstance(encoded, str) and len(base64.b64decode(encoded, validate=True)) >= KEY_BYTES
    except (binascii.Error, ValueError):
        ok = False
    return Check(name, ok, f"from Vault {where}" if ok else f"{where} holds no valid 'key' field")


def _cybedefend(settings: Settings, vault: VaultSource | None, metrics: Metrics) -> list[Check]:
    cd = settings.cybedefend
    orgs = sorted({o for o in [cd.organization_id, *(s.organization_id for s in settings.sources)] if o})
    org_names = [f"cybedefend organization {o}" for o in orgs]
    if cd.auth.credential_file is None and vault is None:
        return [Check("cybedefend credential", False, "not run: the credential is read from Vault, which failed"),
                *(Check(n, False, "not run: needs the credential") for n in org_names)]
    try:
        credential = load_api_credential(settings, vault)  # type: ignore[arg-type]  # None only with a file
    except BridgeError as exc:
        return [Check("cybedefend credential", False, str(exc), config_error=isinstance(exc, ConfigError)),
                *(Check(n, False, "not run: needs the credential") for n in org_names)]
    out = [Check("cybedefend credential", True, f"{cd.auth.mode} from "
                 f"{cd.auth.credential_file or cd.auth.credential_vault_path}")]
    client = CybeDefendClient(cd, credential, metrics)
    try:
        try:
            out.append(Check("cybedefend authentication", True, f"{cd.resolved_api_url}: {client.authenticate()}"))
        except BridgeError as exc:
            out.append(Check("cybedefend authentication", False, f"{cd.resolved_api_url} (auth {cd.resolved_auth_url}): {exc}"))
            return out + [Check(n, False, "not run: authentication failed") for n in org_names]
        for org, name in zip(orgs, org_names, strict=True):
            try:
                creds = client.all_credentials(org)
            except BridgeError as exc:
                out.append(Check(name, False, f"{cd.resolved_api_url}: {exc}"))
                continue
            ours = sum(1 for c in creds if (m := Marker.parse(c.description)) and m.instance == settings.sync.instance)
            # Listing needs only read access; whether the PAT's user may also manage (create,
            # delete) only a write would prove, and check writes nothing: say so.
            out.append(Check(name, True, f"{len(creds)} DockerHub credential(s) listed, {ours} of instance "
                             f"{settings.sync.instance!r}; registering also needs manage_integration, "
                             "which only the first sync can prove"))
    finally:
        client.close()
    return out


def _ledger(settings: Settings) -> Check:
    path = settings.ledger.path
    if path.exists():
        ok = os.access(path, os.R_OK | os.W_OK)
        return Check("ledger", ok, f"{path} is readable and writable" if ok else f"{path} is not readable and writable")
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is not None and os.access(parent, os.W_OK | os.X_OK):
        return Check("ledger", True, f"{path} does not exist yet: would be created on first sync")
    return Check("ledger", False, f"{path} does not exist and {parent} is not writable")
