"""Reading input files: NDJSON (one event per line) and CSV (dotted headers such as ``substance.name``).

Readers never judge a record; they only say where each one came from (``file:line``) so that a
reject can be traced back. Validation is the publisher's job.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Iterator
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


def read_csv(stream: IO[str], name: str) -> Iterator[InputRecord]:
    """Rows of a CSV file with a header; line numbers count the header as line 1."""
    reader = csv.DictReader(stream)
    for row in reader:
        obj = _nest(row)
        if obj:
            yield InputRecord(source=f"{name}:{reader.line_num}", raw=json.dumps(obj, ensure_ascii=False), obj=obj)


def read_records(path: str, fmt: InputFormat | None = None) -> Iterator[InputRecord]:
    """Records of a file (or ``-`` for standard input) in file order."""
    fmt = fmt or detect_format(path)
    name = "stdin" if path == "-" else Path(path).name
    with _open(path) as stream:
        yield from (read_csv(stream, name) if fmt == "csv" else read_ndjson(stream, name))
