-- Arnela event store: the immutable event log, the current-state projection and the outbox.
--
-- Global order. `task_events.position` is `(top-level transaction id << 20) + n`, where `n`
-- counts the events one transaction appends (at most 2^20). Positions are unique, grow within a
-- transaction in append order, and order transactions by their id. A reader of the global log only
-- returns positions below `pg_snapshot_xmin(pg_current_snapshot()) << 20`: every transaction with a
-- smaller id has finished, and every transaction still running or still to come has an id at least
-- as large, so a reader that pages by position never skips an event that commits late.

CREATE TABLE tasks (
    id               uuid        PRIMARY KEY,
    task_type        text        NOT NULL,
    payload          jsonb       NOT NULL,
    status           text        NOT NULL,
    attempts         integer     NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    max_attempts     integer     NOT NULL CHECK (max_attempts BETWEEN 1 AND 100),
    run_at           timestamptz NOT NULL,
    idempotency_key  text        UNIQUE,
    last_error       text,
    -- sequence number of the last event applied (optimistic concurrency for appends)
    version          integer     NOT NULL CHECK (version >= 1),
    -- hash of the last event, the link the next event of this task chains to
    last_hash        bytea       NOT NULL,
    -- global position of the task's first event: the commit-safe cursor of GET /tasks
    enqueued_position bigint     NOT NULL,
    -- the worker holding the current attempt and until when (set while status = 'running')
    lease_owner      uuid,
    lease_expires_at timestamptz,
    created_at       timestamptz NOT NULL,
    updated_at       timestamptz NOT NULL
);

CREATE UNIQUE INDEX tasks_enqueued_position_idx ON tasks (enqueued_position);
CREATE INDEX tasks_type_position_idx ON tasks (task_type, enqueued_position);
CREATE INDEX tasks_status_position_idx ON tasks (status, enqueued_position);
CREATE INDEX tasks_created_at_idx ON tasks (created_at);

CREATE TABLE task_events (
    position      bigint      PRIMARY KEY,
    task_id       uuid        NOT NULL,
    sequence      integer     NOT NULL CHECK (sequence >= 1),
    event_type    text        NOT NULL,
    event_version smallint    NOT NULL,
    data          jsonb       NOT NULL,
    occurred_at   timestamptz NOT NULL,
    recorded_at   timestamptz NOT NULL DEFAULT now(),
    prev_hash     bytea,
    hash          bytea       NOT NULL,
    UNIQUE (task_id, sequence)
);

-- The log is append-only: updates and deletes are refused at the database level, so only someone
-- who disables the trigger (an owner) can rewrite history, and `arnela audit verify` catches that.
CREATE FUNCTION task_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'task_events is append-only (% refused)', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$;

CREATE TRIGGER task_events_append_only
    BEFORE UPDATE OR DELETE ON task_events
    FOR EACH ROW EXECUTE FUNCTION task_events_append_only();

CREATE TABLE outbox (
    id           bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    task_id      uuid        NOT NULL REFERENCES tasks (id),
    -- the attempt this delivery is for (attempts already made + 1)
    attempt      integer     NOT NULL,
    available_at timestamptz NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    published_at timestamptz
);

-- The relay's work list: due, unpublished rows in FIFO order.
CREATE INDEX outbox_pending_idx ON outbox (available_at, id) WHERE published_at IS NULL;
CREATE INDEX outbox_task_idx ON outbox (task_id);

-- The global position of the `slot`-th event appended by the current transaction.
CREATE FUNCTION event_position(slot bigint) RETURNS bigint
    LANGUAGE sql VOLATILE PARALLEL UNSAFE
    AS $$ SELECT (pg_current_xact_id()::text::bigint << 20) + slot $$;

-- Positions below this value belong to transactions that have all ended (as seen by the
-- statement's snapshot): the part of the log that can be read without skipping anything.
CREATE FUNCTION event_log_horizon() RETURNS bigint
    LANGUAGE sql STABLE
    AS $$ SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint << 20 $$;
