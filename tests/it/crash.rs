//! Crash safety with real processes: a worker killed with SIGKILL mid-task, Redis flushed in the
//! middle of a run, and several relay and worker processes sharing the work.

use crate::common;

use arnela::domain::TaskType;
use chrono::{DateTime, Utc};
use common::process::{arnela, free_port, redis_server};
use common::{database_url, eventually, redis_url, unique_prefix};
use sqlx::PgPool;
use std::collections::HashMap;
use std::time::{Duration, Instant};
use uuid::Uuid;

async fn enqueue(pool: &PgPool, n: usize) -> Vec<arnela::domain::TaskId> {
    common::enqueue_tasks(pool, TaskType::SendWhatsapp, n, 3).await
}

async fn count_status(pool: &PgPool, status: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM tasks WHERE status = $1")
        .bind(status)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Checks every task's history: exactly one success, and no attempt started while another of
/// the same task was still open.
async fn assert_exactly_one_success_and_no_overlap(pool: &PgPool) {
    let rows: Vec<(Uuid, String)> =
        sqlx::query_as("SELECT task_id, event_type FROM task_events ORDER BY task_id, sequence")
            .fetch_all(pool)
            .await
            .unwrap();
    let mut per_task: HashMap<Uuid, Vec<String>> = HashMap::new();
    for (id, t) in rows {
        per_task.entry(id).or_default().push(t);
    }
    for (id, history) in per_task {
        let successes = history.iter().filter(|t| *t == "attempt_succeeded").count();
        assert_eq!(successes, 1, "task {id}: {history:?}");
        let mut open = false;
        for t in &history {
            match t.as_str() {
                "attempt_started" => {
                    assert!(!open, "task {id}: two attempts at once: {history:?}");
                    open = true;
                }
                "attempt_succeeded" | "attempt_failed" | "attempt_released" => open = false,
                _ => {}
            }
        }
    }
}

#[sqlx::test]
async fn a_task_survives_its_worker_being_killed_with_sigkill(pool: PgPool) {
    let db = database_url(&pool);
    let prefix = unique_prefix();
    let id = enqueue(&pool, 1).await[0];
    let _relay = arnela("relay", &db, &redis_url(), &prefix, &[]);
    // A worker whose handler never finishes in time, with a short lease.
    let mut doomed = arnela(
        "worker",
        &db,
        &redis_url(),
        &prefix,
        &[
            ("WORKERS", "1"),
            ("WORKER_LEASE_SECS", "2"),
            ("LOG_CHANNEL_DELAY_MS", "600000"),
        ],
    );
    eventually(
        Duration::from_secs(60),
        "the doomed worker to start the attempt",
        || async {
            let status: String = sqlx::query_scalar("SELECT status FROM tasks WHERE id = $1")
                .bind(id)
                .fetch_one(&pool)
                .await
                .unwrap();
            (status == "running").then_some(())
        },
    )
    .await;
    doomed.kill9();
    let killed_at = Utc::now();

    let _healthy = arnela(
        "worker",
        &db,
        &redis_url(),
        &prefix,
        &[
            ("WORKERS", "2"),
            ("WORKER_LEASE_SECS", "2"),
            ("ORPHAN_GRACE_SECS", "1"),
        ],
    );
    eventually(
        Duration::from_secs(60),
        "another worker to complete the task",
        || async { (count_status(&pool, "succeeded").await == 1).then_some(()) },
    )
    .await;

    let events: Vec<(String, serde_json::Value, DateTime<Utc>)> = sqlx::query_as(
        "SELECT event_type, data, recorded_at FROM task_events WHERE task_id = $1 ORDER BY sequence",
    )
    .bind(id)
    .fetch_all(&pool)
    .await
    .unwrap();
    let types: Vec<&str> = events.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(
        types,
        [
            "enqueued",
            "dispatched",
            "attempt_started",
            "attempt_failed",
            "retry_scheduled",
            "dispatched",
            "attempt_started",
            "attempt_succeeded"
        ]
    );
    assert_eq!(events[3].1["kind"], "lease_expired");
    assert_eq!(events[3].1["attempt"], 1);
    assert_ne!(events[2].1["worker_id"], events[6].1["worker_id"]);
    let rescued_after = (events[3].2 - killed_at).num_milliseconds();
    println!(
        "rescue bound: the lost attempt was recorded {rescued_after} ms after the kill (lease 2 s)"
    );

    // the killed worker's processing entry is cleaned up
    let mut conn = common::redis().await;
    let key = arnela::queue::Keys::new(prefix.clone()).processing();
    eventually(
        Duration::from_secs(30),
        "the processing list to be cleaned",
        || {
            let mut conn = conn.clone();
            let key = key.clone();
            async move {
                let n: i64 = redis::cmd("LLEN")
                    .arg(&key)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                (n == 0).then_some(())
            }
        },
    )
    .await;
    let _: () = redis::cmd("DEL")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
}

#[sqlx::test]
async fn flushing_redis_in_the_middle_of_a_run_loses_no_task(pool: PgPool) {
    let port = free_port();
    let _redis = redis_server(port);
    let url = format!("redis://127.0.0.1:{port}");
    let client = redis::Client::open(url.clone()).unwrap();
    let mut conn = eventually(Duration::from_secs(10), "own redis", || {
        let client = client.clone();
        async move { redis::aio::ConnectionManager::new(client).await.ok() }
    })
    .await;
    let db = database_url(&pool);
    let total = 2000;
    enqueue(&pool, total).await;
    let extra = [("LOG_CHANNEL_DELAY_MS", "2"), ("ORPHAN_GRACE_SECS", "1")];
    let _relay = arnela("relay", &db, &url, "arnela", &extra);
    let _worker = arnela("worker", &db, &url, "arnela", &extra);

    eventually(
        Duration::from_secs(120),
        "a fifth of the tasks to finish",
        || async { (count_status(&pool, "succeeded").await >= total as i64 / 5).then_some(()) },
    )
    .await;
    let _: () = redis::cmd("FLUSHALL").query_async(&mut conn).await.unwrap();
    let flushed = Instant::now();
    let done_at_flush = count_status(&pool, "succeeded").await;

    eventually(Duration::from_secs(180), "every task to finish", || async {
        (count_status(&pool, "succeeded").await == total as i64).then_some(())
    })
    .await;
    println!(
        "FLUSHALL with {} of {total} done: all finished {} ms later",
        done_at_flush,
        flushed.elapsed().as_millis()
    );
    assert_exactly_one_success_and_no_overlap(&pool).await;
}

#[sqlx::test]
async fn two_relays_and_three_worker_processes_share_five_thousand_tasks(pool: PgPool) {
    let db = database_url(&pool);
    let prefix = unique_prefix();
    let total = 5000;
    enqueue(&pool, total).await;
    let started = Instant::now();
    let mut procs = Vec::new();
    for _ in 0..2 {
        procs.push(arnela(
            "relay",
            &db,
            &redis_url(),
            &prefix,
            &[("RELAY_BATCH", "200")],
        ));
    }
    for _ in 0..3 {
        procs.push(arnela("worker", &db, &redis_url(), &prefix, &[]));
    }
    eventually(Duration::from_secs(300), "every task to finish", || async {
        (count_status(&pool, "succeeded").await == total as i64).then_some(())
    })
    .await;
    println!(
        "scale-out: {total} tasks in {} ms",
        started.elapsed().as_millis()
    );
    assert_exactly_one_success_and_no_overlap(&pool).await;
    let dispatched: i64 =
        sqlx::query_scalar("SELECT count(*) FROM task_events WHERE event_type = 'dispatched'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(
        dispatched, total as i64,
        "each task was dispatched by exactly one relay"
    );

    // a clean stop leaves nothing claimed and exits 0
    for p in procs.iter_mut() {
        assert!(p.terminate().success(), "{} exited with an error", p.name);
    }
    let claimed: i64 =
        sqlx::query_scalar("SELECT count(*) FROM tasks WHERE lease_owner IS NOT NULL")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(claimed, 0);
    let mut conn = common::redis().await;
    let keys = arnela::queue::Keys::new(prefix);
    let (waiting, processing, _) = arnela::queue::depths(&mut conn, &keys).await.unwrap();
    assert_eq!((waiting, processing), (0, 0));
    let _: () = redis::cmd("DEL")
        .arg(keys.tasks())
        .arg(keys.seeded())
        .arg(keys.workers())
        .arg(keys.worker_counts())
        .arg(keys.processing_seen())
        .query_async(&mut conn)
        .await
        .unwrap();
}

/// A worker process dead-letters tasks while Redis refuses the failed list's pushes (the key
/// holds a string: `WRONGTYPE`, Redis keeping its data and the list's restore marker), and is
/// killed with SIGKILL. Its copies stay in Postgres, and another process's rescuer puts each on
/// the list once Redis takes pushes again.
#[sqlx::test]
async fn dead_letter_copies_survive_their_worker_being_killed_while_redis_refuses_them(
    pool: PgPool,
) {
    use wiremock::{matchers::any, Mock, MockServer, ResponseTemplate};
    let twilio = MockServer::start().await;
    Mock::given(any())
        .respond_with(ResponseTemplate::new(400).set_body_json(
            serde_json::json!({"code": 21211, "message": "The 'To' number is not valid."}),
        ))
        .mount(&twilio)
        .await;
    let db = database_url(&pool);
    let prefix = unique_prefix();
    let keys = arnela::queue::Keys::new(prefix.clone());
    let twilio_url = twilio.uri();
    let env = [
        ("TWILIO_BASE_URL", twilio_url.as_str()),
        ("TWILIO_ACCOUNT_SID", "AC00000000000000000000000000000000"),
        ("TWILIO_AUTH_TOKEN", "test-token"),
        ("TWILIO_SMS_FROM", "+34910000000"),
        ("TWILIO_RATE_LIMIT_PER_SEC", "0"),
    ];
    let mut conn = common::redis().await;
    let _relay = arnela("relay", &db, &redis_url(), &prefix, &[]);
    let mut doomed = arnela("worker", &db, &redis_url(), &prefix, &env);
    eventually(
        Duration::from_secs(60),
        "the failed list to be restored",
        || {
            let mut conn = conn.clone();
            let marker = keys.failed_seeded();
            async move {
                let m: Option<String> = redis::cmd("GET")
                    .arg(marker)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                (m.as_deref() == Some("restored")).then_some(())
            }
        },
    )
    .await;
    let _: () = redis::cmd("SET")
        .arg(keys.failed())
        .arg("refusing")
        .query_async(&mut conn)
        .await
        .unwrap();

    let total = 20;
    let ids = common::enqueue_tasks(&pool, TaskType::SendSms, total, 1).await;
    eventually(Duration::from_secs(60), "every task to be dead", || async {
        (count_status(&pool, "dead").await == total as i64).then_some(())
    })
    .await;
    doomed.kill9();
    let waiting = arnela::store::failed_copies::pending(&pool).await.unwrap();
    assert_eq!(waiting, total as i64, "the copies outlive their process");

    let _: () = redis::cmd("DEL")
        .arg(keys.failed())
        .query_async(&mut conn)
        .await
        .unwrap();
    let _other = arnela("worker", &db, &redis_url(), &prefix, &env);
    // a copy leaves Postgres in the commit after its push: once none waits, all are listed
    eventually(
        Duration::from_secs(60),
        "another process to push the copies",
        || async {
            let waiting = arnela::store::failed_copies::pending(&pool).await.unwrap();
            (waiting == 0).then_some(())
        },
    )
    .await;
    let listed: Vec<String> = redis::cmd("LRANGE")
        .arg(keys.failed())
        .arg(0)
        .arg(-1)
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut listed: Vec<String> = listed
        .iter()
        .map(|c| {
            serde_json::from_str::<serde_json::Value>(c).unwrap()["task_id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    listed.sort();
    let mut expected: Vec<String> = ids.iter().map(|id| id.to_string()).collect();
    expected.sort();
    assert_eq!(listed, expected, "each copy once");
    let _: () = redis::cmd("DEL")
        .arg(keys.failed())
        .arg(keys.failed_seeded())
        .query_async(&mut conn)
        .await
        .unwrap();
}
