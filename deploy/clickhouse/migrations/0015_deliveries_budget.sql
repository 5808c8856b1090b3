-- The immediate budget (docs/security.md, "Immediate budget"): an officer gets at most N first-sighting alerts a day at
-- once from one reporter, the rest in the daily digest. Counting an officer's immediate alerts per reporter and day
-- must survive a restart, so each delivery row names the alert's reporters (the alert's `reported_by`: lab ids and
-- agencies) and the day its budget counts on (the officer's local day of the alert's `detected_at`: the worker's
-- clock, not the report's). Rows stored before read [] and 1970-01-01: they count against nobody.

ALTER TABLE deliveries
    ADD COLUMN IF NOT EXISTS reported_by Array(String) DEFAULT [],
    ADD COLUMN IF NOT EXISTS budget_day Date DEFAULT toDate(0);
