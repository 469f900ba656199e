"""Benchmarks 1, 4 and 5: steady passes at growing N against the curl floor, k changed among N,
and the resources of the bridge process that tracked them all.

One bridge process (`bench.worker`) follows the mount as it grows: at each size it first
registers the new secrets, then alternates a steady pass with the curl floor `repeats` times
(alternating, so drifting machine load hits both sides alike).
"""

from __future__ import annotations

import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.daemon_proc import DaemonProcess
from bench.floors import curl_fetch_cpu
from bench.memory import HVAC_IMPORTS, OneShot, bare_python_kib, import_floor_kib, oneshot_peak_kib
from bench.procs import BridgeProcess, proc_cpu_seconds, sync_once
from bench.rig import Lab, new_simulator
from bench.runtime_env import RuntimeEnv, runtime_env
from bench.stats import median
from cybedefend_double.simulator import Simulator

LISTING = ("scan", "list")
EMPTY_PREFIX = "empty"  # a source prefix no secret is ever written under: the empty pass
AUTH_ENDPOINTS = ("client_apps", "token_exchange")
RESOURCES_N = 10_000  # targets 4: the daemon with 10,000 tracked, the process that registers them


@dataclass
class SizeResult:
    n: int
    pass_s: list[float] = field(default_factory=list)
    curl_s: list[float] = field(default_factory=list)
    vault_requests: dict[str, int] = field(default_factory=dict)  # of the last steady pass
    api_requests: int = 0  # CybeDefend requests during the steady passes, auth excluded
    k: int = 0
    k_vault_requests: dict[str, int] = field(default_factory=dict)
    k_api: dict[str, int] = field(default_factory=dict)
    k_counts: dict[str, int] = field(default_factory=dict)
    targeted_vault_requests: dict[str, int] = field(default_factory=dict)  # one targeted pass after one write
    daemon_peak_rss_kib: int = 0  # a daemon started on this ledger: VmHWM after its start-up pass over n
    # Target 2 (issue 14): marginal and whole-process ratios, CPU beside wall time. Empty when
    # measure_size ran without an empty bridge (the smoke test).
    pass_cpu_s: list[float] = field(default_factory=list)  # user + sys of the bridge process during its pass
    curl_cpu_s: list[float] = field(default_factory=list)
    bao_pass_cpu_s: list[float] = field(default_factory=list)  # OpenBao's CPU while it served the bridge's pass
    bao_curl_cpu_s: list[float] = field(default_factory=list)  # ... and while it served curl
    empty_s: list[float] = field(default_factory=list)  # a pass of the same worker code over a source with no secret
    curl1_s: list[float] = field(default_factory=list)  # curl over one document: its start, connection, one GET
    whole_s: list[float] = field(default_factory=list)  # a whole `python -m bridge sync --once` process
    whole_cpu_s: list[float] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return median(self.pass_s) / median(self.curl_s)

    @property
    def marginal(self) -> float:
        """(pass - empty pass) / (curl over N - curl over one): what each side pays per secret."""
        return (median(self.pass_s) - median(self.empty_s)) / (median(self.curl_s) - median(self.curl1_s))

    @property
    def whole_ratio(self) -> float:
        return median(self.whole_s) / median(self.curl_s)

    def per_1k(self, values: list[float]) -> float:
        return median(values) / self.n * 1000

    @property
    def listing(self) -> int:
        return sum(self.vault_requests.get(k, 0) for k in LISTING)

    @property
    def total_vault(self) -> int:
        return sum(self.vault_requests.values())


@dataclass
class Resources:
    n: int
    peak_rss_kib: int
    rss_after_idle_kib: int
    idle_seconds: float
    idle_cpu_seconds: float
    worker_peak_rss_kib: int  # the bench worker that registered all n from scratch, then passed over them
    status_bytes: int = 0  # one GET /v1/status after idling: its size...
    peak_after_status_kib: int = 0  # ...and the daemon's VmHWM after it
    oneshot: OneShot | None = None  # `sync --once` registering n new tokens, its own process
    floor_kib: int = 0  # python + the third-party libraries, nothing of the bridge (bench.memory)
    bare_python_kib: int = 0
    floor_with_hvac_kib: int = 0  # the floor plus hvac/requests (shipped, off the daemon's routine paths)
    environment: str = ""  # which interpreter and libraries the memory figures were measured in (bench.runtime_env)


def _api_counts(sim: Simulator) -> Counter[str]:
    return Counter(r.endpoint for r in sim.requests if r.endpoint not in AUTH_ENDPOINTS)


def _bao_cpu(lab: Lab) -> float:
    return proc_cpu_seconds(lab.bao.pid) if lab.bao.pid is not None else 0.0


def measure_size(lab: Lab, sim: Simulator, bridge: BridgeProcess, n: int, repeats: int, k: int, rng: random.Random,
                 empty: BridgeProcess | None = None, python: str = sys.executable) -> SizeResult:
    """`empty`: a bridge over a source with no secret; given, the marginal and whole-process
    figures are measured too (each repeat alternates curl, curl over one, the pass, the empty
    pass and a whole `sync --once` process, run by `python`)."""
    lab.seed(n)
    bridge.full_pass()  # registers what was just seeded
    bridge.full_pass()  # warms caches and connections as a long-running daemon has them
    out = SizeResult(n)
    urls = lab.metadata_urls(n)
    sim.reset_requests()
    for _ in range(repeats):
        bao = _bao_cpu(lab)
        wall, cpu = curl_fetch_cpu(urls, lab.bao.root_token)
        out.bao_curl_cpu_s.append(_bao_cpu(lab) - bao)
        out.curl_s.append(wall)
        out.curl_cpu_s.append(cpu)
        if empty is not None:
            out.curl1_s.append(curl_fetch_cpu(urls[:1], lab.bao.root_token)[0])
        bao = _bao_cpu(lab)
        doc = bridge.full_pass()
        out.bao_pass_cpu_s.append(_bao_cpu(lab) - bao)
        out.pass_s.append(float(doc["seconds"]))
        out.pass_cpu_s.append(float(doc["cpu_seconds"]))
        if empty is not None:
            out.empty_s.append(float(empty.full_pass()["seconds"]))
            wall, cpu = sync_once(bridge.config, lab.workdir, python)
            out.whole_s.append(wall)
            out.whole_cpu_s.append(cpu)
        out.vault_requests = dict(doc["vault_requests"])
        if doc["counts"]["skipped"] != n:
            raise RuntimeError(f"a steady pass over {n} did not skip them all: {doc['counts']}")
    out.api_requests = sum(_api_counts(sim).values())
    # k rotated tokens among n: the pass must cost n metadata reads plus O(k), never O(n).
    out.k = k
    lab.rotate(rng.sample(range(n), k))
    sim.reset_requests()
    doc = bridge.full_pass()
    out.k_vault_requests = dict(doc["vault_requests"])
    out.k_counts = {name: c for name, c in doc["counts"].items() if c and name != "skipped"}
    out.k_api = dict(_api_counts(sim))
    # What one write heard by a trigger costs Vault: a targeted pass over the rewritten secret.
    one = rng.randrange(n)
    lab.rotate([one])
    doc = bridge.targeted([lab.key(one)])
    out.targeted_vault_requests = dict(doc["vault_requests"])
    if doc["counts"].get("rotated") != 1:
        raise RuntimeError(f"a targeted pass after one write did not rotate it: {doc['counts']}")
    return out


def daemon_peak(raw: dict[str, Any], workdir: Path, n: int, python: str) -> int:
    """VmHWM (KiB) of a daemon started on the ledger of n registered secrets, after its start-up pass."""
    with DaemonProcess(raw, workdir, f"peak-{n}", python=python) as daemon:
        return daemon.status_kib()["VmHWM"]


def measure_daemon(raw: dict[str, Any], workdir: Path, n: int, idle_seconds: float, worker_peak_kib: int,
                   python: str) -> Resources:
    """The daemon on the ledger the worker filled: its start-up pass over n, then idle, then one status."""
    with DaemonProcess(raw, workdir, "resources", python=python) as daemon:
        time.sleep(1.0)  # let the pass's threads wind down and the scheduler settle into its wait
        before = daemon.cpu_seconds()
        time.sleep(idle_seconds)
        used = daemon.cpu_seconds() - before
        status = daemon.status_kib()
        size = daemon.status_once()
        after = daemon.status_kib()["VmHWM"]
    return Resources(n=n, peak_rss_kib=status["VmHWM"], rss_after_idle_kib=status["VmRSS"], idle_seconds=idle_seconds,
                     idle_cpu_seconds=used, worker_peak_rss_kib=worker_peak_kib, status_bytes=size,
                     peak_after_status_kib=after)


def resources_n(sizes: list[int]) -> int:
    """The N of the resource targets (10,000 tracked), or the largest N of a smaller run."""
    return RESOURCES_N if RESOURCES_N in sizes else max(sizes)


def run_steady(lab: Lab, sim: Simulator, workdir: Path, sizes: list[int], repeats: int, k: int,
               idle_seconds: float, seed: int = 7, env: RuntimeEnv | None = None) -> tuple[list[SizeResult], Resources]:
    """`env`: where the memory figures are measured (default: the runtime-only virtualenv of
    `bench.runtime_env`, or this interpreter when it cannot be built). The pass timings always
    run in this interpreter (`bench.worker`)."""
    env = env or runtime_env()
    rng = random.Random(seed)
    raw: dict[str, Any] = lab.raw_settings(sim.url, "steady")
    target = resources_n(sizes)
    results: list[SizeResult] = []
    resources: Resources | None = None
    oneshot: OneShot | None = None
    with BridgeProcess(raw, workdir, "steady") as bridge, \
            BridgeProcess(lab.raw_settings(sim.url, "steady-empty", EMPTY_PREFIX), workdir, "steady-empty") as empty:
        for n in sorted(sizes):
            result = measure_size(lab, sim, bridge, n, repeats, k, rng, empty, env.python)
            # The memory slope: a daemon on the ledger of exactly n, its peak after the start-up pass.
            result.daemon_peak_rss_kib = daemon_peak(raw, workdir, n, env.python)
            results.append(result)
            if n == target:
                # While Vault holds exactly n: the resource targets are measured at this N.
                worker_peak = int(bridge.ask("resources")["vm_hwm_kib"])
                resources = measure_daemon(raw, workdir, n, idle_seconds, worker_peak, env.python)
                fresh = new_simulator()
                try:
                    oneshot = oneshot_peak_kib(lab.raw_settings(fresh.url, f"oneshot-{n}"), workdir, n, env.python)
                finally:
                    fresh.stop()
    assert resources is not None
    resources.oneshot = oneshot
    resources.floor_kib = import_floor_kib(env.python)
    resources.floor_with_hvac_kib = import_floor_kib(env.python, HVAC_IMPORTS)
    resources.bare_python_kib = bare_python_kib(env.python)
    resources.environment = env.label
    return results, resources
