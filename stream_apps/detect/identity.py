"""Substance identity: one stable key per substance, whatever name, salt or SMILES spelling a report uses.

Every detector counts by substance, so every report goes through ``SubstanceResolver.resolve``. The
structure key is the InChIKey first block (connectivity only): the same molecule written differently,
as a salt, or without stereo still gets one key. Names are only a fallback, because street names are
ambiguous; names seen alongside a structure are learnt so later name-only reports join that structure.

Learnt names and forged reports: with ``corroboration=n`` (the worker uses 2), a learnt name is
*provisional* until n different reporters (organisations whose signature was verified, else the claimed
lab or agency) have reported it with the same structure. A provisional name still resolves, marked
``provisional=True``. A report of a provisional name with another structure makes the name *contested*:
neither structure keeps it, name-only reports of it resolve by the name itself (``name:...``, as an
unknown name) and :meth:`SubstanceResolver.contested_names` lists it for an analyst (the catalogue
settles it). A corroborated name is never taken over by a later, different structure. So one
organisation (or one forger with one key) can no longer bind a street name to a wrong structure for
good; with ``corroboration=1`` (the default, for trusted batch loads) the first sighting wins.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from functools import cache, lru_cache
from typing import TYPE_CHECKING, Any, Literal, cast, get_args

from rdkit import Chem
from rdkit.Chem.MolStandardize import rdMolStandardize
from rdkit.rdBase import BlockLogs

from synthwatch.catalogue import CatalogueEntry, Family, shipped_catalogue
from synthwatch.schemas.records import IdentifiedBy
from synthwatch.stream_apps.detect.families import classify

if TYPE_CHECKING:
    import pint

ResolvedBy = IdentifiedBy  # carried to the alert (Alert.identified_by)

NAME_KEY_PREFIX = "name:"
_ONE_DAY = timedelta(days=1)  # how often unresolved names are pruned (in event time)
NAME_LINK_HORIZON_DAYS = 180
"""A name-only report older than this (event time) before the structure report that settles its name is not
tied to the structure (``formerly``): one old or junk report must not decide how a new structure is announced."""
NAME_LINK_REGIONS = 32
"""At most this many regions are remembered per unresolved name (the first ones in code order: deterministic)."""
FAMILY_NAMES: frozenset[str] = frozenset(get_args(Family))
SMILES_ERROR = "SMILES not parseable by RDKit"
INCHIKEY_ERROR = "InChIKey not well formed"
STANDARDISE_ERROR = "structure could not be standardised to an InChIKey"

_CACHE_SIZE = 65536
_INCHIKEY = re.compile(r"^([A-Z]{14})(?:-[A-Z]{10}-[A-Z])?$")
_STRUCTURE_KEY = re.compile(r"[A-Z]{14}")

# Placeholders that say nothing about the substance; learning them would merge unrelated reports.
UNINFORMATIVE_NAMES: frozenset[str] = frozenset(
    {"", "unknown", "unidentified", "unknownsubstance", "unknownpowder", "na", "none", "null", "other"}
) | {"powder", "pill", "pills", "tablet", "tablets", "liquid", "sample", "substance", "mixture"}


@lru_cache(maxsize=_CACHE_SIZE)
def normalise_name(name: str) -> str:
    """Fold case, accents and punctuation so "3-MMC", " 3 mmc " and "3MMC" (and "Cocaïne"/"cocaine") meet."""
    decomposed = unicodedata.normalize("NFKD", name.casefold())
    return "".join(ch for ch in decomposed if ch.isalnum() and not unicodedata.combining(ch))


#: Salt, counter-ion and form words (English and French) that say how a substance was prepared, not which one
#: it is: "Mephedrone HCl", "chlorhydrate de méphédrone" and "MDMA hemifumarate" are mephedrone and MDMA, as
#: their SMILES with ``.Cl`` already resolve. Matched on the normalised name (see :func:`strip_salt_words`).
SALT_WORDS: frozenset[str] = frozenset(
    {"hcl", "hydrochloride", "hydrochlorid", "dihydrochloride", "chlorhydrate", "dichlorhydrate", "hydrochlorure"}
    | {"hbr", "hydrobromide", "bromhydrate", "hydroiodide", "iodhydrate"}
    | {"citrate", "dihydrogencitrate", "fumarate", "hemifumarate", "tartrate", "bitartrate", "hemitartrate"}
    | {"sulfate", "sulphate", "hemisulfate", "hemisulphate", "bisulfate", "phosphate", "diphosphate"}
    | {"maleate", "mesylate", "mesilate", "besylate", "besilate", "oxalate", "succinate", "napsylate"}
    | {"monohydrate", "dihydrate", "trihydrate", "hemihydrate", "sesquihydrate", "hydrate", "anhydrous", "anhydre"}
    | {"freebase", "base", "baselibre", "salt", "salts", "sel", "sels"}
)
#: Salt words end a name ("mephedrone HCl"); in French they start it, joined by "de"/"du"/"d'"
#: ("chlorhydrate de méphédrone", "sulfate d'amphétamine"). Longest first, so "hemifumarate" beats "fumarate".
_SALT_SUFFIXES: tuple[str, ...] = tuple(sorted(SALT_WORDS, key=lambda w: (-len(w), w)))
_SALT_PREFIXES: tuple[str, ...] = tuple(
    sorted({w + joint for w in SALT_WORDS for joint in ("de", "du", "d")}, key=lambda w: (-len(w), w))
)
#: Characters a name keeps at least once its salt words are gone ("2C HCl" is 2C; "HCl" alone stays "hcl").
_MIN_NAME = 2


@lru_cache(maxsize=_CACHE_SIZE)
def strip_salt_words(name: str) -> str:
    """The normalised name without its salt and form words ("Mephedrone HCl" -> "mephedrone").

    Why: a lab names the salt it weighed; the network counts the substance. Matched on the normalised
    name (case, accents, spaces and punctuation gone), so it is as indifferent to spelling as name
    resolution itself ("hydrochlorid e" is "hydrochloride"). A name made only of such words
    ("hydrochloride") is kept whole, so it never becomes the empty name.
    """
    key = normalise_name(name)
    while True:
        suffix = next((w for w in _SALT_SUFFIXES if key.endswith(w) and len(key) - len(w) >= _MIN_NAME), None)
        prefix = next((w for w in _SALT_PREFIXES if key.startswith(w) and len(key) - len(w) >= _MIN_NAME), None)
        if suffix is not None:
            key = key[: -len(suffix)]
        elif prefix is not None:
            key = key[len(prefix) :]
        else:
            return key


def name_key(name: str) -> str:
    """The normalised name that resolves: :func:`normalise_name` of the name without its salt words."""
    return strip_salt_words(name)


@dataclass(frozen=True, slots=True)
class Structure:
    """What a valid structure tells us: its key (InChIKey first block), full InChIKey and SMARTS family."""

    key: str
    inchikey: str | None
    family: Family | None


def _parent(mol: Any) -> Any:
    """Keep the parent compound: drop salts and solvents, then neutralise, so salt forms share a key."""
    parent = rdMolStandardize.LargestFragmentChooser().choose(mol)
    return rdMolStandardize.Uncharger().uncharge(parent)


def structure_from_smiles(smiles: str) -> Structure | str:
    """Structure for a SMILES, or an error message. Cached per input string: this is the hot path."""
    found = _BY_SPELLING.get(smiles)
    if found is None:
        found = _standardise(smiles)
        if len(_BY_SPELLING) >= _CACHE_SIZE:
            _BY_SPELLING.clear()
        _BY_SPELLING[smiles] = found
    return found


def remember_structures(found: Mapping[str, Structure | str]) -> None:
    """Add answers another process computed with :func:`structure_from_smiles` to this process's cache.

    Lets a pool standardise the distinct spellings of a file ahead of the reader (RDKit is the cold cost).
    """
    if len(_BY_SPELLING) + len(found) > _CACHE_SIZE:
        _BY_SPELLING.clear()
    _BY_SPELLING.update(found)


def _standardise(smiles: str) -> Structure | str:
    """RDKit's answer for one spelling.

    Spellings of one molecule (atom order, ring closures, Kekulé or aromatic) are many, molecules few
    (the simulated year: 2,278 spellings, 242 molecules). Parsing and writing RDKit's canonical SMILES
    costs ~0.2 ms; standardising and the InChI cost ~0.6 ms more, so those run once per molecule.
    """
    with BlockLogs():  # malformed SMILES from the field must not flood stderr
        mol = Chem.MolFromSmiles(smiles.strip()) if smiles.strip() else None
        if mol is None or mol.GetNumAtoms() == 0:
            return SMILES_ERROR
        try:
            canonical = Chem.MolToSmiles(mol)
        except Exception:  # any RDKit failure on field data is a bad structure, never a dead worker
            return STANDARDISE_ERROR
        return _structure_of_molecule(canonical, mol)


def _structure_of_molecule(canonical: str, mol: Any) -> Structure | str:
    """Key, InChIKey and family of a parsed molecule; cached by its canonical (isomeric) SMILES.

    The canonical SMILES carries everything the InChI reads from a molecule parsed from SMILES (atoms,
    charges, isotopes, hydrogens, bonds, stereo), so one canonical string is one answer.
    """
    found = _BY_CANONICAL.get(canonical)
    if found is not None:
        return found
    try:
        parent = _parent(mol)
        inchikey = Chem.MolToInchiKey(parent)
    except Exception:  # any RDKit failure on field data is a bad structure, never a dead worker
        return STANDARDISE_ERROR
    result: Structure | str = (
        Structure(key=inchikey[:14], inchikey=inchikey, family=classify(parent)) if inchikey else STANDARDISE_ERROR
    )
    if len(_BY_CANONICAL) >= _CACHE_SIZE:
        _BY_CANONICAL.clear()
    _BY_CANONICAL[canonical] = result
    return result


_BY_CANONICAL: dict[str, Structure | str] = {}
_BY_SPELLING: dict[str, Structure | str] = {}


@lru_cache(maxsize=_CACHE_SIZE)
def structure_from_inchikey(inchikey: str) -> Structure | str:
    """Structure for a reported InChIKey (full key or first block); family unknown without atoms."""
    text = inchikey.strip().upper()
    match = _INCHIKEY.match(text)
    if match is None:
        return INCHIKEY_ERROR
    return Structure(key=match.group(1), inchikey=text if len(text) > 14 else None, family=None)


@dataclass(frozen=True, slots=True)
class NormalisedQuantity:
    """A reported amount in canonical units; exactly one field is set (mass, volume or a count)."""

    grams: float | None = None
    millilitres: float | None = None
    units: float | None = None


# Counted items, compared after normalise_name ("Tablets", "comprimés"); never converted to a mass.
COUNT_UNITS: frozenset[str] = frozenset(
    {"unit", "units", "u", "tablet", "tablets", "tab", "tabs", "pill", "pills", "capsule", "capsules"}
) | {"blotter", "blotters", "stamp", "stamps", "piece", "pieces", "dose", "doses", "comprime", "comprimes"}


@cache
def _registry() -> pint.UnitRegistry:
    """One pint registry per process, built on first use (importing pint and building it cost ~0.3 s)."""
    import pint

    return pint.UnitRegistry()


#: Pint's factors for the units the wire contract allows (``QuantityUnit``), so a backtest or worker that
#: only meets those never imports pint (~0.3 s of start-up). tests/detect/test_identity.py checks them against pint.
WIRE_UNIT_FACTORS: dict[str, tuple[Literal["g", "ml"], float]] = {
    "g": ("g", 1.0),
    "kg": ("g", 1000.0),
    "mg": ("g", 0.001),
    "ml": ("ml", 1.0),
    "l": ("ml", 1000.0),
}


def _unit_factor(unit: str) -> tuple[Literal["g", "ml"], float]:
    """The factor from ``unit`` to grams or millilitres: the wire's units from a table, others from pint."""
    known = WIRE_UNIT_FACTORS.get(unit)
    return known if known is not None else _pint_factor(unit)


@lru_cache(maxsize=1024)
def _pint_factor(unit: str) -> tuple[Literal["g", "ml"], float]:
    """Pint's factor from ``unit`` to grams or millilitres, computed once per distinct unit string."""
    import pint

    registry = _registry()
    try:
        quantity = registry.Quantity(1.0, unit.strip())
    except (pint.errors.PintError, AttributeError, ValueError, TypeError) as error:
        raise ValueError(f"unknown unit {unit!r}") from error
    if quantity.check("[mass]"):
        return "g", float(quantity.to("gram").magnitude)
    if quantity.check("[volume]"):
        return "ml", float(quantity.to("millilitre").magnitude)
    raise ValueError(f"unit {unit!r} is neither a mass, a volume nor a count")


@lru_cache(maxsize=1024)
def _unit_kind(unit: str) -> tuple[Literal["units", "g", "ml"], float]:
    """What ``unit`` counts ("units": a count, kept as is) and its factor, once per distinct unit string."""
    if normalise_name(unit) in COUNT_UNITS:
        return "units", 1.0
    return _unit_factor(unit)


def _checked_amount(value: float) -> None:
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"quantity must be finite and non-negative, got {value!r}")


def normalise_quantity(value: float, unit: str) -> NormalisedQuantity:
    """Mass to grams and volume to millilitres via pint; tablets, blotters and the like stay counts."""
    _checked_amount(value)
    kind, factor = _unit_kind(unit)
    if kind == "units":
        return NormalisedQuantity(units=float(value))
    if kind == "g":
        return NormalisedQuantity(grams=value * factor)
    return NormalisedQuantity(millilitres=value * factor)


def grams_of(value: float, unit: str) -> float | None:
    """``normalise_quantity(value, unit).grams`` without building the quantity: all the detectors use of it,
    for every seizure the backtest reads (a frozen dataclass costs ~2 µs to make)."""
    _checked_amount(value)
    kind, factor = _unit_kind(unit)
    return value * factor if kind == "g" else None


@dataclass(frozen=True, slots=True)
class ResolvedSubstance:
    """The identity of the substance in one report; ``key`` is what detectors group and count by."""

    key: str
    display_name: str
    inchikey: str | None
    family: Family | None
    controlled: bool | None
    catalogued: bool
    resolved_by: ResolvedBy
    structure_error: str | None = None
    provisional: bool = False  # resolved through a learnt name not yet corroborated by enough reporters
    # The name key (``name:...``) this structure report's name had until now: earlier name-only reports of that
    # name were counted (and alerted) under it, and this report is the first to tie the name to a structure.
    formerly: str | None = None
    formerly_regions: tuple[str, ...] = ()  # the regions of those name-only reports (sorted)
    formerly_since: str | None = None  # the day (ISO date) of the first of those name-only reports


@dataclass(slots=True)
class UnresolvedName:
    """What the resolver keeps of a name resolved by itself (``name:...``): when and where it was reported."""

    first: datetime | None = None  # event time of its first and last name-only reports (None: not given)
    last: datetime | None = None
    regions: set[str] = field(default_factory=set)  # at most NAME_LINK_REGIONS, the first in code order

    def note(self, region: str | None, first: datetime | None, last: datetime | None) -> None:
        """One more name-only report (or, on a restart, a stored span of them)."""
        if first is not None and (self.first is None or first < self.first):
            self.first = first
        if last is not None and (self.last is None or last > self.last):
            self.last = last
        if region is not None and region not in self.regions:
            self.regions.add(region)
            if len(self.regions) > NAME_LINK_REGIONS:
                self.regions.remove(max(self.regions))


class SubstanceResolver:
    """Resolves reports to substances: structure first, then catalogue names, then learnt names.

    Deterministic for a given catalogue and sequence of reports. Not thread-safe (one per stream worker).
    """

    def __init__(
        self,
        catalogue: Iterable[CatalogueEntry] | None = None,
        corroboration: int = 1,
        name_horizon_days: int = NAME_LINK_HORIZON_DAYS,
    ) -> None:
        if corroboration < 1:
            raise ValueError(f"corroboration counts reporters: at least 1, got {corroboration}")
        entries = tuple(shipped_catalogue() if catalogue is None else catalogue)
        self.corroboration = corroboration
        self.name_horizon = timedelta(days=name_horizon_days)
        self._by_key: dict[str, tuple[CatalogueEntry, Structure]] = {}
        self._by_name: dict[str, ResolvedSubstance] = {}
        self._learnt: dict[str, str] = {}
        # Provisional learnt names -> the reporters that vouched for their structure (fewer than corroboration).
        self._vouched: dict[str, set[str]] = {}
        self._contested: dict[str, set[str]] = {}  # name -> the structure keys reported with it
        # Names resolved by the name itself (``name:...`` keys) and not learnt since: the structure report that
        # settles one of them says so (ResolvedSubstance.formerly), once. Bounded by event time: an entry whose
        # last report is older than twice the horizon before the latest report seen (``_watermark``) can never
        # link again and is dropped (see _prune); the link rule checks the same bound, so when the drop
        # happens changes nothing.
        self._unresolved: dict[str, UnresolvedName] = {}
        self._watermark: datetime | None = None
        # The reports that made a link ((reporter, event id, name, structure key) -> the name's last report time,
        # then the link): the same report resolved again makes it again. Event ids are unique per reporter only,
        # so another report under a reused id is judged on its own. Dropped with the name's horizon, as _unresolved.
        self._linked: dict[
            tuple[str | None, str, str, str], tuple[datetime | None, str, tuple[str, ...], str | None]
        ] = {}
        self._pruned_at: datetime | None = None
        # _pruned_at + a day, or None (never pruned, or that moment is past datetime.max): the next pruning is due then.
        self._prune_due: datetime | None = None
        self._key_family: dict[str, Family | None] = {}
        # One object per distinct answer (see _substance): its fields -> the object.
        self._answers: dict[tuple[Any, ...], ResolvedSubstance] = {}
        self.add_catalogue(entries)

    def add_catalogue(self, entries: Iterable[CatalogueEntry]) -> None:
        """Index catalogue entries, as the constructor does with its ``catalogue``.

        Why apart: standardising the shipped catalogue with RDKit costs ~0.1 s, which a worker spends while
        it waits for its consumer group join (made with ``catalogue=()``, indexed before it is ready) rather
        than before that join begins. Call it before the first :meth:`resolve`, as the constructor would.
        """
        for entry in entries:
            self._index(entry)

    def _index(self, entry: CatalogueEntry) -> None:
        """Index one entry by structure key and every alias; clashes are catalogue bugs, so fail loudly."""
        structure = structure_from_smiles(entry.smiles)
        if isinstance(structure, str):
            raise ValueError(f"catalogue entry {entry.name!r}: {structure}")
        if structure.key in self._by_key:
            raise ValueError(
                f"catalogue entries {entry.name!r} and {self._by_key[structure.key][0].name!r} "
                f"share structure key {structure.key}"
            )
        self._by_key[structure.key] = (entry, structure)
        by_name = ResolvedSubstance(
            key=structure.key,
            display_name=entry.name,
            inchikey=structure.inchikey,
            family=entry.family,
            controlled=entry.controlled,
            catalogued=True,
            resolved_by="catalogue_name",
        )
        for alias in {name_key(alias) for alias in (entry.name, *entry.synonyms)}:
            clash = self._by_name.get(alias)
            if clash is not None and clash.key != structure.key:
                raise ValueError(f"catalogue alias {alias!r} names {clash.display_name!r} and {entry.name!r}")
            if alias:
                self._by_name[alias] = by_name

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
        """Identity of one report: valid SMILES, else InChIKey, else catalogue name, learnt name, raw name.

        ``reporter`` (who vouches for the report) counts towards corroborating a name learnt from it; ``region``
        and ``occurred_at`` (where and when the report is from) are remembered for a name nobody can resolve yet,
        and bound which of those a structure report ties (see ``formerly``); ``event_id`` lets the report that
        made a link get the same link when it is resolved again (a batch the runtime threw away and re-reads). A
        report with a structure needs no name (the catalogue or the structure names it); when that
        structure is unreadable, the spelling itself stands in for the missing name.
        """
        name = name or ""
        error: str | None = None
        structure: Structure | None = None
        if smiles:
            found = structure_from_smiles(smiles)
            if isinstance(found, str):
                error = found
            else:
                structure = found
        if structure is None and inchikey:
            found = structure_from_inchikey(inchikey)
            if isinstance(found, str):
                error = found if error is None else f"{error}; {found}"
            else:
                structure = found
        if occurred_at is not None and (self._watermark is None or occurred_at > self._watermark):
            self._watermark = occurred_at
            self._prune()
        if structure is not None:
            return self._from_structure(structure, name, error, reporter, occurred_at, event_id)
        return self._from_name(name if name.strip() else (smiles or inchikey or ""), error, region, occurred_at)

    def _substance(
        self,
        key: str,
        display_name: str,
        inchikey: str | None,
        family: Family | None,
        controlled: bool | None,
        catalogued: bool,
        resolved_by: ResolvedBy,
        structure_error: str | None = None,
        provisional: bool = False,
        formerly: str | None = None,
        formerly_regions: tuple[str, ...] = (),
        formerly_since: str | None = None,
    ) -> ResolvedSubstance:
        """The :class:`ResolvedSubstance` with these fields: the same object each time they repeat.

        Why: a stream repeats few answers, and a frozen dataclass costs ~3 µs to build where a lookup by its
        fields costs ~0.3 µs; an equal object is the same answer (a value, never changed). The detectors
        also find an answer's alert subject by the object (``region.subject_of``). Bounded like the caches.
        """
        fields = (
            key,
            display_name,
            inchikey,
            family,
            controlled,
            catalogued,
            resolved_by,
            structure_error,
            provisional,
            formerly,
            formerly_regions,
            formerly_since,
        )
        answers = self._answers
        found = answers.get(fields)
        if found is None:
            if len(answers) >= _CACHE_SIZE:
                answers.clear()
            found = answers[fields] = ResolvedSubstance(*fields)
        return found

    def _from_structure(
        self,
        structure: Structure,
        name: str,
        error: str | None,
        reporter: str | None = None,
        occurred_at: datetime | None = None,
        event_id: str | None = None,
    ) -> ResolvedSubstance:
        """A structure decides identity; the catalogue only adds a display name and legal status."""
        key = structure.key
        formerly, formerly_regions, formerly_since = self._learn_from_report(name, key, reporter, occurred_at, event_id)
        catalogued = self._by_key.get(key)
        if catalogued is not None:
            entry, known = catalogued
            return self._substance(
                key=key,
                display_name=entry.name,
                inchikey=structure.inchikey or known.inchikey,
                family=structure.family or self.family_of(key),
                controlled=entry.controlled,
                catalogued=True,
                resolved_by="structure",
                structure_error=error,
                formerly=formerly,
                formerly_regions=formerly_regions,
                formerly_since=formerly_since,
            )
        if structure.family is not None or key not in self._key_family:
            self._key_family[key] = structure.family
        return self._substance(
            key=key,
            display_name=name.strip() or key,
            inchikey=structure.inchikey,
            family=structure.family or self._key_family.get(key),
            controlled=None,
            catalogued=False,
            resolved_by="structure",
            structure_error=error,
            formerly=formerly,
            formerly_regions=formerly_regions,
            formerly_since=formerly_since,
        )

    def _from_name(
        self, name: str, error: str | None, region: str | None = None, occurred_at: datetime | None = None
    ) -> ResolvedSubstance:
        """Name-only report: catalogue alias, else a learnt name, else a key made from the name itself."""
        normalised = name_key(name)
        by_name = self._by_name.get(normalised)
        if by_name is not None:
            return by_name if error is None else replace(by_name, structure_error=error)
        learnt = self._learnt.get(normalised)
        if learnt is not None:
            provisional = normalised in self._vouched
            catalogued = self._by_key.get(learnt)
            if catalogued is not None:
                entry, known = catalogued
                return self._substance(
                    key=learnt,
                    display_name=entry.name,
                    inchikey=known.inchikey,
                    family=self.family_of(learnt),
                    controlled=entry.controlled,
                    catalogued=True,
                    resolved_by="learnt_name",
                    structure_error=error,
                    provisional=provisional,
                )
            return self._substance(
                key=learnt,
                display_name=name.strip(),
                inchikey=None,
                family=self._key_family.get(learnt),
                controlled=None,
                catalogued=False,
                resolved_by="learnt_name",
                structure_error=error,
                provisional=provisional,
            )
        if normalised not in UNINFORMATIVE_NAMES:
            seen = self._unresolved.get(normalised)
            if seen is None:
                seen = self._unresolved[normalised] = UnresolvedName()
            seen.note(region, occurred_at, occurred_at)
        return self._substance(
            key=NAME_KEY_PREFIX + normalised,
            display_name=name.strip(),
            inchikey=None,
            family=None,
            controlled=None,
            catalogued=False,
            resolved_by="unresolved_name",
            structure_error=error,
        )

    def _learn_from_report(
        self,
        name: str,
        key: str,
        reporter: str | None = None,
        occurred_at: datetime | None = None,
        event_id: str | None = None,
    ) -> tuple[str | None, tuple[str, ...], str | None]:
        """Remember a name seen with a structure; a name's key never flips (see the module docstring).

        Returns the name key (``name:...``) the name had until now, the regions its name-only reports came from
        and the day of the first, when this report *settles* the binding (corroborated: a provisional or
        contested name never links) of a name resolved by itself whose last name-only report is within the
        horizon of this report's time: the detectors then tell the two apart from two substances. Else
        (None, (), None). The same report resolved again (same reporter, ``event_id``, name and structure) gets the
        same link.
        """
        normalised = name_key(name)
        if self._linked and event_id is not None:
            again = self._linked.get((reporter, event_id, normalised, key))
            if again is not None:
                return again[1:]
        learnt = self._learnt.get(normalised)
        if learnt is not None and normalised not in self._vouched:
            return None, (), None  # corroborated (or corroboration=1): settled, the hot path
        if normalised in self._by_name or normalised in UNINFORMATIVE_NAMES:
            return None, (), None
        if not self.vouch(normalised, key, reporter):
            return None, (), None
        seen = self._unresolved.pop(normalised, None)
        if seen is None or not self.links(seen.last, occurred_at):
            return None, (), None
        since = seen.first.date().isoformat() if seen.first is not None else None
        link = (NAME_KEY_PREFIX + normalised, tuple(sorted(seen.regions)), since)
        if event_id is not None:
            self._linked[(reporter, event_id, normalised, key)] = (seen.last, *link)
        return link

    def links(self, last: datetime | None, settled_at: datetime | None) -> bool:
        """Is a name last reported by name only at ``last`` tied to the structure report (at ``settled_at``) that
        settles it? Only within the horizon of that report, and of the latest report seen (so an entry
        :meth:`_prune` dropped could not have linked either). A time not given does not bound."""
        if last is None:
            return True
        if settled_at is not None and last < settled_at - self.name_horizon:
            return False
        return self._watermark is None or last >= self._watermark - 2 * self.name_horizon

    def _prune(self) -> None:
        """Drop unresolved names that can no longer link (see :meth:`links`), at most once a day of event time."""
        mark = self._watermark
        if mark is None:
            return
        # Asked whenever the watermark moves (most reports): one comparison with the moment due, where the
        # difference from _pruned_at and a new timedelta cost ~0.6 µs a report (~3 % of the backtest's reader).
        # The same test: fixed UTC offsets, so ``mark - pruned_at < 1 day`` iff ``mark < pruned_at + 1 day``.
        due = self._prune_due
        if due is not None and mark < due:
            return
        if due is None and self._pruned_at is not None:  # pruned within a day of datetime.max: no later day
            return
        self._pruned_at = mark
        try:
            self._prune_due = mark + _ONE_DAY
        except OverflowError:
            self._prune_due = None
        cut = mark - 2 * self.name_horizon
        stale = [n for n, seen in self._unresolved.items() if seen.last is not None and seen.last < cut]
        for normalised in stale:
            del self._unresolved[normalised]
        for made_by in [e for e, link in self._linked.items() if link[0] is not None and link[0] < cut]:
            del self._linked[made_by]

    def vouch(self, normalised: str, key: str, reporter: str | None) -> bool:
        """One reporter's evidence that the (normalised) name means structure ``key``; True when this evidence
        settles the binding (corroborated by enough reporters; at once with ``corroboration=1``)."""
        learnt = self._learnt.get(normalised)
        if learnt is None:
            contested = self._contested.get(normalised)
            if contested is not None:
                contested.add(key)
                return False
            self._learnt[normalised] = key
            if self.corroboration > 1:
                self._vouched[normalised] = {reporter} if reporter is not None else set()
                return False
            return True
        vouched = self._vouched.get(normalised)
        if vouched is None:
            return False  # corroborated: first corroborated binding wins
        if learnt == key:
            if reporter is not None:
                vouched.add(reporter)
                if len(vouched) >= self.corroboration:
                    del self._vouched[normalised]
                    return True
            return False
        # A provisional name reported with another structure: neither report decides it.
        del self._learnt[normalised], self._vouched[normalised]
        self._contested[normalised] = {learnt, key}
        return False

    def note_unresolved(
        self,
        key: str,
        region: str | None = None,
        first: datetime | None = None,
        last: datetime | None = None,
    ) -> None:
        """Replay stored name-only reports of a ``name:...`` key in a region (event times ``first``..``last``)
        after a restart, after the learnt names: a name still unlearnt is one whose settling structure report
        will say it had that key (``formerly``). The caller gives only spans within the horizon (see
        :meth:`unresolved_cut`), as :meth:`_prune` keeps live."""
        if key.startswith(NAME_KEY_PREFIX):
            normalised = key[len(NAME_KEY_PREFIX) :]
            settled = normalised in self._learnt and normalised not in self._vouched
            if normalised and not settled and normalised not in self._by_name:
                if normalised in UNINFORMATIVE_NAMES:
                    return
                self._unresolved.setdefault(normalised, UnresolvedName()).note(region, first, last)

    def note_time(self, moment: datetime) -> None:
        """Replay the latest event time stored after a restart: the bound of :meth:`links`, as live."""
        if self._watermark is None or moment > self._watermark:
            self._watermark = moment
            self._prune()

    def unresolved_cut(self, watermark: datetime) -> datetime:
        """The oldest last name-only report a restarted resolver must remember, the latest report being at
        ``watermark``: what :meth:`_prune` keeps live."""
        return watermark - 2 * self.name_horizon

    def unresolved_names(self) -> dict[str, set[str]]:
        """Names remembered as resolved by themselves -> their regions (a copy: tests and diagnostics)."""
        return {name: set(seen.regions) for name, seen in self._unresolved.items()}

    def settled_names(self) -> dict[str, str]:
        """Learnt names that are corroborated (not provisional) -> structure key."""
        return {name: key for name, key in self._learnt.items() if name not in self._vouched}

    def observe_name(self, name: str, key: str, reporter: str | None) -> None:
        """Replay stored evidence (a name reported with structure ``key`` by ``reporter``) after a restart."""
        if _STRUCTURE_KEY.fullmatch(key) is None:
            raise ValueError(f"learnt names map to structure keys (InChIKey first block), got {key!r}")
        normalised = name_key(name)
        if normalised in self._by_name or normalised in UNINFORMATIVE_NAMES:
            return
        self.vouch(normalised, key, reporter)

    def note_family(self, key: str, family: str) -> None:
        """Replay a stored structure's family after a restart: name-only reports of its learnt names carry it, as
        they did when the structure's reports had been resolved by this resolver."""
        if family in FAMILY_NAMES and key not in self._by_key and self._key_family.get(key) is None:
            self._key_family[key] = cast("Family", family)

    def contested_names(self) -> dict[str, set[str]]:
        """Names reported with different structures before corroboration -> those structure keys."""
        return {name: set(keys) for name, keys in self._contested.items()}

    def provisional_names(self) -> dict[str, str]:
        """Learnt names not yet corroborated -> their structure key."""
        return {name: self._learnt[name] for name in self._vouched}

    def learn(self, name: str, key: str, family: Family | None = None) -> bool:
        """Restore a persisted learnt name; False when the catalogue or an earlier learnt name owns it."""
        if _STRUCTURE_KEY.fullmatch(key) is None:
            raise ValueError(f"learnt names map to structure keys (InChIKey first block), got {key!r}")
        normalised = name_key(name)
        if normalised in self._learnt or normalised in self._by_name or normalised in UNINFORMATIVE_NAMES:
            return False
        self._learnt[normalised] = key
        if family is not None and key not in self._by_key:
            self._key_family[key] = family
        return True

    def learnt_names(self) -> dict[str, str]:
        """Learnt normalised name -> structure key: a copy to persist and replay through ``learn``."""
        return dict(self._learnt)

    def family_of(self, key: str) -> Family | None:
        """Best known family of a structure key: catalogue (SMARTS, else declared), else from reports."""
        catalogued = self._by_key.get(key)
        if catalogued is not None:
            return catalogued[1].family or catalogued[0].family
        return self._key_family.get(key)
