"""cybedefend-bridge: keeps DockerHub tokens held in Vault registered as CybeDefend credentials."""

from __future__ import annotations

__version__ = "0.1.0"
