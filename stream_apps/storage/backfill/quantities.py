"""Seized amounts as stored (grams, millilitres, units), converted once per distinct spelling.

Why its own module: both encodings of the backfill's rows (:mod:`.arrow`, :mod:`.jsonrows`) need the
conversions, and pint costs too much to run per report.
"""

from __future__ import annotations

from synthwatch.schemas.events import Quantity
from synthwatch.stream_apps.detect.identity import normalise_quantity
from synthwatch.stream_apps.storage.tables import QuantityValues, quantity_values


def _number(value: float | None) -> str:
    return "null" if value is None else repr(float(value))


class Quantities:
    """Grams, millilitres and units per distinct (value, unit): pint runs once per spelling, not per report.

    Owned by one :class:`.parse.ChunkParser` (or one loader), so its size is bounded and its life is the loader's.
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
