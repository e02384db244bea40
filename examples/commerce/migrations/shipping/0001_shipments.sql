CREATE TABLE IF NOT EXISTS shipments (
    -- One shipment per order, enforced by the key.
    order_id   UUID PRIMARY KEY,
    id         UUID        NOT NULL UNIQUE,
    user_id    UUID        NOT NULL,
    status     TEXT        NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
