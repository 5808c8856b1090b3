"""Substance identity for the backfill: chunk resolvers, and the file-order replay of what depends on order.

Why: a name seen with a structure is learnt (first sighting wins), so a report's identity can depend on
earlier lines. Chunks resolve in parallel from the names known before them; what could depend on an
earlier chunk is re-resolved here in line order (:func:`resolve_in_line_order`), which equals a
sequential run. Names learnt by earlier loads or by the worker come from ClickHouse.
"""

from __future__ import annotations

import re
from datetime import datetime

from clickhouse_connect.driver.client import Client

from synthwatch.stream_apps.detect.identity import (
    ResolvedSubstance,
    Structure,
    SubstanceResolver,
    structure_from_smiles,
)

_STRUCTURE_KEY = re.compile(r"[A-Z]{14}")  # a report with a bad SMILES and no InChIKey keeps a name key


# Learnt names already in ClickHouse (as the worker's state rebuild restores them).
_LEARNT_NAMES = """
SELECT substance_name, any(substance_key), any(family) FROM lab_detections
WHERE substance_smiles IS NOT NULL OR substance_inchikey IS NOT NULL
GROUP BY substance_name
"""


SubstanceKey = tuple[str, str | None, str | None]
"""A report's substance as spelt (name, SMILES, InChIKey): the unit of resolution caching."""


def depends_on_order(substance: ResolvedSubstance, smiles: str | None, structures: dict[str, Structure | str]) -> bool:
    """True when the resolution used (or could have used) names or families learnt from earlier reports."""
    if substance.resolved_by in ("learnt_name", "unresolved_name"):
        return True
    if substance.resolved_by == "structure" and not substance.catalogued:
        # family of an InChIKey-only report comes from earlier SMILES reports of the same key
        if not smiles:
            return True
        found = structures.get(smiles)
        return isinstance(found if found is not None else structure_from_smiles(smiles), str)
    return False


class _SharedStructuresResolver(SubstanceResolver):
    """The stream's resolver, fed structures other processes computed (RDKit costs ~1 ms per distinct SMILES).

    A valid SMILES resolves exactly as :meth:`SubstanceResolver.resolve` does (structure, no error); anything
    else, or a SMILES not computed yet, goes through the inherited method unchanged.
    """

    def __init__(self, structures: dict[str, Structure | str]) -> None:
        super().__init__()
        self.structures = structures

    def resolve(
        self,
        name: str | None,
        smiles: str | None = None,
        inchikey: str | None = None,
        reporter: str | None = None,
        region: str | None = None,
        occurred_at: datetime | None = None,
        event_id: str | None = None,
    ) -> ResolvedSubstance:
        found = self.structures.get(smiles) if smiles else None
        if isinstance(found, Structure):
            if occurred_at is not None:
                self.note_time(occurred_at)  # as resolve() does: the bound of a name's link
            return self._from_structure(found, name or "", None, reporter, occurred_at, event_id)
        return super().resolve(
            name,
            smiles=smiles,
            inchikey=inchikey,
            reporter=reporter,
            region=region,
            occurred_at=occurred_at,
            event_id=event_id,
        )


def seeded_resolver(
    known: dict[str, tuple[str, str | None]], structures: dict[str, Structure | str] | None = None
) -> SubstanceResolver:
    """A chunk's resolver: it knows the names learnt before the chunk (``known``) and uses ``structures``
    (kept by reference: the caller may fill it later) instead of running RDKit again."""
    resolver = _SharedStructuresResolver(structures if structures is not None else {})
    for name, (key, family) in known.items():
        resolver.learn(name, key, family)  # type: ignore[arg-type]
    return resolver


def learnt_from_clickhouse(client: Client) -> dict[str, tuple[str, str | None]]:
    """Names learnt by earlier loads or by the worker, so a backfill resolves as the worker would."""
    resolver = SubstanceResolver()
    families: dict[str, str | None] = {}
    for name, key, family in client.query(_LEARNT_NAMES).result_rows:
        if _STRUCTURE_KEY.fullmatch(key) and resolver.learn(name, key, family or None):
            families[key] = family or None
    return {name: (key, families.get(key)) for name, key in resolver.learnt_names().items()}


def known_names(resolver: SubstanceResolver) -> dict[str, tuple[str, str | None]]:
    """The names ``resolver`` has learnt, with their key and family: what a chunk's resolver starts from."""
    return {name: (key, resolver.family_of(key)) for name, key in resolver.learnt_names().items()}


def resolve_in_line_order(
    resolver: SubstanceResolver,
    learnt: list[tuple[int, str, str, str | None]],
    pending: list[tuple[int, SubstanceKey]],
) -> list[ResolvedSubstance]:
    """The resolutions of a chunk's order-dependent spellings (``pending``: line, spelling), with the names
    the chunk learnt (``learnt``: line, name, key, family) taught to ``resolver`` at their lines, a name
    before a report on the same line: what a sequential run over the file resolves."""
    steps = sorted(
        [(line, 0, i) for i, (line, *_) in enumerate(learnt)] + [(p[0], 1, i) for i, p in enumerate(pending)]
    )
    found: dict[int, ResolvedSubstance] = {}
    for _line, is_report, i in steps:
        if is_report:
            name, smiles, inchikey = pending[i][1]
            found[i] = resolver.resolve(name, smiles=smiles, inchikey=inchikey)
        else:
            _, name, key, family = learnt[i]
            resolver.learn(name, key, family)  # type: ignore[arg-type]
    return [found[i] for i in range(len(pending))]
