-- See migrations/0005_deliveries_deferred.sql: 'deferred' rows for deliveries waiting on an open circuit.
-- The Distributed table keeps its own copy of the column types, so both are altered.
ALTER TABLE deliveries_local ON CLUSTER '{cluster}'
    MODIFY COLUMN status Enum8('delivered' = 1, 'failed' = 2, 'gave_up' = 3, 'queued_digest' = 4, 'digest_sent' = 5,
                               'deferred' = 6);
ALTER TABLE deliveries ON CLUSTER '{cluster}'
    MODIFY COLUMN status Enum8('delivered' = 1, 'failed' = 2, 'gave_up' = 3, 'queued_digest' = 4, 'digest_sent' = 5,
                               'deferred' = 6);
