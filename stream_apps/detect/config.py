"""The detectors' configuration: pydantic models, in a module of their own.

Why apart: the detection core (spikes, region, novelty, replay, alerting) is compiled with mypyc when it is
built (see :mod:`synthwatch.stream_apps.detect.compiled`), and mypyc cannot compile a module that defines a
pydantic model (mypy 2.4's mypyc emits C referring to an undeclared ``CPyModule_pydantic___main``). The
classes are re-exported where they were defined before, so every import of them still works.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from synthwatch.settings import Settings


class SpikeConfig(BaseModel):
    """Detector thresholds; defaults tuned with ``synthwatch bench detection`` (see docs/detection.md)."""

    model_config = ConfigDict(frozen=True)

    windows: tuple[int, ...] = Field(default=(1, 2, 3, 4, 5, 7), description="Window lengths in days.")
    baseline_days: int = Field(default=56, description="History used for the rate, before the guard band.")
    guard_days: int = Field(default=1, description="Days before the longest window left out of the baseline.")
    min_history_days: int = Field(default=21, description="A series younger than this is not tested.")
    min_baseline_days: int = Field(default=14, description="Fewest baseline days needed.")
    alpha: float = Field(default=3e-3, description="Tail probability that counts as a spike (all windows).")
    baseline_cap_z: float | None = Field(
        default=3.0, description="Baseline days above rate + z·sqrt(rate) + 1 are capped (None: off)."
    )
    prior_events: float = Field(default=0.5, description="Reports added to a baseline (a rate is never zero).")
    min_count: int = Field(default=3, description="Fewest reports in the window for a count spike.")
    min_ratio: float = Field(default=2.0, description="Observed / expected at least this.")
    max_dispersion: float = Field(default=4.0, description="Cap on the overdispersion factor.")
    dispersion_prior_days: float = Field(default=50.0, description="Pseudo-days of Poisson variance in the dispersion.")
    cooldown_days: int = Field(default=4, description="Quiet days that end an episode.")
    renew_after_days: int = Field(default=7, description="Evidence starting this long after an alert is a new episode.")
    mass_min_history: int = Field(default=8, description="Seizures with a mass needed for the mass test.")
    mass_z: float = Field(default=1.0, description="Robust z (log-mass) from which a seizure counts as large.")
    mass_top: int = Field(default=5, description="Most large seizures of the window tested together.")
    mass_prior_weight: float = Field(
        default=50.0, description="Pseudo-seizures pulling the history's tail rate towards the normal tail."
    )
    mass_extreme_z: float | None = Field(
        default=None, description="Robust z that alone makes a mass spike (off: bulk consignments are routine)."
    )
    mass_repeat: int = Field(default=2, description="Fewest large seizures in the window for a mass spike.")
    mass_alpha: float = Field(default=1e-4, description="Binomial tail probability of the k largest (Bonferroni).")
    mass_window_days: int = Field(default=7)
    mass_memory: int = Field(default=60, description="Most recent seizure masses kept per series.")


class NoveltyConfig(BaseModel):
    model_config = ConfigDict(frozen=True)

    spread_regions: int = Field(default=3, ge=2, description="k: regions that make a spread.")
    spread_days: int = Field(default=14, ge=1, description="w: window of a spread, in days.")
    resent_days: int = Field(
        default=31,
        ge=1,
        le=62,
        description="Days before a region's newest sighting for which a sighting sent again is recognised.",
    )

    @classmethod
    def from_settings(cls, settings: Settings) -> NoveltyConfig:
        """The novelty stage's thresholds as configured (SYNTHWATCH_SPREAD_*); the rest keep their defaults."""
        return cls(spread_regions=settings.spread_regions, spread_days=settings.spread_days)


class DetectionConfig(BaseModel):
    model_config = ConfigDict(frozen=True)

    lateness_hours: float = Field(
        default=24.0,
        ge=0,
        description="A report that occurred more than this before the newest of its kind from its region is late: "
        "stored and flagged, it raises novelty alerts but is left out of the spike series (see docs/detection.md).",
    )
    spike: SpikeConfig = SpikeConfig()
    novelty: NoveltyConfig = NoveltyConfig()

    @classmethod
    def from_settings(cls, settings: Settings) -> DetectionConfig:
        """The detectors' configuration from the one settings object (here, not in settings.py: the floor does
        not import the detection layer). Spike thresholds keep their tuned defaults."""
        return cls(lateness_hours=settings.lateness_hours, novelty=NoveltyConfig.from_settings(settings))
