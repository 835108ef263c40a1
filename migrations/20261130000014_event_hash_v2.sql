-- Event hashes, version 2: the hash also covers where and when the event was stored.
--
-- Version 1 (every event stored before this migration) hashes the previous event's hash and the
-- canonical JSON document of the event (task id, sequence, type, type version, data, occurred_at).
-- Version 2 hashes the previous event's hash, the same document with `"hash_version": 2` added,
-- then the event's `position` and `recorded_at` (microseconds since the Unix epoch), each as
-- 8 bytes big-endian: moving an event in the global log or changing when it was recorded breaks
-- the chain as any other edit does. `hash_version` says which form a row has, so the events
-- stored before keep verifying; a chain never goes back from 2 to 1.
ALTER TABLE task_events ADD COLUMN hash_version smallint NOT NULL DEFAULT 1
    CHECK (hash_version IN (1, 2));

-- The version 2 hash from the previous hash (NULL for a task's first event), the canonical
-- document and the stored position and time: the enqueue computes it in its statement, where the
-- position is assigned, and an auditor can recompute it in SQL.
CREATE FUNCTION event_hash_v2(prev bytea, doc bytea, pos bigint, recorded timestamptz)
    RETURNS bytea LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$ SELECT sha256(coalesce(prev, '\x0000000000000000000000000000000000000000000000000000000000000000'::bytea)
                        || doc || int8send(pos)
                        || int8send((extract(epoch FROM recorded) * 1000000)::bigint)) $$;
