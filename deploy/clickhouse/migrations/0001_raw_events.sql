-- Raw input events and rejects: every report kept, deduplicated on event_id.
--
-- Engines: ReplacingMergeTree so that an identical re-sent event collapses on merge even if it
-- slipped past the sink's pre-insert check (the sink filters ids already stored, so counts are right
-- without FINAL). The sorting key starts with what analysts filter on (country, region, time) and ends
-- with event_id, which makes the dedup key; a bloom filter on event_id keeps the sink's lookup cheap.
-- Monthly partitions: a year is 12 parts per table, old months can be moved or dropped whole.

CREATE TABLE IF NOT EXISTS lab_detections
(
    event_id            String,
    occurred_at         DateTime64(3, 'UTC'),
    reported_at         Nullable(DateTime64(3, 'UTC')),
    ingested_at         DateTime64(3, 'UTC') DEFAULT now64(3),
    country             LowCardinality(String),
    region              LowCardinality(String),
    substance_name      String,
    substance_smiles    Nullable(String),
    substance_inchikey  Nullable(String),
    substance_cas       Nullable(String),
    substance_key       String DEFAULT '',
    resolved_name       String DEFAULT '',
    resolved_inchikey   Nullable(String),
    family              LowCardinality(String) DEFAULT '',
    lab_id              LowCardinality(String),
    sample_id           String,
    sample_type         LowCardinality(String),
    method              LowCardinality(String),
    confirmed           Bool,
    purity_pct          Nullable(Float32),
    extra               String DEFAULT '{}',
    INDEX idx_event_id event_id TYPE bloom_filter(0.001) GRANULARITY 1,
    INDEX idx_substance substance_key TYPE bloom_filter(0.01) GRANULARITY 4
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(occurred_at)
ORDER BY (country, region, occurred_at, event_id);

CREATE TABLE IF NOT EXISTS border_seizures
(
    event_id            String,
    occurred_at         DateTime64(3, 'UTC'),
    reported_at         Nullable(DateTime64(3, 'UTC')),
    ingested_at         DateTime64(3, 'UTC') DEFAULT now64(3),
    country             LowCardinality(String),
    region              LowCardinality(String),
    substance_name      String,
    substance_smiles    Nullable(String),
    substance_inchikey  Nullable(String),
    substance_cas       Nullable(String),
    substance_key       String DEFAULT '',
    resolved_name       String DEFAULT '',
    resolved_inchikey   Nullable(String),
    family              LowCardinality(String) DEFAULT '',
    agency              LowCardinality(String),
    seizure_id          String,
    border_point        String,
    conveyance          LowCardinality(String),
    quantity_value      Float64,
    quantity_unit       LowCardinality(String),
    grams               Nullable(Float64),
    millilitres         Nullable(Float64),
    units               Nullable(Float64),
    origin_country      LowCardinality(String) DEFAULT '',
    destination_country LowCardinality(String) DEFAULT '',
    extra               String DEFAULT '{}',
    INDEX idx_event_id event_id TYPE bloom_filter(0.001) GRANULARITY 1,
    INDEX idx_substance substance_key TYPE bloom_filter(0.01) GRANULARITY 4
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(occurred_at)
ORDER BY (country, region, occurred_at, event_id);

-- Rejects: reject_id hashes stage, source and raw text, so re-reading the same rejects topic
-- (a replay) stores nothing twice. Kept two years: long enough to audit a source, short enough
-- that garbage does not accumulate for ever.
CREATE TABLE IF NOT EXISTS rejects
(
    reject_id    String,
    rejected_at  DateTime64(3, 'UTC'),
    stage        LowCardinality(String),
    source       String,
    reason       String,
    event_id     Nullable(String),
    raw          String CODEC(ZSTD(3))
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(rejected_at)
ORDER BY (stage, rejected_at, reject_id)
TTL toDateTime(rejected_at) + INTERVAL 2 YEAR;
