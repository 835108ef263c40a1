-- Each event carries its task's type.
--
-- The totals projector counts events per task type. The type is written once, in the task's
-- `enqueued` event, so counting a batch of events meant looking up every event's task: a thousand
-- index lookups per thousand events, the largest part of the projector's cost. The type never
-- changes, so every new event now carries it. It is outside the hashed content (like `position`
-- and `recorded_at`): the chain and `arnela audit verify` are unchanged, and events written
-- before this migration keep a NULL here (readers fall back to the task).
ALTER TABLE task_events ADD COLUMN task_type text;
