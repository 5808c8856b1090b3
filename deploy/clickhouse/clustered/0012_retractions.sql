-- Clustered variant of migrations/0012_retractions.sql. `retractions` is sharded by region like the raw
-- tables, and its views are attached to `retractions_local`, like the counting views (0003) to the raw
-- `_local` tables. A retraction lands on the shard of the original's region (its region column), where the
-- original's aggregate rows are; reads through the Distributed tables sum all shards in any case.

CREATE TABLE IF NOT EXISTS retractions_local ON CLUSTER '{cluster}'
(
    event_id          String,
    corrected         String,
    kind              LowCardinality(String),
    occurred_at       DateTime64(3, 'UTC'),
    country           LowCardinality(String),
    region            LowCardinality(String),
    substance_key     String,
    substance_name    String,
    family            LowCardinality(String),
    grams             Float64,
    retracted_at      DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/{database}/{table}', '{replica}')
PARTITION BY toYYYYMM(occurred_at)
ORDER BY (country, region, occurred_at, event_id);

CREATE TABLE IF NOT EXISTS retractions ON CLUSTER '{cluster}' AS retractions_local
ENGINE = Distributed('{cluster}', currentDatabase(), retractions_local, cityHash64(region));

ALTER TABLE reports_hourly_local ON CLUSTER '{cluster}' MODIFY COLUMN reports Int64;
ALTER TABLE reports_hourly ON CLUSTER '{cluster}' MODIFY COLUMN reports Int64;
ALTER TABLE reports_daily_local ON CLUSTER '{cluster}' MODIFY COLUMN reports Int64;
ALTER TABLE reports_daily ON CLUSTER '{cluster}' MODIFY COLUMN reports Int64;
ALTER TABLE substance_first_seen_local ON CLUSTER '{cluster}' MODIFY COLUMN reports SimpleAggregateFunction(sum, Int64);
ALTER TABLE substance_first_seen ON CLUSTER '{cluster}' MODIFY COLUMN reports SimpleAggregateFunction(sum, Int64);
ALTER TABLE substance_region_first_seen_local ON CLUSTER '{cluster}' MODIFY COLUMN reports SimpleAggregateFunction(sum, Int64);
ALTER TABLE substance_region_first_seen ON CLUSTER '{cluster}' MODIFY COLUMN reports SimpleAggregateFunction(sum, Int64);

CREATE MATERIALIZED VIEW IF NOT EXISTS reports_hourly_retractions_mv ON CLUSTER '{cluster}' TO reports_hourly_local AS
SELECT toStartOfHour(occurred_at) AS hour, country, region, kind, family, substance_key,
       any(substance_name) AS substance_name, -toInt64(count()) AS reports, -sum(grams) AS grams
FROM retractions_local GROUP BY hour, country, region, kind, family, substance_key;

CREATE MATERIALIZED VIEW IF NOT EXISTS reports_daily_retractions_mv ON CLUSTER '{cluster}' TO reports_daily_local AS
SELECT toDate(occurred_at) AS day, country, region, kind, family, substance_key,
       any(substance_name) AS substance_name, -toInt64(count()) AS reports, -sum(grams) AS grams
FROM retractions_local GROUP BY day, country, region, kind, family, substance_key;

CREATE MATERIALIZED VIEW IF NOT EXISTS substance_first_seen_retractions_mv ON CLUSTER '{cluster}' TO substance_first_seen_local AS
SELECT substance_key, any(substance_name) AS substance_name, any(family) AS family, min(occurred_at) AS first_seen,
       max(occurred_at) AS last_seen, -toInt64(count()) AS reports
FROM retractions_local GROUP BY substance_key;

CREATE MATERIALIZED VIEW IF NOT EXISTS substance_region_first_seen_retractions_mv ON CLUSTER '{cluster}' TO substance_region_first_seen_local AS
SELECT substance_key, country, region, any(substance_name) AS substance_name, any(family) AS family,
       min(occurred_at) AS first_seen, max(occurred_at) AS last_seen, -toInt64(count()) AS reports
FROM retractions_local GROUP BY substance_key, country, region;

-- Corrections stored before this migration (0011 on): their retractions, from the rows they correct, once.
-- Into the `_local` table of the node that runs the migration (an INSERT takes no ON CLUSTER): reads through the
-- Distributed tables sum every shard, and the sink's check of a retraction's id reads them all. GLOBAL IN: an
-- IN over a Distributed table inside a query on another is refused otherwise (distributed_product_mode).
INSERT INTO retractions_local (event_id, corrected, kind, occurred_at, country, region, substance_key, substance_name,
                         family, grams)
SELECT n.event_id, n.target, 'lab_detection', o.occurred_at, o.country, o.region, o.substance_key, o.resolved_name,
       o.family, 0
FROM (SELECT event_id, any(corrects) AS target FROM lab_detections WHERE corrects != '' GROUP BY event_id) AS n
INNER JOIN (
    SELECT event_id, any(occurred_at) AS occurred_at, any(country) AS country, any(region) AS region,
           any(substance_key) AS substance_key, any(resolved_name) AS resolved_name, any(family) AS family
    FROM lab_detections WHERE event_id GLOBAL IN (SELECT corrects FROM lab_detections WHERE corrects != '') GROUP BY event_id
) AS o ON o.event_id = n.target
WHERE n.event_id NOT IN (SELECT event_id FROM retractions);

INSERT INTO retractions_local (event_id, corrected, kind, occurred_at, country, region, substance_key, substance_name,
                         family, grams)
SELECT n.event_id, n.target, 'border_seizure', o.occurred_at, o.country, o.region, o.substance_key,
       o.resolved_name, o.family, o.grams
FROM (SELECT event_id, any(corrects) AS target FROM border_seizures WHERE corrects != '' GROUP BY event_id) AS n
INNER JOIN (
    SELECT event_id, any(occurred_at) AS occurred_at, any(country) AS country, any(region) AS region,
           any(substance_key) AS substance_key, any(resolved_name) AS resolved_name, any(family) AS family,
           ifNull(any(grams), 0) AS grams
    FROM border_seizures WHERE event_id GLOBAL IN (SELECT corrects FROM border_seizures WHERE corrects != '')
    GROUP BY event_id
) AS o ON o.event_id = n.target
WHERE n.event_id NOT IN (SELECT event_id FROM retractions);
