"""The bench's laboratory: a real OpenBao dev server, the CybeDefend double, seeded secrets, settings.

One `Lab` per run. It starts `bao server -dev` (through `tests.support.openbao.OpenBao`, the same
launcher the test suite uses), writes N tagged KV v2 secrets quickly over a pooled client, and
hands out bridge settings pointing at a given double. Nothing here measures anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from bridge.app import Bridge, build
from bridge.config import Settings
from cybedefend_double.simulator import Simulator
from tests.support.config import merged, parse, raw_config
from tests.support.data import ORG, PROJECTS, credential, seeded_simulator
from tests.support.data import token as support_token
from tests.support.openbao import OpenBao

PAT = credential("cdp", "bench-pat")
PREFIX = "dockerhub"
# Both HTTP paths get a rate cap far above what a pass can reach, so the cap is never what we measure.
API_RATE = 1_000_000.0
API_CONCURRENCY = 4  # cybedefend.max_concurrency: the default
CURL_SEED_MIN = 200  # fewer secrets than this are written by the pooled Python client


def token(i: int, generation: int = 0) -> str:
    """A DockerHub-shaped token, unique per (secret, generation); never a real one."""
    return support_token(i, f"bench/{generation}")


def name(i: int) -> str:
    return f"team-{i:05d}"


def new_simulator() -> Simulator:
    sim = seeded_simulator(PAT, org=ORG, projects=PROJECTS)
    sim.start()
    return sim


class Lab:
    """OpenBao + a KV v2 mount + a work directory; secrets `dockerhub/team-NNNNN` seeded on demand."""

    def __init__(self, workdir: Path, *, audit: bool = False, extra_config: str = "") -> None:
        self.workdir = workdir
        self.audit_log = workdir / "audit.log" if audit else None
        # `extra_config` (even a comment) makes OpenBao start from a config file, so an audit
        # device can be declared later and loaded with SIGHUP (bench/latency.py does).
        self.bao = OpenBao("dev", workdir=workdir / "bao", audit_log=self.audit_log, extra_config=extra_config)
        self.mount = "bench"
        self.seeded: dict[str, int] = {}  # prefix -> secrets written there (indices 0..n-1)
        self.generation: dict[tuple[str, int], int] = {}
        self._http: httpx.Client | None = None

    def __enter__(self) -> Lab:
        (self.workdir / "bao").mkdir(parents=True, exist_ok=True)
        self.bao.start()
        self.bao.enable_kv(self.mount, 2)
        (self.workdir / "pat").write_text(PAT + "\n")
        (self.workdir / "vault-token").write_text(self.bao.root_token)
        (self.workdir / "vault-token").chmod(0o600)
        self._http = httpx.Client(
            base_url=f"{self.bao.addr}/v1/",
            headers={"X-Vault-Token": self.bao.root_token},
            limits=httpx.Limits(max_connections=8, max_keepalive_connections=8),
            timeout=30,
        )
        return self

    def __exit__(self, *exc: object) -> None:
        if self._http is not None:
            self._http.close()
        self.bao.cleanup()

    @property
    def http(self) -> httpx.Client:
        assert self._http is not None, "use the Lab as a context manager"
        return self._http

    # --- secrets -------------------------------------------------------------------------
    @staticmethod
    def path(i: int, prefix: str = PREFIX) -> str:
        return f"{prefix}/{name(i)}"

    def key(self, i: int, prefix: str = PREFIX) -> str:
        return f"{self.mount}/{self.path(i, prefix)}"

    def write(self, i: int, prefix: str = PREFIX, *, tag: bool = True) -> str:
        """One secret's next version (metadata tags first, so the data write is the last call).

        Returns the sha256 of the token written, as the double's request records show it."""
        gen = self.generation.get((prefix, i), -1) + 1
        self.generation[(prefix, i)] = gen
        path = self.path(i, prefix)
        if tag:
            meta = {"custom_metadata": {"cybedefend-project-id": PROJECTS[i % len(PROJECTS)]}}
            self.http.post(f"{self.mount}/metadata/{path}", json=meta).raise_for_status()
        body = {"data": {"accessToken": token(i, gen), "dockerhubUsername": f"u-{name(i)}"}}
        self.http.post(f"{self.mount}/data/{path}", json=body).raise_for_status()
        return hashlib.sha256(token(i, gen).encode()).hexdigest()

    def seed(self, total: int, prefix: str = PREFIX) -> None:
        """Grow `prefix` to `total` tagged secrets (indices 0..total-1), 8 writers at once.

        Many at once go through one `curl --parallel` process: the bench process's own Python
        HTTP client took ~5 ms a secret (two writes) on a loaded 2-core machine, which made
        seeding 30,000 secrets the longest part of a full run."""
        done = self.seeded.get(prefix, 0)
        if total - done >= CURL_SEED_MIN and shutil.which("curl") is not None:
            self._seed_curl(range(done, total), prefix)
        else:
            self._each(lambda i: self.write(i, prefix), range(done, total))
        self.seeded[prefix] = max(done, total)

    def _seed_curl(self, indices: range, prefix: str) -> None:
        """Version 0 of each secret: metadata (tags) and data POSTs, 8 in flight in one curl process.

        The two writes of one secret may land in either order; both orders end in the same state."""
        blocks = []
        for i in indices:
            self.generation[(prefix, i)] = 0
            meta = {"custom_metadata": {"cybedefend-project-id": PROJECTS[i % len(PROJECTS)]}}
            data = {"data": {"accessToken": token(i, 0), "dockerhubUsername": f"u-{name(i)}"}}
            for kind, body in (("metadata", meta), ("data", data)):
                blocks.append(
                    f'url = "{self.bao.addr}/v1/{self.mount}/{kind}/{self.path(i, prefix)}"\n'
                    f'header = "X-Vault-Token: {self.bao.root_token}"\nheader = "Content-Type: application/json"\n'
                    f'data = "{json.dumps(body).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"\n'
                    'output = "/dev/null"\nsilent\nwrite-out = "%{http_code}\\n"\n'
                )
        # The Vault token goes in a 0600 file, never on the command line where `ps` shows it.
        fd, cfg = tempfile.mkstemp(prefix="bench-seed-", suffix=".cfg")
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write("next\n".join(blocks))
            done = subprocess.run(["curl", "--parallel", "--parallel-max", "8", "-K", cfg],
                                  capture_output=True, text=True, check=False, timeout=1800)
        finally:
            os.unlink(cfg)
        codes = done.stdout.split()
        if done.returncode != 0 or len(codes) != len(blocks) or not set(codes) <= {"200", "204"}:
            raise RuntimeError(f"seeding with curl failed: rc={done.returncode}, {len(codes)} of {len(blocks)} "
                               f"answers, codes {sorted(set(codes))}")

    def rotate(self, indices: Iterable[int], prefix: str = PREFIX) -> None:
        """A new version of each given secret (a rotated token)."""
        self._each(lambda i: self.write(i, prefix, tag=False), list(indices))

    @staticmethod
    def _each(fn: Any, items: Iterable[int]) -> None:
        with ThreadPoolExecutor(max_workers=8) as pool:
            for _ in pool.map(fn, items):
                pass

    # --- the bridge ----------------------------------------------------------------------
    def raw_settings(self, sim_url: str, tag: str, prefix: str = PREFIX, **sections: dict[str, Any]) -> dict[str, Any]:
        """Bridge settings as a config file would hold them; `tag` names this bridge's ledger."""
        return merged(raw_config(
            self.workdir, vault_addr=self.bao.addr, vault_token_file=self.workdir / "vault-token", cybedefend_url=sim_url,
            mount=self.mount, prefix=prefix, ledger_name=f"ledger-{tag}.sqlite3",
            cybedefend={"max_concurrency": API_CONCURRENCY, "max_requests_per_second": API_RATE},
            ledger={"key_source": "file", "key_file": str(self.workdir / "fingerprint.key")},
            logging={"level": "warning", "format": "json"},
        ), sections)

    def settings(self, sim_url: str, tag: str, prefix: str = PREFIX, **sections: dict[str, Any]) -> Settings:
        return parse(self.raw_settings(sim_url, tag, prefix, **sections))

    def bridge(self, sim_url: str, tag: str | None = None, prefix: str = PREFIX) -> Bridge:
        """A bridge built by the composition root in this process (the smoke test uses it)."""
        return build(self.settings(sim_url, tag or secrets.token_hex(4), prefix))

    # --- raw access for the floors ---------------------------------------------------------
    def metadata_urls(self, count: int, prefix: str = PREFIX) -> list[str]:
        return [f"{self.bao.addr}/v1/{self.mount}/metadata/{self.path(i, prefix)}" for i in range(count)]

    def data_urls(self, count: int, prefix: str = PREFIX) -> list[str]:
        return [f"{self.bao.addr}/v1/{self.mount}/data/{self.path(i, prefix)}" for i in range(count)]
