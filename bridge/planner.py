"""Pure planning: (what Vault says now, the ledger cache, what CybeDefend holds now) -> every write.

No I/O here, so `plan` is exactly what the dry run prints, and the property tests can run it
against any sequence of states. The decision model is docs/adr/0007-decided-from-the-truth.md:

1. `touched_organizations` says which organizations to list (those a write may touch; all of
   them when the drift check is due), before any value is read;
2. `with_evidence` turns a registered ledger row whose credential is absent from a fresh listing
   into a `missing` one (the ledger is a cache that saves reads, never evidence);
3. `needs_value` says which secrets' values to read (versions new to the ledger, retries, moves);
4. `plan` decides per secret from Vault and the ledger what it wants (create, rotate, move,
   retire, refresh, skip, reject);
5. `reconcile` settles every such intent against the listing: adopt instead of create when
   CybeDefend already holds the current token, name the credential each write replaces, the
   exact links it sets, and each credential it deletes, and emit deletions of our own
   credentials that Vault's current state makes not current (a superseded token, a duplicate, a
   secret untagged, deleted or moved away). It never deletes because a ledger lacks something.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Container, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from bridge.config import Settings, SourceSettings
from bridge.keyring import Keyring
from bridge.model import Action, ActionKind, Candidate, Doomed, Marker, RemoteCredential, State, VaultEntry
from bridge.ports import LedgerRecord
from bridge.validation import Rejection, Tags, is_tagged, read_payload, read_tags

# Rejections decided from tags alone: tags can change without a new KV version, so these are
# re-checked every pass; rejections of a value stand until the version changes.
TAG_REJECT_CODES = frozenset(
    {"invalid_project_id", "invalid_organization_id", "missing_organization_id", "invalid_description"}
)
# ...and a duplicate stops being one when its twin is deleted or rotated away, also without a
# new version of this secret: re-examined every pass too (one value read each).
RECHECKED_REJECT_CODES = TAG_REJECT_CODES | {"duplicate_token"}
# CybeDefend refused the create (400): re-examined after a backoff, or at once when a write
# to the secret (its tags, say) triggers a targeted sync.
REMOTE_REJECT_CODE = "remote_rejected"
_GONE_STATES = frozenset({State.RETIRED, State.ORPHANED})
UP_TO_DATE = "up to date"
# Deletions that remove a secret's last credential (not a replacement): the guard rail counts these.
RETIRING = frozenset({"retired", "moved"})


@dataclass(frozen=True, slots=True)
class Scope:
    """What a pass looked at, so that absence means deletion only where we actually looked.

    `sources` are the indexes of sources whose discovery completed (full pass); `keys` are the
    secrets a targeted pass was asked about. A source whose listing failed is in neither, and
    none of its ledger rows is retired because of that failure.
    """

    sources: frozenset[int] = frozenset()
    keys: frozenset[str] = frozenset()


def source_of(key: str, sources: Sequence[SourceSettings]) -> int | None:
    """The index of the configured source a `mount/path` key belongs to (longest prefix wins)."""
    best: tuple[int, int] | None = None
    for i, src in enumerate(sources):
        prefix = f"{src.mount}/{src.path}".rstrip("/") + "/"
        if key.startswith(prefix) and (best is None or len(prefix) > best[1]):
            best = (i, len(prefix))
    return None if best is None else best[0]


def _tags(entry: VaultEntry, settings: Settings) -> Tags | Rejection:
    src = settings.sources[entry.source_index]
    return read_tags(entry, src, settings.tags, settings.cybedefend.organization_id, settings.sync)


def _seen_same(entry: VaultEntry, record: LedgerRecord) -> bool:
    """The ledger already evaluated this very version (number and, where known, creation time)."""
    if record.seen_version != entry.version:
        return False
    return entry.stamp is None or record.seen_stamp is None or record.seen_stamp == entry.stamp


def _waiting(entry: VaultEntry, record: LedgerRecord | None, now: float, retry_now: bool) -> bool:
    """A failed secret whose backoff has not elapsed, and nothing new to try."""
    return (
        not retry_now
        and record is not None
        and record.state in (State.PENDING, State.FAILED)
        and _seen_same(entry, record)
        and record.next_attempt_at is not None
        and now < record.next_attempt_at
    )


def needs_value(
    entry: VaultEntry, record: LedgerRecord | None, settings: Settings, now: float, *, retry_now: bool = False
) -> bool:
    """Whether the secret's value must be read to decide (KV v1 values come with discovery).

    `retry_now` skips a pending backoff: a targeted sync follows a fresh write, which may be the fix.
    """
    if entry.payload is not None or entry.deleted or not is_tagged(entry, settings.tags):
        return False
    return _needs_value(entry, record, _tags(entry, settings), now, retry_now)


def _needs_value(entry: VaultEntry, record: LedgerRecord | None, tags: Tags | Rejection, now: float, retry_now: bool) -> bool:
    if entry.payload is not None or entry.deleted or isinstance(tags, Rejection):
        return False
    if record is None or record.state in (State.MISSING, *_GONE_STATES):
        return True
    seen_same = _seen_same(entry, record)
    if record.state in (State.PENDING, State.FAILED):
        return not _waiting(entry, record, now, retry_now)
    if record.state == State.REJECTED:
        if record.last_result in RECHECKED_REJECT_CODES or not seen_same or retry_now:
            return True
        if record.last_result == REMOTE_REJECT_CODE:
            retry_due = record.next_attempt_at is None or now >= record.next_attempt_at
            return retry_due or record.tags_digest != tags.digest
        return False
    # registered: a new version, or a new place for the same one
    return record.version != entry.version or not seen_same or (tags.project_id, tags.organization_id) != (
        record.project_id,
        record.organization_id,
    )


def values_to_read(
    entries: Iterable[VaultEntry],
    records: Mapping[str, LedgerRecord],
    settings: Settings,
    now: float,
    retry_now: Container[str] = (),
) -> list[VaultEntry]:
    return [e for e in entries if needs_value(e, records.get(e.ref.key), settings, now, retry_now=e.ref.key in retry_now)]


def fingerprints(
    entries: Iterable[VaultEntry],
    payloads: Mapping[str, Mapping[str, Any] | None],
    settings: Settings,
    keyring: Keyring,
) -> dict[str, str]:
    """The fingerprint of the token each value holds (those that parse), by secret key.

    Beyond the rows of the secrets in scope, the only ledger rows `Planning` consults are those
    that already claim one of these tokens (the duplicate-token check), so a targeted pass reads
    just those instead of the whole ledger: a plan over `scope rows + rows holding these` is the
    plan over every row (tests/test_planner.py checks the two agree).
    """
    out: dict[str, str] = {}
    for e in entries:
        data = e.payload if e.payload is not None else payloads.get(e.ref.key)
        if data is None:
            continue
        parsed = read_payload(data, settings.sources[e.source_index], settings.sync)
        if not isinstance(parsed, Rejection):
            out[e.ref.key] = keyring.fingerprint(parsed.token)
    return out


def rotating_credentials(held: Mapping[str, str], records: Mapping[str, LedgerRecord]) -> set[tuple[str, str]]:
    """(organization, credential) of each ledger row whose credential holds another token than
    the one Vault now holds for its secret (`held`, from `fingerprints`): the credentials whose
    links a rotation will most likely ask for (ADR 19). A guess for reading ahead, never a
    decision: `reconcile` still says which links it needs, from the listing."""
    out: set[tuple[str, str]] = set()
    for key, fingerprint in held.items():
        rec = records.get(key)
        # Registered rows only: a pending, failed, rejected, missing or retired row names no
        # credential known to hold the old token, so its links are read when asked, if ever.
        if (rec is not None and rec.state == State.REGISTERED and rec.credential_id and rec.organization_id
                and rec.fingerprint is not None and rec.fingerprint != fingerprint):
            out.add((rec.organization_id, rec.credential_id))
    return out


def _retire(record: LedgerRecord, reason: str) -> Action:
    return Action(
        ActionKind.RETIRE,
        record.ref,
        reason,
        version=record.version,
        organization_id=record.organization_id,
        project_id=record.project_id,
        old_credential_id=record.credential_id,
        old_organization_id=record.organization_id,
    )


def _decide(
    entry: VaultEntry,
    record: LedgerRecord | None,
    payload: Mapping[str, Any] | None,
    settings: Settings,
    keyring: Keyring,
    now: float,
    claimed: _Claims,
    retry_now: bool,
) -> Action | None:
    ref = entry.ref
    if entry.deleted or not is_tagged(entry, settings.tags):
        if record is None or record.state in _GONE_STATES:
            return None  # never ours, or already handled: untagged secrets are not even listed in a plan
        why = (
            "the current version is deleted or destroyed"
            if entry.deleted
            else "the secret is no longer tagged"
        )
        return _retire(record, why)
    tags = _tags(entry, settings)
    if isinstance(tags, Rejection):
        return Action(ActionKind.REJECT, ref, tags.reason, version=entry.version, reject_code=tags.code)

    def act(
        kind: ActionKind,
        reason: str,
        cand: Candidate | None = None,
        old: LedgerRecord | None = None,
        code: str | None = None,
    ) -> Action:
        return Action(
            kind,
            ref,
            reason,
            candidate=cand,
            version=entry.version,
            organization_id=tags.organization_id,
            project_id=tags.project_id,
            old_credential_id=old.credential_id if old else None,
            old_organization_id=old.organization_id if old else None,
            reject_code=code,
            tags_digest=tags.digest,
            stamp=entry.stamp,
        )

    if _waiting(entry, record, now, retry_now):  # KV v1 too, whose value always comes with discovery
        return act(ActionKind.SKIP, "waiting before the next attempt (backoff)")
    if not _needs_value(entry, record, tags, now, retry_now) and entry.payload is None:
        assert record is not None  # needs_value is True for every unknown secret
        if record.state == State.REJECTED:
            return act(ActionKind.REJECT, record.reason or "rejected", code=record.last_result)
        if record.state in (State.PENDING, State.FAILED):
            return act(ActionKind.SKIP, "waiting before the next attempt (backoff)")
        return act(ActionKind.SKIP, UP_TO_DATE)
    data = entry.payload if entry.payload is not None else payload
    if data is None:
        return act(ActionKind.SKIP, "the value could not be read this pass")
    src = settings.sources[entry.source_index]
    parsed = read_payload(data, src, settings.sync)
    if isinstance(parsed, Rejection):
        return act(ActionKind.REJECT, parsed.reason, code=parsed.code)
    fp = keyring.fingerprint(parsed.token)
    twin = claimed.get((fp, tags.organization_id, tags.project_id))
    if twin is not None and twin != ref.key:
        return Action(
            ActionKind.REJECT,
            ref,
            f"the same token is already registered for this project from {twin}",
            version=entry.version,
            reject_code="duplicate_token",
        )
    claimed[(fp, tags.organization_id, tags.project_id)] = ref.key
    cand = Candidate(
        ref,
        entry.version,
        tags.organization_id,
        tags.project_id,
        parsed.username,
        parsed.token,
        fp,
        tags.description,
        entry.stamp,
    )
    has_cred = record is not None and record.credential_id is not None and record.state != State.MISSING
    if record is None or not has_cred:
        reason = "new tagged secret"
        if record is not None and record.state == State.MISSING:
            reason = "the credential disappeared from CybeDefend (drift): registering again"
        elif record is not None and record.state in _GONE_STATES:
            reason = "tagged again"
        elif record is not None and record.state in (State.FAILED, State.PENDING):
            reason = f"retrying ({record.reason or 'earlier attempt failed'})"
        return act(ActionKind.CREATE, reason, cand)
    if (record.organization_id, record.project_id) != (tags.organization_id, tags.project_id):
        return act(ActionKind.MOVE, "the project or organization tag changed", cand, record)
    if record.fingerprint != fp:
        what = f"version {entry.version}" if entry.version is not None else "the secret"
        return act(ActionKind.ROTATE, f"new token in {what}", cand, record)
    if record.state != State.REGISTERED or record.version != entry.version or not _seen_same(entry, record):
        return act(ActionKind.REFRESH, "metadata-only change (same token)", cand, record)
    return act(ActionKind.SKIP, UP_TO_DATE)


class _Claims:
    """Which path claimed each (token fingerprint, organization, project) this pass.

    Tokens already registered elsewhere claim their (token, project) first, so a copy of a
    registered token under a second path is the one rejected, whatever the listing order. Built
    from the records on first use, not up front: only a secret whose value was read asks, and a
    steady pass reads none, so it no longer holds a tuple and a slot per tracked secret (~110 B).
    The records are the pass's, fixed before planning starts: building late sees what building
    early saw."""

    __slots__ = ("_records", "_table")

    def __init__(self, records: Mapping[str, LedgerRecord]) -> None:
        self._records = records
        self._table: dict[tuple[str, str, str], str] | None = None

    def _built(self) -> dict[tuple[str, str, str], str]:
        if self._table is None:
            table: dict[tuple[str, str, str], str] = {}
            for rec in self._records.values():
                if rec.state == State.REGISTERED and rec.fingerprint and rec.organization_id and rec.project_id:
                    table.setdefault((rec.fingerprint, rec.organization_id, rec.project_id), rec.key)
            self._table = table
        return self._table

    def get(self, claim: tuple[str, str, str]) -> str | None:
        return self._built().get(claim)

    def __setitem__(self, claim: tuple[str, str, str], key: str) -> None:
        self._built()[claim] = key


class Planning:
    """`plan`, one secret at a time in key order, so the engine can plan while values arrive.

    Feed every entry to `decide` in ascending key order (the order `plan` sorts them in), then
    call `rest` once: the actions are exactly `plan`'s. The only state carried from one secret to
    the next is which (token, organization, project) an earlier path already claimed.
    """

    def __init__(
        self,
        records: Mapping[str, LedgerRecord],
        scope: Scope,
        settings: Settings,
        keyring: Keyring,
        now: float,
        retry_now: Container[str] = (),
    ) -> None:
        self._records, self._scope, self._s, self._keys, self._now = records, scope, settings, keyring, now
        self._retry_now = retry_now
        self._claimed = _Claims(records)
        # The keys fed to `decide`, ascending. A list, not a set: it is held for the whole pass,
        # one per tracked secret, and a set's table costs ~5x a list's slot; `rest` merges it
        # with the sorted records instead of looking keys up.
        self._fed: list[str] = []

    def decide(self, entry: VaultEntry, payload: Mapping[str, Any] | None) -> Action | None:
        """The action for one secret (None: nothing to say about it); keys in ascending order."""
        key = entry.ref.key
        if self._fed and key <= self._fed[-1]:
            if key == self._fed[-1]:
                return None  # the same secret again (two sources overlap): decided once
            raise ValueError(f"Planning.decide: {key} came after {self._fed[-1]}; entries must be in ascending key order")
        record = self._records.get(key)
        # The record's own key string when there is one: `entry.ref.key` builds a new string per
        # call, and this list holds one per tracked secret for the whole pass (~75 B each).
        self._fed.append(record.key if record is not None else key)
        return _decide(entry, record, payload, self._s, self._keys, self._now, self._claimed, key in self._retry_now)

    def rest(self) -> list[Action]:
        """Retirements of tracked secrets that no entry fed to `decide` named, where we looked."""
        actions: list[Action] = []
        fed, i = self._fed, 0
        for key in sorted(self._records):
            while i < len(fed) and fed[i] < key:
                i += 1
            seen = i < len(fed) and fed[i] == key
            rec = self._records[key]
            if seen or rec.state in _GONE_STATES:
                continue
            idx = source_of(key, self._s.sources)
            looked = key in self._scope.keys or (idx is not None and idx in self._scope.sources)
            # A row no configured source covers any more is left alone: a changed path setting
            # must not retire credentials wholesale (the delete guard rail is the second net).
            if looked:
                actions.append(_retire(rec, "the secret was deleted from Vault"))
        return actions


def plan(
    entries: Sequence[VaultEntry],
    payloads: Mapping[str, Mapping[str, Any] | None],
    records: Mapping[str, LedgerRecord],
    scope: Scope,
    settings: Settings,
    keyring: Keyring,
    now: float,
    retry_now: Container[str] = (),
) -> list[Action]:
    """One action per secret in scope, in a stable order (by path).

    `retry_now`: keys whose backoff is skipped (the secrets a targeted sync was asked about).
    """
    planning = Planning(records, scope, settings, keyring, now, retry_now)
    actions: list[Action] = []
    for entry in sorted(entries, key=lambda e: e.ref.key):
        action = planning.decide(entry, payloads.get(entry.ref.key))
        if action is not None:
            actions.append(action)
    return actions + planning.rest()


def may_write_to(entry: VaultEntry, record: LedgerRecord | None, settings: Settings) -> frozenset[str]:
    """Organizations a create, rotation or move of this secret could write to, before its value
    is read: a superset of what `writing_organizations` will say of its intent."""
    if entry.deleted or not is_tagged(entry, settings.tags):
        return frozenset()
    tags = _tags(entry, settings)
    if isinstance(tags, Rejection):
        return frozenset()
    old = record.organization_id if record is not None else None
    return frozenset(o for o in (tags.organization_id, old) if o)


def count_deletions(actions: Collection[Action], settings: Settings) -> int:
    """Credentials a plan deletes because their secret is gone or moved away (not replacements).

    Replacing a superseded token or removing a duplicate leaves the secret registered; these
    leave a project without the secret's credential, which is what the guard rail is for.
    """
    return sum(1 for a in actions for d in a.deletes if d.why in RETIRING)


# -- what CybeDefend holds now ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RemoteView:
    """A fresh look at CybeDefend, taken by the engine for this pass.

    `listings` holds every DockerHub credential of each organization listed (complete answers
    only); `unlisted` names the organizations whose listing failed, and why; `links` holds the
    projects of the credentials whose links a decision needs (`reconcile` says which).
    """

    listings: Mapping[str, Sequence[RemoteCredential]] = field(default_factory=dict)
    unlisted: Mapping[str, str] = field(default_factory=dict)
    links: Mapping[str, frozenset[str]] = field(default_factory=dict)


def _retire_keys(entries: Sequence[VaultEntry], records: Mapping[str, LedgerRecord], scope: Scope,
                 settings: Settings) -> set[str]:
    """Ledger rows whose secret Vault now shows untagged, deleted or absent (where we looked)."""
    seen = {e.ref.key: e for e in entries}
    out: set[str] = set()
    for key, rec in records.items():
        if rec.state in _GONE_STATES:
            continue
        entry = seen.get(key)
        if entry is not None:
            if entry.deleted or not is_tagged(entry, settings.tags):
                out.add(key)
            continue
        idx = source_of(key, settings.sources)
        if key in scope.keys or (idx is not None and idx in scope.sources):
            out.add(key)
    return out


def known_organizations(records: Mapping[str, LedgerRecord], settings: Settings) -> set[str]:
    """Every organization the bridge may hold credentials in: configured, or in the ledger."""
    orgs = {r.organization_id for r in records.values() if r.organization_id}
    orgs |= {o for o in [settings.cybedefend.organization_id, *(s.organization_id for s in settings.sources)] if o}
    return orgs


def touched_organizations(
    entries: Sequence[VaultEntry],
    records: Mapping[str, LedgerRecord],
    scope: Scope,
    settings: Settings,
    hinted: Collection[str],
    *,
    everything: bool,
) -> set[str]:
    """The organizations to list before values are read.

    Those where a secret is retired under `delete` (its credentials are found by marker, not by
    the ledger) and where an earlier pass left a deletion to finish (`hinted`); with
    `everything` (the drift check is due), every known organization. Creates, rotations and
    moves are only known once values are read: `writing_organizations` names those, listed
    next. A steady pass, or a metadata-only change, lists nothing.
    """
    if everything:
        return known_organizations(records, settings) | set(hinted)
    orgs = set(hinted)
    if settings.sync.deletion_policy == "delete":
        for key in _retire_keys(entries, records, scope, settings):
            org = records[key].organization_id
            if org:
                orgs.add(org)
    return orgs


def writing_organizations(intents: Iterable[Action]) -> set[str]:
    """The organizations a create, rotation or move may write to (old and new place)."""
    orgs: set[str] = set()
    for a in intents:
        if a.kind in (ActionKind.CREATE, ActionKind.ROTATE, ActionKind.MOVE):
            orgs |= {o for o in (a.organization_id, a.old_organization_id) if o}
    return orgs


def with_evidence(records: Mapping[str, LedgerRecord], view: RemoteView) -> Mapping[str, LedgerRecord]:
    """The ledger as the planner should believe it, given what the listings show.

    A row that says `registered` with a credential absent from its organization's fresh listing
    is `missing` (drift): the planner reads the value and registers it again, or adopts another
    credential that carries the current token. Rows of organizations not listed are unchanged.
    `records` itself when nothing changes (a steady pass lists nothing): a copy of a map of
    every tracked secret would be held beside it for the whole pass.
    """
    if not view.listings:
        return records
    present = {org: {c.id for c in creds} for org, creds in view.listings.items()}
    out: dict[str, LedgerRecord] | None = None
    for key, rec in records.items():
        if rec.state != State.REGISTERED or not rec.credential_id or rec.organization_id not in present:
            continue
        if rec.credential_id not in present[rec.organization_id]:
            if out is None:
                out = dict(records)
            out[key] = replace(rec, state=State.MISSING, reason="the credential is gone from CybeDefend")
    return records if out is None else out


def _ours(view: RemoteView, instance: str, only: Collection[str] | None = None
          ) -> dict[str, dict[str, list[tuple[RemoteCredential, Marker]]]]:
    """path digest -> organization -> this instance's credentials for that secret.

    `only`: just these path digests. A credential whose description contains none of them is
    skipped before its marker is parsed (a substring test, not a regex and a `Marker` per
    credential): what a targeted pass against a large organization spent most of its planning on.
    """
    out: dict[str, dict[str, list[tuple[RemoteCredential, Marker]]]] = {}
    few = tuple(only) if only is not None and len(only) <= _PREFILTER_MAX else None
    for org, creds in view.listings.items():
        for cred in creds:
            text = cred.description
            if not text or (few is not None and not any(d in text for d in few)):
                continue
            marker = Marker.parse(text)
            if marker is None or marker.instance != instance or (only is not None and marker.path_digest not in only):
                continue
            out.setdefault(marker.path_digest, {}).setdefault(org, []).append((cred, marker))
    return out


# Above this many digests, `_ours` parses every marker and filters after: one substring test per
# digest per credential would cost more than the parse.
_PREFILTER_MAX = 16


Owned = dict[str, dict[str, list[tuple[RemoteCredential, Marker]]]]


def owned_credentials(listings: Mapping[str, Sequence[RemoteCredential]], instance: str,
                      only: Collection[str] | None = None) -> Owned:
    """path digest -> organization -> this instance's credentials for that secret (what
    `reconcile` judges by), for the given listings; merge the results of two disjoint sets of
    organizations with `merge_owned`.

    `only`: the path digests of a targeted pass's keys. Nothing else in the map is consulted
    for such a pass (its intents are for those keys, and `_uncovered` judges only credentials
    whose secret is in scope), so the restricted map settles exactly as the whole one would.
    """
    return _ours(RemoteView(listings=listings), instance, only)


def merge_owned(into: Owned, more: Owned) -> None:
    for digest, by_org in more.items():
        into.setdefault(digest, {}).update(by_org)


def settle(
    action: Action,
    record: LedgerRecord | None,
    owned: Owned,
    view: RemoteView,
    settings: Settings,
    keyring: Keyring,
) -> tuple[Action, bool]:
    """One intent settled exactly as `reconcile` settles it in `view`, and whether that needed
    links `view.links` lacks (then the result is not final). The engine's pipeline uses it to
    start a write before the whole plan is known; it may do so only when `view` is final for
    the pass and the action carries no deletion the guard rail could pause (`RETIRING`)."""
    needed = False

    def links_of(org: str, cred_id: str) -> frozenset[str]:
        nonlocal needed
        got = view.links.get(cred_id)
        if got is None:
            needed = True
            return frozenset()
        return got

    mine = owned.get(keyring.path_digest(action.ref), {})
    settled = _settle(action, record, mine, view, settings.sync.deletion_policy == "delete", links_of)
    return settled, needed


def _oldest_first(creds: Iterable[RemoteCredential], prefer: str | None) -> list[RemoteCredential]:
    # The ledger's credential first (it is the one already linked and reported), then the oldest.
    return sorted(creds, key=lambda c: (c.id != prefer, c.created_at or "", c.id))


def reconcile(
    actions: Sequence[Action],
    entries: Sequence[VaultEntry],
    records: Mapping[str, LedgerRecord],
    view: RemoteView,
    scope: Scope,
    settings: Settings,
    keyring: Keyring,
    *,
    owned: Owned | None = None,
) -> tuple[list[Action], set[tuple[str, str]]]:
    """Settle each intent against what CybeDefend holds; add deletions nothing else covers.

    Returns the final actions and the (organization, credential) pairs whose links it needed
    but `view.links` lacked: the engine reads those and calls again (pure, so a second call
    with more facts is the whole protocol). An intent whose organization could not be listed
    is blocked: nothing is created blind (no idempotency key: only a listing prevents a
    duplicate) and nothing is deleted without seeing it.

    `owned`: `owned_credentials(view.listings, instance)` when the caller already has it (the
    engine builds it as listings arrive): parsing every listed credential's marker is most of
    what this costs in a targeted pass against a large organization, and a rotation calls it twice.
    """
    instance = settings.sync.instance
    delete = settings.sync.deletion_policy == "delete"
    ours = _ours(view, instance) if owned is None else owned
    need: set[tuple[str, str]] = set()

    def links_of(org: str, cred_id: str) -> frozenset[str]:
        got = view.links.get(cred_id)
        if got is None:
            need.add((org, cred_id))
            return frozenset()
        return got

    out: list[Action] = []
    judged: set[str] = set()
    for action in actions:
        if ours:
            digest = keyring.path_digest(action.ref)
            judged.add(digest)
            mine = ours.get(digest, {})
        else:
            # Nothing of ours was listed (a steady pass lists nothing): no credential to match,
            # none left uncovered, so no digest per secret is computed and held (~100 B each).
            mine = {}
        out.append(_settle(action, records.get(action.ref.key), mine, view, delete, links_of))
    out.extend(_uncovered(ours, judged, entries, records, scope, settings, keyring, delete, view))
    if count_deletions(out, settings) > settings.sync.max_deletes_per_pass:
        out = [replace(a, paused=True) if any(d.why in RETIRING for d in a.deletes) else a for a in out]
    return out, need


def _settle(
    action: Action,
    rec: LedgerRecord | None,
    mine_by_org: Mapping[str, list[tuple[RemoteCredential, Marker]]],
    view: RemoteView,
    delete: bool,
    links_of: Callable[[str, str], frozenset[str]],
) -> Action:
    kind = action.kind
    if kind == ActionKind.RETIRE:
        return _settle_retire(action, rec, mine_by_org, view, delete)
    org, project = action.organization_id, action.project_id
    fingerprint = action.candidate.fingerprint if action.candidate else None
    if kind == ActionKind.SKIP and action.reason == UP_TO_DATE and rec is not None:
        fingerprint = rec.fingerprint
    if fingerprint is None or org is None or project is None or kind == ActionKind.REJECT:
        return action  # nothing known to judge by: rejected, failing, backing off, value unread
    writes = kind in (ActionKind.CREATE, ActionKind.ROTATE, ActionKind.MOVE)
    if org not in view.listings:
        if writes:
            why = view.unlisted.get(org, "it was not listed")
            return replace(action, kind=kind, blocked=f"could not list the credentials of organization {org}: {why}")
        return action  # not looked at this pass: the ledger's word stands until we look
    mine = mine_by_org.get(org, [])
    current = _oldest_first((c for c, m in mine if m.token_part == fingerprint[:8]),
                            rec.credential_id if rec else None)
    keep = current[0] if current else None
    deletes = [Doomed(c.id, org, "superseded") for c, m in mine if m.token_part != fingerprint[:8]]
    deletes += [Doomed(c.id, org, "duplicate") for c in current[1:]]
    keeps: list[str] = []
    for other, creds in sorted(mine_by_org.items()):
        if other == org:
            continue
        if other not in view.listings:
            continue
        for c, _ in creds:
            if delete:
                deletes.append(Doomed(c.id, other, "moved"))
            else:
                keeps.append(c.id)
    # The old primary project leaves the links when the secret moved within the organization
    # under `delete`; under `retain` it keeps its credential (nothing is taken away).
    drop = None
    if rec is not None and rec.organization_id == org and rec.project_id and rec.project_id != project and delete:
        drop = rec.project_id
    settled = replace(action, deletes=tuple(deletes), keeps=tuple(keeps))
    if keep is None:
        if not writes:
            # Registered per the ledger, yet no credential holds the token: registered again.
            # (with_evidence makes this a create before values are read; this is the net.)
            return replace(settled, blocked="the credential is gone from CybeDefend; it is registered again next pass")
        wanted = {project}
        for c, m in mine:
            if m.token_part != fingerprint[:8]:
                wanted |= links_of(org, c.id)  # a rotation or a move keeps every project it served
        if drop is not None:
            wanted.discard(drop)
        wanted.add(project)
        return replace(settled, links=tuple(sorted(wanted)) if wanted != {project} else None)
    known = rec is not None and rec.credential_id == keep.id and rec.organization_id == org and rec.project_id == project \
        and rec.state in (State.REGISTERED, State.PENDING, State.FAILED)
    if known and kind in (ActionKind.SKIP, ActionKind.REFRESH):
        if kind == ActionKind.SKIP and deletes:
            return replace(settled, kind=ActionKind.DELETE, credential_id=keep.id,
                           reason=f"up to date as credential {keep.id}; removing our other credentials for it")
        return settled
    if known and kind in (ActionKind.CREATE, ActionKind.ROTATE, ActionKind.MOVE):
        kind_out = ActionKind.ADOPT  # a retry after a lost answer, or a row left pending
        return replace(settled, kind=kind_out, credential_id=keep.id,
                       reason=f"CybeDefend already holds this token as credential {keep.id}")
    # The ledger does not know this credential as the secret's current one in this place: make
    # sure it serves the project (a move, a lost ledger, another replica's work), then record it.
    have = links_of(org, keep.id)
    wanted = set(have) | {project}
    if drop is not None:
        wanted.discard(drop)
    for c, m in mine:
        if m.token_part != fingerprint[:8]:
            wanted |= links_of(org, c.id) - ({drop} if drop else set())
    links = tuple(sorted(wanted)) if wanted != set(have) else None
    if kind == ActionKind.MOVE:
        return replace(settled, credential_id=keep.id, links=links,
                       reason=f"{action.reason}: relinking credential {keep.id}")
    return replace(settled, kind=ActionKind.ADOPT, credential_id=keep.id, links=links,
                   reason=f"CybeDefend already holds this token as credential {keep.id}")


def _settle_retire(
    action: Action,
    rec: LedgerRecord | None,
    mine_by_org: Mapping[str, list[tuple[RemoteCredential, Marker]]],
    view: RemoteView,
    delete: bool,
) -> Action:
    if not delete:
        kept = [c.id for creds in mine_by_org.values() for c, _ in creds]
        if rec is not None and rec.credential_id and rec.state != State.MISSING and rec.credential_id not in kept:
            kept.append(rec.credential_id)
        return replace(action, keeps=tuple(sorted(set(kept))))
    org = rec.organization_id if rec is not None else None
    if rec is not None and rec.credential_id and rec.state != State.MISSING and org and org not in view.listings:
        why = view.unlisted.get(org, "it was not listed")
        return replace(action, blocked=f"could not list the credentials of organization {org}: {why}")
    doomed = [Doomed(c.id, o, "retired") for o, creds in sorted(mine_by_org.items()) if o in view.listings for c, _ in creds]
    return replace(action, deletes=tuple(doomed))


def _uncovered(
    ours: Mapping[str, Mapping[str, list[tuple[RemoteCredential, Marker]]]],
    judged: set[str],
    entries: Sequence[VaultEntry],
    records: Mapping[str, LedgerRecord],
    scope: Scope,
    settings: Settings,
    keyring: Keyring,
    delete: bool,
    view: RemoteView,
) -> list[Action]:
    """Our credentials no intent covers, judged by what Vault says of their secret now.

    Their secret is found by marker: among this pass's entries (tagged or not), else among the
    ledger's paths (the only way back from a one-way digest). Deleted only under `delete`, when
    Vault shows the secret untagged or deleted, or absent from a source listed completely this
    pass. A credential whose secret we cannot name is left alone (another bridge with the same
    instance name and another key, or a path outside every source).
    """
    if not delete or not ours:
        # Nothing of ours listed: nothing to judge. Returning before the digest table matters
        # in a steady pass, which lists nothing: two digests and a slot per tracked secret.
        return []
    by_digest: dict[str, tuple[str, VaultEntry | None]] = {}
    for rec in records.values():
        by_digest[keyring.path_digest(rec.ref)] = (rec.key, None)
    for entry in entries:
        by_digest[keyring.path_digest(entry.ref)] = (entry.ref.key, entry)
    out: list[Action] = []
    for digest in sorted(ours):
        if digest in judged or digest not in by_digest:
            continue
        key, found = by_digest[digest]
        if found is not None:
            if not (found.deleted or not is_tagged(found, settings.tags)):
                continue  # tagged: an intent of its own covers it (or it is in flux)
            why = "the secret is no longer tagged" if not found.deleted else "the current version is deleted or destroyed"
            ref = found.ref
        else:
            idx = source_of(key, settings.sources)
            if not (key in scope.keys or (idx is not None and idx in scope.sources)):
                continue  # not looked at this pass
            why = "the secret was deleted from Vault"
            ref = records[key].ref
        doomed = tuple(Doomed(c.id, org, "retired") for org, creds in sorted(ours[digest].items())
                       for c, _ in creds if org in view.listings)
        if doomed:
            out.append(Action(ActionKind.DELETE, ref, f"{why}: deleting its credentials", deletes=doomed))
    return out


# -- what a plan will send -----------------------------------------------------------------------


def writes_of(action: Action) -> list[dict[str, Any]]:
    """Every request carrying out `action` sends to CybeDefend, in order (empty: none).

    `plan` prints these and the property tests compare them with what `sync --once` sends. A
    new credential's id is unknown until the create answers: it is written `(new)`.
    """
    if action.blocked is not None:
        return []
    out: list[dict[str, Any]] = []
    target = action.credential_id
    creating = action.kind in (ActionKind.CREATE, ActionKind.ROTATE, ActionKind.MOVE) and action.credential_id is None
    if creating:
        out.append({"op": "create", "organization_id": action.organization_id, "project_id": action.project_id})
        target = "(new)"
    if action.links is not None:
        out.append({"op": "set_links", "organization_id": action.organization_id, "credential_id": target,
                    "project_ids": list(action.links)})
    if not action.paused:
        out += [{"op": "delete", "organization_id": d.organization_id, "credential_id": d.credential_id, "why": d.why}
                for d in action.deletes]
    return out


def describe(action: Action, settings: Settings) -> dict[str, Any]:
    """One action as `plan -o json` shows it: what, where, why, and every credential it touches."""
    retire_policy = None
    if action.kind == ActionKind.RETIRE:
        retire_policy = "delete" if settings.sync.deletion_policy == "delete" else "keep"
    return {
        "path": action.ref.key,
        "action": action.kind.value,
        "version": action.version,
        "organization_id": action.organization_id,
        "project_id": action.project_id,
        "reason": action.reason,
        "reject_code": action.reject_code,
        "credential_id": action.credential_id,
        "replaces": action.old_credential_id,
        "retire": retire_policy,
        "deletes": [{"credential_id": d.credential_id, "organization_id": d.organization_id, "why": d.why}
                    for d in action.deletes],
        "keeps": list(action.keeps),
        "links": list(action.links) if action.links is not None else None,
        "paused_by_guard_rail": action.paused,
        "blocked": action.blocked,
        "writes": writes_of(action),
    }
