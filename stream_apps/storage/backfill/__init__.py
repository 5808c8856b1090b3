"""``synthwatch ingest-history``: years of past reports loaded straight into ClickHouse."""
