"""A realistic, labelled, deterministic stream of lab detections and border seizures.

Why: the detectors (never-seen substance, first appearance in a region, volume spike, spread) can only
be tuned and benchmarked on a stream whose answers are known. This package writes such a stream as
NDJSON in arrival order (late, duplicated and malformed lines included, as real feeds have them) and a
``Truth`` document that labels every injected incident with the ids of its events.

Everything is a pure function of :class:`SimulationConfig` and the catalogue: one ``random.Random``
and one seeded ``numpy`` generator per purpose, no wall clock, no set iteration, so the same config
gives byte-identical lines and truth.

The modules, in the order a run goes: :mod:`.models` (configuration, incidents, truth), :mod:`.substances`
(structures and names), :mod:`.plan` (rates, baseline, injected incidents), :mod:`.records` (each occurrence as
a wire record), :mod:`.assemble` (the stream in arrival order and its truth).
"""

from synthwatch.producers.simulate.assemble import simulate
from synthwatch.producers.simulate.models import (
    BULK_SHARE,
    LAB_SHARE,
    LAB_WEEKLY,
    MALFORMED_KINDS,
    SEIZURE_WEEKLY,
    Incident,
    IncidentType,
    MalformedKind,
    MalformedLine,
    Simulation,
    SimulationConfig,
    SpikeMetric,
    SpreadStep,
    Truth,
)

__all__ = [
    "BULK_SHARE",
    "LAB_SHARE",
    "LAB_WEEKLY",
    "MALFORMED_KINDS",
    "SEIZURE_WEEKLY",
    "Incident",
    "IncidentType",
    "MalformedKind",
    "MalformedLine",
    "Simulation",
    "SimulationConfig",
    "SpikeMetric",
    "SpreadStep",
    "Truth",
    "simulate",
]
