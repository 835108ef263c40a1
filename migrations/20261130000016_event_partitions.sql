-- Retention (README, "Audit" and "Retention"): the event log in monthly partitions that
-- `arnela audit archive` writes to signed files and then drops, the links that let the log
-- still verify after its oldest months are gone, and the heads of finished tasks whose
-- projection rows retention removed.

-- 1. `task_events` partitioned by the month of `recorded_at` (UTC).
--
-- A partitioned table's unique constraints must include the partition key: the primary key is
-- `(position, recorded_at)` (position alone stays unique, see migration 1), and each partition
-- carries its own UNIQUE (task_id, sequence), created with it by `task_events_partition`. A task
-- whose history spans months is kept whole by the projection's version check (every append is
-- checked against `tasks.version` under the row's lock) and by `arnela audit verify`.
ALTER TABLE task_events RENAME TO task_events_unpartitioned;
ALTER TABLE task_events_unpartitioned RENAME CONSTRAINT task_events_pkey
    TO task_events_unpartitioned_pkey;
ALTER TABLE task_events_unpartitioned RENAME CONSTRAINT task_events_task_id_sequence_key
    TO task_events_unpartitioned_task_id_sequence_key;

CREATE TABLE task_events (
    position      bigint      NOT NULL,
    task_id       uuid        NOT NULL,
    sequence      integer     NOT NULL CHECK (sequence >= 1),
    event_type    text        NOT NULL,
    event_version smallint    NOT NULL,
    data          jsonb       NOT NULL,
    occurred_at   timestamptz NOT NULL,
    recorded_at   timestamptz NOT NULL DEFAULT now(),
    prev_hash     bytea,
    hash          bytea       NOT NULL,
    task_type     text,
    hash_version  smallint    NOT NULL DEFAULT 1 CHECK (hash_version IN (1, 2)),
    PRIMARY KEY (position, recorded_at)
) PARTITION BY RANGE (recorded_at);

-- Row triggers of a partitioned table are cloned onto every partition; statement triggers
-- (TRUNCATE) are not, so `task_events_partition` adds one to each partition.
CREATE TRIGGER task_events_append_only
    BEFORE UPDATE OR DELETE ON task_events
    FOR EACH ROW EXECUTE FUNCTION task_events_append_only();
CREATE TRIGGER task_events_no_truncate
    BEFORE TRUNCATE ON task_events
    FOR EACH STATEMENT EXECUTE FUNCTION task_events_append_only();

-- Creates the partition of the month holding `month` (its name is `task_events_pYYYYMM`) unless
-- it exists, and returns its name. It runs as the log's owner (SECURITY DEFINER), so the
-- service's runtime role, which may not create tables, can still make next month's partition
-- (`store::partitions::ensure`, at start and every hour). Partitions are reached through
-- `task_events` only: the runtime role has no privilege on them directly.
CREATE FUNCTION task_events_partition(month timestamptz) RETURNS text
    LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT
    AS $$
DECLARE
    starts timestamptz := date_trunc('month', month, 'UTC');
    ends   timestamptz := date_trunc('month', month + interval '1 month', 'UTC');
    name   text := 'task_events_p' || to_char(starts AT TIME ZONE 'UTC', 'YYYYMM');
BEGIN
    -- one creator at a time (two processes starting together)
    PERFORM pg_advisory_xact_lock(hashtext('arnela:task_events_partition'));
    IF EXISTS (SELECT FROM pg_class c JOIN pg_inherits i ON i.inhrelid = c.oid
               WHERE i.inhparent = 'task_events'::regclass AND c.relname = name) THEN
        RETURN name;
    END IF;
    EXECUTE format('CREATE TABLE %I PARTITION OF task_events FOR VALUES FROM (%L) TO (%L)',
                   name, starts, ends);
    EXECUTE format('ALTER TABLE %I ADD CONSTRAINT %I UNIQUE (task_id, sequence)',
                   name, name || '_task_id_sequence_key');
    EXECUTE format('CREATE TRIGGER task_events_no_truncate BEFORE TRUNCATE ON %I '
                   'FOR EACH STATEMENT EXECUTE FUNCTION task_events_append_only()', name);
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'arnela_runtime') THEN
        EXECUTE format('REVOKE ALL ON %I FROM arnela_runtime', name);
    END IF;
    RETURN name;
END
$$;
REVOKE ALL ON FUNCTION task_events_partition(timestamptz) FROM PUBLIC;

-- Events outside every monthly partition (none while partitions are made ahead of time) still
-- land somewhere: an append never fails for want of a partition.
CREATE TABLE task_events_default PARTITION OF task_events DEFAULT;
ALTER TABLE task_events_default ADD CONSTRAINT task_events_default_task_id_sequence_key
    UNIQUE (task_id, sequence);
CREATE TRIGGER task_events_no_truncate
    BEFORE TRUNCATE ON task_events_default
    FOR EACH STATEMENT EXECUTE FUNCTION task_events_append_only();

-- partitions for every month already in the log, this month and the next two
SELECT task_events_partition(m)
FROM generate_series(
    date_trunc('month', least(coalesce((SELECT min(recorded_at) FROM task_events_unpartitioned),
                                       now()), now()), 'UTC'),
    date_trunc('month', now(), 'UTC') + interval '2 months',
    interval '1 month') AS m;

INSERT INTO task_events
    (position, task_id, sequence, event_type, event_version, data, occurred_at, recorded_at,
     prev_hash, hash, task_type, hash_version)
SELECT position, task_id, sequence, event_type, event_version, data, occurred_at, recorded_at,
       prev_hash, hash, task_type, hash_version
FROM task_events_unpartitioned;

DROP TABLE task_events_unpartitioned;

-- 2. Archives: what `arnela audit archive` removed, and where each task's history continues.
--
-- One row per archived partition, with the signed manifest of its file.
CREATE TABLE task_event_archives (
    name        text        PRIMARY KEY,
    starts_at   timestamptz NOT NULL,
    ends_at     timestamptz NOT NULL,
    events      bigint      NOT NULL,
    tasks       bigint      NOT NULL,
    manifest    jsonb       NOT NULL,
    archived_at timestamptz NOT NULL DEFAULT now()
);

-- Each task's last event in an archived partition: the event its next one stored here links
-- to, and the head a checkpoint or a retired task may still name.
CREATE TABLE task_event_anchors (
    task_id  uuid    NOT NULL,
    sequence integer NOT NULL,
    hash     bytea   NOT NULL,
    -- the archive that removed the event (or, restored, the archive it was restored from)
    archive  text    NOT NULL,
    PRIMARY KEY (task_id, sequence)
);

-- 3. Retention of the projection: a finished task's row, once its last change is older than
-- RETENTION_FINISHED_TASKS_DAYS, leaves `tasks`, and its payload, idempotency key and last error
-- with it; what is left is this slim row: the task still reads (payload "[retired]"), the head
-- of its chain stays, so `arnela audit verify` still finds a removed tail, and an erasure still
-- appends its `erased` event. `arnela audit restore` also puts the heads of restored chains here.
CREATE TABLE retired_tasks (
    id         uuid        PRIMARY KEY,
    task_type  text        NOT NULL,
    status     text        NOT NULL,
    owner      text        NOT NULL,
    attempts     integer     NOT NULL,
    max_attempts integer     NOT NULL,
    run_at       timestamptz NOT NULL,
    version    integer     NOT NULL CHECK (version >= 1),
    last_hash  bytea       NOT NULL,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    retired_at timestamptz NOT NULL DEFAULT now()
);

CREATE TRIGGER task_event_archives_append_only
    BEFORE UPDATE OR DELETE ON task_event_archives
    FOR EACH ROW EXECUTE FUNCTION task_events_append_only();
CREATE TRIGGER task_event_archives_no_truncate
    BEFORE TRUNCATE ON task_event_archives
    FOR EACH STATEMENT EXECUTE FUNCTION task_events_append_only();
CREATE TRIGGER task_event_anchors_append_only
    BEFORE UPDATE OR DELETE ON task_event_anchors
    FOR EACH ROW EXECUTE FUNCTION task_events_append_only();
CREATE TRIGGER task_event_anchors_no_truncate
    BEFORE TRUNCATE ON task_event_anchors
    FOR EACH STATEMENT EXECUTE FUNCTION task_events_append_only();

-- The runtime role: append and read the new log (default privileges of migration 12 gave it
-- UPDATE and DELETE too), read the archives' records (the archive command runs as the owner),
-- and move heads into `retired_tasks` (an erasure updates one), never delete them.
DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'arnela_runtime') THEN
        REVOKE UPDATE, DELETE, TRUNCATE ON task_events FROM arnela_runtime;
        REVOKE ALL ON task_events_default FROM arnela_runtime;
        REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON task_event_archives, task_event_anchors
            FROM arnela_runtime;
        REVOKE DELETE, TRUNCATE ON retired_tasks FROM arnela_runtime;
        GRANT SELECT, INSERT, UPDATE ON retired_tasks TO arnela_runtime;
        GRANT SELECT ON task_events, task_event_archives, task_event_anchors TO arnela_runtime;
        GRANT INSERT ON task_events TO arnela_runtime;
        GRANT EXECUTE ON FUNCTION task_events_partition(timestamptz) TO arnela_runtime;
    END IF;
END
$$;
