-- Clustered variant of migrations/0004_deliveries.sql. Plain ReplicatedMergeTree (every attempt is a
-- fact; see the single-node file). Sharded by officer_id: the delivery service's "was (alert, officer,
-- channel) delivered?" is a primary-key lookup that, with a constant officer, reads one shard.

CREATE TABLE IF NOT EXISTS deliveries_local ON CLUSTER '{cluster}'
(
    alert_id      String,
    officer_id    LowCardinality(String),
    channel       LowCardinality(String),
    channel_type  LowCardinality(String),
    route         LowCardinality(String),
    attempt       UInt16,
    status        Enum8('delivered' = 1, 'failed' = 2, 'gave_up' = 3, 'queued_digest' = 4, 'digest_sent' = 5),
    reason        String DEFAULT '',
    response_code Nullable(Int32),
    target        String DEFAULT '',
    at            DateTime64(3, 'UTC'),
    duration_ms   Float64 DEFAULT 0,
    alert_type    LowCardinality(String) DEFAULT '',
    severity      LowCardinality(String) DEFAULT '',
    substance     String DEFAULT '',
    region        LowCardinality(String) DEFAULT '',
    digest_id     String DEFAULT '',
    alert_json    String DEFAULT '' CODEC(ZSTD(3)),
    INDEX idx_alert_id alert_id TYPE bloom_filter(0.001) GRANULARITY 1
)
ENGINE = ReplicatedMergeTree('/clickhouse/tables/{shard}/{database}/{table}', '{replica}')
PARTITION BY toYYYYMM(at)
ORDER BY (officer_id, alert_id, channel, at);

CREATE TABLE IF NOT EXISTS deliveries ON CLUSTER '{cluster}' AS deliveries_local
ENGINE = Distributed('{cluster}', currentDatabase(), deliveries_local, cityHash64(officer_id));
