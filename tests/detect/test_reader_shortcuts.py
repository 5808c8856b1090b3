"""The backtest reader's shortcuts (issue 16) give what the long way gives, on ordinary and hostile input.

Each shortcut skips work whose result is known: the record caps' calls where they cannot refuse, the
EnrichedEvent the reader only took apart, a new ResolvedSubstance per report.
"""

from __future__ import annotations

import gc
import json
from datetime import date
from typing import Any

import pytest

from synthwatch.producers.simulate import SimulationConfig, simulate
from synthwatch.schemas import WireError
from synthwatch.schemas.wire import RecordLimits, check_extras, check_size, parse_event, parse_limited
from synthwatch.stream_apps.detect.identity import (
    COUNT_UNITS,
    WIRE_UNIT_FACTORS,
    ResolvedSubstance,
    SubstanceResolver,
    grams_of,
    normalise_quantity,
)
from synthwatch.stream_apps.detect.intake import Intake
from synthwatch.stream_apps.detect.region import Observation, subject_of


def _lab(**extra: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "kind": "lab_detection",
        "event_id": "e-1",
        "occurred_at": "2026-03-01T10:00:00+00:00",
        "country": "NL",
        "region": "NL-NH",
        "substance": {"name": "MDMA"},
        "lab_id": "LAB-1",
        "sample_id": "S-1",
        "sample_type": "seized_material",
        "method": "GC-MS",
    }
    record.update(extra)
    return record


def _long_way(raw: bytes | str, limits: RecordLimits) -> Any:
    """What ``parse_limited`` did before its shortcuts: every cap checked, every time."""
    check_size(raw, limits)
    event = parse_event(raw)
    check_extras(event, limits)
    return event


def _verdict(parse: Any, raw: bytes | str, limits: RecordLimits) -> Any:
    try:
        return parse(raw, limits).model_dump(mode="json")
    except WireError as error:
        return ("refused", error.reason, error.event_id)


def test_the_record_caps_refuse_what_they_refused_with_the_same_reasons() -> None:
    limits = RecordLimits(max_bytes=1000, max_extra_fields=3, max_extra_bytes=100)
    base = json.dumps(_lab(event_id="é"), ensure_ascii=False)
    pad = 1000 - len(base.encode()) - len(', "note": ""')
    records: list[bytes | str] = []
    for text in ("x" * 230, "é" * 130, "x" * (pad + 1), "é" * (pad // 2), "é" * (pad // 2 + 1), "😀" * (pad // 4 + 1)):
        line = json.dumps(_lab(event_id="é", note=text), ensure_ascii=False)
        records += [line, line.encode()]
    records += [
        json.dumps(_lab(substance={"name": "x", "a": 1, "b": 2, "c": {"d": 1}})),  # extras only in the substance
        json.dumps(_lab(substance={"name": "x", "a": "y" * 120})),
        json.dumps(_lab(substance={"name": "x", "a": 1})),
        json.dumps(_lab(a=1, b=2, substance={"name": "x", "c": 3})),
        json.dumps(_lab(a=1, b=2, d={"e": 1})),
        json.dumps(_lab()),
        "{not json",
        "x" * 1001,
        "é" * 251,
        "é" * 250,
    ]
    loose = RecordLimits(max_bytes=1000, max_extra_fields=3, max_extra_bytes=5000)  # the size cap alone decides
    verdicts = [_verdict(_long_way, raw, caps) for caps in (limits, loose) for raw in records]
    assert {v[0] for v in verdicts if isinstance(v, tuple)} == {"refused"}
    reasons = " ".join(v[1] for v in verdicts if isinstance(v, tuple))
    assert "record too large: 1,001 bytes" in reasons and "extra_fields: 4 unknown fields" in reasons
    assert "bytes of unknown fields" in reasons and "invalid JSON" in reasons
    assert sum(not isinstance(v, tuple) for v in verdicts) >= 6
    assert [_verdict(parse_limited, raw, caps) for caps in (limits, loose) for raw in records] == verdicts


def test_the_reader_gives_the_observations_enrich_and_fields_of_give() -> None:
    lines = simulate(SimulationConfig(days=20, seed=5, start=date(2026, 1, 1))).lines
    shortcut, long_way = Intake(stage="backtest"), Intake(stage="backtest")
    compared = seizures = 0
    for i, line in enumerate(lines):
        try:
            event = parse_limited(line)
        except WireError:
            continue
        quantity = getattr(event, "quantity", None)
        grams = grams_of(quantity.value, quantity.unit) if quantity is not None else None
        fields = Observation.fields_from(event, shortcut.identify(event), grams)
        assert fields == Observation.fields_of(long_way.enrich(event, f"sim:{i}"))
        compared, seizures = compared + 1, seizures + (quantity is not None)
    assert compared > 5000 and seizures > 1000


@pytest.mark.parametrize("unit", [*WIRE_UNIT_FACTORS, *sorted(COUNT_UNITS), "Tablets", "comprimés", "µg", "oz"])
def test_grams_are_those_of_the_normalised_quantity(unit: str) -> None:
    for value in (0.0, 1e-9, 0.1, 3.0, 2.5e8, 1e9):
        assert grams_of(value, unit) == normalise_quantity(value, unit).grams
    for bad in (-1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="finite and non-negative") as caught:
            grams_of(bad, unit)
        with pytest.raises(ValueError) as expected:
            normalise_quantity(bad, unit)
        assert str(caught.value) == str(expected.value)
    with pytest.raises(ValueError, match="unknown unit"):
        grams_of(1.0, "furlongs-per-parsec")


def test_a_repeated_answer_is_one_object_and_a_changed_one_is_new() -> None:
    resolver = SubstanceResolver()
    mdma = resolver.resolve("MDMA", smiles="CNC(C)Cc1ccc2c(c1)OCO2", reporter="lab:A")
    assert resolver.resolve("mdma", smiles="CNC(C)Cc1ccc2c(c1)OCO2", reporter="lab:B") is mdma
    unknown = resolver.resolve("zz-novel-1")
    assert unknown.resolved_by == "unresolved_name" and resolver.resolve("zz-novel-1") is unknown
    learnt = resolver.resolve("zz-novel-1", smiles="CCN(CC)C(=O)C1CN(C)C2CC3=CNC4=CC=CC(=C34)C2=C1", reporter="lab:A")
    after = resolver.resolve("zz-novel-1")
    assert after.resolved_by == "learnt_name" and after is not unknown and after.key == learnt.key
    fresh = ResolvedSubstance(**{name: getattr(after, name) for name in ResolvedSubstance.__slots__})
    assert fresh == after and fresh is not after


def test_subjects_follow_the_substance_not_a_reused_object_id() -> None:
    gc.collect()
    for i in range(3000):  # freed objects' ids are reused: each one's subject is its own
        substance = ResolvedSubstance(f"KEY{i}", f"name {i}", None, None, None, False, "unresolved_name")
        subject = subject_of(substance)
        assert (subject.key, subject.name) == (f"KEY{i}", f"name {i}")
        twin = ResolvedSubstance(f"KEY{i}", f"name {i}", None, None, None, False, "unresolved_name")
        assert subject_of(twin) == subject
