"""The CybeDefend double, the dev OpenBao launcher and the demo: tooling around the bridge, not the bridge.

A distribution of its own (cybedefend_double/pyproject.toml), installed beside the bridge from a
clone (`pip install -e . -e ./cybedefend_double`), never part of the product wheel or image
(docs/adr/0006-layout.md). It may import `bridge` (the demo wires a real bridge); `bridge`
never imports it (an import-linter contract in pyproject.toml).

- `simulator`   the double's state and its public face (`Simulator`, `Fault`)
- `api`         what each endpoint answers; `routes` the contract-driven routing and validation;
                `http_server` the HTTP/1.1 plumbing; `cli` the standalone command
- `openbao`     a local OpenBao dev server: start, wait, seed, stop
- `demo`        `cybedefend-bridge demo`
"""

from __future__ import annotations
