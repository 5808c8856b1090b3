-- Late reports are stored, not refused (issue 11 §3). A report is late when it occurred more than
-- SYNTHWATCH_LATENESS_HOURS before the newest report of its kind already received from its region: the
-- worker stores it with `late` true (it counts in the daily aggregates of its own day, which aggregate by
-- occurred_at, and is left out of the spike series). `ingest-history` leaves `late` at its default.
-- report_delay_seconds is computed on read (ALIAS): reported_at minus occurred_at, NULL when the source
-- gave no reported_at. Alerts say whether a late report raised them, and how late it was.

ALTER TABLE lab_detections ADD COLUMN IF NOT EXISTS late Bool DEFAULT false;
ALTER TABLE lab_detections ADD COLUMN IF NOT EXISTS report_delay_seconds Nullable(Float64)
    ALIAS dateDiff('millisecond', occurred_at, reported_at) / 1000;

ALTER TABLE border_seizures ADD COLUMN IF NOT EXISTS late Bool DEFAULT false;
ALTER TABLE border_seizures ADD COLUMN IF NOT EXISTS report_delay_seconds Nullable(Float64)
    ALIAS dateDiff('millisecond', occurred_at, reported_at) / 1000;

ALTER TABLE alerts ADD COLUMN IF NOT EXISTS reported_late Bool DEFAULT false;
ALTER TABLE alerts ADD COLUMN IF NOT EXISTS late_by_hours Nullable(Float64);
