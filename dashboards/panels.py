"""Panels as data: what each panel asks (SQL or PromQL) and what shape of answer it expects.

Why: one description of a panel serves three readers: the Grafana JSON generator (SDK builders), the
HTML report (plotly), and the tests (run the SQL, check the columns). A panel's SQL therefore lives in
exactly one place, and a column renamed in SQL but not in the panel fails a test instead of a chart.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any, Literal

from grafana_foundation_sdk.builders import barchart, dashboard, geomap, piechart, stat, table, timeseries
from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import prometheus as prometheus_builders
from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as dashboard_models
from grafana_foundation_sdk.models.geomap import TooltipMode
from grafana_foundation_sdk.models.piechart import PieChartType

from synthwatch.dashboards.clickhouse_query import PLUGIN_ID, DataqueryBuilder, QueryType

#: Datasource uids of our own provisioning (deploy/grafana/provisioning/datasources/). The dashboards do not
#: name them: an existing Grafana has its own uids, and a hard-coded one broke every panel on import.
CLICKHOUSE_UID = "synthwatch-clickhouse"
PROMETHEUS_UID = "synthwatch-prometheus"


@dataclass(frozen=True, slots=True)
class DatasourceInput:
    """A datasource a dashboard needs: chosen through a template variable, asked for on import.

    Panels and targets refer to ``${variable}``; the variable's default is ``${input}``, which Grafana's
    import dialog replaces (``__inputs``) with the datasource the user picks. Provisioned as a file, the
    placeholder matches nothing and Grafana selects the first datasource of the plugin's type.
    """

    variable: str
    input: str
    plugin_id: str
    plugin_name: str
    label: str

    @property
    def ref(self) -> dashboard_models.DataSourceRef:
        return dashboard_models.DataSourceRef(type_val=self.plugin_id, uid=f"${{{self.variable}}}")

    def inputs_entry(self) -> dict[str, str]:
        """This datasource in the dashboard's ``__inputs`` (what the import dialog asks for)."""
        return {
            "name": self.input,
            "label": self.label,
            "description": f"The {self.plugin_name} datasource holding synthwatch's data",
            "type": "datasource",
            "pluginId": self.plugin_id,
            "pluginName": self.plugin_name,
        }


CLICKHOUSE_INPUT = DatasourceInput("datasource", "DS_CLICKHOUSE", PLUGIN_ID, "ClickHouse", "ClickHouse")
PROMETHEUS_INPUT = DatasourceInput("prometheus", "DS_PROMETHEUS", "prometheus", "Prometheus", "Prometheus")
CLICKHOUSE = CLICKHOUSE_INPUT.ref
PROMETHEUS = PROMETHEUS_INPUT.ref


def build_datasource_variable(source: DatasourceInput) -> cogbuilder.Builder[dashboard_models.VariableModel]:
    """The template variable that picks ``source``'s datasource (defaulting to the one chosen on import)."""
    placeholder = f"${{{source.input}}}"
    return (
        dashboard.DatasourceVariable(source.variable)
        .label(source.label)
        .type(source.plugin_id)
        .current(dashboard_models.VariableOption(selected=True, text=placeholder, value=placeholder))
        .multi(False)
        .include_all(False)
    )


ColumnType = Literal["time", "text", "number"]
PanelKind = Literal["stat", "timeseries", "bars", "table", "pie", "geomap"]


@dataclass(frozen=True, slots=True)
class Column:
    """One result column a panel reads: its name and what kind of value it must hold."""

    name: str
    type: ColumnType


def time_col(name: str = "time") -> Column:
    return Column(name, "time")


def text_col(name: str) -> Column:
    return Column(name, "text")


def num_col(name: str) -> Column:
    return Column(name, "number")


def _matches(value: Any, kind: ColumnType) -> bool:
    if kind == "time":
        return isinstance(value, datetime)
    if kind == "text":
        return isinstance(value, str)
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True, slots=True)
class SqlPanel:
    """A panel over ClickHouse: SQL with the plugin's macros, and the columns it must return.

    Shapes by kind: ``timeseries`` is long format (``time``, label columns, value columns; sorted by
    time), which the plugin turns wide; ``stat`` is one row of numbers; ``bars``/``pie`` are a category
    then numbers; ``table`` is any columns; ``geomap`` has a ``country`` (ISO 3166-1 alpha-2) column.
    """

    key: str
    title: str
    kind: PanelKind
    sql: str
    columns: tuple[Column, ...]
    description: str = ""
    unit: str = "short"
    width: int = 12
    height: int = 8
    min_interval: str | None = None
    stacked: bool = False
    link: str | None = None  # data link for every cell (Grafana URL template, e.g. ${__data.fields.x})

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    def shape_errors(self, names: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
        """Why this result cannot feed the panel; empty when it can."""
        problems: list[str] = []
        if tuple(names) != self.column_names:
            return [f"columns {list(names)} != expected {list(self.column_names)}"]
        for number, row in enumerate(rows):
            for column, value in zip(self.columns, row, strict=True):
                if not _matches(value, column.type):
                    problems.append(f"row {number} column {column.name}: {value!r} is not a {column.type}")
            if len(problems) > 5:
                break
        if self.kind == "stat" and len(rows) != 1:
            problems.append(f"a stat panel needs exactly one row, got {len(rows)}")
        if self.kind == "timeseries":
            if self.columns[0].type != "time":
                problems.append("a time series starts with its time column")
            times = [row[0] for row in rows]
            if times != sorted(times):
                problems.append("time series rows must be sorted by time (the plugin converts long to wide)")
        if self.kind in ("bars", "pie") and (self.columns[0].type != "text" or len(self.columns) < 2):
            problems.append("bars and pies take a category column, then numbers")
        if self.kind == "geomap" and "country" not in self.column_names:
            problems.append("the geomap looks countries up by a `country` column")
        return problems


def coerce(value: Any, kind: ColumnType) -> Any:
    """A value from ``run_query`` (JSON-friendly: times are ISO strings) back to the column's type."""
    if kind == "time" and isinstance(value, str):
        return datetime.fromisoformat(value)
    if kind == "time" and isinstance(value, date) and not isinstance(value, datetime):
        return datetime(value.year, value.month, value.day)
    return value


@dataclass(frozen=True, slots=True)
class PromTarget:
    expr: str
    legend: str = ""


@dataclass(frozen=True, slots=True)
class PromPanel:
    """A panel over Prometheus: PromQL targets (``$__rate_interval`` allowed) and a unit."""

    key: str
    title: str
    kind: Literal["timeseries", "stat"]
    targets: tuple[PromTarget, ...]
    description: str = ""
    unit: str = "short"
    width: int = 12
    height: int = 8
    metrics: tuple[str, ...] = field(default=())  # metric names the expressions read (checked by tests)


# --- SDK builders --------------------------------------------------------------------------------------


def _grid(width: int, height: int) -> dashboard_models.GridPos:
    # x/y are laid out by the dashboard builder; only the size is ours.
    return dashboard_models.GridPos(h=height, w=width)


def _links(spec: SqlPanel) -> list[cogbuilder.Builder[dashboard_models.DashboardLink]]:
    if spec.link is None:
        return []
    return [dashboard.DashboardLink("Open in substance drill-down").url(spec.link)]


def sql_target(sql: str, query_type: QueryType, ref_id: str = "A") -> DataqueryBuilder:
    return DataqueryBuilder().raw_sql(sql.strip()).query_type(query_type).ref_id(ref_id).datasource(CLICKHOUSE)


def build_sql_panel(spec: SqlPanel, panel_id: int) -> cogbuilder.Builder[dashboard_models.Panel]:
    """The Grafana panel for ``spec``: the right visualisation, the SQL target, size and unit."""
    query_type = QueryType.TIME_SERIES if spec.kind == "timeseries" else QueryType.TABLE
    target = sql_target(spec.sql, query_type)
    panel: Any
    if spec.kind == "stat":
        panel = (
            stat.Panel()
            .graph_mode(common.BigValueGraphMode.NONE)
            .color_mode(common.BigValueColorMode.BACKGROUND)
            .text_mode(common.BigValueTextMode.VALUE_AND_NAME)
            .reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        )
    elif spec.kind == "timeseries":
        panel = (
            timeseries.Panel()
            .draw_style(common.GraphDrawStyle.BARS if spec.stacked else common.GraphDrawStyle.LINE)
            .fill_opacity(60 if spec.stacked else 10)
            .legend(
                common_builders.VizLegendOptions()
                .display_mode(common.LegendDisplayMode.LIST)
                .placement(common.LegendPlacement.BOTTOM)
                .show_legend(True)
            )
            .tooltip(common_builders.VizTooltipOptions().mode(common.TooltipDisplayMode.MULTI))
        )
        if spec.stacked:
            panel = panel.stacking(common_builders.StackingConfig().mode(common.StackingMode.NORMAL))
    elif spec.kind == "bars":
        panel = (
            barchart.Panel()
            .x_field(spec.columns[0].name)
            .orientation(common.VizOrientation.HORIZONTAL)
            .show_value(common.VisibilityMode.AUTO)
        )
    elif spec.kind == "pie":
        panel = (
            piechart.Panel()
            .pie_type(PieChartType.DONUT)
            .reduce_options(common_builders.ReduceDataOptions().values(True).calcs(["lastNotNull"]))
        )
    elif spec.kind == "geomap":
        value = next(c.name for c in spec.columns if c.type == "number")
        panel = (
            geomap.Panel()
            .view(geomap.MapViewConfig().id("coords").lat(20).lon(10).zoom(2))
            .basemap(common_builders.MapLayerOptions().type("default").name("Basemap"))
            .layers(
                [
                    common_builders.MapLayerOptions()
                    .type("markers")
                    .name(spec.title)
                    .location(
                        common_builders.FrameGeometrySource()
                        .mode(common.FrameGeometrySourceMode.LOOKUP)
                        .lookup("country")
                        .gazetteer("public/gazetteer/countries.json")
                    )
                    .config(
                        {
                            "showLegend": True,
                            "style": {
                                "size": {"field": value, "min": 4, "max": 30, "fixed": 5},
                                "color": {"field": value},
                                "opacity": 0.6,
                            },
                        }
                    )
                ]
            )
            .tooltip(geomap.TooltipOptions().mode(TooltipMode.DETAILS))
        )
    else:
        panel = table.Panel().show_header(True).cell_height(common.TableCellHeight.SM)
    panel = (
        panel.id(panel_id)
        .title(spec.title)
        .description(spec.description)
        .datasource(CLICKHOUSE)
        .with_target(target)
        .unit(spec.unit)
        .grid_pos(_grid(spec.width, spec.height))
    )
    if spec.min_interval:
        panel = panel.interval(spec.min_interval)
    labels = [c.name for c in spec.columns[1:] if c.type == "text"]
    values = [c for c in spec.columns if c.type == "number"]
    if spec.kind == "timeseries" and len(labels) == 1 and len(values) == 1:
        panel = panel.display_name(f"${{__field.labels.{labels[0]}}}")  # legend: "FR-75C", not "reports FR-75C"
    links = _links(spec)
    if links:
        panel = panel.data_links(links)
    return panel


def build_prom_panel(spec: PromPanel, panel_id: int) -> cogbuilder.Builder[dashboard_models.Panel]:
    """The Grafana panel for a :class:`PromPanel`, one PromQL target per expression."""
    panel: Any
    if spec.kind == "stat":
        panel = (
            stat.Panel()
            .graph_mode(common.BigValueGraphMode.AREA)
            .color_mode(common.BigValueColorMode.BACKGROUND)
            .reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]))
        )
    else:
        panel = (
            timeseries.Panel()
            .fill_opacity(10)
            .legend(
                common_builders.VizLegendOptions()
                .display_mode(common.LegendDisplayMode.TABLE)
                .placement(common.LegendPlacement.BOTTOM)
                .show_legend(True)
                .calcs(["mean", "max", "lastNotNull"])
            )
            .tooltip(common_builders.VizTooltipOptions().mode(common.TooltipDisplayMode.MULTI))
        )
    for index, target in enumerate(spec.targets):
        query = prometheus_builders.Dataquery().expr(target.expr).ref_id(chr(ord("A") + index)).datasource(PROMETHEUS)
        if target.legend:
            query = query.legend_format(target.legend)
        panel = panel.with_target(query)
    return (
        panel.id(panel_id)
        .title(spec.title)
        .description(spec.description)
        .datasource(PROMETHEUS)
        .unit(spec.unit)
        .grid_pos(_grid(spec.width, spec.height))
    )


def layout(panels: Sequence[cogbuilder.Builder[dashboard_models.Panel]]) -> None:
    """Place panels left to right, wrapping at Grafana's 24 columns (rows as tall as their tallest)."""
    x = y = row_height = 0
    for builder in panels:
        grid = builder.build().grid_pos
        assert grid is not None
        if x + grid.w > 24:
            x, y, row_height = 0, y + row_height, 0
        grid.x, grid.y = x, y
        x += grid.w
        row_height = max(row_height, grid.h)


def sql_text(variable: str) -> str:
    """A template variable's value as a ClickHouse string: Grafana percent-encodes it, ClickHouse decodes it.

    Why not ``${v:singlequote}`` or ``${v:sqlstring}``: Grafana escapes the quote only, and ClickHouse also reads a
    backslash as an escape. Any viewer sets any variable through the URL (``?var-substance=...``; alert e-mails
    link there), and ``\\' OR 1=1 --`` became ``'\\\\' OR 1=1 --'``: SQL of the viewer's choosing, run as Grafana's
    ClickHouse user on every table of the database, not only what the dashboards show. Percent-encoded
    (Grafana's ``encodeURIComponentStrict``: ``A-Z a-z 0-9 - _ . ~`` and ``%XX`` only), no value leaves its string.
    """
    return f"decodeURLComponent('${{{variable}:percentencode}}')"


def sql_texts(variable: str) -> str:
    """A multi-value variable as an ``Array(String)`` (``x IN`` it): Grafana percent-encodes ``{a,b}``.

    Grafana joins the values with commas before encoding, so a value holding a comma (or starting or ending with a
    brace) would be split: only for variables whose values are codes (ISO 3166 countries and regions, family names:
    validated at intake). A single-valued variable (``substance``: keys such as ``name:2,5-dimethoxy...``) is
    :func:`sql_text`, never split. ``tests/dashboards``: ``test_variable_values_reach_clickhouse_whole``.
    """
    return f"splitByChar(',', trim(BOTH '{{}}' FROM {sql_text(variable)}))"


#: The filter every overview and drill-down panel applies: the selected countries and regions (All: no filter).
IN_PLACE = f"""$__conditionalAll(country IN {sql_texts("country")}, $country)
  AND $__conditionalAll(region IN {sql_texts("region")}, $region)"""


def in_place(sql: str) -> str:
    """``sql`` with ``{in_place}`` replaced by :data:`IN_PLACE` (the SQL stays readable where it is written)."""
    return sql.replace("{in_place}", IN_PLACE)


@dataclass(frozen=True, slots=True)
class SqlVariable:
    """A template variable filled by a ClickHouse query: one column (value), or value then text."""

    name: str
    label: str
    sql: str
    columns: tuple[Column, ...]
    multi: bool = True
    include_all: bool = True
    description: str = ""

    def shape_errors(self, names: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
        """The plugin reads the first column as the value and the second (if any) as the text."""
        if tuple(names) != tuple(c.name for c in self.columns) or len(self.columns) not in (1, 2):
            return [f"columns {list(names)} != expected {[c.name for c in self.columns]}"]
        return [
            f"row {n}: {row!r} has a non-text value"
            for n, row in enumerate(rows)
            if not all(isinstance(v, str) and v for v in row)
        ][:5]


def build_variable(spec: SqlVariable) -> cogbuilder.Builder[dashboard_models.VariableModel]:
    """A query variable on the ClickHouse datasource, refreshed when the dashboard loads."""
    variable = (
        dashboard.QueryVariable(spec.name)
        .label(spec.label)
        .description(spec.description)
        .datasource(CLICKHOUSE)
        .query(spec.sql.strip())
        .refresh(dashboard_models.VariableRefresh.ON_DASHBOARD_LOAD)
        .sort(dashboard_models.VariableSort.DISABLED)
        .multi(spec.multi)
        .include_all(spec.include_all)
    )
    if spec.include_all:
        variable = variable.current(dashboard_models.VariableOption(selected=True, text="All", value="$__all"))
    return variable


COUNTRY = SqlVariable(
    name="country",
    label="Country",
    description="Narrows the panels (and the region list) to these countries.",
    sql="""
SELECT DISTINCT toString(country) AS country
FROM substance_region_first_seen
ORDER BY country
""",
    columns=(Column("country", "text"),),
)

REGION = SqlVariable(
    name="region",
    label="Region",
    description="Narrows the panels to these ISO 3166-2 regions (network-wide alerts show under All only).",
    sql=f"""
SELECT DISTINCT toString(region) AS region
FROM substance_region_first_seen
WHERE $__conditionalAll(country IN {sql_texts("country")}, $country)
ORDER BY region
""",
    columns=(Column("region", "text"),),
)


def assemble_sql_dashboard(
    board: dashboard.Dashboard, specs: Sequence[SqlPanel], variables: Sequence[SqlVariable]
) -> dashboard.Dashboard:
    """``board`` with its SQL panels numbered and laid out, after the ClickHouse datasource variable and the
    dashboard's own variables: every ClickHouse dashboard is put together the same way, so their JSON agree."""
    panels = [build_sql_panel(spec, number) for number, spec in enumerate(specs, start=1)]
    layout(panels)
    board = board.with_variable(build_datasource_variable(CLICKHOUSE_INPUT))
    for variable in variables:
        board = board.with_variable(build_variable(variable))
    for panel in panels:
        board = board.with_panel(panel)
    return board
