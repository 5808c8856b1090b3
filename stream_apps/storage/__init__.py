"""Everything that talks to ClickHouse: the sink, the deliveries store, state rebuild, analysts' reads,
and the history backfill. It may import the floor and :mod:`synthwatch.stream_apps.detect`.
"""
