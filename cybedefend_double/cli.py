"""`python -m cybedefend_double`: run the CybeDefend double standalone from a seed file.

The seed is JSON:

    {
      "organizations": [{"id": "<uuid>", "projects": ["<uuid>", ...]}],
      "pats": [{"file": "pat.txt", "permissions": {"<org uuid>": "manage"}}],
      "api_keys": [{"file": "key.txt", "permissions": {"<org uuid>": "read"}}],
      "api_keys_gone": true,
      "token_ttl_seconds": 600,
      "client_app_id": "cybedefend-cli-sim",
      "links_as_array": false
    }

PAT and API key values are read from the files named in the seed (relative to the seed's own
directory), never from the command line, so they do not show in `ps` or shell history.
Prints the base URL on stdout and serves until SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from cybedefend_double.simulator import Simulator


class SeedError(Exception):
    pass


def _secret_from(base: Path, entry: Any, what: str) -> tuple[str, dict[str, str]]:
    if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
        raise SeedError(f"each {what} entry needs a 'file' naming where its value is")
    path = Path(entry["file"])
    path = path if path.is_absolute() else base / path
    try:
        value = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise SeedError(f"cannot read the {what} file {path}: {exc.strerror}") from None
    permissions = entry.get("permissions", {})
    if not isinstance(permissions, dict):
        raise SeedError(f"{what} 'permissions' must map organization ids to manage or read")
    return value, {str(k): str(v) for k, v in permissions.items()}


def build(seed_path: Path) -> Simulator:
    """A configured, not yet started, simulator from the seed file."""
    try:
        seed = json.loads(seed_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SeedError(f"cannot read seed {seed_path}: {exc}") from None
    if not isinstance(seed, dict):
        raise SeedError("the seed must be a JSON object")
    sim = Simulator(
        token_ttl_seconds=int(seed.get("token_ttl_seconds", 600)),
        api_keys_gone=bool(seed.get("api_keys_gone", True)),
        links_as_array=bool(seed.get("links_as_array", False)),
        client_app_id=str(seed.get("client_app_id", "cybedefend-cli-sim")),
    )
    base = seed_path.parent
    try:
        for org in seed.get("organizations", []):
            sim.add_organization(str(org["id"]))
            for project in org.get("projects", []):
                sim.add_project(str(org["id"]), str(project))
        for entry in seed.get("pats", []):
            sim.add_pat(*_secret_from(base, entry, "PAT"))
        for entry in seed.get("api_keys", []):
            sim.add_api_key(*_secret_from(base, entry, "API key"))
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise SeedError(f"invalid seed: {type(exc).__name__}: {exc}") from None
    return sim


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cybedefend_double",
                                     description="Run the CybeDefend double.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8900)
    parser.add_argument("--seed", type=Path, help="JSON seed file (organizations, projects, PAT files)")
    args = parser.parse_args(argv)
    try:
        sim = build(args.seed) if args.seed is not None else Simulator()
    except SeedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        url = sim.start(args.host, args.port)
    except OSError as exc:
        print(f"error: cannot listen on {args.host}:{args.port}: {exc.strerror}", file=sys.stderr)
        return 1
    print(url, flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        sim.stop()
    return 0
