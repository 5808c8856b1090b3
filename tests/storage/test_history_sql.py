"""The engine's fast path accepts only what parse_event accepts, with the same values (real embedded engine).

Thousands of generated lines, each a valid report with one or two fields or spellings changed (values
at every edge of the contract, lax spellings pydantic normalises, JSON oddities), are parsed by the
engine with :func:`synthwatch.stream_apps.storage.backfill.sql.parse_select`. Every line it accepts must be one
``parse_event`` accepts, with equal stored values; and it must accept most plain valid lines.
"""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from synthwatch.schemas import WireError, parse_event
from synthwatch.schemas.events import BorderSeizure, LabDetection
from synthwatch.stream_apps.storage.backfill.sql import PARSE_SETTINGS, PARSED_STRUCTURE, parse_select
from synthwatch.stream_apps.storage.tables import extra_text, lab_values, seizure_values
from tests.support.factories import lab, seizure

_TEXTS = ["x", " x", "x ", "\u00a0x", "x\u2003", "x\u0085", "\u3000x", "x\x1f", "a  b", "", " ", "é" * 500, "é" * 501]
_TEXTS += ["a\u2028b", "a\u2029b"]  # the line and paragraph separators, refused as control characters are
_TEXTS += ["Gao 🚧 «nord»", 'quote " in', "back\\slash", "tab\tin", 5, 1.5, True, None, {"a": 1}, ["x"]]
_TIMES = [
    "2026-03-01T10:00:00Z",
    "2026-03-01T10:00:00+00:00",
    "2026-03-01T10:00:00-00:00",
    "2026-03-01T10:00:00.5+05:30",
    "2026-03-01T10:00:00.123456-23:59",
    "2026-03-01T10:00:00.1234567Z",
    "2026-03-01T10:00:00+24:00",
    "2026-03-01T10:00:00+14:60",
    "2026-02-29T10:00:00Z",
    "2024-02-29T23:59:59.999999+01:00",
    "2026-03-01T24:00:00Z",
    "2026-03-01T10:00:60Z",
    "2026-03-01t10:00:00z",
    "2026-03-01 10:00:00Z",
    "2026-03-01T10:00:00",
    "2026-03-01T10:00Z",
    "1989-12-31T23:59:59Z",
    "1990-01-01T00:30:00+01:00",
    "2099-12-31T23:59:59-01:00",
    "2100-01-01T00:00:00Z",
    "+2026-03-01T10:00:00Z",
    1772359200,
    None,
]
_CODES = ["ML", "ml", " ML", "XX", "FR", "", 5, None]
_REGIONS = ["ML-BKO", "ml-bko", "ML-BKO ", "FR-75C", "ML-ZZZ", "", None]
_NUMBERS: list[Any] = [0, -0.0, 0.1, 50, 100, 100.0001, -1, 1e9, 1e9 + 1, 1e-300, 0.1 + 0.2, "12.5", True, None, 10**30]
_UNITS = ["g", "kg", "mg", "ml", "l", "tablets", "units", "blotters", "G", " g", "grams", "", None]
_INCHIKEYS = ["YQEZNSILZQQKAE-UHFFFAOYSA-N", "yqeznsilzqqkae-uhfffaoysa-n", " YQEZNSILZQQKAE-UHFFFAOYSA-N", "ABC", None]
_CAS = ["6740-88-1", "6740-88-2", " 6740-88-1", "6740881", "50-00-0", None, 5]


def _mutated(rng: random.Random, n: int) -> str:
    """A valid lab or seizure record with one to three changes; the JSON text itself sometimes changed."""
    record: dict[str, Any] = (lab if rng.random() < 0.5 else seizure)(event_id=f"g-{n}")
    lab_kind = record["kind"] == "lab_detection"
    for _ in range(rng.randint(0, 3)):
        substance = record["substance"] if isinstance(record.get("substance"), dict) else {}
        quantity = record["quantity"] if isinstance(record.get("quantity"), dict) else {}
        field = rng.choice(
            ["event_id", "occurred_at", "reported_at", "country", "region", "name", "smiles", "inchikey", "cas"]
            + (["lab_id", "method", "sample_type", "confirmed", "purity_pct"] if lab_kind else [])
            + ([] if lab_kind else ["agency", "border_point", "conveyance", "value", "unit", "origin_country"])
            + ["extra", "drop", "kind"]
        )
        if field in ("occurred_at", "reported_at"):
            record[field] = rng.choice(_TIMES)
        elif field in ("country", "origin_country"):
            record[field] = rng.choice(_CODES)
        elif field == "region":
            record[field] = rng.choice(_REGIONS)
        elif field in ("name", "smiles"):
            substance[field] = rng.choice([*_TEXTS, "CCO", " CCO", "c1ccccc1"])
        elif field == "inchikey":
            substance["inchikey"] = rng.choice(_INCHIKEYS)
        elif field == "cas":
            substance["cas"] = rng.choice(_CAS)
        elif field == "confirmed":
            record[field] = rng.choice([True, False, "yes", 1, 0, None, "true"])
        elif field == "purity_pct":
            record[field] = rng.choice(_NUMBERS)
        elif field == "value":
            quantity["value"] = rng.choice(_NUMBERS)
        elif field == "unit":
            quantity["unit"] = rng.choice(_UNITS)
        elif field in ("sample_type", "conveyance"):
            record[field] = rng.choice(["seized_material", "air", "sea", "AIR", " air", "other", "bogus", None])
        elif field == "extra":
            target = rng.choice([record, substance, quantity])
            target[rng.choice(["lot", "name", "note"])] = rng.choice(_TEXTS)
        elif field == "drop":
            record.pop(rng.choice(list(record)), None)
        elif field == "kind":
            record["kind"] = rng.choice(["lab_detection", "border_seizure", "LAB_DETECTION", "other", None])
        else:
            record[field] = rng.choice(_TEXTS)
    text = json.dumps(record, ensure_ascii=rng.random() < 0.3, separators=rng.choice([(",", ":"), (", ", ": ")]))
    roll = rng.random()
    if roll < 0.03:
        text = text.replace('"lab_id":', '"lab_id": "DUP", "lab_id":', 1).replace('"agency":', '"agency":1,"agency":')
    elif roll < 0.05:
        text = text[: rng.randrange(len(text))]  # cut
    elif roll < 0.07:
        text = text + " x"
    elif roll < 0.09:
        text = " \t" + text + " "
    elif roll < 0.10:
        text = text.replace('"', "'", 2)
    return text


def _hand_written() -> list[str]:
    """Lines aimed at what a single regex over the raw text could miss."""
    plain = json.dumps(lab(event_id="h-0"))
    seizure_plain = json.dumps(seizure(event_id="h-s"))
    return [
        plain,
        plain.replace('"lab_id": "LAB-FR-01"', '"lab_\\u0069d": 5'),  # an escaped key with a number
        plain.replace('"lab_id": "LAB-FR-01"', '"lab_\\u0069d": "LAB-FR-01"'),
        plain.replace('"event_id": "h-0"', '"event_id": "h-\\u00e9"'),  # an escape in a value
        plain.replace('"event_id": "h-0"', '"event_id": "h-\\ud800"'),  # a lone surrogate
        plain.replace('"GC-MS"', '"GC-MS\\""'),
        plain + " {}",
        "[" + plain + "]",
        plain.replace('"method": "GC-MS"', '"method": {"name": "GC-MS"}'),
        plain.replace('"method": "GC-MS"', '"method": ["GC-MS"]'),
        plain.replace('"purity_pct": 71.5', '"purity_pct": 7.15e1'),
        plain.replace('"purity_pct": 71.5', '"purity_pct": 100000000000000000000000'),
        plain.replace('"purity_pct": 71.5', '"purity_pct": 1e-400'),
        plain.replace('"purity_pct": 71.5', '"purity_pct": -0'),
        plain.replace('"occurred_at": "', '"note": "\\"occurred_at\\": 5", "occurred_at": "'),
        "\ufeff" + plain,  # a byte order mark: simdjson skips it, jiter refuses the line
        # member counts instead of key lists: a key one level off, repeated, unknown, or null
        plain.replace('"smiles": "CNC(C)C(=O)c1cccc(C)c1.Cl"}', '"name": "3-MMC"}, "smiles": "CCO"'),
        plain.replace('"smiles": "CNC(C)C(=O)c1cccc(C)c1.Cl"}', '"smiles": "CCO", "smiles": "CCC"}'),
        plain.replace('{"name": "3-MMC", ', '{"name": "3-MMC", "name": "4-MMC", '),
        plain.replace('"smiles": "CNC(C)C(=O)c1cccc(C)c1.Cl"}', '"smiles": null}'),
        plain.replace('"purity_pct": 71.5', '"purity_pct": null'),
        plain.replace('"purity_pct": 71.5', '"purity_pct": 71.5, "reported_at": null'),
        plain.replace('"purity_pct": 71.5', '"purity_pct": 71.5, "confirmed": true, "confirmed": false'),
        plain.replace('"purity_pct": 71.5', '"purity_pct": 71.5, "lot": "A"'),
        plain.replace('"purity_pct": 71.5', '"purity_pct": 71.5, "substance": {"name": "x"}'),
        seizure_plain,
        seizure_plain.replace('"unit": "kg"}', '"unit": "kg", "unit": "g"}'),
        seizure_plain.replace('"unit": "kg"}', '"unit": "kg", "note": "x"}'),
        seizure_plain.replace('{"value": 2.5, "unit": "kg"}', '{"unit": "kg"}'),
        seizure_plain.replace('"conveyance": "air"', '"conveyance": "air", "origin_country": null'),
        seizure_plain.replace('"conveyance": "air"', '"conveyance": "air", "purity_pct": 5'),
        # one count of '":' over the raw line for all three objects: an unknown key spelt with white space
        # before its colon in place of a known one (unseen by that count), '":' inside a value (seen), a
        # key ending in an escaped backslash, a known key with white space before its colon
        plain.replace('"purity_pct": 71.5', '"lot" : 71.5'),
        plain.replace('"purity_pct": 71.5', '"lot"\t:71.5'),
        plain.replace('"purity_pct": 71.5', '"lot\\\\": 71.5'),
        plain.replace('"smiles": "CNC(C)C(=O)c1cccc(C)c1.Cl"}', '"lot" : "CCO"}'),
        plain.replace('"GC-MS"', '"GC\\":MS"'),
        plain.replace('"lab_id": "LAB-FR-01"', '"lab_id" : "LAB-FR-01"'),
        seizure_plain.replace('{"value": 2.5, "unit": "kg"}', '{"value": 2.5, "unit": "kg", "lot" : 1}'),
        # ASCII spaces around a substance name are stripped by the engine too; any other white space left at
        # an edge after that sends the line to Python; the length counts after the strip
        plain.replace('{"name": "3-MMC"', '{"name": "  3-MMC  "'),
        plain.replace('{"name": "3-MMC"', '{"name": " \\u00a03-MMC "'),
        plain.replace('{"name": "3-MMC"', '{"name": "3-MMC \\t "'),
        plain.replace('{"name": "3-MMC"', '{"name": "   "'),
        plain.replace('{"name": "3-MMC"', '{"name": "' + " " * 3 + "é" * 500 + " " * 3 + '"'),
        plain.replace('{"name": "3-MMC"', '{"name": "' + " " + "é" * 501 + " " + '"'),
        # numbers only a correctly rounding parser reads as jiter does (rapidjson, the engine's other
        # JSON parser, is off by an ulp on these), and invalid UTF-8 only a validating one refuses
        plain.replace('"purity_pct": 71.5', '"purity_pct": 12.345678901234567890'),
        plain.replace('"purity_pct": 71.5', '"purity_pct": 3.3333333333333333333333333333333333333'),
        plain.replace('"purity_pct": 71.5', '"purity_pct": 99.999999999999992894572642398999'),
        plain.replace('"event_id": "h-0"', '"event_id": "h-\\udfff"'),
    ]


def _values(event: LabDetection | BorderSeizure) -> tuple[Any, ...]:
    """What the fast path stores for an event: the sink's own row values (``lab_values`` /
    ``seizure_values``) in the parsed table's layout (times to the ms in UTC, '' for no SMILES/InChIKey,
    without the resolved substance, ``extra`` and the converted quantities, which come later)."""

    def ms(value: datetime | None) -> datetime | None:
        if value is None:
            return None
        value = value.astimezone(UTC)
        return value.replace(microsecond=value.microsecond // 1000 * 1000, tzinfo=None)

    unresolved = ("", "", None, "")
    if isinstance(event, LabDetection):
        row, rest = lab_values(event, unresolved), slice(14, None)
    else:
        row, rest = seizure_values(event, unresolved, (None, None, None)), slice(14, 20)
    common = (event.kind, row[0], ms(row[1]), ms(row[2]), *row[3:6], row[6] or "", row[7] or "", row[8])
    places = () if isinstance(event, LabDetection) else row[23:25]  # after grams, millilitres, units
    return (*common, *row[rest], *places)


@pytest.mark.parametrize("user_settings", [{}, {"allow_simdjson": 0}], ids=["defaults", "no-simdjson"])
def test_engine_accepts_only_what_parse_event_accepts_with_the_same_values(
    ch: Any, tmp_path: Path, user_settings: dict[str, Any]
) -> None:
    """Whatever the session's own settings: the parse query pins the ones its rule depends on."""
    rng = random.Random(20261123)
    lines = [_mutated(rng, n) for n in range(4000)] + _hand_written()
    path = tmp_path / "generated.ndjson"
    bad_utf8 = json.dumps(lab(event_id="h-bytes")).encode().replace(b"GC-MS", b"GC-MS\xff")
    overlong = json.dumps(lab(event_id="h-overlong")).encode().replace(b"GC-MS", b"GC\xc0\xafMS")
    path.write_bytes(("\n".join(lines) + "\n").encode() + bad_utf8 + b"\n" + overlong + b"\n")
    lines += [bad_utf8, overlong]  # type: ignore[list-item]  # parse_event takes bytes too
    ch.command(f"CREATE TABLE parsed ({PARSED_STRUCTURE}) ENGINE = Memory")
    source = f"SELECT _row_number + 1 AS n, line FROM file('{path}', 'LineAsString', 'line String')"
    ch.command(f"INSERT INTO parsed {parse_select(source)}", settings={**user_settings, **PARSE_SETTINGS})
    common = "kind, event_id, occurred_at, reported_at, country, region, name, smiles, inchikey, cas"
    lab_columns = f"{common}, lab_id, sample_id, sample_type, method, confirmed, purity_pct"
    seizure_columns = f"{common}, agency, seizure_id, border_point, conveyance, quantity_value, quantity_unit"
    seizure_columns += ", origin_country, destination_country"
    accepted: dict[int, tuple[Any, ...]] = {}
    for kind, columns in (("lab_detection", lab_columns), ("border_seizure", seizure_columns)):
        rows = ch.query(f"SELECT n, {columns} FROM parsed WHERE ok = 1 AND kind = '{kind}'").result_rows
        accepted.update({row[0]: tuple(row[1:]) for row in rows})
    valid = 0
    for number, line in enumerate(lines, start=1):
        try:
            event = parse_event(line)
        except WireError as error:
            assert number not in accepted, f"line {number} accepted by the engine, refused by parse_event: {error}"
            continue
        valid += 1
        if number in accepted:  # with no unknown field: _values leaves ``extra`` out, the fast path stores '{}'
            assert extra_text(event) == "{}", f"line {number} accepted by the engine, but has unknown fields: {line}"
            engine = tuple(v.replace(tzinfo=None) if isinstance(v, datetime) else v for v in accepted[number])
            assert engine == _values(event), f"line {number}: {line}"
    print(f"{len(lines)} generated lines: {valid} valid, {len(accepted)} of them accepted by the engine")
    assert valid > 1000 and len(accepted) > valid // 2, "the fast path must take most valid lines"
