"""Backfill: years of NDJSON reports straight into ClickHouse, bypassing Kafka, exactly once.

Why a separate path: replaying two million reports through the broker and the worker takes an hour;
this takes seconds, and applies the same contract. Every line is judged by the same
:func:`~synthwatch.schemas.parse_event` as the publisher and the worker, resolved by the same
:class:`~synthwatch.stream_apps.detect.identity.SubstanceResolver`, and ends as exactly one of: stored, duplicate
(same reporter and ``event_id`` earlier in the file or already in ClickHouse: event ids are unique per
reporter only), or a row in ``rejects`` with stage
``ingest``, its ``file:line`` and a reason. Re-ingesting a file adds nothing.

How it is fast (speeds in deploy/clickhouse/README.md, "Backfill speed"): with the embedded engine, the
engine reads the file itself and checks each line against a conservative SQL form of the contract
(:mod:`.engine`, its SQL in :mod:`.sql`); only the lines it does not accept (~1 %) and the
distinct substance spellings come back to Python, which gives its own verdict on them. With a server (which
cannot read the loader's file), worker processes validate and resolve chunks and build each chunk's rows as
Arrow columns (the sink's own row values; the JSON encoding is kept as the reference path). A chunk's rows
land in a Memory staging table, then one ``INSERT ... SELECT`` moves the rows whose (reporter, ``event_id``) is
not stored yet into the raw tables (their materialized views fire as for the sink; the engine's path inserts
from its parsed table directly). Dedup runs inside ClickHouse, so the file never needs to fit in memory (a
chunk does: :data:`ENGINE_CHUNK_LINES` lines at most on the engine's path).

Substance identity depends on order (names seen with a structure are learnt, first sighting wins).
Chunks resolve in parallel, so a row whose identity could depend on what earlier chunks learnt is sent
back to this process, which re-resolves it in file order: the result equals a sequential run.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from clickhouse_connect.driver.client import Client

from synthwatch.errors import SynthwatchError
from synthwatch.schemas import Reject, parse_event
from synthwatch.schemas.wire import DEFAULT_LIMITS, RecordLimits
from synthwatch.settings import Settings
from synthwatch.stackfile import read_stack
from synthwatch.stream_apps.detect.identity import Structure, SubstanceResolver
from synthwatch.stream_apps.storage.backfill.arrow import ArrowRows
from synthwatch.stream_apps.storage.backfill.engine import EngineChunks
from synthwatch.stream_apps.storage.backfill.jsonrows import encode_event, substance_fragment
from synthwatch.stream_apps.storage.backfill.parse import Chunk, ChunkParser, ChunkResult, process_chunk, start_worker
from synthwatch.stream_apps.storage.backfill.prepass import Prepass
from synthwatch.stream_apps.storage.backfill.quantities import Quantities
from synthwatch.stream_apps.storage.backfill.resolve import (
    known_names,
    learnt_from_clickhouse,
    resolve_in_line_order,
    seeded_resolver,
)
from synthwatch.stream_apps.storage.backfill.store import Store
from synthwatch.stream_apps.storage.clickhouse import connect, migrate
from synthwatch.stream_apps.storage.sink import ClickHouseSink
from synthwatch.stream_apps.storage.tables import LAB_TABLE, SEIZURE_TABLE, substance_values

#: Bytes at the head of the file whose SMILES the engine's path puts through RDKit during the start-up
#: (~0.13 core-s to scan; on the simulated month, 2,247 of its 3,104 distinct SMILES are in the first 20 %).
_PREPASS_HEAD = 64 * 1024 * 1024

#: Rejects per pre-check query: their ids are bound into the SQL text, which ClickHouse caps at 256 KiB.
_REJECT_SLICE = 5000


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
    # engine open, migrations, the RDKit pre-pass, names already learnt): a fixed cost per command. On the engine's
    # path the migrations and learnt names come after the first parse has started (``_Tables``), so not here.
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


# --- reading the file in chunks --------------------------------------------------------------------


#: Lines per chunk when the embedded engine parses the file: what it holds parsed at once. Larger chunks measured
#: cheaper (1,200,000 against 600,000, alternating, quiet machine, docs/performance.md): 1 M lines 200,000-220,000
#: lines/s against 164,000-174,000, 2 M distinct ones 224,000-228,000 against 190,000-196,000 with 11 % less CPU,
#: for 6-12 % more peak RSS (1.8 GiB on 2 M lines). A file up to this size is one chunk.
ENGINE_CHUNK_LINES = 1_200_000


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


class _Tables:
    """The migrations, then the merges paused (:func:`_pause_merges`): what must precede the first write to
    the raw tables. :meth:`ready` waits for both.

    ``beside``: the migrations run on a second handle of the embedded engine, in a thread started now, while
    this process parses the first chunk into its own scratch table (which needs no migration). Why: applying
    them to a fresh directory took 1.3 s of wall time before the first parse at load 4 (2.5 s at load 6) for
    ~0.2 CPU s: each DDL statement waits on the engine's background threads and the disk, not on a core.
    Otherwise they run here, now.
    """

    def __init__(self, settings: Settings, client: Client, beside: bool) -> None:
        self.settings, self.client, self.paused, self.prepared = settings, client, False, False
        self.migrated: Future[None] = Future()
        self.migrated.set_running_or_notify_cancel()
        self.thread: threading.Thread | None = None
        if beside:
            self.thread = threading.Thread(target=self._migrate_beside, name="ingest-migrate", daemon=True)
            self.thread.start()
        else:
            migrate(client)
            self.migrated.set_result(None)

    def _migrate_beside(self) -> None:
        try:
            second = connect(self.settings, database=self.client.database, create=False)
            try:
                migrate(second)
            finally:
                second.close()
        except BaseException as error:  # raised by ready() (or close()) in the loading thread
            self.migrated.set_exception(error)
        else:
            self.migrated.set_result(None)

    def ready(self) -> None:
        """Wait for the migrations (raising what they raised), then pause the merges; once."""
        if not self.prepared:
            self.migrated.result()
            self.paused = _pause_merges(self.client, self.settings)
            self.prepared = True

    def close(self) -> None:
        """Wait for the migrations' thread (the client closes after), then restart the merges if paused."""
        if self.thread is not None:
            self.thread.join()
        if self.paused:
            self.client.command("SYSTEM START MERGES")


def _pool(workers: int, parsers: bool = True) -> ProcessPoolExecutor:
    """Worker processes, started now, before this process opens the engine.

    Fork is cheapest (modules are already imported) but unsafe once chDB's threads run in this process;
    then the forkserver starts clean workers (scripts calling this need the ``__main__`` guard).
    ``parsers``: each worker builds its :class:`ChunkParser` now; the engine's path, whose workers only scan,
    put SMILES through RDKit and judge lines, needs none (~0.06 CPU s a process).
    """
    method = "fork" if "chdb" not in sys.modules and sys.platform == "linux" else "forkserver"
    pool = ProcessPoolExecutor(workers, mp_context=get_context(method), initializer=start_worker if parsers else None)
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
    ``batch_size``: lines per chunk at most (default :data:`ENGINE_CHUNK_LINES` for ``sql``, 200,000 otherwise).
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
    batch_size = batch_size or (ENGINE_CHUNK_LINES if encoding == "sql" else 200_000)
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
    pool = _pool(workers, parsers=encoding != "sql") if workers > 0 else None  # before the engine opens here
    # SMILES through RDKit in the worker processes while this process opens the engine: the whole file's
    # for the worker processes' path; for the engine's path only its head's, the time the start-up leaves
    # (the engine reads each chunk's other SMILES itself: ``_run_in_engine``).
    head = _PREPASS_HEAD if encoding == "sql" else None
    prepass = Prepass(pool, path, workers, head, warm=encoding != "sql") if pool is not None else None
    own_client = client is None
    client = client or connect(settings)
    try:
        # The engine's path parses its first chunk while the migrations run on a second handle of the engine
        # (only on an engine this call opened: a given client's settings need not name its engine).
        tables = _Tables(settings, client, beside=own_client and encoding == "sql")
        try:
            store = Store(client, encoding, exclusive=settings.clickhouse_is_embedded)
            try:
                # The caps publish applies (a line may not smuggle megabytes either) and the worker's bound on
                # event times, against the file's receipt: as the backtest, its modification time (never after now).
                limits = dataclasses.replace(settings.record_limits(), received_at=file_received_at(path))
                run = (client, store, pool, prepass, path, batch_size, progress, size, summary, workers, started)
                _run(*run, limits, tables.ready)
            finally:
                store.close()
        finally:
            tables.close()
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        if own_client:
            client.close()
    summary.seconds = time.perf_counter() - started
    return summary


def file_received_at(path: Path) -> datetime:
    """When a file's reports were received (a line records none): its modification time, never after this clock,
    to the ms. A line dated more than ``SYNTHWATCH_MAX_FUTURE_HOURS`` after it is refused, as the worker refuses a
    record past its receipt. Why both: the state rebuild bounds stored rows by their ``ingested_at`` (this clock
    at insert, or later), so every row loaded here is also in the rebuilt state; and a file not touched since is
    judged the same when loaded again.
    """
    millis = math.floor(min(path.stat().st_mtime, time.time()) * 1000)
    return datetime.fromtimestamp(millis / 1000, UTC)


def _run(
    client: Client,
    store: Store,
    pool: ProcessPoolExecutor | None,
    prepass: Prepass | None,
    path: Path,
    batch_size: int,
    progress: bool,
    size: int,
    summary: IngestSummary,
    workers: int,
    ingest_started: float,
    limits: RecordLimits = DEFAULT_LIMITS,
    ready: Callable[[], None] = lambda: None,
) -> None:
    """``ready``: waits until the raw tables may be read and written (:meth:`_Tables.ready`)."""
    sink = ClickHouseSink(client)
    if store.encoding == "sql":
        _run_in_engine(
            client,
            store,
            path,
            batch_size,
            progress,
            prepass,
            sink,
            summary,
            ingest_started,
            limits,
            pool,
            workers,
            ready,
        )
        return
    ready()
    structures = prepass.structures() if prepass is not None else {}
    resolver = seeded_resolver(learnt_from_clickhouse(client), structures)
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
    store: Store,
    path: Path,
    batch_size: int,
    progress: bool,
    prepass: Prepass | None,
    sink: ClickHouseSink,
    summary: IngestSummary,
    ingest_started: float,
    limits: RecordLimits = DEFAULT_LIMITS,
    pool: ProcessPoolExecutor | None = None,
    workers: int = 0,
    ready: Callable[[], None] = lambda: None,
) -> None:
    """The embedded engine's path: chunks of the file parsed and checked by the engine (``EngineChunks``).

    ``ready``: waits for the migrations; called once the first chunk is parsed (which needs none of them)
    and before anything reads or writes the raw tables.

    ``prepass``: the SMILES of the file's head, through RDKit while the engine opened. Each chunk's other
    distinct SMILES go through RDKit in the worker processes after its parse (``EngineChunks.finish``).
    Why not a pre-pass over the whole file, as the worker processes' path does: the engine reads the
    SMILES anyway, and scanning the 400 MB of a 1 M-line file again in Python cost ~0.85 core-s, beside the
    engine's start-up and first parse on a 2-core machine; the head's scan fits in what the start-up
    leaves of the second core, and it spares the first chunk most of its wait for RDKit.
    """
    structures: dict[str, Structure | str] = {}  # filled chunk by chunk, before each chunk's resolution
    resolver: SubstanceResolver | None = None  # names learnt before: read once the migrations are done
    engine = EngineChunks(client, path, ChunkParser(), store.suffix, limits, pool, workers)
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
                if resolver is None:
                    ready()
                    resolver = seeded_resolver(learnt_from_clickhouse(client), structures)
                if not rows:
                    break
                if prepass is not None:
                    structures.update(prepass.structures())
                    prepass = None
                result = engine.finish(start, rows, resolver, structures, engine.new_smiles(structures))
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


def _store_chunk(
    result: ChunkResult,
    resolver: SubstanceResolver,
    store: Store,
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
        is_lab, encoded = encode_event(event, substance_fragment(substance_values(substance)), quantities)
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
