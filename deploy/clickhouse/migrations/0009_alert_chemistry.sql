-- New-substance alerts say what the structure is close to (issue 16, "alerts that help the chemist"):
-- `similar_substances`: the nearest known substances by structural similarity (Morgan fingerprints, Tanimoto),
-- best first, as a JSON array of {name, key, score, family, controlled, catalogued}; '' for other alerts and
-- older ones. `family_guess`: a family guessed from the nearest neighbour when no SMARTS pattern classified the
-- structure ('' when none: never a classification). `did_you_mean`: catalogue names spelt like a name-only
-- report nothing resolved.

ALTER TABLE alerts ADD COLUMN IF NOT EXISTS similar_substances String DEFAULT '';
ALTER TABLE alerts ADD COLUMN IF NOT EXISTS family_guess LowCardinality(String) DEFAULT '';
ALTER TABLE alerts ADD COLUMN IF NOT EXISTS did_you_mean Array(String) DEFAULT [];
