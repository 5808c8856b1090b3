"""The structures the network learnt, as of a stored cut: what a new-substance alert compares with besides the
catalogue (issue 16).

Why a cut in the store: which reports a worker has met when it raises an alert depends on timing (partitions
read at different speeds, several workers, a replay after a crash). The reports stored in ClickHouse at or
before a fixed instant are the same set whenever they are read later, so an alert that names its cut, and
reads only those, says the same thing when a replay computes it again. ``ingested_at`` is the engine's own
clock at insert (never a report's field), and a re-sent report is not inserted again (the sink filters ids
stored already), so a row's ``ingested_at`` does not move.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from clickhouse_connect.driver.client import Client

    from synthwatch.catalogue import Family
    from synthwatch.stream_apps.detect.similarity import LearntStructure

# One row per structure key (a 14-letter InChIKey block: reported with a structure), its name, SMILES and family
# from its first stored report (ties on the instant broken by event id): the same row whoever reads it.
LEARNT_STRUCTURES_SQL = """
SELECT substance_key,
       argMin(substance_name, (ingested_at, event_id)),
       argMin(assumeNotNull(substance_smiles), (ingested_at, event_id)),
       argMin(family, (ingested_at, event_id))
FROM (
    SELECT substance_key, substance_name, substance_smiles, family, ingested_at, event_id FROM lab_detections
    WHERE substance_smiles IS NOT NULL AND match(substance_key, '^[A-Z]{14}$')
      AND toUnixTimestamp64Milli(ingested_at) <= {cut:Int64}
    UNION ALL
    SELECT substance_key, substance_name, substance_smiles, family, ingested_at, event_id FROM border_seizures
    WHERE substance_smiles IS NOT NULL AND match(substance_key, '^[A-Z]{14}$')
      AND toUnixTimestamp64Milli(ingested_at) <= {cut:Int64}
)
GROUP BY substance_key
ORDER BY substance_key
"""


def cut_millis(as_of: datetime) -> int:
    """The cut as the engine compares it: milliseconds since the epoch (``ingested_at`` is DateTime64(3))."""
    return int(as_of.timestamp() * 1000)


def learnt_structures(client: Client, as_of: datetime) -> list[LearntStructure]:
    """Every structure whose first report was stored at or before ``as_of`` (catalogued ones included: the
    caller leaves those to the catalogue part), in key order. Names and SMILES are report fields: hostile."""
    from synthwatch.stream_apps.detect.similarity import LearntStructure  # RDKit: only once an alert asks

    rows = client.query(LEARNT_STRUCTURES_SQL, parameters={"cut": cut_millis(as_of)}).result_rows
    return [
        LearntStructure(str(key), str(name), str(smiles), cast("Family", family) if family else None)
        for key, name, smiles, family in rows
    ]
