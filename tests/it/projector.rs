//! Projectors against real Postgres and Redis: totals and cache invalidations derived from the
//! event log, resumed from their checkpoints without duplicates or gaps, shared by several
//! instances; the API's cached reads are never stale once the events are projected.

use crate::common;

use arnela::cache::{invalidation, keys, Cache, Invalidation, Ttl};
use arnela::domain::TaskType;
use arnela::projector::{Projection, Projector};
use arnela::store::projection;
use arnela::worker::handler::HandlerError;
use common::engine::{config, engine, Script};
use futures::StreamExt;
use serde_json::json;
use sqlx::PgPool;
use std::collections::{BTreeMap, HashSet};
use std::time::Duration;
use uuid::Uuid;

/// Event counts per (task type, event type) straight from the log.
async fn log_counts(pool: &PgPool) -> BTreeMap<(String, String), i64> {
    let rows: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT f.data->>'task_type', e.event_type, count(*) FROM task_events e \
         JOIN task_events f ON f.task_id = e.task_id AND f.sequence = 1 \
         GROUP BY 1, 2",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    rows.into_iter().map(|(t, e, n)| ((t, e), n)).collect()
}

/// The projected totals as the same map.
async fn projected_counts(pool: &PgPool) -> BTreeMap<(String, String), i64> {
    let mut out = BTreeMap::new();
    for t in projection::totals(pool).await.unwrap() {
        for (event, n) in [
            ("enqueued", t.enqueued),
            ("attempt_started", t.attempts_started),
            ("attempt_succeeded", t.succeeded),
            ("attempt_failed", t.attempts_failed),
            ("retry_scheduled", t.retries),
            ("dead_lettered", t.dead),
            ("cancelled", t.cancelled),
            ("requeued", t.requeued),
        ] {
            if n > 0 {
                out.insert((t.task_type.clone(), event.to_owned()), n);
            }
        }
    }
    out
}

/// The log counts without the event types the totals do not count.
fn countable(mut counts: BTreeMap<(String, String), i64>) -> BTreeMap<(String, String), i64> {
    counts.retain(|(_, e), _| !matches!(e.as_str(), "dispatched" | "attempt_released"));
    counts
}

/// The last position of the log (every event in the test's database has committed).
async fn last_position(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT coalesce(max(position), 0) FROM task_events")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Steps the projector until its checkpoint reaches the end of the log; returns the events read.
/// (Transactions of other tests on the same server may hold the log's horizon back for a while.)
async fn drain(p: &Projector, pool: &PgPool) -> usize {
    let last = last_position(pool).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut total = 0;
    loop {
        let step = p.run_once().await.expect("projector step");
        total += step.events;
        if !step.busy && step.position >= last {
            return total;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "projector stuck at {step:?}"
        );
        if step.events == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Waits until the log's horizon has passed `position`, so a batch read sees every event up to
/// it (transactions of other tests on the same server may hold the horizon back for a while).
async fn wait_for_horizon(pool: &PgPool, position: i64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let horizon: i64 = sqlx::query_scalar("SELECT event_log_horizon()")
            .fetch_one(pool)
            .await
            .unwrap();
        if horizon > position {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "horizon {horizon} stuck below {position}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Runs tasks to their end with the scripted engine.
async fn run_all(e: &common::engine::Engine, n: usize) {
    let mut done = 0;
    while done < n {
        e.relay_once().await;
        if matches!(e.step().await, arnela::worker::Processed::Idle) {
            continue;
        }
        done = sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM tasks WHERE status IN ('succeeded', 'dead')",
        )
        .fetch_one(&e.pool)
        .await
        .unwrap() as usize;
    }
}

#[sqlx::test]
async fn totals_equal_the_log_after_restarts_in_small_batches(pool: PgPool) {
    // 3 failures then successes: retries, a dead letter (max 2 attempts) and successes
    let script = Script::answering(vec![
        Err(HandlerError::retryable("busy")),
        Err(HandlerError::retryable("busy")),
        Err(HandlerError::permanent("no such number")),
    ]);
    let e = engine(pool.clone(), script, config(0.0)).await;
    common::enqueue_tasks(&pool, TaskType::SendSms, 20, 2).await;
    common::enqueue_tasks(&pool, TaskType::SyncCalendar, 5, 2).await;
    // the retried ones become due after the backoff (jitter 0 → due now)
    run_all(&e, 25).await;

    // a projector that "restarts" (a new instance) after every step of 7 events
    let last = last_position(&pool).await;
    let mut steps = 0;
    loop {
        let p = Projector::new(pool.clone(), Projection::Totals).with_batch(7);
        let step = p.run_once().await.unwrap();
        if step.position >= last {
            break;
        }
        if step.events > 0 {
            steps += 1;
        } else {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    assert!(steps > 5, "many small steps ({steps})");
    assert_eq!(
        projected_counts(&pool).await,
        countable(log_counts(&pool).await)
    );

    // nothing is counted twice by another run, and the checkpoint is the last position
    let p = Projector::new(pool.clone(), Projection::Totals);
    assert_eq!(p.run_once().await.unwrap().events, 0);
    let cps = projection::checkpoints(&pool).await.unwrap();
    let cp = cps.iter().find(|c| c.name == "totals").unwrap();
    assert_eq!(cp.position, last);
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM task_events")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(cp.events, events, "each event read once");

    // durations: one per finished attempt, in the histogram
    let buckets = projection::durations(&pool).await.unwrap();
    let observed: i64 = buckets.iter().map(|b| b.count).sum();
    let finished: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM task_events \
         WHERE event_type IN ('attempt_succeeded', 'attempt_failed')",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(observed, finished);
}

#[sqlx::test]
async fn a_late_commit_is_projected_later_never_skipped(pool: PgPool) {
    let p = Projector::new(pool.clone(), Projection::Totals);
    // a transaction that appends an event and stays open
    let mut open = arnela::store::Tx::begin(&pool).await.unwrap();
    let news = vec![common::new_task(
        TaskType::SendEmail,
        json!({"to": "a@b.es", "subject": "s", "body": "b"}),
    )];
    arnela::store::tasks::enqueue(&mut open, news, chrono::Utc::now(), None)
        .await
        .unwrap();
    // later transactions commit first
    common::enqueue_tasks(&pool, TaskType::SendSms, 3, 3).await;
    for _ in 0..5 {
        p.run_once().await.unwrap();
    }
    let before = projected_counts(&pool).await;
    assert_eq!(
        before.get(&("send_email".into(), "enqueued".into())),
        None,
        "the open transaction's event is not read yet"
    );
    assert_eq!(
        before.get(&("send_sms".into(), "enqueued".into())),
        None,
        "nor anything after it: the horizon holds the log at the open transaction"
    );
    open.commit().await.unwrap();
    drain(&p, &pool).await;
    let after = projected_counts(&pool).await;
    assert_eq!(after[&("send_email".into(), "enqueued".into())], 1);
    assert_eq!(after[&("send_sms".into(), "enqueued".into())], 3);
}

#[sqlx::test]
async fn instances_of_one_projector_take_turns_and_count_each_event_once(pool: PgPool) {
    common::enqueue_tasks(&pool, TaskType::SendSms, 3000, 3).await;
    let instances: Vec<Projector> = (0..4)
        .map(|_| Projector::new(pool.clone(), Projection::Totals).with_batch(50))
        .collect();
    let last = last_position(&pool).await;
    let mut handles = Vec::new();
    for p in instances {
        let pool = pool.clone();
        handles.push(tokio::spawn(async move {
            loop {
                let step = p.run_once().await.unwrap();
                if step.busy || step.events == 0 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                let done: i64 = sqlx::query_scalar(
                    "SELECT coalesce(max(position), 0) FROM projector_checkpoints",
                )
                .fetch_one(&pool)
                .await
                .unwrap();
                if done >= last {
                    return;
                }
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    let totals = projection::totals(&pool).await.unwrap();
    assert_eq!(totals.len(), 1);
    assert_eq!(totals[0].enqueued, 3000);
    let cps = projection::checkpoints(&pool).await.unwrap();
    let cp = cps.iter().find(|c| c.name == "totals").unwrap();
    assert_eq!(cp.events, 3000);
}

/// A cache, a projector invalidating it, and a subscriber to its channel.
struct Invalidator {
    cache: Cache,
    projector: Projector,
    messages: tokio::sync::mpsc::UnboundedReceiver<Invalidation>,
}

async fn invalidator(pool: &PgPool, cache: Cache) -> Invalidator {
    let client = redis::Client::open(common::redis_url()).unwrap();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    pubsub.subscribe(cache.channel()).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut stream = pubsub.into_on_message();
        while let Some(msg) = stream.next().await {
            let payload: String = msg.get_payload().unwrap();
            if tx.send(serde_json::from_str(&payload).unwrap()).is_err() {
                return;
            }
        }
    });
    Invalidator {
        projector: Projector::new(
            pool.clone(),
            Projection::CacheInvalidation(Box::new(cache.clone())),
        ),
        cache,
        messages: rx,
    }
}

async fn seed(cache: &Cache, keys: &[&str]) {
    for k in keys {
        cache
            .set(k, &json!({"cached": k}), Ttl::Long)
            .await
            .unwrap();
    }
}

async fn present(cache: &Cache, keys: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    for k in keys {
        if cache.exists(k).await.unwrap() {
            out.push((*k).to_owned());
        }
    }
    out
}

/// The invalidation projector's batch read of the whole log, once every event written so far is
/// below the horizon.
async fn touched_so_far(pool: &PgPool) -> Vec<projection::TaskTouched> {
    wait_for_horizon(pool, last_position(pool).await).await;
    let mut tx = arnela::store::Tx::begin(pool).await.unwrap();
    let touched = projection::touched_after(&mut tx, 0, 1000, invalidation::PAYLOAD_RULES_TYPE)
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    touched
}

/// Only a calendar sync's success needs its payload (its rule keys are named in it): the batch
/// read carries the enqueued payload of succeeded `sync_calendar` tasks and of no other type.
#[sqlx::test]
async fn only_calendar_successes_carry_their_payload_to_the_invalidator(pool: PgPool) {
    let e = engine(pool.clone(), Script::answering(vec![]), config(0.0)).await;
    let sms = common::enqueue_tasks(&pool, TaskType::SendSms, 2, 1).await;
    let calendar = common::enqueue_tasks(&pool, TaskType::SyncCalendar, 1, 1).await;
    run_all(&e, 3).await;
    let touched = touched_so_far(&pool).await;
    let succeeded: Vec<_> = touched.iter().filter(|t| t.succeeded).collect();
    assert_eq!(succeeded.len(), 3, "{touched:?}");
    for t in &succeeded {
        if sms.contains(&t.task_id) {
            assert_eq!(t.task_type, Some(TaskType::SendSms));
            assert_eq!(t.payload, None, "an SMS's payload is not read");
        } else {
            assert_eq!(t.task_id, calendar[0]);
            assert_eq!(t.task_type, Some(TaskType::SyncCalendar));
            let payload = t
                .payload
                .as_ref()
                .expect("a calendar sync's payload is read");
            assert_eq!(payload["event_id"], "e0");
        }
    }
}

/// A succeeded task's declared keys and calendar payload are read from its row, and from its
/// `enqueued` event when retention removed the row; a task that declared none stores none.
#[sqlx::test]
async fn declared_invalidations_are_read_from_the_row_or_else_the_enqueued_event(pool: PgPool) {
    let e = engine(pool.clone(), Script::answering(vec![]), config(0.0)).await;
    let declaring = |task_type, payload, keys: &[&str]| {
        let mut t = common::new_task(task_type, payload);
        t.invalidates = keys.iter().map(|k| (*k).to_owned()).collect();
        t
    };
    let mut ids = Vec::new();
    for news in [
        // enqueued first: the one retention removes below
        vec![declaring(
            TaskType::SendSms,
            json!({"phone": "+34123456789", "message": "m"}),
            &["client:gone"],
        )],
        vec![
            declaring(
                TaskType::SyncCalendar,
                json!({"event_id": "apt-9", "action": "delete"}),
                &["client:kept", "employees:*"],
            ),
            declaring(
                TaskType::SendSms,
                json!({"phone": "+34123456789", "message": "m"}),
                &[],
            ),
        ],
    ] {
        let mut tx = arnela::store::Tx::begin(&pool).await.unwrap();
        let made = arnela::store::tasks::enqueue(&mut tx, news, chrono::Utc::now(), None)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        ids.extend(made.iter().map(|m| m.task().id));
    }
    let stored: Vec<Option<serde_json::Value>> =
        sqlx::query_scalar("SELECT invalidates FROM tasks WHERE id = ANY($1) ORDER BY id")
            .bind(ids.iter().map(|id| *id.as_uuid()).collect::<Vec<Uuid>>())
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(
        stored,
        vec![
            Some(json!(["client:gone"])),
            Some(json!(["client:kept", "employees:*"])),
            None
        ]
    );
    run_all(&e, 3).await;
    let retired = arnela::store::retention::retire_finished(
        &pool,
        chrono::Utc::now() + chrono::Duration::days(1),
        1,
    )
    .await
    .unwrap();
    assert_eq!(retired, 1);
    let touched = touched_so_far(&pool).await;
    let of = |id| {
        let t = touched
            .iter()
            .find(|t| t.task_id == id && t.succeeded)
            .unwrap_or_else(|| panic!("{id} succeeded in the batch: {touched:?}"));
        (t.task_type, t.payload.clone(), t.invalidates.clone())
    };
    assert_eq!(
        of(ids[0]),
        (Some(TaskType::SendSms), None, Some(json!(["client:gone"]))),
        "the removed row's declaration comes from its event"
    );
    let (task_type, payload, declared) = of(ids[1]);
    assert_eq!(task_type, Some(TaskType::SyncCalendar));
    assert_eq!(payload.unwrap()["event_id"], "apt-9");
    assert_eq!(declared, Some(json!(["client:kept", "employees:*"])));
    assert_eq!(of(ids[2]), (Some(TaskType::SendSms), None, None));
}

#[sqlx::test]
async fn a_successful_calendar_sync_invalidates_its_rule_keys_and_declared_ones(pool: PgPool) {
    let ctx = common::context(pool.clone()).await;
    let api = common::client_for(ctx.clone());
    let mut inv = invalidator(&pool, ctx.cache.clone()).await;
    let e = engine(pool.clone(), Script::answering(vec![]), config(0.0)).await;

    let stale = [
        "appointment:apt-1",
        "appointments:client:cli-1",
        "appointments:employee:emp-1:date:2026-12-01",
        "stats:dashboard",
        "client:cli-1",
        "employees:specialty:physio",
        "employees:specialty:dental",
    ];
    let fresh = [
        "appointment:apt-2",
        "appointments:employee:emp-1:date:2026-12-02",
        "client:cli-2",
        "employees:list",
    ];
    seed(&inv.cache, &stale).await;
    seed(&inv.cache, &fresh).await;

    let (status, task) = common::post(
        &api,
        "/tasks",
        &json!({
            "type": "sync_calendar",
            "payload": {
                "event_id": "apt-1", "action": "update",
                "appointment_data": {
                    "client_id": "cli-1", "employee_id": "emp-1",
                    "starts_at": "2026-12-01T10:00:00+01:00",
                    "ends_at": "2026-12-01T10:30:00+01:00"
                }
            },
            "invalidates": ["client:cli-1", "employees:specialty:*"]
        }),
    )
    .await;
    assert_eq!(status, 201, "{task}");
    let id: Uuid = task["id"].as_str().unwrap().parse().unwrap();

    // enqueued but not run: only the task's own view is dropped
    drain(&inv.projector, &pool).await;
    assert_eq!(present(&inv.cache, &stale).await.len(), stale.len());
    let first = inv.messages.recv().await.unwrap();
    assert_eq!(first.keys, vec![keys::task_stats(), keys::task(id)]);

    run_all(&e, 1).await;
    drain(&inv.projector, &pool).await;
    assert_eq!(present(&inv.cache, &stale).await, Vec::<String>::new());
    assert_eq!(present(&inv.cache, &fresh).await.len(), fresh.len());

    // the subscriber hears every key and pattern once the success is projected
    let mut heard_keys = HashSet::new();
    let mut heard_patterns = HashSet::new();
    while let Ok(Some(m)) =
        tokio::time::timeout(Duration::from_millis(500), inv.messages.recv()).await
    {
        heard_keys.extend(m.keys);
        heard_patterns.extend(m.patterns);
    }
    for k in &stale[..5] {
        assert!(heard_keys.contains(*k), "{k} published");
    }
    assert!(heard_patterns.contains("employees:specialty:*"));
}

#[sqlx::test]
async fn invalidations_resume_after_a_restart_without_duplicates_or_gaps(pool: PgPool) {
    let ctx = common::context(pool.clone()).await;
    let mut inv = invalidator(&pool, ctx.cache.clone()).await;
    let ids = common::enqueue_tasks(&pool, TaskType::SendSms, 40, 3).await;

    // three "processes", one after the other, each reading a few small batches
    let mut positions = Vec::new();
    for _ in 0..3 {
        let p = Projector::new(
            pool.clone(),
            Projection::CacheInvalidation(Box::new(inv.cache.clone())),
        )
        .with_batch(6);
        for _ in 0..3 {
            p.run_once().await.unwrap();
        }
    }
    drain(&inv.projector, &pool).await;
    let mut heard = Vec::new();
    while let Ok(Some(m)) =
        tokio::time::timeout(Duration::from_millis(300), inv.messages.recv()).await
    {
        positions.push(m.position.unwrap());
        heard.extend(
            m.keys
                .into_iter()
                .filter(|k| k.starts_with("task:"))
                .collect::<Vec<_>>(),
        );
    }
    let mut sorted = positions.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted, positions, "batches published in order, none twice");
    let expected: Vec<String> = ids.iter().map(keys::task).collect();
    assert_eq!(heard.len(), expected.len(), "no task invalidated twice");
    assert_eq!(
        heard.iter().collect::<HashSet<_>>(),
        expected.iter().collect::<HashSet<_>>(),
        "no task missed"
    );
}

#[sqlx::test]
async fn a_cached_task_is_never_stale_once_its_events_are_projected(pool: PgPool) {
    let ctx = common::context(pool.clone()).await;
    let api = common::client_for(ctx.clone());
    let inv = invalidator(&pool, ctx.cache.clone()).await;
    let e = engine(pool.clone(), Script::answering(vec![]), config(0.0)).await;

    let (_, task) = common::post(&api, "/tasks", &common::sms("hola")).await;
    let id = task["id"].as_str().unwrap().to_owned();
    let path = format!("/tasks/{id}");
    let (_, seen) = common::get(&api, &path).await;
    assert_eq!(seen["status"], "queued");
    assert!(inv.cache.exists(&format!("task:{id}")).await.unwrap());

    run_all(&e, 1).await;
    // before projection the cached view lags; Cache-Control: no-cache reads Postgres
    let (_, cached) = common::get(&api, &path).await;
    assert_eq!(cached["status"], "queued");
    let resp = api
        .get(&path)
        .header("Cache-Control", "no-cache")
        .send()
        .await;
    resp.assert_status_is_ok();
    let fresh: serde_json::Value = resp.json().await.value().deserialize();
    assert_eq!(fresh["status"], "succeeded");
    // once the events are projected, the cached view cannot lag
    drain(&inv.projector, &pool).await;
    let (_, seen) = common::get(&api, &path).await;
    assert_eq!(seen["status"], "succeeded");
}

#[sqlx::test]
async fn a_load_that_raced_an_invalidation_is_returned_but_not_cached(_pool: PgPool) {
    let cache = Cache::new(common::redis().await, &common::unique_prefix());

    // the write commits and its invalidation runs while the loader stalls
    let loaded = load_racing(&cache, "client:race", |c| async move {
        c.delete("client:race").await.unwrap();
    })
    .await;
    assert_eq!(loaded, "old", "the caller gets what it loaded");
    assert!(
        !cache.exists("client:race").await.unwrap(),
        "but it is not cached"
    );
    let next: String = cache
        .get_or_set("client:race", Ttl::Long, || async {
            Ok::<_, std::convert::Infallible>("new".into())
        })
        .await
        .unwrap();
    assert_eq!(next, "new");
    assert_eq!(
        cache.get::<String>("client:race").await.unwrap().as_deref(),
        Some("new")
    );

    // a pattern delete guards every key the same way
    load_racing(&cache, "client:other", |c| async move {
        c.delete_pattern("client:*").await.unwrap();
    })
    .await;
    assert!(!cache.exists("client:other").await.unwrap());
}

/// Loads `key` with a loader that reads "old" and stalls until `invalidate` has run.
async fn load_racing<F, Fut>(cache: &Cache, key: &'static str, invalidate: F) -> String
where
    F: FnOnce(Cache) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let (read_tx, read_rx) = tokio::sync::oneshot::channel::<()>();
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    let loader_cache = cache.clone();
    let loading = tokio::spawn(async move {
        loader_cache
            .get_or_set(key, Ttl::Long, || async move {
                // read the database's old value, then stall before the cache write
                read_tx.send(()).unwrap();
                go_rx.await.unwrap();
                Ok::<_, std::convert::Infallible>("old".to_owned())
            })
            .await
            .unwrap()
    });
    read_rx.await.unwrap();
    invalidate(cache.clone()).await;
    go_tx.send(()).unwrap();
    loading.await.unwrap()
}

#[sqlx::test]
async fn declared_invalidations_are_validated_at_enqueue(pool: PgPool) {
    let api = common::client(pool.clone()).await;
    let mut body = common::sms("x");
    body["invalidates"] = json!(["client:1", "*"]);
    let (status, err) = common::post(&api, "/tasks", &body).await;
    assert_eq!(status, 422, "{err}");
    assert_eq!(err["field"], "invalidates[1]");
    assert_eq!(common::counts(&pool).await, (0, 0, 0));
}

#[sqlx::test]
async fn stats_are_served_from_the_cache_until_events_are_projected(pool: PgPool) {
    let ctx = common::context(pool.clone()).await;
    let api = common::client_for(ctx.clone());
    let totals =
        Projector::new(pool.clone(), Projection::Totals).with_stats_cache(ctx.cache.clone());
    let inv = invalidator(&pool, ctx.cache.clone()).await;

    common::enqueue_tasks(&pool, TaskType::SendSms, 4, 3).await;
    drain(&totals, &pool).await;
    drain(&inv.projector, &pool).await;
    let (status, stats) = common::get(&api, "/stats").await;
    assert_eq!(status, 200, "{stats}");
    assert_eq!(stats["types"][0]["type"], "send_sms");
    assert_eq!(stats["types"][0]["enqueued"], 4);
    assert_eq!(stats["types"][0]["by_status"]["queued"], 4);

    common::enqueue_tasks(&pool, TaskType::SendSms, 2, 3).await;
    let (_, cached) = common::get(&api, "/stats").await;
    assert_eq!(cached["types"][0]["enqueued"], 4, "served from the cache");
    // the invalidation projector runs before the totals: a read then sees the new statuses
    // with the old totals...
    drain(&inv.projector, &pool).await;
    let (_, early) = common::get(&api, "/stats").await;
    assert_eq!(early["types"][0]["by_status"]["queued"], 6);
    assert_eq!(early["types"][0]["enqueued"], 4);
    // ...and the totals projector drops that value when it commits the new totals
    drain(&totals, &pool).await;
    let (_, fresh) = common::get(&api, "/stats").await;
    assert_eq!(fresh["types"][0]["enqueued"], 6);
    assert_eq!(fresh["types"][0]["by_status"]["queued"], 6);
}

/// Patterns are restricted: a producer needs a token granted them, and a pattern must start
/// with one of the clinic's key families (never the API's own `task:` views).
#[sqlx::test]
async fn invalidation_patterns_need_a_grant_and_a_declared_family(pool: PgPool) {
    use arnela::api::auth::Role;
    let ctx = common::context(pool.clone()).await;
    let c = poem::test::TestClient::new(arnela::api::endpoint(ctx));
    let hour = Duration::from_secs(3600);
    let auth = common::auth();
    let plain = auth.mint(Role::Producer, hour, "agenda");
    let granted = auth.mint_with_patterns(Role::Producer, hour, "agenda", None);
    let send = |token: String, invalidates: serde_json::Value| {
        let c = &c;
        async move {
            let mut body = common::sms("x");
            body["invalidates"] = invalidates;
            let resp = c
                .post("/tasks")
                .header("authorization", format!("Bearer {token}"))
                .body_json(&body)
                .send()
                .await;
            let status = resp.0.status().as_u16();
            (
                status,
                resp.0
                    .into_body()
                    .into_json::<serde_json::Value>()
                    .await
                    .unwrap(),
            )
        }
    };
    let (status, err) = send(
        plain.clone(),
        json!(["client:1", "appointments:client:1:*"]),
    )
    .await;
    assert_eq!(
        (status, err["field"].as_str()),
        (403, Some("invalidates[1]")),
        "{err}"
    );
    assert_eq!(send(plain, json!(["client:1"])).await.0, 201);
    for outside in ["task:*", "cli*", "stats:tasks*"] {
        let (status, err) = send(granted.clone(), json!([outside])).await;
        assert_eq!(
            (status, err["field"].as_str()),
            (422, Some("invalidates[0]")),
            "{outside}: {err}"
        );
    }
    assert_eq!(
        send(granted, json!(["appointments:client:1:*"])).await.0,
        201
    );
    // in a batch the refusal names the task
    let mut task = common::sms("y");
    task["invalidates"] = json!(["client:*"]);
    let resp = c
        .post("/tasks/batch")
        .header(
            "authorization",
            format!("Bearer {}", auth.mint(Role::Producer, hour, "agenda")),
        )
        .body_json(&json!({"tasks": [common::sms("z"), task]}))
        .send()
        .await;
    assert_eq!(resp.0.status().as_u16(), 403);
    let err: serde_json::Value = resp.0.into_body().into_json().await.unwrap();
    assert_eq!(err["field"], "tasks[1].invalidates[0]", "{err}");
    assert_eq!(common::counts(&pool).await, (2, 2, 2));
}

/// However many patterns a projector batch brings, the cache's keys are read once: one pass
/// for the whole batch, each key matched against every pattern (widened to families beyond
/// the per-pass bound), and exactly the matching keys are gone.
#[sqlx::test]
async fn a_batch_of_patterns_costs_one_pass_over_the_keys(pool: PgPool) {
    let ctx = common::context(pool.clone()).await;
    let cache = ctx.cache.clone();
    let doomed: Vec<String> = (0..50)
        .map(|i| format!("appointments:client:{i}:day"))
        .collect();
    let kept: Vec<String> = (0..50)
        .map(|i| format!("appointments:employee:{i}:date:2026-12-01"))
        .chain(["client:7".to_owned(), "employees:list".to_owned()])
        .collect();
    let all: Vec<&str> = doomed.iter().chain(&kept).map(String::as_str).collect();
    seed(&cache, &all).await;
    // 1,000 tasks' worth of patterns in one batch: 64 each, most repeated
    let patterns: Vec<String> = (0..64_000)
        .map(|i| format!("appointments:client:{}:*", i % 50))
        .collect();
    let before = cache
        .stats
        .pattern_passes
        .load(std::sync::atomic::Ordering::Relaxed);
    cache
        .invalidate(&arnela::cache::Invalidation {
            keys: vec![],
            patterns,
            position: None,
        })
        .await
        .unwrap();
    let after = cache
        .stats
        .pattern_passes
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(after - before, 1, "one pass for the whole batch");
    let doomed_refs: Vec<&str> = doomed.iter().map(String::as_str).collect();
    let kept_refs: Vec<&str> = kept.iter().map(String::as_str).collect();
    assert_eq!(present(&cache, &doomed_refs).await, Vec::<String>::new());
    assert_eq!(present(&cache, &kept_refs).await.len(), kept.len());

    // beyond the bound of distinct patterns, they are widened to their family
    seed(&cache, &all).await;
    let many: Vec<String> = (0..arnela::cache::MAX_PATTERNS_PER_PASS + 1)
        .map(|i| format!("appointments:client:{i}:*"))
        .collect();
    cache.delete_patterns(&many).await.unwrap();
    assert_eq!(present(&cache, &doomed_refs).await, Vec::<String>::new());
    assert_eq!(present(&cache, &kept_refs).await.len(), kept.len());
}

#[sqlx::test]
async fn replayable_and_scan_transactions_carry_their_settings(pool: PgPool) {
    // a pool of the service's own sessions (seq and bitmap scans off)
    let service = arnela::store::connect((*pool.connect_options()).clone(), 2)
        .await
        .unwrap();
    let show = |name: &'static str| format!("SHOW {name}");
    let mut plain = arnela::store::Tx::begin(&service).await.unwrap();
    let seq: String = sqlx::query_scalar(&show("enable_seqscan"))
        .fetch_one(plain.conn())
        .await
        .unwrap();
    assert_eq!(
        seq, "off",
        "the service's sessions plan without sequential scans"
    );
    plain.rollback().await.unwrap();

    let mut replayable = arnela::store::Tx::begin_replayable(&service).await.unwrap();
    let sync: String = sqlx::query_scalar(&show("synchronous_commit"))
        .fetch_one(replayable.conn())
        .await
        .unwrap();
    assert_eq!(sync, "off");
    replayable.commit().await.unwrap();

    let mut scan = arnela::store::Tx::begin_scan(&service).await.unwrap();
    for name in ["enable_seqscan", "enable_bitmapscan"] {
        let v: String = sqlx::query_scalar(&show(name))
            .fetch_one(scan.conn())
            .await
            .unwrap();
        assert_eq!(v, "on", "{name}");
    }
    scan.commit().await.unwrap();

    // the settings end with their transaction
    let mut after = arnela::store::Tx::begin(&service).await.unwrap();
    let sync: String = sqlx::query_scalar(&show("synchronous_commit"))
        .fetch_one(after.conn())
        .await
        .unwrap();
    assert_eq!(sync, "on");
}
