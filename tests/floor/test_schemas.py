"""The wire contract: what is accepted, what is refused, and that reasons say why."""

from __future__ import annotations

import json

import pytest

from synthwatch.schemas import BorderSeizure, LabDetection, Reject, WireError, parse_event, parse_event_object
from synthwatch.schemas.json_schema import export_schemas, render_schemas, stale_schemas
from tests.support.factories import lab, malformed_records, seizure


def test_valid_seizure_and_lab_detection_parse() -> None:
    s = parse_event(json.dumps(seizure()))
    assert isinstance(s, BorderSeizure)
    assert (s.region, s.quantity.value, s.quantity.unit) == ("ML-BKO", 2.5, "kg")
    assert s.occurred_at.utcoffset() is not None
    item = parse_event(json.dumps(lab()))
    assert isinstance(item, LabDetection)
    assert item.confirmed is True and item.purity_pct == 71.5


def test_unknown_fields_are_kept_not_fatal() -> None:
    record = seizure(operation="Sahel-7", substance={"name": "Tramadol", "colour": "white"})
    event = parse_event(json.dumps(record))
    assert event.extra_fields == {"operation": "Sahel-7", "substance": {"colour": "white"}}
    assert json.loads(event.model_dump_json())["operation"] == "Sahel-7"


def test_codes_are_normalised_to_upper_case() -> None:
    event = parse_event(json.dumps(seizure(country="ml", region="ml-bko")))
    assert (event.country, event.region) == ("ML", "ML-BKO")


@pytest.mark.parametrize(("label", "record", "fragment"), malformed_records("unit"))
def test_malformed_input_is_refused_with_a_reason(label: str, record: object, fragment: str) -> None:
    raw = record if isinstance(record, str) else json.dumps(record)
    with pytest.raises(WireError) as caught:
        parse_event(raw)
    assert fragment in caught.value.reason, f"{label}: {caught.value.reason}"


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"occurred_at": 1772355600}, "RFC 3339"),
        ({"occurred_at": "1900-01-01T00:00:00Z"}, "outside"),
        ({"occurred_at": "2200-01-01T00:00:00Z"}, "outside"),
        ({"country": "XX"}, "country"),
        ({"quantity": {"value": 1, "unit": "bags"}}, "quantity.unit"),
        ({"conveyance": "drone"}, "conveyance"),
        ({"substance": {"name": "x", "inchikey": "not-a-key"}}, "InChIKey"),
        ({"substance": {"name": "x", "cas": "1189805-46-7"}}, "check digit"),
    ],
)
def test_more_bad_values(changes: dict[str, object], fragment: str) -> None:
    with pytest.raises(WireError) as caught:
        parse_event(json.dumps(seizure(**changes)))
    assert fragment in caught.value.reason


def test_nan_deep_nesting_and_invalid_utf8_are_refused_not_crashing() -> None:
    for raw in (
        b'{"event_id": "x", "kind": "lab_detection", "purity_pct": NaN}',
        b'{"a":' + b"[" * 10_000 + b"]" * 10_000 + b"}",
        b'{"event_id": "\xff\xfe"}',
    ):
        with pytest.raises(WireError):
            parse_event(raw)


def test_missing_kind_and_missing_field_reasons() -> None:
    record = seizure()
    del record["kind"]
    with pytest.raises(WireError, match="kind: required"):
        parse_event(json.dumps(record))
    record = seizure()
    del record["agency"]
    with pytest.raises(WireError, match="agency: required field is missing"):
        parse_event(json.dumps(record))


def test_wire_error_carries_the_event_id_when_readable() -> None:
    with pytest.raises(WireError) as caught:
        parse_event(json.dumps(seizure(event_id="trace-me", region="FR-75C")))
    assert caught.value.event_id == "trace-me"


def test_csv_like_objects_with_string_values_validate() -> None:
    record = seizure(quantity={"value": "2.5", "unit": "kg"})
    assert parse_event_object(record).quantity.value == 2.5


def test_reject_keeps_raw_text_and_cuts_huge_input() -> None:
    reject = Reject.of(b"\xff" + b"x" * 200_000, source="f:1", reason="r", stage="publish")
    assert reject.raw.startswith("\ufffd") and "more characters cut" in reject.raw
    assert len(reject.raw) < 100_100


def test_committed_json_schemas_are_fresh() -> None:
    stale = stale_schemas()
    assert not stale, f"stale JSON Schema files {stale}: run `synthwatch schemas export`"


def test_export_writes_every_schema(tmp_path) -> None:  # type: ignore[no-untyped-def]
    written = export_schemas(tmp_path)
    assert {p.name for p in written} == set(render_schemas())
    event_schema = json.loads((tmp_path / "event.schema.json").read_text())
    assert set(event_schema["discriminator"]["mapping"]) == {"lab_detection", "border_seizure"}


def test_a_structure_needs_no_name() -> None:
    """A lab that sends a SMILES or an InChIKey identified the substance: the catalogue or the structure names it."""
    by_smiles = parse_event_object(lab(substance={"smiles": "CNC(C)C(=O)c1ccc(C)cc1.Cl"}))
    by_key = parse_event(json.dumps(lab(substance={"inchikey": "yelgftgwjgbaqu-uhfffaoysa-n"})))
    assert by_smiles.substance.name is None and by_key.substance.inchikey == "YELGFTGWJGBAQU-UHFFFAOYSA-N"
    with pytest.raises(WireError, match="substance: needs a name, a SMILES or an InChIKey"):
        parse_event_object(lab(substance={"cas": "1189805-46-6"}))


def test_subdivision_table_is_the_lookup_per_code() -> None:
    """The fast path's region table is read off pycountry's subdivisions directly (start-up): it must give, code for
    code, the country the checked validator's lookup gives, and hold every code that lookup accepts."""
    import pycountry

    from synthwatch.schemas import events

    looked_up = {
        code: owner
        for code in (str(s.code).upper() for s in pycountry.subdivisions)
        if (owner := events._subdivision_country(code)) is not None
    }
    assert looked_up == events.SUBDIVISION_COUNTRY
    assert len(events.SUBDIVISION_COUNTRY) > 4000


def test_iso3166_table_is_the_installed_pycountry() -> None:
    """The generated table (start-up: no pycountry database) says what pycountry says, code for code and name for
    name; after a pycountry upgrade, run ``python -m synthwatch.schemas.iso3166_build``."""
    import pycountry

    from synthwatch.schemas import iso3166, iso3166_build

    assert iso3166_build.TARGET.read_text(encoding="utf-8") == iso3166_build.render()
    assert {
        str(s.code).upper(): (str(s.country_code), str(s.name)) for s in pycountry.subdivisions
    } == iso3166.SUBDIVISIONS
    assert set(iso3166.COUNTRIES) == {str(c.alpha_2).upper() for c in pycountry.countries}


@pytest.mark.parametrize(
    "code",
    [
        *("NL-NH", "nl-nh", "Nl-nH", "FR", "fr", "XX", "XX-YY", "", "NL-N\u0130", "RS-\u212aM", "\u0130T", "\u212aE"),
        *("Bouches-du-Rh\u00f4ne", "FR-13\u00e9", "\u00c9S", "rs-\u212am", "\u212a\u212a", "\u212aM", "\u00df"),
        "FR\u0307",
    ],
)
def test_iso3166_lookups_answer_as_pycountry(code: str) -> None:
    """The table's lookups give pycountry's case-insensitive answers, non-ASCII text included (its ``lower()``
    can turn the Kelvin sign into a "k", and the table finds that code as pycountry does)."""
    import pycountry

    from synthwatch.schemas import events
    from synthwatch.stream_apps.detect.alerting import region_label

    subdivision = pycountry.subdivisions.get(code=code)
    expected = None if subdivision is None else (str(subdivision.country_code), str(subdivision.name))
    assert events.subdivision_entry(code) == expected
    assert events._country_exists(code) == (pycountry.countries.get(alpha_2=code) is not None)
    assert region_label(code) == (f"{code} ({subdivision.name})" if subdivision is not None else code)


def test_every_code_written_with_kelvin_signs_is_found_as_pycountry_finds_it() -> None:
    """Non-ASCII text is looked up in the table (no pycountry database): every country and subdivision code with each
    K, or every K, written as the Kelvin sign (which lowers to "k"), and with a dotted I, answers as pycountry does.
    The table's reasoning needs every code ASCII: checked here too, for the installed pycountry."""
    import pycountry

    from synthwatch.schemas import events, iso3166

    assert all(code.isascii() for code in [*iso3166.SUBDIVISIONS, *iso3166.COUNTRIES])
    variants = set()
    for code in [*iso3166.SUBDIVISIONS, *iso3166.COUNTRIES]:
        variants.add(code.replace("K", "\u212a"))
        variants.add(code.lower().replace("k", "\u212a", 1))
        variants.add(code.replace("I", "\u0130"))
    variants -= {*iso3166.SUBDIVISIONS, *iso3166.COUNTRIES}
    assert len(variants) > 500
    for code in sorted(variants):
        subdivision = pycountry.subdivisions.get(code=code)
        expected = None if subdivision is None else (str(subdivision.country_code), str(subdivision.name))
        assert events.subdivision_entry(code) == expected, code
        assert events._country_exists(code) == (pycountry.countries.get(alpha_2=code) is not None), code


def test_a_region_or_country_written_with_accents_is_refused_without_loading_pycountry() -> None:
    """The simulated year holds a region written as a name with an accent ("Bouches-du-Rh\u00f4ne"): its refusal
    loaded pycountry's database (~0.03-0.05 CPU s on the backtest reader's path). The table answers it."""
    import subprocess
    import sys

    script = (
        "import json, sys\n"
        "from synthwatch.schemas.wire import WireError, parse_limited\n"
        "for record in json.loads(sys.argv[1]):\n"
        "    try:\n"
        "        parse_limited(json.dumps(record))\n"
        "    except WireError as error:\n"
        "        print('refused', 'region' in error.reason or 'country' in error.reason)\n"
        "print('pycountry' in sys.modules)\n"
    )
    records = [lab(region="Bouches-du-Rh\u00f4ne"), lab(country="FR\u00c0", region="FR-13")]
    command = [sys.executable, "-c", script, json.dumps(records)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    assert done.stdout.split("\n") == ["refused True", "refused True", "False", ""]


def test_event_models_do_not_load_pycountry() -> None:
    """Start-up: validating a well-formed event needs no pycountry (its database cost ~0.1-0.2 s a process)."""
    import subprocess
    import sys

    script = (
        "import json, sys\n"
        "from synthwatch.schemas.wire import parse_limited\n"
        "parse_limited(sys.argv[1])\n"
        "print('pycountry' in sys.modules)\n"
    )
    record = json.dumps(lab())
    done = subprocess.run([sys.executable, "-c", script, record], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_corrects_is_a_declared_field_of_both_kinds() -> None:
    """A correction names the report it corrects; it is part of the contract, not an unknown extra."""
    fixed = parse_event(json.dumps(lab(event_id="LAB-2", corrects=" LAB-1 ")))
    assert fixed.corrects == "LAB-1" and fixed.extra_fields == {}
    seized = parse_event(json.dumps(seizure(event_id="S-2", corrects="S-1")))
    assert isinstance(seized, BorderSeizure) and seized.corrects == "S-1"
    assert parse_event(json.dumps(lab())).corrects is None
    assert "corrects" in LabDetection.model_json_schema()["properties"]


@pytest.mark.parametrize("make", [lab, seizure])
def test_a_report_cannot_correct_itself(make) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(WireError) as caught:
        parse_event(json.dumps(make(event_id="X-1", corrects="X-1")))
    assert caught.value.reason.startswith("corrects: names this report's own event_id")
    with pytest.raises(WireError) as blank:
        parse_event(json.dumps(make(event_id="X-1", corrects="  ")))
    assert blank.value.reason.startswith("corrects:")
    with pytest.raises(WireError) as forged:  # one line of printable text, as every id
        parse_event(json.dumps(make(event_id="X-1", corrects="X-0\nFrom: evil")))
    assert "control characters" in forged.value.reason


def test_a_correction_digests_as_before_corrects_was_declared() -> None:
    """Stored before the upgrade, with ``corrects`` as an unknown field: a re-send is the same content."""
    import hashlib

    from synthwatch.schemas.wire import content_digest

    event = parse_event(json.dumps(lab(event_id="L-2", corrects="L-1")))
    before = json.dumps(event.model_dump(mode="json", exclude_none=True), sort_keys=True, ensure_ascii=False)
    assert content_digest(event) == hashlib.sha256(before.encode()).hexdigest()[:32]
    assert content_digest(event) != content_digest(parse_event(json.dumps(lab(event_id="L-2", corrects="L-0"))))
