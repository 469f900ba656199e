"""`python -m bridge` is the same as the `cybedefend-bridge` console script."""

from __future__ import annotations

from bridge.cli import main

raise SystemExit(main())
