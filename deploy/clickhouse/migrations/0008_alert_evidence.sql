-- Alerts say how the substance was identified and who reported it (issue 14, truthful evidence). A name-only
-- report of a catalogued drug used to read "identified by structure" because the catalogue fills in the
-- InChIKey; `identified_by` now carries the resolver's own answer for the report that raised the alert:
-- 'structure' (SMILES or InChIKey reported by the lab), 'catalogue_name', 'learnt_name' (a synonym learnt
-- from earlier reports with a structure) or 'unresolved_name'; '' for family series and older alerts.
-- `reported_by` lists the labs (lab_id) and agencies whose report raised the alert.

ALTER TABLE alerts ADD COLUMN IF NOT EXISTS identified_by LowCardinality(String) DEFAULT '';
ALTER TABLE alerts ADD COLUMN IF NOT EXISTS reported_by Array(String) DEFAULT [];
