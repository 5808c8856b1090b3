-- Event ids are unique per reporter only (migration 0013, docs/detection.md): two labs may each store a report
-- under the same event_id. The raw tables are ReplacingMergeTree and their sorting key was
-- (country, region, occurred_at, event_id): two reporters' reports with the same id, place and time (a date-only
-- sample date is midnight, and LIMS numbers are alike) collapsed into one row at the next merge. One lab's raw
-- row was lost while the aggregates' views had counted both; the sink then found it missing and stored it again
-- at a replay (counted twice), and a correction of it was refused as "not stored". `reporter` (the claimed
-- reporter, `lab:ID` / `agency:NAME`, written by the sink and ingest-history) joins the sorting key, so only
-- copies of one reporter's report collapse. ClickHouse adds to a sorting key only a column added in the same ALTER
-- and without a default expression (checked on chDB: `lab_id` itself, or a column MATERIALIZED from it, is
-- refused): rows stored before read reporter '' (then event ids were unique per table, so they never collide with
-- each other, and a new reporter's row under one of their ids has another key). Readers keep using `lab_id` /
-- `agency`.

ALTER TABLE lab_detections ADD COLUMN IF NOT EXISTS reporter String,
    MODIFY ORDER BY (country, region, occurred_at, event_id, reporter);
ALTER TABLE border_seizures ADD COLUMN IF NOT EXISTS reporter String,
    MODIFY ORDER BY (country, region, occurred_at, event_id, reporter);
