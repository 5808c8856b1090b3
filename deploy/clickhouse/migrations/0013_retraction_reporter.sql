-- Event ids are unique per reporter only (a lab's LIMS numbers its own samples): two reporters may send
-- corrections under the same event_id, and each takes its own report out of the counts. A retraction is
-- therefore one per (reporter, correction id): `reporter` is the correction's claimed reporter, `lab:ID` or
-- `agency:NAME`, and part of the sorting key, so ReplacingMergeTree never merges two reporters' retractions
-- of the same id, place and time into one (the sink would then find one missing and retract it again).
-- A column added to the sorting key may have no default expression (ClickHouse refuses it): retractions stored
-- before this migration read reporter '' (the type's default), reporter unknown. The sink takes such a row as
-- the retraction of the correction under its id of the same kind that corrects the same report id, so a retry
-- of a correction stored before the upgrade never retracts twice. The retraction views (0012) read no
-- reporter: they subtract as before.

ALTER TABLE retractions ADD COLUMN IF NOT EXISTS reporter String,
    MODIFY ORDER BY (country, region, occurred_at, event_id, reporter);
