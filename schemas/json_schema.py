"""JSON Schema files for the wire contract, generated from the pydantic models (never by hand)."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel

from synthwatch.schemas.events import EVENT_ADAPTER, BorderSeizure, LabDetection
from synthwatch.schemas.records import Alert, Reject

#: Where the committed schema files live (beside this module, shipped in the wheel).
SCHEMA_DIR = Path(__file__).parent / "json"

_MODELS: dict[str, type[BaseModel]] = {
    "lab_detection": LabDetection,
    "border_seizure": BorderSeizure,
    "alert": Alert,
    "reject": Reject,
}


def render_schemas() -> dict[str, str]:
    """File name -> JSON text of every schema, deterministic so a stale file is detectable."""
    documents = {name: model.model_json_schema() for name, model in _MODELS.items()}
    documents["event"] = EVENT_ADAPTER.json_schema()
    rendered = {}
    for name, document in sorted(documents.items()):
        document = {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": name, **document}
        rendered[f"{name}.schema.json"] = json.dumps(document, indent=2, sort_keys=True) + "\n"
    return rendered


def export_schemas(out_dir: Path = SCHEMA_DIR) -> list[Path]:
    """Write every schema file into ``out_dir``; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in render_schemas().items():
        path = out_dir / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def stale_schemas(out_dir: Path = SCHEMA_DIR) -> list[str]:
    """Names of the schema files that are missing or differ from what the models generate."""
    return [
        name
        for name, text in render_schemas().items()
        if not (out_dir / name).is_file() or (out_dir / name).read_text(encoding="utf-8") != text
    ]
