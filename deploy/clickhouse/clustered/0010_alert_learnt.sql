-- Clustered variant of migrations/0010_alert_learnt.sql: the same column on the `_local` table and on the
-- Distributed table over it (a Distributed table lists its columns; it does not follow the local one).

ALTER TABLE alerts_local ON CLUSTER '{cluster}' ADD COLUMN IF NOT EXISTS learnt_substances String DEFAULT '';
ALTER TABLE alerts ON CLUSTER '{cluster}' ADD COLUMN IF NOT EXISTS learnt_substances String DEFAULT '';
