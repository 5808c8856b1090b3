-- Alerts: one row per alert_id. Detectors give every alert a deterministic id (type, region,
-- substance, episode), and the alert sink skips ids already stored, so a replayed alerts topic adds
-- nothing; ReplacingMergeTree on a key ending in alert_id is the backstop. Sorted by time first:
-- every dashboard and `synthwatch alerts` filters on a time range.

CREATE TABLE IF NOT EXISTS alerts
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
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(triggered_at)
ORDER BY (triggered_at, alert_type, alert_id);
