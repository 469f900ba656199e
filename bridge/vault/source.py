"""Vault as the bridge sees it: discovery of the KV sources, secret values, and the state store.

Implements `bridge.ports.SecretSource` and `bridge.ports.StateStore`. The token lives in
`bridge.vault.session`, the HTTP paths and error translation in `bridge.vault.transport`; hvac is
imported (by `bridge.vault.hvac_client`) only for `check`'s capabilities, never on a routine
path (docs/adr/0015-no-hvac-on-the-routine-path.md). Discovery is gentle on Vault: one LIST per
source (and one SCAN, or a LIST per subfolder, only where the source has subfolders: ADR 18),
then one metadata GET per KV v2 secret, never a value; KV v1 has no metadata, so there the data
is read. Metadata GETs run on `vault.concurrency` threads over pooled keep-alive connections,
within `vault.max_requests_per_second`.
"""

from __future__ import annotations

import calendar
import random
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, TypeVar
from urllib.parse import quote

from bridge.config import Settings, SourceSettings
from bridge.errors import CasConflict, VaultError, VaultInvalidRequest, VaultPermissionDenied
from bridge.logs import get_logger, register_secret
from bridge.metrics import Metrics
from bridge.model import SecretRef, Sensitive, VaultEntry
from bridge.vault.session import VaultSession
from bridge.vault.transport import routine_error

log = get_logger(__name__)
T = TypeVar("T")
R = TypeVar("R")
PROBE = "example"  # a stand-in secret name for capability checks
_SCAN_UNSUPPORTED = frozenset({400, 405})
_BAD_REQUEST = frozenset({400})  # a check-and-set that lost is a 400 naming "check-and-set"
_END = object()
_TAG_SETS_MAX = 4096  # distinct tag sets kept for sharing (a few bytes each beside what they save)


def _q(path: str) -> str:
    return quote(path, safe="/")


def _join(prefix: str, key: str) -> str:
    return f"{prefix}/{key}" if prefix else key


def _split(doc: Mapping[str, Any] | None) -> tuple[list[str], list[str]]:
    """A LIST or SCAN answer's keys: (secrets, subfolders); a subfolder's key ends with "/"."""
    files: list[str] = []
    folders: list[str] = []
    for key in ((doc or {}).get("data") or {}).get("keys") or []:
        key = str(key)
        (folders if key.endswith("/") else files).append(key)
    return files, folders


def _past(rfc3339: Any, now: float) -> bool:
    """True when a KV v2 deletion_time is set and not in the future (delete_version_after)."""
    if not rfc3339 or not isinstance(rfc3339, str):
        return False
    try:
        when = calendar.timegm(time.strptime(rfc3339[:19], "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return True  # set but unreadable: it was deleted at some point
    return when <= now


class VaultSource:
    """The Vault adapter: `SecretSource` + `StateStore`, plus login and checks for the CLI."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
        env: Mapping[str, str] | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._concurrency = settings.vault.concurrency
        self._wall = wall_clock
        self.session = VaultSession(settings.vault, metrics, clock=clock, sleep=sleep, rng=rng, env=env)
        self._kv_versions: dict[str, int] = {}
        self._scan_unsupported: set[str] = set()
        self._scan_denied: dict[str, int] = {}  # mount -> token generation that was refused SCAN
        self._lock = threading.Lock()
        self._area = StateArea(self.session, settings.state_mount, settings.state_path)
        # Values under these keys are DockerHub tokens: register them for log redaction on read.
        self._token_keys = frozenset(s.token_key for s in settings.sources)
        # Distinct KV v2 tag sets seen, each one dict shared by its entries (`_describe`).
        self._tag_sets: dict[tuple[tuple[str, str], ...], dict[str, str]] = {}

    # --- lifecycle ---------------------------------------------------------------------

    def login(self) -> None:
        """Log in (or adopt the configured token) now; raises VaultAuthError on failure."""
        self.session.login()

    def maintain(self) -> float:
        """Renew or log in again if due; returns seconds until the next check is due."""
        return self.session.maintain()

    def run_renewer(self, stop: threading.Event, *, floor: float = 1.0, cap: float = 60.0) -> None:
        """Keep the token alive until `stop` is set (run it in a thread). Errors are logged."""
        while not stop.is_set():
            try:
                delay = self.session.maintain()
            except VaultError as exc:
                log.warning("vault_maintenance_failed", error=str(exc))
                delay = 5.0
            stop.wait(min(cap, max(floor, delay)))

    def token_ttl(self) -> float | None:
        return self.session.token_ttl()

    def healthy(self) -> bool:
        """For /readyz: the token works (auth/token/lookup-self answers). Never raises."""
        try:
            self.session.call("lookup", "GET", "auth/token/lookup-self")
        except VaultError:
            return False
        return True

    def revoke_self(self) -> None:
        self.session.revoke_self()

    def close(self) -> None:
        """Revoke the token if we logged in ourselves (vault.revoke_on_shutdown), close connections."""
        self.session.close()

    def request_counts(self) -> dict[str, int]:
        return self.session.request_counts()

    # --- KV engine version ---------------------------------------------------------------

    def kv_version(self, mount: str) -> int:
        """1 or 2, asked once per mount (GET sys/internal/ui/mounts/<mount>) and cached."""
        mount = mount.strip("/")
        with self._lock:
            if mount in self._kv_versions:
                return self._kv_versions[mount]
        path = f"sys/internal/ui/mounts/{_q(mount)}"
        doc = self.session.request("mounts", "GET", path).doc
        data = (doc or {}).get("data") or {}
        if data.get("type") not in ("kv", "generic") or data.get("path", "").strip("/") != mount:
            raise VaultInvalidRequest(f"Vault mounts {path}: {mount!r} is not a KV mount")
        version = 2 if str((data.get("options") or {}).get("version", "1")) == "2" else 1
        with self._lock:
            self._kv_versions[mount] = version
        return version

    def _version(self, source: SourceSettings) -> int:
        return source.kv_version if source.kv_version != "auto" else self.kv_version(source.mount)

    # --- discovery -----------------------------------------------------------------------

    def list_keys(self, source: SourceSettings) -> list[str]:
        """Every secret path under the source prefix (paths inside the mount), recursively."""
        mount, prefix, version = source.mount, source.path, self._version(source)
        base = f"{_q(mount)}/metadata/" if version == 2 else f"{_q(mount)}/"
        folder = f"{base}{_q(prefix)}/" if prefix else base
        keys = self._walk(mount, folder)
        # Interned: the ledger's rows hold the same paths for the whole pass (bridge.ledger).
        return [sys.intern(_join(prefix, k)) for k in keys]

    def _walk(self, mount: str, folder: str) -> list[str]:
        """The source folder's secrets, subfolders included, in as few requests as Vault serves cheaply.

        LIST first: a folder without subfolders (the usual layout) is then done in that one
        request. Only a folder with subfolders is SCANned (OpenBao: one request for the tree) or,
        where SCAN is unsupported or refused, walked with one LIST per subfolder. Not SCAN first:
        OpenBao's SCAN of one large folder costs it far more than a LIST of the same keys (30,000
        keys: ~2.2 s of CPU on in-memory storage, 3.6-5 s on raft, against 0.2-0.5 s for the LIST;
        docs/adr/0018-discovery-lists-before-it-scans.md)."""
        try:
            resp = self.session.request("list", "LIST", folder)
        except VaultPermissionDenied:
            keys = self._scan(mount, folder)  # a policy that grants `scan` but not `list`
            if keys is None:
                raise
            return keys
        files, subfolders = _split(resp.doc)
        if not subfolders:
            return files
        keys = self._scan(mount, folder)
        if keys is None:
            keys = files + self._list_recursive(folder, subfolders)
        return keys

    def _scan(self, mount: str, folder: str) -> list[str] | None:
        """OpenBao's recursive SCAN: one request for the whole tree. None: use LIST instead."""
        gen = self.session.generation
        if mount in self._scan_unsupported or self._scan_denied.get(mount) == gen:
            return None
        resp = self.session.request("scan", "SCAN", folder, passthrough=_SCAN_UNSUPPORTED | {401, 403})
        if resp.status in _SCAN_UNSUPPORTED:  # HashiCorp Vault: 405 unsupported operation
            self._scan_unsupported.add(mount)
            return None
        if resp.status in (401, 403):  # a policy without the `scan` capability: LIST still works
            self._scan_denied[mount] = gen
            return None
        if resp.status == 404:
            return []
        return _split(resp.doc)[0]

    def _list_recursive(self, folder: str, subfolders: list[str]) -> list[str]:
        """The secrets under `subfolders` of `folder` (already listed), one LIST per folder."""
        out: list[str] = []
        stack = list(subfolders)
        while stack:
            rel = stack.pop()
            files, below = _split(self.session.request("list", "LIST", folder + _q(rel)).doc)
            out.extend(rel + key for key in files)
            stack.extend(rel + key for key in below)
        return out

    def discover(self, source: SourceSettings, source_index: int) -> Iterator[VaultEntry]:
        """List the source, then read metadata (KV v2) or data (KV v1) of each secret, concurrently."""
        self.session.recheck_token_file()  # a pass starts: a rewritten token file is adopted now
        version = self._version(source)
        keys = self.list_keys(source)

        def one(path: str) -> VaultEntry | None:
            return self._describe(source.mount, version, source_index, path)

        for entry in self._bounded_map(one, keys):
            if entry is not None:
                yield entry

    def describe(self, source: SourceSettings, source_index: int, path: str) -> VaultEntry | None:
        """One secret, `path` inside the mount; None if it does not exist or is outside the source."""
        path = path.strip("/")
        prefix = source.path
        if prefix and path != prefix and not path.startswith(prefix + "/"):
            return None
        self.session.recheck_token_file()  # a targeted pass is a handful of requests: look at the file
        return self._describe(source.mount, self._version(source), source_index, path)

    def _describe(self, mount: str, version: int, index: int, path: str) -> VaultEntry | None:
        ref = SecretRef(mount, path, version)
        if version == 1:
            doc = self.session.request("read", "GET", f"{_q(mount)}/{_q(path)}").doc
            if doc is None or not isinstance(doc.get("data"), dict):
                return None
            data = self._guard(doc["data"])
            tags = {str(k): v if isinstance(v, str) else str(v) for k, v in data.items()}
            return VaultEntry(ref, None, tags, payload=data, source_index=index)
        doc = self.session.request("metadata", "GET", f"{_q(mount)}/metadata/{_q(path)}").doc
        if doc is None or not isinstance(doc.get("data"), dict):
            return None
        d = doc["data"]
        current = int(d.get("current_version") or 0)
        meta = (d.get("versions") or {}).get(str(current)) or {}
        deleted = current == 0 or bool(meta.get("destroyed")) or _past(meta.get("deletion_time"), self._wall())
        # Interned: each JSON document brings its own copy of the same tag names and of the few
        # project ids, and every entry of a pass keeps its tags (docs/benchmarks.md, memory).
        tags = {sys.intern(str(k)): sys.intern(str(v)) for k, v in (d.get("custom_metadata") or {}).items()}
        # One dict per distinct tag set, shared by the entries that carry it (most secrets carry
        # one of a few project ids): a dict per secret was ~200 B of every tracked secret held
        # through the pass. Read-only by type (`VaultEntry.tags` is a Mapping). Metadata only:
        # KV v1 "tags" (the data, token included) above are never shared.
        shape = tuple(tags.items())
        shared = self._tag_sets.get(shape)
        if shared is None:
            if len(self._tag_sets) >= _TAG_SETS_MAX:
                self._tag_sets.clear()  # many distinct sets: sharing saves little; stay bounded
            shared = self._tag_sets.setdefault(shape, tags)
        stamp = meta.get("created_time")
        return VaultEntry(ref, current or None, shared, deleted=deleted, source_index=index,
                          stamp=sys.intern(stamp) if isinstance(stamp, str) else None)  # as the ledger's seen_stamp

    def _bounded_map(self, fn: Callable[[T], R], items: Iterable[T]) -> Iterable[R]:
        """fn over items on `concurrency` threads; every result (any order) once all are done.
        With one thread, lazily: one item per `next()`, as before.

        Plain worker threads pulling from one iterator: cheaper per item than executor futures,
        which matters at thousands of ~0.2 ms requests. Results go into one list, not through a
        queue to the calling thread: a hand-off per result woke that thread (and took the GIL)
        once per secret, for nothing, since the pass needs them all before it plans. The first
        error stops the workers and is raised here.
        """
        n = self._concurrency
        if n == 1:
            return map(fn, items)
        source = iter(items)
        take = threading.Lock()
        out: list[R] = []
        errors: list[BaseException] = []
        stop = threading.Event()

        def work() -> None:
            append = out.append  # list.append is atomic under the GIL
            try:
                while not stop.is_set():
                    with take:
                        item = next(source, _END)
                    if item is _END:
                        return
                    append(fn(item))  # type: ignore[arg-type]
            except BaseException as exc:  # handed to the calling thread, which raises it
                errors.append(exc)
                stop.set()

        workers = [threading.Thread(target=work, name=f"vault-{i}", daemon=True) for i in range(n)]
        try:
            for w in workers:
                w.start()
            for w in workers:
                w.join()
        except BaseException:  # interrupted: let the requests in flight end, start no more
            stop.set()
            for w in workers:
                if w.ident is not None:
                    w.join()
            raise
        if errors:
            raise errors[0]
        return out

    # --- values ----------------------------------------------------------------------------

    def _guard(self, data: Mapping[str, Any]) -> dict[str, Any]:
        for key in self._token_keys:
            value = data.get(key)
            if isinstance(value, str):
                register_secret(value)
        return dict(data)

    def read_value(self, ref: SecretRef, version: int | None) -> Mapping[str, Any]:
        """The data of one KV v2 version (GET <mount>/data/<path>?version=N) or of a KV v1 secret
        (GET <mount>/<path>). Empty when the secret or that version is gone (deleted, destroyed)."""
        if ref.kv_version == 1:
            doc = self.session.request("read", "GET", f"{_q(ref.mount)}/{_q(ref.path)}").doc
            return self._guard((doc or {}).get("data") or {})
        query = f"version={int(version)}" if version else ""
        doc = self.session.request("read", "GET", f"{_q(ref.mount)}/data/{_q(ref.path)}", query=query).doc
        return self._guard((((doc or {}).get("data") or {}).get("data")) or {})

    def read_secret_field(self, spec: str) -> Sensitive:
        """`mount/path#field` from KV v2 (cybedefend.auth.credential_vault_path), e.g. the PAT."""
        where, _, field = spec.rpartition("#")
        mount, _, path = where.strip("/").partition("/")
        if not (mount and path and field):
            raise VaultInvalidRequest(f"credential path {spec!r} must look like mount/path#field")
        resp = self.session.call("read", "GET", f"{_q(mount)}/data/{_q(path)}")  # None: absent or deleted
        data = (((resp.doc if resp else None) or {}).get("data") or {}).get("data")
        if not isinstance(data, dict):
            raise VaultInvalidRequest(f"Vault read {mount}/data/{path}: no such secret (or its current version is deleted)")
        value = data.get(field)
        if not isinstance(value, str) or not value:
            raise VaultInvalidRequest(f"Vault read {mount}/data/{path}: field {field!r} is missing or not a string")
        register_secret(value)
        return Sensitive(value)

    # --- state store -------------------------------------------------------------------------

    def state_area(self, mount: str, path: str) -> StateArea:
        """A `StateStore` at another place (the old default location, for migration)."""
        return StateArea(self.session, mount, path)

    def use_state_area(self, area: StateArea) -> None:
        """Keep all state (key, HA lease) at `area` from now on: the key was found there."""
        self._area = area

    @property
    def state_location(self) -> str:
        return self._area.location

    @property
    def location(self) -> str:
        return self._area.location

    def read_state(self, name: str) -> tuple[dict[str, Any], int] | None:
        return self._area.read_state(name)

    def write_state(self, name: str, data: Mapping[str, Any], cas: int, *, overwrite_deleted: bool = True) -> int:
        return self._area.write_state(name, data, cas, overwrite_deleted=overwrite_deleted)

    def state_status(self, name: str) -> tuple[str, int]:
        return self._area.state_status(name)

    # --- checks ----------------------------------------------------------------------------

    def check_capabilities(self) -> list[tuple[str, bool, str]]:
        """For `check`: what the token may do on each source and the state path (sys/capabilities-self)."""
        rows: list[tuple[str, bool, str]] = []
        wanted: list[tuple[str, str, tuple[str, ...]]] = []  # (label, path, any-of capabilities)
        for s in self._settings.sources:
            try:
                version = self._version(s)
            except VaultError as exc:
                rows.append((f"{s.mount}: KV version", False, str(exc)))
                continue
            sub = f"{s.path}/" if s.path else ""
            if version == 2:
                wanted += [
                    (f"list {s.mount}/metadata/{sub}", f"{s.mount}/metadata/{sub}", ("list",)),
                    (f"read {s.mount}/metadata/{sub}*", f"{s.mount}/metadata/{sub}{PROBE}", ("read",)),
                    (f"read {s.mount}/data/{sub}*", f"{s.mount}/data/{sub}{PROBE}", ("read",)),
                ]
            else:
                wanted += [
                    (f"list {s.mount}/{sub}", f"{s.mount}/{sub}", ("list",)),
                    (f"read {s.mount}/{sub}*", f"{s.mount}/{sub}{PROBE}", ("read",)),
                ]
        sm, sp = self._area.mount, self._area.path
        for cap in ("create", "update", "read"):
            wanted.append((f"{cap} {sm}/data/{sp}/*", f"{sm}/data/{sp}/{PROBE}", (cap,)))
        wanted.append((f"read {sm}/metadata/{sp}/*", f"{sm}/metadata/{sp}/{PROBE}", ("read",)))
        paths = sorted(
            {p for _, p, _ in wanted}
            | {f"{s.mount}/metadata/{s.path}/" if s.path else f"{s.mount}/metadata/" for s in self._settings.sources}
        )
        try:
            doc = self.session.call_hvac(
                "capabilities", "sys/capabilities-self", lambda c: c.sys.get_capabilities(paths=paths), missing=None
            )
        except VaultPermissionDenied as exc:
            return [*rows, ("sys/capabilities-self", False, str(exc))]
        caps = (doc or {}).get("data") or doc or {}
        for label, path, need in wanted:
            have = set(caps.get(path) or [])
            ok = "root" in have or (bool(have & set(need)) and "deny" not in have)
            detail = "allowed" if ok else f"missing {'/'.join(need)} (has {', '.join(sorted(have)) or 'nothing'})"
            if ok and label.startswith("list ") and "/metadata/" in path:
                detail += "; scan " + (
                    "allowed (recursive list in one request)"
                    if {"scan", "root"} & have
                    else "not allowed (recursive LIST is used)"
                )
            rows.append((label, ok, detail))
        return rows


class StateArea:
    """One KV v2 place for the bridge's own state: `<mount>/data/<path>/<name>` (a `StateStore`)."""

    def __init__(self, session: VaultSession, mount: str, path: str) -> None:
        self._session = session
        self.mount, self.path = mount.strip("/"), path.strip("/")

    @property
    def location(self) -> str:
        return f"{self.mount}/{self.path}"

    def _where(self, name: str) -> tuple[str, str]:
        return self.mount, f"{self.path}/{name.strip('/')}"

    def read_state(self, name: str) -> tuple[dict[str, Any], int] | None:
        """GET <mount>/data/<path>/<name>: (data, version); None when absent or deleted.

        A 404 that is not Vault's own answer raises (VaultAmbiguous): "absent" would mint a key."""
        mount, path = self._where(name)
        # None: Vault's 404, a missing entry or a deleted current version (what hvac's
        # read_secret_version(raise_on_deleted_version=True) made `missing`).
        resp = self._session.call("state", "GET", f"{_q(mount)}/data/{_q(path)}")
        d = ((resp.doc if resp else None) or {}).get("data") or {}
        if not isinstance(d.get("data"), dict):
            return None
        return dict(d["data"]), int((d.get("metadata") or {}).get("version") or 0)

    def state_status(self, name: str) -> tuple[str, int]:
        """("absent" | "present" | "deleted" | "destroyed", current version) from the metadata.

        `read_state` says None for both absent and deleted; only this tells them apart, so a
        deleted key version is never mistaken for "no key yet"."""
        mount, path = self._where(name)
        resp = self._session.request("state", "GET", f"{_q(mount)}/metadata/{_q(path)}")
        d = (resp.doc or {}).get("data") if resp.status < 300 else None
        if not isinstance(d, dict):
            return "absent", 0
        current = int(d.get("current_version") or 0)
        vmeta = (d.get("versions") or {}).get(str(current)) or {}
        if current == 0:
            return "absent", 0
        if vmeta.get("destroyed"):
            return "destroyed", current
        if vmeta.get("deletion_time"):
            return "deleted", current
        return "present", current

    def write_state(self, name: str, data: Mapping[str, Any], cas: int, *, overwrite_deleted: bool = True) -> int:
        """POST <mount>/data/<path>/<name> with options.cas; CasConflict if we lost.

        `overwrite_deleted=False` (the key): a deleted or destroyed current version is not
        replaced (CasConflict), since a new key would orphan every registered credential."""
        mount, path = self._where(name)
        where = f"{mount}/data/{path}"

        def put(cas_value: int) -> int | None:
            """The new version; None when the check-and-set lost (or Vault answered 404, which
            hvac's path also read as "not written")."""
            body = {"options": {"cas": cas_value}, "data": dict(data)}
            resp = self._session.call("state", "POST", f"{_q(mount)}/data/{_q(path)}", body=body, passthrough=_BAD_REQUEST)
            if resp is None:
                return None
            errors = (resp.doc or {}).get("errors")
            if resp.status == 400:
                if "check-and-set" in " ".join(str(e) for e in errors or []):
                    return None
                raise routine_error(400, "state", where, errors)
            try:
                return int((resp.doc or {})["data"]["version"])
            except (KeyError, TypeError, ValueError):
                raise VaultError(f"Vault state {where}: the write's answer carries no version") from None

        version = put(cas)
        if version is None and cas == 0 and overwrite_deleted:
            # "absent" includes a deleted or destroyed current version, which needs cas=<that version>.
            status, current = self.state_status(name)
            if status in ("deleted", "destroyed"):
                version = put(current)
        if version is None:
            raise CasConflict(f"Vault state {where}: check-and-set lost (expected version {cas}); another writer was first")
        return version
