"""Parsing a chunk of the file in Python: validate, dedup within the chunk, resolve, encode.

Every line is judged by the same contract as the publisher and the worker
(:func:`~synthwatch.schemas.parse_event`, with its fast first step inlined). One :class:`ChunkParser`
per parsing process holds the caches that stay valid whatever the file order; in worker processes the
pool's initializer makes it (:func:`start_worker`) and :func:`process_chunk` is the pool's task.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from typing import get_args

from pydantic import ValidationError

from synthwatch.catalogue import shipped_catalogue
from synthwatch.schemas import WireError, parse_event
from synthwatch.schemas.events import EVENT_ADAPTER, QuantityUnit, fast_event_ok
from synthwatch.schemas.wire import DEFAULT_LIMITS, RecordLimits, check_event_time, check_extras, check_size
from synthwatch.stream_apps.detect.corrections import ReportKey, report_key
from synthwatch.stream_apps.detect.identity import (
    UNINFORMATIVE_NAMES,
    Structure,
    SubstanceResolver,
    name_key,
    normalise_quantity,
)
from synthwatch.stream_apps.storage.backfill.arrow import ArrowRows
from synthwatch.stream_apps.storage.backfill.jsonrows import encode_event, substance_fragment
from synthwatch.stream_apps.storage.backfill.quantities import Quantities
from synthwatch.stream_apps.storage.backfill.resolve import SubstanceKey, depends_on_order, seeded_resolver
from synthwatch.stream_apps.storage.tables import LAB_TABLE, SEIZURE_TABLE, SubstanceValues, substance_values


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
        if depends_on_order(substance, smiles, structures):
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
        seen: set[ReportKey] = set()
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
                if limits.received_at is not None and event.occurred_at > limits.received_at:
                    try:  # the worker's bound on event times, against the file's receipt (~0.1 µs when earlier)
                        check_event_time(event, limits.received_at, limits)
                    except WireError as error:
                        result.rejects.append((number, raw, error.reason, error.event_id))
                        continue
                key = report_key(event)  # event ids are unique per reporter only
                if key in seen:
                    result.duplicates += 1
                    continue
                seen.add(key)
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
                    fragment = self.fragments[cache_key] = substance_fragment(found)
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


def start_worker() -> None:
    """Pool initializer: the worker process's own :class:`ChunkParser`."""
    global _WORKER
    _WORKER = ChunkParser()


def worker_parser() -> ChunkParser:
    """This process's :class:`ChunkParser`: the pool's, or one made on first use (a task run without a pool)."""
    if _WORKER is None:
        start_worker()
    assert _WORKER is not None
    return _WORKER


def process_chunk(chunk: Chunk) -> ChunkResult:
    """A chunk parsed by this worker process's :class:`ChunkParser` (a pool task)."""
    return worker_parser().process(chunk)
