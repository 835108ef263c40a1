-- The failed list's outbox: the copy of a dead-lettered task for `{prefix}:tasks:failed`,
-- written in the transaction that records the task's `dead_lettered` event and deleted in the
-- transaction that pushed it (README "Recovery bounds"). A copy whose push Redis refused, or
-- whose process died before pushing it, stays here until a rescuer pass (any process's) pushes
-- it; the restore of a lost failed list leaves the tasks listed here to that push. Rows live
-- for about a round trip: the table is empty almost always.
CREATE TABLE failed_copies (
    id        bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    task_id   uuid        NOT NULL,
    task_type text        NOT NULL,
    attempts  integer     NOT NULL,
    reason    text        NOT NULL,
    failed_at timestamptz NOT NULL
);

ALTER TABLE failed_copies SET (
    autovacuum_vacuum_scale_factor = 0.0,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_vacuum_cost_delay = 0
);

-- The runtime role writes copies and deletes them once pushed; UPDATE only for the row locks
-- (`FOR UPDATE SKIP LOCKED`) that keep two pushes from taking the same copy.
DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'arnela_runtime') THEN
        REVOKE TRUNCATE ON failed_copies FROM arnela_runtime;
        GRANT SELECT, INSERT, UPDATE, DELETE ON failed_copies TO arnela_runtime;
    END IF;
END
$$;
