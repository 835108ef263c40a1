# Shared by ci/schemathesis.sh and ci/client.sh (sourced; both define `log`).
# Expects WORK, DB, PORT, PREFIX, JWT_SECRET, REDIS_URL, PGUSER/PGHOST/PGPORT and SERVER_LOG.

# start_serve BIN: runs `BIN serve` on the run's database, port and key prefix, from the
# scratch directory (so a developer's .env cannot change its settings); sets SERVER_PID.
start_serve() {
    (
        cd "$WORK"
        exec env \
            DATABASE_URL="postgres://$PGUSER@$PGHOST:$PGPORT/$DB" \
            REDIS_URL="$REDIS_URL" \
            APP_PORT="$PORT" \
            APP_ENV=development \
            ARNELA_KEY_PREFIX="$PREFIX" \
            JWT_SECRET="$JWT_SECRET" \
            RUST_LOG="${RUST_LOG:-info}" \
            NO_COLOR=1 \
            "$1" serve
    ) >"$SERVER_LOG" 2>&1 &
    SERVER_PID=$!
}

# wait_live BASE: waits until BASE/health/live answers (up to ~45 s, more with slow connects:
# migrations run at start-up); exits the script if the server dies or never answers.
wait_live() {
    local _
    for _ in $(seq 1 90); do
        if ! kill -0 "$SERVER_PID" 2>/dev/null; then
            log "the server exited before it became live"
            exit 1
        fi
        if curl -fs -o /dev/null --max-time 2 "$1/health/live"; then
            log "server live at $1"
            return 0
        fi
        sleep 0.5
    done
    log "the server did not answer $1/health/live in time"
    exit 1
}
