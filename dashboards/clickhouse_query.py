"""A grafana-foundation-sdk dataquery for the official ClickHouse plugin (grafana-clickhouse-datasource).

The SDK ships builders for Prometheus, Loki, Athena... but not for ClickHouse, so this module carries the
plugin's SQL-editor target fields (``rawSql``, ``format``, ``queryType``, ``editorType``, ``pluginVersion``)
in the SDK's own shape: a model subclassing ``cogvariants.Dataquery`` with ``to_json``/``from_json``, and
a builder subclassing ``cogbuilder.Builder``, so panels take it through ``with_target`` like any other.

``pluginVersion`` matters: the plugin rewrites targets without a 4.x version as v3 queries on load.
"""

from __future__ import annotations

import enum
import typing

from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.cog import runtime as cogruntime
from grafana_foundation_sdk.cog import variants as cogvariants
from grafana_foundation_sdk.models import dashboard

PLUGIN_ID = "grafana-clickhouse-datasource"
#: The plugin major version the targets are written for (v4 SQL-editor query model).
PLUGIN_VERSION = "4.3.2"


class Format(enum.IntEnum):
    """sqlds' result format: how the plugin's backend shapes the frame (long time series become wide)."""

    TIME_SERIES = 0
    TABLE = 1
    LOGS = 2
    TRACE = 3


class QueryType(enum.StrEnum):
    """What the plugin's editor shows the query as."""

    TABLE = "table"
    TIME_SERIES = "timeseries"
    LOGS = "logs"
    TRACES = "traces"


class EditorType(enum.StrEnum):
    SQL = "sql"
    BUILDER = "builder"


FORMAT_OF: dict[QueryType, Format] = {
    QueryType.TABLE: Format.TABLE,
    QueryType.TIME_SERIES: Format.TIME_SERIES,
    QueryType.LOGS: Format.LOGS,
    QueryType.TRACES: Format.TRACE,
}


class Dataquery(cogvariants.Dataquery):
    """One SQL target of a ClickHouse panel, as the plugin saves it in dashboard JSON."""

    raw_sql: str
    format_val: Format
    query_type: QueryType
    editor_type: EditorType
    plugin_version: str
    ref_id: str
    hide: bool | None
    datasource: dashboard.DataSourceRef | None

    def __init__(
        self,
        raw_sql: str = "",
        format_val: Format | None = None,
        query_type: QueryType | None = None,
        editor_type: EditorType | None = None,
        plugin_version: str = PLUGIN_VERSION,
        ref_id: str = "",
        hide: bool | None = None,
        datasource: dashboard.DataSourceRef | None = None,
    ) -> None:
        self.raw_sql = raw_sql
        self.query_type = query_type if query_type is not None else QueryType.TABLE
        self.format_val = format_val if format_val is not None else FORMAT_OF[self.query_type]
        self.editor_type = editor_type if editor_type is not None else EditorType.SQL
        self.plugin_version = plugin_version
        self.ref_id = ref_id
        self.hide = hide
        self.datasource = datasource

    def to_json(self) -> dict[str, object]:
        payload: dict[str, object] = {
            "editorType": self.editor_type,
            "format": int(self.format_val),
            "pluginVersion": self.plugin_version,
            "queryType": self.query_type,
            "rawSql": self.raw_sql,
            "refId": self.ref_id,
        }
        if self.hide is not None:
            payload["hide"] = self.hide
        if self.datasource is not None:
            payload["datasource"] = self.datasource
        return payload

    @classmethod
    def from_json(cls, data: dict[str, typing.Any]) -> typing.Self:
        args: dict[str, typing.Any] = {}
        if "rawSql" in data:
            args["raw_sql"] = data["rawSql"]
        if "format" in data:
            args["format_val"] = Format(data["format"])
        if "queryType" in data:
            args["query_type"] = QueryType(data["queryType"])
        if "editorType" in data:
            args["editor_type"] = EditorType(data["editorType"])
        if "pluginVersion" in data:
            args["plugin_version"] = data["pluginVersion"]
        if "refId" in data:
            args["ref_id"] = data["refId"]
        if "hide" in data:
            args["hide"] = data["hide"]
        if "datasource" in data:
            args["datasource"] = dashboard.DataSourceRef.from_json(data["datasource"])
        return cls(**args)


class DataqueryBuilder(cogbuilder.Builder[Dataquery]):
    """Builder for :class:`Dataquery`, chained like the SDK's own (``.raw_sql(...).ref_id("A")``)."""

    _internal: Dataquery

    def __init__(self) -> None:
        self._internal = Dataquery()

    def build(self) -> Dataquery:
        return self._internal

    def raw_sql(self, raw_sql: str) -> typing.Self:
        self._internal.raw_sql = raw_sql
        return self

    def query_type(self, query_type: QueryType) -> typing.Self:
        """Also sets ``format`` to the matching sqlds format (set ``format`` after to override)."""
        self._internal.query_type = query_type
        self._internal.format_val = FORMAT_OF[query_type]
        return self

    def format(self, format_val: Format) -> typing.Self:
        self._internal.format_val = format_val
        return self

    def editor_type(self, editor_type: EditorType) -> typing.Self:
        self._internal.editor_type = editor_type
        return self

    def plugin_version(self, plugin_version: str) -> typing.Self:
        self._internal.plugin_version = plugin_version
        return self

    def ref_id(self, ref_id: str) -> typing.Self:
        self._internal.ref_id = ref_id
        return self

    def hide(self, hide: bool) -> typing.Self:
        self._internal.hide = hide
        return self

    def datasource(self, datasource: dashboard.DataSourceRef) -> typing.Self:
        self._internal.datasource = datasource
        return self


def variant_config() -> cogruntime.DataqueryConfig:
    """Lets ``Dashboard.from_json`` turn ClickHouse targets back into :class:`Dataquery` objects."""
    return cogruntime.DataqueryConfig(identifier=PLUGIN_ID, from_json_hook=Dataquery.from_json)


def register() -> None:
    """Register the variant with the SDK's runtime (only needed to *read* dashboards with the SDK)."""
    cogruntime.register_dataquery_variant(variant_config())
