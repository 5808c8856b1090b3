-- Clustered variant of migrations/0013_retraction_reporter.sql (see there): the local table (column and
-- sorting key), then the Distributed table over it (the column only: it has no sorting key).

ALTER TABLE retractions_local ON CLUSTER '{cluster}' ADD COLUMN IF NOT EXISTS reporter String,
    MODIFY ORDER BY (country, region, occurred_at, event_id, reporter);
ALTER TABLE retractions ON CLUSTER '{cluster}' ADD COLUMN IF NOT EXISTS reporter String;
