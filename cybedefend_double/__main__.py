"""`python -m cybedefend_double`: run the CybeDefend double standalone from a seed file."""

from __future__ import annotations

from cybedefend_double.cli import main

raise SystemExit(main())
