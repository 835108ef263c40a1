#!/bin/sh
# Once, for a compose volume created before the owner and runtime roles existed: there the role
# named by DB_USER was the volume's bootstrap superuser (POSTGRES_USER was DB_USER) and owned the
# database and every table, and the service logged in as it. The upgrade (README, "Audit"):
#
#   1. In .env, name that old role the superuser and give the service a NEW role, since the
#      bootstrap superuser can never lose SUPERUSER:
#        DB_SUPERUSER=arnela_user              # the old DB_USER
#        DB_SUPERUSER_PASSWORD=<the old DB_PASSWORD>
#        DB_OWNER_USER=arnela_owner            DB_OWNER_PASSWORD=<new: openssl rand -hex 32>
#        DB_USER=arnela_app                    DB_PASSWORD=<new: openssl rand -hex 32>
#   2. sh deploy/postgres/upgrade-roles.sh
#   3. docker compose up -d --build           # `migrate` (as the owner), then the api
#
# This script (re)creates the postgres container with the new .env (its health check, which
# logs in as the new DB_USER, fails until step 2 is done) and runs the init script,
# deploy/postgres/initdb/10-arnela-roles.sql, in it as DB_SUPERUSER: it creates the owner,
# arnela_runtime and the runtime role, makes the owner own the database, the public schema and
# every object in it, and refuses (changing nothing) a DB_USER or DB_OWNER_USER that is the
# bootstrap superuser. The passwords reach psql through the container's environment, not a
# command line. Running it again changes nothing.
set -eu
cd "$(dirname "$0")/../.."

docker compose up -d postgres
tries=0
until docker compose exec -T postgres sh -c 'pg_isready -q -d "$POSTGRES_DB"'; do
    tries=$((tries + 1))
    if [ "$tries" -ge 60 ]; then
        echo "upgrade-roles.sh: postgres does not accept connections (docker compose logs postgres)" >&2
        exit 1
    fi
    sleep 1
done

if ! docker compose exec -T postgres \
    sh -c 'exec psql -v ON_ERROR_STOP=1 --no-psqlrc -U "$POSTGRES_USER" -d "$POSTGRES_DB" -f -' \
    <deploy/postgres/initdb/10-arnela-roles.sql; then
    cat >&2 <<'MSG'
upgrade-roles.sh: FAILED, nothing was changed. The usual causes:
  - role "postgres" does not exist: this volume's superuser is the DB_USER it was created with;
    set DB_SUPERUSER to that name in .env (and DB_USER to a new name);
  - "... is this cluster's bootstrap superuser": DB_USER (or DB_OWNER_USER) still names the old
    role; choose a new name.
MSG
    exit 1
fi
echo "upgrade-roles.sh: done; now run: docker compose up -d --build"
