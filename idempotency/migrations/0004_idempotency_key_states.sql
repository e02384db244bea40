-- Idempotency-Key lifecycle (eventful 0.2): a key is never released once its handler may have
-- run. States: 'in_flight' (claimed; the request runs until locked_until), 'abandoned' (the
-- request future was dropped or panicked: outcome unknown), 'completed' (status, content type
-- and body stored, replayed until expires_at), 'not_stored' (completed, but the response was
-- too large or failed while streaming: only the status is kept).
-- An in_flight row past locked_until counts as abandoned (a crashed process). Rows written
-- before this column existed fall back to created_at plus the configured in-flight timeout.
ALTER TABLE eventful_idempotency_keys ADD COLUMN IF NOT EXISTS locked_until timestamptz;
