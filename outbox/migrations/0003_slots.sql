-- eventful-outbox schema, version 3: the outbox becomes two slot partitions that the relay
-- rotates with TRUNCATE.
--
-- Why: publishing UPDATEs a row and retention DELETEs it. While any session holds the xmin
-- horizon (a long report, a replication slot, a forgotten BEGIN), PostgreSQL can remove
-- none of those dead row versions, so the table and its indexes grew without bound and the
-- relay's scan of pending rows slowed down with every dead index entry it had to step over.
-- TRUNCATE removes a whole slot at once whatever the horizon. New events go to the current
-- slot; when it has taken enough events, a relay empties the other slot (carrying its few
-- unpublished rows, e.g. parked ones, over to the current slot with their seq unchanged) and
-- makes it current. So published rows and their dead versions stay bounded by two slots.
--
-- The rows are copied into the new table (an existing outbox keeps its pending events and
-- its seq order); the id stays unique per slot (a partitioned table cannot have a unique
-- index without its partition column).

CREATE TABLE "{schema}"."{table}_slotted" (
    seq             BIGINT NOT NULL,
    id              UUID NOT NULL,
    topic           TEXT NOT NULL,
    key             TEXT NOT NULL,
    partition       INT NOT NULL,
    event_type      TEXT NOT NULL,
    payload         BYTEA NOT NULL,
    content_type    TEXT NOT NULL,
    headers         JSONB NOT NULL DEFAULT '[]',
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    published_at    TIMESTAMPTZ,
    attempts        INT NOT NULL DEFAULT 0,
    last_error      TEXT,
    next_attempt_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    parked_at       TIMESTAMPTZ,
    -- Which of the two slots (0 or 1) the row lives in.
    slot            SMALLINT NOT NULL
) PARTITION BY LIST (slot);

CREATE TABLE "{schema}"."{table}_slot0" PARTITION OF "{schema}"."{table}_slotted" FOR VALUES IN (0);
CREATE TABLE "{schema}"."{table}_slot1" PARTITION OF "{schema}"."{table}_slotted" FOR VALUES IN (1);

INSERT INTO "{schema}"."{table}_slotted"
    (seq, id, topic, key, partition, event_type, payload, content_type, headers, created_at,
     published_at, attempts, last_error, next_attempt_at, parked_at, slot)
SELECT seq, id, topic, key, partition, event_type, payload, content_type, headers, created_at,
       published_at, attempts, last_error, next_attempt_at, parked_at, 0
FROM "{schema}"."{table}";

-- Keep the seq sequence (and its position) for the new table.
ALTER TABLE "{schema}"."{table}_slotted"
    ALTER COLUMN seq SET DEFAULT nextval('"{schema}"."{table}_seq_seq"');
ALTER SEQUENCE "{schema}"."{table}_seq_seq" OWNED BY "{schema}"."{table}_slotted".seq;
DROP TABLE "{schema}"."{table}";
ALTER TABLE "{schema}"."{table}_slotted" RENAME TO "{table}";

ALTER TABLE "{schema}"."{table}" ADD CONSTRAINT "{table}_pkey" PRIMARY KEY (seq, slot);
CREATE UNIQUE INDEX "{table}_id" ON "{schema}"."{table}" (id, slot);
CREATE INDEX "{table}_pending" ON "{schema}"."{table}" (seq)
    WHERE published_at IS NULL;
CREATE INDEX "{table}_failing_by_key_hash" ON "{schema}"."{table}" (md5(key), seq)
    WHERE published_at IS NULL AND attempts > 0;
CREATE INDEX "{table}_published" ON "{schema}"."{table}" (published_at)
    WHERE published_at IS NOT NULL;

-- The slot new events go to, and the seq at which it became current (a relay rotates when
-- the sequence has moved far enough past it).
CREATE TABLE "{schema}"."{table}_slot" (
    one          BOOLEAN PRIMARY KEY DEFAULT true CHECK (one),
    current      SMALLINT NOT NULL CHECK (current IN (0, 1)),
    since_seq    BIGINT NOT NULL,
    rotated_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    rotations    BIGINT NOT NULL DEFAULT 0
);
INSERT INTO "{schema}"."{table}_slot" (current, since_seq)
    SELECT 0, coalesce(max(seq), 0) FROM "{schema}"."{table}";

-- Rows inserted by other writers (without a slot) go to the current slot too.
CREATE FUNCTION "{schema}"."{table}_current_slot"() RETURNS SMALLINT
    LANGUAGE sql STABLE AS 'SELECT current FROM "{schema}"."{table}_slot"';
ALTER TABLE "{schema}"."{table}"
    ALTER COLUMN slot SET DEFAULT "{schema}"."{table}_current_slot"();
