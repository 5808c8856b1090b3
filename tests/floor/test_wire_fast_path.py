"""The fast path of the wire contract judges every record exactly as the checked models do.

``parse_event`` first tries models checked inside pydantic-core only, and sends what they refuse to the
checked models (Python validators, worded reasons). The contract is the checked models' verdict: these
tests compare ``parse_event`` with them directly, on the records where the two paths could differ.
"""

from __future__ import annotations

import json
from datetime import date
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from synthwatch.producers.simulate import SimulationConfig, simulate
from synthwatch.schemas import BorderSeizure, LabDetection, WireError, parse_event, parse_event_object
from synthwatch.schemas.events import CHECKED_EVENT_ADAPTER, EVENTS_ADAPTER
from synthwatch.schemas.wire import describe_validation_error
from tests.support.factories import lab, malformed_records, seizure


def _fields_set(model: BaseModel) -> dict[str, Any]:
    """Which fields a model says were set, nested models included (defaults must not look sent)."""
    nested = {k: _fields_set(v) for k, v in model.__dict__.items() if isinstance(v, BaseModel)}
    return {"set": sorted(model.model_fields_set), **nested}


def _reference(raw: str | bytes | dict[str, Any]) -> tuple[str, ...]:
    """The contract's verdict: the checked models alone (what ``parse_event`` did before the fast path)."""
    try:
        if isinstance(raw, dict):
            event = CHECKED_EVENT_ADAPTER.validate_python(raw)
        else:
            event = CHECKED_EVENT_ADAPTER.validate_json(raw)
    except ValidationError as error:
        return ("rejected", describe_validation_error(error))
    name = "LabDetection" if event.kind == "lab_detection" else "BorderSeizure"
    return ("accepted", name, event.model_dump_json(), json.dumps(_fields_set(event)))


def _outcome(raw: str | bytes | dict[str, Any]) -> tuple[str, ...]:
    try:
        event = parse_event_object(raw) if isinstance(raw, dict) else parse_event(raw)
    except WireError as error:
        return ("rejected", error.reason)
    assert type(event) in (LabDetection, BorderSeizure)  # the public models, never the checked ones
    return ("accepted", type(event).__name__, event.model_dump_json(), json.dumps(_fields_set(event)))


TIMES = [
    "2026-03-01T10:00:00+01:00",
    "2026-03-01T10:00:00Z",
    "2026-03-01t10:00:00z",
    "2026-03-01 10:00:00+00:00",
    "2026-03-01T10:00:00.123456789+05:30",
    "2026-03-01T10:00Z",
    "2026-03-01T10:00:00",
    "2026-03-01",
    "20260301T100000Z",
    "1772355600",
    "1772355600.5",
    " 2026-03-01T10:00:00Z",
    "1990-01-01T00:00:00Z",
    "1990-01-01T00:30:00+01:00",
    "1989-12-31T23:30:00-01:00",
    "1989-12-31T23:59:59.999999Z",
    "2099-12-31T23:59:59.999999Z",
    "2100-01-01T00:00:00Z",
    "2099-12-31T23:30:00-01:00",
    "2100-01-01T00:30:00+01:00",
    "yesterday",
    "",
]
COUNTRIES = ["ML", "ml", " ML", "ML ", "Ml", "FR", "XX", "M", "MLI", "", "ＭＬ"]
REGIONS = ["ML-BKO", "ml-bko", " ML-BKO ", "FR-75C", "fr-75c", "ML-ZZZ", "ML", "", "GB-ENG", "ML-BKO\n"]
INCHIKEYS = [
    "PMDQJNDOWNOOQU-UHFFFAOYSA-N",
    "pmdqjndownooqu-uhfffaoysa-n",
    " PMDQJNDOWNOOQU-UHFFFAOYSA-N ",
    "PMDQJNDOWNOOQU-UHFFFAOYSA-N\n",
    "PMDQJNDOWNOOQU",
    "not-a-key",
    "",
]
TEXTS = ["x", " x ", "", "   ", "x" * 501, " " + "x" * 500, "\tGC-MS\n"]
ANY = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**64), max_value=2**64),
    st.floats(allow_nan=False),
    st.text(max_size=12),
    st.sampled_from([[], {}, {"a": 1}]),
)


@st.composite
def records(draw: st.DrawFn) -> dict[str, Any]:
    """A record near the edges where the fast and the checked models could part."""
    record = (lab if draw(st.booleans()) else seizure)()
    choices = {
        "occurred_at": st.sampled_from(TIMES) | ANY,
        "reported_at": st.sampled_from(TIMES) | st.none(),
        "country": st.sampled_from(COUNTRIES) | ANY,
        "region": st.sampled_from(REGIONS) | ANY,
        "origin_country": st.sampled_from(COUNTRIES) | st.none(),
        "destination_country": st.sampled_from(COUNTRIES),
        "substance.inchikey": st.sampled_from(INCHIKEYS) | ANY,
        "substance.cas": st.sampled_from(["50-00-0", "1189805-46-6", "1189805-46-7", " 50-00-0 "]) | ANY,
        "substance.name": st.sampled_from(TEXTS) | ANY,
        "substance.smiles": st.sampled_from(TEXTS) | st.none(),
        "substance.colour": ANY,
        "event_id": st.sampled_from(TEXTS) | ANY,
        "method": st.sampled_from(TEXTS),
        "purity_pct": st.sampled_from([0, 100, 100.5, -1, "50", None]) | ANY,
        "confirmed": st.sampled_from([True, False, "true", 1, 0, None]),
        "quantity": st.sampled_from([{"value": 1, "unit": "g"}, {"value": "2", "unit": "kg"}, {"value": 0}]),
        "operation": ANY,
    }
    for name in draw(st.lists(st.sampled_from(sorted(choices)), min_size=1, max_size=4, unique=True)):
        target, _, leaf = name.rpartition(".")
        holder = record[target] if target else record
        if draw(st.integers(0, 5)) == 0:
            holder.pop(leaf, None)
        else:
            holder[leaf] = draw(choices[name])
    return record


@settings(max_examples=3000, deadline=None)
@given(record=records())
def test_fast_path_gives_the_checked_verdict_on_edge_records(record: dict[str, Any]) -> None:
    raw = json.dumps(record, ensure_ascii=False)
    assert _outcome(raw) == _reference(raw)
    assert _outcome(raw.encode()) == _reference(raw.encode())
    assert _outcome(record) == _reference(record)


def test_fast_path_gives_the_checked_verdict_on_a_simulated_month_and_the_malformed_kinds() -> None:
    lines: list[str] = list(simulate(SimulationConfig(days=30, seed=5, start=date(2026, 1, 1))).lines)
    lines += [r if isinstance(r, str) else json.dumps(r) for _, r, _ in malformed_records("fast")]
    verdicts = [_outcome(line) for line in lines]
    assert verdicts == [_reference(line) for line in lines]
    assert {v[0] for v in verdicts} == {"accepted", "rejected"}


def test_normalising_values_still_go_through_the_checked_models() -> None:
    event = parse_event(json.dumps(seizure(country=" ml", region="ml-bko", origin_country="fr")))
    assert (event.country, event.region, getattr(event, "origin_country", None)) == ("ML", "ML-BKO", "FR")
    assert type(event) is BorderSeizure and "reported_at" not in event.model_fields_set


def test_bulk_adapter_accepts_what_one_by_one_accepts() -> None:
    records = [seizure(), lab(), seizure(event_id="s-2", extra={"x": 1})]
    events = EVENTS_ADAPTER.validate_json(json.dumps(records))
    assert [e.model_dump_json() for e in events] == [parse_event(json.dumps(r)).model_dump_json() for r in records]
