-- eventful-saga, version 1: saga instances and their transition history. Applied once by
-- `eventful_saga::migrate` (the shared versioned migrator); never edit an applied version.

CREATE TABLE IF NOT EXISTS eventful_saga_instances (
    id            UUID        PRIMARY KEY,
    saga_type     TEXT        NOT NULL,
    -- running | compensating | completed | compensated
    status        TEXT        NOT NULL,
    -- Running: the step whose action is in flight; Compensating: the step whose
    -- compensation is in flight; terminal: the last step that was current.
    current_step  INTEGER     NOT NULL,
    data          JSONB       NOT NULL,
    -- Optimistic concurrency: every transition is `UPDATE ... WHERE version = $seen`.
    version       BIGINT      NOT NULL DEFAULT 0,
    -- When the in-flight command times out (action) or is re-sent (compensation).
    step_deadline TIMESTAMPTZ,
    -- How many times the in-flight command has been sent.
    attempts      INTEGER     NOT NULL DEFAULT 1,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- The timeout scanner's work list: in-flight sagas by deadline.
CREATE INDEX IF NOT EXISTS eventful_saga_instances_deadline
    ON eventful_saga_instances (step_deadline)
    WHERE status IN ('running', 'compensating');

CREATE TABLE IF NOT EXISTS eventful_saga_history (
    seq              BIGSERIAL   PRIMARY KEY,
    saga_id          UUID        NOT NULL REFERENCES eventful_saga_instances (id) ON DELETE CASCADE,
    -- started | step_succeeded | step_failed | step_timed_out |
    -- compensation_succeeded | compensation_failed | compensation_resent
    transition       TEXT        NOT NULL,
    step             INTEGER     NOT NULL,
    from_status      TEXT,
    to_status        TEXT        NOT NULL,
    -- The reply event that caused the transition (NULL for start and timeouts).
    caused_by        UUID,
    -- The command recorded in the outbox by this transition, if any.
    emitted_event_id UUID,
    reason           TEXT,
    at               TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp()
);

CREATE INDEX IF NOT EXISTS eventful_saga_history_saga ON eventful_saga_history (saga_id, seq);
