#!/usr/bin/env bash
# Arnela's benchmark, all figures from one run on one machine:
#
#   1. the physical limit: pgbench running the enqueue statement (bench/enqueue.pgbench) at the
#      same concurrencies as the HTTP enqueue levels, the 1,000-task batch statement
#      (bench/enqueue-batch.pgbench) from 2 clients as the batch enqueue sends it, and the
#      statements that take 1,000 tasks end to end (bench/lifecycle.pgbench: the batch enqueue,
#      then the workers' claims and completions) from 2 clients;
#   2. Arnela (release build) with the default settings, measured by `arnela-bench`: single and
#      batch enqueue, end to end (the median of three runs), enqueue → start latency at half the
#      end-to-end rate, a sustained stream at 80% of it for 60 s, and end to end again (three
#      runs) after 1,000,000 more tasks went through the same tables; then cached reads and
#      history reads on a large log;
#   3. the peer: BullMQ from the npm registry on the same Redis, same concurrency, the median of
#      three runs;
#   4. end to end on a local Redis Cluster (ci/redis-cluster.sh: three masters with one replica
#      each) with QUEUE_SHARDS=1 and 3.
#
# It prints a Markdown table with the ratios, then the issue's targets with the measured value
# and whether each is met, and writes target/bench/report.md and the JSON of each run under
# target/bench/. Needs Postgres on 127.0.0.1:5432 (trust auth, user postgres),
# Redis on 127.0.0.1:6379, pgbench, and node + npm for the peer (skipped when missing).
#
#   bash bench/run.sh              # full run (a few minutes)
#   BENCH_QUICK=1 bash bench/run.sh   # tiny N, 1 s levels: proves the pipeline works
set -euo pipefail
cd "$(dirname "$0")/.."

QUICK="${BENCH_QUICK:-}"
SECONDS_PER_LEVEL=5
TASKS=10000
STREAM_SECONDS=60
CHURN=1000000
PEER_JOBS=20000
PEER_CONCURRENCY=50
PGBENCH_SECONDS=10
if [[ -n "$QUICK" ]]; then
    SECONDS_PER_LEVEL=1; TASKS=200; STREAM_SECONDS=3; CHURN=2000; PEER_JOBS=500; PGBENCH_SECONDS=2
fi
OUT=target/bench
mkdir -p "$OUT"
PORT="${BENCH_PORT:-18480}"
DB="arnela_bench_$$"
BIN=target/release/arnela
BENCH=target/release/arnela-bench
# The service and `arnela-bench` (which signs an admin token with it) share a secret of this run.
JWT_SECRET="bench-$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')"
export JWT_SECRET
SERVICE_PID=""

log() { printf 'bench: %s\n' "$*" >&2; }

cleanup() {
    if [[ -n "$SERVICE_PID" ]]; then kill "$SERVICE_PID" 2>/dev/null || true; wait "$SERVICE_PID" 2>/dev/null || true; fi
    dropdb -h 127.0.0.1 -U postgres --if-exists --force "$DB" 2>/dev/null || true
    # the keys the services of this run left in Redis (every prefix starts with bench$$-; the
    # cached reads alone leave thousands)
    redis-cli -h 127.0.0.1 -p 6379 --scan --pattern "*bench$$-*" 2>/dev/null \
        | xargs -r redis-cli -h 127.0.0.1 -p 6379 del >/dev/null 2>&1 || true
}
trap cleanup EXIT

cargo build --release --locked --bin arnela --bin arnela-bench >&2

createdb -h 127.0.0.1 -U postgres "$DB"
DBURL="postgres://postgres@127.0.0.1:5432/$DB"
DATABASE_URL="$DBURL" "$BIN" migrate >&2

# --- 1. the physical limit ------------------------------------------------------------------
# pgbench's transactions per second for a script on the run's database (its arguments: the
# clients, the script, any option); a failure stops the run with what pgbench said
pgbench_tps() {
    local tps
    tps=$(pgbench -h 127.0.0.1 -U postgres -n -j 2 -T "$PGBENCH_SECONDS" "$@" "$DB" 2>"$OUT/pgbench.err" \
        | awk '/^tps = / {print $3; exit}') || { log "pgbench failed:"; cat "$OUT/pgbench.err" >&2; exit 1; }
    echo "${tps:-0}"
}
declare -A PGB
for c in 1 8 32 64; do
    PGB[$c]=$(pgbench_tps -c "$c" -f bench/enqueue.pgbench)
    log "pgbench enqueue statement, $c clients: ${PGB[$c]} tx/s"
done
# the batch statement (1,000 tasks) from 2 clients, as the batch enqueue below sends it
tps=$(pgbench_tps -c 2 -f bench/enqueue-batch.pgbench)
PGB_BATCH=$(python3 -c "print(round(float('$tps') * 1000))")
log "pgbench batch statement (1,000 tasks), 2 clients: $PGB_BATCH tasks/s"
# the database's share of end to end: 1,000 tasks enqueued, claimed and completed in the
# engine's statements (bench/lifecycle.pgbench), from 2 clients, prepared as the service's are
tps=$(pgbench_tps -c 2 -M prepared -f bench/lifecycle.pgbench)
PGB_LIFECYCLE=$(python3 -c "print(round(float('$tps') * 1000))")
log "pgbench lifecycle statements (1,000 tasks end to end), 2 clients: $PGB_LIFECYCLE tasks/s"
# a fresh database for the service (the log refuses TRUNCATE, to everyone)
dropdb -h 127.0.0.1 -U postgres --force "$DB"
createdb -h 127.0.0.1 -U postgres "$DB"
DATABASE_URL="$DBURL" "$BIN" migrate >&2

start_service() {
    local prefix="bench$$-$1"; shift
    # shellcheck disable=SC2086
    env -i PATH="$PATH" HOME="${HOME:-/root}" DATABASE_URL="$DBURL" REDIS_URL=redis://127.0.0.1:6379 \
        ARNELA_KEY_PREFIX="$prefix" APP_PORT="$PORT" JWT_SECRET="$JWT_SECRET" RUST_LOG=warn "$@" \
        "$BIN" serve >"$OUT/service-$prefix.log" 2>&1 &
    SERVICE_PID=$!
    for _ in $(seq 1 100); do
        curl -sf "http://127.0.0.1:$PORT/health/live" >/dev/null && return 0
        sleep 0.1
    done
    log "the service did not start; see $OUT/service-$prefix.log"
    return 1
}

stop_service() {
    kill "$SERVICE_PID"; wait "$SERVICE_PID" 2>/dev/null || true; SERVICE_PID=""
}

# --- 2. Arnela, default settings ---------------------------------------------------------------
start_service default
"$BENCH" --url "http://127.0.0.1:$PORT" --database-url "$DBURL" --seconds "$SECONDS_PER_LEVEL" \
    --tasks "$TASKS" --stream-seconds "$STREAM_SECONDS" --churn "$CHURN" \
    --service-pid "$SERVICE_PID" --json "$OUT/default.json" >"$OUT/default.md"
stop_service

# --- 2b. GET /tasks/{id}: uncached, cached, cached while the tasks run ------------------------
start_service reads
"$BENCH" --url "http://127.0.0.1:$PORT" --database-url "$DBURL" --reads-only \
    --seconds "$SECONDS_PER_LEVEL" --readers 16 --json "$OUT/reads.json" >"$OUT/reads.md"
stop_service

# --- 2c. history reads on a large log ------------------------------------------------------------
# Tasks with five events each, generated in SQL (not through the API), then GET /tasks/{id}/events.
HISTORY_TASKS=2000000
[[ -n "$QUICK" ]] && HISTORY_TASKS=2000
log "generating $((HISTORY_TASKS * 5)) events in SQL"
psql -h 127.0.0.1 -U postgres -d "$DB" -v ON_ERROR_STOP=1 -q <<SQL >&2
INSERT INTO tasks (id, task_type, payload, status, attempts, max_attempts, run_at, version,
                   last_hash, enqueued_position, created_at, updated_at)
SELECT gen_random_uuid(), 'send_sms', jsonb_build_object('phone', '+34123456789', 'message', 'm' || g),
       'succeeded', 1, 3, now(), 5, '\x00', g::bigint * 8, now(), now()
FROM generate_series(1, $HISTORY_TASKS) g;
INSERT INTO task_events (position, task_id, sequence, event_type, event_version, data, occurred_at, hash)
SELECT t.enqueued_position + s, t.id, s,
       (ARRAY['enqueued','dispatched','attempt_started','attempt_succeeded','attempt_succeeded'])[s], 1,
       jsonb_build_object('attempt', 1), now(), '\x00'
FROM tasks t, generate_series(1, 5) s WHERE t.enqueued_position < 100000000;
VACUUM ANALYZE tasks;
VACUUM ANALYZE task_events;
-- the generated events are synthetic: the projectors start after them instead of replaying them
-- during the read measurement
UPDATE projector_checkpoints SET position = (SELECT max(position) FROM task_events);
SQL
start_service history
"$BENCH" --url "http://127.0.0.1:$PORT" --database-url "$DBURL" --history-only \
    --service-pid "$SERVICE_PID" --json "$OUT/history.json" >"$OUT/history.md"
stop_service

# --- 2d. end to end on a local Redis Cluster, one queue shard and three ---------------------------
# Three masters with one replica each (ci/redis-cluster.sh) on this same machine; the service
# with REDIS_CLUSTER=true and QUEUE_SHARDS=1, then 3.
CLUSTER_PORT="${BENCH_CLUSTER_PORT:-17100}"
CLUSTER_DIR=""
if command -v redis-server >/dev/null && command -v redis-cli >/dev/null; then
    CLUSTER_DIR=$(mktemp -d)
    trap 'bash ci/redis-cluster.sh stop "$CLUSTER_DIR" 2>/dev/null || true; cleanup' EXIT
    bash ci/redis-cluster.sh start "$CLUSTER_DIR" "$CLUSTER_PORT" >&2
    # each on a fresh database, beside the same measurement on the one Redis server
    for variant in single cluster-1 cluster-3; do
        dropdb -h 127.0.0.1 -U postgres --force "$DB"
        createdb -h 127.0.0.1 -U postgres "$DB"
        DATABASE_URL="$DBURL" "$BIN" migrate >/dev/null 2>&1
        case "$variant" in
            single) start_service "$variant" ;;
            *) start_service "$variant" REDIS_URL="redis://127.0.0.1:$CLUSTER_PORT" REDIS_CLUSTER=true \
                   QUEUE_SHARDS="${variant#cluster-}" ;;
        esac
        "$BENCH" --url "http://127.0.0.1:$PORT" --database-url "$DBURL" --end-to-end-only \
            --tasks "$TASKS" --json "$OUT/$variant.json" >"$OUT/$variant.md"
        stop_service
    done
    bash ci/redis-cluster.sh stop "$CLUSTER_DIR"
else
    log "redis-server/redis-cli not found; the cluster runs are skipped"
fi

# --- 3. the peer -----------------------------------------------------------------------------
PEER='{}'
if command -v node >/dev/null && command -v npm >/dev/null; then
    if npm install --prefix bench/bullmq --no-audit --no-fund --silent >&2; then
        # three runs, as Arnela's end to end: the report takes the median of each rate
        PEER='['
        for run in 1 2 3; do
            one=$(cd bench/bullmq && N="$PEER_JOBS" CONCURRENCY="$PEER_CONCURRENCY" node bench.js) || one='{}'
            PEER="$PEER$one"; [[ $run -lt 3 ]] && PEER="$PEER,"
        done
        PEER="$PEER]"
    else
        log "npm install bullmq failed; the peer is skipped"
    fi
else
    log "node/npm not found; the peer is skipped"
fi
echo "$PEER" >"$OUT/bullmq.json"

# --- report ----------------------------------------------------------------------------------
# The server's vacuum settings decide the after-churn figure: the queue tables (outbox,
# task_leases) and tasks are updated at every transition and keep their dead rows until vacuumed.
PG_VACUUM=$(psql -h 127.0.0.1 -U postgres -At -d "$DB" \
    -c "SELECT 'autovacuum ' || current_setting('autovacuum') || ', autovacuum_naptime ' || current_setting('autovacuum_naptime') || ', PostgreSQL ' || current_setting('server_version')")
python3 - "$OUT" "${PGB[1]}" "${PGB[8]}" "${PGB[32]}" "${PGB[64]}" "$(git rev-parse --short HEAD)" "$PGB_BATCH" "$PG_VACUUM" "$PGB_LIFECYCLE" <<'PY' | tee "$OUT/report.md"
import json, os, sys, datetime, platform
out, p1, p8, p32, p64, commit, pgb_batch, pg_vacuum, pgb_lifecycle = sys.argv[1:10]
pgb_batch = float(pgb_batch)
pgb_lifecycle = float(pgb_lifecycle)
pg = {1: float(p1), 8: float(p8), 32: float(p32), 64: float(p64)}
d = json.load(open(f"{out}/default.json"))
h = json.load(open(f"{out}/history.json"))
reads = json.load(open(f"{out}/reads.json"))["reads"]
peers = json.load(open(f"{out}/bullmq.json"))
peers = [p for p in (peers if isinstance(peers, list) else [peers]) if p]
def median(values):
    values = sorted(v for v in values if v)
    return values[len(values) // 2] if values else None
peer = dict(peers[0]) if peers else {}
for rate in ("add_per_second", "processed_per_second"):
    peer[rate] = median(p.get(rate) for p in peers)
peer_runs = ", ".join(f"{p['processed_per_second']:.0f}" for p in peers if p.get("processed_per_second"))
mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
print(f"Machine: {os.cpu_count()} cores, {mem:.0f} GiB, {platform.platform()}; "
      f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; commit {commit}")
print(f"Postgres: {pg_vacuum}")
print()
print("| measurement | Arnela | limit or peer | ratio |")
print("|---|---|---|---|")
for l in d["single_enqueue"]:
    c = l["concurrency"]
    lim = pg.get(c, 0.0)
    ratio = f"{l['per_second'] / lim:.2f}" if lim else "–"
    print(f"| single POST /tasks, {c} conn. | {l['per_second']:.0f} req/s (p50 {l['p50_ms']:.2f} ms, p99 {l['p99_ms']:.2f} ms) "
          f"| pgbench enqueue statement: {lim:.0f} tx/s | {ratio} |")
print(f"| POST /tasks/batch ×100 | {d['batch_100_tasks_per_second']:.0f} tasks/s | | |")
peer_add = peer.get("add_per_second")
peer_run = peer.get("processed_per_second")
ratio_add = f"{d['batch_1000_tasks_per_second'] / peer_add:.2f}" if peer_add else "–"
print(f"| POST /tasks/batch ×1000 | {d['batch_1000_tasks_per_second']:.0f} tasks/s | BullMQ addBulk: {peer_add or 0:.0f} jobs/s | {ratio_add} |")
ratio_stmt = f"{d['batch_1000_tasks_per_second'] / pgb_batch:.2f}" if pgb_batch else "–"
print(f"| POST /tasks/batch ×1000, against the statement alone | {d['batch_1000_tasks_per_second']:.0f} tasks/s "
      f"| pgbench batch statement, 2 clients: {pgb_batch:.0f} tasks/s | {ratio_stmt} |")
e2e = d['end_to_end_tasks_per_second']
ratio = f"{e2e / peer_run:.2f}" if peer_run else "–"
e2e_runs = ", ".join(f"{r:.0f}" for r in d.get('end_to_end_runs', []))
print(f"| end to end, {d['end_to_end_tasks']} no-op tasks, default settings (median of runs: {e2e_runs}) | {e2e:.0f} tasks/s "
      f"| BullMQ, concurrency {peer.get('concurrency', '–')} (median of runs: {peer_runs}): {peer_run or 0:.0f} jobs/s | {ratio} |")
ratio_life = f"{e2e / pgb_lifecycle:.2f}" if pgb_lifecycle else "–"
print(f"| end to end, against the database's share alone | {e2e:.0f} tasks/s "
      f"| pgbench lifecycle statements (1,000 tasks enqueued, claimed and completed), 2 clients: {pgb_lifecycle:.0f} tasks/s | {ratio_life} |")
after = d.get('end_to_end_after_churn_tasks_per_second') or 0
if d.get('churn_tasks'):
    after_runs = ", ".join(f"{r:.0f}" for r in d.get('end_to_end_after_churn_runs', []))
    print(f"| end to end after {d['churn_tasks']:,} more tasks through the same tables (median of runs: {after_runs}) | {after:.0f} tasks/s "
          f"| fresh tables: {e2e:.0f} tasks/s | {after / e2e if e2e else 0:.2f} |")
print(f"| enqueue → start, {d['start_latency_offered_rate']:.0f}/s offered | "
      f"p50 {d['start_latency_p50_ms']:.1f} ms, p99 {d['start_latency_p99_ms']:.1f} ms | | |")
if d.get('stream_tasks'):
    print(f"| sustained stream, {d['stream_offered_rate']:.0f}/s for {d['stream_seconds']:.0f} s ({d['stream_tasks']:,} tasks) | "
          f"oldest unfinished at the end: {d['stream_oldest_open_age_s']:.2f} s; all done {d['stream_drained_after_s']:.2f} s later; "
          f"start p50 {d['stream_start_p50_ms']:.1f} ms, p99 {d['stream_start_p99_ms']:.1f} ms | | |")
print(f"| GET /tasks/{{id}}/events, ~{h['history_events_in_table']:,} events in the table | "
      f"p50 {h['history_p50_ms']:.2f} ms, p99 {h['history_p99_ms']:.2f} ms | | |")
uncached = next((r for r in reads if r["name"] == "uncached"), None)
for r in reads:
    hit = f", cache hit rate {r['hit_rate'] * 100:.1f}%" if r.get("hit_rate") is not None else ""
    ratio = f"{r['p50_ms'] / uncached['p50_ms']:.2f} (p50)" if uncached and r is not uncached and uncached["p50_ms"] else "–"
    print(f"| GET /tasks/{{id}} {r['name']}, {r['readers']} readers | {r['per_second']:.0f} req/s, "
          f"p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms{hit} | uncached: p50 {uncached['p50_ms'] if uncached else 0:.2f} ms | {ratio} |")
if os.path.exists(f"{out}/single.json"):
    base = json.load(open(f"{out}/single.json"))
    base_rate = base["end_to_end_tasks_per_second"]
    for shards in (1, 3):
        path = f"{out}/cluster-{shards}.json"
        if os.path.exists(path):
            c = json.load(open(path))
            rate = c["end_to_end_tasks_per_second"]
            print(f"| end to end, {c['end_to_end_tasks']} no-op tasks, fresh database, Redis Cluster (3 masters with a replica "
                  f"each, same machine), QUEUE_SHARDS={shards}; enqueue → start p99 {c['start_latency_p99_ms']:.1f} ms "
                  f"| {rate:.0f} tasks/s | one Redis server, the same measurement: {base_rate:.0f} tasks/s, "
                  f"p99 {base['start_latency_p99_ms']:.1f} ms | {rate / base_rate if base_rate else 0:.2f} |")
rss = d.get("service_peak_rss_mb")
if rss is not None:
    print(f"| service peak RSS | {rss:.1f} MB | | |")

# The engine issue's targets, each with the measured value and whether it is met.
single32 = next((l['per_second'] for l in d['single_enqueue'] if l['concurrency'] == 32), 0)
targets = [
    ("end to end, 10,000 no-op tasks, defaults ≥ 10,000 tasks/s", f"{e2e:.0f} tasks/s (the lifecycle's statements alone in pgbench: {pgb_lifecycle:.0f})", e2e >= 10000),
    ("end to end ≥ 0.75 × BullMQ's processing rate", f"{e2e / peer_run:.2f} ×" if peer_run else "no peer", bool(peer_run) and e2e >= 0.75 * peer_run),
    ("after 1,000,000 tasks ≥ 0.9 × the fresh rate", f"{after / e2e:.2f} ×" if e2e and after else "not run", bool(e2e and after) and after >= 0.9 * e2e),
    ("enqueue → start p99 ≤ 25 ms at half the end-to-end rate", f"{d['start_latency_p99_ms']:.1f} ms", d['start_latency_p99_ms'] <= 25),
    ("batch enqueue ≥ 50,000 tasks/s", f"{d['batch_1000_tasks_per_second']:.0f} tasks/s (the statement alone in pgbench: {pgb_batch:.0f})", d['batch_1000_tasks_per_second'] >= 50000),
    ("single POST /tasks ≥ 0.8 × pgbench at 32 connections", f"{single32 / pg[32]:.2f} ×" if pg[32] else "no pgbench", bool(pg[32]) and single32 >= 0.8 * pg[32]),
    ("service RSS ≤ 100 MB", f"{rss:.1f} MB" if rss is not None else "unknown", rss is not None and rss <= 100),
    ("stream at 80% for 60 s: no task older than 5 s at the end", f"{d.get('stream_oldest_open_age_s', 0):.2f} s" if d.get('stream_tasks') else "not run", bool(d.get('stream_tasks')) and d['stream_oldest_open_age_s'] <= 5),
]
print()
print("| target | measured | met |")
print("|---|---|---|")
for name, value, met in targets:
    print(f"| {name} | {value} | {'yes' if met else 'no'} |")
PY
