-- Clustered variant of migrations/0014_report_reporter.sql (see there): each local table (column and sorting
-- key), then the Distributed table over it (the column only: it has no sorting key).

ALTER TABLE lab_detections_local ON CLUSTER '{cluster}' ADD COLUMN IF NOT EXISTS reporter String,
    MODIFY ORDER BY (country, region, occurred_at, event_id, reporter);
ALTER TABLE lab_detections ON CLUSTER '{cluster}' ADD COLUMN IF NOT EXISTS reporter String;
ALTER TABLE border_seizures_local ON CLUSTER '{cluster}' ADD COLUMN IF NOT EXISTS reporter String,
    MODIFY ORDER BY (country, region, occurred_at, event_id, reporter);
ALTER TABLE border_seizures ON CLUSTER '{cluster}' ADD COLUMN IF NOT EXISTS reporter String;
