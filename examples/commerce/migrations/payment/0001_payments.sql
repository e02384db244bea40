CREATE TABLE IF NOT EXISTS payments (
    -- One payment per order, enforced by the key.
    order_id   UUID PRIMARY KEY,
    id         UUID        NOT NULL UNIQUE,
    user_id    UUID        NOT NULL,
    amount     BIGINT      NOT NULL,
    status     TEXT        NOT NULL,
    reason     TEXT,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
