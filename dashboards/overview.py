"""Early-warning overview: what an analyst opens first (alerts, new substances, where reports come from).

Counts over time read the hourly aggregate (``reports_hourly``), rankings over the range read the daily
one (``reports_daily``, kept for ever), alerts read ``alerts``: thousands of rows per query, not the
millions of raw reports. The same panels are rendered by ``synthwatch report`` for people without Grafana.
A corrected report is retracted from the aggregates by a row of the opposite sign (migration 0012), so
distinct substances and regions are counted over keys whose reports sum above zero, never over raw rows:
a substance whose only report was corrected into another is not counted (whether a merge ran or not).
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
    in_place,
    num_col,
    text_col,
    time_col,
)

UID = "synthwatch-overview"
TITLE = "synthwatch · Early warning overview"
SUBSTANCE_LINK = "/d/synthwatch-substance/substance?var-substance=${__data.fields.substance_key}&${__url_time_range}"

#: Country, then region (its list follows the country selection); All by default.
VARIABLES: tuple[SqlVariable, ...] = (COUNTRY, REGION)

PANELS: tuple[SqlPanel, ...] = (
    SqlPanel(
        key="open_alerts",
        title="Open alerts by severity",
        kind="stat",
        description=(
            "Alerts raised in the selected time range, by severity. synthwatch has no acknowledgement step "
            "yet, so an alert counts as open for the range it was raised in."
        ),
        sql=in_place("""
SELECT
    countIf(severity = 'critical') AS critical,
    countIf(severity = 'warning') AS warning,
    countIf(severity = 'info') AS info
FROM alerts
WHERE alert_type != 'correction' AND $__timeFilter(triggered_at) AND {in_place}
"""),
        columns=(num_col("critical"), num_col("warning"), num_col("info")),
        width=8,
        height=5,
    ),
    SqlPanel(
        key="key_figures",
        title="Reports in range",
        kind="stat",
        description="Reports stored (lab detections and seizures), grams seized, distinct substances and regions.",
        sql=in_place("""
SELECT
    sum(n) AS reports,
    round(sum(g)) AS seized_grams,
    uniqExactIf(substance_key, n > 0) AS substances,
    uniqExactIf(region, n > 0) AS regions
FROM
(
    SELECT substance_key, region, sum(reports) AS n, sumIf(grams, kind = 'border_seizure') AS g
    FROM reports_daily
    WHERE $__dateFilter(day) AND {in_place}
    GROUP BY substance_key, region
)
"""),
        columns=(num_col("reports"), num_col("seized_grams"), num_col("substances"), num_col("regions")),
        width=16,
        height=5,
    ),
    SqlPanel(
        key="new_substances",
        title="New substances over time",
        kind="timeseries",
        description="Substances never seen before anywhere in the network, by family (new_substance alerts).",
        sql=in_place("""
SELECT
    $__timeInterval(triggered_at) AS time,
    if(family = '', 'unknown', toString(family)) AS family_name,
    count() AS new_substances
FROM alerts
WHERE alert_type = 'new_substance' AND $__timeFilter(triggered_at) AND {in_place}
GROUP BY time, family_name
ORDER BY time, family_name
"""),
        columns=(time_col(), text_col("family_name"), num_col("new_substances")),
        min_interval="1d",
        stacked=True,
    ),
    SqlPanel(
        key="reports_by_region",
        title="Reports per region over time",
        kind="timeseries",
        description="Lab detections and border seizures per region (hourly aggregate, summed to the panel interval).",
        sql=in_place("""
SELECT
    $__timeInterval(hour) AS time,
    toString(region) AS region_code,
    sum(reports) AS reports
FROM reports_hourly
WHERE $__timeFilter(hour) AND {in_place}
GROUP BY time, region_code
ORDER BY time, region_code
"""),
        columns=(time_col(), text_col("region_code"), num_col("reports")),
        min_interval="1h",
    ),
    SqlPanel(
        key="first_appearances",
        title="First appearances in a region",
        kind="table",
        description="A substance reported in a region for the first time (first_in_region alerts), newest first.",
        sql=in_place("""
SELECT
    triggered_at AS time,
    toString(severity) AS severity,
    toString(country) AS country,
    toString(region) AS region,
    substance_name AS substance,
    toString(family) AS family,
    substance_key
FROM alerts
WHERE alert_type = 'first_in_region' AND $__timeFilter(triggered_at) AND {in_place}
ORDER BY triggered_at DESC
LIMIT 200
"""),
        columns=(
            time_col(),
            text_col("severity"),
            text_col("country"),
            text_col("region"),
            text_col("substance"),
            text_col("family"),
            text_col("substance_key"),
        ),
        height=10,
        link=SUBSTANCE_LINK,
    ),
    SqlPanel(
        key="latest_alerts",
        title="Latest alerts",
        kind="table",
        description="Every alert type (new substance, first in region, spike, spread) and the notices that a report "
        "an alert rests on was corrected (type correction), newest first.",
        sql=in_place("""
SELECT
    triggered_at AS time,
    toString(alert_type) AS type,
    toString(severity) AS severity,
    toString(region) AS region,
    substance_name AS substance,
    summary,
    substance_key
FROM alerts
WHERE $__timeFilter(triggered_at) AND {in_place}
ORDER BY triggered_at DESC
LIMIT 100
"""),
        columns=(
            time_col(),
            text_col("type"),
            text_col("severity"),
            text_col("region"),
            text_col("substance"),
            text_col("summary"),
            text_col("substance_key"),
        ),
        height=10,
        link=SUBSTANCE_LINK,
    ),
    SqlPanel(
        key="top_substances",
        title="Top substances",
        kind="table",
        description="Most reported substances in the range, with the grams seized and how many regions reported them.",
        sql=in_place("""
SELECT
    any(name) AS substance,
    toString(any(family_name)) AS family,
    sum(n) AS reports,
    sum(labs) AS lab_detections,
    sum(seizures_n) AS seizures,
    round(sum(g)) AS seized_grams,
    uniqExactIf(region, n > 0) AS regions,
    substance_key
FROM
(
    SELECT
        substance_key,
        region,
        any(substance_name) AS name,
        any(family) AS family_name,
        sum(reports) AS n,
        sumIf(reports_daily.reports, kind = 'lab_detection') AS labs,
        sumIf(reports_daily.reports, kind = 'border_seizure') AS seizures_n,
        sum(grams) AS g
    FROM reports_daily
    WHERE $__dateFilter(day) AND {in_place}
    GROUP BY substance_key, region
)
GROUP BY substance_key
HAVING reports != 0
ORDER BY reports DESC
LIMIT 20
"""),
        columns=(
            text_col("substance"),
            text_col("family"),
            num_col("reports"),
            num_col("lab_detections"),
            num_col("seizures"),
            num_col("seized_grams"),
            num_col("regions"),
            text_col("substance_key"),
        ),
        width=14,
        height=10,
        link=SUBSTANCE_LINK,
    ),
    SqlPanel(
        key="top_families",
        title="Reports by family",
        kind="pie",
        description="Share of reports per substance family (SMARTS classification; unknown: unresolved names).",
        sql=in_place("""
SELECT
    if(family = '', 'unknown', toString(family)) AS family_name,
    sum(reports) AS reports
FROM reports_daily
WHERE $__dateFilter(day) AND {in_place}
GROUP BY family_name
ORDER BY reports DESC
"""),
        columns=(text_col("family_name"), num_col("reports")),
        width=10,
        height=10,
    ),
    SqlPanel(
        key="seized_by_region",
        title="Seized grams by region",
        kind="bars",
        description="Border seizures with a weight, summed per region (top 20).",
        sql=in_place("""
SELECT
    toString(region) AS region,
    round(sum(grams)) AS seized_grams
FROM reports_daily
WHERE kind = 'border_seizure' AND $__dateFilter(day) AND {in_place}
GROUP BY region
HAVING seized_grams > 0
ORDER BY seized_grams DESC
LIMIT 20
"""),
        columns=(text_col("region"), num_col("seized_grams")),
        unit="massg",
        height=10,
    ),
    SqlPanel(
        key="country_map",
        title="Reports by country",
        kind="geomap",
        description="Reports and grams seized per country, placed by ISO 3166-1 code.",
        sql=in_place("""
SELECT
    toString(country) AS country,
    sum(reports) AS reports,
    round(sumIf(grams, kind = 'border_seizure')) AS seized_grams
FROM reports_daily
WHERE $__dateFilter(day) AND {in_place}
GROUP BY country
ORDER BY reports DESC
"""),
        columns=(text_col("country"), num_col("reports"), num_col("seized_grams")),
        height=10,
    ),
    SqlPanel(
        key="report_delay_per_lab",
        title="Report delay per lab",
        kind="table",
        description=(
            "Per lab, how long after the sample its reports arrive (reported_at minus occurred_at, in hours), and "
            "how many were late: occurred more than the lateness (24 h by default) before the newest lab report "
            "already received from their region. Late reports are stored and count on their own day, but are left "
            "out of spike decisions already made. Reports without reported_at are left out of the delays."
        ),
        sql=in_place("""
SELECT
    toString(lab_id) AS lab,
    count() AS reports,
    round(quantileExactIf(0.5)(report_delay_seconds, reported_at IS NOT NULL) / 3600, 1) AS median_delay_h,
    round(quantileExactIf(0.95)(report_delay_seconds, reported_at IS NOT NULL) / 3600, 1) AS p95_delay_h,
    round(maxIf(report_delay_seconds, reported_at IS NOT NULL) / 3600, 1) AS max_delay_h,
    countIf(late) AS late_reports
FROM lab_detections
WHERE $__timeFilter(occurred_at) AND {in_place}
GROUP BY lab
HAVING countIf(reported_at IS NOT NULL) > 0
ORDER BY p95_delay_h DESC, lab
LIMIT 50
"""),
        columns=(
            text_col("lab"),
            num_col("reports"),
            num_col("median_delay_h"),
            num_col("p95_delay_h"),
            num_col("max_delay_h"),
            num_col("late_reports"),
        ),
        width=12,
        height=10,
    ),
    SqlPanel(
        key="regions",
        title="Regions",
        kind="table",
        description="Per region: reports, seizures, grams, distinct substances and alerts raised in the range.",
        sql=in_place("""
SELECT
    r.country AS country,
    r.region AS region,
    r.reports AS reports,
    r.lab_detections AS lab_detections,
    r.seizures AS seizures,
    r.seized_grams AS seized_grams,
    r.substances AS substances,
    ifNull(a.alerts, 0) AS alerts
FROM
(
    SELECT
        toString(country) AS country,
        toString(region) AS region,
        sum(n) AS reports,
        sum(labs) AS lab_detections,
        sum(seizures_n) AS seizures,
        round(sum(g)) AS seized_grams,
        uniqExactIf(substance_key, n > 0) AS substances
    FROM
    (
        SELECT
            country,
            region,
            substance_key,
            sum(reports) AS n,
            sumIf(reports_daily.reports, kind = 'lab_detection') AS labs,
            sumIf(reports_daily.reports, kind = 'border_seizure') AS seizures_n,
            sum(grams) AS g
        FROM reports_daily
        WHERE $__dateFilter(day) AND {in_place}
        GROUP BY country, region, substance_key
    )
    GROUP BY country, region
    HAVING reports != 0
) AS r
LEFT JOIN
(
    SELECT toString(region) AS region, count() AS alerts
    FROM alerts
    WHERE alert_type != 'correction' AND $__timeFilter(triggered_at) AND {in_place}
    GROUP BY region
) AS a ON a.region = r.region
ORDER BY alerts DESC, reports DESC
"""),
        columns=(
            text_col("country"),
            text_col("region"),
            num_col("reports"),
            num_col("lab_detections"),
            num_col("seizures"),
            num_col("seized_grams"),
            num_col("substances"),
            num_col("alerts"),
        ),
        width=24,
        height=12,
    ),
)


def build() -> dashboard.Dashboard:
    """The overview dashboard (uid ``synthwatch-overview``)."""
    board = (
        dashboard.Dashboard(TITLE)
        .uid(UID)
        .description("New substances, first appearances, spikes and spread, from synthwatch's ClickHouse.")
        .tags(["synthwatch", "early-warning"])
        .time("now-30d", "now")
        .timezone("utc")
        .refresh("5m")
        .tooltip(dashboard_models.DashboardCursorSync.CROSSHAIR)
        .link(
            dashboard.DashboardLink("Substance drill-down")
            .type(dashboard_models.DashboardLinkType.DASHBOARDS)
            .tags(["synthwatch"])
            .as_dropdown(False)
            .include_vars(False)
            .keep_time(True)
        )
    )
    return assemble_sql_dashboard(board, PANELS, VARIABLES)
