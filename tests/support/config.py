"""The one bridge-config builder for the tests, the chaos rig and the benchmarks.

`raw_config` returns the dict a config file would hold: one KV source, the CybeDefend double (or
an address that refuses connections), a PAT file and a ledger in a work directory, then the
caller's sections merged on top (a dict merges into the section of that name, anything else
replaces it). `settings` parses such a dict the way the CLI does, minus the environment.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bridge.config import Settings, parse_settings
from tests.support.data import ORG

NOWHERE = "http://127.0.0.1:1"  # a port nothing listens on: a test that reaches it fails loudly


def merged(raw: dict[str, Any], sections: Mapping[str, Any]) -> dict[str, Any]:
    """`raw` with each section of `sections` merged in (dicts one level deep, the rest replaced)."""
    out = dict(raw)
    for name, value in sections.items():
        if isinstance(value, dict) and isinstance(out.get(name), dict):
            out[name] = {**out[name], **value}
        else:
            out[name] = value
    return out


def raw_config(workdir: Path | None = None, *, vault_addr: str = NOWHERE, vault_token_file: Path | None = None,
               cybedefend_url: str = NOWHERE, mount: str = "secret", prefix: str = "dockerhub", org: str = ORG,
               ledger_name: str = "ledger.sqlite3", **sections: Any) -> dict[str, Any]:
    """A bridge config as a file would hold it; files (PAT, ledger, Vault token) live in `workdir`."""
    where = workdir or Path("/nonexistent")
    vault: dict[str, Any] = {"address": vault_addr}
    if vault_token_file is not None:
        vault["auth"] = {"method": "token", "token_file": str(vault_token_file)}
    raw: dict[str, Any] = {
        "vault": vault,
        "sources": [{"mount": mount, "path": prefix}],
        "cybedefend": {"api_url": cybedefend_url, "auth_url": cybedefend_url, "organization_id": org,
                       "auth": {"credential_file": str(where / "pat")}},
        "ledger": {"path": str(where / ledger_name), "state_mount": mount},  # a key and lease per test mount
    }
    return merged(raw, sections)


def parse(raw: dict[str, Any]) -> Settings:
    """`raw` parsed and validated as the CLI would, without reading the environment."""
    return parse_settings(raw, env={})


def settings(tmp: Path | None = None, **sections: Any) -> Settings:
    """Settings for unit tests: `secret/dockerhub`, the key in a file, quick retries, nothing listening."""
    where = tmp or Path("/nonexistent")
    base = raw_config(tmp, sync={"retry_base_seconds": 1, "retry_cap_seconds": 60},
                      ledger={"key_source": "file", "path": str(where / "ledger.sqlite3"), "key_file": str(where / "key")})
    return parse(merged(base, sections))
