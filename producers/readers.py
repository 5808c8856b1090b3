"""Reading input files: NDJSON (one event per line) and CSV (dotted headers such as ``substance.name``).

Readers never judge a record's content; they say where each one came from (``file:line``) so that a
reject can be traced back, and when a row cannot be read at all (a cell over the size limit, a header
nested too deep) they hand on a record carrying the ``problem``: the publisher rejects it with that
reason and the run goes on. Validation is the publisher's job.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

InputFormat = Literal["ndjson", "csv"]


@dataclass(slots=True, frozen=True)
class InputRecord:
    """One input record: raw text for NDJSON, a decoded object for CSV rows."""

    source: str
    raw: str
    obj: dict[str, Any] | None = None
    problem: str | None = None  # the row could not be read; the reason of its reject


#: Dotted CSV headers nest at most this deep (``substance.name`` is 2): a header nested 60,000 levels
#: deep made building the row hit Python's recursion limit. ``Settings.max_csv_header_depth``.
MAX_HEADER_DEPTH = 8
#: Longest CSV cell read, in characters (Python's csv module stops at 128 KiB with an exception).
MAX_FIELD_CHARS = 512 * 1024


def detect_format(path: str) -> InputFormat:
    return "csv" if path.lower().endswith(".csv") else "ndjson"


def _open(path: str) -> IO[str]:
    if path == "-":
        return io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="surrogateescape")
    return open(Path(path), encoding="utf-8", errors="surrogateescape", newline="")


def read_ndjson(stream: IO[str], name: str) -> Iterator[InputRecord]:
    """Every non-blank line is a record (a bad line becomes a reject downstream, never a stop)."""
    for number, line in enumerate(stream, start=1):
        text = line.rstrip("\r\n")
        if text.strip():
            yield InputRecord(source=f"{name}:{number}", raw=text)


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


def read_csv(
    stream: IO[str], name: str, max_depth: int = MAX_HEADER_DEPTH, max_field: int = MAX_FIELD_CHARS
) -> Iterator[InputRecord]:
    """Rows of a CSV file with a header; line numbers count the header as line 1.

    A row that cannot be read becomes a record with a ``problem`` (never an exception that ends the run).
    """
    csv.field_size_limit(max_field)
    reader = csv.DictReader(stream)
    try:
        header_problem = _too_deep(reader.fieldnames, max_depth)
    except csv.Error as error:
        yield InputRecord(source=f"{name}:1", raw="", problem=f"CSV header unreadable: {error}")
        return
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            problem = f"CSV row unreadable: {error} (SYNTHWATCH_MAX_CSV_FIELD_BYTES)"
            yield InputRecord(source=f"{name}:{reader.line_num + 1}", raw="", problem=problem)
            continue
        source = f"{name}:{reader.line_num}"
        if header_problem is not None:
            if any(v for v in row.values()):
                yield InputRecord(source=source, raw="", problem=header_problem)
            continue
        obj = _nest(row)
        if obj:
            yield InputRecord(source=source, raw=json.dumps(obj, ensure_ascii=False), obj=obj)


def read_records(
    path: str,
    fmt: InputFormat | None = None,
    *,
    max_depth: int = MAX_HEADER_DEPTH,
    max_field: int = MAX_FIELD_CHARS,
) -> Iterator[InputRecord]:
    """Records of a file (or ``-`` for standard input) in file order."""
    fmt = fmt or detect_format(path)
    name = "stdin" if path == "-" else Path(path).name
    with _open(path) as stream:
        yield from (read_csv(stream, name, max_depth, max_field) if fmt == "csv" else read_ndjson(stream, name))
