-- A re-sent event_id with changed content is refused, not silently dropped as a duplicate (issue 13 §5).
-- The worker stores each event's content digest (SHA-256 of its canonical JSON, first 32 hex digits); a later
-- record with a stored event_id and another digest is rejected with a reason that asks for a correction under a
-- new event_id. Rows stored before this migration, and rows loaded by `ingest-history`, keep '' (unknown):
-- a re-send of those is treated as a duplicate, as before.

ALTER TABLE lab_detections ADD COLUMN IF NOT EXISTS content_hash String DEFAULT '';
ALTER TABLE border_seizures ADD COLUMN IF NOT EXISTS content_hash String DEFAULT '';
