-- Dead-letter table of the consumer runtime: messages that cannot be parsed or whose handler
-- failed permanently, with the error. The original bytes are kept for replay.
CREATE TABLE IF NOT EXISTS eventful_dead_letters (
    id          bigserial   PRIMARY KEY,
    consumer    text        NOT NULL,
    topic       text        NOT NULL,
    "partition" integer     NOT NULL,
    "offset"    bigint      NOT NULL,
    event_id    uuid,
    event_type  text,
    key         bytea,
    payload     bytea,
    headers     jsonb       NOT NULL DEFAULT '[]',
    error       text        NOT NULL,
    failed_at   timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX IF NOT EXISTS eventful_dead_letters_position
    ON eventful_dead_letters (consumer, topic, "partition", "offset");
