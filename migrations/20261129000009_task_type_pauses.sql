-- Task types an operator paused. A paused type's deliveries are not published by the relays,
-- and a delivery of it already in Redis is not claimed: the worker gives it back to the outbox
-- (unpublished), so the relays publish it again once the type is resumed. One row per paused
-- type; resuming deletes it. The table stays tiny: every relay batch and claim reads it whole.
CREATE TABLE task_type_pauses (
    task_type text PRIMARY KEY,
    paused_at timestamptz NOT NULL DEFAULT now(),
    paused_by text NOT NULL
);
