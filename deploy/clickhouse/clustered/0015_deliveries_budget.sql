-- See migrations/0015_deliveries_budget.sql: each delivery row names the alert's reporters and the day its
-- immediate budget counts on. The Distributed table keeps its own copy of the columns, so both are altered.

ALTER TABLE deliveries_local ON CLUSTER '{cluster}' ADD COLUMN IF NOT EXISTS reported_by Array(String) DEFAULT [];
ALTER TABLE deliveries ON CLUSTER '{cluster}' ADD COLUMN IF NOT EXISTS reported_by Array(String) DEFAULT [];
ALTER TABLE deliveries_local ON CLUSTER '{cluster}' ADD COLUMN IF NOT EXISTS budget_day Date DEFAULT toDate(0);
ALTER TABLE deliveries ON CLUSTER '{cluster}' ADD COLUMN IF NOT EXISTS budget_day Date DEFAULT toDate(0);
