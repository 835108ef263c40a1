//! The service on a real Redis Cluster: three masters with one replica each, started for the
//! test by `ci/redis-cluster.sh` (the engine and cache suites also run on a cluster: `.ci/run`
//! runs them with `TEST_REDIS_CLUSTER`). `serve` and a second `worker` process run with
//! `REDIS_CLUSTER=true` and three queue shards; the shards land on the three masters, every task
//! runs once, and a master killed mid-stream (its replica promoted) loses no task.

use crate::common;
use arnela::api::auth::Role;
use arnela::queue::keys::{key_slot, tagged};
use arnela::queue::Keys;
use common::process::{arnela_command, assert_audit_verifies, command, spawn, Proc};
use common::{database_url, eventually};
use serde_json::{json, Value};
use sqlx::PgPool;
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// Six `redis-server` processes in a cluster of the test's own; stopped when dropped.
struct Cluster {
    dir: tempfile::TempDir,
    port: u16,
}

impl Cluster {
    fn start() -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let port = free_ports();
        let status = Command::new("bash")
            .arg(script())
            .args(["start", dir.path().to_str().unwrap(), &port.to_string()])
            .status()
            .expect("bash runs");
        let cluster = Cluster { dir, port };
        assert!(status.success(), "ci/redis-cluster.sh start failed");
        cluster
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// `CLUSTER NODES` as some live node sees it.
    fn nodes(&self) -> String {
        (self.port..self.port + 6)
            .find_map(|p| {
                let out = Command::new("redis-cli")
                    .args(["-p", &p.to_string(), "cluster", "nodes"])
                    .output()
                    .ok()?;
                let text = String::from_utf8_lossy(&out.stdout).to_string();
                (out.status.success() && text.contains("myself")).then_some(text)
            })
            .expect("a live node")
    }

    /// The port of the master that serves `slot` (as the cluster sees it now).
    fn master_of(&self, slot: u16) -> u16 {
        self.serving(slot)
            .unwrap_or_else(|| panic!("no master serves slot {slot}:\n{}", self.nodes()))
    }

    /// The port of the live master that serves `slot`, if one does.
    fn serving(&self, slot: u16) -> Option<u16> {
        for line in self.nodes().lines() {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() < 9 || !cols[2].contains("master") || cols[2].contains("fail") {
                continue;
            }
            let serves = cols[8..].iter().any(|range| {
                let mut ends = range.split('-').map(|n| n.parse::<u16>());
                match (ends.next(), ends.next()) {
                    (Some(Ok(a)), Some(Ok(b))) => (a..=b).contains(&slot),
                    (Some(Ok(a)), None) => a == slot,
                    _ => false,
                }
            });
            if serves {
                let port = cols[1]
                    .split('@')
                    .next()
                    .unwrap()
                    .rsplit(':')
                    .next()
                    .unwrap();
                return Some(port.parse().unwrap());
            }
        }
        None
    }

    /// The last lines of every node's log.
    fn logs(&self) -> String {
        (self.port..self.port + 6)
            .map(|p| {
                let log = std::fs::read_to_string(self.dir.path().join(format!("{p}/redis.log")))
                    .unwrap_or_default();
                let lines: Vec<&str> = log.lines().collect();
                format!(
                    "--- {p}\n{}",
                    lines[lines.len().saturating_sub(8)..].join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Kills a node with SIGKILL.
    fn kill9(&self, port: u16) {
        let pid = std::fs::read_to_string(self.dir.path().join(format!("{port}/redis.pid")))
            .expect("the node's pid file");
        let status = Command::new("kill")
            .args(["-KILL", pid.trim()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// `LPUSH` calls a node has served.
    fn lpush_calls(&self, port: u16) -> u64 {
        let out = Command::new("redis-cli")
            .args(["-p", &port.to_string(), "info", "commandstats"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("cmdstat_lpush:calls="))
            .and_then(|rest| rest.split(',').next()?.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        Command::new("bash")
            .arg(script())
            .args(["stop", self.dir.path().to_str().unwrap()])
            .status()
            .ok();
    }
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("ci/redis-cluster.sh")
}

/// A port P such that P..P+6 and their cluster bus ports (P+10000..) are free, below the
/// kernel's ephemeral range (32768 and up), where outgoing connections could take them.
fn free_ports() -> u16 {
    let free = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
    loop {
        let base = 10_000 + (Uuid::new_v4().as_u128() % 12_700) as u16;
        if (base..base + 6).all(|p| free(p) && free(p + 10_000)) {
            return base;
        }
    }
}

/// `serve` (on a free port) and a second `worker` on the cluster with three queue shards.
async fn start(pool: &PgPool, cluster: &Cluster, prefix: &str) -> (Proc, Proc, String) {
    let port = common::process::free_port().to_string();
    let env = [
        ("REDIS_CLUSTER", "true"),
        ("QUEUE_SHARDS", "3"),
        ("APP_PORT", port.as_str()),
    ];
    let url = database_url(pool);
    let serve = spawn(
        arnela_command("serve", &url, &cluster.url(), prefix, &env),
        "serve",
    );
    let worker = spawn(
        arnela_command("worker", &url, &cluster.url(), prefix, &env[..2]),
        "worker",
    );
    let base = format!("http://127.0.0.1:{port}");
    common::until_live(&base).await;
    (serve, worker, base)
}

/// Enqueues one batch of `n` SMS tasks; the acknowledged ids, or none when refused.
async fn enqueue(http: &reqwest::Client, base: &str, n: usize, label: &str) -> Vec<Uuid> {
    let tasks: Vec<Value> = (0..n)
        .map(|i| common::sms(&format!("{label} #{i}")))
        .collect();
    let Ok(resp) = http
        .post(format!("{base}/tasks/batch"))
        .bearer_auth(common::token(Role::Producer))
        .json(&json!({ "tasks": tasks }))
        .send()
        .await
    else {
        return Vec::new();
    };
    if resp.status() != 201 {
        return Vec::new();
    }
    let Ok(body) = resp.json::<Value>().await else {
        return Vec::new();
    };
    body["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap().parse().unwrap())
        .collect()
}

/// Waits until every task has succeeded, then checks that each has exactly one
/// `attempt_succeeded` and that the hash chains verify.
async fn all_succeed_once(pool: &PgPool, ids: &[Uuid], limit: Duration) {
    eventually(limit, "every acknowledged task to succeed", || {
        let pool = pool.clone();
        async move {
            let done: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM tasks WHERE id = ANY($1) AND status = 'succeeded'",
            )
            .bind(ids)
            .fetch_one(&pool)
            .await
            .unwrap();
            (done == ids.len() as i64).then_some(())
        }
    })
    .await;
    let successes: Vec<(Uuid, i64)> = sqlx::query_as(
        "SELECT task_id, count(*) FROM task_events \
         WHERE task_id = ANY($1) AND event_type = 'attempt_succeeded' GROUP BY task_id",
    )
    .bind(ids)
    .fetch_all(pool)
    .await
    .unwrap();
    let once: HashSet<Uuid> = successes
        .iter()
        .filter(|(_, n)| *n == 1)
        .map(|(id, _)| *id)
        .collect();
    let not_once: Vec<&Uuid> = ids
        .iter()
        .filter(|id| !once.contains(id))
        .take(10)
        .collect();
    assert!(
        not_once.is_empty(),
        "tasks without exactly one attempt_succeeded: {not_once:?}"
    );
}

fn audit_verifies(pool: &PgPool, cluster: &Cluster, prefix: &str) {
    let mut cmd = command("audit", &database_url(pool), &cluster.url(), prefix);
    cmd.env("REDIS_CLUSTER", "true");
    assert_audit_verifies(cmd);
}

#[sqlx::test]
async fn queue_shards_spread_over_the_masters_and_every_task_runs_once(pool: PgPool) {
    let cluster = Cluster::start();
    let prefix = common::unique_prefix();
    let keys = Keys::new(tagged(&prefix)).with_shards(3);
    // the three shards' keys are on the three masters of an evenly split cluster
    let masters: HashSet<u16> = keys
        .all_shards()
        .map(|k| cluster.master_of(k.queue_slot()))
        .collect();
    assert_eq!(
        masters.len(),
        3,
        "shards on {masters:?}:\n{}",
        cluster.nodes()
    );
    let pushes_before: HashMap<u16, u64> = masters
        .iter()
        .map(|&m| (m, cluster.lpush_calls(m)))
        .collect();

    let (_serve, _worker, base) = start(&pool, &cluster, &prefix).await;
    let http = reqwest::Client::new();
    let mut ids = Vec::new();
    for i in 0..6 {
        let batch = enqueue(&http, &base, 50, &format!("batch {i}")).await;
        assert_eq!(batch.len(), 50, "batch {i} acknowledged");
        ids.extend(batch);
    }
    all_succeed_once(&pool, &ids, Duration::from_secs(60)).await;
    let shards: HashSet<usize> = ids
        .iter()
        .map(|id| keys.shard_of(arnela::domain::TaskId::from(*id)))
        .collect();
    assert_eq!(shards.len(), 3, "the tasks use every shard");
    for m in &masters {
        assert!(
            cluster.lpush_calls(*m) > pushes_before[m],
            "master {m} received deliveries"
        );
    }
    // the keys live under the hash tag REDIS_CLUSTER gave the prefix
    let failed_slot = key_slot(&keys.failed());
    assert_eq!(failed_slot, key_slot(&keys.database()));
    audit_verifies(&pool, &cluster, &prefix);
}

#[sqlx::test]
async fn a_master_killed_mid_stream_loses_no_task(pool: PgPool) {
    let cluster = Cluster::start();
    let prefix = common::unique_prefix();
    let keys = Keys::new(tagged(&prefix)).with_shards(3);
    let (_serve, _worker, base) = start(&pool, &cluster, &prefix).await;

    // a stream of batches, every 50 ms for 10 s; the master of the prefix's own slot (seeded
    // marker, binding, worker registry, failed list and shard 0) is killed after 3 s
    let stream = {
        let base = base.clone();
        tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap();
            let mut ids = Vec::new();
            let until = Instant::now() + Duration::from_secs(10);
            let mut batch = 0;
            while Instant::now() < until {
                batch += 1;
                ids.extend(enqueue(&http, &base, 20, &format!("stream {batch}")).await);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            ids
        })
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    let victim = cluster.master_of(keys.slot());
    cluster.kill9(victim);
    let killed = Instant::now();
    while cluster.serving(keys.slot()).is_none_or(|m| m == victim) {
        assert!(
            killed.elapsed() < Duration::from_secs(30),
            "no replica took over from {victim} in 30 s:\n{}\n{}",
            cluster.nodes(),
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let promoted_after = killed.elapsed();
    let ids = stream.await.unwrap();
    assert!(
        ids.len() >= 1000,
        "the stream was acknowledged: {}",
        ids.len()
    );
    all_succeed_once(&pool, &ids, Duration::from_secs(120)).await;
    // tasks committed without an acknowledgement the client saw finish as well
    let stuck: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks WHERE status <> 'succeeded'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(stuck, 0, "every committed task succeeded");
    audit_verifies(&pool, &cluster, &prefix);
    eprintln!(
        "{} tasks; master {victim} killed, replica promoted after {promoted_after:?}",
        ids.len()
    );
}
