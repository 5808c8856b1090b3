-- Aggregates kept by materialized views, so dashboards over years of reports read thousands of rows,
-- not millions. The views fire on every insert into the raw tables; the sink inserts each event_id
-- once (it skips ids already stored), so the aggregates equal a recount from the raw tables.
-- SummingMergeTree: rows with the same key are summed on merge; always read with sum() ... GROUP BY.

CREATE TABLE IF NOT EXISTS reports_hourly
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
ENGINE = SummingMergeTree((reports, grams))
PARTITION BY toYYYYMM(hour)
ORDER BY (hour, country, region, kind, family, substance_key)
TTL hour + INTERVAL 400 DAY;

CREATE TABLE IF NOT EXISTS reports_daily
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
ENGINE = SummingMergeTree((reports, grams))
PARTITION BY toYear(day)
ORDER BY (day, country, region, kind, family, substance_key);

CREATE MATERIALIZED VIEW IF NOT EXISTS reports_hourly_labs_mv TO reports_hourly AS
SELECT toStartOfHour(occurred_at) AS hour, country, region, 'lab_detection' AS kind, family, substance_key,
       any(resolved_name) AS substance_name, count() AS reports, toFloat64(0) AS grams
FROM lab_detections GROUP BY hour, country, region, family, substance_key;

CREATE MATERIALIZED VIEW IF NOT EXISTS reports_hourly_seizures_mv TO reports_hourly AS
SELECT toStartOfHour(occurred_at) AS hour, country, region, 'border_seizure' AS kind, family, substance_key,
       any(resolved_name) AS substance_name, count() AS reports, sum(ifNull(grams, 0)) AS grams
FROM border_seizures GROUP BY hour, country, region, family, substance_key;

CREATE MATERIALIZED VIEW IF NOT EXISTS reports_daily_labs_mv TO reports_daily AS
SELECT toDate(occurred_at) AS day, country, region, 'lab_detection' AS kind, family, substance_key,
       any(resolved_name) AS substance_name, count() AS reports, toFloat64(0) AS grams
FROM lab_detections GROUP BY day, country, region, family, substance_key;

CREATE MATERIALIZED VIEW IF NOT EXISTS reports_daily_seizures_mv TO reports_daily AS
SELECT toDate(occurred_at) AS day, country, region, 'border_seizure' AS kind, family, substance_key,
       any(resolved_name) AS substance_name, count() AS reports, sum(ifNull(grams, 0)) AS grams
FROM border_seizures GROUP BY day, country, region, family, substance_key;

-- First and last sighting per substance, network-wide and per region (AggregatingMergeTree with
-- simple aggregate states: read with min()/max()/sum() ... GROUP BY).
CREATE TABLE IF NOT EXISTS substance_first_seen
(
    substance_key  String,
    substance_name SimpleAggregateFunction(any, String),
    family         SimpleAggregateFunction(any, String),
    first_seen     SimpleAggregateFunction(min, DateTime64(3, 'UTC')),
    last_seen      SimpleAggregateFunction(max, DateTime64(3, 'UTC')),
    reports        SimpleAggregateFunction(sum, UInt64)
)
ENGINE = AggregatingMergeTree
ORDER BY substance_key;

CREATE TABLE IF NOT EXISTS substance_region_first_seen
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
ENGINE = AggregatingMergeTree
ORDER BY (substance_key, country, region);

CREATE MATERIALIZED VIEW IF NOT EXISTS substance_first_seen_labs_mv TO substance_first_seen AS
SELECT substance_key, any(resolved_name) AS substance_name, any(family) AS family, min(occurred_at) AS first_seen,
       max(occurred_at) AS last_seen, count() AS reports
FROM lab_detections GROUP BY substance_key;

CREATE MATERIALIZED VIEW IF NOT EXISTS substance_first_seen_seizures_mv TO substance_first_seen AS
SELECT substance_key, any(resolved_name) AS substance_name, any(family) AS family, min(occurred_at) AS first_seen,
       max(occurred_at) AS last_seen, count() AS reports
FROM border_seizures GROUP BY substance_key;

CREATE MATERIALIZED VIEW IF NOT EXISTS substance_region_first_seen_labs_mv TO substance_region_first_seen AS
SELECT substance_key, country, region, any(resolved_name) AS substance_name, any(family) AS family,
       min(occurred_at) AS first_seen, max(occurred_at) AS last_seen, count() AS reports
FROM lab_detections GROUP BY substance_key, country, region;

CREATE MATERIALIZED VIEW IF NOT EXISTS substance_region_first_seen_seizures_mv TO substance_region_first_seen AS
SELECT substance_key, country, region, any(resolved_name) AS substance_name, any(family) AS family,
       min(occurred_at) AS first_seen, max(occurred_at) AS last_seen, count() AS reports
FROM border_seizures GROUP BY substance_key, country, region;
