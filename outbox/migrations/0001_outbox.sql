-- eventful-outbox schema, version 1.
-- Placeholders: {schema}, {table}, {partitions}. Applied once by Outbox::migrate (the shared
-- versioned migrator, component eventful-outbox/{schema}.{table}); never edit it: add a version.

CREATE SCHEMA IF NOT EXISTS "{schema}";

CREATE TABLE IF NOT EXISTS "{schema}"."{table}" (
    seq             BIGSERIAL PRIMARY KEY,
    id              UUID NOT NULL UNIQUE,
    topic           TEXT NOT NULL,
    key             TEXT NOT NULL,
    -- Key-hash partition (0 .. {partitions}-1): the unit of relay ownership (leases).
    partition       INT NOT NULL,
    event_type      TEXT NOT NULL,
    payload         BYTEA NOT NULL,
    content_type    TEXT NOT NULL,
    -- User headers as a JSON array of [name, value] pairs (order kept).
    headers         JSONB NOT NULL DEFAULT '[]',
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    published_at    TIMESTAMPTZ,
    attempts        INT NOT NULL DEFAULT 0,
    last_error      TEXT,
    next_attempt_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    parked_at       TIMESTAMPTZ
);

-- Pending rows in seq order: what the relay scans.
CREATE INDEX IF NOT EXISTS "{table}_pending" ON "{schema}"."{table}" (seq)
    WHERE published_at IS NULL;
-- Pending rows that failed at least once: the (small) set that can block a key.
CREATE INDEX IF NOT EXISTS "{table}_failing" ON "{schema}"."{table}" (key, seq)
    WHERE published_at IS NULL AND attempts > 0;
-- Published rows by age: what retention deletes.
CREATE INDEX IF NOT EXISTS "{table}_published" ON "{schema}"."{table}" (published_at)
    WHERE published_at IS NOT NULL;

-- One lease per partition. `epoch` grows on every change of owner.
CREATE TABLE IF NOT EXISTS "{schema}"."{table}_leases" (
    partition  INT PRIMARY KEY,
    owner      UUID,
    epoch      BIGINT NOT NULL DEFAULT 0,
    expires_at TIMESTAMPTZ
);
INSERT INTO "{schema}"."{table}_leases" (partition)
    SELECT generate_series(0, {partitions} - 1)
    ON CONFLICT (partition) DO NOTHING;

-- Live relays (heartbeats), to split partitions fairly.
CREATE TABLE IF NOT EXISTS "{schema}"."{table}_relays" (
    relay_id     UUID PRIMARY KEY,
    started_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    heartbeat_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
