"""Real OpenBao servers for the test suites (never a mock): the product's dev server plus hvac helpers.

The process handling lives in `cybedefend_double.openbao.DevOpenBao` (the demo uses it too); this adds
the conveniences tests want, through hvac. Two modes:
- `dev`: `bao server -dev`, in memory, unsealed, root token chosen by us, KV v2 at `secret/`.
- `file`: durable single-node raft storage in a work directory, initialised once with one unseal
  key; `stop()`/`start()` keep the data, `seal()`/`unseal()` work as in production. For chaos tests.

Either mode can declare a `file` audit device (`audit_log=`). The server runs in its own process
group and dies with the test process, so a run leaves no orphan behind.
"""

from __future__ import annotations

from typing import Any

import hvac

from cybedefend_double.openbao import DevOpenBao, Mode, find_bao, free_port_pair

__all__ = ["ISSUED_TOKENS", "Mode", "OpenBao", "find_bao", "free_port_pair", "scrub_tokens"]


# Root tokens of every server this process started: tests/conftest.py scrubs them from failure
# reports and captured output (an hvac error or an assertion's values could otherwise print one).
ISSUED_TOKENS: set[str] = set()


def scrub_tokens(text: str) -> str:
    for token in ISSUED_TOKENS:
        if token:
            text = text.replace(token, "***")
    return text


class OpenBao(DevOpenBao):
    """A `DevOpenBao` with hvac-based helpers for tests."""

    def start(self, timeout: float = 20.0) -> OpenBao:
        super().start(timeout)
        ISSUED_TOKENS.add(self.root_token)  # known after start: a file-mode server makes it at init
        return self

    def __enter__(self) -> OpenBao:
        return self.start()

    def _api(self, method: str, path: str, body: dict[str, Any] | None = None, token: str | None = None) -> Any:
        return self.api(method, path, body, token)

    def _health(self) -> int | None:
        return self.health()

    # --- conveniences for tests ----------------------------------------------------------

    def client(self, token: str | None = None) -> hvac.Client:
        return hvac.Client(url=self.addr, token=token or self.root_token, timeout=10)

    def disable_mount(self, mount: str) -> None:
        # Removing a mount with thousands of versions takes a while on a busy machine.
        client = hvac.Client(url=self.addr, token=self.root_token, timeout=120)
        client.sys.disable_secrets_engine(path=mount)

    def write_secret(self, mount: str, path: str, data: dict[str, Any], custom_metadata: dict[str, str] | None = None) -> int:
        """Write a KV v2 secret (and optionally replace its custom_metadata); returns the new version."""
        c = self.client()
        resp = c.secrets.kv.v2.create_or_update_secret(path=path, secret=data, mount_point=mount)
        if custom_metadata is not None:
            self.set_metadata(mount, path, custom_metadata)
        return int(resp["data"]["version"])

    def write_kv1(self, mount: str, path: str, data: dict[str, Any]) -> None:
        self.client().secrets.kv.v1.create_or_update_secret(path=path, secret=data, mount_point=mount)

    def set_metadata(self, mount: str, path: str, custom_metadata: dict[str, str]) -> None:
        self.client().secrets.kv.v2.update_metadata(path=path, custom_metadata=custom_metadata, mount_point=mount)

    def put_policy(self, name: str, hcl: str) -> None:
        self.client().sys.create_or_update_policy(name=name, policy=hcl)

    def create_token(
        self,
        policies: list[str],
        ttl: str = "1h",
        renewable: bool = True,
        explicit_max_ttl: str | None = None,
        no_default_policy: bool = False,
    ) -> str:
        kwargs: dict[str, Any] = {"policies": policies, "ttl": ttl, "renewable": renewable}
        if explicit_max_ttl is not None:
            kwargs["explicit_max_ttl"] = explicit_max_ttl
        if no_default_policy:
            kwargs["no_default_policy"] = True
        resp = self.client().auth.token.create(**kwargs)
        return str(resp["auth"]["client_token"])

    def enable_approle(
        self,
        role: str,
        policies: list[str],
        token_ttl: str = "1h",  # noqa: S107 - a duration, not a password
        token_max_ttl: str = "24h",  # noqa: S107 - a duration, not a password
        mount: str = "approle",
    ) -> tuple[str, str]:
        """Enable AppRole (once) and create a role; returns (role_id, secret_id)."""
        c = self.client()
        if f"{mount}/" not in c.sys.list_auth_methods()["data"]:
            c.sys.enable_auth_method("approle", path=mount)
        c.auth.approle.create_or_update_approle(
            role_name=role, token_policies=policies, token_ttl=token_ttl, token_max_ttl=token_max_ttl, mount_point=mount
        )
        role_id = c.auth.approle.read_role_id(role_name=role, mount_point=mount)["data"]["role_id"]
        secret_id = c.auth.approle.generate_secret_id(role_name=role, mount_point=mount)["data"]["secret_id"]
        return str(role_id), str(secret_id)
