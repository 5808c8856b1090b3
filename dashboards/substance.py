"""Substance drill-down (uid ``synthwatch-substance``): one substance, where and how it was reported.

Alert e-mails and the overview's tables link here with ``?var-substance=<substance_key>``. Country and
region narrow the panels (multi-select, All by default); family narrows the substance list.
"""

from __future__ import annotations

from grafana_foundation_sdk.builders import dashboard
from grafana_foundation_sdk.models import dashboard as dashboard_models

from synthwatch.dashboards.panels import (
    COUNTRY,
    REGION,
    SqlPanel,
    SqlVariable,
    assemble_sql_dashboard,
    num_col,
    sql_text,
    sql_texts,
    text_col,
    time_col,
)

UID = "synthwatch-substance"
TITLE = "synthwatch · Substance drill-down"

VARIABLES: tuple[SqlVariable, ...] = (
    SqlVariable(
        name="family",
        label="Family",
        description="Narrows the substance list.",
        sql="""
SELECT DISTINCT toString(family) AS family
FROM substance_first_seen
WHERE family != ''
ORDER BY family
""",
        columns=(text_col("family"),),
    ),
    SqlVariable(
        name="substance",
        label="Substance",
        description="Value: the substance key (InChIKey first block or name:<normalised>); text: its name.",
        sql=f"""
SELECT substance_key, any(substance_name) AS name
FROM substance_first_seen
WHERE $__conditionalAll(family IN {sql_texts("family")}, $family)
GROUP BY substance_key
ORDER BY name
""",
        columns=(text_col("substance_key"), text_col("name")),
        multi=False,
        include_all=False,
    ),
    COUNTRY,
    REGION,
)

#: The WHERE clause every panel shares: this substance, in the selected countries and regions.
WHERE = f"""substance_key = {sql_text("substance")}
  AND $__conditionalAll(country IN {sql_texts("country")}, $country)
  AND $__conditionalAll(region IN {sql_texts("region")}, $region)"""

PANELS: tuple[SqlPanel, ...] = (
    SqlPanel(
        key="profile",
        title="Substance profile",
        kind="table",
        description="All time, in the selected countries and regions: first and last report, totals, spread.",
        sql=f"""
SELECT
    any(substance_name) AS substance,
    toString(any(family)) AS family,
    min(first_seen) AS first_seen,
    max(last_seen) AS last_seen,
    sum(reports) AS reports,
    uniqExact(country) AS countries,
    uniqExact(region) AS regions
FROM substance_region_first_seen
WHERE {WHERE}
""",
        columns=(
            text_col("substance"),
            text_col("family"),
            time_col("first_seen"),
            time_col("last_seen"),
            num_col("reports"),
            num_col("countries"),
            num_col("regions"),
        ),
        width=24,
        height=4,
    ),
    SqlPanel(
        key="reports_over_time",
        title="Reports over time by region",
        kind="timeseries",
        sql=f"""
SELECT
    $__timeInterval(hour) AS time,
    toString(region) AS region_code,
    sum(reports) AS reports
FROM reports_hourly
WHERE {WHERE} AND $__timeFilter(hour)
GROUP BY time, region_code
ORDER BY time, region_code
""",
        columns=(time_col(), text_col("region_code"), num_col("reports")),
        min_interval="1h",
        stacked=True,
    ),
    SqlPanel(
        key="grams_over_time",
        title="Grams seized over time by region",
        kind="timeseries",
        sql=f"""
SELECT
    $__timeInterval(hour) AS time,
    toString(region) AS region_code,
    round(sum(grams), 1) AS grams
FROM reports_hourly
WHERE kind = 'border_seizure' AND {WHERE} AND $__timeFilter(hour)
GROUP BY time, region_code
ORDER BY time, region_code
""",
        columns=(time_col(), text_col("region_code"), num_col("grams")),
        unit="massg",
        min_interval="1h",
        stacked=True,
    ),
    SqlPanel(
        key="regions_seen",
        title="Where it has been seen",
        kind="table",
        description="First and last report per region (all time), in order of first appearance.",
        sql=f"""
SELECT
    toString(country) AS country,
    toString(region) AS region,
    min(first_seen) AS first_seen,
    max(last_seen) AS last_seen,
    sum(reports) AS reports
FROM substance_region_first_seen
WHERE {WHERE}
GROUP BY country, region
ORDER BY first_seen
""",
        columns=(
            text_col("country"),
            text_col("region"),
            time_col("first_seen"),
            time_col("last_seen"),
            num_col("reports"),
        ),
        height=10,
    ),
    SqlPanel(
        key="alerts",
        title="Alerts for this substance",
        kind="table",
        sql=f"""
SELECT
    triggered_at AS time,
    toString(alert_type) AS type,
    toString(severity) AS severity,
    toString(region) AS region,
    summary
FROM alerts
WHERE {WHERE} AND $__timeFilter(triggered_at)
ORDER BY triggered_at DESC
LIMIT 200
""",
        columns=(time_col(), text_col("type"), text_col("severity"), text_col("region"), text_col("summary")),
        height=10,
    ),
    SqlPanel(
        key="methods",
        title="Lab identification methods",
        kind="pie",
        description="How laboratories identified it (confirmed and presumptive).",
        sql=f"""
SELECT
    toString(method) AS method,
    count() AS detections
FROM lab_detections
WHERE {WHERE} AND $__timeFilter(occurred_at)
GROUP BY method
ORDER BY detections DESC
""",
        columns=(text_col("method"), num_col("detections")),
        width=8,
        height=10,
    ),
    SqlPanel(
        key="seizures",
        title="Border seizures",
        kind="table",
        description="Most recent seizures: where, how it travelled, how much, from where.",
        sql=f"""
SELECT
    occurred_at AS time,
    toString(region) AS region,
    border_point,
    toString(conveyance) AS conveyance,
    round(ifNull(grams, 0), 1) AS grams,
    toString(origin_country) AS origin
FROM border_seizures
WHERE {WHERE} AND $__timeFilter(occurred_at)
ORDER BY occurred_at DESC
LIMIT 200
""",
        columns=(
            time_col(),
            text_col("region"),
            text_col("border_point"),
            text_col("conveyance"),
            num_col("grams"),
            text_col("origin"),
        ),
        width=16,
        height=10,
    ),
)


def build() -> dashboard.Dashboard:
    """The drill-down dashboard with its country, region, family and substance variables."""
    board = (
        dashboard.Dashboard(TITLE)
        .uid(UID)
        .description("One substance: reports, seizures, alerts and regions, filtered by country and region.")
        .tags(["synthwatch", "early-warning"])
        .time("now-90d", "now")
        .timezone("utc")
        .tooltip(dashboard_models.DashboardCursorSync.CROSSHAIR)
        .link(
            dashboard.DashboardLink("Early warning overview")
            .type(dashboard_models.DashboardLinkType.LINK)
            .url("/d/synthwatch-overview/overview")
            .keep_time(True)
        )
    )
    return assemble_sql_dashboard(board, PANELS, VARIABLES)


def substance_url(
    grafana_url: str,
    substance_key: str,
    *,
    region: str | None = None,
    country: str | None = None,
    from_ms: int | None = None,
    to_ms: int | None = None,
) -> str:
    """A link into this dashboard for one substance (alert messages use it)."""
    from urllib.parse import urlencode

    query: list[tuple[str, str]] = [("var-substance", substance_key)]
    if country:
        query.append(("var-country", country))
    if region:
        query.append(("var-region", region))
    if from_ms is not None and to_ms is not None:
        query += [("from", str(from_ms)), ("to", str(to_ms))]
    return f"{grafana_url.rstrip('/')}/d/{UID}/substance?{urlencode(query)}"
