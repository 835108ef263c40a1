//! History, the global log in commit-safe order, paging, and the tamper-evident hash chain.

mod common;

use arnela::domain::{NewTask, TaskType};
use arnela::store::{audit, events, tasks, Tx};
use chrono::Utc;
use common::{client, database_url, eventually, get, post, sms};
use rand::Rng;
use serde_json::{json, Value};
use sqlx::PgPool;
use std::collections::{BTreeSet, HashSet};
use std::time::Duration;
use uuid::Uuid;

fn new_sms(message: &str) -> NewTask {
    NewTask {
        task_type: TaskType::SendSms,
        payload: arnela::domain::validate_payload(
            TaskType::SendSms,
            json!({"phone": "+34123456789", "message": message}),
        )
        .unwrap(),
        max_attempts: 3,
        run_at: Utc::now(),
        idempotency_key: None,
        invalidates: Vec::new(),
        owner: String::new(),
        trace: None,
    }
}

/// Appends `dispatched` events to a task through the store, as the relay will.
async fn dispatch(pool: &PgPool, id: Uuid, times: usize) {
    for _ in 0..times {
        let mut tx = Tx::begin(pool).await.unwrap();
        let row = tasks::get_for_update(&mut tx, id).await.unwrap();
        let task = row.to_task().unwrap();
        let event = task.dispatch(1).unwrap();
        events::record(&mut tx, &task, &row.last_hash, &[event], Utc::now())
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }
}

#[sqlx::test]
async fn a_task_history_is_in_order_and_chained(pool: PgPool) {
    let c = client(pool.clone()).await;
    let (_, task) = post(&c, "/tasks", &sms("hola")).await;
    let id: Uuid = task["id"].as_str().unwrap().parse().unwrap();
    dispatch(&pool, id, 3).await;

    let (status, history) = get(&c, &format!("/tasks/{id}/events")).await;
    assert_eq!(status, 200);
    let history = history.as_array().unwrap();
    let types: Vec<&str> = history
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        ["enqueued", "dispatched", "dispatched", "dispatched"]
    );
    for (i, e) in history.iter().enumerate() {
        assert_eq!(e["sequence"], json!(i + 1));
        if i == 0 {
            assert!(e["prev_hash"].is_null());
        } else {
            assert_eq!(e["prev_hash"], history[i - 1]["hash"]);
            assert!(e["position"].as_i64() > history[i - 1]["position"].as_i64());
        }
    }
    assert_eq!(history[0]["data"]["payload"]["message"], "hola");
    let (_, state) = get(&c, &format!("/tasks/{id}")).await;
    assert_eq!(state["version"], 4);

    let (status, err) = get(&c, &format!("/tasks/{}/events", Uuid::new_v4())).await;
    assert_eq!((status, err["code"].as_str()), (404, Some("not_found")));
    let (status, err) = get(&c, &format!("/tasks/{}", Uuid::new_v4())).await;
    assert_eq!((status, err["code"].as_str()), (404, Some("not_found")));
    let (status, err) = get(&c, "/tasks/not-a-uuid").await;
    assert_eq!(
        (status, err["code"].as_str()),
        (400, Some("malformed_request"))
    );
}

#[sqlx::test]
async fn an_appender_with_a_stale_version_gets_a_conflict(pool: PgPool) {
    let mut tx = Tx::begin(&pool).await.unwrap();
    let created = tasks::enqueue(&mut tx, vec![new_sms("x")], Utc::now())
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let row = created[0].row().clone();
    let task = row.to_task().unwrap();
    dispatch(&pool, row.id, 1).await;

    let mut tx = Tx::begin(&pool).await.unwrap();
    let stale = events::record(
        &mut tx,
        &task,
        &row.last_hash,
        &[task.dispatch(1).unwrap()],
        Utc::now(),
    )
    .await;
    assert!(
        matches!(
            stale,
            Err(arnela::store::StoreError::VersionConflict { expected: 1, .. })
        ),
        "{stale:?}"
    );
}

/// A transaction that started earlier but commits later must not be skipped by a reader that
/// already read past a later one.
#[sqlx::test]
async fn the_global_log_waits_for_a_late_commit_instead_of_skipping_it(pool: PgPool) {
    let c = client(pool.clone()).await;
    let mut slow = Tx::begin(&pool).await.unwrap();
    let a = tasks::enqueue(&mut slow, vec![new_sms("first, commits last")], Utc::now())
        .await
        .unwrap();
    let (_, b) = post(&c, "/tasks", &sms("second, commits first")).await;

    // B is committed but A, which holds a lower position, is not: the log shows neither yet.
    let (_, page) = get(&c, "/events?after=0").await;
    let seen: Vec<&str> = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["task_id"].as_str().unwrap())
        .collect();
    assert!(!seen.contains(&b["id"].as_str().unwrap()), "{page}");
    let after = page["next_after"].as_i64().unwrap();

    slow.commit().await.unwrap();
    let rest: Vec<Value> = eventually(Duration::from_secs(30), "both events", || {
        let c = &c;
        async move {
            let (_, page) = get(c, &format!("/events?after={after}")).await;
            let events = page["events"].as_array().unwrap().clone();
            (events.len() == 2).then_some(events)
        }
    })
    .await;
    assert_eq!(
        rest[0]["task_id"].as_str().unwrap(),
        a[0].row().id.to_string()
    );
    assert_eq!(rest[1]["task_id"], b["id"]);
}

/// Many writers commit (and roll back) in random order while a reader pages through the log and
/// the task listing: each reader sees every committed row exactly once, in increasing order.
#[sqlx::test]
async fn paging_sees_every_row_once_while_commits_land_out_of_order(pool: PgPool) {
    let c = client(pool.clone()).await;
    // The writers get connections of their own, so the reader is never starved of one.
    let writer_pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .connect_with(pool.connect_options().as_ref().clone())
        .await
        .unwrap();
    let mut writers = Vec::new();
    for w in 0..8 {
        let pool = writer_pool.clone();
        writers.push(tokio::spawn(async move {
            let mut committed = Vec::new();
            for round in 0..15 {
                let mut tx = Tx::begin(&pool).await.unwrap();
                let n = 1 + (w + round) % 3;
                let made = tasks::enqueue(
                    &mut tx,
                    (0..n)
                        .map(|i| new_sms(&format!("w{w} r{round} #{i}")))
                        .collect(),
                    Utc::now(),
                )
                .await
                .unwrap();
                let pause = rand::thread_rng().gen_range(2..40);
                tokio::time::sleep(Duration::from_millis(pause)).await;
                if round % 5 == 4 {
                    // rolled back: must never be seen
                    drop(tx);
                } else {
                    tx.commit().await.unwrap();
                    committed.extend(made.iter().map(|m| m.row().id));
                }
            }
            committed
        }));
    }

    let mut seen_events: Vec<(i64, String)> = Vec::new();
    let mut seen_tasks: Vec<(i64, String)> = Vec::new();
    let (mut after_event, mut after_task) = (0i64, 0i64);
    let page = |seen_events: &mut Vec<(i64, String)>,
                seen_tasks: &mut Vec<(i64, String)>,
                body_e: Value,
                body_t: Value| {
        for e in body_e["events"].as_array().unwrap() {
            seen_events.push((
                e["position"].as_i64().unwrap(),
                e["task_id"].as_str().unwrap().to_owned(),
            ));
        }
        for t in body_t["items"].as_array().unwrap() {
            seen_tasks.push((0, t["id"].as_str().unwrap().to_owned()));
        }
    };
    let mut done = false;
    let mut committed: HashSet<String> = HashSet::new();
    let mut deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the readers never caught up: {} events and {} tasks seen of {} committed",
            seen_events.len(),
            seen_tasks.len(),
            committed.len()
        );
        let (_, e) = get(&c, &format!("/events?after={after_event}&limit=7")).await;
        let (_, t) = get(&c, &format!("/tasks?after={after_task}&limit=5")).await;
        after_event = e["next_after"].as_i64().unwrap();
        if let Some(n) = t["next_after"].as_i64() {
            after_task = n;
        } else if let Some(last) = t["items"].as_array().unwrap().last() {
            // a short page: continue after its last task, found through its enqueued event
            let id = last["id"].as_str().unwrap();
            let (_, h) = get(&c, &format!("/tasks/{id}/events")).await;
            after_task = h[0]["position"].as_i64().unwrap();
        }
        page(&mut seen_events, &mut seen_tasks, e, t);
        if !done && writers.iter().all(|w| w.is_finished()) {
            done = true;
            for w in writers.drain(..) {
                committed.extend(w.await.unwrap().into_iter().map(|id| id.to_string()));
            }
            // everything is committed: the readers must catch up promptly
            deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        }
        if done && seen_events.len() >= committed.len() && seen_tasks.len() >= committed.len() {
            break;
        }
        tokio::task::yield_now().await;
    }

    let positions: Vec<i64> = seen_events.iter().map(|(p, _)| *p).collect();
    assert!(
        positions.windows(2).all(|w| w[0] < w[1]),
        "positions increase"
    );
    let event_ids: Vec<String> = seen_events.into_iter().map(|(_, id)| id).collect();
    let task_ids: Vec<String> = seen_tasks.into_iter().map(|(_, id)| id).collect();
    for (what, ids) in [("events", event_ids), ("tasks", task_ids)] {
        let unique: BTreeSet<&String> = ids.iter().collect();
        assert_eq!(unique.len(), ids.len(), "{what}: a row was returned twice");
        let unique: HashSet<String> = ids.into_iter().collect();
        assert_eq!(
            unique, committed,
            "{what}: rows missing or rolled back rows shown"
        );
    }
}

#[sqlx::test]
async fn the_task_listing_filters_and_pages(pool: PgPool) {
    let c = client(pool.clone()).await;
    for i in 0..7 {
        post(&c, "/tasks", &sms(&format!("s{i}"))).await;
    }
    post(
        &c,
        "/tasks",
        &json!({"type": "send_email", "payload": {"to": "a@b.es", "subject": "s", "body": "b"}}),
    )
    .await;

    let all: Vec<Value> = eventually(Duration::from_secs(30), "all 8 tasks listed", || {
        let c = &c;
        async move {
            let (_, p) = get(c, "/tasks?limit=500").await;
            let items = p["items"].as_array().unwrap().clone();
            (items.len() == 8).then_some(items)
        }
    })
    .await;
    let (_, emails) = get(&c, "/tasks?type=send_email").await;
    assert_eq!(emails["items"].as_array().unwrap().len(), 1);
    let (_, queued) = get(&c, "/tasks?status=queued&type=send_sms").await;
    assert_eq!(queued["items"].as_array().unwrap().len(), 7);
    let (_, none) = get(&c, "/tasks?status=dead").await;
    assert_eq!(none["items"].as_array().unwrap().len(), 0);
    let to = all[3]["created_at"].as_str().unwrap().replace('+', "%2B");
    let (_, early) = get(&c, &format!("/tasks?created_to={to}")).await;
    assert_eq!(early["items"].as_array().unwrap().len(), 3);
    let (_, late) = get(&c, &format!("/tasks?created_from={to}")).await;
    assert_eq!(late["items"].as_array().unwrap().len(), 5);

    let mut ids = Vec::new();
    let mut after = 0;
    loop {
        let (_, p) = get(&c, &format!("/tasks?limit=3&after={after}")).await;
        ids.extend(
            p["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["id"].clone()),
        );
        match p["next_after"].as_i64() {
            Some(n) => after = n,
            None => break,
        }
    }
    assert_eq!(ids, all.iter().map(|t| t["id"].clone()).collect::<Vec<_>>());

    for bad in [
        "/tasks?type=send_fax",
        "/tasks?status=lost",
        "/tasks?limit=501",
        "/tasks?after=-1",
        "/events?limit=0",
        "/events?after=-5",
    ] {
        // a parameter outside its documented schema (enum, range) is refused before the
        // operation runs
        let (status, err) = get(&c, bad).await;
        assert_eq!(
            (status, err["code"].as_str()),
            (400, Some("malformed_request")),
            "{bad}"
        );
    }
    let (status, _) = get(&c, "/tasks?created_from=yesterday").await;
    assert_eq!(status, 400);
}

async fn tamper(pool: &PgPool, sql: &str, id: Uuid) {
    let mut conn = pool.acquire().await.unwrap();
    sqlx::query("ALTER TABLE task_events DISABLE TRIGGER task_events_append_only")
        .execute(&mut *conn)
        .await
        .unwrap();
    sqlx::query(sql).bind(id).execute(&mut *conn).await.unwrap();
    sqlx::query("ALTER TABLE task_events ENABLE TRIGGER task_events_append_only")
        .execute(&mut *conn)
        .await
        .unwrap();
}

#[sqlx::test]
async fn the_log_refuses_updates_and_deletes(pool: PgPool) {
    let c = client(pool.clone()).await;
    post(&c, "/tasks", &sms("x")).await;
    for sql in [
        "UPDATE task_events SET data = '{}'",
        "DELETE FROM task_events",
    ] {
        let err = sqlx::query(sql).execute(&pool).await.unwrap_err();
        assert!(err.to_string().contains("append-only"), "{err}");
    }
}

#[sqlx::test]
async fn verify_names_the_first_altered_or_missing_event(pool: PgPool) {
    let c = client(pool.clone()).await;
    let mut ids = Vec::new();
    for i in 0..3 {
        let (_, t) = post(&c, "/tasks", &sms(&format!("m{i}"))).await;
        let id: Uuid = t["id"].as_str().unwrap().parse().unwrap();
        dispatch(&pool, id, 2).await;
        ids.push(id);
    }
    let report = audit::verify(&pool, None).await.unwrap();
    assert_eq!((report.tasks, report.events, report.broken), (3, 9, None));

    // An edited payload is caught at the edited event.
    tamper(
        &pool,
        "UPDATE task_events SET data = jsonb_set(data, '{attempt}', '7') WHERE task_id = $1 AND sequence = 2",
        ids[1],
    )
    .await;
    let broken = audit::verify(&pool, None)
        .await
        .unwrap()
        .broken
        .expect("caught");
    assert_eq!((broken.task_id, broken.sequence), (ids[1], 2));
    assert!(broken.reason.contains("altered"), "{}", broken.reason);

    // The CLI says the same and exits non-zero.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_arnela"))
        .args(["audit", "verify"])
        .env("DATABASE_URL", database_url(&pool))
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&ids[1].to_string()) && stdout.contains("event 2"),
        "{stdout}"
    );
    // ... and one task's chain can be checked alone.
    let ok = audit::verify(&pool, Some(ids[0])).await.unwrap();
    assert_eq!((ok.events, ok.broken), (3, None));

    // A removed last event is caught through the projection.
    tamper(
        &pool,
        "DELETE FROM task_events WHERE task_id = $1 AND sequence = 3",
        ids[2],
    )
    .await;
    let broken = audit::verify(&pool, Some(ids[2]))
        .await
        .unwrap()
        .broken
        .expect("caught");
    assert_eq!((broken.task_id, broken.sequence), (ids[2], 3));
    assert!(broken.reason.contains("removed"), "{}", broken.reason);

    // A removed middle event is caught as a gap.
    tamper(
        &pool,
        "DELETE FROM task_events WHERE task_id = $1 AND sequence = 2",
        ids[0],
    )
    .await;
    let broken = audit::verify(&pool, Some(ids[0]))
        .await
        .unwrap()
        .broken
        .expect("caught");
    assert_eq!((broken.task_id, broken.sequence), (ids[0], 3));
    assert!(broken.reason.contains("missing"), "{}", broken.reason);
}

#[sqlx::test]
async fn verify_passes_on_an_untouched_log_through_the_cli(pool: PgPool) {
    let c = client(pool.clone()).await;
    post(&c, "/tasks", &sms("x")).await;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_arnela"))
        .args(["audit", "verify"])
        .env("DATABASE_URL", database_url(&pool))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 tasks, 1 events"));
}
