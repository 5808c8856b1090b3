-- A corrected report stops counting once its correction is stored. When the worker judges a correction it has
-- the report it corrects in hand (stored, or taken since the last checkpoint); it stores what that report added
-- to the aggregates - occurrence time, place, resolved substance, family, grams - as one row of `retractions`,
-- keyed by the correction's event_id. The views below add the opposite of that contribution (-1 report, minus
-- its grams) to every summing aggregate, so `sum(reports)` counts the corrected report once, with its new values.
-- Exactly once: the sink inserts a retraction only if its correction's id is not in this table yet (as it
-- does for rows, rejects and alerts), so a checkpoint stored twice, a replayed batch, or a crash between the
-- correction's row and its retraction (the retry finds the row stored and the retraction missing) retracts
-- once. A batch without a correction writes nothing here and fires no view.
-- First and last sightings cannot be unseen: a retraction repeats the original's occurrence time, which
-- min()/max() already hold, so first_seen/last_seen stay; only `reports` goes down, and becomes signed.
-- Corrections stored before this migration (0011 on) get their retractions here, from the rows they correct.

CREATE TABLE IF NOT EXISTS retractions
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
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(occurred_at)
ORDER BY (country, region, occurred_at, event_id);

ALTER TABLE reports_hourly MODIFY COLUMN reports Int64;
ALTER TABLE reports_daily MODIFY COLUMN reports Int64;
ALTER TABLE substance_first_seen MODIFY COLUMN reports SimpleAggregateFunction(sum, Int64);
ALTER TABLE substance_region_first_seen MODIFY COLUMN reports SimpleAggregateFunction(sum, Int64);

CREATE MATERIALIZED VIEW IF NOT EXISTS reports_hourly_retractions_mv TO reports_hourly AS
SELECT toStartOfHour(occurred_at) AS hour, country, region, kind, family, substance_key,
       any(substance_name) AS substance_name, -toInt64(count()) AS reports, -sum(grams) AS grams
FROM retractions GROUP BY hour, country, region, kind, family, substance_key;

CREATE MATERIALIZED VIEW IF NOT EXISTS reports_daily_retractions_mv TO reports_daily AS
SELECT toDate(occurred_at) AS day, country, region, kind, family, substance_key,
       any(substance_name) AS substance_name, -toInt64(count()) AS reports, -sum(grams) AS grams
FROM retractions GROUP BY day, country, region, kind, family, substance_key;

CREATE MATERIALIZED VIEW IF NOT EXISTS substance_first_seen_retractions_mv TO substance_first_seen AS
SELECT substance_key, any(substance_name) AS substance_name, any(family) AS family, min(occurred_at) AS first_seen,
       max(occurred_at) AS last_seen, -toInt64(count()) AS reports
FROM retractions GROUP BY substance_key;

CREATE MATERIALIZED VIEW IF NOT EXISTS substance_region_first_seen_retractions_mv TO substance_region_first_seen AS
SELECT substance_key, country, region, any(substance_name) AS substance_name, any(family) AS family,
       min(occurred_at) AS first_seen, max(occurred_at) AS last_seen, -toInt64(count()) AS reports
FROM retractions GROUP BY substance_key, country, region;

-- Corrections stored before this migration (0011 on): their retractions, from the rows they correct, once.
INSERT INTO retractions (event_id, corrected, kind, occurred_at, country, region, substance_key, substance_name,
                         family, grams)
SELECT n.event_id, n.target, 'lab_detection', o.occurred_at, o.country, o.region, o.substance_key, o.resolved_name,
       o.family, 0
FROM (SELECT event_id, any(corrects) AS target FROM lab_detections WHERE corrects != '' GROUP BY event_id) AS n
INNER JOIN (
    SELECT event_id, any(occurred_at) AS occurred_at, any(country) AS country, any(region) AS region,
           any(substance_key) AS substance_key, any(resolved_name) AS resolved_name, any(family) AS family
    FROM lab_detections WHERE event_id IN (SELECT corrects FROM lab_detections WHERE corrects != '') GROUP BY event_id
) AS o ON o.event_id = n.target
WHERE n.event_id NOT IN (SELECT event_id FROM retractions);

INSERT INTO retractions (event_id, corrected, kind, occurred_at, country, region, substance_key, substance_name,
                         family, grams)
SELECT n.event_id, n.target, 'border_seizure', o.occurred_at, o.country, o.region, o.substance_key,
       o.resolved_name, o.family, o.grams
FROM (SELECT event_id, any(corrects) AS target FROM border_seizures WHERE corrects != '' GROUP BY event_id) AS n
INNER JOIN (
    SELECT event_id, any(occurred_at) AS occurred_at, any(country) AS country, any(region) AS region,
           any(substance_key) AS substance_key, any(resolved_name) AS resolved_name, any(family) AS family,
           ifNull(any(grams), 0) AS grams
    FROM border_seizures WHERE event_id IN (SELECT corrects FROM border_seizures WHERE corrects != '')
    GROUP BY event_id
) AS o ON o.event_id = n.target
WHERE n.event_id NOT IN (SELECT event_id FROM retractions);
