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

from synthwatch.dashboards import overview, pipeline, substance
from synthwatch.dashboards.clickhouse_query import PLUGIN_ID, PLUGIN_VERSION
from synthwatch.dashboards.panels import CLICKHOUSE_INPUT, PROMETHEUS_INPUT

#: The Grafana the dashboards are built and checked for: the one deploy/compose.yaml runs.
GRAFANA_VERSION = "12.4.5"

JSON_DIR = Path(__file__).resolve().parent / "json"

#: file stem -> builder of the dashboard.
DASHBOARDS: dict[str, Callable[[], dashboard.Dashboard]] = {
    "overview": overview.build,
    "substance": substance.build,
    "pipeline": pipeline.build,
}


def importable(board: dict[str, Any]) -> dict[str, Any]:
    """The dashboard with ``__inputs`` and ``__requires``, as Grafana's "export for sharing externally" writes it.

    Why: importing into an existing Grafana must ask which ClickHouse (and Prometheus) datasource to use;
    the import dialog fills ``${DS_...}`` placeholders from ``__inputs`` and checks ``__requires``.
    """
    text = json.dumps(board)
    used = [source for source in (CLICKHOUSE_INPUT, PROMETHEUS_INPUT) if f'"${{{source.variable}}}"' in text]
    requires = [{"type": "grafana", "id": "grafana", "name": "Grafana", "version": GRAFANA_VERSION}]
    requires += [
        {"type": "datasource", "id": s.plugin_id, "name": s.plugin_name, "version": PLUGIN_VERSION}
        for s in used
        if s.plugin_id == PLUGIN_ID
    ]
    requires += [{"type": "panel", "id": kind, "name": kind, "version": ""} for kind in _panel_types(board)]
    return {"__inputs": [s.inputs_entry() for s in used], "__requires": requires, **board}


def _panel_types(board: dict[str, Any]) -> list[str]:
    return sorted({str(panel["type"]) for panel in board.get("panels", [])})


def render(name: str) -> str:
    """The dashboard's JSON text, exactly as committed (2-space indent, trailing newline)."""
    board = json.loads(json.dumps(DASHBOARDS[name]().build(), cls=JSONEncoder))
    return json.dumps(importable(board), indent=2, ensure_ascii=False) + "\n"


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
