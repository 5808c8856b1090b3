-- Clustered variant of migrations/0011_corrections.sql: the column on each `_local` table and on the
-- Distributed table over it (a Distributed table lists its columns; it does not follow the local one).

ALTER TABLE lab_detections_local ON CLUSTER '{cluster}' ADD COLUMN IF NOT EXISTS corrects String DEFAULT '';
ALTER TABLE lab_detections ON CLUSTER '{cluster}' ADD COLUMN IF NOT EXISTS corrects String DEFAULT '';

ALTER TABLE border_seizures_local ON CLUSTER '{cluster}' ADD COLUMN IF NOT EXISTS corrects String DEFAULT '';
ALTER TABLE border_seizures ON CLUSTER '{cluster}' ADD COLUMN IF NOT EXISTS corrects String DEFAULT '';
