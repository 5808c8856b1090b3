"""The wire contract: one JSON object per event, as labs and customs publish it.

The models validate everything a downstream detector relies on (ISO codes that exist and belong
together, timestamps with an offset, positive quantities) so that the stream apps never have to
re-check. Unknown extra fields are kept (``model_extra``), never fatal: a lab adding a field must not
lose its reports.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from functools import lru_cache
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetPydanticSchema,
    Strict,
    StringConstraints,
    TypeAdapter,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic_core import core_schema

from synthwatch.schemas.iso3166 import COUNTRIES, SUBDIVISIONS
from synthwatch.schemas.text import FORBIDDEN_PATTERN

#: Events before this instant or after ``LATEST_EVENT_TIME`` are typing errors, not history.
EARLIEST_EVENT_TIME = datetime(1990, 1, 1, tzinfo=UTC)
LATEST_EVENT_TIME = datetime(2100, 1, 1, tzinfo=UTC)

EventKind = Literal["lab_detection", "border_seizure"]
SampleType = Literal["seized_material", "biological", "wastewater", "drug_checking", "other"]
Conveyance = Literal["air", "sea", "land", "postal", "other"]
QuantityUnit = Literal["g", "kg", "mg", "ml", "l", "tablets", "units", "blotters"]

Text = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=500, pattern=FORBIDDEN_PATTERN)]
"""A non-blank, bounded, one-line text field (names, ids, methods): no control or bidi-override characters,
which forged lines in e-mails and rewrote terminals (checked inside pydantic-core; reason in :mod:`.wire`)."""
Smiles = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=2000, pattern=FORBIDDEN_PATTERN)
]

_INCHIKEY = re.compile(r"^[A-Z]{14}-[A-Z]{10}-[A-Z]$")
_CAS = re.compile(r"^(\d{2,7})-(\d{2})-(\d)$")


def _shown(value: str, limit: int = 40) -> str:
    """A refused value as quoted in a reason, cut: a 1 MB "country" must not make a 1 MB reject."""
    return repr(value) if len(value) <= limit else repr(value[:limit]) + f"... ({len(value):,} characters)"


_COUNTRY_SET = frozenset(COUNTRIES)


def _as_pycountry_key(code: str) -> str | None:
    """The table's key that pycountry's case-insensitive lookup of ``code`` would meet, or None when it can meet none.

    pycountry indexes each code by its ``lower()`` and looks up ``code.lower()``. Every code is ASCII (the table is
    generated from them: tests/floor/test_schemas.py), so only a ``code`` whose ``lower()`` is ASCII can match, and
    then it matches the code whose upper case is ``code.lower().upper()``. Text that is not ASCII but lowers to ASCII
    (the Kelvin sign lowers to "k") is found as pycountry finds it, without its database: reading that database cost
    ~0.03-0.05 s of CPU on the reader's path of any backtest whose file held one region written with an accent.
    """
    if code.isascii():
        return code.upper()
    lowered = code.lower()
    return lowered.upper() if lowered.isascii() else None


@lru_cache(maxsize=4096)
def _country_exists(code: str) -> bool:
    """pycountry's answer (a case-insensitive lookup), from the generated table (see :func:`_as_pycountry_key`)."""
    key = _as_pycountry_key(code)
    return key is not None and key in _COUNTRY_SET


@lru_cache(maxsize=16384)
def subdivision_entry(code: str) -> tuple[str, str] | None:
    """(country code, name) of an ISO 3166-2 subdivision as pycountry's case-insensitive lookup finds it, or None.

    Why not pycountry: reading its database cost ~0.1-0.2 s of every start-up. The generated table gives the
    same answer (see :func:`_as_pycountry_key`).
    """
    key = _as_pycountry_key(code)
    return None if key is None else SUBDIVISIONS.get(key)


def _subdivision_country(code: str) -> str | None:
    entry = subdivision_entry(code)
    return None if entry is None else entry[0]


def _country_code(value: str) -> str:
    code = value.strip().upper()
    if len(code) != 2 or not _country_exists(code):
        raise ValueError(f"{_shown(value)} is not an ISO 3166-1 alpha-2 country code")
    return code


def _region_code(value: str) -> str:
    code = value.strip().upper()
    if _subdivision_country(code) is None:
        raise ValueError(f"{_shown(value)} is not an ISO 3166-2 subdivision code (e.g. 'ML-BKO')")
    return code


def _inchikey(value: str) -> str:
    key = value.strip().upper()
    if not _INCHIKEY.match(key):
        raise ValueError(f"{_shown(value)} is not an InChIKey (XXXXXXXXXXXXXX-XXXXXXXXXX-X)")
    return key


def _cas_number(value: str) -> str:
    match = _CAS.match(value.strip())
    if match is None:
        raise ValueError(f"{_shown(value)} is not a CAS registry number (e.g. 1189805-46-6)")
    digits = (match.group(1) + match.group(2))[::-1]
    if sum((i + 1) * int(d) for i, d in enumerate(digits)) % 10 != int(match.group(3)):
        raise ValueError(f"{_shown(value)} has a wrong CAS check digit")
    return value.strip()


def _timestamp_text(value: Any) -> Any:
    """RFC 3339 text only: a bare number would be read as epoch seconds and silently mean 1970."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        raise ValueError("timestamps are RFC 3339 strings with an offset, e.g. 2026-03-01T10:15:00+00:00")
    return value


def _plausible_time(value: datetime) -> datetime:
    if not EARLIEST_EVENT_TIME <= value < LATEST_EVENT_TIME:
        raise ValueError(f"{value.isoformat()} is outside {EARLIEST_EVENT_TIME.year}-{LATEST_EVENT_TIME.year - 1}")
    return value


CountryCode = Annotated[str, AfterValidator(_country_code)]
RegionCode = Annotated[str, AfterValidator(_region_code)]
Timestamp = Annotated[AwareDatetime, BeforeValidator(_timestamp_text), AfterValidator(_plausible_time)]
InChIKey = Annotated[str, AfterValidator(_inchikey)]

# --- the fast path: the same contract checked inside pydantic-core, no Python call per field ----------
#
# The public models below accept only values that are already in normal form (upper-case codes, a
# well-formed InChIKey, an RFC 3339 string), which is what nearly every report sends. Anything they
# refuse goes to the checked models at the end of this module, which accept what needs normalising and
# word the reasons; :mod:`.wire` does the routing. Fast-accepted is a subset of checked-accepted with
# equal values (tests/floor/test_schemas.py compares the two on fuzzed input), so the contract is unchanged.
# Each fast type shows the JSON Schema of its checked twin, so the exported schema is unchanged too.


def _one_of(values: frozenset[str], json_schema: dict[str, Any]) -> Any:
    """A str that must be one of ``values`` (a hash lookup in pydantic-core), shown as ``json_schema``."""
    schema = core_schema.literal_schema(sorted(values))
    return GetPydanticSchema(lambda _type, _handler: schema), WithJsonSchema(json_schema)


#: Every code the checked validators accept, in the normal form they return it in.
COUNTRY_CODES: frozenset[str] = _COUNTRY_SET
#: Read off the generated table (:mod:`.iso3166`); the same table as looking each code up with
#: ``_subdivision_country`` (tests/floor/test_schemas.py checks it, and the table against pycountry).
SUBDIVISION_COUNTRY: dict[str, str] = {code: country for code, (country, _name) in SUBDIVISIONS.items()}

_STRING = {"type": "string"}
_FastCountry = Annotated[str, *_one_of(COUNTRY_CODES, _STRING)]
_FastRegion = Annotated[str, *_one_of(frozenset(SUBDIVISION_COUNTRY), _STRING)]
# Strict: a JSON string only (the checked twin refuses numbers); the range is checked by ``fast_event_ok``.
_FastTimestamp = Annotated[AwareDatetime, Strict(), WithJsonSchema({"format": "date-time", "type": "string"})]
_FastInChIKey = Annotated[str, StringConstraints(pattern=_INCHIKEY.pattern), WithJsonSchema(_STRING)]


class SubstanceReport(BaseModel):
    """The substance as reported: a name, a structure (SMILES or InChIKey), or both."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    name: Text | None = Field(
        default=None, description="Name as reported (any language, any spelling); optional with a SMILES or InChIKey."
    )
    smiles: Smiles | None = None
    inchikey: _FastInChIKey | None = None
    cas: Annotated[str, AfterValidator(_cas_number)] | None = None


class Quantity(BaseModel):
    """A seized amount; normalised to grams downstream where the unit allows."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    value: float = Field(gt=0, le=1e9, description="Strictly positive amount in `unit`.")
    unit: QuantityUnit


class _EventBase(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    event_id: Text = Field(description="Unique id; a re-sent event carries the same id.")
    occurred_at: _FastTimestamp = Field(description="Event time (RFC 3339 with offset).")
    reported_at: _FastTimestamp | None = None
    country: _FastCountry
    region: _FastRegion = Field(description="ISO 3166-2 subdivision of `country`.")
    substance: SubstanceReport
    corrects: Text | None = Field(
        default=None,
        description="The event_id of an earlier report of the same reporter that this one corrects (a "
        "misidentification, a typo): that report is marked corrected, never overwritten, and officers alerted "
        "on it are told. Must name another event_id.",
    )

    @property
    def extra_fields(self) -> dict[str, Any]:
        """Unknown fields of the event and of its substance, kept verbatim."""
        extra = dict(self.model_extra or {})
        if self.substance.model_extra:
            extra["substance"] = dict(self.substance.model_extra)
        return extra


class LabDetection(_EventBase):
    """A forensic lab's structure-identified detection."""

    kind: Literal["lab_detection"]
    lab_id: Text
    sample_id: Text
    sample_type: SampleType
    method: Text = Field(description="Identification method as free text, e.g. GC-MS, LC-HRMS.")
    confirmed: bool = True
    purity_pct: float | None = Field(default=None, ge=0, le=100)


class BorderSeizure(_EventBase):
    """A customs or police seizure, usually identified by name only."""

    kind: Literal["border_seizure"]
    agency: Text
    seizure_id: Text
    border_point: Text
    conveyance: Conveyance
    quantity: Quantity
    origin_country: _FastCountry | None = None
    destination_country: _FastCountry | None = None


Event = Annotated[LabDetection | BorderSeizure, Field(discriminator="kind")]
"""Any input event; ``kind`` selects the model."""

EVENT_ADAPTER: TypeAdapter[LabDetection | BorderSeizure] = TypeAdapter(Event)
EVENTS_ADAPTER: TypeAdapter[list[LabDetection | BorderSeizure]] = TypeAdapter(list[Event])
"""A JSON array of events in one call (bulk loads); fast path only, same acceptance rule per item."""


_SURELY_AFTER_YEAR = EARLIEST_EVENT_TIME.year  # a local year above this one is inside the range
_SURELY_BEFORE_YEAR = LATEST_EVENT_TIME.year - 1  # and one below this one


def _plausible(value: datetime) -> bool:
    # A local year strictly inside the range is inside whatever the offset (offsets stay under a day);
    # comparing aware datetimes asks both offsets, which costs more than the rest of this check.
    return _SURELY_AFTER_YEAR < value.year < _SURELY_BEFORE_YEAR or EARLIEST_EVENT_TIME <= value < LATEST_EVENT_TIME


def fast_event_ok(event: LabDetection | BorderSeizure) -> bool:
    """The checks pydantic-core cannot make: a name or structure, times in range, region inside the country."""
    reported = event.reported_at
    substance = event.substance
    return (
        (substance.name is not None or substance.smiles is not None or substance.inchikey is not None)
        and _plausible(event.occurred_at)
        and (reported is None or _plausible(reported))
        and SUBDIVISION_COUNTRY[event.region] == event.country
        and event.corrects != event.event_id
    )


# --- the checked models: normalise what needs it, and say why a report is refused --------------------


class CheckedSubstanceReport(SubstanceReport):
    inchikey: InChIKey | None = None

    @model_validator(mode="after")
    def _named_or_structured(self) -> CheckedSubstanceReport:
        if self.name is None and self.smiles is None and self.inchikey is None:
            raise ValueError("needs a name, a SMILES or an InChIKey (any one identifies the substance)")
        return self


class _CheckedEvent(_EventBase):
    occurred_at: Timestamp = Field(description="Event time (RFC 3339 with offset).")
    reported_at: Timestamp | None = None
    country: CountryCode
    region: RegionCode = Field(description="ISO 3166-2 subdivision of `country`.")
    substance: CheckedSubstanceReport

    @field_validator("region")
    @classmethod
    def _region_in_country(cls, region: str, info: ValidationInfo) -> str:
        country = info.data.get("country")  # absent when the country itself was invalid
        owner = _subdivision_country(region)
        if country is not None and owner != country:
            raise ValueError(f"{region} belongs to country {owner}, not {country}")
        return region

    @field_validator("corrects")
    @classmethod
    def _corrects_another(cls, corrects: str | None, info: ValidationInfo) -> str | None:
        if corrects is not None and corrects == info.data.get("event_id"):
            raise ValueError("names this report's own event_id: a correction has a new event_id of its own")
        return corrects


class CheckedLabDetection(_CheckedEvent, LabDetection):
    """:class:`LabDetection` with Python validators: normalises codes and words refusals."""


class CheckedBorderSeizure(_CheckedEvent, BorderSeizure):
    """:class:`BorderSeizure` with Python validators: normalises codes and words refusals."""

    origin_country: CountryCode | None = None
    destination_country: CountryCode | None = None


CHECKED_EVENT_ADAPTER: TypeAdapter[CheckedLabDetection | CheckedBorderSeizure] = TypeAdapter(
    Annotated[CheckedLabDetection | CheckedBorderSeizure, Field(discriminator="kind")]
)
