//! One Redis namespace serves one database: a process on another database refuses to start or
//! to work, a delivery of a task this database does not hold is left on the queue (logged,
//! counted, without spinning), and the binding comes back with the next re-seed after a flush.

use crate::common;
use arnela::domain::TaskId;

use arnela::domain::TaskType;
use arnela::queue::{Delivery, Keys};
use arnela::relay::RelayError;
use arnela::rescuer::RescuerError;
use arnela::worker::{Processed, WorkerError};
use common::engine::{config, engine, Engine, Script};
use common::process::{arnela, arnela_command, free_port, run_to_exit};
use common::{database_url, eventually, redis_url, unique_prefix};
use sqlx::PgPool;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// The cluster's system identifier and the database's name, as the test sees them.
async fn identity(pool: &PgPool) -> (String, String) {
    sqlx::query_as(
        "SELECT system_identifier::text, current_database()::text FROM pg_control_system()",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

async fn get(redis: &arnela::queue::RedisConn, key: String) -> Option<String> {
    let mut c = redis.clone();
    redis::cmd("GET")
        .arg(key)
        .query_async(&mut c)
        .await
        .unwrap()
}

async fn del(redis: &arnela::queue::RedisConn, keys: &[String]) {
    let mut c = redis.clone();
    redis::cmd("DEL")
        .arg(keys)
        .query_async::<()>(&mut c)
        .await
        .unwrap();
}

/// A delivery of a task no database here holds, pushed by hand.
async fn push_foreign(e: &Engine) -> (TaskId, String) {
    let id = TaskId::new();
    let raw = Delivery {
        task_id: id,
        attempt: 1,
        task_type: "send_sms".into(),
    }
    .encode();
    let mut c = e.redis.clone();
    redis::cmd("LPUSH")
        .arg(e.keys.tasks())
        .arg(&raw)
        .query_async::<()>(&mut c)
        .await
        .unwrap();
    (id, raw)
}

fn skipped(metrics: &arnela::metrics::Metrics) -> f64 {
    counter(&metrics.render(arnela::metrics::Format::Prometheus, Vec::new()))
}

/// The value of `arnela_deliveries_skipped_total{reason="task_not_found"}` in a scrape.
fn counter(scrape: &str) -> f64 {
    let prefix = r#"arnela_deliveries_skipped_total{reason="task_not_found"} "#;
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no skipped counter in:\n{scrape}"))
        .trim()
        .parse()
        .unwrap()
}

/// A second database on the same cluster (dropped by the caller with [`drop_database`]).
async fn other_database(pool: &PgPool) -> String {
    let name = format!("arnela_binding_{}", Uuid::new_v4().simple());
    sqlx::raw_sql(&format!("CREATE DATABASE {name}"))
        .execute(pool)
        .await
        .unwrap();
    name
}

async fn drop_database(pool: &PgPool, name: &str) {
    sqlx::raw_sql(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .execute(pool)
        .await
        .unwrap();
}

fn with_database(url: &str, name: &str) -> String {
    let (base, _) = url.rsplit_once('/').unwrap();
    format!("{base}/{name}")
}

#[sqlx::test]
async fn a_process_on_another_database_refuses_to_start_and_names_both(pool: PgPool) {
    let prefix = unique_prefix();
    let db_a = database_url(&pool);
    let (cluster, name_a) = identity(&pool).await;
    let name_b = other_database(&pool).await;
    let db_b = with_database(&db_a, &name_b);
    let port = free_port().to_string();
    let _first = arnela(
        "serve",
        &db_a,
        &redis_url(),
        &prefix,
        &[("APP_PORT", &port)],
    );
    let redis = common::redis().await;
    let keys = Keys::new(prefix.clone());
    let bound = eventually(Duration::from_secs(60), "serve to bind", || {
        let (redis, key) = (redis.clone(), keys.database());
        async move { get(&redis, key).await }
    })
    .await;
    assert!(
        bound.contains(&name_a) && bound.contains(&cluster),
        "{bound}"
    );

    for role in ["serve", "api", "relay", "worker"] {
        let port = free_port().to_string();
        let cmd = arnela_command(role, &db_b, &redis_url(), &prefix, &[("APP_PORT", &port)]);
        let (status, stderr) = run_to_exit(cmd, Duration::from_secs(60));
        assert!(!status.success(), "{role} started on the other database");
        let ours = format!(r#"database "{name_b}" of Postgres cluster {cluster}"#);
        let theirs = format!(r#"database "{name_a}" of Postgres cluster {cluster}"#);
        assert!(stderr.contains(&ours), "{role}: {stderr}");
        assert!(stderr.contains(&theirs), "{role}: {stderr}");
        assert!(stderr.contains(&keys.database()), "{role}: {stderr}");
        assert!(!stderr.contains("postgres://"), "{role}: {stderr}");
    }
    // refused before migrating: the other database was left untouched
    let other = sqlx::PgPool::connect(&db_b).await.unwrap();
    let tables: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'",
    )
    .fetch_one(&other)
    .await
    .unwrap();
    assert_eq!(tables, 0);
    other.close().await;
    assert_eq!(get(&redis, keys.database()).await, Some(bound));
    drop(_first);
    drop_database(&pool, &name_b).await;
    common::delete_prefix(&prefix).await;
}

#[sqlx::test]
async fn a_delivery_of_a_task_not_in_this_database_is_left_on_the_queue(pool: PgPool) {
    let e = engine(pool, Script::answering(vec![]), config(0.5)).await;
    let (foreign, raw) = push_foreign(&e).await;
    let id = common::enqueue_tasks(&e.pool, TaskType::SendSms, 1, 3).await[0];
    assert_eq!(e.relay_once().await, 1);

    assert_eq!(e.step().await, Processed::Skipped(foreign));
    assert_eq!(e.step().await, Processed::Succeeded(id));
    assert_eq!(e.step().await, Processed::Skipped(foreign));
    assert_eq!(e.status(id).await, "succeeded");
    assert_eq!(e.range(e.keys.tasks()).await, vec![raw], "put back, once");
    assert_eq!(e.len(e.keys.processing()).await, 0);
    assert_eq!(skipped(&e.metrics), 2.0);
    common::delete_prefix(e.keys.prefix()).await;
}

#[sqlx::test]
async fn a_worker_with_nothing_but_unknown_deliveries_backs_off(pool: PgPool) {
    let e = engine(pool, Script::answering(vec![]), config(0.5)).await;
    let (foreign, raw) = push_foreign(&e).await;
    let started = Instant::now();
    for _ in 0..7 {
        assert_eq!(e.step().await, Processed::Skipped(foreign));
    }
    // 10 + 20 + 40 + 80 + 160 + 320 + 640 ms of pauses: without them, a few milliseconds
    assert!(
        started.elapsed() >= Duration::from_millis(1200),
        "seven skips took {:?}",
        started.elapsed()
    );
    assert_eq!(e.range(e.keys.tasks()).await, vec![raw]);
    assert_eq!(skipped(&e.metrics), 7.0);
    common::delete_prefix(e.keys.prefix()).await;
}

#[sqlx::test]
async fn a_rescuer_puts_back_a_processing_entry_of_an_unknown_task(pool: PgPool) {
    let e = engine(pool, Script::answering(vec![]), config(0.5)).await;
    let (_, raw) = push_foreign(&e).await;
    // a worker took it and died before putting it back
    assert_eq!(e.worker.take(1).await.unwrap(), vec![raw.clone()]);
    assert_eq!(e.len(e.keys.tasks()).await, 0);
    let pass = e.rescuer.run_once().await.unwrap();
    assert_eq!(pass.returned_unknown, 1);
    assert_eq!(pass.stale_entries, 0);
    assert_eq!(e.range(e.keys.tasks()).await, vec![raw]);
    assert_eq!(e.len(e.keys.processing()).await, 0);
    common::delete_prefix(e.keys.prefix()).await;
}

#[sqlx::test]
async fn serve_runs_its_tasks_and_keeps_a_foreign_delivery(pool: PgPool) {
    let prefix = unique_prefix();
    let keys = Keys::new(prefix.clone());
    let redis = common::redis().await;
    let raw = Delivery {
        task_id: TaskId::new(),
        attempt: 1,
        task_type: "send_sms".into(),
    }
    .encode();
    let mut c = redis.clone();
    redis::cmd("LPUSH")
        .arg(keys.tasks())
        .arg(&raw)
        .query_async::<()>(&mut c)
        .await
        .unwrap();
    let ids = common::enqueue_tasks(&pool, TaskType::SendSms, 3, 3).await;
    let metrics_port = free_port();
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let port = free_port().to_string();
    let _serve = arnela(
        "serve",
        &database_url(&pool),
        &redis_url(),
        &prefix,
        &[("APP_PORT", &port), ("METRICS_ADDR", &metrics_addr)],
    );
    eventually(Duration::from_secs(60), "the tasks to succeed", || {
        let pool = pool.clone();
        let ids = ids.clone();
        async move {
            let done: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM tasks WHERE id = ANY($1) AND status = 'succeeded'",
            )
            .bind(&ids)
            .fetch_one(&pool)
            .await
            .unwrap();
            (done == 3).then_some(())
        }
    })
    .await;
    let url = format!("http://127.0.0.1:{metrics_port}/metrics");
    let http = reqwest::Client::new();
    eventually(Duration::from_secs(30), "the skip to be counted", || {
        let req = http.get(&url);
        async move {
            let text = req.send().await.ok()?.text().await.ok()?;
            (counter(&text) >= 1.0).then_some(())
        }
    })
    .await;
    // at any moment the entry is on the queue or on the processing list, never gone
    let mut c = redis.clone();
    let (waiting, taken): (Vec<String>, Vec<String>) = redis::pipe()
        .atomic()
        .lrange(keys.tasks(), 0, -1)
        .lrange(keys.processing(), 0, -1)
        .query_async(&mut c)
        .await
        .unwrap();
    let copies = waiting.iter().chain(&taken).filter(|r| **r == raw).count();
    assert_eq!(copies, 1, "waiting {waiting:?}, taken {taken:?}");
    drop(_serve);
    common::delete_prefix(&prefix).await;
}

#[sqlx::test]
async fn the_next_relay_or_rescuer_step_binds_a_flushed_namespace_again(pool: PgPool) {
    let e = engine(pool, Script::answering(vec![]), config(0.5)).await;
    let (cluster, name) = identity(&e.pool).await;
    let ours = serde_json::json!({"system_identifier": cluster, "database": name});
    let stored = || async {
        get(&e.redis, e.keys.database())
            .await
            .map(|v| serde_json::from_str::<serde_json::Value>(&v).unwrap())
    };

    e.relay_once().await;
    assert_eq!(stored().await, Some(ours.clone()));
    del(&e.redis, &[e.keys.database(), e.keys.seeded()]).await;
    e.relay_once().await;
    assert_eq!(stored().await, Some(ours.clone()), "the relay re-binds");
    assert!(get(&e.redis, e.keys.seeded()).await.is_some());

    del(&e.redis, &[e.keys.database(), e.keys.seeded()]).await;
    let pass = e.rescuer.run_once().await.unwrap();
    assert_eq!(pass, Default::default());
    assert_eq!(stored().await, Some(ours), "the rescuer re-binds");
    assert!(get(&e.redis, e.keys.seeded()).await.is_some());
    common::delete_prefix(e.keys.prefix()).await;
}

#[sqlx::test]
async fn a_namespace_bound_elsewhere_later_stops_every_step(pool: PgPool) {
    let e = engine(pool, Script::answering(vec![]), config(0.5)).await;
    let id = common::enqueue_tasks(&e.pool, TaskType::SendSms, 1, 3).await[0];
    assert_eq!(e.relay_once().await, 1);
    // after a flush, another deployment re-bound the namespace first
    let theirs = r#"{"system_identifier":"1","database":"elsewhere"}"#;
    let mut c = e.redis.clone();
    redis::pipe()
        .del(e.keys.seeded())
        .ignore()
        .set(e.keys.database(), theirs)
        .ignore()
        .query_async::<()>(&mut c)
        .await
        .unwrap();
    let err = match e.worker.process_next(&e.shutdown, &e.hard_stop).await {
        Err(WorkerError::Binding(b)) => b.to_string(),
        other => panic!("the worker did not refuse: {other:?}"),
    };
    assert!(
        err.contains(r#"database "elsewhere" of Postgres cluster 1"#),
        "{err}"
    );
    assert!(matches!(
        e.relay.run_once().await,
        Err(RelayError::Binding(_))
    ));
    assert!(matches!(
        e.rescuer.run_once().await,
        Err(RescuerError::Binding(_))
    ));
    assert_eq!(
        get(&e.redis, e.keys.seeded()).await,
        None,
        "never marked seeded"
    );
    assert_eq!(e.len(e.keys.tasks()).await, 1, "the delivery was not taken");
    assert_eq!(e.status(id).await, "queued");
    common::delete_prefix(e.keys.prefix()).await;
}

#[sqlx::test]
async fn a_process_with_other_queue_shards_refuses_to_start(pool: PgPool) {
    let prefix = unique_prefix();
    let url = database_url(&pool);
    let port = free_port().to_string();
    let _first = arnela("serve", &url, &redis_url(), &prefix, &[("APP_PORT", &port)]);
    let redis = common::redis().await;
    let keys = Keys::new(prefix.clone());
    let bound = eventually(
        Duration::from_secs(60),
        "serve to record its shards",
        || {
            let (redis, key) = (redis.clone(), keys.shard_count());
            async move { get(&redis, key).await }
        },
    )
    .await;
    assert_eq!(bound, "1");
    let port = free_port().to_string();
    let cmd = arnela_command(
        "worker",
        &url,
        &redis_url(),
        &prefix,
        &[("APP_PORT", &port), ("QUEUE_SHARDS", "3")],
    );
    let (status, stderr) = run_to_exit(cmd, Duration::from_secs(60));
    assert!(!status.success(), "a worker with 3 shards started beside 1");
    assert!(
        stderr.contains("runs 1 queue shard(s)") && stderr.contains("QUEUE_SHARDS is 3"),
        "{stderr}"
    );
    assert!(stderr.contains(&keys.shard_count()), "{stderr}");
    // the same count starts: its heartbeat joins serve's
    let port = free_port().to_string();
    let _same = arnela(
        "worker",
        &url,
        &redis_url(),
        &prefix,
        &[("APP_PORT", &port), ("QUEUE_SHARDS", "1")],
    );
    eventually(
        Duration::from_secs(60),
        "the second process's workers",
        || {
            let (mut redis, keys) = (redis.clone(), keys.clone());
            async move {
                let live = arnela::queue::live_processes(&mut redis, &keys)
                    .await
                    .ok()?;
                (live.len() == 2).then_some(())
            }
        },
    )
    .await;
}
