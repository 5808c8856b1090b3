"""How read commands print their rows: a Rich table for a person, or CSV / JSON for a program.

Why: analysts pipe ``alerts``, ``stats`` and ``sql`` into spreadsheets and scripts, where a box-drawn
table is noise and report fields (hostile: commas, quotes, newlines, control characters) must arrive
intact. CSV goes through :mod:`csv` and JSON through :mod:`json`, never through string formatting.
Written to a terminal, control characters in CSV cells are shown escaped (as in tables) so none reaches
the terminal as a command; written to a file or a pipe, every value is exactly what is stored, but for one
thing: a text cell that a spreadsheet would run as a formula (it starts with ``=``, ``+``, ``-``, ``@``, a tab
or a carriage return) gets a leading apostrophe. A lab may name a substance ``=HYPERLINK("https://…?"&A2,"3-MMC")``;
opened in Excel or LibreOffice, the analyst's export sent its neighbouring cells to that address on a click
(and ``=WEBSERVICE(…)`` needs no click). JSON carries every value exactly.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from collections.abc import Callable, Collection, Iterable, Sequence
from enum import StrEnum
from typing import Annotated, Any, TextIO

import typer
from rich.console import Console, JustifyMethod, OverflowMethod, RenderableType
from rich.table import Table
from rich.text import Text

from synthwatch.schemas.text import jsonable, visible


class OutputFormat(StrEnum):
    """What a read command prints."""

    table = "table"
    csv = "csv"
    json = "json"


FormatOption = Annotated[
    OutputFormat,
    typer.Option(
        "--format",
        case_sensitive=False,
        help="table (for people), csv (for spreadsheets: a text cell starting with = + - @ gets a leading ' so it "
        "is never run as a formula) or json (for programs: every value whole and exact).",
    ),
]

#: Characters json.dumps(ensure_ascii=False) leaves raw that a terminal would obey: DEL, C1 controls
#: (0x9b is CSI), bidi overrides and isolates. Inside JSON they can only be in strings, where ``\\uXXXX``
#: means the same character.
_JSON_UNSAFE = re.compile("[\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\u2028\u2029]")


def plural(count: int, singular: str, plural_form: str | None = None) -> str:
    """``1 report``, ``2 reports``, ``1,204 reports``: English count and noun agree."""
    noun = singular if count == 1 else (plural_form or singular + "s")
    return f"{count:,} {noun}"


def to_json(data: Any) -> str:
    """``data`` as JSON text: UTF-8 as is, every character a terminal would obey escaped."""
    text = json.dumps(jsonable(data), ensure_ascii=False, indent=2)
    return _JSON_UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


#: First characters that make a spreadsheet read a text cell as a formula (OWASP, "CSV injection").
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _csv_cell(value: Any, escape: bool) -> Any:
    if value is None:
        return ""
    value = jsonable(value)
    if isinstance(value, list | dict):
        value = json.dumps(value, ensure_ascii=False)
    if not isinstance(value, str):
        return value  # numbers are numbers: -3 is not a formula
    if value.startswith(FORMULA_STARTS):
        value = "'" + value  # shown as text, the apostrophe hidden, by Excel and LibreOffice
    return visible(value) if escape else value


def write_csv(columns: Sequence[str], rows: Iterable[Sequence[Any]], stream: TextIO | None = None) -> None:
    """A header line and one record per row (RFC 4180 quoting; None as an empty field; a text cell a spreadsheet
    would run as a formula starts with an apostrophe)."""
    out = stream or sys.stdout
    escape = out.isatty()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([_csv_cell(c, escape) for c in columns])
    for row in rows:
        writer.writerow([_csv_cell(v, escape) for v in row])


def rich_table(
    title: str | Text | None,
    columns: Sequence[str],
    rows: Iterable[Sequence[RenderableType]],
    *,
    right: Collection[str] = (),
    overflow: OverflowMethod = "ellipsis",
    title_justify: JustifyMethod = "center",
) -> Table:
    """The table a read command prints for a person: ``columns`` as headers, left-aligned but those named in
    ``right`` (numbers), then ``rows``, whose cells the caller has made safe (:func:`synthwatch.terminal.plain`).

    Why one builder: every read command's table has this one shape, and the options stay Rich's own.
    """
    table = Table(title=title, title_justify=title_justify)
    for column in columns:
        table.add_column(column, justify="right" if column in right else "left", overflow=overflow)
    for row in rows:
        table.add_row(*row)
    return table


def emit(
    fmt: OutputFormat,
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    table: Callable[[], Table],
    console: Console,
    stream: TextIO | None = None,
) -> None:
    """Print rows as ``fmt``: the Rich table ``table()`` builds, CSV with a header, or a JSON list of objects."""
    out = stream or sys.stdout
    if fmt is OutputFormat.csv:
        write_csv(columns, rows, out)
    elif fmt is OutputFormat.json:
        out.write(to_json([dict(zip(columns, row, strict=True)) for row in rows]) + "\n")
    else:
        console.print(table())
