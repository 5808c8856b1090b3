"""Reading input files: NDJSON (one event per line) and CSV (dotted headers such as ``substance.name``).

Readers never judge a record's content; they say where each one came from (``file:line``) so that a
reject can be traced back, and when a row cannot be read at all (a cell over the size limit, a header
nested too deep, bytes that are not in the file's encoding) they hand on a record carrying the
``problem``: the publisher rejects it with that reason and the run goes on. Validation is the
publisher's job.

CSV files are read as LIMS and spreadsheets export them (the issue's lab lost every row to a UTF-8 BOM):
a BOM is dropped, the delimiter is sniffed from the header (``,`` ``;`` tab ``|``), header names match
the contract's fields whatever their case, an alias file maps a LIMS's own headers and adds constant
fields, codes (``KG``, ``Air``) are lower-cased, decimal commas become points, and dates without an
offset are read in a stated time zone (UTC unless told). When a row still fails, ``hint`` names the
likely cause found in the header, and the publisher adds it to the reason.
"""

from __future__ import annotations

import csv
import io
import json
import re
import sys
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, time
from pathlib import Path
from typing import IO, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from synthwatch.errors import SynthwatchError

InputFormat = Literal["ndjson", "csv"]


@dataclass(slots=True, frozen=True)
class InputRecord:
    """One input record: raw text for NDJSON, a decoded object for CSV rows."""

    source: str
    raw: str
    obj: dict[str, Any] | None = None
    problem: str | None = None  # the row could not be read; the reason of its reject
    hint: str | None = None  # the likely cause when this row is refused (e.g. the header lacks a column)


#: Dotted CSV headers nest at most this deep (``substance.name`` is 2): a header nested 60,000 levels
#: deep made building the row hit Python's recursion limit. ``Settings.max_csv_header_depth``.
MAX_HEADER_DEPTH = 8
#: Columns of a CSV header at most (the contract has 24 fields, a record at most 64 unknown ones): a row is
#: built cell by cell (~0.4-1 us each), so 17 rows of 200,000 filled cells (8 MiB) took 3.85 CPU s for 17
#: records charged, against 0.2 s for 10,000 plain rows; bounded, a row costs at most this many cells.
MAX_CSV_COLUMNS = 256
#: Longest CSV cell read, in characters (Python's csv module stops at 128 KiB with an exception).
MAX_FIELD_CHARS = 512 * 1024


#: Delimiters sniffed from a CSV header, in order of preference when counts tie.
DELIMITERS = (",", ";", "\t", "|")
#: Fields holding codes the contract spells in lower case: "KG", "Air", "Seized_Material" are accepted.
LOWER_CASE_CODES = frozenset({"kind", "sample_type", "conveyance", "quantity.unit"})
#: Numeric fields where a decimal comma ("12,5", European spreadsheets) means a decimal point.
DECIMAL_FIELDS = frozenset({"quantity.value", "purity_pct"})
#: Timestamp fields; a date alone or a time without offset is read in the reader's time zone.
TIME_FIELDS = frozenset({"occurred_at", "reported_at"})
#: Every field of the contract, to match a header whatever its case ("Event_ID" -> "event_id").
KNOWN_FIELDS = frozenset(
    {"event_id", "kind", "occurred_at", "reported_at", "country", "region", "lab_id", "sample_id", "sample_type"}
    | {"method", "confirmed", "purity_pct", "agency", "seizure_id", "border_point", "conveyance"}
    | {"origin_country", "destination_country", "quantity.value", "quantity.unit"}
    | {"substance.name", "substance.smiles", "substance.inchikey", "substance.cas"}
)
REQUIRED_FIELDS = frozenset({"event_id", "kind", "occurred_at", "country", "region"})
_DECIMAL_COMMA = re.compile(r"^\s*[+-]?\d{1,3}(?:[ .\u00a0\u202f]\d{3})*,\d+\s*$|^\s*[+-]?\d+,\d+\s*$")
_TEMPLATE = re.compile(r"\{([^{}]{1,100})\}")


class ReaderError(SynthwatchError, ValueError):
    """The input cannot be read as asked (an unknown encoding or time zone, a bad alias file)."""


@dataclass(frozen=True, slots=True)
class Aliases:
    """A LIMS export's own headers mapped to the contract, plus fields every row gets.

    ``columns``: header (any case) -> contract field (``"Sample ID" = "sample_id"``); ``defaults``:
    field -> value for every row that has none, where ``{Header}`` is replaced by that row's cell
    (``event_id = "LAB-FR-01:{Sample ID}"``); ``values``: field -> {cell text (any case) -> code}
    (``Matrice = {"Saisie" = "seized_material"}``); ``ignore``: headers left out.
    """

    columns: Mapping[str, str] = field(default_factory=dict)
    defaults: Mapping[str, str] = field(default_factory=dict)
    values: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    ignore: frozenset[str] = frozenset()


def load_aliases(path: Path) -> Aliases:
    """Parse a header-alias file (TOML: ``[columns]``, ``[defaults]``, ``[values.FIELD]``, ``ignore``)."""
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise ReaderError(f"alias file {path}: {error}") from error
    unknown = set(document) - {"columns", "defaults", "values", "ignore"}
    if unknown:
        raise ReaderError(
            f"alias file {path}: unknown section(s) {sorted(unknown)}; use columns, defaults, values, ignore"
        )

    def table(name: str) -> dict[str, Any]:
        value = document.get(name, {})
        if not isinstance(value, dict):
            raise ReaderError(f"alias file {path}: [{name}] must be a table")
        return value

    columns, defaults, values = table("columns"), table("defaults"), table("values")
    for name, mapping in (("columns", columns), ("defaults", defaults)):
        bad = [k for k, v in mapping.items() if not isinstance(v, str)]
        if bad:
            raise ReaderError(f"alias file {path}: [{name}] values must be text, not for {bad}")
    for target, mapping in values.items():
        if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
            raise ReaderError(f"alias file {path}: [values.{target}] maps cell text to a code (text)")
    ignore = document.get("ignore", [])
    if not isinstance(ignore, list) or not all(isinstance(v, str) for v in ignore):
        raise ReaderError(f"alias file {path}: ignore is a list of header names")
    return Aliases(
        columns={_fold(k): v.strip() for k, v in columns.items()},
        defaults={k.strip(): v for k, v in defaults.items()},
        values={k.strip(): {_fold(cell): code for cell, code in v.items()} for k, v in values.items()},
        ignore=frozenset(_fold(v) for v in ignore),
    )


def _fold(text: str) -> str:
    return " ".join(text.split()).casefold()


@dataclass(frozen=True, slots=True)
class CsvOptions:
    """How to read a CSV export: delimiter (None: sniffed), time zone of offset-less dates, aliases."""

    delimiter: str | None = None
    timezone: str = "UTC"
    aliases: Aliases | None = None

    def zone(self) -> ZoneInfo:
        try:
            return ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError) as error:
            raise ReaderError(
                f"unknown time zone {self.timezone!r}; use an IANA name such as UTC, Europe/Paris, Africa/Bamako"
            ) from error


def detect_format(path: str) -> InputFormat:
    return "csv" if path.lower().endswith((".csv", ".tsv")) else "ndjson"


def check_encoding(encoding: str | None) -> None:
    """Refuse an encoding Python does not know, with what to pass instead."""
    if encoding is None:
        return
    try:
        "".encode(encoding)
    except LookupError as error:
        raise ReaderError(f"unknown encoding {encoding!r}; e.g. utf-8, cp1252 (Windows), latin-1") from error


def _open(path: str, encoding: str | None = None) -> IO[str]:
    """Text of a file (``-``: standard input): ``encoding``, else UTF-8 with an optional BOM dropped.

    Bytes that are not UTF-8 are kept as surrogates, so the rows holding them are rejected with a hint
    (see :func:`undecodable_hint`) and the other rows still go through.
    """
    errors = "strict" if encoding else "surrogateescape"
    name = encoding or "utf-8-sig"
    if path == "-":
        return io.TextIOWrapper(sys.stdin.buffer, encoding=name, errors=errors, newline="")
    return open(Path(path), encoding=name, errors=errors, newline="")


def undecodable_hint(text: str) -> str | None:
    """Why a line holds bytes that are not UTF-8, and what to do: most often a Latin-1 / Windows export."""
    found = re.search(r"[\udc80-\udcff]", text)
    if found is None:
        return None
    byte = ord(found.group()) - 0xDC00
    return (
        f"byte 0x{byte:02x} is not UTF-8: the file looks like Latin-1 or Windows-1252 (Excel's 'CSV'); "
        "re-export it as UTF-8 or pass --encoding cp1252"
    )


def read_ndjson(stream: IO[str], name: str) -> Iterator[InputRecord]:
    """Every non-blank line is a record (a bad line becomes a reject downstream, never a stop)."""
    for number, line in enumerate(stream, start=1):
        text = line.rstrip("\r\n")
        if number == 1:
            text = text.removeprefix("\ufeff")
        if text.strip():
            problem = undecodable_hint(text)
            yield InputRecord(source=f"{name}:{number}", raw=text, problem=problem)


def sniff_delimiter(header: str) -> str:
    """The delimiter of a CSV header line: the candidate found most often (``,`` when none is)."""
    counts = {d: header.count(d) for d in DELIMITERS}
    best = max(DELIMITERS, key=lambda d: counts[d])
    return best if counts[best] else ","


def _nest(row: dict[str, str]) -> dict[str, Any]:
    """``{"substance.name": "x"}`` -> ``{"substance": {"name": "x"}}``; empty cells are left out."""
    nested: dict[str, Any] = {}
    for column, value in row.items():
        if column is None or value is None or value == "":
            continue
        target = nested
        *parents, leaf = column.strip().split(".")
        for part in parents:
            child = target.setdefault(part, {})
            if not isinstance(child, dict):
                child = target[part] = {}
            target = child
        target[leaf] = value
    return nested


def _too_deep(fieldnames: Sequence[str] | None, max_depth: int) -> str | None:
    """The reason rows of this header cannot be read, when a column nests deeper than ``max_depth``."""
    for column in fieldnames or []:
        if column is not None and column.count(".") + 1 > max_depth:
            shown = column if len(column) <= 40 else column[:40] + f"... ({len(column):,} characters)"
            return (
                f"CSV header {shown!r} nests {column.count('.') + 1:,} levels, at most {max_depth} "
                "(SYNTHWATCH_MAX_CSV_HEADER_DEPTH); fix the header row"
            )
    return None


def _field_of(column: str, aliases: Aliases | None) -> str | None:
    """The contract field a header names (alias first, then any case of a known field); None: ignored."""
    folded = _fold(column)
    if aliases is not None:
        if folded in aliases.ignore:
            return None
        if folded in aliases.columns:
            return aliases.columns[folded]
    known = folded.replace(" ", "_")
    return known if known in KNOWN_FIELDS else column.strip()


def header_hint(
    fieldnames: Sequence[str], fields: Sequence[str | None], options: CsvOptions, delimiter: str
) -> str | None:
    """The likely cause, found in the header, of rows being refused (None when the header looks right)."""
    if len(fieldnames) == 1:
        others = [d for d in DELIMITERS if d != delimiter and d in fieldnames[0]]
        shown = fieldnames[0] if len(fieldnames[0]) <= 60 else fieldnames[0][:60] + "..."
        if others:
            sep = "tab" if others[0] == "\t" else repr(others[0])
            return f"the header has 1 column ({shown!r}): is the file separated by {sep}? pass --delimiter"
        return f"the header has 1 column ({shown!r}): is the first line the header row?"
    present = {f for f in fields if f is not None} | set(options.aliases.defaults if options.aliases else ())
    missing = sorted(REQUIRED_FIELDS - present)
    if missing:
        return (
            f"the header has no column for {', '.join(missing)}: name the columns as the contract does, or map "
            "them (and add constants such as kind) with --aliases FILE (docs/examples/lims_aliases.toml)"
        )
    return None


def _local_time(text: str, zone: ZoneInfo) -> str:
    """A date or an offset-less date-time read in ``zone`` (RFC 3339 out); anything else is left as it is."""
    value = text.strip()
    try:
        if len(value) == 10:
            day = date.fromisoformat(value)
            return datetime.combine(day, time(0), tzinfo=zone).isoformat()
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return text
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=zone).isoformat()
    return text


def _cell(target: str, value: str, options: CsvOptions, zone: ZoneInfo) -> str:
    """One cell in the contract's spelling: mapped value, lower-case code, decimal point, zoned time."""
    aliases = options.aliases
    if aliases is not None and target in aliases.values:
        value = aliases.values[target].get(_fold(value), value)
    if target in LOWER_CASE_CODES:
        return value.strip().lower()
    if target in DECIMAL_FIELDS and _DECIMAL_COMMA.match(value):
        return re.sub(r"[ .\u00a0\u202f]", "", value.strip()).replace(",", ".")
    if target in TIME_FIELDS:
        return _local_time(value, zone)
    return value


def _fill(template: str, row: Mapping[str, str]) -> str | None:
    """A default's ``{Header}`` references replaced by the row's cells (plain lookup, no format language);
    None when a referenced cell is empty, so ``"LAB:{Sample ID}"`` never makes the id ``"LAB:"``."""
    folded = {_fold(k): v.strip() for k, v in row.items() if k is not None}
    refs = [_fold(m) for m in _TEMPLATE.findall(template)]
    if any(not folded.get(ref) for ref in refs):
        return None
    return _TEMPLATE.sub(lambda m: folded[_fold(m.group(1))], template)


def _too_wide(columns: int, read: int, aliases: Aliases | None) -> str:
    """Why rows of a header with more columns read than :data:`MAX_CSV_COLUMNS` are refused, and what to do."""
    if aliases is None:
        return (
            f"the CSV header has {columns:,} columns, at most {MAX_CSV_COLUMNS:,} are read: is the first line the "
            "header row? leave out the columns that are not reports' fields (synthwatch publish: or list them "
            "under `ignore` in an --aliases file, docs/examples/lims_aliases.toml)"
        )
    return (
        f"the CSV header has {columns:,} columns, {read:,} of them read (not in the alias file's `ignore`), at "
        f"most {MAX_CSV_COLUMNS:,}: list the columns that are not reports' fields under `ignore` in the alias file"
    )


def _referenced_columns(fieldnames: Sequence[str], aliases: Aliases | None) -> list[int]:
    """Indices of the columns the alias file's defaults name (``{Sample ID}``): only those are looked up per row."""
    if aliases is None or not aliases.defaults:
        return []
    names = {_fold(ref) for template in aliases.defaults.values() for ref in _TEMPLATE.findall(template)}
    return [index for index, column in enumerate(fieldnames) if _fold(column) in names]


def read_csv(
    stream: IO[str],
    name: str,
    max_depth: int = MAX_HEADER_DEPTH,
    max_field: int = MAX_FIELD_CHARS,
    options: CsvOptions | None = None,
) -> Iterator[InputRecord]:
    """Rows of a CSV file with a header; line numbers count the header as line 1, a row is numbered by the
    line it starts on.

    A row that cannot be read becomes a record with a ``problem`` (never an exception that ends the run).
    A quoted cell may hold line breaks (RFC 4180: LIMS comment columns do), over at most
    :data:`MAX_QUOTED_LINES` lines and never over a line that is a whole row on its own: a quote left open
    costs its own line only (the plain csv reader took every later row into that cell).
    """
    options = options or CsvOptions()
    zone = options.zone()
    csv.field_size_limit(max_field)
    first = stream.readline()
    if not first.strip():
        return
    first = first.removeprefix("\ufeff")
    delimiter = options.delimiter or sniff_delimiter(first)
    header = _cells(first, delimiter)
    if isinstance(header, str):
        yield InputRecord(source=f"{name}:1", raw=first.rstrip("\r\n"), problem=f"CSV header unreadable: {header}")
        return
    # A spreadsheet's "CSV" has a delimiter for every column once formatted (16,000 trailing ones are seen):
    # columns with no name at the header's end are no columns, their cells are read as cells past the header.
    width = len(header)
    while width > 1 and not header[width - 1].strip():
        width -= 1
    fieldnames = header[:width]
    aliases = options.aliases
    # Without aliases every column is read; with them, only those not in `ignore` (a LIMS export has hundreds
    # of columns, most of them ignored), so a row costs at most MAX_CSV_COLUMNS cells built either way.
    unmapped = aliases is None and len(fieldnames) > MAX_CSV_COLUMNS  # not even mapped: each is read
    fields: list[str | None] = [] if unmapped else [_field_of(column, aliases) for column in fieldnames]
    read = [(index, target) for index, target in enumerate(fields) if target is not None]
    hint: str | None = None
    if unmapped or len(read) > MAX_CSV_COLUMNS:  # every row refused with the reason, no row built
        header_problem: str | None = _too_wide(len(fieldnames), len(read), aliases)
    else:
        header_problem = _too_deep([target for _, target in read], max_depth)
        hint = header_hint(fieldnames, fields, options, delimiter)
    referenced = _referenced_columns(fieldnames, aliases)
    lines = _Lines(stream, start=2)
    for number, line in lines:
        text = line.rstrip("\r\n")
        if not text.strip():
            continue
        source = f"{name}:{number}"
        cells = _cells(text, delimiter)
        if cells is _QUOTE_LEFT_OPEN:
            cells = _spanning(line, lines, delimiter, len(fieldnames))
        if isinstance(cells, str):
            yield InputRecord(source=source, raw=text, problem=f"CSV row unreadable: {cells}")
            continue
        if not any(map(str.strip, cells)):  # at C speed: a row may be thousands of empty cells
            continue
        if header_problem is not None:
            yield InputRecord(source=source, raw=delimiter.join(cells), problem=header_problem)
            continue
        raw = delimiter.join(cells)
        undecodable = undecodable_hint(raw)
        if undecodable is not None:
            yield InputRecord(source=source, raw=raw, problem=f"{undecodable} (line {number})")
            continue
        yield _row_record(source, fieldnames, read, referenced, cells, options, zone, hint)


#: Physical lines one quoted cell may span at most (a comment typed over several lines).
MAX_QUOTED_LINES = 20

_QUOTE_LEFT_OPEN = (
    "a quote opens a cell and does not close it: not on this line, and not within the next lines before "
    f"a whole row or {MAX_QUOTED_LINES} lines in all (a quoted cell may hold line breaks up to that); close "
    'the quote, or double a quote inside a quoted cell: "say ""hi"""'
)


class _Lines:
    """Numbered physical lines of a stream, with lines read ahead given back."""

    def __init__(self, stream: IO[str], start: int) -> None:
        self._lines = enumerate(stream, start=start)
        self._back: list[tuple[int, str]] = []

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> tuple[int, str]:
        return self._back.pop() if self._back else next(self._lines)

    def give_back(self, taken: list[tuple[int, str]]) -> None:
        self._back.extend(reversed(taken))


def _spanning(first: str, lines: _Lines, delimiter: str, width: int) -> list[str] | str:
    """The cells of a row whose quoted cell continues on the next lines (RFC 4180), or why it is not one.

    It is one only when the quote closes within :data:`MAX_QUOTED_LINES` lines, none of the lines it takes
    is a whole row on its own (as many cells as the header and its quotes paired: a line closing the quote
    left open has an odd number), and the row then has at least the header's cells: else
    the lines read ahead are given back and only ``first`` is refused. Each read-ahead is bounded, so a body
    of quotes left open costs at most ``MAX_QUOTED_LINES`` lines read per line."""
    taken: list[tuple[int, str]] = []

    def feed() -> Iterator[str]:
        yield first
        for number, line in lines:
            taken.append((number, line))
            alone = _cells(line.rstrip("\r\n"), delimiter)
            # a row of its own is never taken into an earlier row's cell; a line with an odd number of quotes
            # is not one: it closes the open cell (its first cell continues it: 'in a box";E-1;...')
            if not isinstance(alone, str) and len(alone) >= width and line.count('"') % 2 == 0:
                return
            yield line
            if len(taken) + 1 >= MAX_QUOTED_LINES:
                return

    reader = csv.reader(feed(), delimiter=delimiter, strict=True)
    try:
        cells = next(reader, None)
    except csv.Error as error:
        cells = None
        if "field larger than field limit" in str(error):
            lines.give_back(taken)
            return f"{error} (SYNTHWATCH_MAX_CSV_FIELD_BYTES)"
    if cells is None or len(cells) < width or reader.line_num != len(taken) + 1:
        lines.give_back(taken)
        return _QUOTE_LEFT_OPEN
    return cells


def _cells(line: str, delimiter: str) -> list[str] | str:
    """The cells of one physical line, or why it cannot be read (a quote left open: :data:`_QUOTE_LEFT_OPEN`,
    a cell over the limit). Other quoting slips (``"ab"c``) are read as before, leniently."""
    text = line.rstrip("\r\n")
    try:
        return next(csv.reader([text], delimiter=delimiter, strict=True), [])
    except csv.Error as error:
        if "unexpected end of data" in str(error):
            return _QUOTE_LEFT_OPEN
        if "field larger than field limit" in str(error):
            return f"{error} (SYNTHWATCH_MAX_CSV_FIELD_BYTES)"
    try:
        return next(csv.reader([text], delimiter=delimiter), [])
    except csv.Error as error:
        return str(error)


def _row_record(
    source: str,
    fieldnames: Sequence[str],
    read: Sequence[tuple[int, str]],
    referenced: Sequence[int],
    cells: Sequence[str],
    options: CsvOptions,
    zone: ZoneInfo,
    hint: str | None,
) -> InputRecord:
    """One row as a record: cells under their contract fields, defaults added, values normalised. Only the
    columns read (``read``: index, field) and those the defaults name (``referenced``) are looked at."""
    row: dict[str, str] = {}
    extra = len(cells) - len(fieldnames)
    for index, target in read:
        if index >= len(cells):
            break
        value = cells[index]
        if value.strip() != "":
            row[target] = _cell(target, value, options, zone)
    if options.aliases is not None:
        by_header = {fieldnames[index]: cells[index] for index in referenced if index < len(cells)}
        for target, template in options.aliases.defaults.items():
            filled = _fill(template, by_header) if target not in row else None
            if filled is not None:
                row[target] = _cell(target, filled, options, zone)
    if hint is None and extra > 0 and any(map(str.strip, cells[len(fieldnames) :])):
        hint = (
            f"the row has {len(cells)} cells, the header {len(fieldnames)}: a cell holding the delimiter must be quoted"
        )
    obj = _nest(row)
    return InputRecord(source=source, raw=json.dumps(obj, ensure_ascii=False), obj=obj, hint=hint)


def read_records(
    path: str,
    fmt: InputFormat | None = None,
    *,
    max_depth: int = MAX_HEADER_DEPTH,
    max_field: int = MAX_FIELD_CHARS,
    encoding: str | None = None,
    options: CsvOptions | None = None,
) -> Iterator[InputRecord]:
    """Records of a file (or ``-`` for standard input) in file order."""
    fmt = fmt or detect_format(path)
    name = "stdin" if path == "-" else Path(path).name
    check_encoding(encoding)
    with _open(path, encoding) as stream:
        try:
            if fmt == "csv":
                yield from read_csv(stream, name, max_depth, max_field, options)
            else:
                yield from read_ndjson(stream, name)
        except UnicodeDecodeError as error:
            raise ReaderError(
                f"{name} is not {encoding}: {error.reason} at byte {error.start:,}; check --encoding"
            ) from error
