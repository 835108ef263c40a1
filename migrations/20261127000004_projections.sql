-- Read models projected from the global event log (see src/projector.rs).

-- Where each projector has read the log up to. A projector advances its row in the same
-- transaction as whatever it derived from the events it read, so after a crash it resumes exactly
-- where its last commit left it.
CREATE TABLE projector_checkpoints (
    name       text        PRIMARY KEY,
    position   bigint      NOT NULL DEFAULT 0,
    -- events read since the projector first ran
    events     bigint      NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Cluster-wide totals per task type, counted from events (never from one process's memory).
CREATE TABLE task_totals (
    task_type       text   PRIMARY KEY,
    enqueued        bigint NOT NULL DEFAULT 0,
    attempts_started bigint NOT NULL DEFAULT 0,
    -- tasks that finished successfully (attempt_succeeded events)
    succeeded       bigint NOT NULL DEFAULT 0,
    attempts_failed bigint NOT NULL DEFAULT 0,
    retries         bigint NOT NULL DEFAULT 0,
    -- tasks that failed for good (dead_lettered events)
    dead            bigint NOT NULL DEFAULT 0,
    cancelled       bigint NOT NULL DEFAULT 0,
    requeued        bigint NOT NULL DEFAULT 0
);

-- Attempt durations (from the duration_ms of attempt_succeeded / attempt_failed events) as
-- histogram buckets: `count` attempts took at most `le_ms` milliseconds and more than the next
-- smaller bound; le_ms = -1 stands for +Inf.
CREATE TABLE attempt_durations (
    task_type text   NOT NULL,
    outcome   text   NOT NULL,
    le_ms     bigint NOT NULL,
    count     bigint NOT NULL DEFAULT 0,
    sum_ms    bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (task_type, outcome, le_ms)
);

INSERT INTO projector_checkpoints (name) VALUES ('cache_invalidation'), ('totals');
