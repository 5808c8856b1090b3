"""The wire contract's fast path for backfills, checked inside ClickHouse: NDJSON lines to typed rows.

Why: in Python the contract costs ~15 µs a line (pydantic-core builds a Python object per field, then
the row is rebuilt as a tuple and converted to Arrow); the engine reads, parses and checks a line in
~2 µs of C++ on every core, with no object per field. This module only *accepts*: a line it accepts is
one :func:`~synthwatch.schemas.parse_event` accepts, with the same values (``ok = 1``). Anything else
(``ok = 0``: malformed, unknown fields, values to normalise, odd spellings of a valid value) goes back to
Python, whose verdict and reason stand. So the rule here is a conservative subset of the contract, in
its normal form: exact key sets, exact JSON types (no lax coercion), codes as listed, timestamps as
``YYYY-MM-DDTHH:MM:SS[.ffffff](Z|±HH:MM)``, text without surrounding whitespace (but for ASCII spaces
around a substance name, stripped here as the contract strips them: :data:`NAME`).
``tests/storage/test_history_sql.py`` checks it against ``parse_event`` on generated and mutated lines.

Only the embedded engine reads the file itself (``file()``); a server cannot see the loader's files.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime, timedelta
from typing import get_args

from synthwatch.schemas.events import (
    COUNTRY_CODES,
    EARLIEST_EVENT_TIME,
    LATEST_EVENT_TIME,
    SUBDIVISION_COUNTRY,
    Conveyance,
    QuantityUnit,
    SampleType,
)
from synthwatch.stream_apps.detect.identity import normalise_quantity

#: The parsed lines of one chunk: every line's number and verdict; the values only where ``ok = 1``.
#: ``smiles``/``inchikey`` hold '' for none (the contract refuses an empty one). ``ok = 2`` marks the
#: id of an event Python accepted (filled in later), so duplicates are found over both kinds of line.
PARSED_COLUMNS: list[tuple[str, str]] = [
    ("n", "UInt64"),
    ("ok", "UInt8"),
    ("raw", "String"),
    ("kind", "String"),
    ("event_id", "String"),
    ("occurred_at", "DateTime64(3, 'UTC')"),
    ("reported_at", "Nullable(DateTime64(3, 'UTC'))"),
    ("country", "String"),
    ("region", "String"),
    ("name", "String"),
    ("smiles", "String"),
    ("inchikey", "String"),
    ("cas", "Nullable(String)"),
    ("lab_id", "String"),
    ("sample_id", "String"),
    ("sample_type", "String"),
    ("method", "String"),
    ("confirmed", "Bool"),
    ("purity_pct", "Nullable(Float64)"),
    ("agency", "String"),
    ("seizure_id", "String"),
    ("border_point", "String"),
    ("conveyance", "String"),
    ("quantity_value", "Float64"),
    ("quantity_unit", "String"),
    ("origin_country", "String"),
    ("destination_country", "String"),
    ("extra", "String"),
]
PARSED_STRUCTURE = ", ".join(f"{name} {kind}" for name, kind in PARSED_COLUMNS)

# Keys each object must hold (each one's value check fails when it is missing: '' or NULL) and the
# nullable ones it may hold; see :func:`_members_ok`. The substance holds its name; a quantity its value and unit.
_COMMON_KEYS = ("kind", "event_id", "occurred_at", "country", "region", "substance")
_LAB_KEYS = (*_COMMON_KEYS, "lab_id", "sample_id", "sample_type", "method")
_LAB_OPTIONAL = ("t.reported_at", "t.confirmed", "t.purity_pct")
_SEIZURE_KEYS = (*_COMMON_KEYS, "agency", "seizure_id", "border_point", "conveyance", "quantity")
_SEIZURE_OPTIONAL = ("t.reported_at", "t.origin_country", "t.destination_country")
_SUBSTANCE_OPTIONAL = ("t.substance.smiles", "t.substance.inchikey", "t.substance.cas")
_EXTRACT = (
    "Tuple(kind String, event_id String, occurred_at String, reported_at Nullable(String), country String, "
    "region String, "
    "substance Tuple(name String, smiles Nullable(String), inchikey Nullable(String), cas Nullable(String)), "
    "lab_id String, sample_id String, sample_type String, method String, confirmed Nullable(Bool), "
    "purity_pct Nullable(Float64), agency String, seizure_id String, border_point String, conveyance String, "
    "quantity Tuple(value Float64, unit String), origin_country Nullable(String), "
    "destination_country Nullable(String))"
)
_TIMESTAMP = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]{1,6})?(Z|[-+][0-9]{2}:[0-9]{2})$"
_INCHIKEY = r"^[A-Z]{14}-[A-Z]{10}-[A-Z]$"
_CAS = r"^([0-9]{2,7})-([0-9]{2})-([0-9])$"


def sql_string(text: str) -> str:
    """A ClickHouse string literal of ``text`` (its UTF-8 bytes, non-printable ones escaped)."""
    out = []
    for byte in text.encode():
        if byte in (0x27, 0x5C) or byte < 0x20 or byte >= 0x7F:
            out.append(f"\\x{byte:02X}")
        else:
            out.append(chr(byte))
    return "'" + "".join(out) + "'"


def _strings(values: object) -> str:
    return ", ".join(sql_string(str(v)) for v in sorted(values))  # type: ignore[call-overload]


# Characters a text field may not start or end with here: whatever pydantic-core's strip (Rust's
# White_Space) or Python's str.strip() removes, and control characters (conservative).
_RUST_WHITE_SPACE = [*range(0x09, 0x0E), 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B), 0x2028, 0x2029]
_RUST_WHITE_SPACE += [0x202F, 0x205F, 0x3000]
_EDGE_CHARS = sorted(
    {chr(c) for c in range(0x20)}
    | {"\x7f"}
    | {chr(c) for c in _RUST_WHITE_SPACE}
    | {chr(c) for c in range(sys.maxunicode + 1) if chr(c).isspace()}
)


#: re2 twin of schemas.text.FORBIDDEN_PATTERN: control, line-separator and bidi-override characters anywhere in a
#: text field.
_FORBIDDEN_RE2 = r"[\x{0}-\x{1f}\x{7f}-\x{9f}\x{2028}\x{2029}\x{202a}-\x{202e}\x{2066}-\x{2069}]"


def _re2_class(chars: list[str]) -> str:
    """A re2 character class matching exactly ``chars`` (code points as ``\\x{...}``: no escaping pitfalls)."""
    return "[" + "".join(f"\\x{{{ord(c):x}}}" for c in chars) + "]"


#: One re2 pass per text field instead of five functions: a forbidden character anywhere, or an edge
#: character (see ``_EDGE_CHARS``) first or last. Same verdicts as the separate checks: ``^``/``$``
#: anchor at the whole value's ends (re2 has no multi-line mode here), and the values are valid UTF-8
#: (simdjson checks), so a class matches the same code points ``substringUTF8(..., 1)`` would return.
_TEXT_REFUSED_RE2 = f"^{_re2_class(_EDGE_CHARS)}|{_re2_class(_EDGE_CHARS)}$|{_FORBIDDEN_RE2}"


def _text_ok(value: str, most: int) -> str:
    return f"({value} != '' AND lengthUTF8({value}) <= {most} AND NOT match({value}, {sql_string(_TEXT_REFUSED_RE2)}))"


#: The substance name with the ASCII spaces around it removed (``trimBoth`` removes only those). Why: such
#: names are most of the valid lines the engine left to Python (~0.75 % of a simulated file, ~45 µs each there).
#: Same value as the contract's: it strips Unicode white space (pydantic-core's ``strip_whitespace``) before
#: its length and pattern checks, and ``_text_ok`` then refuses any white space or control character left
#: at either end, where the contract would have stripped further.
NAME = "trimBoth(t.substance.name)"


def _members_ok(required: int, optional: tuple[str, ...]) -> str:
    """The report, its substance and its quantity hold no other member than their known keys, each once.

    ``required`` keys are known to be there (the value checks refuse '' and NULL, what a missing key
    reads as); each nullable key counts when its value is not null. So a member count above that sum is an
    unknown, repeated or null-valued key: the line goes to Python (conservative: an explicit ``null``
    is judged there).

    The members of all three objects are counted at once, as the ``":`` in the raw line: every member's
    key ends with a quote followed by the colon (a quote followed by white space and a colon sends the
    line to Python: see :func:`_violations`), so no member is missed; a ``":`` inside a string or a nested
    object only counts more, which also sends the line to Python. One sum equals the sum of the known
    keys only when each object's count equals its own (each holds at least its known keys).
    Why one count over the raw text: ``JSONLength`` parsed the whole line again per object (four
    times a line, both kinds' checks being evaluated), ~15 % of the parse's CPU.
    """
    present = " + ".join(f"({value} IS NOT NULL)" for value in optional) or "0"
    return f"countSubstrings(line, '\":') = {required} + {present}"


def _unit_columns() -> tuple[str, str, str]:
    """grams, millilitres, units of ``quantity_value`` in ``quantity_unit``: the loader's pint factors."""
    grams, millilitres = [], []
    counts = []
    for unit in get_args(QuantityUnit):
        converted = normalise_quantity(1.0, unit)  # value * factor: 1.0 gives the factor itself
        if converted.grams is not None:
            grams.append(f"quantity_unit = {sql_string(unit)}, quantity_value * {converted.grams!r}")
        elif converted.millilitres is not None:
            millilitres.append(f"quantity_unit = {sql_string(unit)}, quantity_value * {converted.millilitres!r}")
        else:
            counts.append(sql_string(unit))
    return (
        f"multiIf({', '.join(grams)}, NULL)",
        f"multiIf({', '.join(millilitres)}, NULL)",
        f"if(quantity_unit IN ({', '.join(counts)}), quantity_value, NULL)",
    )


GRAMS, MILLILITRES, UNITS = _unit_columns()


def _timestamp(text: str, name: str) -> tuple[str, str]:
    """(the instant truncated to ms, its check) for ``text`` in the fast path's timestamp form.

    ClickHouse parses it; the check writes the parsed instant back in the text's own offset and compares
    (which refuses 24:00, :60 and dates such as Feb 30 that a parser may roll over), and the offset is
    under 24 h as pydantic requires.
    """
    p = f"{name}_p"
    offset = (
        f"if(endsWith({text}, 'Z'), 0, if(substring({text}, -6, 1) = '-', -1, 1) * "
        f"(toInt32OrZero(substring({text}, -5, 2)) * 3600 + toInt32OrZero(substring({text}, -2, 2)) * 60))"
    )
    micros = f"toUnixTimestamp64Micro({p})"
    check = (
        f"(match({text}, '{_TIMESTAMP}') AND (parseDateTime64BestEffortOrNull({text}, 6, 'UTC') AS {p}) IS NOT NULL "
        f"AND (endsWith({text}, 'Z') OR (toInt32OrZero(substring({text}, -5, 2)) < 24 "
        f"AND toInt32OrZero(substring({text}, -2, 2)) < 60)) "
        f"AND formatDateTime(addSeconds(assumeNotNull({p}), {offset}), '%Y-%m-%dT%H:%i:%S') "
        f"= substring({text}, 1, 19) "
        f"AND {micros} >= {int(EARLIEST_EVENT_TIME.timestamp()) * 1_000_000} "
        f"AND {micros} < {int(LATEST_EVENT_TIME.timestamp()) * 1_000_000})"
    )
    return f"fromUnixTimestamp64Milli(intDiv({micros}, 1000), 'UTC')", check


def _micros(instant: datetime) -> int:
    """``instant`` in whole microseconds since the epoch, exactly (a number: no text reaches the SQL)."""
    return (instant - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)


def _violations() -> str:
    """One regex over the raw line matching any value of the wrong JSON type for its key.

    A ``"key":`` can only be a key (a quote inside a string is escaped), so this reads the types
    without a second parse; every string field must hold a string, nullable ones a string or null.
    A key spelt with a ``\\u`` escape would hide from it, so any such key matches too (and goes to Python);
    so does white space between a key and its colon, which the member count would not see.
    """
    strings = "kind|event_id|occurred_at|country|region|lab_id|sample_id|sample_type|method|agency|seizure_id"
    strings += "|border_point|conveyance|name|unit"
    nullable = "reported_at|origin_country|destination_country|smiles|inchikey|cas"
    return "|".join(
        [
            f'"({strings})"\\\\s*:\\\\s*[^"\\\\s]',
            f'"({nullable})"\\\\s*:\\\\s*[^"n\\\\s]',
            '"confirmed"\\\\s*:\\\\s*[^tf\\\\s]',
            '"purity_pct"\\\\s*:\\\\s*[^-0-9n\\\\s]',
            '"value"\\\\s*:\\\\s*[^-0-9\\\\s]',
            '"(substance|quantity)"\\\\s*:\\\\s*[^{\\\\s]',
            '\\\\\\\\u[^"]*"\\\\s*:',
            '"\\\\s+:',  # white space before a colon: the member count (``_members_ok``) looks for '":'
        ]
    )


#: The free-text fields each kind holds in the same place, lab detection's first: the engine checks the
#: pair's field of the line's own kind (``if(is_lab, ...)``), once per row. Why: short-circuiting is off
#: (:data:`PARSE_SETTINGS`), so a check inside one kind's branch of the ``multiIf`` ran on every row,
#: on the other kind's empty value too: six text regexes a line where three decide.
_KIND_TEXT = (("lab_id", "agency"), ("sample_id", "seizure_id"), ("method", "border_point"))


def parse_select(source: str, max_bytes: int | None = None, latest: datetime | None = None) -> str:
    """``SELECT`` of :data:`PARSED_STRUCTURE` from ``source``, a query giving ``n UInt64, line String``.

    Run it with :data:`PARSE_SETTINGS`: ``short_circuit_function_evaluation = 'disable'`` (evaluated
    lazily, the checks cost ~40x more; every function here is safe on any input) and simdjson.
    ``max_bytes``: a longer line is left to Python, which refuses it with the publisher's reason (known
    fields are bounded, but JSON whitespace is not).
    ``latest``: a line whose event time is after it is left to Python, which refuses it with the worker's reason
    (``check_event_time``: more than ``SYNTHWATCH_MAX_FUTURE_HOURS`` after the file's receipt).
    """
    occurred, occurred_ok = _timestamp("t.occurred_at", "occ")
    reported, reported_ok = _timestamp("ifNull(t.reported_at, '')", "rep")
    text = _text_ok
    common = " AND ".join(
        [
            *([f"length(line) <= {int(max_bytes)}"] if max_bytes is not None else []),
            "startsWith(line, '{')",  # no BOM (simdjson skips one, jiter refuses it) nor leading whitespace
            f"NOT match(line, '{_violations()}')",
            text("t.event_id", 500),
            occurred_ok,
            *([f"toUnixTimestamp64Micro(occ_p) <= {_micros(latest)}"] if latest is not None else []),
            f"(t.reported_at IS NULL OR {reported_ok})",
            "t.country IN countries",
            "concat(t.region, ' ', t.country) IN regions",
            text("name_stripped", 500),
            f"(t.substance.smiles IS NULL OR {text('assumeNotNull(t.substance.smiles)', 2000)})",
            f"(t.substance.inchikey IS NULL OR match(assumeNotNull(t.substance.inchikey), '{_INCHIKEY}'))",
            "(t.substance.cas IS NULL OR cas_ok)",
            # The three free-text fields of the line's own kind, picked per row (see ``_KIND_TEXT``).
            *(text(f"if(is_lab, t.{lab}, t.{seizure})", 500) for lab, seizure in _KIND_TEXT),
        ]
    )
    lab = " AND ".join(
        [
            _members_ok(len(_LAB_KEYS) + 1, (*_LAB_OPTIONAL, *_SUBSTANCE_OPTIONAL)),
            f"t.sample_type IN ({_strings(get_args(SampleType))})",
            "(t.purity_pct IS NULL OR (t.purity_pct >= 0 AND t.purity_pct <= 100))",
        ]
    )
    seizure = " AND ".join(
        [
            _members_ok(len(_SEIZURE_KEYS) + 1 + 2, (*_SEIZURE_OPTIONAL, *_SUBSTANCE_OPTIONAL)),
            f"t.conveyance IN ({_strings(get_args(Conveyance))})",
            f"t.quantity.unit IN ({_strings(get_args(QuantityUnit))})",
            "t.quantity.value > 0 AND t.quantity.value <= 1e9",
            "(t.origin_country IS NULL OR t.origin_country IN countries)",
            "(t.destination_country IS NULL OR t.destination_country IN countries)",
        ]
    )
    cas_digits = "reverse(concat(cas_g[1], cas_g[2]))"
    cas_ok = (
        f"(length(extractGroups(ifNull(t.substance.cas, ''), '{_CAS}') AS cas_g) = 3 AND "
        f"arraySum(arrayMap(i -> toUInt8OrZero(substring({cas_digits}, i, 1)) * i, "
        f"range(1, length({cas_digits}) + 1))) % 10 = toUInt8OrZero(cas_g[3]))"
    )
    return f"""
WITH
    ({_strings(COUNTRY_CODES)}) AS countries,
    ({_strings(f"{r} {c}" for r, c in SUBDIVISION_COUNTRY.items())}) AS regions,
    JSONExtract(line, '{_EXTRACT}') AS t,
    t.kind = 'lab_detection' AS is_lab,
    {NAME} AS name_stripped,
    {cas_ok} AS cas_ok,
    ({common}) AND multiIf(is_lab, {lab}, t.kind = 'border_seizure', {seizure}, false) AS accepted
SELECT
    n,
    accepted AS ok,
    if(accepted, '', line) AS raw,
    t.kind AS kind,
    t.event_id AS event_id,
    ifNull({occurred}, toDateTime64(0, 3, 'UTC')) AS occurred_at,
    if(t.reported_at IS NULL, NULL, {reported}) AS reported_at,
    t.country AS country,
    t.region AS region,
    name_stripped AS name,
    ifNull(t.substance.smiles, '') AS smiles,
    ifNull(t.substance.inchikey, '') AS inchikey,
    t.substance.cas AS cas,
    t.lab_id AS lab_id,
    t.sample_id AS sample_id,
    t.sample_type AS sample_type,
    t.method AS method,
    ifNull(t.confirmed, true) AS confirmed,
    t.purity_pct AS purity_pct,
    t.agency AS agency,
    t.seizure_id AS seizure_id,
    t.border_point AS border_point,
    t.conveyance AS conveyance,
    t.quantity.value AS quantity_value,
    t.quantity.unit AS quantity_unit,
    ifNull(t.origin_country, '') AS origin_country,
    ifNull(t.destination_country, '') AS destination_country,
    '{{}}' AS extra
FROM ({source})
"""


#: ``allow_simdjson``: the rule leans on simdjson (it validates UTF-8 and rounds numbers correctly, as
#: jiter does); the engine's other JSON parser, rapidjson, accepts overlong UTF-8 and is off by an ulp.
PARSE_SETTINGS = {"short_circuit_function_evaluation": "disable", "allow_simdjson": 1}


def regions_rows() -> list[tuple[str, str]]:
    """(region, country) of every subdivision the contract accepts: the ``regions`` lookup table."""
    return sorted(SUBDIVISION_COUNTRY.items())
