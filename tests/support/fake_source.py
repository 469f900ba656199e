"""An in-memory `bridge.ports.SecretSource` with KV v1/v2 semantics, for sync engine unit tests.

The integration tests run the same scenarios against the real `bridge.vault.source.VaultSource` and a
real OpenBao, so what this fake does is kept to what KV really does: versions only grow,
custom metadata changes do not make a version, deleting the current version hides it.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from bridge.config import SourceSettings
from bridge.errors import VaultError
from bridge.model import SecretRef, VaultEntry


@dataclass
class _Secret:
    kv: int
    versions: list[dict[str, Any]] = field(default_factory=list)
    stamps: list[str] = field(default_factory=list)  # each version's created_time
    deleted: set[int] = field(default_factory=set)
    tags: dict[str, str] = field(default_factory=dict)


class FakeSecretSource:
    def __init__(self, kv_versions: Mapping[str, int] | None = None) -> None:
        self._kv = dict(kv_versions or {})
        self._secrets: dict[tuple[str, str], _Secret] = {}
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.total: Counter[str] = Counter()
        self.fail: dict[str, VaultError] = {}  # operation -> error raised (every call) while set

    # -- writing, as an operator would --------------------------------------------------
    def put(self, mount: str, path: str, data: Mapping[str, Any], tags: Mapping[str, str] | None = None) -> int:
        with self._lock:
            kv = self._kv.get(mount, 2)
            s = self._secrets.setdefault((mount, path), _Secret(kv))
            self._writes = getattr(self, "_writes", 0) + 1
            stamp = f"2026-01-01T00:00:{self._writes:06d}Z"  # unique per write, like created_time
            if kv == 1:
                s.versions = [dict(data)]
            else:
                s.versions.append(dict(data))
                s.stamps.append(stamp)
            if tags is not None:
                s.tags = dict(tags)
            return len(s.versions)

    def set_tags(self, mount: str, path: str, tags: Mapping[str, str]) -> None:
        with self._lock:
            self._secrets[(mount, path)].tags = dict(tags)

    def delete_current(self, mount: str, path: str) -> None:
        with self._lock:
            s = self._secrets[(mount, path)]
            s.deleted.add(len(s.versions))

    def delete_all(self, mount: str, path: str) -> None:
        with self._lock:
            del self._secrets[(mount, path)]

    # -- SecretSource ---------------------------------------------------------------------
    def _count(self, op: str) -> None:
        self.counts[op] += 1
        self.total[op] += 1
        if op in self.fail:
            raise self.fail[op]

    def _entry(self, mount: str, path: str, s: _Secret, idx: int) -> VaultEntry:
        ref = SecretRef(mount, path, s.kv)
        if s.kv == 1:
            data = dict(s.versions[-1])
            # As VaultSource does: every value is a tag, as text (KV v1 keeps tags in the data).
            return VaultEntry(ref, None, {k: v if isinstance(v, str) else str(v) for k, v in data.items()}, payload=data,
                              source_index=idx)
        current = len(s.versions)
        return VaultEntry(ref, current, dict(s.tags), deleted=current in s.deleted, source_index=idx,
                          stamp=s.stamps[-1] if s.stamps else None)

    def discover(self, source: SourceSettings, source_index: int) -> Iterable[VaultEntry]:
        self._count("list")
        prefix = source.path + "/" if source.path else ""
        with self._lock:
            items = [(k, v) for k, v in self._secrets.items() if k[0] == source.mount and k[1].startswith(prefix)]
        out = []
        for (mount, path), s in sorted(items):
            self._count("metadata" if s.kv == 2 else "read")
            out.append(self._entry(mount, path, s, source_index))
        return out

    def describe(self, source: SourceSettings, source_index: int, path: str) -> VaultEntry | None:
        path = path.strip("/")
        if source.path and path != source.path and not path.startswith(source.path + "/"):
            return None  # outside the source: not asked of Vault at all
        self._count("metadata" if self._kv.get(source.mount, 2) == 2 else "read")
        with self._lock:
            s = self._secrets.get((source.mount, path))
            return None if s is None else self._entry(source.mount, path, s, source_index)

    def read_value(self, ref: SecretRef, version: int | None) -> Mapping[str, Any]:
        self._count("read")
        with self._lock:
            s = self._secrets.get((ref.mount, ref.path))
            if s is None:
                return {}  # gone: Vault answers 404, VaultSource returns no data
            number = len(s.versions) if version is None or s.kv == 1 else version
            if not 1 <= number <= len(s.versions) or (s.kv == 2 and number in s.deleted):
                return {}  # no such version, or deleted: Vault returns no data for it
            return dict(s.versions[number - 1])

    def peek(self, mount: str, path: str) -> dict[str, Any]:
        """The latest data, as the test sees it (not counted as a request)."""
        with self._lock:
            return dict(self._secrets[(mount, path)].versions[-1])

    def request_counts(self) -> Mapping[str, int]:
        out = dict(self.counts)
        self.counts.clear()
        return out
