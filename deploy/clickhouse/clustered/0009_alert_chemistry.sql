-- Clustered variant of migrations/0009_alert_chemistry.sql: the same columns on the `_local` table and on
-- the Distributed table over it (a Distributed table lists its columns; it does not follow the local one).

ALTER TABLE alerts_local ON CLUSTER '{cluster}' ADD COLUMN IF NOT EXISTS similar_substances String DEFAULT '';
ALTER TABLE alerts_local ON CLUSTER '{cluster}' ADD COLUMN IF NOT EXISTS family_guess LowCardinality(String) DEFAULT '';
ALTER TABLE alerts_local ON CLUSTER '{cluster}' ADD COLUMN IF NOT EXISTS did_you_mean Array(String) DEFAULT [];
ALTER TABLE alerts ON CLUSTER '{cluster}' ADD COLUMN IF NOT EXISTS similar_substances String DEFAULT '';
ALTER TABLE alerts ON CLUSTER '{cluster}' ADD COLUMN IF NOT EXISTS family_guess LowCardinality(String) DEFAULT '';
ALTER TABLE alerts ON CLUSTER '{cluster}' ADD COLUMN IF NOT EXISTS did_you_mean Array(String) DEFAULT [];
