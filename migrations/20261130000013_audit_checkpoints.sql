-- Signed checkpoints chaining every task's history together (README, "Audit").
--
-- Periodically a checkpoint records the head (last sequence number and hash) of every task whose
-- history grew since the previous checkpoint, the Merkle root over those heads, and the hash of
-- the previous checkpoint, signed with the service's Ed25519 key (AUDIT_SIGNING_KEY). Removing a
-- task's whole history (row included), truncating a tail and rewriting `last_hash` to match, or
-- rewriting rows and recomputing their hashes then no longer verifies: the head a checkpoint
-- recorded is gone or differs, and forging the checkpoint needs the private key.
CREATE TABLE audit_checkpoints (
    seq            bigint      PRIMARY KEY CHECK (seq >= 1),
    created_at     timestamptz NOT NULL,
    -- the checkpoint covers the events with position < upto_position (the log's horizon then)
    upto_position  bigint      NOT NULL,
    tasks          integer     NOT NULL,
    merkle_root    bytea       NOT NULL,
    prev_hash      bytea,
    hash           bytea       NOT NULL,
    public_key     bytea       NOT NULL,
    signature      bytea       NOT NULL
);

CREATE TABLE audit_checkpoint_heads (
    seq        bigint  NOT NULL,
    task_id    uuid    NOT NULL,
    version    integer NOT NULL,
    head_hash  bytea   NOT NULL,
    PRIMARY KEY (seq, task_id)
);

CREATE TRIGGER audit_checkpoints_append_only
    BEFORE UPDATE OR DELETE ON audit_checkpoints
    FOR EACH ROW EXECUTE FUNCTION task_events_append_only();
CREATE TRIGGER audit_checkpoints_no_truncate
    BEFORE TRUNCATE ON audit_checkpoints
    FOR EACH STATEMENT EXECUTE FUNCTION task_events_append_only();
CREATE TRIGGER audit_checkpoint_heads_append_only
    BEFORE UPDATE OR DELETE ON audit_checkpoint_heads
    FOR EACH ROW EXECUTE FUNCTION task_events_append_only();
CREATE TRIGGER audit_checkpoint_heads_no_truncate
    BEFORE TRUNCATE ON audit_checkpoint_heads
    FOR EACH STATEMENT EXECUTE FUNCTION task_events_append_only();

-- The runtime role appends checkpoints; it may not change them (default privileges gave it
-- UPDATE and DELETE, see migration 12).
DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'arnela_runtime') THEN
        REVOKE UPDATE, DELETE, TRUNCATE ON audit_checkpoints, audit_checkpoint_heads
            FROM arnela_runtime;
        GRANT SELECT, INSERT ON audit_checkpoints, audit_checkpoint_heads TO arnela_runtime;
    END IF;
END
$$;
