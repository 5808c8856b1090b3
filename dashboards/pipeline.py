"""Pipeline health from Prometheus: is the worker up, is data flowing, is anything piling up or failing.

Reads the metrics of ``synthwatch.stream_apps.runtime.metrics`` (scrape job ``synthwatch-worker``, see
``deploy/prometheus/prometheus.yml``) and the publisher's pushed metrics (job ``synthwatch_publish``).
"""

from __future__ import annotations

from grafana_foundation_sdk.builders import dashboard
from grafana_foundation_sdk.models import dashboard as dashboard_models

from synthwatch.dashboards.panels import (
    PROMETHEUS_INPUT,
    PromPanel,
    PromTarget,
    build_datasource_variable,
    build_prom_panel,
    layout,
)

UID = "synthwatch-pipeline"
TITLE = "synthwatch · Pipeline health"
WORKER_JOB = "synthwatch-worker"


def _quantiles(metric: str, by: str = "") -> tuple[PromTarget, ...]:
    group = f"le, {by}" if by else "le"
    suffix = f" {{{{{by}}}}}" if by else ""
    return tuple(
        PromTarget(
            f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket[$__rate_interval])))",
            f"p{round(q * 100)}{suffix}",
        )
        for q in (0.5, 0.95, 0.99)
    )


PANELS: tuple[PromPanel, ...] = (
    PromPanel(
        key="workers_up",
        title="Workers up / ready",
        kind="stat",
        description="Scraped worker processes (up) and those whose detector state is recovered (ready).",
        targets=(
            PromTarget(f'sum(up{{job="{WORKER_JOB}"}})', "up"),
            PromTarget(f'sum(synthwatch_worker_ready{{job="{WORKER_JOB}"}})', "ready"),
        ),
        width=6,
        height=6,
        metrics=("up", "synthwatch_worker_ready"),
    ),
    PromPanel(
        key="consumer_lag_total",
        title="Consumer lag (records)",
        kind="stat",
        description="Records not yet processed, all topics and partitions.",
        targets=(PromTarget("sum(synthwatch_consumer_lag)", "lag"),),
        width=6,
        height=6,
        metrics=("synthwatch_consumer_lag",),
    ),
    PromPanel(
        key="alerts_rate",
        title="Alerts published",
        kind="timeseries",
        description="Alerts per type and severity (per interval).",
        targets=(
            PromTarget(
                "sum by (alert_type, severity) (increase(synthwatch_alerts_total[$__rate_interval]))",
                "{{alert_type}} {{severity}}",
            ),
        ),
        width=12,
        height=6,
        metrics=("synthwatch_alerts_total",),
    ),
    PromPanel(
        key="events_in",
        title="Events in per topic",
        kind="timeseries",
        description="Records consumed per second, per Kafka topic.",
        targets=(PromTarget("sum by (topic) (rate(synthwatch_events_consumed_total[$__rate_interval]))", "{{topic}}"),),
        unit="ops",
        metrics=("synthwatch_events_consumed_total",),
    ),
    PromPanel(
        key="events_out",
        title="Events out per topic / stored per table",
        kind="timeseries",
        description=(
            "Records produced per second per topic (rejects, alerts, sightings), rows stored per table, and late "
            "reports among them (stored flagged late, left out of spike decisions already made)."
        ),
        targets=(
            PromTarget("sum by (topic) (rate(synthwatch_events_produced_total[$__rate_interval]))", "{{topic}}"),
            PromTarget("sum by (table) (rate(synthwatch_events_stored_total[$__rate_interval]))", "stored {{table}}"),
            PromTarget("sum by (kind) (rate(synthwatch_late_events_total[$__rate_interval]))", "late {{kind}}"),
        ),
        unit="ops",
        metrics=("synthwatch_events_produced_total", "synthwatch_events_stored_total", "synthwatch_late_events_total"),
    ),
    PromPanel(
        key="rejects",
        title="Rejects by reason",
        kind="timeseries",
        description="Refused records per second by stage and reason class (full reasons: ClickHouse `rejects`).",
        targets=(
            PromTarget(
                "sum by (stage, reason) (rate(synthwatch_rejects_total[$__rate_interval]))", "{{stage}} {{reason}}"
            ),
            PromTarget(
                "sum by (reason) (increase(synthwatch_publish_rejects_total[$__rate_interval]))",
                "publish {{reason}}",
            ),
        ),
        unit="ops",
        metrics=("synthwatch_rejects_total", "synthwatch_publish_rejects_total"),
    ),
    PromPanel(
        key="consumer_lag",
        title="Consumer lag per topic",
        kind="timeseries",
        description="Records between the log end and the committed offset; growing means workers fall behind.",
        targets=(PromTarget("sum by (topic) (synthwatch_consumer_lag)", "{{topic}}"),),
        metrics=("synthwatch_consumer_lag",),
    ),
    PromPanel(
        key="alert_latency",
        title="End-to-end latency: event ingested → alert published",
        kind="timeseries",
        targets=_quantiles("synthwatch_alert_latency_seconds"),
        unit="s",
        metrics=("synthwatch_alert_latency_seconds_bucket",),
    ),
    PromPanel(
        key="sink_latency",
        title="ClickHouse sink latency per table",
        kind="timeseries",
        targets=_quantiles("synthwatch_sink_batch_seconds", "table")[1:2],
        unit="s",
        metrics=("synthwatch_sink_batch_seconds_bucket",),
    ),
    PromPanel(
        key="commit_latency",
        title="Kafka offset commit latency (Faust)",
        kind="timeseries",
        description="Faust's own sensor: how long committing processed offsets takes (milliseconds).",
        targets=_quantiles("faust_consumer_commit_latency")[1:2],
        unit="ms",
        metrics=("faust_consumer_commit_latency_bucket",),
    ),
    PromPanel(
        key="sink_batch_rows",
        title="ClickHouse sink batch size per table",
        kind="timeseries",
        targets=(
            PromTarget(
                "sum by (table) (rate(synthwatch_sink_batch_rows_sum[$__rate_interval]))"
                " / sum by (table) (rate(synthwatch_sink_batch_rows_count[$__rate_interval]))",
                "mean {{table}}",
            ),
        ),
        metrics=("synthwatch_sink_batch_rows_sum", "synthwatch_sink_batch_rows_count"),
    ),
    PromPanel(
        key="sink_retries",
        title="ClickHouse sink retries",
        kind="timeseries",
        description="Failed ClickHouse calls being retried; while they fail the worker pauses consumption.",
        targets=(
            PromTarget(
                "sum by (operation) (increase(synthwatch_sink_retries_total[$__rate_interval]))", "{{operation}}"
            ),
            PromTarget("max by (operation) (synthwatch_sink_failing)", "failing {{operation}}"),
        ),
        metrics=("synthwatch_sink_retries_total", "synthwatch_sink_failing"),
    ),
    PromPanel(
        key="publisher",
        title="Publisher runs (synthwatch publish)",
        kind="timeseries",
        description="Records per outcome of the runs pushed to the Pushgateway.",
        targets=(PromTarget("sum by (outcome) (synthwatch_publish_records_total)", "{{outcome}}"),),
        metrics=("synthwatch_publish_records_total",),
    ),
)


def build() -> dashboard.Dashboard:
    """The pipeline-health dashboard (uid ``synthwatch-pipeline``)."""
    panels = [build_prom_panel(spec, number) for number, spec in enumerate(PANELS, start=1)]
    layout(panels)
    board = (
        dashboard.Dashboard(TITLE)
        .uid(UID)
        .description("Worker up, events in and out, rejects, consumer lag, latency and ClickHouse sink health.")
        .tags(["synthwatch", "operations"])
        .time("now-6h", "now")
        .timezone("utc")
        .refresh("30s")
        .tooltip(dashboard_models.DashboardCursorSync.CROSSHAIR)
    )
    board = board.with_variable(build_datasource_variable(PROMETHEUS_INPUT))
    for panel in panels:
        board = board.with_panel(panel)
    return board
