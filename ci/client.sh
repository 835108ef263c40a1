#!/usr/bin/env bash
# Typed-client check: generates a Python client from the committed openapi/openapi.json with
# openapi-python-client, fails on any generator warning, then runs ci/client_check.py with that
# client against a freshly started `arnela serve` on its own database and Redis key prefix.
#
# Expects `cargo build` to have run (uses target/debug/arnela), Postgres on 127.0.0.1:5432
# (user postgres, trust auth) and Redis on 127.0.0.1:6379. Exits non-zero if the generator warns
# or fails, or if a check fails. The generated package, the generator's output and the server log
# are left in target/client-report/.
#
# Tunables (environment): CLIENT_SPEC (the spec to generate from, default openapi/openapi.json: a
# draft can be tried before it is committed), CLIENT_TIME_LIMIT (hard cap on client_check.py in
# seconds, default 120), PGHOST/PGPORT/PGUSER, REDIS_URL.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

GEN_VERSION="0.29.1"
# The generated package's runtime dependencies, and the spec validator.
RUNTIME_DEPS=("httpx==0.28.1" "attrs==26.1.0" "python-dateutil==2.9.0.post0" "openapi-spec-validator==0.9.0")
VENV="$ROOT/target/client-venv"
BIN="$ROOT/target/debug/arnela"
SPEC="${CLIENT_SPEC:-$ROOT/openapi/openapi.json}"
REPORT_DIR="$ROOT/target/client-report"
PACKAGE="arnela_client"
TIME_LIMIT="${CLIENT_TIME_LIMIT:-120}"
PGHOST="${PGHOST:-127.0.0.1}"
PGPORT="${PGPORT:-5432}"
PGUSER="${PGUSER:-postgres}"
export PGHOST PGPORT PGUSER
REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379}"

log() { printf 'client.sh: %s\n' "$*" >&2; }
# shellcheck source=ci/lib.sh
source "$ROOT/ci/lib.sh"

for tool in python3 createdb dropdb curl timeout; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        log "$tool is required but not installed"
        exit 2
    fi
done
if [[ ! -x "$BIN" ]]; then
    log "$BIN is missing; run cargo build first"
    exit 2
fi
started=$(date +%s)

# 1. The generator, pinned, in its own venv (reused when it already holds the pinned version).
if [[ "$("$VENV/bin/openapi-python-client" --version 2>/dev/null || true)" != *" $GEN_VERSION" ]]; then
    log "installing openapi-python-client $GEN_VERSION into $VENV"
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "openapi-python-client==$GEN_VERSION"
fi

# 2. Generate the client. Any output but the "Generating <path>" line is a warning or an error
# (the generator's post hooks run the ruff of its venv, hence the PATH).
rm -rf "$REPORT_DIR"
mkdir -p "$REPORT_DIR"
GEN_LOG="$REPORT_DIR/generator.log"
gen_cmd=(
    "$VENV/bin/openapi-python-client" generate
    --path "$SPEC"
    --output-path "$REPORT_DIR/$PACKAGE"
    --meta none
    --fail-on-warning
)
log "running: ${gen_cmd[*]}"
gen_rc=0
PATH="$VENV/bin:$PATH" NO_COLOR=1 TERM=dumb timeout 120 "${gen_cmd[@]}" >"$GEN_LOG" 2>&1 </dev/null \
    || gen_rc=$?
sed 's/^/  | /' "$GEN_LOG" >&2
extra="$(grep -Ev '^(Generating .*)?[[:space:]]*$' "$GEN_LOG" || true)"
if [[ $gen_rc -ne 0 || -n "$extra" ]]; then
    log "the generator warned or failed (exit code $gen_rc); see the output above"
    exit 1
fi
if [[ ! -f "$REPORT_DIR/$PACKAGE/__init__.py" ]]; then
    log "the generator wrote no package at $REPORT_DIR/$PACKAGE"
    exit 1
fi
log "generated $REPORT_DIR/$PACKAGE without warnings"

# 3. The generated package's runtime dependencies, pinned, in the same venv.
missing=()
for req in "${RUNTIME_DEPS[@]}"; do
    have="$("$VENV/bin/python" -c 'import sys, importlib.metadata as m; print(m.version(sys.argv[1]))' \
        "${req%%==*}" 2>/dev/null || true)"
    [[ "$have" == "${req#*==}" ]] || missing+=("$req")
done
if [[ ${#missing[@]} -gt 0 ]]; then
    log "installing ${missing[*]} into $VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "${missing[@]}"
fi

# The committed document is valid OpenAPI, and its examples match their schemas.
"$VENV/bin/python" "$ROOT/ci/spec_check.py" "$SPEC"

# 4. A fresh database, a free port, a unique key prefix, a JWT secret of this run only.
DB="arnela_client_$$_$(date +%s)"
PREFIX="arnela-client-$$-$(date +%s)"
PORT="$("$VENV/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')"
WORK="$(mktemp -d)"
JWT_SECRET="client-$("$VENV/bin/python" -c 'import secrets; print(secrets.token_hex(32))')"
SERVER_LOG="$WORK/arnela.log"
SERVER_PID=""
CHECK_PID=""
DB_CREATED=""

# shellcheck disable=SC2317 # invoked by the EXIT trap
cleanup() {
    local rc=$?
    set +e
    if [[ -n "$CHECK_PID" ]]; then
        kill -TERM "$CHECK_PID" 2>/dev/null
        wait "$CHECK_PID" 2>/dev/null
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
        cp "$SERVER_LOG" "$REPORT_DIR/arnela.log"
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
    log "finished in $(($(date +%s) - started)) s with exit code $rc"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# The server and `arnela token` run from one copy of the binary, so a concurrent rebuild of
# target/debug/arnela cannot give them different builds.
cp "$BIN" "$WORK/arnela"
createdb "$DB"
DB_CREATED=1
log "database $DB, port $PORT, key prefix $PREFIX"

start_serve "$WORK/arnela"
BASE="http://127.0.0.1:$PORT"
wait_live "$BASE"

TOKEN="$(cd "$WORK" && env -i PATH="$PATH" JWT_SECRET="$JWT_SECRET" "$WORK/arnela" token --role admin --ttl 1h)"

# 5. The checks, with the generated package importable. `timeout` bounds them (exit code 124).
log "running: ci/client_check.py against $BASE"
check_rc=0
# In the background and waited for, so a TERM or INT to this script is handled at once.
ARNELA_BASE_URL="$BASE" ARNELA_TOKEN="$TOKEN" PYTHONPATH="$REPORT_DIR" \
    timeout --signal=TERM --kill-after=10 "$TIME_LIMIT" \
    "$VENV/bin/python" "$ROOT/ci/client_check.py" </dev/null &
CHECK_PID=$!
wait "$CHECK_PID" || check_rc=$?
CHECK_PID=""
if [[ $check_rc -eq 124 ]]; then
    log "client_check.py did not finish within ${TIME_LIMIT} s"
fi
if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    log "the server died during the run"
    check_rc=1
fi
if grep -q 'panicked' "$SERVER_LOG"; then
    log "the server panicked during the run:"
    grep -A3 'panicked' "$SERVER_LOG" | head -20 >&2
    check_rc=1
fi
exit "$check_rc"
