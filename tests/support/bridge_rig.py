"""The whole bridge built by the composition root (`build(settings)`, as the CLI does) against a real
OpenBao mount and the CybeDefend double, in this process; `assert_invariant` is what every
end-to-end sync scenario ends with: each tagged, live token registered exactly once for its latest
version, nothing without our marker touched, no secret in the logs, the ledger file or the double's
request records.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bridge.app import Bridge, build
from bridge.config import Settings
from bridge.model import Marker, State
from bridge.ports import PassRequest
from cybedefend_double.simulator import Simulator
from tests.support.config import merged, parse, raw_config
from tests.support.data import ORG, PROJECTS, assert_no_leak, credential, tagged, token
from tests.support.openbao import OpenBao

PAT = credential("cdp", "e2e-pat")
FULL = PassRequest(trigger="manual")


class Rig:
    """A real OpenBao mount, the double, and a bridge built from settings like the CLI does."""

    def __init__(self, bao: OpenBao, mount: str, sim: Simulator, tmp: Path, **overrides: Any) -> None:
        self.bao, self.mount, self.sim, self.tmp = bao, mount, sim, tmp
        (tmp / "pat").write_text(PAT + "\n")
        (tmp / "vault-token").write_text(overrides.pop("vault_token", bao.root_token))
        self.raw: dict[str, Any] = merged(raw_config(
            tmp, vault_addr=bao.addr, vault_token_file=tmp / "vault-token", cybedefend_url=sim.url, mount=mount,
            cybedefend={"retry": {"base_seconds": 0.01, "cap_seconds": 0.2}},
            sync={"retry_base_seconds": 0.01, "retry_cap_seconds": 0.05},
        ), overrides)
        self.tokens: list[str] = []
        self.bridge: Bridge | None = None

    @property
    def settings(self) -> Settings:
        return parse(self.raw)

    def start(self) -> Bridge:
        if self.bridge is not None:
            self.bridge.close(revoke=False)
        self.bridge = build(self.settings)
        return self.bridge

    def put(self, name: str, i: int, project: str = PROJECTS[0], **kw: Any) -> int:
        tok = token(i, name)
        self.tokens.append(tok)
        return self.bao.write_secret(self.mount, f"dockerhub/{name}", {"accessToken": tok, "dockerhubUsername": f"u-{name}"},
                                     tagged(project, **kw))

    def run(self, request: PassRequest = FULL) -> Any:
        assert self.bridge is not None
        return self.bridge.engine.run(request)

    def creates(self) -> list[Any]:
        return [r for r in self.sim.requests if r.endpoint == "create" and r.status == 201]

    def assert_invariant(self, caplog: pytest.LogCaptureFixture | None = None) -> None:
        assert self.bridge is not None
        ledger = {r.key: r for r in self.bridge.ledger.all()}
        seen: dict[str, int] = {}
        for cred in self.sim.credentials(ORG):
            marker = Marker.parse(cred.description)
            if marker is None or marker.instance != "default":  # another instance's are not ours
                continue
            seen[marker.path_digest] = seen.get(marker.path_digest, 0) + 1
        for key, rec in ledger.items():
            if rec.state != State.REGISTERED:
                continue
            digest = self.bridge.keyring.path_digest(rec.ref)
            assert seen.get(digest) == 1, f"{key}: {seen.get(digest)} credentials carry its marker"
            latest = self.bao.client().secrets.kv.v2.read_secret_version(path=rec.path, mount_point=self.mount,
                                                                         raise_on_deleted_version=False)
            cred = next(c for c in self.sim.credentials(ORG) if c.id == rec.credential_id)
            assert cred.token.reveal() == latest["data"]["data"]["accessToken"], f"{key}: stale token registered"
            assert latest["data"]["metadata"]["version"] == rec.version
        texts = [caplog.text] if caplog is not None else []
        db = Path(self.raw["ledger"]["path"])
        for side in (db, db.with_name(db.name + "-wal")):
            if side.exists():
                texts.append(side.read_bytes().decode("latin-1"))
        texts.append(repr(self.sim.requests))
        assert_no_leak(texts, [*self.tokens, PAT, self.bao.root_token])


