"""Input files: NDJSON and CSV records with their line numbers."""

from __future__ import annotations

from pathlib import Path

from synthwatch.producers.readers import read_records
from synthwatch.schemas import parse_event_object


def test_ndjson_skips_blank_lines_and_numbers_lines(tmp_path: Path) -> None:
    path = tmp_path / "in.ndjson"
    path.write_bytes(b'{"a": 1}\n\n{"b": 2}\r\n\xff\xfe broken\n')
    records = list(read_records(str(path)))
    assert [r.source for r in records] == ["in.ndjson:1", "in.ndjson:3", "in.ndjson:4"]
    assert records[1].raw == '{"b": 2}'
    assert records[2].obj is None  # undecodable bytes are kept for the reject, not dropped


def test_csv_dotted_headers_nest_and_validate(tmp_path: Path) -> None:
    path = tmp_path / "seizures.csv"
    path.write_text(
        "event_id,kind,occurred_at,country,region,substance.name,agency,seizure_id,border_point,"
        "conveyance,quantity.value,quantity.unit,origin_country\n"
        "c-1,border_seizure,2026-03-01T10:00:00+00:00,MA,MA-TNG,Cocaine,ADII,T-1,Tanger Med,sea,12.5,kg,BR\n"
        'c-2,border_seizure,2026-03-01T11:00:00+00:00,MA,MA-TNG,"3-MMC, crystals",ADII,T-2,Tanger Med,sea,40,g,\n',
        encoding="utf-8",
    )
    records = list(read_records(str(path)))
    assert [r.source for r in records] == ["seizures.csv:2", "seizures.csv:3"]
    first = parse_event_object(records[0].obj or {})
    assert first.quantity.value == 12.5 and first.origin_country == "BR"  # type: ignore[union-attr]
    second = records[1].obj or {}
    assert second["substance"] == {"name": "3-MMC, crystals"} and "origin_country" not in second
