"""`python -m bench.trigger_worker CONFIG`: the bridge's audit-stream path, wired as the daemon does.

Used by benchmark 3 while `bridge.app.run_daemon` does not exist: the built Bridge, a
`bridge.audit.AuditFileTailer` following the file audit device, `bridge.triggers.AuditMatcher`
and `TriggerQueue` (debounce from the config), and one worker thread running each
`PassRequest` the queue hands out through `SyncEngine.run`, like the daemon's worker. A first
full pass registers what exists. Prints {"ready": true, "pid": ...}; on `quit` it stops.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path

from bridge.app import build
from bridge.audit import AuditFileTailer
from bridge.config import load_settings
from bridge.logs import configure
from bridge.metrics import Metrics
from bridge.ports import PassRequest
from bridge.triggers import AuditMatcher, TriggerQueue, line_handler


def main(config: Path) -> int:
    settings = load_settings(config, env={})
    configure(settings.logging.level, settings.logging.format, stream=sys.stderr)
    audit = settings.triggers.audit_file
    if audit is None:
        print("triggers.audit_file must be set", file=sys.stderr)
        return 2
    metrics = Metrics()
    bridge = build(settings, metrics=metrics)
    stop = threading.Event()
    queue = TriggerQueue(settings.triggers.debounce_seconds, settings.triggers.queue_size, metrics)
    try:
        first = bridge.engine.run(PassRequest(trigger="startup"))
        kv = {s.mount: bridge.vault.kv_version(s.mount) for s in settings.sources}
        matcher = AuditMatcher(settings.sources, kv, namespace=settings.vault.namespace,
                               exclude=[f"{settings.state_mount}/{settings.state_path}"])
        tailer = AuditFileTailer(audit.path, line_handler(matcher, queue, "audit_file"),
                                 poll_seconds=audit.poll_seconds, stop=stop)
        tailer.start()

        def work() -> None:
            while not stop.is_set():
                request = queue.take(0.5)
                if request is not None:
                    bridge.engine.run(request)

        worker = threading.Thread(target=work, name="bench-sync-worker", daemon=True)
        worker.start()
        sys.stdout.write(json.dumps({"ready": True, "pid": os.getpid(), "first_pass": dict(first.counts)}) + "\n")
        sys.stdout.flush()
        for line in sys.stdin:
            if line.strip() == "quit":
                break
        stop.set()
        queue.close()
        worker.join(30)
        tailer.join(5)
        tailer.close()
    finally:
        stop.set()
        bridge.close(revoke=False)
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(main(Path(sys.argv[1])))
