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

# Per structure key (a 14-letter InChIKey block: reported with a structure) stored in (since, cut]: its first stored
# report there (the instant in ms, then the event id, breaking ties), and that report's name, SMILES and family.
LEARNT_STRUCTURES_SQL = """
SELECT substance_key,
       min((toUnixTimestamp64Milli(ingested_at), event_id)),
       argMin(substance_name, (ingested_at, event_id)),
       argMin(assumeNotNull(substance_smiles), (ingested_at, event_id)),
       argMin(family, (ingested_at, event_id))
FROM (
    SELECT substance_key, substance_name, substance_smiles, family, ingested_at, event_id FROM lab_detections
    WHERE substance_smiles IS NOT NULL AND match(substance_key, '^[A-Z]{14}$')
      AND toUnixTimestamp64Milli(ingested_at) > {since:Int64} AND toUnixTimestamp64Milli(ingested_at) <= {cut:Int64}
    UNION ALL
    SELECT substance_key, substance_name, substance_smiles, family, ingested_at, event_id FROM border_seizures
    WHERE substance_smiles IS NOT NULL AND match(substance_key, '^[A-Z]{14}$')
      AND toUnixTimestamp64Milli(ingested_at) > {since:Int64} AND toUnixTimestamp64Milli(ingested_at) <= {cut:Int64}
)
GROUP BY substance_key
"""


def cut_millis(as_of: datetime) -> int:
    """The cut as the engine compares it: milliseconds since the epoch (``ingested_at`` is DateTime64(3))."""
    return int(as_of.timestamp() * 1000)


class LearntStructures:
    """Every structure's first stored report, read from the store up to the latest cut asked; one per worker.

    Why kept: reading every stored report for each new-substance alert took ~0.5 s over a million reports,
    on the alert's path. Each alert now reads only what was stored since the cut before it (a few ms), and a
    cut earlier than one read already (a replay) is answered from what is kept: a structure's first report
    stored by then is its first stored report overall, if that was stored by the cut. Not thread-safe: the
    sink calls it under its lock.
    """

    def __init__(self) -> None:
        self._first: dict[str, tuple[tuple[int, str], LearntStructure]] = {}
        self._through: int | None = None  # the latest cut read (ms): everything stored by then is in _first

    def as_of(self, client: Client, as_of: datetime) -> list[LearntStructure]:
        """Every structure whose first report was stored at or before ``as_of`` (catalogued ones included: the
        caller leaves those to the catalogue part), in key order. Names and SMILES are report fields: hostile."""
        from synthwatch.stream_apps.detect.similarity import LearntStructure  # RDKit: only once an alert asks

        cut = cut_millis(as_of)
        if self._through is None or cut > self._through:
            since = -(2**62) if self._through is None else self._through
            rows = client.query(LEARNT_STRUCTURES_SQL, parameters={"since": since, "cut": cut}).result_rows
            for key, (stored, event_id), name, smiles, family in rows:
                first = (int(stored), str(event_id))
                known = self._first.get(str(key))
                if known is None or first < known[0]:
                    found = LearntStructure(
                        str(key), str(name), str(smiles), cast("Family", family) if family else None
                    )
                    self._first[str(key)] = (first, found)
            self._through = cut
        return [found for key, (first, found) in sorted(self._first.items()) if first[0] <= cut]


def learnt_structures(client: Client, as_of: datetime) -> list[LearntStructure]:
    """Every structure whose first report was stored at or before ``as_of``, read afresh (:class:`LearntStructures`)."""
    return LearntStructures().as_of(client, as_of)
