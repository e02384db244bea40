-- eventful-outbox schema, version 2: the index of failing rows holds a hash of the key.
-- A btree entry must fit in about 2.7 KB, so with the key itself in the index a failing
-- event with a longer key could not be marked failed (and, before the relay marked failures
-- apart from successes, that rolled back the marks of its whole batch). `record` now
-- refuses keys over 1024 bytes, but rows written earlier or by other writers may be longer.
-- The fetch query compares md5(key) through this index, then the key itself (md5 only
-- narrows the search; it is not trusted for equality).
DROP INDEX IF EXISTS "{schema}"."{table}_failing";
CREATE INDEX IF NOT EXISTS "{table}_failing_by_key_hash" ON "{schema}"."{table}"
    (md5(key), seq)
    WHERE published_at IS NULL AND attempts > 0;
