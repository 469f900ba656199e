"""The Vault side of a test, fake or real, behind one interface: what an operator does, and the adapter.

A `VaultSide` is a KV mount an operator writes to (`put`, `set_tags`, `delete_current`,
`delete_all`, `peek`) and the `SecretSource` the bridge reads it through (`source`). Two kinds:

- `FakeVault`: `FakeSecretSource` in memory; the operator's writes and the adapter are one object.
- `OpenBaoVault`: a fresh KV mount on a real OpenBao, written through hvac, read through the
  product's `bridge.vault.source.VaultSource`.

tests/test_source_contract.py runs the same contract against both (the fake is only as good as
that contract), and tests/test_sync.py runs its scenarios against both.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from typing import Any, Protocol

from bridge.config import Settings
from bridge.metrics import Metrics
from bridge.ports import SecretSource
from bridge.vault.source import VaultSource
from tests.support.config import NOWHERE
from tests.support.fake_source import FakeSecretSource
from tests.support.openbao import OpenBao

KINDS = ("fake", "openbao")


class VaultSide(Protocol):
    mount: str
    kv: int
    address: str

    def attach(self, settings: Settings) -> SecretSource:
        """The SecretSource a bridge with `settings` (whose sources name this mount) reads through."""
        ...

    def put(self, path: str, data: Mapping[str, Any], tags: Mapping[str, str] | None = None) -> int: ...

    def set_tags(self, path: str, tags: Mapping[str, str]) -> None: ...

    def delete_current(self, path: str) -> None: ...

    def delete_all(self, path: str) -> None: ...

    def peek(self, path: str) -> dict[str, Any]: ...

    def close(self) -> None: ...


class FakeVault:
    """A KV mount in `FakeSecretSource`; `fake` is the object itself, for fault injection and counts."""

    address = NOWHERE

    def __init__(self, mount: str = "secret", kv: int = 2) -> None:
        self.mount, self.kv = mount, kv
        self.fake = FakeSecretSource({mount: kv})

    def attach(self, settings: Settings) -> SecretSource:
        return self.fake

    def put(self, path: str, data: Mapping[str, Any], tags: Mapping[str, str] | None = None) -> int:
        return self.fake.put(self.mount, path, data, tags)

    def set_tags(self, path: str, tags: Mapping[str, str]) -> None:
        self.fake.set_tags(self.mount, path, tags)

    def delete_current(self, path: str) -> None:
        self.fake.delete_current(self.mount, path)

    def delete_all(self, path: str) -> None:
        self.fake.delete_all(self.mount, path)

    def peek(self, path: str) -> dict[str, Any]:
        return self.fake.peek(self.mount, path)

    def close(self) -> None:
        pass


class OpenBaoVault:
    """A fresh KV mount on a real OpenBao (disabled by `close`), read through `VaultSource`."""

    def __init__(self, bao: OpenBao, kv: int = 2) -> None:
        self.bao, self.kv = bao, kv
        self.mount = f"side{kv}-{secrets.token_hex(4)}"
        self.address = bao.addr
        bao.enable_kv(self.mount, kv)
        self._sources: list[VaultSource] = []

    def attach(self, settings: Settings) -> SecretSource:
        source = VaultSource(settings, Metrics(), env={"VAULT_TOKEN": self.bao.root_token})
        self._sources.append(source)
        return source

    def put(self, path: str, data: Mapping[str, Any], tags: Mapping[str, str] | None = None) -> int:
        if self.kv == 1:
            self.bao.write_kv1(self.mount, path, dict(data))
            return 1
        return self.bao.write_secret(self.mount, path, dict(data), dict(tags) if tags is not None else None)

    def set_tags(self, path: str, tags: Mapping[str, str]) -> None:
        self.bao.set_metadata(self.mount, path, dict(tags))

    def delete_current(self, path: str) -> None:
        self.bao.client().secrets.kv.v2.delete_latest_version_of_secret(path=path, mount_point=self.mount)

    def delete_all(self, path: str) -> None:
        kv = self.bao.client().secrets.kv
        if self.kv == 1:
            kv.v1.delete_secret(path=path, mount_point=self.mount)
        else:
            kv.v2.delete_metadata_and_all_versions(path=path, mount_point=self.mount)

    def peek(self, path: str) -> dict[str, Any]:
        kv = self.bao.client().secrets.kv
        if self.kv == 1:
            return dict(kv.v1.read_secret(path=path, mount_point=self.mount)["data"])
        doc = kv.v2.read_secret_version(path=path, mount_point=self.mount, raise_on_deleted_version=False)
        return dict(doc["data"]["data"] or {})

    def close(self) -> None:
        for source in self._sources:
            source.close()
        self.bao.disable_mount(self.mount)
