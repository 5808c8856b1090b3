-- Clustered variant of migrations/0003_aggregates.sql. The materialized views are attached to the
-- `_local` raw tables, so each shard aggregates the rows it stores (an insert through the Distributed
-- table fires the views on the shard that receives the rows, exactly once per replicated block).
-- Aggregates are partial per shard; queries through the Distributed tables already read them with
-- sum()/min()/max() ... GROUP BY, which merges the shards' partial rows. Raw tables are sharded by
-- region, so per-region aggregate rows are whole on one shard; the network-wide substance_first_seen
-- is a few hundred rows per shard.

CREATE TABLE IF NOT EXISTS reports_hourly_local ON CLUSTER '{cluster}'
(
    hour           DateTime('UTC'),
    country        LowCardinality(String),
    region         LowCardinality(String),
    kind           LowCardinality(String),
    family         LowCardinality(String),
    substance_key  String,
    substance_name String,
    reports        UInt64,
    grams          Float64
)
ENGINE = ReplicatedSummingMergeTree('/clickhouse/tables/{shard}/{database}/{table}', '{replica}', (reports, grams))
PARTITION BY toYYYYMM(hour)
ORDER BY (hour, country, region, kind, family, substance_key)
TTL hour + INTERVAL 400 DAY;

CREATE TABLE IF NOT EXISTS reports_hourly ON CLUSTER '{cluster}' AS reports_hourly_local
ENGINE = Distributed('{cluster}', currentDatabase(), reports_hourly_local, cityHash64(region));

CREATE TABLE IF NOT EXISTS reports_daily_local ON CLUSTER '{cluster}'
(
    day            Date,
    country        LowCardinality(String),
    region         LowCardinality(String),
    kind           LowCardinality(String),
    family         LowCardinality(String),
    substance_key  String,
    substance_name String,
    reports        UInt64,
    grams          Float64
)
ENGINE = ReplicatedSummingMergeTree('/clickhouse/tables/{shard}/{database}/{table}', '{replica}', (reports, grams))
PARTITION BY toYear(day)
ORDER BY (day, country, region, kind, family, substance_key);

CREATE TABLE IF NOT EXISTS reports_daily ON CLUSTER '{cluster}' AS reports_daily_local
ENGINE = Distributed('{cluster}', currentDatabase(), reports_daily_local, cityHash64(region));

CREATE MATERIALIZED VIEW IF NOT EXISTS reports_hourly_labs_mv ON CLUSTER '{cluster}' TO reports_hourly_local AS
SELECT toStartOfHour(occurred_at) AS hour, country, region, 'lab_detection' AS kind, family, substance_key,
       any(resolved_name) AS substance_name, count() AS reports, toFloat64(0) AS grams
FROM lab_detections_local GROUP BY hour, country, region, family, substance_key;

CREATE MATERIALIZED VIEW IF NOT EXISTS reports_hourly_seizures_mv ON CLUSTER '{cluster}' TO reports_hourly_local AS
SELECT toStartOfHour(occurred_at) AS hour, country, region, 'border_seizure' AS kind, family, substance_key,
       any(resolved_name) AS substance_name, count() AS reports, sum(ifNull(grams, 0)) AS grams
FROM border_seizures_local GROUP BY hour, country, region, family, substance_key;

CREATE MATERIALIZED VIEW IF NOT EXISTS reports_daily_labs_mv ON CLUSTER '{cluster}' TO reports_daily_local AS
SELECT toDate(occurred_at) AS day, country, region, 'lab_detection' AS kind, family, substance_key,
       any(resolved_name) AS substance_name, count() AS reports, toFloat64(0) AS grams
FROM lab_detections_local GROUP BY day, country, region, family, substance_key;

CREATE MATERIALIZED VIEW IF NOT EXISTS reports_daily_seizures_mv ON CLUSTER '{cluster}' TO reports_daily_local AS
SELECT toDate(occurred_at) AS day, country, region, 'border_seizure' AS kind, family, substance_key,
       any(resolved_name) AS substance_name, count() AS reports, sum(ifNull(grams, 0)) AS grams
FROM border_seizures_local GROUP BY day, country, region, family, substance_key;

CREATE TABLE IF NOT EXISTS substance_first_seen_local ON CLUSTER '{cluster}'
(
    substance_key  String,
    substance_name SimpleAggregateFunction(any, String),
    family         SimpleAggregateFunction(any, String),
    first_seen     SimpleAggregateFunction(min, DateTime64(3, 'UTC')),
    last_seen      SimpleAggregateFunction(max, DateTime64(3, 'UTC')),
    reports        SimpleAggregateFunction(sum, UInt64)
)
ENGINE = ReplicatedAggregatingMergeTree('/clickhouse/tables/{shard}/{database}/{table}', '{replica}')
ORDER BY substance_key;

CREATE TABLE IF NOT EXISTS substance_first_seen ON CLUSTER '{cluster}' AS substance_first_seen_local
ENGINE = Distributed('{cluster}', currentDatabase(), substance_first_seen_local, cityHash64(substance_key));

CREATE TABLE IF NOT EXISTS substance_region_first_seen_local ON CLUSTER '{cluster}'
(
    substance_key  String,
    country        LowCardinality(String),
    region         LowCardinality(String),
    substance_name SimpleAggregateFunction(any, String),
    family         SimpleAggregateFunction(any, String),
    first_seen     SimpleAggregateFunction(min, DateTime64(3, 'UTC')),
    last_seen      SimpleAggregateFunction(max, DateTime64(3, 'UTC')),
    reports        SimpleAggregateFunction(sum, UInt64)
)
ENGINE = ReplicatedAggregatingMergeTree('/clickhouse/tables/{shard}/{database}/{table}', '{replica}')
ORDER BY (substance_key, country, region);

CREATE TABLE IF NOT EXISTS substance_region_first_seen ON CLUSTER '{cluster}' AS substance_region_first_seen_local
ENGINE = Distributed('{cluster}', currentDatabase(), substance_region_first_seen_local, cityHash64(region));

CREATE MATERIALIZED VIEW IF NOT EXISTS substance_first_seen_labs_mv ON CLUSTER '{cluster}' TO substance_first_seen_local AS
SELECT substance_key, any(resolved_name) AS substance_name, any(family) AS family, min(occurred_at) AS first_seen,
       max(occurred_at) AS last_seen, count() AS reports
FROM lab_detections_local GROUP BY substance_key;

CREATE MATERIALIZED VIEW IF NOT EXISTS substance_first_seen_seizures_mv ON CLUSTER '{cluster}' TO substance_first_seen_local AS
SELECT substance_key, any(resolved_name) AS substance_name, any(family) AS family, min(occurred_at) AS first_seen,
       max(occurred_at) AS last_seen, count() AS reports
FROM border_seizures_local GROUP BY substance_key;

CREATE MATERIALIZED VIEW IF NOT EXISTS substance_region_first_seen_labs_mv ON CLUSTER '{cluster}' TO substance_region_first_seen_local AS
SELECT substance_key, country, region, any(resolved_name) AS substance_name, any(family) AS family,
       min(occurred_at) AS first_seen, max(occurred_at) AS last_seen, count() AS reports
FROM lab_detections_local GROUP BY substance_key, country, region;

CREATE MATERIALIZED VIEW IF NOT EXISTS substance_region_first_seen_seizures_mv ON CLUSTER '{cluster}' TO substance_region_first_seen_local AS
SELECT substance_key, country, region, any(resolved_name) AS substance_name, any(family) AS family,
       min(occurred_at) AS first_seen, max(occurred_at) AS last_seen, count() AS reports
FROM border_seizures_local GROUP BY substance_key, country, region;
