"""Input files: NDJSON and CSV records with their line numbers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from synthwatch.producers.readers import CsvOptions, ReaderError, load_aliases, read_records
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


EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples"
SEIZURE_HEADER = (
    "event_id;kind;occurred_at;country;region;substance.name;agency;seizure_id;border_point;conveyance;"
    "quantity.value;quantity.unit"
)


def _events(path: Path, **kwargs: Any) -> list[Any]:
    records = list(read_records(str(path), **kwargs))
    assert all(r.problem is None for r in records), [r.problem for r in records]
    return [parse_event_object(r.obj or {}) for r in records]


def test_the_shipped_lims_example_publishes_every_row_with_its_aliases() -> None:
    """docs/examples: a BOM, ';', CRLF, LIMS headers, date-only and offset-less dates, decimal commas,
    lower-case codes, salts in names and rows identified only by a structure."""
    aliases = load_aliases(EXAMPLES / "lims_aliases.toml")
    records = list(
        read_records(str(EXAMPLES / "lims_export.csv"), options=CsvOptions(aliases=aliases, timezone="Europe/Paris"))
    )
    assert [r.source for r in records] == [f"lims_export.csv:{n}" for n in (2, 3, 4, 5)]
    events = [parse_event_object(r.obj or {}) for r in records]
    first, second, third, fourth = events
    assert (first.event_id, first.kind, first.sample_id, first.substance.name) == (  # type: ignore[union-attr]
        "LAB-FR-01:S-2026-0101",
        "lab_detection",
        "S-2026-0101",
        "Mephedrone HCl",
    )
    assert first.occurred_at.isoformat() == "2026-03-02T00:00:00+01:00"  # a date alone: midnight, Paris time
    assert second.occurred_at.isoformat() == "2026-03-02T14:30:00+01:00"
    assert third.occurred_at.isoformat() == "2026-03-03T09:15:00+01:00"  # an offset given is kept
    assert [e.purity_pct for e in events] == [71.5, 64.0, None, 12.25]  # type: ignore[union-attr]
    assert [e.sample_type for e in events] == ["seized_material", "seized_material", "biological", "wastewater"]  # type: ignore[union-attr]
    assert (second.country, second.region) == ("FR", "FR-75C")
    assert third.substance.name is None and third.substance.smiles and fourth.substance.inchikey
    assert "Analyst" not in records[0].raw and (second.model_extra or {}) == {}  # ignored columns stay out
    assert "Comments" not in records[1].raw


def test_a_bom_semicolons_and_windows_line_endings(tmp_path: Path) -> None:
    path = tmp_path / "export.csv"
    rows = [SEIZURE_HEADER, "c-1;Border_Seizure;2026-03-01T10:00:00Z;MA;MA-TNG;Cocaine;ADII;T-1;Tanger Med;SEA;12,5;KG"]
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(rows).encode() + b"\r\n")
    [event] = _events(path)
    assert (event.kind, event.conveyance, event.quantity.value, event.quantity.unit) == (  # type: ignore[union-attr]
        "border_seizure",
        "sea",
        12.5,
        "kg",
    )


def test_headers_match_whatever_their_case(tmp_path: Path) -> None:
    path = tmp_path / "export.csv"
    header = (
        "Event_ID,KIND,Occurred_At,Country,Region,Substance.Name,Agency,Seizure_ID,Border_Point,Conveyance,"
        "Quantity.Value,Quantity.Unit"
    )
    path.write_text(header + "\nc-1,border_seizure,2026-03-01,MA,MA-TNG,Cocaine,ADII,T-1,Tanger Med,Air,1 250,5,g\n")
    # "1 250,5" has a comma inside an unquoted cell: the row is one cell too long, and says so
    [record] = list(read_records(str(path)))
    assert record.hint is not None and "must be quoted" in record.hint
    path.write_text(header + '\nc-1,border_seizure,2026-03-01,MA,MA-TNG,Cocaine,ADII,T-1,Tanger Med,Air,"1 250,5",g\n')
    [event] = _events(path)
    assert (event.conveyance, event.quantity.value) == ("air", 1250.5)  # type: ignore[union-attr]
    assert event.occurred_at.isoformat() == "2026-03-01T00:00:00+00:00"  # default time zone: UTC


def test_an_explicit_delimiter_and_the_one_column_hint(tmp_path: Path) -> None:
    path = tmp_path / "export.csv"
    path.write_text(
        SEIZURE_HEADER + "\nc-1;border_seizure;2026-03-01T10:00:00Z;MA;MA-TNG;Cocaine;ADII;T-1;Tanger Med;sea;2;kg\n"
    )
    [record] = list(read_records(str(path), options=CsvOptions(delimiter=",")))
    assert record.hint is not None and "the header has 1 column" in record.hint and "separated by ';'" in record.hint
    tabbed = tmp_path / "export.tsv"
    tabbed.write_text(
        SEIZURE_HEADER.replace(";", "\t")
        + "\nc-1\tborder_seizure\t2026-03-01T10:00:00Z\tMA\tMA-TNG\tCocaine\tADII\tT-1\tTanger Med\tsea\t2\tkg\n"
    )
    assert _events(tabbed)[0].event_id == "c-1"


def test_a_header_without_the_contract_columns_says_what_to_do(tmp_path: Path) -> None:
    path = tmp_path / "export.csv"
    path.write_text("Sample ID,Substance\nS-1,Cocaine\n")
    [record] = list(read_records(str(path)))
    assert record.hint is not None and "no column for country, event_id, kind, occurred_at, region" in record.hint
    assert "--aliases" in record.hint


def test_latin1_rows_are_refused_with_a_hint_and_read_with_encoding(tmp_path: Path) -> None:
    path = tmp_path / "export.csv"
    text = (
        SEIZURE_HEADER
        + "\nc-1;border_seizure;2026-03-01T10:00:00Z;MA;MA-TNG;Méphédrone;Douane;T-1;Tanger Med;sea;2;kg\n"
    )
    text += "c-2;border_seizure;2026-03-01T10:00:00Z;MA;MA-TNG;Cocaine;ADII;T-2;Tanger Med;sea;2;kg\n"
    path.write_bytes(text.encode("latin-1"))
    first, second = list(read_records(str(path)))
    assert (
        first.problem is not None and "byte 0xe9 is not UTF-8" in first.problem and "--encoding cp1252" in first.problem
    )
    assert second.problem is None  # the other rows still go through
    assert [e.substance.name for e in _events(path, encoding="cp1252")] == ["Méphédrone", "Cocaine"]


def test_ndjson_with_a_bom(tmp_path: Path) -> None:
    path = tmp_path / "in.ndjson"
    path.write_bytes(b'\xef\xbb\xbf{"a": 1}\n')
    assert [r.raw for r in read_records(str(path))] == ['{"a": 1}']


def test_unknown_time_zone_and_encoding_say_what_to_pass(tmp_path: Path) -> None:
    with pytest.raises(ReaderError, match="IANA name"):
        CsvOptions(timezone="Paris").zone()
    with pytest.raises(ReaderError, match="cp1252"):
        list(read_records(str(tmp_path / "x.csv"), encoding="no-such-encoding"))


def test_alias_defaults_never_make_an_id_from_an_empty_cell(tmp_path: Path) -> None:
    aliases_path = tmp_path / "a.toml"
    aliases_path.write_text('[defaults]\nevent_id = "LAB:{Sample ID}"\nkind = "lab_detection"\n')
    path = tmp_path / "export.csv"
    path.write_text("Sample ID,x\n,1\nS-2,2\n")
    first, second = list(read_records(str(path), options=CsvOptions(aliases=load_aliases(aliases_path))))
    assert "event_id" not in (first.obj or {}) and (second.obj or {})["event_id"] == "LAB:S-2"
    aliases_path.write_text("[colums]\n")
    with pytest.raises(ReaderError, match="unknown section"):
        load_aliases(aliases_path)


def test_a_summary_keeps_bounded_reasons_and_sources() -> None:
    from synthwatch.producers.publisher import MAX_REASONS_KEPT, MAX_SOURCES_PER_REASON, OTHER_REASONS, PublishSummary

    summary = PublishSummary()
    for i in range(MAX_REASONS_KEPT + 50):
        summary.note_reject(f"region: 'X{i}' is not a code", f"f.csv:{i + 2}")
    for i in range(MAX_SOURCES_PER_REASON + 5):
        summary.note_reject("region: 'X0' is not a code", f"g.csv:{i}")
    assert len(summary.reject_counts) == MAX_REASONS_KEPT + 1 and summary.reject_counts[OTHER_REASONS] == 50
    assert summary.reject_counts["region: 'X0' is not a code"] == MAX_SOURCES_PER_REASON + 6
    assert len(summary.reject_sources["region: 'X0' is not a code"]) == MAX_SOURCES_PER_REASON
    assert sum(summary.reject_counts.values()) == MAX_REASONS_KEPT + 50 + MAX_SOURCES_PER_REASON + 5


def test_a_stray_quote_costs_its_own_line_only(tmp_path: Path) -> None:
    """A quoted cell may span lines for the plain csv reader: one stray quote swallowed every later row into
    one reject (95,790 bytes of raw, 998 rows lost). A later line that is a whole row is never taken in."""
    path = tmp_path / "seizures.csv"
    names = {2: '"abc'}
    rows = [
        f"q-{n};border_seizure;2026-03-01T10:00:00+01:00;ML;ML-BKO;{names.get(n, 'Tramadol')};Douanes maliennes;"
        f"S-{n};BKO;air;2.5;kg"
        for n in range(1, 1001)
    ]
    path.write_text(SEIZURE_HEADER + "\r\n" + "\r\n".join(rows) + "\r\n", encoding="utf-8")
    records = list(read_records(str(path)))
    assert len(records) == 1000  # one record per line: lines = accepted + rejected
    bad = [r for r in records if r.problem is not None]
    assert [r.source for r in bad] == ["seizures.csv:3"]
    assert "does not close it" in (bad[0].problem or "") and "whole row" in (bad[0].problem or "")
    assert bad[0].raw == rows[1]  # the line itself, not the rest of the file
    good = [parse_event_object(r.obj or {}) for r in records if r.problem is None]
    assert len(good) == 999 and good[-1].event_id == "q-1000"


def test_a_cell_over_the_size_limit_costs_its_own_line_only(tmp_path: Path) -> None:
    path = tmp_path / "seizures.csv"
    good = "q-{};border_seizure;2026-03-01T10:00:00+01:00;ML;ML-BKO;Tramadol;Douanes maliennes;S;BKO;air;2.5;kg"
    path.write_text("\n".join([SEIZURE_HEADER, good.format(1), "x" * 2000 + ";y", good.format(3)]) + "\n")
    records = list(read_records(str(path), max_field=1000))
    assert [r.source for r in records] == ["seizures.csv:2", "seizures.csv:3", "seizures.csv:4"]
    assert records[1].problem is not None and "field limit" in records[1].problem
    assert records[0].problem is None and records[2].problem is None


def test_a_quoted_cell_over_several_lines_is_one_row_as_rfc_4180_has_it(tmp_path: Path) -> None:
    """LIMS exports put line breaks inside quoted comment cells; the csv reader always read such a row whole
    (the comment ignored, or kept as an extra field), and reading by physical line must not break it."""
    path = tmp_path / "seizures.csv"
    good = "q-{};border_seizure;2026-03-01T10:00:00+01:00;ML;ML-BKO;Tramadol;Douanes maliennes;S;BKO;air;2.5;kg;{}"
    lines = [
        SEIZURE_HEADER + ";comments",
        good.format(1, "one line"),
        good.format(2, '"seal broken;\r\nre-weighed ""twice""\r\n\r\nsee report"'),  # CRLF and a blank line inside
        good.format(3, ""),
    ]
    path.write_bytes(("\r\n".join(lines) + "\r\n").encode())
    records = list(read_records(str(path)))
    assert [(r.source, r.problem) for r in records] == [(f"seizures.csv:{n}", None) for n in (2, 3, 7)]
    events = [parse_event_object(r.obj or {}) for r in records]
    assert events[1].extra_fields == {"comments": 'seal broken;\r\nre-weighed "twice"\r\n\r\nsee report'}
    ignored = list(read_records(str(path), options=CsvOptions(aliases=_ignoring("comments", tmp_path))))
    assert [parse_event_object(r.obj or {}).extra_fields for r in ignored] == [{}, {}, {}]


def test_a_quoted_cell_over_several_lines_in_the_first_column_is_one_row(tmp_path: Path) -> None:
    """A customs export whose first column is a description typed over two lines: the line closing the quote
    holds the rest of the row, as many cells as the header, and was taken for a whole row of its own; the
    row's first line was refused ('a quote opens a cell and does not close it') and its second published
    with the description 'in a box"'. A line closing the open quote has an odd number of quotes."""
    path = tmp_path / "seizures.csv"
    rest = "border_seizure;2026-03-01T10:00:00+01:00;ML;ML-BKO;Tramadol;Douanes maliennes;S;BKO;air;2.5;kg"
    header = "description;" + SEIZURE_HEADER
    lines = [header, f'"Blue pills,\r\nin a box";q-1;{rest}', f"plain;q-2;{rest}", f'"one line";q-3;{rest}']
    path.write_bytes(("\r\n".join(lines) + "\r\n").encode())
    records = list(read_records(str(path)))
    assert [(r.source, r.problem) for r in records] == [(f"seizures.csv:{n}", None) for n in (2, 4, 5)]
    events = [parse_event_object(r.obj or {}) for r in records]
    assert [e.event_id for e in events] == ["q-1", "q-2", "q-3"]
    assert events[0].extra_fields == {"description": "Blue pills,\r\nin a box"}


def _ignoring(column: str, tmp_path: Path) -> Any:
    aliases = tmp_path / "aliases.toml"
    aliases.write_text(f'ignore = ["{column}"]\n', encoding="utf-8")
    return load_aliases(aliases)


def test_a_stray_quote_never_takes_whole_rows_into_its_cell(tmp_path: Path) -> None:
    """A quote left open in a comment and a quote ending a later comment made one valid RFC 4180 row of
    five lines: the rows between would vanish into an accepted record's comment. A line that is a whole
    row on its own is a row; the open quote costs its own line only."""
    path = tmp_path / "seizures.csv"
    good = "q-{};border_seizure;2026-03-01T10:00:00+01:00;ML;ML-BKO;Tramadol;Douanes maliennes;S;BKO;air;2.5;kg;{}"
    notes = {3: '"abc', 7: 'ok"'}
    lines = [SEIZURE_HEADER + ";comments"] + [good.format(n, notes.get(n, "")) for n in range(2, 9)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    records = list(read_records(str(path)))
    assert [r.source for r in records] == [f"seizures.csv:{n}" for n in range(2, 9)]
    assert [r.source for r in records if r.problem is not None] == ["seizures.csv:3"]
    assert "does not close it" in (records[1].problem or "")
    assert parse_event_object(records[5].obj or {}).extra_fields == {"comments": 'ok"'}


def test_a_quoted_cell_spans_a_bounded_number_of_lines(tmp_path: Path) -> None:
    """Each quote left open reads at most MAX_QUOTED_LINES lines ahead (a body of open quotes is not read
    again and again to its end); a longer cell is refused with its first line, and says so."""
    from synthwatch.producers.readers import MAX_QUOTED_LINES

    path = tmp_path / "seizures.csv"
    good = "q-{};border_seizure;2026-03-01T10:00:00+01:00;ML;ML-BKO;Tramadol;Douanes maliennes;S;BKO;air;2.5;kg;{}"
    for spanned, refused in ((MAX_QUOTED_LINES, False), (MAX_QUOTED_LINES + 1, True)):
        comment = '"' + "\n".join(f"line {k}" for k in range(spanned)) + '"'
        path.write_text("\n".join([SEIZURE_HEADER + ";comments", good.format(1, comment)]) + "\n", encoding="utf-8")
        records = list(read_records(str(path)))
        if not refused:
            assert [(r.source, r.problem) for r in records] == [("seizures.csv:2", None)]
        else:
            assert records[0].source == "seizures.csv:2" and f"{MAX_QUOTED_LINES} lines" in (records[0].problem or "")
            assert len(records) == spanned  # the lines after the refused one are read as rows (and refused)


def test_a_csv_header_of_more_columns_than_a_report_can_have_refuses_its_rows_without_building_them() -> None:
    """Rows are built cell by cell: 17 rows of 200,000 filled cells (8 MiB, 17 records charged at the gateway)
    took 3.85 CPU s, 10,000 plain rows 0.2. Over MAX_CSV_COLUMNS every row is refused with the reason."""
    import io
    import time

    from synthwatch.producers.readers import MAX_CSV_COLUMNS, read_csv

    assert MAX_CSV_COLUMNS == 256
    body = ",".join(f"c{n}" for n in range(200_000)) + "\n" + (",".join(["1"] * 200_000) + "\n") * 17
    started = time.thread_time()
    records = list(read_csv(io.StringIO(body, newline=""), "f.csv"))
    spent = time.thread_time() - started
    assert spent < 1.0, spent
    assert len(records) == 17 and all(r.obj is None for r in records)
    assert "the CSV header has 200,000 columns, at most 256" in (records[0].problem or "")
    widest = ",".join(f"c{n}" for n in range(256)) + "\n" + ",".join(["1"] * 256) + "\n"
    (record,) = read_csv(io.StringIO(widest, newline=""), "f.csv")
    assert record.problem is None and record.obj is not None and len(record.obj) == 256


def test_a_lims_export_of_hundreds_of_columns_most_ignored_by_its_aliases_publishes_every_row(tmp_path: Path) -> None:
    """A LIMS export has hundreds of columns (instrument settings, audit fields) and its alias file ignores
    them: the column cap counts the columns read, so those rows are read (every one was refused with 'the CSV
    header has 313 columns, at most 256' since the cap counted the header's). An alias file that leaves too
    many columns read says to list them under `ignore`."""
    from synthwatch.producers.readers import MAX_CSV_COLUMNS

    unused = [f"Audit {n}" for n in range(300)]
    header = (EXAMPLES / "lims_export.csv").read_text(encoding="utf-8-sig").splitlines()[0].split(";")
    path = tmp_path / "wide_export.csv"
    rows = ["S-1;LAB-FR-01;2026-03-02;Mephedrone HCl;;;GC-MS;71,5;Saisie;FR;FR-75C;JD;", "S-2;LAB-FR-01;2026-03-03;"
            "3-MMC;;;GC-MS;40;Urine;FR;FR-75C;JD;"]  # fmt: skip
    path.write_text(
        "\n".join([";".join(header + unused)] + [row + ";" + ";".join(["x"] * len(unused)) for row in rows]) + "\n",
        encoding="utf-8",
    )
    aliases_text = (EXAMPLES / "lims_aliases.toml").read_text(encoding="utf-8")
    wide = tmp_path / "wide.toml"
    wide.write_text(
        aliases_text.replace('ignore = ["Analyst", "Comments"]', f"ignore = {['Analyst', 'Comments', *unused]!r}"),
        encoding="utf-8",
    )
    events = _events(path, options=CsvOptions(aliases=load_aliases(wide), timezone="Europe/Paris"))
    assert [e.event_id for e in events] == ["LAB-FR-01:S-1", "LAB-FR-01:S-2"]
    assert [e.sample_type for e in events] == ["seized_material", "biological"]
    assert all((e.model_extra or {}) == {} for e in events)  # the ignored columns stay out

    records = list(read_records(str(path), options=CsvOptions(aliases=load_aliases(EXAMPLES / "lims_aliases.toml"))))
    problem = records[0].problem or ""
    assert len(records) == 2 and all(r.problem == problem for r in records)
    assert f"313 columns, 311 of them read (not in the alias file's `ignore`), at most {MAX_CSV_COLUMNS}" in problem
    assert "under `ignore` in the alias file" in problem


def test_a_spreadsheet_export_with_thousands_of_empty_trailing_columns_is_read() -> None:
    """Excel writes a delimiter for every column once formatted: a customs export of 7 columns came with
    16,000 empty ones after them, and since the 256-column cap every row was refused ('the CSV header has
    16,007 columns, at most 256'; read by the csv reader before). Unnamed columns at the header's end are no
    columns; the rows are read at the speed of plain ones (a filled cell past the header still gives a hint)."""
    import io
    import time

    from synthwatch.producers.readers import read_csv

    header = "event_id,kind,occurred_at,country,region,lab_id,sample_id,sample_type,method,substance.name"
    row = "E-{n},lab_detection,2026-03-02T10:00:00Z,FR,FR-75C,LAB-FR-01,S-{n},seized_material,GC-MS,x"
    body = header + "," * 16_000 + "\r\n" + "".join(row.format(n=n) + "," * 16_000 + "\r\n" for n in range(200))
    started = time.thread_time()
    records = list(read_csv(io.StringIO(body, newline=""), "f.csv"))
    spent = time.thread_time() - started
    assert [r.problem for r in records] == [None] * 200 and spent < 1.0, spent
    assert parse_event_object(records[-1].obj or {}).event_id == "E-199"
    assert parse_event_object(records[0].obj or {}).extra_fields == {}
    quoted = header + ",,\n" + row.format(n=1).replace(",x", ',"two\nlines"') + ",,\n"
    (spanning,) = read_csv(io.StringIO(quoted, newline=""), "f.csv")  # a row over two lines, trailing cells too
    assert spanning.problem is None and (spanning.obj or {})["substance"] == {"name": "two\nlines"}
    (filled,) = read_csv(io.StringIO(header + ",\n" + row.format(n=1).replace("x", "") + ",,lost\n", newline=""), "f")
    assert filled.hint is not None and "the row has 12 cells, the header 10" in filled.hint
