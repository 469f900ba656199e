"""Generates the reference tables of docs/configuration.md and docs/metrics.md from the code.

`python -m tests.gen_docs` rewrites the part between the BEGIN/END markers; test_docs.py fails
when the committed docs differ from what this generates, so a new setting or metric cannot
ship undocumented.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from bridge.config import Settings
from bridge.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- BEGIN GENERATED -->", "<!-- END GENERATED -->"


def _default(model: type[BaseModel], name: str) -> str:
    f = model.model_fields[name]
    if f.is_required():
        return "required"
    if f.default_factory is not None:
        value: Any = f.default_factory()  # type: ignore[call-arg]
        if isinstance(value, BaseModel):
            return "(section)"
        return f"`{json.dumps(value)}`"
    value = f.default
    if value is None:
        return "unset"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, float):
        value = round(value, 4)
    return f"`{value}`"


def _type(ann: Any) -> str:
    text = repr(ann)
    for junk in ("typing.", "pathlib.", "bridge.config.", "<class '", "'>"):
        text = text.replace(junk, "")
    return text.replace("|", "\\|")


def _sub_model(ann: Any) -> tuple[type[BaseModel], bool] | None:
    is_list = getattr(ann, "__origin__", None) is list
    for cand in [ann, *getattr(ann, "__args__", ())]:
        if isinstance(cand, type) and issubclass(cand, BaseModel):
            return cand, is_list
    return None


def config_rows(model: type[BaseModel] = Settings, prefix: str = "") -> list[tuple[str, str, str, str]]:
    rows: list[tuple[str, str, str, str]] = []
    for name, info in model.model_fields.items():
        key = prefix + name
        sub = _sub_model(info.annotation)
        desc = (info.description or "").replace("|", "\\|")
        if sub is not None:
            rows.append((key, "list of sections" if sub[1] else "section", _default(model, name), desc))
            rows.extend(config_rows(sub[0], key + ("[]." if sub[1] else ".")))
        else:
            rows.append((key, _type(info.annotation), _default(model, name), desc))
    return rows


def config_reference() -> str:
    out = ["| key | type | default | meaning |", "|---|---|---|---|"]
    out += [f"| `{k}` | {t} | {d} | {m} |" for k, t, d, m in config_rows()]
    return "\n".join(out)


def metrics_reference() -> str:
    out = ["| metric | type | labels | meaning |", "|---|---|---|---|"]
    metrics = Metrics()
    label_names = {
        getattr(obj, "_name", ""): tuple(getattr(obj, "_labelnames", ()))
        for obj in vars(metrics).values()
        if hasattr(obj, "_labelnames")
    }
    for mf in sorted(metrics.registry.collect(), key=lambda m: m.name):
        labels = label_names.get(mf.name, ())
        name = mf.name + ("_total" if mf.type == "counter" else "")
        out.append(f"| `{name}` | {mf.type} | {', '.join(labels) or '—'} | {mf.documentation} |")
    return "\n".join(out)


def splice(path: Path, body: str) -> str:
    text = path.read_text(encoding="utf-8")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{body}\n{END}{tail}"


TARGETS = {ROOT / "docs" / "configuration.md": config_reference, ROOT / "docs" / "metrics.md": metrics_reference}


def main() -> int:
    for path, make in TARGETS.items():
        path.write_text(splice(path, make()), encoding="utf-8")
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
