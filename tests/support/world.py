"""`World`: the sync engine in this process, against a Vault side (fake or real), the fake registrar,
an in-memory SQLite ledger and a clock the test moves. Rebuilt on demand like a restarted bridge.

The Vault side defaults to the in-memory fake (`w.vault` is then the `FakeSecretSource`, for fault
injection and request counts); tests/test_sync.py runs its Vault-side scenarios with
`World(OpenBaoVault(...))` too. Scenarios name secrets by `name` (`dockerhub/<name>` in the side's
mount); `w.key(name)` is the ledger key.
"""

from __future__ import annotations

import threading
from typing import Any

from bridge.engine.sync import SyncEngine
from bridge.keyring import Keyring
from bridge.ledger import SqliteLedger
from bridge.metrics import Metrics
from bridge.model import Marker, State
from bridge.ports import LedgerRecord, PassRequest, SecretSource
from tests.support.config import settings
from tests.support.data import PROJECTS, tagged, token
from tests.support.fake_source import FakeSecretSource
from tests.support.fakes import FakeRegistrar
from tests.support.vault_side import FakeVault, VaultSide

FULL = PassRequest(trigger="manual")
PREFIX = "dockerhub"


class Clock:
    def __init__(self) -> None:
        self.t = 1_700_000_000.0

    def __call__(self) -> float:
        return self.t


class World:
    """Vault, CybeDefend, the ledger and an engine, rebuilt on demand like a restarted bridge."""

    def __init__(self, side: VaultSide | None = None, **sections: Any) -> None:
        self.side: VaultSide = side or FakeVault()
        base: dict[str, Any] = {"sources": [{"mount": self.side.mount, "path": PREFIX, "kv_version": self.side.kv}]}
        if self.side.address:
            base["vault"] = {"address": self.side.address}
        self.s = settings(**{**base, **sections})
        self.source: SecretSource = self.side.attach(self.s)
        self.api = FakeRegistrar()
        self.ledger = SqliteLedger(":memory:")
        self.keys = Keyring(b"s" * 32)
        self.clock = Clock()
        self.metrics = Metrics()
        self.stop = threading.Event()
        self.tokens: list[str] = []
        self.engine = self.new_engine()

    @property
    def vault(self) -> FakeSecretSource:
        """The in-memory fake behind the side (fault injection, counts); only for a fake side."""
        assert isinstance(self.side, FakeVault), "this scenario needs the fake Vault side"
        return self.side.fake

    @vault.setter
    def vault(self, fake: FakeSecretSource) -> None:
        assert isinstance(self.side, FakeVault), "this scenario needs the fake Vault side"
        self.side.fake = fake
        self.source = fake

    def new_engine(self) -> SyncEngine:
        return SyncEngine(self.s, self.source, self.api, self.ledger, self.keys, self.metrics, stop=self.stop,
                          clock=self.clock)

    def path(self, name: str) -> str:
        return f"{PREFIX}/{name}"

    def key(self, name: str) -> str:
        return f"{self.side.mount}/{PREFIX}/{name}"

    def put(self, name: str, i: int, project: str = PROJECTS[0], **tag_kw: Any) -> int:
        """A valid tagged token as the next version of `dockerhub/<name>`; returns the version."""
        tok = token(i, name)
        self.tokens.append(tok)
        data = {"accessToken": tok, "dockerhubUsername": f"user-{name}"}
        if self.side.kv == 1:
            return self.side.put(self.path(name), {**data, **tagged(project, **tag_kw)})
        return self.side.put(self.path(name), data, tagged(project, **tag_kw))

    def row(self, key: str) -> LedgerRecord:
        """The ledger's row for `key`, which must exist."""
        rec = self.ledger.get(key)
        assert rec is not None, f"no ledger row for {key}"
        return rec

    def run(self, request: PassRequest = FULL) -> Any:
        return self.engine.run(request)

    def creds(self) -> list[Any]:
        return self.api.credentials()

    def close(self) -> None:
        self.side.close()

    def assert_exactly_once(self) -> None:
        """Each tagged, live secret has exactly one credential, for its latest version's token."""
        by_marker: dict[str, list[Any]] = {}
        for c in self.creds():
            m = Marker.parse(c.description)
            assert m is not None, "a credential without the bridge's marker appeared"
            by_marker.setdefault(m.path_digest, []).append((c, m))
        for rec in self.ledger.all():
            if rec.state != State.REGISTERED:
                continue
            digest = self.keys.path_digest(rec.ref)
            found = by_marker.get(digest, [])
            assert len(found) == 1, f"{rec.key}: {len(found)} credentials"
            cred, marker = found[0]
            assert rec.fingerprint is not None
            want = f"v{rec.version}.{rec.fingerprint[:8]}" if rec.ref.kv_version == 2 else f"f{rec.fingerprint[:8]}"
            assert cred.id == rec.credential_id and marker.revision == want
            latest = self.side.peek(rec.path)
            assert self.api.token_of(cred.id).reveal() == latest["accessToken"]
