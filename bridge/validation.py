"""Validation of tagged secrets before anything is sent: pure functions, specific reasons.

A rejection carries a bounded `code` (a metric label) and a human `reason` (log, plan, ledger,
status). Reasons describe the problem and never quote a value: a malformed token must not end
up in a log line because it was malformed.
"""

from __future__ import annotations

import functools
import hashlib
import re
import sys
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bridge.config import UUID_RE, SourceSettings, SyncSettings, TagSettings
from bridge.model import Sensitive, VaultEntry

TOKEN_SHAPE = re.compile(r"^dckr_(pat|oat)_[A-Za-z0-9_-]{8,}$")
_ANY_TOKEN = re.compile(r"^[\x21-\x7e]+$")  # printable ASCII, no spaces: what an HTTP body can carry as a token

REJECT_CODES = (
    "invalid_project_id",
    "invalid_organization_id",
    "missing_organization_id",
    "invalid_description",
    "unreadable_value",
    "missing_token",
    "token_not_string",
    "token_too_long",
    "token_shape",
    "missing_username",
    "username_not_string",
    "username_too_long",
    "username_control_chars",
    "duplicate_token",
    "remote_rejected",
    "dockerhub_rejected",
)


@dataclass(frozen=True, slots=True)
class Rejection:
    code: str
    reason: str


@dataclass(frozen=True, slots=True)
class Tags:
    project_id: str
    organization_id: str
    description: str | None

    @property
    def digest(self) -> str:
        """Identifies these tags (not a secret: tags are plain metadata)."""
        return _tags_digest(self.project_id, self.organization_id, self.description)


@functools.lru_cache(maxsize=1024)
def _tags_digest(project_id: str, organization_id: str, description: str | None) -> str:
    # Cached: most secrets share their tags, so they share one digest string (it is kept in
    # every Action and ledger row) instead of each computing and holding its own copy.
    text = f"{project_id}\0{organization_id}\0{description or ''}"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class Payload:
    username: str
    token: Sensitive


def _has_control(text: str) -> bool:
    return any(unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") for ch in text)


def is_tagged(entry: VaultEntry, tags: TagSettings) -> bool:
    return tags.project_id_key in entry.tags


def read_tags(
    entry: VaultEntry, source: SourceSettings, tags: TagSettings, default_org: str | None, sync: SyncSettings
) -> Tags | Rejection:
    """The project, organization and description a tagged secret asks for."""
    project = entry.tags.get(tags.project_id_key)
    if not isinstance(project, str) or not UUID_RE.match(project.strip()):
        return Rejection("invalid_project_id", f"tag {tags.project_id_key!r} is not a UUID")
    org = entry.tags.get(tags.organization_id_key)
    if org is None or (isinstance(org, str) and org.strip() == ""):
        org = source.organization_id or default_org
        if org is None:
            return Rejection(
                "missing_organization_id",
                f"no tag {tags.organization_id_key!r}, and neither the source nor cybedefend.organization_id sets a default",
            )
    if not isinstance(org, str) or not UUID_RE.match(org.strip()):
        return Rejection("invalid_organization_id", f"tag {tags.organization_id_key!r} is not a UUID")
    desc = entry.tags.get(tags.description_key)
    description: str | None = None
    if desc is not None:
        if not isinstance(desc, str):
            return Rejection("invalid_description", f"tag {tags.description_key!r} is not text")
        # Control characters are dropped rather than rejected: a description is cosmetic.
        cleaned = "".join(" " if _has_control(ch) else ch for ch in desc).strip()
        cleaned = cleaned.replace("[cybedefend-bridge:", "(cybedefend-bridge:")  # no forged markers
        description = cleaned[: sync.description_max_length].rstrip() or None
    # Interned: thousands of secrets name the same few projects and organizations, and each
    # Tags (then each Action) would otherwise hold its own lowercased copy of the same UUID.
    return Tags(sys.intern(project.strip().lower()), sys.intern(org.strip().lower()), description)


def read_payload(data: Mapping[str, Any] | None, source: SourceSettings, sync: SyncSettings) -> Payload | Rejection:
    """The username and token of a secret's data, checked for shape and bounds."""
    if not isinstance(data, Mapping):
        return Rejection("unreadable_value", "the secret's data is not a key/value mapping")
    token = data.get(source.token_key)
    if token is None or token == "":
        return Rejection("missing_token", f"data key {source.token_key!r} is missing or empty")
    if not isinstance(token, str):
        return Rejection("token_not_string", f"data key {source.token_key!r} is not a string")
    if len(token) > sync.token_max_length:
        return Rejection(
            "token_too_long", f"data key {source.token_key!r} is longer than {sync.token_max_length} characters"
        )
    shape = _ANY_TOKEN if sync.allow_any_token_shape else TOKEN_SHAPE
    # fullmatch: with `match`, `$` also matches before a trailing newline, which then went out
    # as part of the token.
    if not shape.fullmatch(token):
        expected = "printable characters without spaces" if sync.allow_any_token_shape else "dckr_pat_… or dckr_oat_…"
        return Rejection("token_shape", f"data key {source.token_key!r} does not look like a DockerHub token ({expected})")
    username = data.get(source.username_key)
    if username is None or (isinstance(username, str) and username.strip() == ""):
        return Rejection("missing_username", f"data key {source.username_key!r} is missing or empty")
    if not isinstance(username, str):
        return Rejection("username_not_string", f"data key {source.username_key!r} is not a string")
    if len(username) > sync.username_max_length:
        return Rejection(
            "username_too_long", f"data key {source.username_key!r} is longer than {sync.username_max_length} characters"
        )
    if _has_control(username):
        return Rejection("username_control_chars", f"data key {source.username_key!r} contains control characters")
    return Payload(username.strip(), Sensitive(token))
