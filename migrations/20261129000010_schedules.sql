-- Schedules: periodic tasks. A scheduler step (every process with the relay role runs one)
-- locks the due schedules, enqueues one task per due slot with the idempotency key
-- `schedule:{id}:{slot}`, records the slot in `schedule_runs` and moves `next_run_at` on, all in
-- one transaction: a slot gets exactly one task whichever process fires it, and a process that
-- dies mid-step leaves the slot due for the next one.
CREATE TABLE schedules (
    id              uuid        PRIMARY KEY,
    name            text        NOT NULL,
    cron            text        NOT NULL,
    time_zone       text        NOT NULL,
    task_type       text        NOT NULL,
    payload         jsonb       NOT NULL,
    max_attempts    integer     NOT NULL CHECK (max_attempts BETWEEN 1 AND 100),
    missed_runs     text        NOT NULL CHECK (missed_runs IN ('skip', 'catch_up')),
    catch_up_limit  integer     NOT NULL CHECK (catch_up_limit BETWEEN 0 AND 1000),
    paused          boolean     NOT NULL DEFAULT false,
    -- the first slot not yet fired; NULL when the expression matches no later time
    next_run_at     timestamptz,
    -- the last slot fired
    last_run_at     timestamptz,
    -- whose tasks the slots become (the creating token's tenant or subject)
    owner           text        NOT NULL,
    -- the schedule's own event chain: number and hash of its last event
    version         integer     NOT NULL CHECK (version >= 1),
    last_hash       bytea       NOT NULL,
    created_at      timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL
);

CREATE INDEX schedules_due_idx ON schedules (next_run_at) WHERE NOT paused;

-- Every change to a schedule (created, updated, paused, resumed, deleted) and every run of
-- missed slots skipped, hash-chained per schedule like `task_events`, and append-only.
CREATE TABLE schedule_events (
    schedule_id  uuid        NOT NULL,
    sequence     integer     NOT NULL CHECK (sequence >= 1),
    event_type   text        NOT NULL,
    data         jsonb       NOT NULL,
    occurred_at  timestamptz NOT NULL,
    recorded_at  timestamptz NOT NULL DEFAULT now(),
    prev_hash    bytea,
    hash         bytea       NOT NULL,
    PRIMARY KEY (schedule_id, sequence)
);

CREATE TRIGGER schedule_events_append_only
    BEFORE UPDATE OR DELETE ON schedule_events
    FOR EACH ROW EXECUTE FUNCTION task_events_append_only();

CREATE TRIGGER schedule_events_no_truncate
    BEFORE TRUNCATE ON schedule_events
    FOR EACH STATEMENT EXECUTE FUNCTION task_events_append_only();

-- One row per fired slot: the slot's task (a second row for a slot cannot exist).
CREATE TABLE schedule_runs (
    schedule_id uuid        NOT NULL,
    slot        timestamptz NOT NULL,
    task_id     uuid        NOT NULL,
    fired_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (schedule_id, slot)
);
