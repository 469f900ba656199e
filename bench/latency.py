"""Benchmark 3: write-to-registered latency through the audit-stream trigger.

A second OpenBao, with a file audit device, holds `secrets` tagged secrets that the daemon
(`python -m bridge run`, with `triggers.audit_file` following that log: tailer -> matcher ->
debounced queue -> targeted pass) has registered in its first pass.
The bench rewrites them round-robin at random spacing; each latency runs from the moment the
Vault write returned to the moment the double received the create POST carrying the new token
(both stamped with `time.time()` in this process: one clock). The floor: the same writes to
other secrets, each followed at once by the three calls any client needs (metadata GET, value
GET, create POST) on warm connections, timed to the floor double's own record of the POST.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.daemon_proc import DaemonProcess
from bench.floors import ApiFloor, three_calls
from bench.rig import API_CONCURRENCY, PAT, Lab, name, new_simulator
from bench.stats import percentile
from cybedefend_double.simulator import Simulator
from tests.support.data import ORG, PROJECTS

LAT, FLOOR = "lat", "latfloor"


@dataclass
class LatencyResult:
    writes: int
    tracked: int
    poll_seconds: float
    debounce_seconds: float
    spacing: tuple[float, float]
    bridge_s: list[float] = field(default_factory=list)
    floor_s: list[float] = field(default_factory=list)
    missing: int = 0

    def p(self, side: str, q: float) -> float:
        return percentile(self.bridge_s if side == "bridge" else self.floor_s, q)


def _arrivals(sim: Simulator, written: dict[str, float]) -> list[float]:
    out = []
    for rec in sim.requests:
        digest = (rec.body or {}).get("accessToken_sha256")
        if rec.endpoint == "create" and rec.status == 201 and digest in written:
            out.append(rec.at - written[digest])
    return out


def run_latency(workdir: Path, writes: int, *, secrets: int = 1000, poll_seconds: float = 0.2, debounce_seconds: float = 0.25,
                spacing: tuple[float, float] = (0.05, 0.5), seed: int = 11) -> LatencyResult:
    rng = random.Random(seed)
    out = LatencyResult(writes, secrets, poll_seconds, debounce_seconds, spacing)
    tag = f"lat-{poll_seconds}-{debounce_seconds}"
    lab_dir = workdir / tag
    lab_dir.mkdir(parents=True, exist_ok=True)
    with Lab(lab_dir, audit=True) as lab:
        lab.seed(secrets, LAT)
        lab.seed(writes, FLOOR)
        sim = new_simulator()
        try:
            assert lab.audit_log is not None
            raw = lab.raw_settings(sim.url, tag, LAT, triggers={
                "audit_file": {"path": str(lab.audit_log), "poll_seconds": poll_seconds}, "debounce_seconds": debounce_seconds})
            with DaemonProcess(raw, lab_dir, tag):
                written: dict[str, float] = {}
                for w in range(writes):
                    time.sleep(rng.uniform(*spacing))
                    # Round-robin: a secret is written again only long after its last write was
                    # synced, so every write has its own create to wait for.
                    digest = lab.write(w % secrets, LAT, tag=False)
                    written[digest] = time.time()
                deadline = time.monotonic() + 15
                while len(_arrivals(sim, written)) < writes and time.monotonic() < deadline:
                    time.sleep(0.1)
            out.bridge_s = _arrivals(sim, written)
            out.missing = writes - len(out.bridge_s)
        finally:
            sim.stop()
        out.floor_s = _floor(lab, writes)
    return out


def _floor(lab: Lab, writes: int) -> list[float]:
    sim = new_simulator()
    floor = ApiFloor(sim.url, PAT, API_CONCURRENCY)
    try:
        written: dict[str, float] = {}
        for i in range(writes):
            digest = lab.write(i, FLOOR, tag=False)
            written[digest] = time.time()
            body = {"projectId": PROJECTS[i % len(PROJECTS)], "description": f"[cybedefend-bridge:floor:{i:012x}:v2]",
                    "dockerhubUsername": f"u-{name(i)}"}
            three_calls(lab.http, lab.mount, lab.path(i, FLOOR), floor, ORG, body)
        return _arrivals(sim, written)
    finally:
        floor.close()
        sim.stop()
