-- Alert deliveries to liaison officers: one row per attempt (and per alert queued for or sent in a digest).
--
-- Plain MergeTree, not Replacing: every attempt is a fact to keep (the audit of who was told what, when,
-- and why not), never a newer version of another row. No TTL for the same reason.
-- ORDER BY (officer_id, alert_id, channel, at) serves the two questions asked of this table:
--   "was (alert, officer, channel) delivered?"  -> a primary-key lookup on the prefix
--     (officer_id, alert_id, channel); the delivery service asks it before every send, including for
--     every alert of a replayed topic, so it must stay a point lookup however long the table grows;
--   "recent attempts of officer X"              -> one contiguous range of the officer's rows, sorted
--     by `at` (a few thousand rows at most: alerts are rare), and within it one alert's attempts in order.
-- The bloom filter on alert_id answers "who got alert A?" without knowing the officer.
-- Monthly partitions keep parts few; lookups by key probe each month's (tiny) primary index.

CREATE TABLE IF NOT EXISTS deliveries
(
    alert_id      String,
    officer_id    LowCardinality(String),
    channel       LowCardinality(String),
    channel_type  LowCardinality(String),
    route         LowCardinality(String),
    attempt       UInt16,
    status        Enum8('delivered' = 1, 'failed' = 2, 'gave_up' = 3, 'queued_digest' = 4, 'digest_sent' = 5),
    reason        String DEFAULT '',
    -- HTTP status or SMTP reply code; NULL when no answer came (refused connection, timeout)
    response_code Nullable(Int32),
    target        String DEFAULT '',
    at            DateTime64(3, 'UTC'),
    duration_ms   Float64 DEFAULT 0,
    alert_type    LowCardinality(String) DEFAULT '',
    severity      LowCardinality(String) DEFAULT '',
    substance     String DEFAULT '',
    region        LowCardinality(String) DEFAULT '',
    -- which digest message carried the alert (digest rows), and the alert itself on queued_digest rows:
    -- the digest is written from it, so it does not depend on the alerts table being written first
    digest_id     String DEFAULT '',
    alert_json    String DEFAULT '' CODEC(ZSTD(3)),
    INDEX idx_alert_id alert_id TYPE bloom_filter(0.001) GRANULARITY 1
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(at)
ORDER BY (officer_id, alert_id, channel, at);
