-- Clustered variant of migrations/0001_raw_events.sql: same columns, same keys, same TTL.
--
-- Layout: every table exists twice. `<name>_local` holds this shard's rows, replicated within the
-- shard through Keeper (Replicated*MergeTree; path and replica from the server's {shard}/{replica}
-- macros). `<name>` is a Distributed table over the `_local` tables of cluster {cluster}: the sink,
-- the backfill and every query use these single-node names, so no application code changes.
-- Raw tables are sharded by a hash of region: one region's reports live on one shard, so a region's
-- dashboards and the per-region materialized views read one shard, and an event_id (whose region
-- never changes) always lands on the same shard, where the Replacing backstop can collapse it.
-- Apply with `synthwatch db migrate --clustered` after `CREATE DATABASE ... ON CLUSTER '{cluster}'`.

CREATE TABLE IF NOT EXISTS lab_detections_local ON CLUSTER '{cluster}'
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
ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/{database}/{table}', '{replica}')
PARTITION BY toYYYYMM(occurred_at)
ORDER BY (country, region, occurred_at, event_id);

CREATE TABLE IF NOT EXISTS lab_detections ON CLUSTER '{cluster}' AS lab_detections_local
ENGINE = Distributed('{cluster}', currentDatabase(), lab_detections_local, cityHash64(region));

CREATE TABLE IF NOT EXISTS border_seizures_local ON CLUSTER '{cluster}'
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
ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/{database}/{table}', '{replica}')
PARTITION BY toYYYYMM(occurred_at)
ORDER BY (country, region, occurred_at, event_id);

CREATE TABLE IF NOT EXISTS border_seizures ON CLUSTER '{cluster}' AS border_seizures_local
ENGINE = Distributed('{cluster}', currentDatabase(), border_seizures_local, cityHash64(region));

-- Rejects are sharded by reject_id: the same refused input always reaches the same shard, so the
-- Replacing backstop can collapse a re-sent one.
CREATE TABLE IF NOT EXISTS rejects_local ON CLUSTER '{cluster}'
(
    reject_id    String,
    rejected_at  DateTime64(3, 'UTC'),
    stage        LowCardinality(String),
    source       String,
    reason       String,
    event_id     Nullable(String),
    raw          String CODEC(ZSTD(3))
)
ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/{database}/{table}', '{replica}')
PARTITION BY toYYYYMM(rejected_at)
ORDER BY (stage, rejected_at, reject_id)
TTL toDateTime(rejected_at) + INTERVAL 2 YEAR;

CREATE TABLE IF NOT EXISTS rejects ON CLUSTER '{cluster}' AS rejects_local
ENGINE = Distributed('{cluster}', currentDatabase(), rejects_local, cityHash64(reject_id));
