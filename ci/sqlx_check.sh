#!/usr/bin/env bash
# The query descriptions in .sqlx/ match the SQL in the code and the schema the migrations build:
# a fresh database gets every migration, then `cargo sqlx prepare --check` describes each checked
# query (`sqlx::query!` and friends) against it and compares with what is committed. A renamed
# column, a changed type or a query edited without `--prepare` fails here.
#
#   bash ci/sqlx_check.sh            check (CI)
#   bash ci/sqlx_check.sh --prepare  rewrite .sqlx/ after changing queries or migrations
#
# sqlx-cli is installed (pinned to the sqlx version in Cargo.lock) only where it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

SQLX_CLI_VERSION=0.8.6
ADMIN_URL=${SQLX_ADMIN_URL:-postgres://postgres@127.0.0.1:5432}
log() { printf 'sqlx_check.sh: %s\n' "$*" >&2; }

if ! cargo sqlx --version >/dev/null 2>&1; then
    log "installing sqlx-cli $SQLX_CLI_VERSION"
    cargo install --locked sqlx-cli --version "$SQLX_CLI_VERSION" \
        --no-default-features --features postgres,rustls
fi

db="arnela_sqlx_$$"
export DATABASE_URL="$ADMIN_URL/$db"
trap 'sqlx database drop -y >/dev/null 2>&1 || true' EXIT
sqlx database create
sqlx migrate run --source migrations >/dev/null

if [[ "${1:-}" == "--prepare" ]]; then
    cargo sqlx prepare -- --all-targets --locked
    log "wrote .sqlx/ ($(ls .sqlx | wc -l) queries)"
else
    cargo sqlx prepare --check -- --all-targets --locked
    log ".sqlx/ is current ($(ls .sqlx | wc -l) queries)"
fi
