"""The stored-data digest that before/after comparisons of ``ingest-history`` rely on."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from synthwatch.bench.ingest_digest import stored_digest
from synthwatch.settings import Settings
from synthwatch.stream_apps.storage.backfill.ingest import ingest_history
from synthwatch.stream_apps.storage.clickhouse import connect
from tests.support.factories import lab, seizure


def test_equal_loads_give_equal_digests_and_any_changed_value_shows(
    ch: Any, ch_settings: Settings, tmp_path: Path
) -> None:
    lines = [json.dumps(lab(event_id=f"l-{i}", purity_pct=10.0 + i)) for i in range(5)]
    lines += [json.dumps(seizure(event_id=f"s-{i}")) for i in range(5)]
    lines += ['{"kind": "lab_detection", "event_id": "broken', json.dumps(lab(event_id="l-0"))]
    path = tmp_path / "history.ndjson"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert ingest_history(ch_settings, path, progress=False, workers=0, client=ch).rejected == 1
    other = ch_settings.model_copy(update={"clickhouse_database": f"{ch_settings.clickhouse_database}_again"})
    again = connect(other)
    try:
        ingest_history(other, path, progress=False, workers=0, client=again)
        first, second = stored_digest(ch), stored_digest(again)
        assert first == second
        assert [first[t][0] for t in ("lab_detections", "border_seizures", "rejects")] == [5, 5, 1]
        # An aggregate row that adds nothing to its key's sums is no difference: sums are compared by key.
        again.command(
            "INSERT INTO reports_daily SELECT day, country, region, kind, family, substance_key, substance_name, "
            "0, 0 FROM reports_daily LIMIT 1"
        )
        assert stored_digest(again) == first
        again.command(
            "ALTER TABLE lab_detections UPDATE purity_pct = 99 WHERE event_id = 'l-3'", settings={"mutations_sync": 2}
        )
        changed = stored_digest(again)
        assert changed["lab_detections"] != first["lab_detections"]
        assert {t: v for t, v in changed.items() if t != "lab_detections"} == {
            t: v for t, v in first.items() if t != "lab_detections"
        }
    finally:
        again.command(f"DROP DATABASE IF EXISTS {other.clickhouse_database}")
        again.close()
