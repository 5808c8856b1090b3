-- A delivery whose endpoint's circuit breaker is open waits instead of being attempted: that wait is a fact
-- to keep ("why did the officer get it 10 minutes late?"), recorded as a 'deferred' row (not final: the
-- delivery goes on once the endpoint answers again). Adding an Enum value at the end is a metadata change.
ALTER TABLE deliveries
    MODIFY COLUMN status Enum8('delivered' = 1, 'failed' = 2, 'gave_up' = 3, 'queued_digest' = 4, 'digest_sent' = 5,
                               'deferred' = 6);
