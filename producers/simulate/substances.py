"""Structures and names: RDKit work done once per structure, the spellings labs and customs use, and the
catalogue as the simulator's pool of substances."""

from __future__ import annotations

import bisect
import itertools
import random
import unicodedata
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from rdkit import Chem
from rdkit.rdBase import BlockLogs

from synthwatch.catalogue import CatalogueEntry
from synthwatch.producers.simulate_templates import (
    NOVEL_CORES,
)


@dataclass(frozen=True)
class _Forms:
    """RDKit work for one structure, done once: the spellings a lab may use, and its InChIKey."""

    canonical: str
    variants: tuple[str, ...]
    inchikey: str | None
    heavy_atoms: int


@lru_cache(maxsize=4096)
def _structure_forms(smiles: str) -> _Forms:
    with BlockLogs():
        mol = Chem.MolFromSmiles(smiles)
        if mol is None:
            return _Forms(smiles, (smiles,), None, 0)
        variants = tuple(Chem.MolToRandomSmilesVect(mol, 8, randomSeed=zlib.crc32(smiles.encode()) & 0x7FFFFFFF))
        inchikey = Chem.MolToInchiKey(mol) or None
        return _Forms(Chem.MolToSmiles(mol), variants, inchikey, mol.GetNumHeavyAtoms())


@lru_cache(maxsize=1024)
def _has_core(smiles: str, family: str) -> bool:
    """Whether a generated structure kept its family's scaffold (see ``NOVEL_CORES``)."""
    with BlockLogs():
        mol = Chem.MolFromSmiles(smiles)
        core = Chem.MolFromSmarts(NOVEL_CORES[family])
        return mol is not None and core is not None and mol.HasSubstructMatch(core)


def _normalise_name(name: str) -> str:
    """Case, accents and punctuation folded (as the stream's resolver does): "3-MMC" == " 3 mmc "."""
    decomposed = unicodedata.normalize("NFKD", name.casefold())
    return "".join(ch for ch in decomposed if ch.isalnum() and not unicodedata.combining(ch))


@dataclass(frozen=True)
class _Substance:
    name: str
    family: str
    nps: bool
    smiles: str
    cas: str | None
    novel: bool
    lab_names: tuple[tuple[str, ...], tuple[float, ...]]
    seizure_names: tuple[tuple[str, ...], tuple[float, ...]]


def _weighted(pairs: Sequence[tuple[str, float]]) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """Merge duplicate values and return (values, cumulative weights) for bisect sampling."""
    merged: dict[str, float] = {}
    for value, weight in pairs:
        merged[value] = merged.get(value, 0.0) + weight
    return tuple(merged), tuple(itertools.accumulate(merged.values()))


def _spellings(name: str) -> list[tuple[str, float]]:
    """How customs officers type a name: case, spacing and hyphen variants."""
    return [
        (name, 4.0),
        (name.lower(), 2.0),
        (name.upper(), 1.0),
        (name.replace("-", " "), 1.0),
        (name.replace("-", ""), 1.0),
        (f" {name.lower()}  ", 0.3),
        (name.replace("-", "  "), 0.2),
    ]


def _catalogue_substances(catalogue: Sequence[CatalogueEntry]) -> list[_Substance]:
    owners: dict[str, set[int]] = {}
    for index, entry in enumerate(catalogue):
        for text in (entry.name, *entry.synonyms):
            owners.setdefault(_normalise_name(text), set()).add(index)

    def unambiguous(index: int, pairs: list[tuple[str, float]]) -> list[tuple[str, float]]:
        kept = [(text, w) for text, w in pairs if text.strip() and owners.get(_normalise_name(text)) == {index}]
        return kept

    substances = []
    for index, entry in enumerate(catalogue):
        synonyms = list(entry.synonyms)
        lab = [(entry.name, 0.85)] + [(s, 0.15 / len(synonyms)) for s in synonyms]
        seizure = _spellings(entry.name)
        for synonym in synonyms:
            seizure += [(s, w * 0.6 / len(synonyms)) for s, w in _spellings(synonym)[:3]]
        lab = unambiguous(index, lab) or [(entry.name, 1.0)]
        seizure = unambiguous(index, seizure) or [(entry.name, 1.0)]
        substances.append(
            _Substance(
                name=entry.name,
                family=entry.family,
                nps=entry.nps,
                smiles=entry.smiles,
                cas=entry.cas,
                novel=False,
                lab_names=_weighted(lab),
                seizure_names=_weighted(seizure),
            )
        )
    return substances


def _pick(rnd: random.Random, table: tuple[tuple[str, ...], tuple[float, ...]]) -> str:
    values, cumulative = table
    return values[bisect.bisect_right(cumulative, rnd.random() * cumulative[-1])]
