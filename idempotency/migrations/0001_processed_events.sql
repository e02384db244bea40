-- Processed-event guard: one row per (consumer, event id), written in the handler's transaction.
CREATE TABLE IF NOT EXISTS eventful_processed_events (
    consumer     text        NOT NULL,
    event_id     uuid        NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now(),
    result       jsonb,
    PRIMARY KEY (consumer, event_id)
);
-- Retention deletes the oldest rows of one consumer in bounded batches.
CREATE INDEX IF NOT EXISTS eventful_processed_events_age
    ON eventful_processed_events (consumer, processed_at);
