-- Least privilege for the event log.
--
-- 1. TRUNCATE of the log is refused like UPDATE and DELETE (row triggers do not see it).
-- 2. `arnela_runtime`: the group role of the service's login role (README, "Audit"). It may read
--    and write the queue state, but only SELECT and INSERT on the append-only logs: no UPDATE,
--    DELETE or TRUNCATE there, and, not owning any table, no ALTER (disabling the triggers
--    included). Migrations run as the tables' owner (`arnela migrate` with DB_MIGRATION_USER);
--    every table created later by that owner grants the same to `arnela_runtime` by default, so
--    a later append-only table must REVOKE UPDATE, DELETE, TRUNCATE from it in its migration.
--
-- The role is created here when it does not exist and the migrating role may create roles (the
-- compose stack's init script creates it beforehand); otherwise the grants are left out with a
-- notice, and the service runs as the owner (refused in production).

CREATE TRIGGER task_events_no_truncate
    BEFORE TRUNCATE ON task_events
    FOR EACH STATEMENT EXECUTE FUNCTION task_events_append_only();

DO $$
DECLARE
    s text := current_schema();
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'arnela_runtime') THEN
        IF (SELECT rolsuper OR rolcreaterole FROM pg_roles WHERE rolname = current_user) THEN
            BEGIN
                CREATE ROLE arnela_runtime NOLOGIN;
            EXCEPTION WHEN duplicate_object OR unique_violation THEN
                NULL; -- created meanwhile by a migration of another database of this cluster
            END;
        ELSE
            RAISE NOTICE 'role arnela_runtime does not exist and % may not create it: no grants',
                current_user;
            RETURN;
        END IF;
    END IF;
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO arnela_runtime', s);
    EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA %I TO arnela_runtime', s);
    EXECUTE format('GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA %I TO arnela_runtime', s);
    EXECUTE format('ALTER DEFAULT PRIVILEGES IN SCHEMA %I GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO arnela_runtime', s);
    EXECUTE format('ALTER DEFAULT PRIVILEGES IN SCHEMA %I GRANT USAGE, SELECT ON SEQUENCES TO arnela_runtime', s);
    -- the append-only logs: read and append only
    REVOKE UPDATE, DELETE, TRUNCATE ON task_events, schedule_events FROM arnela_runtime;
    -- the migration history: read only (the service checks that it is up to date)
    REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON _sqlx_migrations FROM arnela_runtime;
END
$$;
