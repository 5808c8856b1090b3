"""Generating the committed dashboard JSON (``dashboards/json/*.json``) and noticing when it is stale.

Grafana provisions those files (``deploy/grafana/provisioning/dashboards/``); ``synthwatch dashboards
build`` rewrites them from the Python definitions, and a test fails when they differ, so what Grafana
shows is always what the code says.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import dashboard
from grafana_foundation_sdk.cog.encoder import JSONEncoder

from . import overview, pipeline, substance

JSON_DIR = Path(__file__).resolve().parent / "json"

#: file stem -> builder of the dashboard.
DASHBOARDS: dict[str, Callable[[], dashboard.Dashboard]] = {
    "overview": overview.build,
    "substance": substance.build,
    "pipeline": pipeline.build,
}


def render(name: str) -> str:
    """The dashboard's JSON text, exactly as committed (2-space indent, trailing newline)."""
    return json.dumps(DASHBOARDS[name]().build(), cls=JSONEncoder, indent=2, ensure_ascii=False) + "\n"


def as_dict(name: str) -> dict[str, Any]:
    return json.loads(render(name))


def write_all(out_dir: Path = JSON_DIR) -> list[Path]:
    """Write every dashboard; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name in DASHBOARDS:
        path = out_dir / f"{name}.json"
        path.write_text(render(name), encoding="utf-8")
        written.append(path)
    return written


def stale(out_dir: Path = JSON_DIR) -> list[str]:
    """Names of dashboards whose committed JSON is missing or differs from the code."""
    found = []
    for name in DASHBOARDS:
        path = out_dir / f"{name}.json"
        if not path.is_file() or path.read_text(encoding="utf-8") != render(name):
            found.append(name)
    extra = {p.stem for p in out_dir.glob("*.json")} - set(DASHBOARDS) if out_dir.is_dir() else set()
    return found + sorted(extra)
