"""Expanding a panel's SQL the way Grafana and the ClickHouse plugin do, for a chosen time range.

Why: the report and the tests run the dashboards' own SQL outside Grafana, so they must turn
``$__timeFilter(col)`` and ``${country:singlequote}`` into the same text the plugin would send. Three
passes, in Grafana's order:

1. ``$__conditionalAll(condition, $var)`` (plugin frontend): ``condition``, or ``1=1`` when ``$var`` is All;
2. template variables (Grafana frontend): ``$var``, ``${var}``,
   ``${var:singlequote|csv|sqlstring|raw|percentencode}``,
   and the globals ``$__from``, ``$__to``, ``$__interval``, ``$__interval_ms``;
3. the plugin's backend macros (``pkg/macros/macros.go``): ``$__timeFilter``, ``$__timeFilter_ms``,
   ``$__dateFilter``, ``$__dateTimeFilter``/``$__dt``, ``$__fromTime[_ms]``, ``$__toTime[_ms]``,
   ``$__timeInterval[_ms]``, ``$__interval_s``.

Anything left that looks like a macro or variable is an error: a typo must fail the tests, not Grafana.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import quote

from synthwatch.errors import SynthwatchError

#: The value Grafana gives a variable whose "All" option is selected.
ALL = "$__all"

VariableValue = str | Sequence[str]


class MacroError(SynthwatchError, ValueError):
    """The SQL uses a macro or variable that cannot be expanded; the message says which."""


@dataclass(frozen=True, slots=True)
class TimeRange:
    """A dashboard time range (both ends UTC-aware)."""

    start: datetime
    end: datetime

    def __post_init__(self) -> None:
        if self.start.tzinfo is None or self.end.tzinfo is None:
            raise ValueError("time range ends must be timezone-aware")
        if self.end <= self.start:
            raise ValueError("time range must end after it starts")

    @classmethod
    def last(cls, duration: timedelta, now: datetime | None = None) -> TimeRange:
        """``now-<duration>`` to ``now``, as the dashboard time picker means it."""
        end = now or datetime.now(UTC)
        return cls(end - duration, end)

    @property
    def from_ms(self) -> int:
        return int(self.start.timestamp() * 1000)

    @property
    def to_ms(self) -> int:
        return int(self.end.timestamp() * 1000)

    @property
    def duration(self) -> timedelta:
        return self.end - self.start


_DURATION = re.compile(r"^(\d+)(ms|s|m|h|d|w|y)$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}


def parse_duration(text: str) -> timedelta:
    """Grafana's short durations: ``30d``, ``12h``, ``5m``, ``1w``."""
    match = _DURATION.match(text.strip())
    if match is None:
        raise ValueError(f"not a duration like 30d, 12h or 15m: {text!r}")
    return timedelta(seconds=int(match.group(1)) * _UNIT_SECONDS[match.group(2)])


def format_duration(delta: timedelta) -> str:
    """The shortest exact Grafana duration for ``delta`` (``3600 s`` -> ``1h``)."""
    ms = round(delta.total_seconds() * 1000)
    for unit in ("y", "w", "d", "h", "m", "s"):
        size = round(_UNIT_SECONDS[unit] * 1000)
        if ms >= size and ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


# Grafana's kbn.roundInterval: (upper bound in ms, interval it rounds to).
_ROUNDING: tuple[tuple[int, int], ...] = (
    (15, 10),
    (35, 20),
    (75, 50),
    (150, 100),
    (250, 200),
    (350, 300),
    (450, 400),
    (750, 500),
    (1_500, 1_000),
    (3_500, 2_000),
    (7_500, 5_000),
    (12_500, 10_000),
    (17_500, 15_000),
    (25_000, 20_000),
    (45_000, 30_000),
    (90_000, 60_000),
    (210_000, 120_000),
    (450_000, 300_000),
    (1_050_000, 600_000),
    (2_100_000, 1_800_000),
    (5_400_000, 3_600_000),
    (9_000_000, 7_200_000),
    (16_200_000, 10_800_000),
    (32_400_000, 21_600_000),
    (86_400_000, 43_200_000),
    (604_800_000, 86_400_000),
    (1_814_400_000, 604_800_000),
    (3_628_800_000, 2_592_000_000),
)


def panel_interval(time_range: TimeRange, max_data_points: int = 1000, min_interval: str | None = None) -> timedelta:
    """The ``$__interval`` Grafana gives a panel: range / data points, rounded, at least ``min_interval``."""
    raw_ms = time_range.duration.total_seconds() * 1000 / max(max_data_points, 1)
    rounded = next((to for bound, to in _ROUNDING if raw_ms < bound), 31_536_000_000)
    rounded = max(rounded, 1)
    if min_interval:
        rounded = max(rounded, round(parse_duration(min_interval).total_seconds() * 1000))
    return timedelta(milliseconds=rounded)


# --- helpers -----------------------------------------------------------------------------------------


def _macro_args(sql: str, open_paren: int) -> tuple[list[str], int]:
    """Split the balanced ``( ... )`` starting at ``open_paren`` on top-level commas; returns args, end."""
    depth, start, args = 0, open_paren + 1, []
    quote: str | None = None
    for i in range(open_paren, len(sql)):
        char = sql[i]
        if quote:
            if char == quote and sql[i - 1] != "\\":
                quote = None
            continue
        if char in "'\"`":
            quote = char
        elif char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth == 0:
                args.append(sql[start:i])
                return [a.strip() for a in args], i + 1
        elif char == "," and depth == 1:
            args.append(sql[start:i])
            start = i + 1
    raise MacroError(f"unbalanced parentheses after position {open_paren} in: {sql[open_paren : open_paren + 60]!r}")


def _conditional_all_args(sql: str, open_paren: int) -> tuple[list[str], int]:
    """The plugin frontend's ``getMacroArgs`` (``CHDatasource.ts``, 4.3.2): it counts parentheses and splits on
    commas at depth 1 without knowing SQL strings, so ``x = ','`` is two arguments there and ``x = ')'`` ends the
    macro. The same here, so SQL the plugin would cut apart fails the tests instead of passing them."""
    depth, start, args = 0, open_paren + 1, []
    for i in range(open_paren, len(sql)):
        char = sql[i]
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 1:
            args.append(sql[start:i])
            start = i + 1
        if char in "()" and depth == 0:
            args.append(sql[start:i])
            return [a.strip() for a in args], i + 1
    raise MacroError(f"unbalanced parentheses after position {open_paren} in: {sql[open_paren : open_paren + 60]!r}")


_VAR_REF = re.compile(r"\$\{(\w+)\}|\$(\w+)")


def expand_conditional_all(sql: str, variables: Mapping[str, VariableValue]) -> str:
    """``$__conditionalAll(cond, $var)``: ``cond``, or ``1=1`` when ``$var`` is All or empty (plugin frontend)."""
    macro = "$__conditionalAll("
    while (index := sql.rfind(macro)) != -1:
        args, end = _conditional_all_args(sql, index + len(macro) - 1)
        if len(args) != 2:
            raise MacroError(f"$__conditionalAll takes (condition, $variable), got {len(args)} arguments")
        ref = _VAR_REF.fullmatch(args[1])
        if ref is None:
            raise MacroError(f"$__conditionalAll's second argument must be a $variable, got {args[1]!r}")
        name = ref.group(1) or ref.group(2)
        if name not in variables:
            raise MacroError(f"$__conditionalAll refers to unknown variable ${name}")
        value = variables[name]
        is_all = value == ALL or (not isinstance(value, str) and (len(value) == 0 or ALL in value)) or value == ""
        sql = sql[:index] + ("1=1" if is_all else args[0]) + sql[end:]
    return sql


def _format_value(name: str, value: VariableValue, fmt: str | None) -> str:
    if value == ALL or (not isinstance(value, str) and ALL in value):
        raise MacroError(f"${name} is All here: wrap its condition in $__conditionalAll(..., ${name})")
    values = [value] if isinstance(value, str) else list(value)
    if fmt == "singlequote":
        return ",".join("'" + v.replace("'", "\\'") + "'" for v in values)
    if fmt == "sqlstring":
        return ",".join("'" + v.replace("'", "''") + "'" for v in values)
    if fmt == "percentencode":  # Grafana's encodeURIComponentStrict: only A-Z a-z 0-9 - _ . ~ and %XX (UTF-8)
        return quote(value if isinstance(value, str) else "{" + ",".join(values) + "}", safe="")
    if fmt in ("csv", "raw"):
        return ",".join(values)
    if fmt is None:  # the plugin's own format: a multi-value is quoted and joined, a single value raw
        return values[0] if isinstance(value, str) else "'" + "','".join(values) + "'"
    raise MacroError(f"unsupported variable format ${{{name}:{fmt}}}")


_TEMPLATE_VAR = re.compile(r"\$\{(\w+)(?::(\w+))?\}|\$(\w+)")


def expand_variables(
    sql: str, variables: Mapping[str, VariableValue], time_range: TimeRange, interval: timedelta
) -> str:
    """Grafana's template-variable pass; ``$__name`` that is not a Grafana global is left for the macros."""
    globals_: dict[str, str] = {
        "__from": str(time_range.from_ms),
        "__to": str(time_range.to_ms),
        "__interval": format_duration(interval),
        "__interval_ms": str(round(interval.total_seconds() * 1000)),
    }

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(3)
        fmt = match.group(2)
        if name in globals_:
            return globals_[name]
        if name.startswith("__"):
            return match.group(0)
        if name not in variables:
            raise MacroError(f"unknown template variable ${name}")
        return _format_value(name, variables[name], fmt)

    return _TEMPLATE_VAR.sub(replace, sql)


def _to_date(moment: datetime) -> str:
    return f"toDate('{moment.astimezone(UTC).strftime('%Y-%m-%d')}')"


def _to_datetime(moment: datetime) -> str:
    return f"toDateTime({math.floor(moment.timestamp())})"


def _to_datetime64(moment: datetime) -> str:
    return f"fromUnixTimestamp64Milli({math.floor(moment.timestamp() * 1000)})"


MacroFunc = Callable[[list[str], TimeRange, timedelta], str]


def _one_arg(name: str, args: list[str]) -> str:
    if len(args) != 1 or not args[0]:
        raise MacroError(f"$__{name} expects 1 argument, received {len(args)}")
    return args[0]


def _range_filter(convert: Callable[[datetime], str]) -> MacroFunc:
    def expand(args: list[str], time_range: TimeRange, interval: timedelta) -> str:
        column = _one_arg("timeFilter", args)
        return f"{column} >= {convert(time_range.start)} AND {column} <= {convert(time_range.end)}"

    return expand


def _date_time_filter(args: list[str], time_range: TimeRange, interval: timedelta) -> str:
    if len(args) != 2:
        raise MacroError(f"$__dateTimeFilter expects 2 arguments, received {len(args)}")
    date_col, time_col = args
    start, end = time_range.start, time_range.end
    return (
        f"({date_col} >= {_to_date(start)} AND {date_col} <= {_to_date(end)}) AND "
        f"({time_col} >= {_to_datetime(start)} AND {time_col} <= {_to_datetime(end)})"
    )


def _time_interval(args: list[str], time_range: TimeRange, interval: timedelta) -> str:
    seconds = max(int(interval.total_seconds()), 1)
    return f"toStartOfInterval(toDateTime({_one_arg('timeInterval', args)}), INTERVAL {seconds} second)"


def _time_interval_ms(args: list[str], time_range: TimeRange, interval: timedelta) -> str:
    ms = max(int(interval.total_seconds() * 1000), 1)
    return f"toStartOfInterval(toDateTime64({_one_arg('timeInterval_ms', args)}, 3), INTERVAL {ms} millisecond)"


PLUGIN_MACROS: dict[str, MacroFunc] = {
    "fromTime": lambda a, r, i: _to_datetime(r.start),
    "toTime": lambda a, r, i: _to_datetime(r.end),
    "fromTime_ms": lambda a, r, i: _to_datetime64(r.start),
    "toTime_ms": lambda a, r, i: _to_datetime64(r.end),
    "timeFilter": _range_filter(_to_datetime),
    "timeFilter_ms": _range_filter(_to_datetime64),
    "dateFilter": _range_filter(_to_date),
    "dateTimeFilter": _date_time_filter,
    "dt": _date_time_filter,
    "timeInterval": _time_interval,
    "timeInterval_ms": _time_interval_ms,
    "interval_s": lambda a, r, i: str(max(int(i.total_seconds()), 1)),
}

_MACRO = re.compile(r"\$__(\w+)")


def expand_plugin_macros(sql: str, time_range: TimeRange, interval: timedelta) -> str:
    """The plugin backend's pass (sqlds): each ``$__name`` or ``$__name(args)`` becomes SQL."""
    out, pos = [], 0
    while (match := _MACRO.search(sql, pos)) is not None:
        name = match.group(1)
        if name not in PLUGIN_MACROS:
            raise MacroError(f"unknown macro $__{name}")
        args: list[str] = []
        end = match.end()
        if end < len(sql) and sql[end] == "(":
            args, end = _macro_args(sql, end)
        out.append(sql[pos : match.start()])
        out.append(PLUGIN_MACROS[name](args, time_range, interval))
        pos = end
    out.append(sql[pos:])
    return "".join(out)


def expand(
    sql: str,
    time_range: TimeRange,
    *,
    interval: timedelta | None = None,
    variables: Mapping[str, VariableValue] | None = None,
) -> str:
    """The SQL the ClickHouse plugin would run for this range, interval and variable selection."""
    variables = variables or {}
    interval = interval or panel_interval(time_range)
    sql = expand_conditional_all(sql, variables)
    sql = expand_variables(sql, variables, time_range, interval)
    sql = expand_plugin_macros(sql, time_range, interval)
    leftover = re.search(r"\$\{?\w+|\[\[\w+", sql)
    if leftover:
        raise MacroError(f"unexpanded reference {leftover.group(0)!r} in the SQL")
    return sql
