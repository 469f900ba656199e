"""Shared pytest fixtures. Each fixture says who uses it; add yours below with a comment.

Vault fixtures (owner: the Vault adapter): a real OpenBao dev server for the whole session,
and fresh KV mounts per test so tests do not see each other's secrets.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cybedefend_double.simulator import Simulator
from tests.support.daemon import Stack, new_simulator
from tests.support.openbao import OpenBao, scrub_tokens

# Fixtures that start (or stand on) a real OpenBao server: a test using one must be marked
# `integration`, so `-m "not integration"` really is the subset that needs no OpenBao.
OPENBAO_FIXTURES = frozenset({"openbao", "openbao_factory", "kv_mount", "kv1_mount", "chaos_bao"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    unmarked = [item.nodeid for item in items
                if OPENBAO_FIXTURES & set(getattr(item, "fixturenames", ())) and item.get_closest_marker("integration") is None]
    if unmarked:
        listed = "\n  ".join(unmarked[:50])
        raise pytest.UsageError(f"{len(unmarked)} tests start OpenBao but are not marked integration:\n  {listed}")


def scrub_report(report: pytest.TestReport) -> None:
    """Replace every OpenBao root token this process issued in a report's failure text and
    captured sections with `***` (a report is rewritten only when it held one)."""
    if report.longrepr is not None:
        text = str(report.longrepr)
        clean = scrub_tokens(text)
        if clean != text:
            report.longrepr = clean
    report.sections = [(title, scrub_tokens(body)) for title, body in report.sections]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    scrub_report(outcome.get_result())  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def openbao() -> Iterator[OpenBao]:
    """A real `bao server -dev` for the session: `.addr`, `.root_token`, `.client()`, helpers."""
    server = OpenBao("dev")
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def openbao_factory(tmp_path: Path) -> Iterator[Callable[..., OpenBao]]:
    """Start extra servers (`mode="file"` for stop/start/seal, `audit_log=` for an audit device).

    Every server started through the factory is killed at the end of the test.
    """
    started: list[OpenBao] = []

    def make(mode: str = "dev", **kwargs: Any) -> OpenBao:
        kwargs.setdefault("workdir", tmp_path / f"bao{len(started)}")
        kwargs["workdir"].mkdir(parents=True, exist_ok=True)
        server = OpenBao(mode, **kwargs)  # type: ignore[arg-type]
        started.append(server)
        return server.start()

    try:
        yield make
    finally:
        for server in started:
            server.cleanup()


def _unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


@pytest.fixture
def kv_mount(openbao: OpenBao) -> Iterator[str]:
    """A fresh KV v2 mount with a unique name; disabled after the test."""
    mount = _unique("kv2")
    openbao.enable_kv(mount, 2)
    try:
        yield mount
    finally:
        openbao.disable_mount(mount)


@pytest.fixture
def kv1_mount(openbao: OpenBao) -> Iterator[str]:
    """A fresh KV v1 mount with a unique name; disabled after the test."""
    mount = _unique("kv1")
    openbao.enable_kv(mount, 1)
    try:
        yield mount
    finally:
        openbao.disable_mount(mount)


# -- the daemon suites' double and stacks (a module that defines its own `sim` keeps it) -----------


@pytest.fixture
def sim() -> Iterator[Simulator]:
    s = new_simulator()
    yield s
    s.stop()


@pytest.fixture
def stacks(sim: Simulator, tmp_path: Path) -> Iterator[Callable[[OpenBao], Stack]]:
    made: list[Stack] = []

    def make(bao: OpenBao) -> Stack:
        st = Stack(bao, sim, tmp_path)
        made.append(st)
        return st

    yield make
    for st in made:
        st.close()
