-- Tasks belong to whoever enqueued them: the token's `tenant` claim, else its subject.
-- Producers read and deduplicate only their own tasks, so an idempotency key is unique per
-- owner, not across the whole service. Tasks written before owners existed belong to '' (no
-- producer's), which only auditors and admins read.
ALTER TABLE tasks ADD COLUMN owner text NOT NULL DEFAULT '';

DROP INDEX tasks_idempotency_key_idx;
CREATE UNIQUE INDEX tasks_owner_idempotency_key_idx ON tasks (owner, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
