#!/usr/bin/env bash
# Property-based API conformance check: runs Schemathesis against a freshly started
# `arnela serve` on its own database and Redis key prefix.
#
# Expects `cargo build` to have run (uses target/debug/arnela), Postgres on 127.0.0.1:5432
# (user postgres, trust auth) and Redis on 127.0.0.1:6379. Exits non-zero if Schemathesis
# reports a failure or an error.
#
# Tunables (environment): ST_MAX_EXAMPLES (per operation, default 100), ST_SEED (default 42),
# ST_WORKERS (default 2), ST_TIME_LIMIT (hard cap on the Schemathesis run in seconds,
# default 300), ST_CHECKS (comma-separated Schemathesis checks), PGHOST/PGPORT/PGUSER, REDIS_URL.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

ST_VERSION="4.32.5"
VENV="$ROOT/target/schemathesis-venv"
BIN="$ROOT/target/debug/arnela"
REPORT_DIR="$ROOT/target/schemathesis-report"
MAX_EXAMPLES="${ST_MAX_EXAMPLES:-100}"
SEED="${ST_SEED:-42}"
WORKERS="${ST_WORKERS:-2}"
TIME_LIMIT="${ST_TIME_LIMIT:-300}"
PGHOST="${PGHOST:-127.0.0.1}"
PGPORT="${PGPORT:-5432}"
PGUSER="${PGUSER:-postgres}"
export PGHOST PGPORT PGUSER
REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379}"

log() { printf 'schemathesis.sh: %s\n' "$*" >&2; }
# shellcheck source=ci/lib.sh
source "$ROOT/ci/lib.sh"

for tool in python3 createdb dropdb curl jq timeout; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        log "$tool is required but not installed"
        exit 2
    fi
done
if [[ ! -x "$BIN" ]]; then
    log "$BIN is missing; run cargo build first"
    exit 2
fi

# 1. Schemathesis, pinned, in its own venv (reused when it already holds the pinned version).
if [[ "$("$VENV/bin/schemathesis" --version 2>/dev/null || true)" != *" $ST_VERSION" ]]; then
    log "installing schemathesis $ST_VERSION into $VENV"
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$ST_VERSION"
fi

# 2. A fresh database, a free port, a unique key prefix, a JWT secret of this run only.
DB="arnela_st_$$_$(date +%s)"
PREFIX="arnela-st-$$-$(date +%s)"
PORT="$("$VENV/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')"
WORK="$(mktemp -d)"
JWT_SECRET="st-$("$VENV/bin/python" -c 'import secrets; print(secrets.token_hex(32))')"
SERVER_LOG="$WORK/arnela.log"
SERVER_PID=""
ST_PID=""
DB_CREATED=""

# shellcheck disable=SC2317 # invoked by the EXIT trap
cleanup() {
    local rc=$?
    set +e
    if [[ -n "$ST_PID" ]]; then
        kill -TERM "$ST_PID" 2>/dev/null
        wait "$ST_PID" 2>/dev/null
    fi
    if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null
        for _ in $(seq 1 50); do
            kill -0 "$SERVER_PID" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$SERVER_PID" 2>/dev/null
        wait "$SERVER_PID" 2>/dev/null
    fi
    if [[ -f "$SERVER_LOG" ]]; then
        mkdir -p "$REPORT_DIR" && cp "$SERVER_LOG" "$REPORT_DIR/arnela.log"
        if [[ $rc -ne 0 ]]; then
            log "server warnings and errors, else its last lines (full log: $REPORT_DIR/arnela.log):"
            { grep -E 'WARN|ERROR|panicked' "$SERVER_LOG" || tail -n 20 "$SERVER_LOG"; } | tail -n 40 >&2
            [[ -s "$SERVER_LOG" ]] || log "(the server wrote nothing)"
        fi
    fi
    if [[ -n "$DB_CREATED" ]]; then
        dropdb --if-exists --force "$DB" >/dev/null 2>&1 || log "could not drop database $DB"
    fi
    if command -v redis-cli >/dev/null 2>&1; then
        redis-cli -u "$REDIS_URL" --scan --pattern "$PREFIX*" 2>/dev/null \
            | xargs -r redis-cli -u "$REDIS_URL" del >/dev/null 2>&1
    fi
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

rm -rf "$REPORT_DIR"
createdb "$DB"
DB_CREATED=1
log "database $DB, port $PORT, key prefix $PREFIX"

start_serve "$BIN"
BASE="http://127.0.0.1:$PORT"
wait_live "$BASE"

# Every operation but the probes needs a bearer token: an admin's may call them all.
TOKEN="$(cd "$WORK" && env -i PATH="$PATH" JWT_SECRET="$JWT_SECRET" "$BIN" token --role admin --ttl 1h)"
AUTH_HEADER="Authorization: Bearer $TOKEN"

# Seed a few valid tasks (one per type, one batch) so the read operations return real
# documents and GET /tasks/{id} is tested with existing ids, not only with 404s.
seed() { # $1: path, $2: body; prints the response
    local out
    if ! out="$(curl -sS --fail-with-body --max-time 10 -X POST \
        -H 'Content-Type: application/json' -H "$AUTH_HEADER" --data "$2" "$BASE$1")"; then
        log "seeding POST $1 failed: $out"
        return 1
    fi
    printf '%s\n' "$out"
}
TASK_IDS=()
for body in \
    '{"type":"send_email","payload":{"to":"ana@example.com","subject":"Cita","body":"Hola"},"idempotency_key":"st-email"}' \
    '{"type":"send_sms","payload":{"phone":"+34600111222","message":"Recordatorio"},"max_attempts":5}' \
    '{"type":"send_whatsapp","payload":{"phone":"+34600111333","message":"Hola"},"run_at":"'"$(date -u -d '+1 day' +%Y-%m-%dT%H:%M:%SZ)"'"}' \
    '{"type":"sync_calendar","payload":{"event_id":"evt-1","action":"delete"}}'; do
    id="$(seed /tasks "$body" | jq -er .id)"
    TASK_IDS+=("$id")
done
batch='{"tasks":[{"type":"sync_calendar","payload":{"event_id":"evt-2","action":"create","appointment_data":{"starts_at":"2030-02-01T10:00:00Z","summary":"Revisión"}}},{"type":"send_email","payload":{"to":"ana@example.com","subject":"Cita","body":"Hola"},"idempotency_key":"st-email"}]}'
ids="$(seed /tasks/batch "$batch" | jq -er '.tasks[].id')"
mapfile -t -O "${#TASK_IDS[@]}" TASK_IDS <<<"$ids"
log "seeded tasks: ${TASK_IDS[*]}"
# A schedule (a yearly slot, so it fires nothing during the run): the schedule operations are
# then tested with an existing id too, and GET /schedules returns a real document.
schedule='{"name":"st reminders","cron":"0 9 1 1 *","time_zone":"Europe/Madrid","type":"send_sms","payload":{"phone":"+34600111222","message":"Recordatorio"}}'
SCHEDULE_ID="$(seed /schedules "$schedule" | jq -er .id)"
TASK_IDS+=("$SCHEDULE_ID")
log "seeded schedule: $SCHEDULE_ID"

# Dictionaries steer part of the generated values to ones the API accepts: existing task and
# schedule ids,
# real task types and statuses. The rest stays random, so 404s and 422s are still exercised.
CONFIG="$WORK/schemathesis.toml"
{
    printf '[dictionaries.task_ids]\nvalues = [%s]\n\n' "$(printf '"%s",' "${TASK_IDS[@]}" | sed 's/,$//')"
    cat <<'TOML'
[dictionaries.task_types]
values = ["send_email", "send_sms", "send_whatsapp", "sync_calendar"]

[dictionaries.task_statuses]
values = ["queued", "running", "retrying", "succeeded", "dead", "cancelled"]

[parameters]
"path.id" = { dictionary = "task_ids", probability = 0.5 }
"query.type" = { dictionary = "task_types", probability = 0.5 }
"query.status" = { dictionary = "task_statuses", probability = 0.5 }
"body.type" = { dictionary = "task_types", probability = 0.5 }
"body.tasks[*].type" = { dictionary = "task_types", probability = 0.5 }
TOML
} >"$CONFIG"

# 3. Schemathesis. `timeout` bounds the whole run; its exit code (124) counts as a failure.
CHECKS="${ST_CHECKS:-not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,response_headers_conformance}"
# shellcheck disable=SC2054 # the commas are Schemathesis list syntax
cmd=(
    "$VENV/bin/schemathesis" --config-file "$CONFIG" run "$BASE/openapi.json"
    --checks "$CHECKS"
    --max-examples "$MAX_EXAMPLES"
    --seed "$SEED"
    --workers "$WORKERS"
    --request-timeout 10
    --generation-database none
    --suppress-health-check too_slow,filter_too_much
    --report junit
    --report-dir "$REPORT_DIR"
    --no-color
)
log "running: ${cmd[*]} -H 'Authorization: Bearer ***'"
cmd+=(-H "$AUTH_HEADER")
start=$(date +%s)
st_rc=0
# From the report directory, so Schemathesis keeps its crash cache (.schemathesis/) under target/.
mkdir -p "$REPORT_DIR"
# In the background and waited for, so a TERM or INT to this script is handled at once.
(cd "$REPORT_DIR" && exec timeout --signal=TERM --kill-after=10 "$TIME_LIMIT" "${cmd[@]}") &
ST_PID=$!
wait "$ST_PID" || st_rc=$?
ST_PID=""
log "schemathesis finished in $(($(date +%s) - start)) s with exit code $st_rc"
if [[ $st_rc -eq 124 ]]; then
    log "schemathesis did not finish within ${TIME_LIMIT} s"
fi
if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    log "the server died during the run"
    st_rc=1
fi
if grep -q 'panicked' "$SERVER_LOG"; then
    log "the server panicked during the run:"
    grep -A3 'panicked' "$SERVER_LOG" | head -20 >&2
    st_rc=1
fi
exit "$st_rc"
