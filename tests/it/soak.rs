//! Soak with real processes: `arnela serve` and a second `arnela worker`, both with the default
//! engine settings, on a Postgres cluster and a Redis server of the test's own, take a steady
//! stream of batches from several clients while the test kills a worker with SIGKILL, restarts
//! Postgres in immediate mode, flushes Redis and kills `serve` with SIGKILL. Afterwards every
//! task the API acknowledged has succeeded exactly once within the README's recovery bound, the
//! hash chains verify, and `GET /events` pages through every event exactly once.

use crate::common;

use arnela::api::auth::Role;
use chrono::{DateTime, Utc};
use common::process::{command, free_port, redis_server, spawn, PgServer, Proc};
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// How long the clients send.
const LOAD: Duration = Duration::from_secs(50);
/// Concurrent clients, each sending one batch of `BATCH` no-op tasks every `BATCH_EVERY`.
const CLIENTS: usize = 3;
const BATCH: usize = 25;
const BATCH_EVERY: Duration = Duration::from_millis(400);
/// When each fault happens, counted from the start of the load.
const KILL_WORKER_AT: Duration = Duration::from_secs(8);
const RESTART_POSTGRES_AT: Duration = Duration::from_secs(18);
const FLUSH_REDIS_AT: Duration = Duration::from_secs(28);
const KILL_SERVE_AT: Duration = Duration::from_secs(38);

/// README "Recovery bounds", the soak bound: with the default settings, a task succeeds within
/// 45 s of the later of its acknowledgement and the repair of the last fault that happened
/// before it succeeded (worker lease 30 s + one rescuer interval 1 s + the first retry's
/// backoff ≤ 1 s + a relay poll 0.5 s, and the rest as margin for a loaded two-core machine).
const RECOVERY_BOUND: Duration = Duration::from_secs(45);

/// A task the API acknowledged, and when.
struct Acked {
    id: Uuid,
    at: DateTime<Utc>,
}

#[derive(Default)]
struct ClientReport {
    acked: Vec<Acked>,
    /// Batches answered with a non-2xx status or not answered at all.
    refused: usize,
}

/// One fault: when it started and when the system was whole again.
struct Fault {
    what: &'static str,
    at: DateTime<Utc>,
    repaired: DateTime<Utc>,
}

/// The processes of the run; each writes its log to a file of `dir`.
struct Cluster {
    dir: PathBuf,
    db: String,
    redis: String,
    api_port: u16,
    started: usize,
}

impl Cluster {
    /// Starts `arnela <role>` with the default engine settings: only how to connect, the API
    /// port, the tests' `JWT_SECRET` and the `log` channel's latency are set.
    fn start(&mut self, role: &str) -> Proc {
        self.started += 1;
        let name = format!("{}-{role}", self.started);
        let log = std::fs::File::create(self.dir.join(format!("{name}.log"))).unwrap();
        let mut cmd = command(role, &self.db, &self.redis, "arnela");
        // The one test-only knob: the `log` channel answers after 20 ms, as a provider would,
        // instead of at once. With an instant handler an attempt runs for microseconds and a
        // SIGKILL almost never catches one mid-run, so the lease path would go unexercised.
        cmd.env("APP_PORT", self.api_port.to_string())
            .env("LOG_CHANNEL_DELAY_MS", "20")
            .stderr(Stdio::from(log));
        spawn(cmd, &name)
    }

    /// The last lines of every process's log, for a failure message.
    fn logs(&self) -> String {
        let mut out = String::new();
        let mut files: Vec<_> = std::fs::read_dir(&self.dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(15)..];
            out.push_str(&format!(
                "\n--- {} ({} lines, last {}):\n{}",
                f.file_name().unwrap().to_string_lossy(),
                lines.len(),
                tail.len(),
                tail.join("\n")
            ));
        }
        out
    }
}

/// Waits until the API answers `/health/ready` with 200, failing if `serve` exits.
async fn wait_ready(http: &reqwest::Client, port: u16, serve: &mut Proc, cluster: &Cluster) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ready = http
            .get(format!("http://127.0.0.1:{port}/health/ready"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200);
        if ready {
            return;
        }
        if let Some(status) = serve.child.try_wait().unwrap() {
            panic!("serve exited with {status}{}", cluster.logs());
        }
        assert!(
            Instant::now() < deadline,
            "serve not ready after 60 s{}",
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends a batch every `BATCH_EVERY` until `until`, keeping the ids of acknowledged tasks.
async fn client(n: usize, port: u16, until: Instant) -> ClientReport {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let auth = common::bearer(Role::Producer);
    let mut report = ClientReport::default();
    let mut tick = tokio::time::interval(BATCH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut batch = 0;
    while Instant::now() < until {
        tick.tick().await;
        batch += 1;
        let tasks: Vec<_> = (0..BATCH)
            .map(|i| common::sms(&format!("soak client {n} batch {batch} task {i}")))
            .collect();
        let sent = http
            .post(format!("http://127.0.0.1:{port}/tasks/batch"))
            .header("authorization", &auth)
            .json(&serde_json::json!({ "tasks": tasks }))
            .send()
            .await;
        let resp = match sent {
            Ok(r) if r.status().is_success() => r,
            _ => {
                report.refused += 1;
                continue;
            }
        };
        let status = resp.status();
        // A 2xx whose body does not arrive was not an acknowledgement the client could see.
        let Ok(body) = resp.json::<serde_json::Value>().await else {
            report.refused += 1;
            continue;
        };
        let at = Utc::now();
        let ids = body["tasks"]
            .as_array()
            .unwrap_or_else(|| panic!("a {status} without tasks: {body}"));
        assert_eq!(ids.len(), BATCH, "{body}");
        for t in ids {
            let id = t["id"].as_str().and_then(|s| s.parse().ok());
            let id = id.unwrap_or_else(|| panic!("a task without an id: {t}"));
            report.acked.push(Acked { id, at });
        }
    }
    report
}

/// Task ids with their status, for tasks not yet `succeeded`.
async fn unfinished(pool: &sqlx::PgPool, ids: &[Uuid]) -> Vec<(Uuid, Option<String>)> {
    let rows: Vec<(Uuid, String)> =
        sqlx::query_as("SELECT id, status::text FROM tasks WHERE id = ANY($1)")
            .bind(ids)
            .fetch_all(pool)
            .await
            .unwrap();
    let status: HashMap<Uuid, String> = rows.into_iter().collect();
    ids.iter()
        .filter(|id| status.get(id).map(String::as_str) != Some("succeeded"))
        .map(|id| (*id, status.get(id).cloned()))
        .collect()
}

/// The worker ids (`lease_owner`) of the attempts running now.
async fn running_owners(pool: &sqlx::PgPool) -> Vec<Uuid> {
    sqlx::query_scalar("SELECT lease_owner FROM tasks WHERE status = 'running'")
        .fetch_all(pool)
        .await
        .map(|owners: Vec<Option<Uuid>>| owners.into_iter().flatten().collect())
        .unwrap_or_default()
}

/// Waits (at most 10 s) until a worker that `victim` accepts runs an attempt, so that a kill catches
/// one mid-run; returns that worker's id.
async fn running_on(pool: &sqlx::PgPool, victim: impl Fn(&Uuid) -> bool) -> Uuid {
    common::eventually(Duration::from_secs(10), "an attempt on the victim", || {
        let victim = &victim;
        async move { running_owners(pool).await.into_iter().find(|o| victim(o)) }
    })
    .await
}

/// Pages `GET /events` from 0 until it reaches `last`, returning every position it was given.
async fn read_log(http: &reqwest::Client, port: u16, last: i64) -> Vec<i64> {
    let auth = common::bearer(Role::Auditor);
    let mut positions = Vec::new();
    let mut after = 0i64;
    let deadline = Instant::now() + Duration::from_secs(60);
    while after < last {
        assert!(
            Instant::now() < deadline,
            "GET /events stopped at {after} before {last}"
        );
        let resp = http
            .get(format!(
                "http://127.0.0.1:{port}/events?after={after}&limit=1000"
            ))
            .header("authorization", &auth)
            .send()
            .await
            .expect("the API answers");
        assert_eq!(resp.status(), 200);
        let page: serde_json::Value = resp.json().await.unwrap();
        let events = page["events"].as_array().unwrap();
        if events.is_empty() {
            // nothing new yet: the log's horizon waits for an older transaction
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        for e in events {
            let p = e["position"].as_i64().unwrap();
            assert!(p > after, "position {p} after {after}");
            after = p;
            positions.push(p);
        }
        assert_eq!(
            page["next_after"].as_i64(),
            Some(after),
            "{}",
            page["next_after"]
        );
    }
    positions
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_tasks_all_succeed_once_through_kills_restarts_and_a_flush() {
    let test_started = Instant::now();
    let pg = Arc::new(PgServer::start(free_port()));
    let redis_port = free_port();
    let _redis_server = redis_server(redis_port);
    let redis_url = format!("redis://127.0.0.1:{redis_port}");
    let redis_client = redis::Client::open(redis_url.clone()).unwrap();
    let mut redis = common::eventually(Duration::from_secs(10), "own redis", || {
        let c = redis_client.clone();
        async move { redis::aio::ConnectionManager::new(c).await.ok() }
    })
    .await;
    let dir = std::env::temp_dir().join(format!("arnela-soak-{}", Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let api_port = free_port();
    let mut cluster = Cluster {
        dir,
        db: pg.url(),
        redis: redis_url,
        api_port,
        started: 0,
    };
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let mut serve = cluster.start("serve");
    wait_ready(&http, api_port, &mut serve, &cluster).await;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(5))
        .connect(&pg.url())
        .await
        .unwrap();
    // One batch through `serve` alone tells its worker id apart from the second process's.
    // (a batch refused on a loaded machine, a 503 or a client timeout, is sent again)
    let warm_up_start = Instant::now();
    let mut warm_up = ClientReport::default();
    while warm_up.acked.is_empty() {
        assert!(
            warm_up_start.elapsed() < Duration::from_secs(60),
            "serve refused the warm-up batch for 60 s ({} times)",
            warm_up.refused
        );
        let sent = client(CLIENTS, api_port, Instant::now() + Duration::from_millis(1)).await;
        warm_up.acked.extend(sent.acked);
        warm_up.refused += sent.refused;
    }
    let serve_worker: Uuid = common::eventually(
        Duration::from_secs(30),
        "the warm-up batch to start",
        || async {
            sqlx::query_scalar(
                "SELECT (data->>'worker_id')::uuid FROM task_events \
                 WHERE event_type = 'attempt_started' LIMIT 1",
            )
            .fetch_optional(&pool)
            .await
            .unwrap()
        },
    )
    .await;
    let mut worker = cluster.start("worker");

    let load_start = Instant::now();
    let load_start_utc = Utc::now();
    let load_end = load_start + LOAD;
    let clients: Vec<_> = (0..CLIENTS)
        .map(|n| tokio::spawn(client(n, api_port, load_end)))
        .collect();
    let at = |offset: Duration| tokio::time::sleep_until((load_start + offset).into());
    let mut faults = Vec::new();

    at(KILL_WORKER_AT).await;
    let victim = running_on(&pool, |o| *o != serve_worker).await;
    let t = Utc::now();
    worker.kill9();
    let caught_worker = running_owners(&pool)
        .await
        .iter()
        .filter(|o| **o == victim)
        .count();
    worker = cluster.start("worker");
    faults.push(Fault {
        what: "kill -9 worker",
        at: t,
        repaired: Utc::now(),
    });

    at(RESTART_POSTGRES_AT).await;
    let t = Utc::now();
    let server = pg.clone();
    tokio::task::spawn_blocking(move || {
        server.stop();
        server.resume();
    })
    .await
    .unwrap();
    faults.push(Fault {
        what: "Postgres immediate restart",
        at: t,
        repaired: Utc::now(),
    });

    at(FLUSH_REDIS_AT).await;
    let t = Utc::now();
    let _: () = redis::cmd("FLUSHALL")
        .query_async(&mut redis)
        .await
        .unwrap();
    faults.push(Fault {
        what: "Redis FLUSHALL",
        at: t,
        repaired: t,
    });

    at(KILL_SERVE_AT).await;
    running_on(&pool, |o| *o == serve_worker).await;
    let t = Utc::now();
    serve.kill9();
    let caught_serve = running_owners(&pool)
        .await
        .iter()
        .filter(|o| **o == serve_worker)
        .count();
    serve = cluster.start("serve");
    wait_ready(&http, api_port, &mut serve, &cluster).await;
    faults.push(Fault {
        what: "kill -9 serve",
        at: t,
        repaired: Utc::now(),
    });

    let mut acked = warm_up.acked;
    let mut refused = warm_up.refused;
    for c in clients {
        let report = c.await.expect("a client ran to the end");
        acked.extend(report.acked);
        refused += report.refused;
    }
    let load_ended = Instant::now();
    let ids: Vec<Uuid> = acked.iter().map(|a| a.id).collect();
    assert_eq!(
        ids.iter().collect::<HashSet<_>>().len(),
        ids.len(),
        "the API acknowledged one task id twice"
    );
    assert!(
        ids.len() >= CLIENTS * BATCH * 10,
        "only {} tasks acknowledged ({refused} batches refused){}",
        ids.len(),
        cluster.logs()
    );

    // Drain: every acknowledged task succeeds within the bound after the load and the last fault.
    let last_repair = faults.iter().map(|f| f.repaired).max().unwrap();
    let drain_deadline = std::cmp::max(Utc::now(), last_repair)
        + chrono::Duration::from_std(RECOVERY_BOUND).unwrap();
    loop {
        let left = unfinished(&pool, &ids).await;
        if left.is_empty() {
            break;
        }
        if Utc::now() > drain_deadline {
            let shown: Vec<Uuid> = left.iter().take(10).map(|(id, _)| *id).collect();
            panic!(
                "{} of {} acknowledged tasks not succeeded {RECOVERY_BOUND:?} after the load \
                 and the last fault; statuses of the first: {:?}; their histories:{}{}",
                left.len(),
                ids.len(),
                &left[..shown.len()],
                common::histories(&pool, &shown).await,
                cluster.logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let drained_after = load_ended.elapsed();

    // Exactly one success per acknowledged task, each within the bound of its acknowledgement or
    // of the last fault repaired before it succeeded.
    let rows: Vec<(Uuid, i64, Option<DateTime<Utc>>)> = sqlx::query_as(
        "SELECT task_id, count(*) FILTER (WHERE event_type = 'attempt_succeeded'), \
                min(recorded_at) FILTER (WHERE event_type = 'attempt_succeeded') \
         FROM task_events WHERE task_id = ANY($1) GROUP BY task_id",
    )
    .bind(&ids)
    .fetch_all(&pool)
    .await
    .unwrap();
    let successes: HashMap<Uuid, (i64, Option<DateTime<Utc>>)> =
        rows.into_iter().map(|(id, n, at)| (id, (n, at))).collect();
    let bound = chrono::Duration::from_std(RECOVERY_BOUND).unwrap();
    let mut not_once = Vec::new();
    let mut late = Vec::new();
    let mut slowest = chrono::Duration::zero();
    for a in &acked {
        let (n, at) = successes.get(&a.id).copied().unwrap_or((0, None));
        if n != 1 {
            not_once.push(a.id);
            continue;
        }
        let done = at.unwrap();
        let from = faults
            .iter()
            .filter(|f| f.at < done)
            .map(|f| f.repaired)
            .fold(a.at, std::cmp::max);
        slowest = slowest.max(done - from);
        if done - from > bound {
            late.push(a.id);
        }
    }
    let few = |v: &[Uuid]| v.iter().take(10).copied().collect::<Vec<_>>();
    assert!(
        not_once.is_empty(),
        "{} acknowledged tasks without exactly one attempt_succeeded:{}",
        not_once.len(),
        common::histories(&pool, &few(&not_once)).await
    );
    assert!(
        late.is_empty(),
        "{} tasks succeeded later than {RECOVERY_BOUND:?} after their acknowledgement or the \
         repair of the last fault before their success:{}",
        late.len(),
        common::histories(&pool, &few(&late)).await
    );

    // Tasks committed without an acknowledgement (a response lost to a kill) finish as well.
    let stuck: Vec<Uuid> =
        sqlx::query_scalar("SELECT id FROM tasks WHERE status <> 'succeeded' LIMIT 10")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert!(
        stuck.is_empty(),
        "committed tasks not succeeded:{}",
        common::histories(&pool, &stuck).await
    );
    let committed: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks")
        .fetch_one(&pool)
        .await
        .unwrap();

    // The hash chains verify (the real command, as an operator runs it).
    common::process::assert_audit_verifies(command("audit", &pg.url(), &cluster.redis, "arnela"));

    // `GET /events` from 0 returns every event of the table exactly once, in position order.
    let in_table: Vec<i64> = sqlx::query_scalar("SELECT position FROM task_events")
        .fetch_all(&pool)
        .await
        .unwrap();
    let last = in_table.iter().copied().max().unwrap();
    let read = read_log(&http, api_port, last).await;
    let read_set: HashSet<i64> = read.iter().copied().collect();
    let table_set: HashSet<i64> = in_table.iter().copied().collect();
    assert_eq!(read_set.len(), read.len(), "GET /events repeated an event");
    let missing: Vec<_> = table_set.difference(&read_set).take(10).collect();
    let extra: Vec<_> = read_set.difference(&table_set).take(10).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "GET /events skipped {missing:?} / invented {extra:?}"
    );
    assert_eq!(read.len(), in_table.len());

    let lease_expired: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM task_events \
         WHERE event_type = 'attempt_failed' AND data->>'kind' = 'lease_expired'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    let faults_text: Vec<String> = faults
        .iter()
        .map(|f| {
            format!(
                "{} +{:.1}s (repaired in {} ms)",
                f.what,
                (f.at - load_start_utc).num_milliseconds() as f64 / 1000.0,
                (f.repaired - f.at).num_milliseconds()
            )
        })
        .collect();
    eprintln!(
        "soak: {} tasks acknowledged ({refused} batches refused), {committed} committed, {} events \
         ({lease_expired} lease_expired; the kills caught {caught_worker} + {caught_serve} \
         running attempts), drained {:.1} s after the load, slowest task {:.1} s \
         after its acknowledgement or last fault (bound {RECOVERY_BOUND:?}), test {:.0} s; \
         faults: {}",
        ids.len(),
        in_table.len(),
        drained_after.as_secs_f64(),
        slowest.num_milliseconds() as f64 / 1000.0,
        test_started.elapsed().as_secs_f64(),
        faults_text.join(", ")
    );
    drop(serve);
    drop(worker);
    std::fs::remove_dir_all(&cluster.dir).ok();
}
