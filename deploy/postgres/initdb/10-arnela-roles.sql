-- Arnela's database roles (README, "Audit"). Run as a superuser, connected to Arnela's database.
--
--   DB_OWNER_USER (default arnela_owner), LOGIN: owns the database, its `public` schema and every
--     object in it. Only `arnela migrate` (DB_MIGRATION_USER) logs in as this role.
--   arnela_runtime, NOLOGIN: the group the migrations grant to (migration 12): read and write the
--     queue state, only SELECT and INSERT on the append-only logs.
--   DB_USER (default arnela_user), LOGIN, member of arnela_runtime: the service's role. Not a
--     superuser, owns nothing, may not create anything in `public`.
--
-- The compose stack runs it from /docker-entrypoint-initdb.d when the data volume is created. It
-- is idempotent: deploy/postgres/upgrade-roles.sh runs it again on a volume created before the
-- roles existed (where DB_USER was the superuser owning everything) and it then also moves the
-- ownership of every object of `public` to the owner. Elsewhere:
--
--   export DB_OWNER_USER=arnela_owner DB_USER=arnela_user   # and DB_OWNER_PASSWORD, DB_PASSWORD
--   psql -v ON_ERROR_STOP=1 -U postgres -d arnela_db -f deploy/postgres/initdb/10-arnela-roles.sql
--
-- Passwords are read from the environment with \getenv (psql 15 or later), never from a command
-- line. Everything happens in one transaction, and what cannot be right is refused before
-- anything changes.

\set ON_ERROR_STOP on
\set QUIET on

\getenv owner DB_OWNER_USER
\if :{?owner}
\else
\set owner arnela_owner
\endif
\getenv owner_password DB_OWNER_PASSWORD
\if :{?owner_password}
\else
\set owner_password ''
\endif
\getenv runtime DB_USER
\if :{?runtime}
\else
\set runtime arnela_user
\endif
\getenv runtime_password DB_PASSWORD
\if :{?runtime_password}
\else
\set runtime_password ''
\endif

BEGIN;
SET LOCAL password_encryption = 'scram-sha-256';
-- the names, for the DO blocks below (psql does not substitute variables inside them)
SELECT set_config('arnela.owner', :'owner', true), set_config('arnela.runtime', :'runtime', true)
\g /dev/null

-- 1. Refusals, before anything changes.
SELECT :'owner_password' = '' AS no_owner_password, :'runtime_password' = '' AS no_runtime_password
\gset
\if :no_owner_password
DO $$ BEGIN RAISE EXCEPTION 'DB_OWNER_PASSWORD is not set'; END $$;
\endif
\if :no_runtime_password
DO $$ BEGIN RAISE EXCEPTION 'DB_PASSWORD is not set'; END $$;
\endif

DO $$
DECLARE
    owner   text := current_setting('arnela.owner');
    runtime text := current_setting('arnela.runtime');
    bootstrap text := (SELECT rolname FROM pg_roles WHERE oid = 10);
BEGIN
    IF NOT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
        RAISE EXCEPTION 'run this script as a superuser (connected as %)', current_user;
    END IF;
    IF owner = '' OR runtime = '' THEN
        RAISE EXCEPTION 'DB_OWNER_USER and DB_USER must not be empty';
    END IF;
    IF owner = runtime THEN
        RAISE EXCEPTION 'DB_OWNER_USER and DB_USER are both %: the service must not run as the '
                        'owner of its tables', owner;
    END IF;
    IF 'arnela_runtime' IN (owner, runtime) THEN
        RAISE EXCEPTION 'arnela_runtime is the group role; DB_OWNER_USER and DB_USER must be other names';
    END IF;
    IF bootstrap IN (owner, runtime) THEN
        RAISE EXCEPTION '% is this cluster''s bootstrap superuser (the role its data directory was '
                        'created with), which can never lose SUPERUSER: choose a new role name for '
                        'DB_USER and DB_OWNER_USER (README, "Audit")', bootstrap;
    END IF;
    IF current_user IN (owner, runtime) THEN
        RAISE EXCEPTION '% runs this script: connect as another superuser', current_user;
    END IF;
END
$$;

-- 2. The roles. arnela_runtime is cluster-wide: another database of this cluster (or migration 12,
--    run by a role that could create it) may have created it already.
DO $$
DECLARE
    owner   text := current_setting('arnela.owner');
    runtime text := current_setting('arnela.runtime');
    granted record;
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'arnela_runtime') THEN
        CREATE ROLE arnela_runtime NOLOGIN;
        RAISE NOTICE 'created the group role arnela_runtime';
    ELSIF EXISTS (SELECT FROM pg_roles WHERE rolname = 'arnela_runtime'
                  AND (rolcanlogin OR rolsuper OR rolcreatedb OR rolcreaterole OR rolreplication
                       OR rolbypassrls)) THEN
        ALTER ROLE arnela_runtime NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION
            NOBYPASSRLS;
        RAISE NOTICE 'arnela_runtime had powers beyond its grants: now NOLOGIN, no attributes';
    END IF;

    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = owner) THEN
        EXECUTE format('CREATE ROLE %I', owner);
        RAISE NOTICE 'created the owner role %', owner;
    END IF;
    EXECUTE format('ALTER ROLE %I LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION '
                   'NOBYPASSRLS', owner);

    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = runtime) THEN
        EXECUTE format('CREATE ROLE %I', runtime);
        RAISE NOTICE 'created the runtime role %', runtime;
    ELSIF (SELECT rolsuper FROM pg_roles WHERE rolname = runtime) THEN
        RAISE NOTICE 'role % is a superuser: removing SUPERUSER', runtime;
    END IF;
    EXECUTE format('ALTER ROLE %I LOGIN INHERIT NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION '
                   'NOBYPASSRLS', runtime);
    IF NOT pg_has_role(runtime, 'arnela_runtime', 'MEMBER') THEN
        EXECUTE format('GRANT arnela_runtime TO %I', runtime);
    END IF;
    -- direct memberships through which the service could act as the owner or a superuser
    FOR granted IN
        SELECT g.rolname FROM pg_auth_members m
        JOIN pg_roles g ON g.oid = m.roleid
        JOIN pg_roles u ON u.oid = m.member
        WHERE u.rolname = runtime AND (g.rolname = owner OR g.rolsuper)
    LOOP
        EXECUTE format('REVOKE %I FROM %I', granted.rolname, runtime);
        RAISE NOTICE 'revoked the membership of % in %', runtime, granted.rolname;
    END LOOP;
END
$$;
ALTER ROLE :"owner" PASSWORD :'owner_password';
ALTER ROLE :"runtime" PASSWORD :'runtime_password';

-- 3. The database and its public schema belong to the owner. Nobody else may create objects in
--    the schema; only the owner and arnela_runtime's members may connect.
SELECT current_database() AS db
\gset
ALTER DATABASE :"db" OWNER TO :"owner";
REVOKE CONNECT, TEMPORARY ON DATABASE :"db" FROM PUBLIC;
GRANT CONNECT ON DATABASE :"db" TO arnela_runtime;
ALTER SCHEMA public OWNER TO :"owner";
REVOKE CREATE ON SCHEMA public FROM PUBLIC;

-- 4. Every object of `public` belongs to the owner (nothing to do on a new volume). Not REASSIGN
--    OWNED: when the previous owner is the bootstrap superuser it also owns the system catalogs,
--    which cannot be reassigned. Indexes, triggers and the sequences of identity and serial columns
--    follow their table. Granted privileges are kept (the new owner becomes their grantor).
DO $$
DECLARE
    owner text := current_setting('arnela.owner');
    obj record;
BEGIN
    FOR obj IN
        SELECT CASE c.relkind WHEN 'r' THEN 'TABLE' WHEN 'p' THEN 'TABLE'
                              WHEN 'f' THEN 'FOREIGN TABLE' WHEN 'v' THEN 'VIEW'
                              WHEN 'm' THEN 'MATERIALIZED VIEW' WHEN 'S' THEN 'SEQUENCE'
                              WHEN 'c' THEN 'TYPE' END AS kind,
               c.oid::regclass::text AS name, pg_get_userbyid(c.relowner) AS was
        FROM pg_class c
        WHERE c.relnamespace = 'public'::regnamespace
          AND c.relkind IN ('r', 'p', 'f', 'v', 'm', 'S', 'c')
          AND pg_get_userbyid(c.relowner) <> owner
          AND NOT EXISTS (SELECT FROM pg_depend d
                          WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                            AND (d.deptype = 'e'
                                 OR (c.relkind = 'S' AND d.deptype IN ('a', 'i')
                                     AND d.refclassid = 'pg_class'::regclass)))
        UNION ALL
        SELECT CASE p.prokind WHEN 'p' THEN 'PROCEDURE' WHEN 'a' THEN 'AGGREGATE'
                              ELSE 'FUNCTION' END,
               p.oid::regprocedure::text, pg_get_userbyid(p.proowner)
        FROM pg_proc p
        WHERE p.pronamespace = 'public'::regnamespace
          AND pg_get_userbyid(p.proowner) <> owner
          AND NOT EXISTS (SELECT FROM pg_depend d WHERE d.classid = 'pg_proc'::regclass
                          AND d.objid = p.oid AND d.deptype = 'e')
        UNION ALL
        SELECT CASE t.typtype WHEN 'd' THEN 'DOMAIN' ELSE 'TYPE' END,
               t.oid::regtype::text, pg_get_userbyid(t.typowner)
        FROM pg_type t
        WHERE t.typnamespace = 'public'::regnamespace
          AND t.typtype IN ('d', 'e', 'r')
          AND pg_get_userbyid(t.typowner) <> owner
          AND NOT EXISTS (SELECT FROM pg_depend d WHERE d.classid = 'pg_type'::regclass
                          AND d.objid = t.oid AND d.deptype = 'e')
        ORDER BY 1, 2
    LOOP
        EXECUTE format('ALTER %s %s OWNER TO %I', obj.kind, obj.name, owner);
        RAISE NOTICE '% %: owner % -> %', lower(obj.kind), obj.name, obj.was, owner;
    END LOOP;
END
$$;

-- 5. Migration 12 already applied by another role (the one that owned everything): its default
--    privileges are that role's, so tables the owner creates later would not be granted to
--    arnela_runtime. Give the owner the same. If it ran where arnela_runtime did not exist and
--    could not be created, it granted nothing: grant what it grants (the logs, recognised by their
--    append-only trigger, read and append only; the migration history read only).
DO $$
DECLARE
    owner text := current_setting('arnela.owner');
    appendonly regclass;
    pending boolean;
BEGIN
    IF to_regclass('public._sqlx_migrations') IS NULL THEN
        RETURN; -- `arnela migrate`, run as the owner, does all of this
    END IF;
    -- (dynamic: the table may not exist when the block is planned)
    EXECUTE 'SELECT NOT EXISTS (SELECT FROM public._sqlx_migrations '
            'WHERE version = 20261129000012 AND success)' INTO pending;
    IF pending THEN
        RETURN; -- `arnela migrate`, run as the owner, does all of this
    END IF;
    EXECUTE format('ALTER DEFAULT PRIVILEGES FOR ROLE %I IN SCHEMA public '
                   'GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO arnela_runtime', owner);
    EXECUTE format('ALTER DEFAULT PRIVILEGES FOR ROLE %I IN SCHEMA public '
                   'GRANT USAGE, SELECT ON SEQUENCES TO arnela_runtime', owner);
    IF NOT has_table_privilege('arnela_runtime', 'public.task_events', 'SELECT') THEN
        GRANT USAGE ON SCHEMA public TO arnela_runtime;
        GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO arnela_runtime;
        GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO arnela_runtime;
        FOR appendonly IN SELECT DISTINCT tgrelid::regclass FROM pg_trigger
                   WHERE tgfoid = to_regprocedure('public.task_events_append_only()')
        LOOP
            EXECUTE format('REVOKE UPDATE, DELETE, TRUNCATE ON %s FROM arnela_runtime', appendonly);
        END LOOP;
        REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON public._sqlx_migrations FROM arnela_runtime;
        RAISE NOTICE 'granted arnela_runtime what migration 12 grants';
    END IF;
END
$$;

-- 6. What the service checks at start-up in production, and more: refuse to commit otherwise.
DO $$
DECLARE
    owner   text := current_setting('arnela.owner');
    runtime text := current_setting('arnela.runtime');
    power   text;
BEGIN
    SELECT g.rolname INTO power FROM pg_roles g
    WHERE g.rolname <> runtime AND (g.rolsuper OR g.rolname = owner)
      AND pg_has_role(runtime, g.oid, 'MEMBER')
    LIMIT 1;
    IF power IS NOT NULL THEN
        RAISE EXCEPTION '% is still a member of % (granted by another role?): revoke it', runtime, power;
    END IF;
    IF has_schema_privilege(runtime, 'public', 'CREATE') THEN
        RAISE EXCEPTION '% may still create objects in schema public', runtime;
    END IF;
    IF EXISTS (SELECT FROM pg_class WHERE oid = to_regclass('public.task_events')
               AND pg_get_userbyid(relowner) <> owner) THEN
        RAISE EXCEPTION 'task_events is not owned by %', owner;
    END IF;
    RAISE NOTICE 'roles ready in database %: % owns it (runs `arnela migrate`), % (member of '
                 'arnela_runtime) runs the service', current_database(), owner, runtime;
END
$$;

COMMIT;
