"""A digest of everything ``ingest-history`` stores, to show that a change to the loader stores the same data.

Why: speeding the loader up must not change one stored value. Per table, the number of rows and the sum of
a hash of each row's stored columns (``ingested_at``/``rejected_at``, set at insert time, left out). The
aggregate tables are re-summed by their key first (their rows are partial sums until merged, and which
rows a key's sum is split into depends on the inserts), ``grams`` rounded to 6 decimals (a float sum
depends on the order of its parts) and ``any`` columns read as sets. Two loads of one file store the same
data when their digests are equal.

    python -m synthwatch.bench.ingest_digest DATA_DIR    # the embedded engine in DATA_DIR, as JSON
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

from clickhouse_connect.driver.client import Client

RAW_TABLES = ("lab_detections", "border_seizures", "rejects")
_SET_AT_INSERT = ("ingested_at", "rejected_at")
_SUMS = "arraySort(groupUniqArray(substance_name)), sum(reports), round(sum(grams), 6)"
_SIGHTINGS = (
    "arraySort(groupUniqArray(substance_name)), arraySort(groupUniqArray(family)), min(first_seen), "
    "max(last_seen), sum(reports)"
)
AGGREGATES = {
    "reports_daily": ("day, country, region, kind, family, substance_key", _SUMS),
    "reports_hourly": ("hour, country, region, kind, family, substance_key", _SUMS),
    "substance_first_seen": ("substance_key", _SIGHTINGS),
    "substance_region_first_seen": ("substance_key, country, region", _SIGHTINGS),
}


def _stored_columns(client: Client, table: str) -> list[str]:
    rows = client.query(
        "SELECT name FROM system.columns WHERE database = currentDatabase() AND table = {table:String} "
        "AND default_kind != 'ALIAS' ORDER BY position",
        parameters={"table": table},
    ).result_rows
    return [name for (name,) in rows if name not in _SET_AT_INSERT]


def stored_digest(client: Client) -> dict[str, list[int]]:
    """[rows, sum of the rows' hashes] per raw, reject and aggregate table of ``client``'s database."""
    digest: dict[str, list[int]] = {}
    for table in RAW_TABLES:
        columns = ", ".join(_stored_columns(client, table))
        query = f"SELECT count(), sum(cityHash64(toString(tuple({columns})))) FROM {table}"
        digest[table] = [int(value) for value in client.query(query).result_rows[0]]
    for table, (key, values) in AGGREGATES.items():
        query = (
            f"SELECT count(), sum(cityHash64(toString(tuple(*)))) FROM "
            f"(SELECT {key}, {values} FROM {table} GROUP BY {key})"
        )
        digest[table] = [int(value) for value in client.query(query).result_rows[0]]
    return digest


def main(argv: Sequence[str] | None = None) -> int:
    """Print the digest of the embedded engine in the data directory given, as JSON."""
    from synthwatch.settings import Settings
    from synthwatch.stream_apps.storage.clickhouse import connect

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m synthwatch.bench.ingest_digest DATA_DIR", file=sys.stderr)
        return 2
    client = connect(Settings(data_dir=Path(args[0])), create=False)
    try:
        print(json.dumps(stored_digest(client), sort_keys=True))
    finally:
        client.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
