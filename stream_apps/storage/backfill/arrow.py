"""The backfill's Arrow encoding: a chunk's rows as typed columns (Arrow IPC), the fast path for a server.

Why: the owner process is the bottleneck; with Arrow it hands typed columns to ClickHouse instead of
text that ClickHouse must parse. The values are the sink's (:mod:`synthwatch.stream_apps.storage.tables`).
"""

from __future__ import annotations

import pyarrow as pa

from synthwatch.schemas import BorderSeizure, LabDetection
from synthwatch.stream_apps.storage.backfill.quantities import Quantities
from synthwatch.stream_apps.storage.tables import (
    LAB_COLUMNS,
    LAB_TABLE,
    SEIZURE_COLUMNS,
    SEIZURE_TABLE,
    SubstanceValues,
    lab_values,
    seizure_values,
)

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
ARROW_COLUMNS = {
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
        return arrow_ipc(rows, [(name, kind) for name, kind, _ in ARROW_COLUMNS[table]]) if rows else b""


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
