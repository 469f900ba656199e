"""Event-driven targeted syncs: which secret an audit line names, and the debounced queue of them.

Every trigger (tailed audit file, socket audit device, forwarded audit lines, webhook, a
standby forwarding to the leader) ends in `TriggerQueue.offer`; the daemon's loop calls
`TriggerQueue.take` and runs the `PassRequest` it gets. The queue never blocks a producer and
never grows past its bound: on overflow it asks for one full pass instead, which covers every
dropped key because a full pass reads Vault after the request is taken.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bridge.config import SourceSettings
from bridge.daemon.audit import MAX_LINE_BYTES, decode_audit_line
from bridge.metrics import TRIGGERS, Metrics
from bridge.model import SecretRef
from bridge.ports import PassRequest

# Sources that offer keys; a full pass may also be requested by any trigger name in TRIGGERS.
SOURCES = ("audit_file", "audit_socket", "audit_ingest", "webhook", "forwarded")

_WRITE_OPS = frozenset({"create", "update", "patch", "delete"})
# KV v2 endpoints that change a secret; `config` and `subkeys` do not name one.
_KV2_SECRET_ENDPOINTS = frozenset({"data", "metadata"})
_KV2_VERSION_ENDPOINTS = frozenset({"delete", "destroy", "undelete"})  # always POST/PUT


def _norm_ns(value: object) -> str:
    return value.strip("/") if isinstance(value, str) else ""


class AuditMatcher:
    """Finds the secrets (`SecretRef.key`, `mount/path`) a successful KV write touched.

    Only `type == "response"` entries without `error` count: the request entry is logged
    before Vault acts, and a refused or failed write changed nothing. `kv_versions` maps a
    mount to its resolved KV version (for sources configured `auto`); a mount missing from it
    is guessed from the path shape. `namespace` is the bridge's Vault namespace: writes in
    other namespaces are ignored (their `mount/path` would name a different secret).
    `exclude` lists key prefixes never to match, e.g. the bridge's own state path, whose lease
    renewals would otherwise trigger a sync every few seconds.
    """

    def __init__(
        self,
        sources: Sequence[SourceSettings],
        kv_versions: Mapping[str, int],
        *,
        namespace: str | None = None,
        exclude: Sequence[str] = (),
        max_line_bytes: int = MAX_LINE_BYTES,
    ) -> None:
        self._sources = [(s.mount.strip("/"), s.path.strip("/"), self._version(s, kv_versions)) for s in sources]
        self._mounts = {m for m, _, _ in self._sources}
        self._namespace = _norm_ns(namespace)
        self._exclude = tuple(e.strip("/") for e in exclude if e.strip("/"))
        self._max = max_line_bytes

    @staticmethod
    def _version(source: SourceSettings, kv_versions: Mapping[str, int]) -> int | None:
        v = kv_versions.get(source.mount.strip("/"))
        if v in (1, 2):
            return v
        return source.kv_version if isinstance(source.kv_version, int) else None

    def match(self, line: bytes | str) -> list[str]:
        """Keys touched by the write this audit line records; [] for anything else. Never raises."""
        entry = decode_audit_line(line, self._max)
        return [] if entry is None else self.match_entry(entry)

    def match_entry(self, entry: Mapping[str, Any]) -> list[str]:
        if entry.get("type") != "response" or entry.get("error"):
            return []
        req = entry.get("request")
        if not isinstance(req, dict):
            return []
        # Checked as a string first: `[] in frozenset` raises TypeError (unhashable), and one odd
        # line must never cost the rest of its batch.
        op, path = req.get("operation"), req.get("path")
        if not isinstance(op, str) or op not in _WRITE_OPS or not isinstance(path, str):
            return []
        # `.` / `..` / empty (`//`) segments: not a name the bridge can trust to mean one secret
        # (the engine's listing would never produce it); the periodic full pass covers whatever it was.
        if any(seg in (".", "..") for seg in path.split("/")) or "//" in path.strip("/"):
            return []
        ns_info = req.get("namespace", {})  # absent before Vault 0.11: the root namespace
        if not isinstance(ns_info, dict):
            return []
        ns = _norm_ns(ns_info.get("path"))
        if ns != self._namespace:
            return []
        path = self._strip_ns(path, ns)
        mount_point = req.get("mount_point")
        mount_hint = self._strip_ns(mount_point, ns) if isinstance(mount_point, str) else None
        keys: list[str] = []
        for mount, prefix, version in self._sources:
            if mount_hint is not None and mount_hint in self._mounts and mount_hint != mount:
                continue  # Vault says which mount served it: trust that over prefix matching
            if not path.startswith(mount + "/"):
                continue
            secret = self._secret_path(path[len(mount) + 1 :], op, version)
            if not secret or (prefix and secret != prefix and not secret.startswith(prefix + "/")):
                continue
            key = SecretRef(mount, secret).key
            if key not in keys and not self._excluded(key):
                keys.append(key)
        return keys

    @staticmethod
    def _strip_ns(path: str, ns: str) -> str:
        # OpenBao logs paths relative to the namespace but mount_point with it ("ns1/secret/");
        # strip it from both so either form matches.
        path = path.strip("/")
        if ns and path.startswith(ns + "/"):
            path = path[len(ns) + 1 :]
        return path

    @staticmethod
    def _secret_path(rest: str, op: str, version: int | None) -> str | None:
        endpoint, _, secret = rest.partition("/")
        if version is None:  # unknown mount version: a KV v2 endpoint shape wins
            version = 2 if endpoint in _KV2_SECRET_ENDPOINTS | _KV2_VERSION_ENDPOINTS and secret else 1
        if version == 1:
            return rest or None
        if endpoint in _KV2_SECRET_ENDPOINTS:
            return secret or None
        if endpoint in _KV2_VERSION_ENDPOINTS and op in ("create", "update"):
            return secret or None
        return None

    def _excluded(self, key: str) -> bool:
        return any(key == e or key.startswith(e + "/") for e in self._exclude)


@dataclass(slots=True)
class _Pending:
    source: str
    heard_at: float  # reported in PassRequest.received_at (first write of the burst)
    first_seen: float  # queue clock: bounds how long a never-settling burst can wait
    last_seen: float  # queue clock: debounce runs from the latest write
    leading: bool = False  # first write after a quiet period: due at once, no debounce


class TriggerQueue:
    """Debounced, bounded, thread-safe queue of keys to sync, plus a "full pass requested" flag.

    A key is ready once no write to it was heard for `debounce_seconds`, or once it has waited
    `max_delay_seconds` (default 10 x debounce, at least 1 s) so that a key written
    continuously is still synced. `clock` decides readiness; `take`'s `timeout` is how long the
    calling thread may block, in real seconds.

    With `leading_edge`, the first write to a key after a quiet period (no write to it heard for
    `debounce_seconds`) is due at once: a lone write is synced without waiting out the debounce.
    Writes that follow it within the window are debounced as before, so a burst costs the leading
    sync plus one follow-up; writes that arrive while a pass runs (nobody takes) pile up into that
    one follow-up, whatever their number. A sync reads the secret from Vault when it runs, so the follow-up
    sees the burst's last write.
    """

    def __init__(
        self,
        debounce_seconds: float,
        max_size: int,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
        *,
        max_delay_seconds: float | None = None,
        leading_edge: bool = False,
    ) -> None:
        if max_size < 1 or debounce_seconds < 0:
            raise ValueError("max_size must be >= 1 and debounce_seconds >= 0")
        self._debounce = debounce_seconds
        self._max_delay = max_delay_seconds if max_delay_seconds is not None else max(10 * debounce_seconds, 1.0)
        self._max_size = max_size
        self._metrics = metrics
        self._clock = clock
        self._cond = threading.Condition()
        self._pending: dict[str, _Pending] = {}
        self._full_source: str | None = None
        self._closed = False
        self._leading = leading_edge
        # Leading edge: when a write to each key was last heard, to tell a quiet period from a
        # burst. Pruned to keys heard within the debounce window, so bounded like `_pending`.
        self._recent: dict[str, float] = {}

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._pending)

    @property
    def full_requested(self) -> bool:
        with self._cond:
            return self._full_source is not None

    def offer(self, keys: Iterable[str], source: str, heard_at: float | None = None) -> bool:
        """Queue keys for a targeted sync. Never blocks on a taker.

        False when the keys were dropped (queue full: a full pass is requested instead, which
        still covers them) or the queue is closed.
        """
        if source not in SOURCES:
            raise ValueError(f"unknown trigger source {source!r}")
        wanted = list(dict.fromkeys(k for k in keys if k))
        if not wanted:
            return True
        self._metrics.trigger_events.labels(source=source).inc(len(wanted))
        with self._cond:
            if self._closed:
                return False
            if self._full_source is not None:
                return True  # the full pass already due reads Vault after now: it covers these
            now = self._clock()
            new = [k for k in wanted if k not in self._pending]
            if len(self._pending) + len(new) > self._max_size:
                self._overflow(source, len(new))
                self._cond.notify_all()
                return False
            heard = now if heard_at is None else heard_at
            for k in wanted:
                p = self._pending.get(k)
                if p is None:
                    self._pending[k] = _Pending(source, heard, now, now, leading=self._leading and self._quiet(k, now))
                else:
                    p.last_seen = now
                if self._leading:
                    self._recent[k] = now
            if self._leading:
                self._prune_recent(now)
            self._cond.notify_all()
            return True

    def _quiet(self, key: str, now: float) -> bool:
        last = self._recent.get(key)
        return last is None or now - last >= self._debounce

    def _prune_recent(self, now: float) -> None:
        if len(self._recent) <= 2 * self._max_size:
            return
        self._recent = {k: t for k, t in self._recent.items() if now - t < self._debounce}
        if len(self._recent) > 2 * self._max_size:
            self._recent.clear()  # forgetting only makes the next write leading: one early sync more

    def _overflow(self, source: str, new_count: int) -> None:
        dropped: dict[str, int] = {source: new_count}
        for p in self._pending.values():
            dropped[p.source] = dropped.get(p.source, 0) + 1
        self._pending.clear()  # the full pass covers them; holding them only costs memory
        self._full_source = source
        for src, n in dropped.items():
            self._metrics.trigger_dropped.labels(source=src).inc(n)

    def request_full(self, source: str) -> None:
        """Ask for a full pass (webhook without paths, overflow, a forwarded request)."""
        if source not in TRIGGERS:
            raise ValueError(f"unknown trigger source {source!r}")
        self._metrics.trigger_events.labels(source=source).inc()
        with self._cond:
            if self._full_source is None:
                self._full_source = source
            self._cond.notify_all()

    def take(self, timeout: float) -> PassRequest | None:
        """The next request: a full pass if one was requested, else every key whose debounce
        has elapsed. None after `timeout` seconds with nothing ready, or once closed."""
        deadline = time.monotonic() + max(0.0, timeout)
        with self._cond:
            while True:
                if self._closed:
                    return None
                if self._full_source is not None:
                    source, self._full_source = self._full_source, None
                    self._pending.clear()
                    return PassRequest(trigger=source)
                now = self._clock()
                ready = [k for k, p in self._pending.items() if self._due(p) <= now]
                if ready:
                    return self._targeted(ready)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                if self._pending:
                    next_due = min(self._due(p) for p in self._pending.values()) - now
                    remaining = min(remaining, max(next_due, 0.001))
                self._cond.wait(remaining)

    def _due(self, p: _Pending) -> float:
        if p.leading:
            return p.first_seen
        return min(p.last_seen + self._debounce, p.first_seen + self._max_delay)

    def _targeted(self, ready: list[str]) -> PassRequest:
        taken = {k: self._pending.pop(k) for k in ready}
        first = min(taken.values(), key=lambda p: p.first_seen)
        return PassRequest(
            trigger=first.source,
            paths=frozenset(taken),
            received_at={k: p.heard_at for k, p in taken.items()},
        )

    def close(self) -> None:
        """Wake every taker; later offers are refused and `take` returns None."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()


def line_handler(matcher: AuditMatcher, queue: TriggerQueue, source: str) -> Callable[[bytes], None]:
    """The `on_line` callback for a tailer, socket listener or ingest endpoint: match, then offer."""
    if source not in SOURCES:
        raise ValueError(f"unknown trigger source {source!r}")

    def on_line(line: bytes) -> None:
        keys = matcher.match(line)
        if keys:
            queue.offer(keys, source)

    return on_line
