"""What a never-seen structure is close to: the chemist's first question about a new substance.

Pure and synchronous (RDKit only): the nearest known substances by structural similarity (Morgan
fingerprints, radius 2, 2,048 bits, compared by Tanimoto) over the catalogue and every structure the
network has learnt; a family *guess* for structures no SMARTS pattern matched, always marked as a guess;
and, for a name-only report nobody can resolve, the closest catalogue names by spelling.

Fingerprints are computed once per structure key and kept: a new-substance alert is rare (25-50 a year
in the EU), and comparing one fingerprint with a few thousand costs well under a millisecond.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass, replace
from functools import cache
from typing import Any

from rdkit import Chem, DataStructs
from rdkit.Chem import rdFingerprintGenerator
from rdkit.rdBase import BlockLogs

from synthwatch.catalogue import CatalogueEntry, Family, shipped_catalogue
from synthwatch.stream_apps.detect.identity import _parent, normalise_name, structure_from_smiles

RADIUS = 2
BITS = 2048
GUESS_MIN_SCORE = 0.45
"""Below this Tanimoto score the nearest neighbour says too little to guess a family from."""


@dataclass(frozen=True, slots=True)
class Neighbour:
    """A known substance close to the one asked about; ``score`` is the Tanimoto similarity (0-1)."""

    key: str
    name: str
    score: float
    family: Family | None
    controlled: bool | None
    catalogued: bool


@dataclass(frozen=True, slots=True)
class FamilyGuess:
    """A family inferred from the nearest neighbours, not from a SMARTS pattern: shown as a guess."""

    family: Family
    score: float
    nearest: str

    def describe(self) -> str:
        return f"{self.family} (a guess: nearest known {self.nearest}, similarity {self.score:.2f})"


@cache
def _generator() -> Any:
    return rdFingerprintGenerator.GetMorganGenerator(radius=RADIUS, fpSize=BITS)


def _needs_parent(mol: Any) -> bool:
    """Salts, solvents and charges need standardising; one neutral fragment is its own parent (most reports)."""
    return len(Chem.GetMolFrags(mol)) > 1 or any(atom.GetFormalCharge() for atom in mol.GetAtoms())


def fingerprint(smiles: str) -> Any | None:
    """Morgan fingerprint of the parent compound (salts and solvents dropped); None for a bad SMILES."""
    with BlockLogs():
        mol = Chem.MolFromSmiles(smiles.strip()) if smiles.strip() else None
        if mol is None or mol.GetNumAtoms() == 0:
            return None
        try:
            return _generator().GetFingerprint(_parent(mol) if _needs_parent(mol) else mol)
        except Exception:  # field data: a structure RDKit cannot handle has no neighbours, never a dead worker
            return None


@dataclass(frozen=True, slots=True)
class LearntStructure:
    """A structure the network learnt from a stored report: its key and, from its first stored report, the name,
    SMILES and family (SMARTS-derived, or None). Every text in it came from a report: hostile."""

    key: str
    name: str
    smiles: str
    family: Family | None


def _nearest(query: Any, found: list[Any], about: list[Neighbour], k: int, min_score: float) -> list[Neighbour]:
    """The ``k`` of ``about`` (each beside its fingerprint in ``found``) nearest ``query`` by Tanimoto, at least
    ``min_score``: best first, ties by name then key, each with its score rounded to 3 places."""
    if not found:
        return []
    scores = DataStructs.BulkTanimotoSimilarity(query, found)
    ranked = sorted(
        ((round(score, 3), n) for n, score in zip(about, scores, strict=True) if score >= min_score),
        key=lambda pair: (-pair[0], pair[1].name, pair[1].key),
    )
    return [replace(n, score=score) for score, n in ranked[:k]]


class SimilarityIndex:
    """Fingerprints of every known structure, by structure key; :meth:`nearest` ranks them for a query.

    Not thread-safe (one per stream worker, like the resolver).
    """

    def __init__(self, catalogue: Iterable[CatalogueEntry] | None = None) -> None:
        self._keys: list[str] = []
        self._fingerprints: list[Any] = []
        self._about: dict[str, Neighbour] = {}  # key -> name, family, status (score unused)
        self._position: dict[str, int] = {}  # key -> its place in _keys / _fingerprints
        self._query_cache: dict[str, Any] = {}  # key -> fingerprint of a structure ranked, not indexed
        entries = tuple(shipped_catalogue() if catalogue is None else catalogue)
        self._names = [name for entry in entries for name in (entry.name, *entry.synonyms)]
        self._display = {
            normalise_name(name): entry.name for entry in entries for name in (entry.name, *entry.synonyms)
        }
        for entry in entries:
            structure = structure_from_smiles(entry.smiles)
            if isinstance(structure, str):
                raise ValueError(f"catalogue entry {entry.name!r}: {structure}")
            self.add(structure.key, entry.smiles, entry.name, entry.family, entry.controlled, catalogued=True)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._about

    def add(
        self,
        key: str,
        smiles: str,
        name: str,
        family: Family | None,
        controlled: bool | None = None,
        *,
        catalogued: bool = False,
    ) -> bool:
        """Index a structure once (the first time its key is seen); False if known already or unparseable."""
        if key in self._about:
            return False
        found = fingerprint(smiles)
        if found is None:
            return False
        self._append(key, found, Neighbour(key, name, 1.0, family, controlled, catalogued))
        return True

    def nearest(self, smiles: str, k: int = 5, *, min_score: float = 0.2) -> list[Neighbour]:
        """The ``k`` most similar known structures (best first, ties by name), the query's own key left out."""
        query = fingerprint(smiles)
        if query is None:
            return []
        own = structure_from_smiles(smiles)
        return self._rank(query, None if isinstance(own, str) else own.key, k, min_score)

    def learn_and_rank(
        self,
        key: str,
        smiles: str,
        name: str,
        family: Family | None,
        controlled: bool | None = None,
        k: int = 5,
        *,
        min_score: float = 0.2,
    ) -> list[Neighbour]:
        """The neighbours of a structure the network meets, which then joins the index (one fingerprint each).

        A structure indexed already (the catalogue's, or one learnt earlier) reuses its fingerprint.
        """
        at = self._position.get(key)
        found = self._fingerprints[at] if at is not None else fingerprint(smiles)
        if found is None:
            return []
        ranked = self._rank(found, key, k, min_score)
        if at is None:
            self._append(key, found, Neighbour(key, name, 1.0, family, controlled, False))
        return ranked

    def rank_only(self, key: str, smiles: str, k: int = 5, *, min_score: float = 0.2) -> list[Neighbour]:
        """The neighbours of a structure among what the index holds, without adding it to the index.

        Why not learn it: a new-substance alert must be the same whether or not a worker crashed and
        replayed (tests/detect/test_replay.py). What a worker has learnt depends on which sightings it met
        since it started, and a replay starts it again, so this part ranks against the catalogue alone; the
        structures the network learnt are a separate part, read from the store up to a cut
        (:meth:`rank_learnt`), and ``synthwatch substance`` compares with every stored report.
        A structure's fingerprint is still computed once (kept by key, apart from the ranked index).
        """
        found = self._query_fingerprint(key, smiles)
        if found is None:
            return []
        return self._rank(found, key, k, min_score)

    def rank_learnt(
        self,
        key: str,
        smiles: str,
        learnt: Iterable[LearntStructure],
        k: int = 5,
        *,
        min_score: float = 0.2,
    ) -> list[Neighbour]:
        """The ``k`` structures of ``learnt`` nearest to this one (best first, ties by name, then key).

        Why given, not held: what is "learnt" for an alert is fixed by a stored cut the caller read (see
        :class:`synthwatch.schemas.records.LearntNeighbours`), never by what this index met. Catalogue
        structures and the query's own key are left out (the catalogue part is :meth:`rank_only`'s). Each
        fingerprint is computed once per key and kept, so the next alert compares without parsing again.
        """
        query = self._query_fingerprint(key, smiles)
        if query is None:
            return []
        found, about = [], []
        for structure in learnt:
            if structure.key == key or structure.key in self._about:
                continue
            fp = self._query_fingerprint(structure.key, structure.smiles)
            if fp is not None:
                found.append(fp)
                about.append(Neighbour(structure.key, structure.name, 0.0, structure.family, None, False))
        return _nearest(query, found, about, k, min_score)

    def _query_fingerprint(self, key: str, smiles: str) -> Any | None:
        """The fingerprint of ``key``: the index's, else computed from ``smiles`` once and kept by key."""
        at = self._position.get(key)
        if at is not None:
            return self._fingerprints[at]
        if key not in self._query_cache:
            self._query_cache[key] = fingerprint(smiles) if smiles else None
        return self._query_cache[key]

    def _append(self, key: str, found: Any, about: Neighbour) -> None:
        self._position[key] = len(self._keys)
        self._keys.append(key)
        self._fingerprints.append(found)
        self._about[key] = about

    def _rank(self, query: Any, own_key: str | None, k: int, min_score: float) -> list[Neighbour]:
        kept = [n for n, key in enumerate(self._keys) if key != own_key]
        return _nearest(
            query, [self._fingerprints[n] for n in kept], [self._about[self._keys[n]] for n in kept], k, min_score
        )

    def did_you_mean(self, name: str, n: int = 3) -> list[str]:
        """Catalogue substances whose name or synonym is spelt like ``name``, by their catalogue name, once each."""
        found: list[str] = []
        for spelt in closest_names(name, self._names, n=2 * n):
            display = self._display[normalise_name(spelt)]
            if display not in found:
                found.append(display)
        return found[:n]


def guess_family(neighbours: Iterable[Neighbour], min_score: float = GUESS_MIN_SCORE) -> FamilyGuess | None:
    """The family of the nearest neighbour that has one, if it is close enough to say something."""
    for neighbour in neighbours:
        if neighbour.family is not None and neighbour.family != "other":
            if neighbour.score < min_score:
                return None
            return FamilyGuess(neighbour.family, neighbour.score, neighbour.name)
    return None


def closest_names(name: str, names: Iterable[str], n: int = 3, cutoff: float = 0.6) -> list[str]:
    """Known names spelt most like ``name`` ("did you mean"), compared with case, accents and dashes folded.

    Names that start with what was typed come first (shortest first: "Eto" → Etonitazene ...), then
    the closest spellings by :func:`difflib.get_close_matches` (a typo: "isotonitazen" → Isotonitazene).
    """
    by_folded: dict[str, str] = {}
    for known in names:
        by_folded.setdefault(normalise_name(known), known)
    folded = normalise_name(name)
    if not folded:
        return []
    found = sorted((f for f in by_folded if len(folded) >= 3 and f.startswith(folded) and f != folded), key=len)
    found += [f for f in difflib.get_close_matches(folded, list(by_folded), n=n, cutoff=cutoff) if f not in found]
    return [by_folded[f] for f in found[:n]]
