-- Clustered variant of migrations/0002_alerts.sql. Alerts are sharded by alert_id: a re-sent alert
-- reaches the shard that holds it, where the Replacing backstop can collapse it (alerts are rare:
-- where they live matters for dedup only, never for speed).

CREATE TABLE IF NOT EXISTS alerts_local ON CLUSTER '{cluster}'
(
    alert_id               String,
    alert_type             LowCardinality(String),
    severity               LowCardinality(String),
    country                LowCardinality(String),
    region                 LowCardinality(String),
    substance_key          String,
    substance_name         String,
    substance_inchikey     Nullable(String),
    family                 LowCardinality(String),
    controlled             Nullable(Bool),
    metric                 LowCardinality(String),
    observed               Nullable(Float64),
    expected               Nullable(Float64),
    score                  Nullable(Float64),
    window_start           DateTime64(3, 'UTC'),
    window_end             DateTime64(3, 'UTC'),
    triggered_at           DateTime64(3, 'UTC'),
    detected_at            DateTime64(3, 'UTC'),
    stored_at              DateTime64(3, 'UTC') DEFAULT now64(3),
    evidence_event_ids     Array(String),
    summary                String,
    identification_methods Array(LowCardinality(String)),
    sample_types           Array(LowCardinality(String)),
    details                String DEFAULT '{}',
    INDEX idx_alert_id alert_id TYPE bloom_filter(0.001) GRANULARITY 1
)
ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/{database}/{table}', '{replica}')
PARTITION BY toYYYYMM(triggered_at)
ORDER BY (triggered_at, alert_type, alert_id);

CREATE TABLE IF NOT EXISTS alerts ON CLUSTER '{cluster}' AS alerts_local
ENGINE = Distributed('{cluster}', currentDatabase(), alerts_local, cityHash64(alert_id));
