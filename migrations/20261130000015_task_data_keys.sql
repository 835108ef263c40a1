-- Erasable personal data (README "Audit", "Erasure"): each task's data key, wrapped under the
-- master key AUDIT_DATA_KEY. The personal fields of the task's payload and its provider results
-- are stored sealed under that key, in `tasks` and in the append-only log alike; erasing the
-- task deletes this row, and with it every way to read them, while the log's hashes (which
-- cover the sealed form) still verify.
CREATE TABLE task_data_keys (
    task_id     uuid        PRIMARY KEY,
    wrapped_key bytea       NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- The runtime role adds keys and destroys them; it never rewrites one.
DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'arnela_runtime') THEN
        REVOKE UPDATE, TRUNCATE ON task_data_keys FROM arnela_runtime;
        GRANT SELECT, INSERT, DELETE ON task_data_keys TO arnela_runtime;
    END IF;
END
$$;
