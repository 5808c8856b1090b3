"""The backfill's JSONEachRow encoding: the earliest path, kept as the reference the tests compare with.

A validated event is dumped by pydantic and read by ClickHouse into a Memory staging table of named
tuples (:data:`LAB_STAGING`, :data:`SEIZURE_STAGING`); :data:`LAB_SELECT` / :data:`SEIZURE_SELECT`
turn a staged row into the raw table's columns (:data:`~synthwatch.stream_apps.storage.tables.LAB_COLUMNS`).
"""

from __future__ import annotations

import json

from synthwatch.schemas import BorderSeizure, LabDetection
from synthwatch.stream_apps.storage.backfill.quantities import Quantities
from synthwatch.stream_apps.storage.tables import SubstanceValues, extra_text

STAGING_SETTINGS = {
    "date_time_input_format": "best_effort",  # RFC 3339 with any offset, as pydantic wrote it
    "input_format_skip_unknown_fields": 1,  # extra fields are in the event JSON; `x` carries them
    "input_format_json_ignore_unknown_keys_in_named_tuple": 1,
}


# The validated event as pydantic dumps it, read by ClickHouse into named tuples (unknown keys skipped).
_COMMON_TUPLE = (
    "event_id String, occurred_at DateTime64(3, 'UTC'), reported_at Nullable(DateTime64(3, 'UTC')), "
    "country String, region String, "
    "substance Tuple(name String, smiles Nullable(String), inchikey Nullable(String), cas Nullable(String))"
)
_STAGING_COLUMNS = "k String, n String, ik Nullable(String), f String, x String DEFAULT '{}'"
LAB_STAGING = (
    f"e Tuple({_COMMON_TUPLE}, lab_id String, sample_id String, sample_type String, method String, "
    f"confirmed Bool, purity_pct Nullable(Float64)), {_STAGING_COLUMNS}"
)
SEIZURE_STAGING = (
    f"e Tuple({_COMMON_TUPLE}, agency String, seizure_id String, border_point String, conveyance String, "
    "quantity Tuple(value Float64, unit String), origin_country Nullable(String), "
    f"destination_country Nullable(String)), {_STAGING_COLUMNS}, "
    "g Nullable(Float64), ml Nullable(Float64), u Nullable(Float64)"
)
_COMMON_SELECT = (
    "e.event_id, e.occurred_at, e.reported_at, e.country, e.region, e.substance.name, e.substance.smiles, "
    "e.substance.inchikey, e.substance.cas, k, n, ik, f, x"
)
LAB_SELECT = f"{_COMMON_SELECT}, e.lab_id, e.sample_id, e.sample_type, e.method, e.confirmed, e.purity_pct"
SEIZURE_SELECT = (
    f"{_COMMON_SELECT}, e.agency, e.seizure_id, e.border_point, e.conveyance, e.quantity.value, e.quantity.unit, "
    "g, ml, u, ifNull(e.origin_country, ''), ifNull(e.destination_country, '')"
)


def substance_fragment(values: SubstanceValues) -> str:
    key, name, inchikey, family = values
    return (
        f',"k":{json.dumps(key)},"n":{json.dumps(name, ensure_ascii=False)},'
        f'"ik":{json.dumps(inchikey)},"f":{json.dumps(family)}'
    )


def _extra_fragment(event: LabDetection | BorderSeizure) -> str:
    """The sink's ``extra`` column (unknown fields, kept verbatim); empty for nearly every report."""
    if not event.model_extra and not event.substance.model_extra and event.corrects is None:
        return ""
    return f',"x":{json.dumps(extra_text(event), ensure_ascii=False)}'


def encode_event(event: LabDetection | BorderSeizure, substance_json: str, quantities: Quantities) -> tuple[bool, str]:
    """(is a lab detection, one JSONEachRow line for the staging table)."""
    body = event.model_dump_json()
    if isinstance(event, LabDetection):
        return True, f'{{"e":{body}{substance_json}{_extra_fragment(event)}}}'
    fragment = quantities.fragment(event.quantity)
    return False, f'{{"e":{body}{substance_json}{fragment}{_extra_fragment(event)}}}'
