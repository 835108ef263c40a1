#!/usr/bin/env bash
# Checks what can be checked of the compose stack without a Docker engine, with Debian's
# docker-compose (installed with apt when missing): the newcomer's `cp .env.example .env` is
# refused until every secret is set, with a message saying how to generate one; the stack runs
# in production unless .env chooses development; no secret reaches a command line; the
# `observability` profile (Prometheus, Grafana) is opt-in, pinned, provisioned read-only from
# deploy/, published on loopback only, and scrapes the port the API's metrics listener uses; the
# database roles are separate (the api runs as neither the superuser nor the owner, a one-shot
# `migrate` service runs as the owner before the api starts, the init script is mounted
# read-only); the README's first command gives a .env compose accepts. When a PostgreSQL answers
# on 127.0.0.1:5432 (trust auth for `postgres`, as for the tests), the init script also runs
# against a scratch database and the privileges it leaves are checked.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
log() { printf 'compose_check.sh: %s\n' "$*" >&2; }
fail() {
    log "FAILED: $*"
    exit 1
}

if ! command -v docker-compose >/dev/null 2>&1; then
    log "installing docker-compose (Debian's package)"
    install() {
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
            docker-compose >/dev/null
    }
    install || { apt-get update -q >/dev/null && install; }
fi

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
cp "$ROOT/compose.yaml" "$ROOT/.env.example" "$ROOT/Dockerfile" "$WORK/"
cp -R "$ROOT/deploy" "$WORK/"
cd "$WORK"
config() { docker-compose --project-directory "$WORK" -f compose.yaml config 2>&1; }
api_env() { # $1: variable; prints its value in the resolved api service
    config | python3 -c 'import sys, yaml; print(yaml.safe_load(sys.stdin)["services"]["api"]["environment"].get(sys.argv[1], ""))' "$1"
}

# 1. The example as it is: refused, naming the secret and how to generate one.
cp .env.example .env
if out="$(config)"; then
    fail "docker-compose config accepted .env.example without secrets"
fi
grep -q "openssl rand -hex 32" <<<"$out" || fail "the refusal does not say how to generate a secret: $out"
for secret in DB_SUPERUSER_PASSWORD DB_OWNER_PASSWORD DB_PASSWORD REDIS_PASSWORD JWT_SECRET; do
    grep -Eq "^$secret=$" .env.example || fail ".env.example gives $secret a value"
done
log "ok: .env.example alone is refused: $(tail -n1 <<<"$out" | cut -c1-160)"

# 2. Secrets set, nothing else: production.
printf 'JWT_SECRET=%s\nDB_SUPERUSER_PASSWORD=%s\nDB_OWNER_PASSWORD=%s\nDB_PASSWORD=%s\nREDIS_PASSWORD=%s\n' \
    "$(openssl rand -hex 32)" "$(openssl rand -hex 24)" "$(openssl rand -hex 24)" \
    "$(openssl rand -hex 24)" "$(openssl rand -hex 24)" >>.env
[[ "$(api_env APP_ENV)" == "production" ]] || fail "the stack does not default to production"
log "ok: with the secrets set the stack runs APP_ENV=production"

# 3. No secret on a command line: redis-server reads its password from a file, Grafana its admin
#    password from its environment, the Postgres init script and health check theirs from the
#    container's environment.
echo "GRAFANA_ADMIN_PASSWORD=$(openssl rand -hex 24)" >>.env
resolved="$(config)"
python3 - "$resolved" <<'PY' || fail "a secret appears in a command, entrypoint or health check"
import sys, yaml
doc = yaml.safe_load(sys.argv[1])
SECRETS = ("REDIS_PASSWORD", "DB_PASSWORD", "JWT_SECRET", "GRAFANA_ADMIN_PASSWORD",
           "POSTGRES_PASSWORD", "DB_OWNER_PASSWORD", "DB_MIGRATION_PASSWORD")
values = {}
for service in doc["services"].values():
    for secret in SECRETS:
        value = str((service.get("environment") or {}).get(secret, ""))
        if value:
            values[value] = secret
for name, service in doc["services"].items():
    for key in ("command", "entrypoint", "healthcheck"):
        words = service.get(key) or []
        if key == "healthcheck":
            words = words.get("test") or []
        text = " ".join(words) if isinstance(words, list) else str(words)
        for value, secret in values.items():
            if value in text:
                print(f"{name}.{key} holds the value of {secret}")
                sys.exit(1)
PY
log "ok: no secret value in any command, entrypoint or health check"

# 3b. The database roles: the api runs as neither the superuser nor the owner; a one-shot
#     `migrate` service runs as the owner, and the api starts only once it has succeeded; the
#     init script that creates the roles is mounted read-only; Postgres is healthy only when the
#     api's role can log in. Checked on the resolved configuration, and shown to catch a .env
#     that makes the api's role the superuser.
roles_check() { # $1: resolved configuration
    python3 - "$1" "$WORK" <<'PY'
import os, sys, yaml
doc, work = yaml.safe_load(sys.argv[1]), sys.argv[2]
services = doc["services"]
problems = []
pg = services["postgres"]
pg_env = pg.get("environment") or {}
api = services["api"]
api_env = api.get("environment") or {}
superuser, owner = pg_env.get("POSTGRES_USER"), pg_env.get("DB_OWNER_USER")
runtime = api_env.get("DB_USER")
if not superuser or not owner or not runtime:
    problems.append(f"roles not all named: superuser {superuser!r}, owner {owner!r}, api {runtime!r}")
if runtime in (superuser, owner):
    problems.append(f"the api runs as {runtime!r}: the superuser is {superuser!r}, the owner {owner!r}")
if superuser == owner:
    problems.append(f"the owner is the superuser {superuser!r}")
if (pg_env.get("DB_USER"), pg_env.get("DB_PASSWORD")) != (runtime, api_env.get("DB_PASSWORD")):
    problems.append("postgres creates another DB_USER / DB_PASSWORD than the api uses")
if any(k.startswith("DB_MIGRATION") or k == "DB_OWNER_PASSWORD" for k in api_env):
    problems.append("the api's environment holds the owner's credentials")
migrate = services.get("migrate")
if migrate is None:
    problems.append("no migrate service")
else:
    m_env = migrate.get("environment") or {}
    if migrate.get("command") != ["migrate"]:
        problems.append(f"migrate runs {migrate.get('command')!r}, not ['migrate']")
    if migrate.get("image") != api.get("image"):
        problems.append(f"migrate runs image {migrate.get('image')!r}, the api {api.get('image')!r}")
    if str(migrate.get("restart", "no")) not in ("no", "False", "false"):
        problems.append(f"migrate restarts: {migrate.get('restart')!r}")
    if (m_env.get("DB_MIGRATION_USER"), m_env.get("DB_MIGRATION_PASSWORD")) != (owner, pg_env.get("DB_OWNER_PASSWORD")):
        problems.append("migrate does not log in as the owner (DB_MIGRATION_USER / DB_MIGRATION_PASSWORD)")
    extra = {k: v for k, v in m_env.items() if k not in ("DB_MIGRATION_USER", "DB_MIGRATION_PASSWORD")}
    if extra != api_env:
        problems.append("migrate's environment is not the api's (plus the owner's credentials)")
    if (migrate.get("depends_on") or {}).get("postgres", {}).get("condition") != "service_healthy":
        problems.append("migrate does not wait for a healthy postgres")
if (api.get("depends_on") or {}).get("migrate", {}).get("condition") != "service_completed_successfully":
    problems.append("the api does not wait for migrate to complete successfully")
mounts = []
for vol in pg.get("volumes", []):
    source, target, *mode = vol.split(":") if isinstance(vol, str) else (vol["source"], vol["target"], "ro" if vol.get("read_only") else "rw")
    if target == "/docker-entrypoint-initdb.d":
        mounts.append((source, mode))
if len(mounts) != 1:
    problems.append(f"postgres mounts {len(mounts)} init script directories")
else:
    source, mode = mounts[0]
    if source != os.path.join(work, "deploy/postgres/initdb") or not os.path.isdir(source):
        problems.append(f"postgres's init scripts come from {source}, not deploy/postgres/initdb")
    if mode != ["ro"]:
        problems.append(f"the init script directory is mounted {mode or 'rw'}, not read-only")
test = " ".join((pg.get("healthcheck") or {}).get("test") or []).replace("$$", "$")
if '-U "$DB_USER"' not in test or 'PGPASSWORD="$DB_PASSWORD"' not in test or "POSTGRES_USER" in test:
    problems.append(f"the postgres health check does not log in as the api's role: {test}")
if problems:
    print("\n".join(problems))
    sys.exit(1)
PY
}
roles_check "$resolved" || fail "the database roles"
{
    sed '/^DB_USER=/d' .env
    echo "DB_USER=$(grep -E '^DB_SUPERUSER=' .env | tail -n1 | cut -d= -f2)"
} >superuser.env
bad="$(docker-compose --project-directory "$WORK" -f compose.yaml --env-file superuser.env config 2>&1)" ||
    fail "docker-compose config with DB_USER=DB_SUPERUSER: $bad"
if roles_check "$bad" >/dev/null; then
    fail "the roles check accepts an api running as the superuser"
fi
log "ok: the api runs as DB_USER, neither the superuser nor the owner; migrate (as the owner) completes before it starts; initdb mounted read-only; the health check logs in as DB_USER"

# 4. Development is an explicit choice.
echo "APP_ENV=development" >>.env
[[ "$(api_env APP_ENV)" == "development" ]] || fail "APP_ENV=development in .env is not honoured"
log "ok: APP_ENV=development in .env chooses development"

# 4b. The README's first command: the .env it writes is accepted, in development.
quickstart="$(grep -E '^cp \.env\.example \.env && ' "$ROOT/README.md" | head -n1)"
[[ "$quickstart" == *" && docker compose up --build" ]] || fail "README.md has no 'cp .env.example .env && ... && docker compose up --build' line"
mkdir "$WORK/quickstart"
cp "$WORK/compose.yaml" "$WORK/.env.example" "$WORK/Dockerfile" "$WORK/quickstart/"
cp -R "$WORK/deploy" "$WORK/quickstart/"
(cd "$WORK/quickstart" && bash -euo pipefail -c "${quickstart% && docker compose up --build}") ||
    fail "the README's first command fails: $quickstart"
out="$(docker-compose --project-directory "$WORK/quickstart" -f "$WORK/quickstart/compose.yaml" config 2>&1)" ||
    fail "the .env of the README's first command is refused: $out"
[[ "$(python3 -c 'import sys, yaml; print(yaml.safe_load(sys.stdin)["services"]["api"]["environment"]["APP_ENV"])' <<<"$out")" == development ]] ||
    fail "the README's first command does not choose development"
log "ok: the README's first command writes a .env compose accepts (development)"

# 5. The observability profile.
observability="$(docker-compose --project-directory "$WORK" -f compose.yaml --profile observability config 2>&1)" ||
    fail "docker-compose --profile observability config: $observability"
python3 - "$observability" "$WORK" <<'PY' || fail "the observability profile"
import os, re, sys, yaml
doc, work = yaml.safe_load(sys.argv[1]), sys.argv[2]
services, networks = doc["services"], doc.get("networks", {})
problems = []
for name in ("prometheus", "grafana"):
    svc = services.get(name)
    if svc is None:
        problems.append(f"no {name} service")
        continue
    if svc.get("profiles") != ["observability"]:
        problems.append(f"{name} is not only in the observability profile: {svc.get('profiles')}")
    image = svc.get("image", "")
    if not re.fullmatch(r"[\w./-]+:v?\d+\.\d+\.\d+", image):
        problems.append(f"{name}: image {image!r} is not pinned to a version")
    for opt in ("no-new-privileges:true",):
        if opt not in svc.get("security_opt", []):
            problems.append(f"{name}: no security_opt {opt}")
    if "healthcheck" not in svc:
        problems.append(f"{name}: no healthcheck")
    for vol in svc.get("volumes", []):
        source, target, *mode = vol.split(":") if isinstance(vol, str) else (vol["source"], vol["target"], "ro" if vol.get("read_only") else "rw")
        if source.startswith("/"):  # a bind mount (named volumes have no slash)
            if not source.startswith(work + "/deploy/"):
                problems.append(f"{name}: bind mount {source} is not under deploy/")
            if not os.path.exists(source):
                problems.append(f"{name}: bind mount {source} does not exist")
            if mode != ["ro"]:
                problems.append(f"{name}: bind mount {source} is not read-only")
# Published ports: only the API's and Grafana's, on loopback.
for name, svc in services.items():
    for port in svc.get("ports", []):
        text = port if isinstance(port, str) else f"{port.get('host_ip', '')}:{port.get('published')}:{port.get('target')}"
        if name == "grafana" and not text.startswith("127.0.0.1:"):
            problems.append(f"grafana publishes {text}, not on 127.0.0.1 only")
        if name not in ("api", "grafana"):
            problems.append(f"{name} publishes {text}")
# Prometheus reaches the API's metrics listener on an internal network, at the port it listens on.
api, prom = services["api"], services.get("prometheus", {})
shared = set(api.get("networks", {})) & set(prom.get("networks", {}))
if not shared:
    problems.append("prometheus shares no network with api")
elif not all(networks.get(n, {}).get("internal") for n in prom.get("networks", {})):
    problems.append("prometheus is on a network that is not internal")
metrics_addr = str(api.get("environment", {}).get("METRICS_ADDR", ""))
with open(os.path.join(work, "deploy/prometheus/prometheus.yml")) as f:
    config = yaml.safe_load(f)
targets = [t for job in config["scrape_configs"] if job["job_name"] == "arnela"
           for sc in job.get("static_configs", []) for t in sc["targets"]]
if not metrics_addr:
    problems.append("the api's METRICS_ADDR is empty by default: Prometheus would scrape nothing")
elif targets != [f"api:{metrics_addr.rsplit(':', 1)[1]}"]:
    problems.append(f"prometheus.yml scrapes {targets}, the api's METRICS_ADDR is {metrics_addr}")
if problems:
    print("\n".join(problems))
    sys.exit(1)
PY
log "ok: --profile observability: prometheus and grafana pinned and opt-in, provisioned read-only from deploy/; grafana on 127.0.0.1 only; prometheus scrapes the api's METRICS_ADDR port"

# 6. The init script against a real PostgreSQL (as the tests use: 127.0.0.1:5432, trust auth for
#    `postgres`), on a scratch database with scratch role names, dropped afterwards: it creates
#    the roles (tolerating an arnela_runtime that exists already), runs again without error,
#    refuses the bootstrap superuser as DB_USER; with target/debug/arnela, `arnela migrate` as
#    the owner applies the migrations, and the runtime role may not rewrite the log.
pg() { psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p 5432 -U postgres "$@"; }
if ! command -v psql >/dev/null 2>&1 || ! pg -d postgres -Atc 'SELECT 1' >/dev/null 2>&1; then
    log "SKIPPED: the init script against PostgreSQL (none answers on 127.0.0.1:5432)"
    exit 0
fi
sfx="$(date +%s)_$$"
db="arnela_roles_$sfx" owner="arnela_owner_$sfx" runtime="arnela_user_$sfx"
drop_scratch() {
    pg -d postgres -c "DROP DATABASE IF EXISTS $db" -c "DROP ROLE IF EXISTS $runtime" \
        -c "DROP ROLE IF EXISTS $owner" >/dev/null 2>&1 || log "could not drop $db, $owner, $runtime"
}
trap 'drop_scratch; rm -rf "$WORK"' EXIT
pg -d postgres -c "CREATE DATABASE $db"
init_script() { # environment: DB_OWNER_USER, DB_USER
    DB_OWNER_PASSWORD="$(openssl rand -hex 16)" DB_PASSWORD="$(openssl rand -hex 16)" \
        psql -X -v ON_ERROR_STOP=1 -h 127.0.0.1 -p 5432 -U postgres -d "$db" \
        -f "$ROOT/deploy/postgres/initdb/10-arnela-roles.sql" 2>&1
}
out="$(DB_OWNER_USER="$owner" DB_USER=postgres init_script)" &&
    fail "the init script accepts the bootstrap superuser as DB_USER: $out"
grep -q "bootstrap superuser" <<<"$out" || fail "the init script's refusal does not say why: $out"
out="$(DB_OWNER_USER="$owner" DB_USER="$runtime" init_script)" || fail "the init script: $out"
out="$(DB_OWNER_USER="$owner" DB_USER="$runtime" init_script)" || fail "the init script, run again: $out"
state="$(pg -d "$db" -At -F' ' -c "SELECT pg_get_userbyid(datdba), (SELECT pg_get_userbyid(nspowner) FROM pg_namespace WHERE nspname = 'public'), r.rolsuper, r.rolcanlogin, pg_has_role('$runtime', 'arnela_runtime', 'MEMBER'), has_schema_privilege('$runtime', 'public', 'CREATE'), has_database_privilege('$runtime', '$db', 'TEMPORARY') FROM pg_database, pg_roles r WHERE datname = '$db' AND r.rolname = '$runtime'")"
[[ "$state" == "$owner $owner f t t f f" ]] ||
    fail "after the init script (database owner, schema owner, runtime superuser, login, member of arnela_runtime, CREATE on public, TEMPORARY): $state"
if [[ -x "$ROOT/target/debug/arnela" ]]; then
    url="postgres://$runtime:unused@127.0.0.1:5432/$db"
    out="$(cd "$WORK" && env -i PATH="$PATH" DATABASE_URL="$url" DB_MIGRATION_USER="$owner" \
        DB_MIGRATION_PASSWORD=unused "$ROOT/target/debug/arnela" migrate 2>&1)" ||
        fail "arnela migrate as the owner: $out"
    for statement in "UPDATE task_events SET data = data" "DELETE FROM task_events" \
        "TRUNCATE task_events" "ALTER TABLE task_events DISABLE TRIGGER USER" \
        "DELETE FROM schedule_events" "CREATE TABLE scratch (a int)"; do
        if out="$(psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -U "$runtime" -d "$db" -c "$statement" 2>&1)"; then
            fail "the runtime role may: $statement"
        fi
    done
    out="$(cd "$WORK" && env -i PATH="$PATH" DATABASE_URL="$url" "$ROOT/target/debug/arnela" audit verify 2>&1)" ||
        fail "arnela audit verify as the runtime role: $out"
    log "ok: the init script creates the roles (twice, refusing the bootstrap superuser); arnela migrate as the owner; the runtime role reads the log and cannot rewrite it"
else
    log "ok: the init script creates the roles (twice, refusing the bootstrap superuser); no target/debug/arnela: migrations not tried"
fi
