-- New-substance alerts name the nearest structures the network learnt from reports (issue 16), apart from the
-- catalogue's: `learnt_substances` is a JSON object {as_of, substances: [{name, key, score, family, controlled,
-- catalogued}]}, where `as_of` is the stored-before cut the section was read at (only reports stored in
-- ClickHouse by then count); '' when not looked up (other alerts, the backtest, older alerts).

ALTER TABLE alerts ADD COLUMN IF NOT EXISTS learnt_substances String DEFAULT '';
