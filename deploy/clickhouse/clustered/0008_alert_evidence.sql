-- Clustered variant of migrations/0007_alert_evidence.sql: the same columns on the `_local` table and on
-- the Distributed table over it (a Distributed table lists its columns; it does not follow the local one).

ALTER TABLE alerts_local ON CLUSTER '{cluster}' ADD COLUMN IF NOT EXISTS identified_by LowCardinality(String) DEFAULT '';
ALTER TABLE alerts_local ON CLUSTER '{cluster}' ADD COLUMN IF NOT EXISTS reported_by Array(String) DEFAULT [];
ALTER TABLE alerts ON CLUSTER '{cluster}' ADD COLUMN IF NOT EXISTS identified_by LowCardinality(String) DEFAULT '';
ALTER TABLE alerts ON CLUSTER '{cluster}' ADD COLUMN IF NOT EXISTS reported_by Array(String) DEFAULT [];
