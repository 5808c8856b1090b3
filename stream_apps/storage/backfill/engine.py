"""Backfill chunks parsed and checked by the embedded engine itself, for
:mod:`synthwatch.stream_apps.storage.backfill.ingest`.

Why: the engine reads the file (``file()``, its lines numbered by ``_row_number``) and checks every line
against the contract's normal form (:mod:`.sql`) in C++, with no Python object per field; only
the lines it does not accept (~1 %) and the distinct substance spellings come back to Python. The rows
go from the parsed table straight into the raw tables. Verdicts and rows equal the other paths'
(``tests/storage/test_history.py`` compares every column).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

from clickhouse_connect.driver.client import Client

from synthwatch.schemas import BorderSeizure, LabDetection, WireError
from synthwatch.schemas.wire import (
    DEFAULT_LIMITS,
    RecordLimits,
    check_event_time,
    latest_event_time,
    parse_limited,
)
from synthwatch.stream_apps.detect.identity import Structure, SubstanceResolver
from synthwatch.stream_apps.storage.backfill.parse import ChunkParser, ChunkResult
from synthwatch.stream_apps.storage.backfill.prepass import compute_in_pool
from synthwatch.stream_apps.storage.backfill.resolve import (
    SubstanceKey,
    known_names,
    resolve_in_line_order,
    seeded_resolver,
)
from synthwatch.stream_apps.storage.backfill.sql import (
    GRAMS,
    MILLILITRES,
    PARSE_SETTINGS,
    PARSED_COLUMNS,
    PARSED_STRUCTURE,
    UNITS,
    parse_select,
    sql_string,
)
from synthwatch.stream_apps.storage.tables import (
    LAB_COLUMNS,
    LAB_TABLE,
    SEIZURE_COLUMNS,
    SEIZURE_TABLE,
    extra_text,
    substance_values,
)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MILLISECOND = timedelta(milliseconds=1)


def _ticks(value: datetime | None) -> int | None:
    """An aware instant as whole milliseconds since the epoch (``DateTime64(3)``'s ticks), truncated as
    ClickHouse truncates a text timestamp with more digits. Why ticks: the rows Python accepted go in
    through clickhouse-connect's Native insert (not Arrow arrays, whose ``pa.array`` imports pandas: ~0.3
    CPU s per load), which writes ints as they are; the truncation stays exact integer arithmetic here
    instead of its own datetime conversion. Instants before 1970 do not occur (the contract's earliest is
    1990), so flooring is truncating."""
    return None if value is None else (value - _EPOCH) // _MILLISECOND


# What a column of the other kind of report holds (the engine's defaults for its types).
_EMPTY: dict[str, object] = {"String": "", "Bool": True, "Float64": 0.0, "Nullable(Float64)": None}


def _parsed_row(number: int, event: LabDetection | BorderSeizure) -> tuple[object, ...]:
    """An event Python accepted, as a row of the engine's parsed table (``ok = 2``), in its column order."""
    s = event.substance
    row: dict[str, object] = {
        "n": number,
        "ok": 2,
        "raw": "",
        "kind": event.kind,
        "event_id": event.event_id,
        "occurred_at": _ticks(event.occurred_at),
        "reported_at": _ticks(event.reported_at),
        "country": event.country,
        "region": event.region,
        "name": s.name,
        "smiles": s.smiles or "",
        "inchikey": s.inchikey or "",
        "cas": s.cas,
        "extra": extra_text(event),
    }
    if isinstance(event, LabDetection):
        row.update(lab_id=event.lab_id, sample_id=event.sample_id, sample_type=event.sample_type)
        row.update(method=event.method, confirmed=event.confirmed, purity_pct=event.purity_pct)
    else:
        row.update(agency=event.agency, seizure_id=event.seizure_id, border_point=event.border_point)
        row.update(conveyance=event.conveyance, quantity_value=event.quantity.value, quantity_unit=event.quantity.unit)
        row.update(origin_country=event.origin_country or "", destination_country=event.destination_country or "")
    return tuple(row[name] if name in row else _EMPTY[kind] for name, kind in PARSED_COLUMNS)


#: Fewer slow lines than this are judged in this process (a pool round trip costs a few ms).
_SPLIT_SLOW_LINES = 1000

Judged = tuple[int, list[tuple[int, bytes, str, str | None]], list[tuple[object, ...]]]
"""Python's verdicts on some lines: (blank lines, rejects as ``ChunkResult.rejects``, accepted rows)."""


def judge_lines(slow: list[tuple[int, bytes]], limits: RecordLimits) -> Judged:
    """``parse_event`` itself (no inlined fast step) on the lines the engine did not accept, with the
    publisher's caps; a pool task, or run in this process."""
    blank = 0
    rejects: list[tuple[int, bytes, str, str | None]] = []
    accepted: list[tuple[object, ...]] = []
    for number, line in slow:
        raw = line.rstrip(b"\r")
        if not raw or raw.isspace():
            blank += 1
            continue
        try:
            event = parse_limited(raw, limits)  # the publisher's caps: size, unknown fields
            check_event_time(event, limits.received_at, limits)  # the worker's bound, against the file's receipt
        except WireError as error:
            rejects.append((number, raw, error.reason, error.event_id))
            continue
        accepted.append(_parsed_row(number, event))
    return blank, rejects, accepted


class EngineChunks:
    """Chunks parsed and checked by the engine itself (:mod:`.sql`), for the embedded engine.

    Only the lines the engine does not accept (about 1 %: malformed, to normalise, unknown fields) and
    the distinct substance spellings come back to Python; the rows go from the parsed table straight
    into the raw tables inside the engine. Same verdicts, same rows as the Arrow path (tests compare).
    """

    def __init__(
        self,
        client: Client,
        path: Path,
        parser: ChunkParser,
        suffix: str,
        limits: RecordLimits = DEFAULT_LIMITS,
        pool: ProcessPoolExecutor | None = None,
        workers: int = 0,
    ) -> None:
        self.client, self.parser, self.limits = client, parser, limits
        self.pool, self.workers = pool, workers
        self.per_row = False  # this chunk has order-dependent rows, resolved one by one (``row_values``)
        self.kept: dict[str, int] = {}  # this chunk's kept rows per raw table (set by :meth:`finish`)
        self.source = f"file({sql_string(str(path.resolve()))}, 'LineAsString', 'line String')"
        self.parsed, self.first = f"_ingest_parsed_{suffix}", f"_ingest_first_{suffix}"
        self.spellings, self.row_values = f"_ingest_spellings_{suffix}", f"_ingest_rows_{suffix}"
        resolved = "k String, rn String, ik Nullable(String), f String"
        tables = {
            self.parsed: PARSED_STRUCTURE,
            self.first: "n UInt64",
            self.spellings: f"s_name String, s_smiles String, s_inchikey String, {resolved}",
            self.row_values: f"r_n UInt64, {resolved}",
        }
        # The first line of each id is a Set: every ``n IN first`` (six per chunk) probes it as it is,
        # where a Memory table is read and hashed into a set again by each query.
        engines = {self.first: "Set SETTINGS persistent = 0"}
        for table, structure in tables.items():
            client.command(f"DROP TABLE IF EXISTS {table}")
            client.command(f"CREATE TABLE {table} ({structure}) ENGINE = {engines.get(table, 'Memory')}")

    def _judged(self, slow: list[tuple[int, bytes]]) -> list[Judged]:
        """Python's verdicts on ``slow`` lines, in line order: split over the pool's processes when there is
        one and enough lines to pay for the hand-over, else here.

        Why: ~45 µs a line in ``parse_event`` (~13k lines per million), while the engine waits."""
        if self.pool is None or self.workers < 2 or len(slow) < _SPLIT_SLOW_LINES:
            return [judge_lines(slow, self.limits)]
        size = -(-len(slow) // self.workers)
        parts = [slow[i : i + size] for i in range(0, len(slow), size)]
        return list(self.pool.map(judge_lines, parts, [self.limits] * len(parts)))  # map keeps the order

    def close(self) -> None:
        for table in (self.parsed, self.first, self.spellings, self.row_values):
            self.client.command(f"DROP TABLE IF EXISTS {table}")

    def parse(self, start: int, end: int) -> int:
        """Parse rows ``start..end`` (0-based, end excluded) of the file; returns how many there were."""
        client = self.client
        for table in (self.parsed, self.first, self.spellings, self.row_values):
            client.command(f"TRUNCATE TABLE {table}")
        lines = f"SELECT _row_number + 1 AS n, line FROM {self.source} WHERE _row_number BETWEEN {start} AND {end - 1}"
        select = parse_select(lines + f" LIMIT {end - start}", self.limits.max_bytes, latest_event_time(self.limits))
        client.command(f"INSERT INTO {self.parsed} {select}", settings=PARSE_SETTINGS)
        return int(str(client.command(f"SELECT count() FROM {self.parsed}")))

    def new_smiles(self, known: Collection[str]) -> list[str]:
        """The distinct SMILES of the lines the engine accepted in this chunk (after :meth:`parse`) that are
        not in ``known``, sorted."""
        rows = self.client.query(f"SELECT DISTINCT smiles FROM {self.parsed} WHERE ok = 1 AND smiles != ''")
        return sorted(smiles for (smiles,) in rows.result_rows if smiles not in known)

    def finish(
        self,
        start: int,
        rows: int,
        resolver: SubstanceResolver,
        structures: dict[str, Structure | str],
        smiles: Sequence[str] = (),
    ) -> ChunkResult:
        """The chunk's other lines through Python, then duplicates and substances (the rows stay in the
        engine: :meth:`kept_rows`); returns what Python found.

        ``smiles``: this chunk's SMILES not in ``structures`` yet (:meth:`new_smiles`), put through RDKit in
        the pool once the other lines are judged, while this process stores what they gave and finds the
        duplicates; the answers join ``structures`` before the chunk's substances are resolved."""
        client = self.client
        end = start + rows
        result = ChunkResult(start, end)
        slow = client.query(
            f"SELECT n, raw FROM {self.parsed} WHERE ok = 0 ORDER BY n", query_formats={"String": "bytes"}
        ).result_rows
        accepted: list[tuple[object, ...]] = []
        judged = self._judged([(number, bytes(line)) for number, line in slow])
        computing = compute_in_pool(self.pool, self.workers, list(smiles))
        for blank, rejects, judged_rows in judged:
            result.blank += blank
            result.rejects.extend(rejects)
            accepted.extend(judged_rows)
        if accepted:
            client.insert(
                self.parsed,
                accepted,
                column_names=[name for name, _ in PARSED_COLUMNS],
                column_type_names=[kind for _, kind in PARSED_COLUMNS],
            )
        # The first report of each reporter's id wins, whichever side accepted it; the others are duplicates.
        # Event ids are unique per reporter only: another lab's (or agency's) report under an id is its own.
        client.command(
            f"INSERT INTO {self.first} SELECT min(n) FROM {self.parsed} WHERE ok > 0 "
            "GROUP BY kind, lab_id, agency, event_id"
        )
        # One scan for the chunk's counts, the kept rows per table's included (``kept_rows`` reads them):
        # a count query per table read the parsed table and probed the first-line set twice more.
        accepted_lines, kept, kept_labs, kept_seizures = (
            int(str(count))
            for count in client.query(
                f"SELECT count(), countIf(n IN {self.first} AS is_first), countIf(is_first AND kind = "
                f"'lab_detection'), countIf(is_first AND kind = 'border_seizure') FROM {self.parsed} WHERE ok > 0"
            ).result_rows[0]
        )
        result.duplicates = accepted_lines - kept
        self.kept = {LAB_TABLE: kept_labs, SEIZURE_TABLE: kept_seizures}
        result.lines = end - start - result.blank
        for answers in computing:
            structures.update(answers.result())
        self._resolve(result, resolver, structures)
        return result

    def _resolve(
        self, result: ChunkResult, resolver: SubstanceResolver, structures: dict[str, Structure | str]
    ) -> None:
        """Substance values per distinct spelling (order-dependent ones per row, in line order)."""
        chunk_resolver = seeded_resolver(known_names(resolver), structures)
        learnt_here: set[str] = set()
        resolved: list[tuple[object, ...]] = []
        pending = False
        spellings = self.client.query(
            f"SELECT name, smiles, inchikey, min(n) AS first FROM {self.parsed} WHERE ok > 0 AND n IN {self.first} "
            "GROUP BY name, smiles, inchikey ORDER BY first"
        ).result_rows
        for name, smiles, inchikey, number in spellings:
            found = self.parser.resolve_spelling(
                chunk_resolver, structures, name, smiles or None, inchikey or None, number, learnt_here, result
            )
            if found is None:
                pending = True
            else:
                resolved.append((name, smiles, inchikey, *found))
        if resolved:
            self.client.insert(self.spellings, resolved)
        reports: list[tuple[int, SubstanceKey]] = []
        if pending:  # the kept reports whose spelling was not resolved above depend on file order
            query = (
                f"SELECT n, name, smiles, inchikey FROM {self.parsed} WHERE ok > 0 AND n IN {self.first} AND "
                f"(name, smiles, inchikey) NOT IN (SELECT s_name, s_smiles, s_inchikey FROM {self.spellings}) "
                "ORDER BY n"
            )
            reports = [
                (n, (name, smiles or None, ik or None)) for n, name, smiles, ik in self.client.query(query).result_rows
            ]
        substances = resolve_in_line_order(resolver, result.learnt, reports)  # teaches the chunk's names too
        self.per_row = bool(reports)
        if reports:
            rows = [(number, *substance_values(s)) for (number, _), s in zip(reports, substances, strict=True)]
            self.client.insert(self.row_values, rows)

    def kept_rows(self, table: str) -> tuple[str, str, int]:
        """(ids query, rows query, count) of this chunk's kept rows for ``table``, as :meth:`.store.Store.commit`
        takes them: the rows go from the parsed table straight into the raw table, no staging copy. Call
        after :meth:`finish`, which counted them."""
        kind = "lab_detection" if table == LAB_TABLE else "border_seizure"
        columns = LAB_COLUMNS if table == LAB_TABLE else SEIZURE_COLUMNS
        # Per-row values only when this chunk has some (rare): else no join with the empty table.
        pick = {c: f"if(r_n != 0, x.{c}, s.{c})" if self.per_row else f"s.{c}" for c in ("k", "rn", "ik", "f")}
        resolved = {
            "substance_key": pick["k"],
            "resolved_name": pick["rn"],
            "resolved_inchikey": pick["ik"],
            "family": pick["f"],
            "substance_name": "name",
            "substance_smiles": "nullIf(smiles, '')",
            "substance_inchikey": "nullIf(inchikey, '')",
            "substance_cas": "cas",
            "grams": GRAMS,
            "millilitres": MILLILITRES,
            "units": UNITS,
        }
        select = ", ".join(f"{resolved[c]} AS {c}" if c in resolved else c for c in columns)
        reporter = "lab_id" if table == LAB_TABLE else "agency"
        ids = f"SELECT {reporter}, event_id FROM {self.parsed} WHERE ok > 0 AND n IN {self.first} AND kind = '{kind}'"
        rows = (
            f"SELECT {select} FROM {self.parsed} AS p "
            f"LEFT JOIN {self.spellings} AS s ON p.name = s.s_name AND p.smiles = s.s_smiles "
            f"AND p.inchikey = s.s_inchikey "
            + (f"LEFT JOIN {self.row_values} AS x ON p.n = x.r_n " if self.per_row else "")
            + f"WHERE p.ok > 0 AND p.n IN {self.first} AND p.kind = '{kind}'"
        )
        return ids, rows, self.kept[table]
