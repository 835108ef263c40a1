#!/usr/bin/env bash
# A local Redis Cluster of three masters with one replica each, for the cluster tests and the
# benchmark: six redis-server processes on PORT..PORT+5 under DIR, nothing kept on disk.
#
#   ci/redis-cluster.sh start DIR PORT   # starts the nodes, creates the cluster, waits until it serves
#   ci/redis-cluster.sh stop DIR         # stops every node started under DIR
#
# cluster-node-timeout is 1 s so that a killed master's replica is promoted within seconds; the
# script returns once every replica has synced with its master (one that has not cannot take over).
set -euo pipefail

cmd=${1:?start DIR PORT | stop DIR}
dir=${2:?DIR}

case "$cmd" in
start)
    port=${3:?PORT}
    # absolute: redis-server changes into --dir before it opens the other files
    dir=$(mkdir -p "$dir" && cd "$dir" && pwd)
    nodes=()
    for i in 0 1 2 3 4 5; do
        p=$((port + i))
        mkdir -p "$dir/$p"
        redis-server --port "$p" --bind 127.0.0.1 --daemonize yes \
            --cluster-enabled yes --cluster-config-file "$dir/$p/nodes.conf" \
            --cluster-node-timeout 1000 --save "" --appendonly no --repl-diskless-sync-delay 0 \
            --dir "$dir/$p" --logfile "$dir/$p/redis.log" --pidfile "$dir/$p/redis.pid"
        nodes+=("127.0.0.1:$p")
    done
    for p in $(seq "$port" $((port + 5))); do
        for _ in $(seq 1 50); do redis-cli -p "$p" ping >/dev/null 2>&1 && break; sleep 0.1; done
    done
    redis-cli --cluster create "${nodes[@]}" --cluster-replicas 1 --cluster-yes >"$dir/create.log" 2>&1 \
        || { cat "$dir/create.log" >&2; exit 1; }
    for p in $(seq "$port" $((port + 5))); do
        for _ in $(seq 1 100); do
            redis-cli -p "$p" cluster info 2>/dev/null | grep -q 'cluster_state:ok' && break
            sleep 0.1
        done
        redis-cli -p "$p" cluster info | grep -q 'cluster_state:ok' \
            || { echo "node $p: cluster not ok" >&2; exit 1; }
    done
    # a replica that has not finished its first sync cannot take over: wait for all three
    for _ in $(seq 1 100); do
        synced=0
        for p in $(seq "$port" $((port + 5))); do
            redis-cli -p "$p" info replication | grep -q 'master_link_status:up' && synced=$((synced + 1))
        done
        [[ $synced -eq 3 ]] && break
        sleep 0.1
    done
    [[ $synced -eq 3 ]] || { echo "only $synced of 3 replicas synced" >&2; exit 1; }
    ;;
stop)
    for pidfile in "$dir"/*/redis.pid; do
        [[ -f $pidfile ]] || continue
        kill "$(cat "$pidfile")" 2>/dev/null || true
    done
    ;;
*)
    echo "usage: $0 start DIR PORT | stop DIR" >&2
    exit 2
    ;;
esac
