CREATE TABLE IF NOT EXISTS notifications (
    id         UUID PRIMARY KEY,
    -- The event that caused it: one notification per customer-visible event.
    event_id   UUID        NOT NULL UNIQUE,
    order_id   UUID        NOT NULL,
    user_id    UUID        NOT NULL,
    kind       TEXT        NOT NULL,
    message    TEXT        NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS notifications_by_order ON notifications (order_id, created_at);
CREATE INDEX IF NOT EXISTS notifications_by_user ON notifications (user_id, created_at);
