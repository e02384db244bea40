CREATE TABLE IF NOT EXISTS orders (
    id           UUID PRIMARY KEY,
    user_id      UUID        NOT NULL,
    total_amount BIGINT      NOT NULL CHECK (total_amount > 0),
    items        JSONB       NOT NULL,
    status       TEXT        NOT NULL,
    -- Optimistic locking: every transition is `UPDATE … WHERE version = $seen`.
    version      BIGINT      NOT NULL DEFAULT 1,
    expires_at   TIMESTAMPTZ NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS orders_reserved_by_expiry ON orders (expires_at) WHERE status = 'ORDER_RESERVED';

CREATE TABLE IF NOT EXISTS order_history (
    order_id    UUID        NOT NULL REFERENCES orders (id),
    version     BIGINT      NOT NULL,
    from_status TEXT,
    to_status   TEXT        NOT NULL,
    reason      TEXT        NOT NULL,
    at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (order_id, version)
);
