"""Prometheus metrics of ``synthwatch publish``, in their own CollectorRegistry.

The publisher is a short batch job with no port: it pushes what one run did to a Pushgateway or writes a
node-exporter textfile when it ends. Its own module (not the worker's runtime): producers never import the
worker. Metric names are part of the contract with ``deploy/prometheus/rules/`` (the SynthwatchPublishFailed rule)
and the pipeline-health dashboard; tests check that every name they use exists here.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, push_to_gateway, write_to_textfile

from synthwatch.schemas.reject_reasons import reject_reason

if TYPE_CHECKING:
    from synthwatch.producers.publisher import PublishSummary


class PublisherMetrics:
    """``synthwatch publish``: what one run did, pushed or written when it ends (a batch job has no port)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.records = Counter(
            "synthwatch_publish_records",
            "Input records by outcome: sent, rejected, duplicate, failed.",
            ["outcome"],
            registry=r,
        )
        self.events_produced = Counter(
            "synthwatch_publish_events_produced", "Events acknowledged by Kafka, per topic.", ["topic"], registry=r
        )
        self.rejects = Counter(
            "synthwatch_publish_rejects", "Records refused at the edge, per reason class.", ["reason"], registry=r
        )
        self.duration = Gauge("synthwatch_publish_duration_seconds", "Duration of the last run.", registry=r)
        self.last_success = Gauge(
            "synthwatch_publish_last_success_timestamp_seconds",
            "Unix time the last run ended with every record delivered.",
            registry=r,
        )
        self.last_run = Gauge(
            "synthwatch_publish_last_run_timestamp_seconds", "Unix time the last run ended.", registry=r
        )

    def observe(
        self, summary: PublishSummary, seconds: float, produced_per_topic: Mapping[str, int] | None = None
    ) -> None:
        """Record one finished run from its :class:`PublishSummary`."""
        for outcome, n in (
            ("sent", summary.sent),
            ("rejected", summary.rejected),
            ("duplicate", summary.duplicates),
            ("failed", len(summary.failed)),
        ):
            self.records.labels(outcome=outcome).inc(n)
        for reason, n in summary.reject_reasons.items():
            # the publisher keeps a reason's first part ("region", "invalid JSON"): classify it as a full one
            self.rejects.labels(reason=reject_reason(reason if ":" in reason else f"{reason}:")).inc(n)
        for topic, n in (produced_per_topic or {}).items():
            self.events_produced.labels(topic=topic).inc(n)
        now = time.time()
        self.duration.set(seconds)
        self.last_run.set(now)
        if not summary.failed:
            self.last_success.set(now)

    def push(self, gateway: str, job: str = "synthwatch_publish", instance: str | None = None) -> None:
        """Push to a Prometheus Pushgateway (``host:9091`` or a URL); replaces this job's last push."""
        grouping = {"instance": instance} if instance else None
        push_to_gateway(gateway, job=job, registry=self.registry, grouping_key=grouping)

    def write_textfile(self, path: Path) -> None:
        """Write for node-exporter's textfile collector (atomically, as it requires)."""
        write_to_textfile(str(path), self.registry)
