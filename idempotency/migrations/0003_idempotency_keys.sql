-- HTTP Idempotency-Key records: one per (scope, key); scope = route + caller.
CREATE TABLE IF NOT EXISTS eventful_idempotency_keys (
    scope        text        NOT NULL,
    key          text        NOT NULL,
    request_hash text        NOT NULL,
    -- Identifies the request that claimed the key; only it may complete or release it.
    token        uuid        NOT NULL,
    -- 'in_flight' while the first request runs, 'completed' once its response is stored.
    state        text        NOT NULL,
    status       smallint,
    content_type text,
    body         bytea,
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL,
    PRIMARY KEY (scope, key)
);
CREATE INDEX IF NOT EXISTS eventful_idempotency_keys_expiry
    ON eventful_idempotency_keys (expires_at);
