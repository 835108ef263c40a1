-- The cache entries a task declared at enqueue (`invalidates`, also in its `enqueued` event), kept
-- in its row: the invalidation projector reads them, with the payload of a `sync_calendar` task,
-- by the row's primary key when the task succeeds. It read them from the `enqueued` event, a
-- lookup of `(task_id, sequence)` in every partition of the log for each succeeded task, about
-- three fifths of the projector's statement time. NULL when the task declared none (most tasks:
-- no space taken); the event stays the record, and the projector falls back to it for a task
-- whose row retention removed.
ALTER TABLE tasks ADD COLUMN invalidates jsonb;

UPDATE tasks t SET invalidates = e.data->'invalidates'
FROM task_events e
WHERE e.task_id = t.id AND e.sequence = 1 AND e.event_type = 'enqueued'
  AND jsonb_typeof(e.data->'invalidates') = 'array' AND e.data->'invalidates' <> '[]'::jsonb;
