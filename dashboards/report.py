"""``synthwatch report``: the overview dashboard as one self-contained HTML page, for people without Grafana.

Why the same SQL: the report runs each overview panel's own query (``dashboards/overview.py``), with the
plugin's macros expanded for the chosen range exactly as Grafana would, through
:func:`synthwatch.stream_apps.storage.query.run_query` (so it also works while a running worker owns the
embedded engine).
Charts are plotly with its JavaScript inlined: the page opens offline, by e-mail, from a USB stick.
Plotly's maps fetch world shapes from a CDN, so the country map is drawn as a bar chart here.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlparse

import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from synthwatch.dashboards import overview
from synthwatch.dashboards.macros import ALL, TimeRange, VariableValue, expand, panel_interval
from synthwatch.dashboards.panels import SqlPanel, coerce
from synthwatch.settings import Settings
from synthwatch.stream_apps.storage.query import QueryError, QueryResult, run_query

#: Points per time series in the report: coarser than a dashboard (1000), readable on paper.
REPORT_DATA_POINTS = 40
SEVERITY_COLOURS = {"critical": "#c4162a", "warning": "#e0a800", "info": "#3274d9"}

Runner = Callable[[str], QueryResult]

#: The overview's country and region variables as the report sets them: every place.
EVERYWHERE: dict[str, VariableValue] = {"country": ALL, "region": ALL}


@dataclass
class PanelOutcome:
    key: str
    title: str
    rows: int = 0
    error: str | None = None


@dataclass
class ReportResult:
    html: str
    time_range: TimeRange
    panels: list[PanelOutcome] = field(default_factory=list)

    @property
    def failed(self) -> list[PanelOutcome]:
        return [p for p in self.panels if p.error is not None]


def _figure_html(figure: go.Figure, height: int, legend: dict[str, Any] | None = None) -> str:
    figure.update_layout(
        height=height,
        margin={"l": 60, "r": 20, "t": 10, "b": 40},
        template="plotly_white",
        legend=legend or {"orientation": "h", "y": -0.2},
        font={"family": "system-ui, sans-serif", "size": 12},
    )
    return str(
        figure.to_html(
            full_html=False,
            include_plotlyjs=False,
            config={"displaylogo": False, "displayModeBar": False, "responsive": True},
        )
    )


def _naive_utc(moment: datetime) -> datetime:
    """Times as plotly draws them: naive, in UTC (the report's axis is UTC like the dashboard's)."""
    return moment.astimezone(UTC).replace(tzinfo=None) if moment.tzinfo else moment


def bucket_grid(time_range: TimeRange, interval: timedelta) -> list[datetime]:
    """Every bucket that starts in the range (naive UTC), empty buckets included.

    ClickHouse's ``toStartOfInterval(t, INTERVAL n second)`` starts buckets at multiples of n seconds
    since the epoch; the same arithmetic here gives the buckets a query left out because nothing was
    reported in them.
    """
    step = int(interval.total_seconds())
    start = int(time_range.start.timestamp()) // step * step
    end = time_range.end.timestamp()  # a bucket starting at the very end holds one instant: not drawn as a 0
    return [_naive_utc(datetime.fromtimestamp(t, UTC)) for t in range(start, int(end), step) if t < end]


def time_series(spec: SqlPanel, rows: list[list[Any]]) -> dict[str, dict[datetime, float]]:
    """Long rows (time, labels..., values...) as one series per label (and value column), keyed by time."""
    labels = [i for i, c in enumerate(spec.columns) if c.type == "text"]
    values = [i for i, c in enumerate(spec.columns) if c.type == "number"]
    series: dict[str, dict[datetime, float]] = {}
    for row in rows:
        label = " ".join(str(row[i]) for i in labels)
        for v in values:
            name = label if len(values) == 1 and label else f"{spec.columns[v].name} {label}".strip()
            points = series.setdefault(name, {})
            moment = _naive_utc(row[0])
            points[moment] = points.get(moment, 0) + row[v]
    return series


def zero_filled(
    series: dict[str, dict[datetime, float]], grid: list[datetime]
) -> tuple[list[datetime], dict[str, list[float]]]:
    """Every series on the same time axis, 0 where a bucket had no row (no line drawn across empty days)."""
    axis = sorted(set(grid).union(*(points.keys() for points in series.values())))
    return axis, {name: [points.get(t, 0) for t in axis] for name, points in series.items()}


def top_series(series: dict[str, list[float]], keep: int, what: str = "others") -> list[tuple[str, list[float]]]:
    """The ``keep`` largest series (by total), then one line for the rest: their average per bucket.

    Why: 17 region lines on one chart cannot be told apart; the few that matter can, beside what a
    typical other one did. An average (not a sum) stays on the same scale as the lines it sits beside;
    its name says how many it stands for.
    """
    ranked = sorted(series.items(), key=lambda kv: (-sum(kv[1]), kv[0]))
    if len(ranked) <= keep + 1:
        return ranked
    rest = ranked[keep:]
    mean = [sum(values) / len(rest) for values in zip(*(values for _, values in rest), strict=True)]
    return [*ranked[:keep], (f"{what}: average of {len(rest)}", mean)]


#: Lines a time-series chart of the report shows before the rest are summed into "others".
TOP_SERIES = 5
OTHERS_COLOUR = "#9aa5b1"


def _timeseries(spec: SqlPanel, rows: list[list[Any]], grid: list[datetime]) -> str:
    axis, filled = zero_filled(time_series(spec, rows), grid)
    figure = go.Figure()
    if spec.stacked:
        for name, ys in sorted(filled.items(), key=lambda kv: (-sum(kv[1]), kv[0])):
            figure.add_trace(go.Bar(x=axis, y=ys, name=name))
        figure.update_layout(barmode="stack")
    else:
        label = next((c.name for c in spec.columns[1:] if c.type == "text"), "series").replace("_code", "")
        for name, ys in top_series(filled, TOP_SERIES, f"other {label}s"):
            other = name.startswith(f"other {label}s:")
            figure.add_trace(
                go.Scatter(
                    x=axis,
                    y=ys,
                    name=name,
                    mode="lines+markers",  # a series with one non-zero bucket still shows a point
                    marker={"size": 4},
                    line={"width": 1.5, **({"color": OTHERS_COLOUR, "dash": "dot"} if other else {})},
                )
            )
        figure.update_layout(showlegend=True)  # one series is named too
    return _figure_html(figure, 380)


def _bars(spec: SqlPanel, rows: list[list[Any]], horizontal: bool = True) -> str:
    value = next(i for i, c in enumerate(spec.columns) if c.type == "number")
    ordered = list(reversed(rows)) if horizontal else rows
    categories = [str(r[0]) for r in ordered]
    numbers = [r[value] for r in ordered]
    bar = go.Bar(x=numbers, y=categories, orientation="h") if horizontal else go.Bar(x=categories, y=numbers)
    figure = go.Figure(bar)
    figure.update_layout(xaxis_title=spec.columns[value].name.replace("_", " "))
    return _figure_html(figure, max(300, 22 * len(rows) + 80))


#: Slices below this share of the total are grouped into one "others" slice (their labels would collide).
MIN_SLICE_SHARE = 0.03


def pie_slices(rows: list[list[Any]], min_share: float = MIN_SLICE_SHARE) -> list[tuple[str, float]]:
    """(label, value) per slice, largest first, slices under ``min_share`` of the total summed as "others"."""
    total = sum(r[1] for r in rows) or 1
    big = [(str(r[0]), r[1]) for r in rows if r[1] / total >= min_share]
    small = [r[1] for r in rows if r[1] / total < min_share]
    big.sort(key=lambda kv: -kv[1])
    if len(small) > 1:
        return [*big, (f"others ({len(small)})", sum(small))]
    return big + [(str(r[0]), r[1]) for r in rows if r[1] / total < min_share]


def _pie(spec: SqlPanel, rows: list[list[Any]]) -> str:
    slices = pie_slices(rows)
    figure = go.Figure(
        go.Pie(
            labels=[label for label, _ in slices],
            values=[value for _, value in slices],
            hole=0.45,
            sort=False,
            direction="clockwise",
            textinfo="percent",
            textposition="inside",  # percentages inside the slices; names in the legend, none overlapping
            insidetextorientation="horizontal",
        )
    )
    figure.update_layout(uniformtext={"minsize": 10, "mode": "hide"})
    return _figure_html(figure, 380, legend={"orientation": "v", "x": 1.0, "y": 0.5, "yanchor": "middle"})


def _stat(spec: SqlPanel, rows: list[list[Any]]) -> str:
    row = rows[0] if rows else [0] * len(spec.columns)
    cards = []
    for column, number in zip(spec.columns, row, strict=True):
        colour = SEVERITY_COLOURS.get(column.name, "#37474f")
        text = f"{number:,.0f}" if isinstance(number, int | float) else html.escape(str(number))
        cards.append(
            f'<div class="card" style="border-top-color:{colour}"><div class="value">{text}</div>'
            f'<div class="name">{html.escape(column.name.replace("_", " "))}</div></div>'
        )
    return f'<div class="cards">{"".join(cards)}</div>'


def _cell(value: Any) -> str:
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M")
    if isinstance(value, float):
        return f"{value:,.1f}" if not value.is_integer() else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return html.escape(str(value))


_CELL_CLASS = {"number": "num", "time": "time", "text": "text"}


def _table(spec: SqlPanel, rows: list[list[Any]], limit: int = 50) -> str:
    keep = [i for i, c in enumerate(spec.columns) if c.name != "substance_key"]  # an id for Grafana links
    head = "".join(f"<th>{html.escape(spec.columns[i].name.replace('_', ' '))}</th>" for i in keep)
    body = "".join(
        "<tr>"
        + "".join(f'<td class="{"num" if spec.columns[i].type == "number" else ""}">{_cell(row[i])}</td>' for i in keep)
        + "</tr>"
        for row in rows[:limit]
    )
    more = f'<p class="more">{len(rows) - limit} more rows in Grafana.</p>' if len(rows) > limit else ""
    return f'<div class="table"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>{more}'


def render_panel(spec: SqlPanel, rows: list[list[Any]], grid: list[datetime] | None = None) -> str:
    """The HTML of one panel's body from its (typed) rows; ``grid``: a time series' buckets, empty ones too."""
    if spec.kind == "stat":
        return _stat(spec, rows)
    if not rows:
        return '<p class="empty">No data in this range.</p>'
    if spec.kind == "timeseries":
        return _timeseries(spec, rows, grid or [])
    if spec.kind in ("bars", "geomap"):
        return _bars(spec, rows)
    if spec.kind == "pie":
        return _pie(spec, rows)
    return _table(spec, rows)


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 0; background: #f4f5f7; color: #1f2933; }
header { background: #1f2933; color: #fff; padding: 18px 28px; }
header h1 { margin: 0 0 4px; font-size: 22px; }
header p { margin: 0; color: #cbd2d9; font-size: 13px; }
main { display: grid; grid-template-columns: repeat(24, 1fr); gap: 14px; padding: 18px 28px; }
section { background: #fff; border-radius: 6px; padding: 12px 16px; box-shadow: 0 1px 2px rgba(0,0,0,.08);
          min-width: 0; }
section h2 { font-size: 15px; margin: 0 0 2px; }
section .desc { font-size: 12px; color: #52606d; margin: 0 0 8px; }
.cards { display: flex; gap: 12px; flex-wrap: wrap; }
.card { flex: 1; min-width: 110px; border-top: 4px solid; background: #f8f9fa; padding: 10px 12px; }
.card .value { font-size: 28px; font-weight: 600; }
.card .name { font-size: 12px; color: #52606d; text-transform: capitalize; }
.table { overflow-x: auto; max-height: 520px; }
table { border-collapse: collapse; width: 100%; font-size: 12px; }
th { text-align: left; position: sticky; top: 0; background: #eef0f3; padding: 4px 6px; }
td { border-top: 1px solid #e4e7eb; padding: 3px 6px; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.time { white-space: nowrap; }
.error { color: #c4162a; white-space: pre-wrap; font-size: 12px; }
.empty, .more { color: #7b8794; font-size: 12px; }
@media (max-width: 1100px) { section { grid-column: span 24 !important; } }
"""


def _where(settings: Settings) -> str:
    """Where the data came from, without credentials."""
    url = settings.resolved_clickhouse_url
    if url.startswith("chdb:"):
        return f"embedded ClickHouse in {settings.embedded_clickhouse_path} (database {settings.clickhouse_database})"
    parts = urlparse(url)
    return f"ClickHouse at {parts.hostname}:{parts.port or ''}{parts.path}"


def render_report(
    runner: Runner,
    time_range: TimeRange,
    *,
    panels: Sequence[SqlPanel] = overview.PANELS,
    title: str = "synthwatch early-warning report",
    source: str = "",
    generated_at: datetime | None = None,
) -> ReportResult:
    """Run every panel's SQL through ``runner`` and lay the results out like the dashboard."""
    generated_at = generated_at or datetime.now(UTC)
    result = ReportResult(html="", time_range=time_range)
    sections = []
    for spec in panels:
        outcome = PanelOutcome(spec.key, spec.title)
        result.panels.append(outcome)
        interval = panel_interval(time_range, REPORT_DATA_POINTS, spec.min_interval)
        try:
            answer = runner(expand(spec.sql, time_range, interval=interval, variables=EVERYWHERE))
            if answer.rows and tuple(answer.columns) != spec.column_names:
                raise QueryError(f"columns {answer.columns} != expected {list(spec.column_names)}")
            rows = [[coerce(v, c.type) for v, c in zip(row, spec.columns, strict=True)] for row in answer.rows]
            outcome.rows = len(rows)
            body = render_panel(spec, rows, bucket_grid(time_range, interval))
        except (QueryError, ValueError) as error:
            outcome.error = str(error)
            body = f'<p class="error">This panel could not be drawn: {html.escape(str(error))}</p>'
        sections.append(
            f'<section id="{spec.key}" data-kind="{spec.kind}" style="grid-column: span {spec.width}">'
            f"<h2>{html.escape(spec.title)}</h2>"
            + (f'<p class="desc">{html.escape(spec.description)}</p>' if spec.description else "")
            + body
            + "</section>"
        )
    start, end = (t.strftime("%Y-%m-%d %H:%M UTC") for t in (time_range.start, time_range.end))
    result.html = (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style>"
        f'<script type="text/javascript">{get_plotlyjs()}</script></head><body>'
        f"<header><h1>{html.escape(title)}</h1>"
        f"<p>{start} – {end} · generated {generated_at.strftime('%Y-%m-%d %H:%M UTC')}"
        + (f" · {html.escape(source)}" if source else "")
        + " · the panels of the Grafana dashboard “Early warning overview”</p></header>"
        f"<main>{''.join(sections)}</main></body></html>\n"
    )
    return result


def write_report(
    settings: Settings, out: Any, since: timedelta, *, now: datetime | None = None, runner: Runner | None = None
) -> ReportResult:
    """Query synthwatch's ClickHouse for the last ``since`` and write the HTML page to ``out``."""
    from pathlib import Path

    time_range = TimeRange.last(since, now)
    result = render_report(
        runner or (lambda sql: run_query(settings, sql)), time_range, source=_where(settings), generated_at=now
    )
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(result.html, encoding="utf-8")
    return result
