"""The floors: the same work as the bridge, done by the leanest client we know, in the same run.

- `curl_fetch`: N GETs with `curl --parallel --parallel-max 8` (one process, keep-alive), the
  floor for a steady pass's metadata reads.
- `httpx_posts`: the bridge's create POSTs, sent by a bare `httpx.Client` on as many threads
  as `cybedefend.max_concurrency`, after one token exchange; the floor for cold registration.
- `three_calls`: metadata GET, value GET, create POST, one after the other on warm
  connections; the floor for write-to-registered latency.
- `Curl`: `curl_fetch` started in the background, so that the cold-registration floor can run
  its 2N Vault reads at the same time as the POSTs (`bench.procs.same_work_floor`).
Every floor checks its answers, so a floor that failed fast cannot pass for a fast floor.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

CURL_PARALLEL = 8
CREATE_PATH = "/integrations/dockerhub/container-registry/organization/{org}/credentials"
TOKEN_EXCHANGE_FORM = {
    "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
    "subject_token_type": "urn:logto:token-type:personal_access_token",
}


def curl_version() -> str:
    out = subprocess.run(["curl", "--version"], capture_output=True, text=True, check=True).stdout
    return out.split("\n", 1)[0].split(" (", 1)[0]


def curl_fetch(urls: Sequence[str], vault_token: str, parallel: int = CURL_PARALLEL) -> float:
    """Seconds for one `curl --parallel` process to GET every URL (all must answer 200)."""
    return curl_fetch_cpu(urls, vault_token, parallel)[0]


def curl_fetch_cpu(urls: Sequence[str], vault_token: str, parallel: int = CURL_PARALLEL) -> tuple[float, float]:
    """(wall seconds, CPU seconds: user + sys) of one `curl --parallel` process GETting every URL."""
    with Curl(urls, vault_token, parallel) as curl:
        curl.start()
        return curl.wait(), curl.cpu_seconds


class Curl:
    """One `curl --parallel` process over `urls`, started with `start()`, checked by `wait()`."""

    def __init__(self, urls: Sequence[str], vault_token: str, parallel: int = CURL_PARALLEL) -> None:
        if shutil.which("curl") is None:
            raise RuntimeError("curl is needed for the floor: apt-get install curl")
        self.count = len(urls)
        self.parallel = parallel
        # The token goes in a 0600 config file, never on the command line where `ps` would show it.
        fd, self._cfg = tempfile.mkstemp(prefix="bench-curl-", suffix=".cfg")
        with os.fdopen(fd, "w") as fh:
            fh.write(f'header = "X-Vault-Token: {vault_token}"\n')
            for url in urls:
                fh.write(f'url = "{url}"\noutput = "/dev/null"\n')
        self._proc: subprocess.Popen[str] | None = None
        self._started = 0.0
        self.cpu_seconds = 0.0  # curl's user + sys CPU, set by wait()

    def start(self) -> None:
        args = ["curl", "--silent", "--parallel", "--parallel-max", str(self.parallel), "--write-out", "%{http_code}\\n",
                "-K", self._cfg]
        self._started = time.perf_counter()
        self._proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    def wait(self) -> float:
        """Seconds from `start()` until curl exited; raises unless every answer was 200."""
        assert self._proc is not None, "start() first"
        assert self._proc.stdout is not None
        out = self._proc.stdout.read()
        # wait4 rather than wait: the child's own rusage, not the sum of every child so far.
        _, status, usage = os.wait4(self._proc.pid, 0)
        elapsed = time.perf_counter() - self._started
        self._proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
        self._proc.stdout.close()
        self.cpu_seconds = usage.ru_utime + usage.ru_stime
        codes = out.split()
        if self._proc.returncode != 0 or len(codes) != self.count or set(codes) != {"200"}:
            raise RuntimeError(f"curl floor failed: rc={self._proc.returncode}, {len(codes)} answers, "
                               f"codes {sorted(set(codes))}")
        return elapsed

    def __enter__(self) -> Curl:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        os.unlink(self._cfg)


class ApiFloor:
    """A bare client for the double: one PAT exchange, then plain POSTs on pooled connections."""

    def __init__(self, base_url: str, pat: str, concurrency: int) -> None:
        self.concurrency = concurrency
        self.http = httpx.Client(
            base_url=base_url,
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
            timeout=30,
        )
        app_id = self.http.get("/client-apps").json()["cli"]["appId"]
        form = {**TOKEN_EXCHANGE_FORM, "client_id": app_id, "subject_token": pat, "resource": base_url}
        resp = self.http.post("/oidc/token", data=form)
        resp.raise_for_status()
        self.http.headers["Authorization"] = f"Bearer {resp.json()['access_token']}"

    def create(self, org: str, body: dict[str, Any]) -> None:
        resp = self.http.post(CREATE_PATH.format(org=org), json=body)
        if resp.status_code != 201:
            raise RuntimeError(f"floor create answered {resp.status_code}")

    def close(self) -> None:
        self.http.close()


def httpx_posts(floor: ApiFloor, org: str, bodies: Sequence[dict[str, Any]]) -> float:
    """Seconds to send every create body with `floor.concurrency` threads (all must answer 201)."""
    items = iter(bodies)
    take = threading.Lock()

    def worker() -> None:
        while True:
            with take:
                body = next(items, None)
            if body is None:
                return
            floor.create(org, body)

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=floor.concurrency) as pool:
        for fut in [pool.submit(worker) for _ in range(floor.concurrency)]:
            fut.result()
    return time.perf_counter() - started


def three_calls(vault: httpx.Client, mount: str, path: str, floor: ApiFloor, org: str, body: dict[str, Any]) -> None:
    """Metadata GET, value GET, create POST: what any client must do to register one write."""
    meta = vault.get(f"{mount}/metadata/{path}")
    meta.raise_for_status()
    version = meta.json()["data"]["current_version"]
    value = vault.get(f"{mount}/data/{path}", params={"version": version})
    value.raise_for_status()
    data = value.json()["data"]["data"]
    floor.create(org, {**body, "accessToken": data["accessToken"], "dockerhubUsername": data["dockerhubUsername"]})
