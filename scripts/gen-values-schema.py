#!/usr/bin/env python3
"""Writes the `config` part of the Helm chart's values.schema.json from bridge/config.py.

The chart renders `values.config` into the bridge's config.yaml, so the chart's schema for it is
the bridge's own settings schema (pydantic's JSON schema, unknown keys forbidden), minus the
annotations Helm does not need. The hand-written rest of values.schema.json is left as it is.
Usage: python3 scripts/gen-values-schema.py [--check]   (--check: exit 1 if the file is stale)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = ROOT / "helm" / "cybedefend-bridge" / "values.schema.json"
PREFIX = "config."

sys.path.insert(0, str(ROOT))
from bridge.config import Settings  # noqa: E402  (needs the path set just above)


def _clean(node: Any) -> Any:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            # Titles repeat the key; defaults are annotations Helm would not apply (the bridge does);
            # "path" is not a JSON Schema format.
            if key in ("title", "default") or (key == "format" and value == "path"):
                continue
            if key == "$ref" and isinstance(value, str) and value.startswith("#/$defs/"):
                value = "#/definitions/" + PREFIX + value.removeprefix("#/$defs/")
            out[key] = _clean(value)
        return out
    if isinstance(node, list):
        return [_clean(v) for v in node]
    return node


def config_definitions() -> dict[str, Any]:
    raw = Settings.model_json_schema()
    defs = raw.pop("$defs", {})
    top = _clean(raw)
    top["description"] = "The bridge's config.yaml (docs/configuration.md); generated from bridge/config.py."
    out: dict[str, Any] = {"config": top}
    for name, sub in sorted(defs.items()):
        out[PREFIX + name] = _clean(sub)
    return out


def render() -> str:
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    kept = {k: v for k, v in schema.get("definitions", {}).items() if k != "config" and not k.startswith(PREFIX)}
    schema["definitions"] = {**kept, **config_definitions()}
    return json.dumps(schema, indent=2) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if SCHEMA.read_text(encoding="utf-8") != text:
            print(f"{SCHEMA.relative_to(ROOT)} is stale: run python3 scripts/gen-values-schema.py", file=sys.stderr)
            return 1
        return 0
    SCHEMA.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
