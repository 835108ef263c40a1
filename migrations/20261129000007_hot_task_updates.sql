-- Task updates that stay on their page and touch no index (HOT).
--
-- Every task row is written once and updated three times: dispatched (version and hash),
-- claimed (status, lease) and finished (status, lease cleared). An update can be HOT (a heap-only
-- tuple: no new index entry, the old version pruned from the page) only if no indexed column
-- changes and the page has room. Before this migration the claim and the completion changed
-- `status` (in the listing index) and the lease columns (in the rescuer's index), so each wrote a
-- new entry into every index of `tasks`, and with 20% of each page free even the dispatch seldom
-- found room: about one update in ten was HOT.
--
-- - The rescuer's lease index moves to `task_leases`, a small table holding one row per running
--   attempt (its expiry), written in the same statement as the task's row
--   (`store::events::record_batch`) and by lease renewals. `tasks.lease_owner` and
--   `tasks.lease_expires_at` stay the truth the fencing checks; `task_leases` is how the rescuer
--   finds the expired ones without scanning `tasks`.
-- - The `(status, enqueued_position)` index is dropped. A status filter on `GET /tasks` now reads
--   the position index and skips the tasks in other states: quick for the states most tasks are
--   in, a longer scan for a rare state on a large table.
-- - New pages of `tasks` are filled to half, leaving room on each page for the updates of the
--   rows it holds.
-- - The outbox's foreign key to `tasks` goes: its check ran a query per outbox row and locked the
--   task's row (a WAL record each) at every enqueue and retry. Outbox rows are written only with
--   their task, in the same statement or transaction, and tasks are never deleted.
CREATE TABLE task_leases (
    task_id    uuid        PRIMARY KEY,
    expires_at timestamptz NOT NULL
);
CREATE INDEX task_leases_expires_at_idx ON task_leases (expires_at);

INSERT INTO task_leases (task_id, expires_at)
    SELECT id, lease_expires_at FROM tasks
    WHERE lease_owner IS NOT NULL AND lease_expires_at IS NOT NULL;

-- a queue table: a row per running attempt, deleted when it ends
ALTER TABLE task_leases SET (
    autovacuum_vacuum_scale_factor = 0.0,
    autovacuum_vacuum_threshold = 5000,
    autovacuum_vacuum_cost_delay = 0,
    autovacuum_analyze_scale_factor = 0.0,
    autovacuum_analyze_threshold = 5000
);

DROP INDEX tasks_lease_idx;
DROP INDEX tasks_status_position_idx;

ALTER TABLE tasks SET (fillfactor = 50);

ALTER TABLE outbox DROP CONSTRAINT outbox_task_id_fkey;
