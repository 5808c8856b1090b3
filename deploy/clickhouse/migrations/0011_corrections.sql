-- A lab or agency corrects a report (a misidentified substance, a mistyped quantity) by sending a new report
-- whose `corrects` names the old event_id: the old row stays as it was (a report is never overwritten) and the
-- link is this column of the new row. A report is corrected when some row of its table has `corrects` = its
-- event_id; '' for every report that corrects nothing (all rows stored before this migration).

ALTER TABLE lab_detections ADD COLUMN IF NOT EXISTS corrects String DEFAULT '';
ALTER TABLE border_seizures ADD COLUMN IF NOT EXISTS corrects String DEFAULT '';
