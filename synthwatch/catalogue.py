"""The shipped catalogue of known substances (classic drugs and NPS).

The catalogue names and classifies; it never suppresses an alert. It is a data file
(``synthwatch/data/substances.yaml``) so analysts can extend it without touching code.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

Family = Literal[
    "nitazene",
    "fentanyl",
    "other_opioid",
    "synthetic_cathinone",
    "synthetic_cannabinoid",
    "benzodiazepine",
    "arylcyclohexylamine",
    "tryptamine",
    "phenethylamine",
    "other",
]
"""Structural families. Opioid families (``nitazene``, ``fentanyl``, ``other_opioid``) are critical when new."""

OPIOID_FAMILIES: frozenset[str] = frozenset({"nitazene", "fentanyl", "other_opioid"})


class CatalogueEntry(BaseModel):
    """One known substance. ``smiles`` is the parent compound (free base, no salt)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    synonyms: tuple[str, ...] = ()
    smiles: str = Field(min_length=1)
    family: Family
    controlled: bool = Field(description="Under international control (UN 1961/1971 conventions).")
    nps: bool = Field(description="A new psychoactive substance rather than a classic drug or medicine.")
    cas: str | None = None


DEFAULT_CATALOGUE = "substances.yaml"

#: libyaml's parser where PyYAML has it (its wheels do), else PyYAML's own: the same safe constructor and resolver,
#: so the same entries (tests/floor/test_catalogue.py compares both on the shipped file), in ~4 ms instead of ~20 ms
#: of CPU at every start of the worker and of a backtest, before its first line.
_YAML_LOADER: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_catalogue(path: Path | None = None) -> tuple[CatalogueEntry, ...]:
    """Parse a catalogue file (default: the shipped one); errors name the entry that is wrong."""
    text = (
        path.read_text(encoding="utf-8")
        if path is not None
        else resources.files("synthwatch").joinpath("data", DEFAULT_CATALOGUE).read_text(encoding="utf-8")
    )
    document = yaml.load(text, Loader=_YAML_LOADER) or {}
    entries = []
    for index, item in enumerate(document.get("substances", [])):
        try:
            entries.append(CatalogueEntry.model_validate(item))
        except ValueError as error:
            name = item.get("name", "?") if isinstance(item, dict) else "?"
            raise ValueError(f"catalogue entry #{index} ({name}): {error}") from error
    return tuple(entries)


@lru_cache(maxsize=1)
def shipped_catalogue() -> tuple[CatalogueEntry, ...]:
    """The shipped catalogue, parsed once per process."""
    return load_catalogue()
