-- Clustered variant of migrations/0006_late_reports.sql: the same columns on each `_local` table and on
-- the Distributed table over it (a Distributed table lists its columns; it does not follow the local one).

ALTER TABLE lab_detections_local ON CLUSTER '{cluster}' ADD COLUMN IF NOT EXISTS late Bool DEFAULT false;
ALTER TABLE lab_detections_local ON CLUSTER '{cluster}' ADD COLUMN IF NOT EXISTS report_delay_seconds Nullable(Float64)
    ALIAS dateDiff('millisecond', occurred_at, reported_at) / 1000;
ALTER TABLE lab_detections ON CLUSTER '{cluster}' ADD COLUMN IF NOT EXISTS late Bool DEFAULT false;
ALTER TABLE lab_detections ON CLUSTER '{cluster}' ADD COLUMN IF NOT EXISTS report_delay_seconds Nullable(Float64)
    ALIAS dateDiff('millisecond', occurred_at, reported_at) / 1000;

ALTER TABLE border_seizures_local ON CLUSTER '{cluster}' ADD COLUMN IF NOT EXISTS late Bool DEFAULT false;
ALTER TABLE border_seizures_local ON CLUSTER '{cluster}' ADD COLUMN IF NOT EXISTS report_delay_seconds Nullable(Float64)
    ALIAS dateDiff('millisecond', occurred_at, reported_at) / 1000;
ALTER TABLE border_seizures ON CLUSTER '{cluster}' ADD COLUMN IF NOT EXISTS late Bool DEFAULT false;
ALTER TABLE border_seizures ON CLUSTER '{cluster}' ADD COLUMN IF NOT EXISTS report_delay_seconds Nullable(Float64)
    ALIAS dateDiff('millisecond', occurred_at, reported_at) / 1000;

ALTER TABLE alerts_local ON CLUSTER '{cluster}' ADD COLUMN IF NOT EXISTS reported_late Bool DEFAULT false;
ALTER TABLE alerts_local ON CLUSTER '{cluster}' ADD COLUMN IF NOT EXISTS late_by_hours Nullable(Float64);
ALTER TABLE alerts ON CLUSTER '{cluster}' ADD COLUMN IF NOT EXISTS reported_late Bool DEFAULT false;
ALTER TABLE alerts ON CLUSTER '{cluster}' ADD COLUMN IF NOT EXISTS late_by_hours Nullable(Float64);
