"""Backfill: years of NDJSON reports straight into ClickHouse, bypassing Kafka, exactly once.

Why a separate path: replaying two million reports through the broker and the worker takes an hour;
this takes seconds, and applies the same contract. Every line is judged by the same
:func:`~synthwatch.schemas.parse_event` as the publisher and the worker, resolved by the same
:class:`~synthwatch.stream_apps.detect.identity.SubstanceResolver`, and ends as exactly one of: stored, duplicate
(same ``event_id`` earlier in the file or already in ClickHouse), or a row in ``rejects`` with stage
``ingest``, its ``file:line`` and a reason. Re-ingesting a file adds nothing.

How it is fast (speeds in deploy/clickhouse/README.md, "Backfill speed"): with the embedded engine, the
engine reads the file itself and checks each line against a conservative SQL form of the contract
(:mod:`.history_engine`, its SQL in :mod:`.history_sql`); only the lines it does not accept (~1 %) and the
distinct substance spellings come back to Python, which gives its own verdict on them. With a server (which
cannot read the loader's file), worker processes validate and resolve chunks and build each chunk's rows as
Arrow columns (the sink's own row values; the JSON encoding is kept as the reference path). A chunk's rows
land in a Memory staging table, then one ``INSERT ... SELECT`` moves the rows whose ``event_id`` is not
stored yet into the raw tables (their materialized views fire as for the sink; the engine's path inserts
from its parsed table directly). Dedup runs inside ClickHouse, so the file never needs to fit in memory (a
chunk does: 600,000 lines at most on the engine's path).

Substance identity depends on order (names seen with a structure are learnt, first sighting wins).
Chunks resolve in parallel, so a row whose identity could depend on what earlier chunks learnt is sent
back to this process, which re-resolves it in file order: the result equals a sequential run.
"""

from __future__ import annotations

import gc
import itertools
import json
import math
import os
import re
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any, get_args

import pyarrow as pa
from clickhouse_connect.driver.client import Client
from pydantic import ValidationError

from synthwatch.catalogue import shipped_catalogue
from synthwatch.errors import SynthwatchError
from synthwatch.schemas import BorderSeizure, LabDetection, Reject, WireError, parse_event
from synthwatch.schemas.events import EVENT_ADAPTER, Quantity, QuantityUnit, fast_event_ok
from synthwatch.schemas.wire import DEFAULT_LIMITS, RecordLimits, check_extras, check_size
from synthwatch.settings import Settings
from synthwatch.stackfile import read_stack
from synthwatch.stream_apps.detect.identity import (
    UNINFORMATIVE_NAMES,
    ResolvedSubstance,
    Structure,
    SubstanceResolver,
    name_key,
    normalise_quantity,
    structure_from_smiles,
)
from synthwatch.stream_apps.storage.clickhouse import connect, migrate
from synthwatch.stream_apps.storage.sink import (
    LAB_COLUMNS,
    LAB_TABLE,
    SEIZURE_COLUMNS,
    SEIZURE_TABLE,
    ClickHouseSink,
    QuantityValues,
    SubstanceValues,
    extra_text,
    lab_values,
    quantity_values,
    seizure_values,
    substance_values,
)

#: Rejects per pre-check query: their ids are bound into the SQL text, which ClickHouse caps at 256 KiB.
_REJECT_SLICE = 5000
_STRUCTURE_KEY = re.compile(r"[A-Z]{14}")  # a report with a bad SMILES and no InChIKey keeps a name key
_STAGING_SETTINGS = {
    "date_time_input_format": "best_effort",  # RFC 3339 with any offset, as pydantic wrote it
    "input_format_skip_unknown_fields": 1,  # extra fields are in the event JSON; `x` carries them
    "input_format_json_ignore_unknown_keys_in_named_tuple": 1,
}
# Rows are unique per key already (ids deduplicated, MVs group by key): collapsing them again on insert
# costs a third of the insert for nothing; merges still collapse across inserts.
_INSERT_SETTINGS = {"optimize_on_insert": 0}
# When the engine parses (no worker processes hold the cores): the raw table and its views in parallel.
_PARALLEL_INSERT_SETTINGS = {**_INSERT_SETTINGS, "max_insert_threads": 2, "parallel_view_processing": 1}
# The validated event as pydantic dumps it, read by ClickHouse into named tuples (unknown keys skipped).
_COMMON_TUPLE = (
    "event_id String, occurred_at DateTime64(3, 'UTC'), reported_at Nullable(DateTime64(3, 'UTC')), "
    "country String, region String, "
    "substance Tuple(name String, smiles Nullable(String), inchikey Nullable(String), cas Nullable(String))"
)
_STAGING_COLUMNS = "k String, n String, ik Nullable(String), f String, x String DEFAULT '{}'"
_LAB_STAGING = (
    f"e Tuple({_COMMON_TUPLE}, lab_id String, sample_id String, sample_type String, method String, "
    f"confirmed Bool, purity_pct Nullable(Float64)), {_STAGING_COLUMNS}"
)
_SEIZURE_STAGING = (
    f"e Tuple({_COMMON_TUPLE}, agency String, seizure_id String, border_point String, conveyance String, "
    "quantity Tuple(value Float64, unit String), origin_country Nullable(String), "
    f"destination_country Nullable(String)), {_STAGING_COLUMNS}, "
    "g Nullable(Float64), ml Nullable(Float64), u Nullable(Float64)"
)
_COMMON_SELECT = (
    "e.event_id, e.occurred_at, e.reported_at, e.country, e.region, e.substance.name, e.substance.smiles, "
    "e.substance.inchikey, e.substance.cas, k, n, ik, f, x"
)
_LAB_SELECT = f"{_COMMON_SELECT}, e.lab_id, e.sample_id, e.sample_type, e.method, e.confirmed, e.purity_pct"
_SEIZURE_SELECT = (
    f"{_COMMON_SELECT}, e.agency, e.seizure_id, e.border_point, e.conveyance, e.quantity.value, e.quantity.unit, "
    "g, ml, u, ifNull(e.origin_country, ''), ifNull(e.destination_country, '')"
)
# Learnt names already in ClickHouse (as the worker's state rebuild restores them).
_LEARNT_NAMES = """
SELECT substance_name, any(substance_key), any(family) FROM lab_detections
WHERE substance_smiles IS NOT NULL OR substance_inchikey IS NOT NULL
GROUP BY substance_name
"""


class IngestRefused(SynthwatchError, RuntimeError):
    """The backfill cannot run now (another process owns the embedded engine)."""


@dataclass
class IngestSummary:
    """What one backfill did. ``lines == stored + duplicates + rejected`` always holds."""

    path: str
    lines: int = 0
    stored: int = 0
    lab_detections: int = 0
    border_seizures: int = 0
    duplicates_in_file: int = 0
    already_stored: int = 0
    rejected: int = 0
    rejects_stored: int = 0
    blank_lines: int = 0
    seconds: float = 0.0
    setup_seconds: float = 0.0  # of ``seconds``: everything before the first chunk is handed out (pool start,
    # engine open, migrations, the RDKit pre-pass, names already learnt): a fixed cost per command
    workers: int = 0  # parsing processes; 0: parsed in this process
    reject_reasons: dict[str, int] = field(default_factory=dict)

    @property
    def duplicates(self) -> int:
        return self.duplicates_in_file + self.already_stored

    @property
    def rate(self) -> float:
        """Lines per second, end to end (reading, validation, resolution, insert, dedup)."""
        return self.lines / self.seconds if self.seconds > 0 else 0.0

    @property
    def rate_steady(self) -> float:
        """Lines per second once parsing starts (after :attr:`setup_seconds`; filling and draining included)."""
        rest = self.seconds - self.setup_seconds
        return self.lines / rest if rest > 0 else 0.0

    @property
    def balanced(self) -> bool:
        return self.lines == self.stored + self.duplicates + self.rejected


# --- encoding (worker processes, and this process for re-resolved rows) ----------------------------

SubstanceKey = tuple[str, str | None, str | None]
"""A report's substance as spelt (name, SMILES, InChIKey): the unit of resolution caching."""


def _number(value: float | None) -> str:
    return "null" if value is None else repr(float(value))


def _substance_fragment(values: SubstanceValues) -> str:
    key, name, inchikey, family = values
    return (
        f',"k":{json.dumps(key)},"n":{json.dumps(name, ensure_ascii=False)},'
        f'"ik":{json.dumps(inchikey)},"f":{json.dumps(family)}'
    )


def _extra_fragment(event: LabDetection | BorderSeizure) -> str:
    """The sink's ``extra`` column (unknown fields, kept verbatim); empty for nearly every report."""
    if not event.model_extra and not event.substance.model_extra:
        return ""
    return f',"x":{json.dumps(extra_text(event), ensure_ascii=False)}'


class Quantities:
    """Grams, millilitres and units per distinct (value, unit): pint runs once per spelling, not per report.

    Owned by one :class:`ChunkParser` (or one store), so its size is bounded and its life is the loader's.
    """

    def __init__(self, limit: int = 200_000) -> None:
        self.limit = limit
        self._values: dict[tuple[float, str], QuantityValues] = {}
        self._fragments: dict[tuple[float, str], str] = {}

    def values(self, quantity: Quantity) -> QuantityValues:
        key = (quantity.value, quantity.unit)
        found = self._values.get(key)
        if found is None:
            if len(self._values) >= self.limit:
                self._values.clear()
            found = self._values[key] = quantity_values(normalise_quantity(*key))
        return found

    def fragment(self, quantity: Quantity) -> str:
        """The staging table's ``g``, ``ml`` and ``u`` fields as JSON (the reference path)."""
        key = (quantity.value, quantity.unit)
        found = self._fragments.get(key)
        if found is None:
            if len(self._fragments) >= self.limit:
                self._fragments.clear()
            grams, millilitres, units = self.values(quantity)
            found = self._fragments[key] = f',"g":{_number(grams)},"ml":{_number(millilitres)},"u":{_number(units)}'
        return found


def encode_event(
    event: LabDetection | BorderSeizure, substance_fragment: str, quantities: Quantities
) -> tuple[bool, str]:
    """(is a lab detection, one JSONEachRow line for the staging table)."""
    body = event.model_dump_json()
    if isinstance(event, LabDetection):
        return True, f'{{"e":{body}{substance_fragment}{_extra_fragment(event)}}}'
    fragment = quantities.fragment(event.quantity)
    return False, f'{{"e":{body}{substance_fragment}{fragment}{_extra_fragment(event)}}}'


# Arrow and ClickHouse types of each staging column the Arrow path fills (each event field as pydantic
# holds it). Names and order are the sink's LAB_COLUMNS / SEIZURE_COLUMNS: one place defines them.
_ARROW_TYPES: dict[str, tuple[pa.DataType, str]] = {
    "event_id": (pa.string(), "String"),
    "occurred_at": (pa.timestamp("ms", tz="UTC"), "DateTime64(3, 'UTC')"),
    "reported_at": (pa.timestamp("ms", tz="UTC"), "Nullable(DateTime64(3, 'UTC'))"),
    "country": (pa.string(), "String"),
    "region": (pa.string(), "String"),
    "substance_name": (pa.string(), "String"),
    "substance_smiles": (pa.string(), "Nullable(String)"),
    "substance_inchikey": (pa.string(), "Nullable(String)"),
    "substance_cas": (pa.string(), "Nullable(String)"),
    "substance_key": (pa.string(), "String"),
    "resolved_name": (pa.string(), "String"),
    "resolved_inchikey": (pa.string(), "Nullable(String)"),
    "family": (pa.string(), "String"),
    "extra": (pa.string(), "String"),
    "lab_id": (pa.string(), "String"),
    "sample_id": (pa.string(), "String"),
    "sample_type": (pa.string(), "String"),
    "method": (pa.string(), "String"),
    "confirmed": (pa.bool_(), "Bool"),
    "purity_pct": (pa.float64(), "Nullable(Float64)"),
    "agency": (pa.string(), "String"),
    "seizure_id": (pa.string(), "String"),
    "border_point": (pa.string(), "String"),
    "conveyance": (pa.string(), "String"),
    "quantity_value": (pa.float64(), "Float64"),
    "quantity_unit": (pa.string(), "String"),
    "grams": (pa.float64(), "Nullable(Float64)"),
    "millilitres": (pa.float64(), "Nullable(Float64)"),
    "units": (pa.float64(), "Nullable(Float64)"),
    "origin_country": (pa.string(), "String"),
    "destination_country": (pa.string(), "String"),
}
_ARROW_COLUMNS = {
    table: [(name, *_ARROW_TYPES[name]) for name in columns]
    for table, columns in ((LAB_TABLE, LAB_COLUMNS), (SEIZURE_TABLE, SEIZURE_COLUMNS))
}


class ArrowRows:
    """Rows for both raw tables, shipped to the owner process as Arrow IPC bytes.

    Why: the owner process is the bottleneck; with Arrow it hands typed columns to ClickHouse instead of
    text that ClickHouse must parse (~3 µs a row there). Values are the sink's (``lab_values``,
    ``seizure_values``), taken as a tuple at once so the validated event can be freed (keeping a chunk's
    events alive until the end costs more than the tuples).
    """

    def __init__(self, quantities: Quantities) -> None:
        self.quantities = quantities
        self.rows: dict[str, list[tuple[object, ...]]] = {LAB_TABLE: [], SEIZURE_TABLE: []}

    def add(self, event: LabDetection | BorderSeizure, substance: SubstanceValues) -> None:
        if isinstance(event, LabDetection):
            self.rows[LAB_TABLE].append(lab_values(event, substance))
        else:
            self.rows[SEIZURE_TABLE].append(seizure_values(event, substance, self.quantities.values(event.quantity)))

    def count(self, table: str) -> int:
        return len(self.rows[table])

    def ipc(self, table: str) -> bytes:
        """The rows of ``table`` as one Arrow IPC stream (empty bytes when there are none)."""
        rows = self.rows[table]
        return arrow_ipc(rows, [(name, kind) for name, kind, _ in _ARROW_COLUMNS[table]]) if rows else b""


def arrow_ipc(rows: list[tuple[object, ...]], columns: list[tuple[str, pa.DataType]]) -> bytes:
    """``rows`` (Python values in ``columns`` order) as one Arrow IPC stream, for ``raw_insert(fmt="ArrowStream")``.

    Timestamps are pydantic's aware datetimes with microseconds: truncated to the column's unit, as
    ClickHouse's ``DateTime64(3)`` does with text.
    """
    arrays = []
    for values, (_, kind) in zip(zip(*rows, strict=True), columns, strict=True):
        if pa.types.is_timestamp(kind):
            arrays.append(pa.array(values, pa.timestamp("us", tz="UTC")).cast(kind, safe=False))
        else:
            arrays.append(pa.array(values, kind))
    batch = pa.record_batch(arrays, names=[name for name, _ in columns])
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return bytes(sink.getvalue())


def _depends_on_order(substance: ResolvedSubstance, smiles: str | None, structures: dict[str, Structure | str]) -> bool:
    """True when the resolution used (or could have used) names or families learnt from earlier reports."""
    if substance.resolved_by in ("learnt_name", "unresolved_name"):
        return True
    if substance.resolved_by == "structure" and not substance.catalogued:
        # family of an InChIKey-only report comes from earlier SMILES reports of the same key
        if not smiles:
            return True
        found = structures.get(smiles)
        return isinstance(found if found is not None else structure_from_smiles(smiles), str)
    return False


@dataclass
class Chunk:
    """Work for one worker: a byte range of the file holding whole lines, and the names learnt so far."""

    path: str
    name: str
    start: int
    end: int
    first_line: int
    known: dict[str, tuple[str, str | None]]
    structures: dict[str, Structure | str] = field(default_factory=dict)
    encoding: str = "arrow"  # "arrow": typed columns (fast); "json": JSONEachRow text (the reference path)
    limits: RecordLimits = DEFAULT_LIMITS  # the publisher's record caps (size, unknown fields), from the settings


@dataclass
class ChunkResult:
    """A chunk's outcome; ``pending`` rows and ``learnt`` names are merged by the parent in line order."""

    start: int
    end: int
    lines: int = 0
    blank: int = 0
    duplicates: int = 0
    labs: list[str] = field(default_factory=list)  # JSONEachRow lines (json encoding)
    seizures: list[str] = field(default_factory=list)
    arrow: dict[str, bytes] = field(default_factory=dict)  # Arrow IPC per table (arrow encoding)
    arrow_rows: dict[str, int] = field(default_factory=dict)
    rejects: list[tuple[int, bytes, str, str | None]] = field(default_factory=list)
    pending: list[tuple[int, bytes]] = field(default_factory=list)
    learnt: list[tuple[int, str, str, str | None]] = field(default_factory=list)


class _SharedStructuresResolver(SubstanceResolver):
    """The stream's resolver, fed structures other processes computed (RDKit costs ~1 ms per distinct SMILES).

    A valid SMILES resolves exactly as :meth:`SubstanceResolver.resolve` does (structure, no error); anything
    else, or a SMILES not computed yet, goes through the inherited method unchanged.
    """

    def __init__(self, structures: dict[str, Structure | str]) -> None:
        super().__init__()
        self.structures = structures

    def resolve(
        self, name: str | None, smiles: str | None = None, inchikey: str | None = None, reporter: str | None = None
    ) -> ResolvedSubstance:
        found = self.structures.get(smiles) if smiles else None
        if isinstance(found, Structure):
            return self._from_structure(found, name or "", None, reporter)
        return super().resolve(name, smiles=smiles, inchikey=inchikey, reporter=reporter)


def seeded_resolver(
    known: dict[str, tuple[str, str | None]], structures: dict[str, Structure | str] | None = None
) -> SubstanceResolver:
    """A chunk's resolver: it knows the names learnt before the chunk (``known``) and uses ``structures``
    (kept by reference: the caller may fill it later) instead of running RDKit again."""
    resolver = _SharedStructuresResolver(structures if structures is not None else {})
    for name, (key, family) in known.items():
        resolver.learn(name, key, family)  # type: ignore[arg-type]
    return resolver


class ChunkParser:
    """One parsing process's state across chunks: what stays valid whatever the file order.

    Holds the catalogue's names, the substance values of state-independent resolutions (per spelling),
    and the quantity conversions. The loader owns one when it parses in-process; each worker process
    owns one, made by the pool's initializer.
    """

    def __init__(self) -> None:
        self.catalogue_names = frozenset(
            name_key(alias) for entry in shipped_catalogue() for alias in (entry.name, *entry.synonyms)
        )
        self.values: dict[SubstanceKey, SubstanceValues] = {}
        self.fragments: dict[SubstanceKey, str] = {}
        self.quantities = Quantities()

    def warm(self) -> None:
        """Index the catalogue and build pint's registry now, not in the first chunk."""
        seeded_resolver({})
        for unit in get_args(QuantityUnit):
            normalise_quantity(1.0, unit)

    def resolve_spelling(
        self,
        resolver: SubstanceResolver,
        structures: dict[str, Structure | str],
        name: str,
        smiles: str | None,
        inchikey: str | None,
        number: int,
        learnt_here: set[str],
        result: ChunkResult,
    ) -> SubstanceValues | None:
        """The stored substance values of a report's spelling, or None when they depend on file order.

        Names resolved by structure are recorded in ``result.learnt`` at ``number`` (the first report of
        the name in this chunk): the loader teaches its resolver in line order from them.
        """
        cache_key = (name, smiles, inchikey)
        found = self.values.get(cache_key)
        if found is not None:
            return found
        substance = resolver.resolve(name, smiles=smiles, inchikey=inchikey)
        if substance.resolved_by == "structure":
            normalised = name_key(name)
            if (
                normalised not in learnt_here
                and normalised not in self.catalogue_names
                and normalised not in UNINFORMATIVE_NAMES
            ):
                learnt_here.add(normalised)
                result.learnt.append((number, name, substance.key, substance.family))
        if _depends_on_order(substance, smiles, structures):
            return None
        found = self.values[cache_key] = substance_values(substance)
        return found

    def process(self, chunk: Chunk) -> ChunkResult:
        """Validate, dedup (within the chunk), resolve and encode one chunk; pure but for the caches."""
        with open(chunk.path, "rb") as handle:
            handle.seek(chunk.start)
            data = handle.read(chunk.end - chunk.start)
        result = ChunkResult(chunk.start, chunk.end)
        resolver = seeded_resolver(chunk.known, chunk.structures)
        seen: set[str] = set()
        learnt_here: set[str] = set()
        rows = ArrowRows(self.quantities) if chunk.encoding == "arrow" else None
        limits = chunk.limits
        validate = EVENT_ADAPTER.validator.validate_json
        gc_was_enabled = gc.isenabled()
        gc.disable()  # tens of thousands of short-lived models: the cyclic collector only costs time here
        try:
            lines = data.split(b"\n")
            for number, line in enumerate(lines, start=chunk.first_line):
                raw = line.rstrip(b"\r")
                if not raw or raw.isspace():  # what `not raw.strip()` says, without the copy
                    result.blank += 1
                    continue
                if len(raw) > limits.max_bytes:  # before parsing it: the caps the publisher applies
                    try:
                        check_size(raw, limits)
                    except WireError as error:
                        result.rejects.append((number, raw, error.reason, error.event_id))
                        continue
                # parse_event's own first step, inlined (it is most of the per-line cost): what the fast
                # models refuse or cannot finish checking goes to parse_event, which gives its verdict.
                try:
                    event = validate(raw)
                except ValidationError:
                    event = None
                if event is None or not fast_event_ok(event):
                    try:
                        event = parse_event(raw)
                    except WireError as error:
                        result.rejects.append((number, raw, error.reason, error.event_id))
                        continue
                if event.extra_fields:
                    try:
                        check_extras(event, limits)
                    except WireError as error:
                        result.rejects.append((number, raw, error.reason, error.event_id))
                        continue
                event_id = event.event_id
                if event_id in seen:
                    result.duplicates += 1
                    continue
                seen.add(event_id)
                reported = event.substance
                found = self.resolve_spelling(
                    resolver,
                    chunk.structures,
                    reported.name,
                    reported.smiles,
                    reported.inchikey,
                    number,
                    learnt_here,
                    result,
                )
                if found is None:
                    result.pending.append((number, raw))
                    continue
                if rows is not None:
                    rows.add(event, found)
                    continue
                cache_key = (reported.name, reported.smiles, reported.inchikey)
                fragment = self.fragments.get(cache_key)
                if fragment is None:
                    fragment = self.fragments[cache_key] = _substance_fragment(found)
                is_lab, encoded = encode_event(event, fragment, self.quantities)
                (result.labs if is_lab else result.seizures).append(encoded)
            if rows is not None:  # still without the collector: the chunk's events are all alive here
                for table in (LAB_TABLE, SEIZURE_TABLE):
                    result.arrow[table] = rows.ipc(table)
                    result.arrow_rows[table] = rows.count(table)
        finally:
            if gc_was_enabled:
                gc.enable()
        result.lines = len(lines) - result.blank
        if data.endswith(b"\n"):
            result.blank -= 1  # the split's empty tail after the last line end is not a line
        return result


_WORKER: ChunkParser | None = None  # this worker process's parser (set by the pool's initializer)


def _start_worker() -> None:
    """Pool initializer: the worker process's own :class:`ChunkParser`."""
    global _WORKER
    _WORKER = ChunkParser()


def _worker() -> ChunkParser:
    if _WORKER is None:
        _start_worker()
    assert _WORKER is not None
    return _WORKER


def process_chunk(chunk: Chunk) -> ChunkResult:
    """A chunk parsed by this worker process's :class:`ChunkParser` (a pool task)."""
    return _worker().process(chunk)


# --- structures: each distinct SMILES through RDKit once, split over the workers ---------------------

# The JSON string after "smiles": runs of plain characters between escapes (unrolled: 3x faster than an
# alternation per character, same matches).
_SMILES_FIELD = re.compile(rb'"smiles"\s*:\s*"([^"\\]*(?:\\.[^"\\]*)*)"')


def compute_structures(smiles: list[str]) -> dict[str, Structure | str]:
    """RDKit's answer for each SMILES (a structure, or the reason it is not one); runs in a worker."""
    return {text: structure_from_smiles(text) for text in smiles}


def scan_part(path: str, start: int, end: int) -> set[str]:
    """Distinct SMILES spellings in a byte range of whole lines; also readies this worker's caches.

    Runs in the workers while the parent opens and migrates the engine, so the first chunks find the
    catalogue indexed and pint's registry built (a few hundred ms per process otherwise).
    """
    _worker().warm()
    found: set[str] = set()
    with open(path, "rb") as handle:
        handle.seek(start)
        remaining = end - start
        while remaining > 0:
            block = handle.read(min(remaining, 64 * 1024 * 1024))
            if not block:
                break
            remaining -= len(block)
            found.update(_decoded_smiles(_SMILES_FIELD.findall(block)))
    return found


def _decoded_smiles(found: Iterable[bytes]) -> set[str]:
    out = set()
    for raw in set(found):
        try:
            text = json.loads(b'"' + raw + b'"')
        except ValueError:
            continue
        if isinstance(text, str) and text.strip():
            out.add(text.strip())
    return out


class _Prepass:
    """Every distinct SMILES through RDKit once, split over the workers, started before the engine opens.

    A thread chains the two steps (scan, then RDKit), so the structures are computed while this process
    opens the engine and migrates, not after.
    """

    def __init__(self, pool: ProcessPoolExecutor, path: Path, workers: int) -> None:
        self.pool, self.workers = pool, workers
        size = path.stat().st_size
        bounds = [0]
        with open(path, "rb") as handle:
            for i in range(1, workers):
                handle.seek(max(size * i // workers, bounds[-1]))
                handle.readline()  # to the next line start: a line is scanned by exactly one part
                bounds.append(handle.tell())
        bounds.append(size)
        self.scans = [pool.submit(scan_part, str(path), a, b) for a, b in itertools.pairwise(bounds)]
        self._found: Future[dict[str, Structure | str]] = Future()
        threading.Thread(target=self._compute, name="ingest-prepass", daemon=True).start()

    def _compute(self) -> None:
        try:
            spellings = sorted(set().union(*(scan.result() for scan in self.scans)))
            parts = [spellings[i :: self.workers] for i in range(self.workers)]
            structures: dict[str, Structure | str] = {}
            for part in self.pool.map(compute_structures, parts):
                structures.update(part)
        except BaseException as error:  # handed to the caller of structures()
            self._found.set_exception(error)
        else:
            self._found.set_result(structures)

    def structures(self) -> dict[str, Structure | str]:
        return self._found.result()


# --- reading the file in chunks --------------------------------------------------------------------


def _bytes_per_line(path: Path) -> float:
    """Bytes a line in the file's first MiB: an estimate of how many lines a size holds."""
    with open(path, "rb") as handle:
        sample = handle.read(1 << 20)
    return max(len(sample) / max(sample.count(b"\n"), 1), 1.0)


def _chunks(path: Path, batch_size: int, parts: int = 3) -> Iterator[tuple[int, int, int]]:
    """(start offset, end offset, first line number) of consecutive ranges of whole lines.

    At most ``batch_size`` lines each (each insert costs ClickHouse ~0.05-0.1 s of CPU whatever its size, so
    fewer is cheaper), and about 1/``parts`` of what is left at most (never under ``min(batch_size, 20,000)``
    lines): chunks shrink towards the end of the file, so the last inserts run while the workers still
    parse instead of after them, and a small file still feeds every worker.
    """
    floor = min(batch_size, 20_000)
    size = path.stat().st_size
    per_line = _bytes_per_line(path)  # until lines are counted
    with open(path, "rb") as handle:
        line = 1
        while True:
            start = handle.tell()
            left = (size - start) / per_line
            want = max(floor, min(batch_size, int(left / parts)))
            count = sum(1 for _ in itertools.islice(handle, want))
            if count == 0:
                return
            yield start, handle.tell(), line
            line += count
            per_line = handle.tell() / (line - 1)


# --- storing ---------------------------------------------------------------------------------------


class _Store:
    """Staging tables and the dedup ``INSERT ... SELECT`` (this process owns the client).

    ``suffix`` names this load's scratch tables. The ``sql`` encoding stages nothing here: its rows are
    committed from the engine's own parsed table (``commit(..., source=...)``).
    """

    def __init__(self, client: Client, encoding: str = "arrow", exclusive: bool = False) -> None:
        # exclusive: nothing else writes the raw tables meanwhile (the embedded engine, held by this process)
        self.client, self.encoding, self.exclusive = client, encoding, exclusive
        self.suffix = f"{os.getpid()}_{int(time.time() * 1000) % 10**9}"
        self.staging: dict[str, str] = {}
        if encoding == "sql":
            return
        self.staging = {LAB_TABLE: f"_ingest_labs_{self.suffix}", SEIZURE_TABLE: f"_ingest_seizures_{self.suffix}"}
        structures = {LAB_TABLE: _LAB_STAGING, SEIZURE_TABLE: _SEIZURE_STAGING}
        if encoding != "json":
            structures = {t: ", ".join(f"{n} {ch}" for n, _, ch in cols) for t, cols in _ARROW_COLUMNS.items()}
        for table, staging in self.staging.items():
            client.command(f"DROP TABLE IF EXISTS {staging}")
            client.command(f"CREATE TABLE {staging} ({structures[table]}) ENGINE = Memory")

    def close(self) -> None:
        for staging in self.staging.values():
            self.client.command(f"DROP TABLE IF EXISTS {staging}")

    def insert(self, table: str, lines: list[str], arrow: Iterable[bytes] = (), count: int = 0) -> tuple[int, int]:
        """Insert rows whose event_id is not stored yet; returns (stored, already stored).

        ``lines``: JSONEachRow rows (json encoding); ``arrow``: Arrow IPC streams holding ``count`` rows.
        """
        count += len(lines)
        if not count:
            return 0, 0
        staging = self.staging[table]
        self.client.command(f"TRUNCATE TABLE {staging}")
        if self.encoding == "json":
            self.client.raw_insert(
                staging, None, ("\n".join(lines) + "\n").encode(), settings=_STAGING_SETTINGS, fmt="JSONEachRow"
            )
        else:
            for block in arrow:
                if block:
                    self.client.raw_insert(staging, None, block, fmt="ArrowStream")
        return self.commit(table, count)

    def commit(self, table: str, count: int, source: tuple[str, str] | None = None) -> tuple[int, int]:
        """Move the ``count`` staged rows of ``table`` whose event_id is not stored yet into ``table``.

        ``source``: (a query of the rows' ids, a query of the rows in ``table``'s column order) to insert
        from instead of the staging table.
        """
        if not count:
            return 0, 0
        columns = LAB_COLUMNS if table == LAB_TABLE else SEIZURE_COLUMNS
        if source is not None:
            ids, rows = f"({source[0]})", f"({source[1]})"
            event_id, select = "event_id", "*"
        elif self.encoding == "json":
            ids = rows = self.staging[table]
            event_id, select = "e.event_id", _LAB_SELECT if table == LAB_TABLE else _SEIZURE_SELECT
        else:
            ids = rows = self.staging[table]
            event_id, select = "event_id", ", ".join(columns)
        stored_ids = f"SELECT event_id FROM {table} WHERE event_id IN (SELECT {event_id} FROM {ids})"
        already = int(str(self.client.command(f"SELECT count() FROM {ids} WHERE {event_id} IN ({stored_ids})")))
        if already < count:
            # When none is stored and no other writer can store one meanwhile, the filter would read every
            # stored event_id a second time for nothing (a first load: each chunk, the whole table so far).
            unfiltered = already == 0 and self.exclusive
            self.client.command(
                f"INSERT INTO {table} ({', '.join(columns)}) SELECT {select} FROM {rows}"
                + ("" if unfiltered else f" WHERE {event_id} NOT IN ({stored_ids})"),
                settings=_PARALLEL_INSERT_SETTINGS if self.encoding == "sql" else _INSERT_SETTINGS,
            )
        return count - already, already


def _learnt_from_clickhouse(client: Client) -> dict[str, tuple[str, str | None]]:
    """Names learnt by earlier loads or by the worker, so a backfill resolves as the worker would."""
    resolver = SubstanceResolver()
    families: dict[str, str | None] = {}
    for name, key, family in client.query(_LEARNT_NAMES).result_rows:
        if _STRUCTURE_KEY.fullmatch(key) and resolver.learn(name, key, family or None):
            families[key] = family or None
    return {name: (key, families.get(key)) for name, key in resolver.learnt_names().items()}


def known_names(resolver: SubstanceResolver) -> dict[str, tuple[str, str | None]]:
    """The names ``resolver`` has learnt, with their key and family: what a chunk's resolver starts from."""
    return {name: (key, resolver.family_of(key)) for name, key in resolver.learnt_names().items()}


def check_engine_free(settings: Settings) -> None:
    """Refuse while ``synthwatch up``/``worker`` holds the embedded engine (one process per directory)."""
    if not settings.clickhouse_is_embedded:
        return
    info = read_stack(settings)
    if info is not None and info.pid != os.getpid():
        raise IngestRefused(
            f"a running synthwatch stack (pid {info.pid}, {info.web_url}) owns the embedded ClickHouse in "
            f"{settings.embedded_clickhouse_path}; stop it first (Ctrl-C on `synthwatch up`), or point "
            "SYNTHWATCH_CLICKHOUSE_URL at a ClickHouse server that both can use"
        )


def _pause_merges(client: Client, settings: Settings) -> bool:
    """Stop background merges in the embedded engine for the load; True when they were stopped.

    Why: merging the parts each insert creates costs this process ~1-1.5 core-s per million lines while
    the workers need the cores. Nothing needs the merges to be correct: ids are deduplicated before
    insert and queries aggregate with ``sum()/min()/max() ... GROUP BY`` (no ``FINAL``), so the merges
    are left to whoever holds the engine next (``synthwatch up``/``worker``), in its background.
    Only the embedded engine: on a server, other clients share the merges and the pause needs rights.
    """
    if not settings.clickhouse_is_embedded:
        return False
    client.command("SYSTEM STOP MERGES")  # the tables that exist now (migrations ran); not persisted
    return True


def _pool(workers: int) -> ProcessPoolExecutor:
    """Worker processes, started now, before this process opens the engine.

    Fork is cheapest (modules are already imported) but unsafe once chDB's threads run in this process;
    then the forkserver starts clean workers (scripts calling this need the ``__main__`` guard).
    """
    method = "fork" if "chdb" not in sys.modules and sys.platform == "linux" else "forkserver"
    pool = ProcessPoolExecutor(workers, mp_context=get_context(method), initializer=_start_worker)
    for started in [pool.submit(os.getpid) for _ in range(workers)]:
        started.result()
    return pool


def ingest_history(
    settings: Settings,
    path: Path | str,
    batch_size: int | None = None,
    progress: bool = True,
    workers: int | None = None,
    client: Client | None = None,
    encoding: str | None = None,
) -> IngestSummary:
    """Load an NDJSON file of reports into ClickHouse; see the module docstring for the guarantees.

    ``workers``: parsing processes (default: one per core, at most 2; 0 parses in this process).
    ``client``: an open client to use (tests); default: open the configured ClickHouse here.
    ``encoding``: how lines become rows: ``"sql"`` (the embedded engine reads and checks the file
    itself, Python sees only the lines it does not accept; the default there), ``"arrow"`` (worker
    processes validate every line and send typed columns; the default for a server) or ``"json"``
    (JSONEachRow parsed by ClickHouse: the earliest path, kept as the reference the tests compare with).
    ``batch_size``: lines per chunk at most (default 600,000 for ``sql``, 200,000 otherwise).
    """
    # The engine reads the file by name, and its file() expands *, ?, {} and [] in names: such a file
    # (or a server, which cannot see this machine's files) goes through the worker processes instead.
    by_name = settings.clickhouse_is_embedded and not any(c in str(Path(path).resolve()) for c in "*?{}[]")
    encoding = encoding or ("sql" if by_name else "arrow")
    if encoding not in ("sql", "arrow", "json"):
        raise ValueError(f"encoding must be 'sql', 'arrow' or 'json', not {encoding!r}")
    if encoding == "sql" and not by_name:
        raise ValueError(
            "encoding 'sql' has the embedded engine (chdb://) read the file by name, which must not contain "
            "any of * ? { } [ ]; use encoding 'arrow'"
        )
    batch_size = batch_size or (600_000 if encoding == "sql" else 200_000)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    if client is None:
        check_engine_free(settings)
    size = path.stat().st_size
    if workers is None:
        workers = min(2, os.cpu_count() or 1) if size > 4 * 1024 * 1024 else 0
    summary = IngestSummary(path=str(path), workers=workers)
    started = time.perf_counter()
    pool = _pool(workers) if workers > 0 else None  # before the engine opens in this process
    prepass = _Prepass(pool, path, workers) if pool is not None else None  # runs while the engine opens
    own_client = client is None
    client = client or connect(settings)
    try:
        migrate(client)
        store = _Store(client, encoding, exclusive=settings.clickhouse_is_embedded)
        paused = _pause_merges(client, settings)
        try:
            limits = settings.record_limits()  # the caps publish applies: a line may not smuggle megabytes either
            _run(client, store, pool, prepass, path, batch_size, progress, size, summary, workers, started, limits)
        finally:
            if paused:
                client.command("SYSTEM START MERGES")
            store.close()
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        if own_client:
            client.close()
    summary.seconds = time.perf_counter() - started
    return summary


def _run(
    client: Client,
    store: _Store,
    pool: ProcessPoolExecutor | None,
    prepass: _Prepass | None,
    path: Path,
    batch_size: int,
    progress: bool,
    size: int,
    summary: IngestSummary,
    workers: int,
    ingest_started: float,
    limits: RecordLimits = DEFAULT_LIMITS,
) -> None:
    sink = ClickHouseSink(client)
    if store.encoding == "sql":  # the engine parses the first chunk while the workers finish the RDKit pre-pass
        _run_in_engine(client, store, path, batch_size, progress, prepass, sink, summary, ingest_started, limits)
        return
    structures = prepass.structures() if prepass is not None else {}
    resolver = seeded_resolver(_learnt_from_clickhouse(client), structures)
    parser = ChunkParser() if pool is None else None
    quantities = parser.quantities if parser is not None else Quantities()
    chunks = _chunks(path, batch_size, max(workers, 1) + 1)
    in_flight: list[Future[ChunkResult]] = []
    unstored: list[Reject] = []

    def submit() -> bool:
        spec = next(chunks, None)
        if spec is None:
            return False
        chunk = Chunk(
            str(path),
            path.name,
            *spec,
            known=known_names(resolver),
            structures=structures,
            encoding=store.encoding,
            limits=limits,
        )
        if pool is None:
            done: Future[ChunkResult] = Future()
            done.set_result(parser.process(chunk))  # type: ignore[union-attr]
            in_flight.append(done)
        else:
            in_flight.append(pool.submit(process_chunk, chunk))
        return True

    bar = _progress(progress, by_bytes=True)
    started = time.perf_counter()
    summary.setup_seconds = started - ingest_started
    with bar:
        task = bar.add_task("ingest", total=size, name=path.name, lines=0, rate=0.0)
        for _ in range(max(workers, 1) + 1):
            if not submit():
                break
        while in_flight:
            result = in_flight.pop(0).result()
            submit()
            _store_chunk(result, resolver, store, sink, path.name, summary, quantities, unstored)
            elapsed = time.perf_counter() - started
            bar.update(task, completed=result.end, lines=summary.lines, rate=summary.lines / max(elapsed, 1e-9))
        _store_rejects(sink, unstored, summary)


def _progress(progress: bool, by_bytes: bool) -> Any:
    """The load's progress bar: over the file's bytes (worker chunks are byte ranges) or its lines."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("ingesting [bold]{task.fields[name]}[/]"),
        BarColumn(),
        *([DownloadColumn()] if by_bytes else []),
        TextColumn("{task.fields[lines]:,} lines · {task.fields[rate]:,.0f}/s"),
        TimeElapsedColumn(),
        disable=not progress,
        transient=False,
    )


def _run_in_engine(
    client: Client,
    store: _Store,
    path: Path,
    batch_size: int,
    progress: bool,
    prepass: _Prepass | None,
    sink: ClickHouseSink,
    summary: IngestSummary,
    ingest_started: float,
    limits: RecordLimits = DEFAULT_LIMITS,
) -> None:
    """The embedded engine's path: chunks of the file parsed and checked by the engine (``EngineChunks``)."""
    structures: dict[str, Structure | str] = {}  # filled from the pre-pass before the first resolution
    resolver = seeded_resolver(_learnt_from_clickhouse(client), structures)
    from synthwatch.stream_apps.storage.backfill.engine import (
        EngineChunks,  # imports this module: loaded when first used
    )

    engine = EngineChunks(client, path, ChunkParser(), store.suffix, limits)
    unstored: list[Reject] = []
    started = time.perf_counter()
    summary.setup_seconds = started - ingest_started
    estimate = int(path.stat().st_size / _bytes_per_line(path))
    # Even chunks of at most batch_size lines: each chunk reads the file from its start, so a small last
    # chunk would cost a whole extra pass (and an insert's fixed cost) for a few lines.
    expected = estimate * 1.02  # a little over the estimate, so an underestimate adds no tiny last chunk
    per_chunk = math.ceil(expected / max(math.ceil(expected / batch_size), 1)) or batch_size
    try:
        with _progress(progress, by_bytes=False) as bar:
            task = bar.add_task("ingest", total=estimate, name=path.name, lines=0, rate=0.0)
            start = 0
            while True:
                rows = engine.parse(start, start + per_chunk)
                if not rows:
                    break
                if prepass is not None:
                    structures.update(prepass.structures())
                    prepass = None
                result = engine.finish(start, rows, resolver, structures)
                inserted = {}
                for table in (LAB_TABLE, SEIZURE_TABLE):
                    ids, kept, count = engine.kept_rows(table)
                    inserted[table] = store.commit(table, count, source=(ids, kept))
                _account(result, inserted, sink, path.name, summary, unstored)
                start += rows
                elapsed = time.perf_counter() - started
                bar.update(task, completed=start, lines=summary.lines, rate=summary.lines / max(elapsed, 1e-9))
                if rows < per_chunk:
                    break
            bar.update(task, total=start, completed=start)
            _store_rejects(sink, unstored, summary)
    finally:
        engine.close()


def _store_rejects(sink: ClickHouseSink, rejects: list[Reject], summary: IngestSummary) -> None:
    """Store (and forget) the rejects gathered so far, a slice per query."""
    for i in range(0, len(rejects), _REJECT_SLICE):
        summary.rejects_stored += sink.store_rejects(rejects[i : i + _REJECT_SLICE])
    rejects.clear()


def resolve_in_line_order(
    resolver: SubstanceResolver,
    learnt: list[tuple[int, str, str, str | None]],
    pending: list[tuple[int, SubstanceKey]],
) -> list[ResolvedSubstance]:
    """The resolutions of a chunk's order-dependent spellings (``pending``: line, spelling), with the names
    the chunk learnt (``learnt``: line, name, key, family) taught to ``resolver`` at their lines, a name
    before a report on the same line: what a sequential run over the file resolves."""
    steps = sorted(
        [(line, 0, i) for i, (line, *_) in enumerate(learnt)] + [(p[0], 1, i) for i, p in enumerate(pending)]
    )
    found: dict[int, ResolvedSubstance] = {}
    for _line, is_report, i in steps:
        if is_report:
            name, smiles, inchikey = pending[i][1]
            found[i] = resolver.resolve(name, smiles=smiles, inchikey=inchikey)
        else:
            _, name, key, family = learnt[i]
            resolver.learn(name, key, family)  # type: ignore[arg-type]
    return [found[i] for i in range(len(pending))]


def _store_chunk(
    result: ChunkResult,
    resolver: SubstanceResolver,
    store: _Store,
    sink: ClickHouseSink,
    name: str,
    summary: IngestSummary,
    quantities: Quantities,
    unstored: list[Reject],
) -> None:
    """Merge re-resolved rows and learnt names in line order, then insert; rejects are stored by slices."""
    pending = [(line, parse_event(raw.decode("utf-8", "replace"))) for line, raw in result.pending]
    substances = resolve_in_line_order(
        resolver,
        result.learnt,
        [(line, (e.substance.name or "", e.substance.smiles, e.substance.inchikey)) for line, e in pending],
    )
    labs, seizures = result.labs, result.seizures
    rows = ArrowRows(quantities) if store.encoding == "arrow" else None
    for (_line, event), substance in zip(pending, substances, strict=True):
        if rows is not None:
            rows.add(event, substance_values(substance))
            continue
        is_lab, encoded = encode_event(event, _substance_fragment(substance_values(substance)), quantities)
        (labs if is_lab else seizures).append(encoded)
    inserted = {}
    for table, lines in ((LAB_TABLE, labs), (SEIZURE_TABLE, seizures)):
        blocks, count = [result.arrow.get(table, b"")], result.arrow_rows.get(table, 0)
        if rows is not None and rows.count(table):
            blocks.append(rows.ipc(table))
            count += rows.count(table)
        inserted[table] = store.insert(table, lines, blocks, count)
    _account(result, inserted, sink, name, summary, unstored)


def _account(
    result: ChunkResult,
    inserted: dict[str, tuple[int, int]],
    sink: ClickHouseSink,
    name: str,
    summary: IngestSummary,
    unstored: list[Reject],
) -> None:
    """Count a stored chunk into ``summary``; its rejects are stored by slices."""
    (new_labs, old_labs), (new_seizures, old_seizures) = inserted[LAB_TABLE], inserted[SEIZURE_TABLE]
    rejects = [
        Reject.of(raw, source=f"{name}:{line}", reason=reason, stage="ingest", event_id=event_id)
        for line, raw, reason, event_id in result.rejects
    ]
    unstored.extend(rejects)
    if len(unstored) >= _REJECT_SLICE:  # a query and an insert per slice, not per chunk
        _store_rejects(sink, unstored, summary)
    for reject in rejects:
        summary.reject_reasons[reject.reason] = summary.reject_reasons.get(reject.reason, 0) + 1
    summary.lines += result.lines
    summary.blank_lines += result.blank
    summary.duplicates_in_file += result.duplicates
    summary.lab_detections += new_labs
    summary.border_seizures += new_seizures
    summary.stored += new_labs + new_seizures
    summary.already_stored += old_labs + old_seizures
    summary.rejected += len(rejects)
