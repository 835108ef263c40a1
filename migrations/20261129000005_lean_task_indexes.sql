-- Fewer index entries per task row version.
--
-- A claim and a completion each change `status`, which the listing index covers, so those
-- updates cannot be HOT: every index of `tasks` gets a new entry for each of them. Indexes that
-- earn little are therefore dropped or made cheaper:
--
-- - `(task_type, enqueued_position)`: with four task types a type filter reads at most about
--   four rows of the position index per row it returns; the dedicated index is not worth an entry
--   per row version.
-- - the idempotency key: only tasks that carry a key are indexed (a partial unique index instead
--   of a constraint that also indexes every NULL).
-- - `created_at` never changes after the insert and grows with time: a BRIN index answers the
--   creation-window filter at a fraction of a B-tree's maintenance.
DROP INDEX tasks_type_position_idx;

ALTER TABLE tasks DROP CONSTRAINT tasks_idempotency_key_key;
CREATE UNIQUE INDEX tasks_idempotency_key_idx ON tasks (idempotency_key)
    WHERE idempotency_key IS NOT NULL;

DROP INDEX tasks_created_at_idx;
CREATE INDEX tasks_created_at_brin ON tasks USING brin (created_at);
