//! History, the global log in commit-safe order, paging, and the tamper-evident hash chain.

use crate::common;
use arnela::domain::TaskId;
use arnela::store::{audit, events, tasks, Tx};
use chrono::Utc;
use common::{
    client, database_url, drop_role, eventually, get, new_sms, pool_as, post, runtime_role, sms,
    tamper,
};
use serde_json::{json, Value};
use sqlx::PgPool;
use std::collections::{BTreeSet, HashSet};
use std::time::Duration;
use uuid::Uuid;

/// Appends `dispatched` events to a task through the store, as the relay will.
async fn dispatch(pool: &PgPool, id: TaskId, times: usize) {
    for _ in 0..times {
        let mut tx = Tx::begin(pool).await.unwrap();
        let (task, head) = tasks::get_for_update(&mut tx, id).await.unwrap();
        let event = task.dispatch(1).unwrap();
        events::record(&mut tx, &task, &head, &[event], Utc::now())
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }
}

#[sqlx::test]
async fn a_task_history_is_in_order_and_chained(pool: PgPool) {
    let c = client(pool.clone()).await;
    let (_, task) = post(&c, "/tasks", &sms("hola")).await;
    let id: TaskId = task["id"].as_str().unwrap().parse().unwrap();
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
    let created = tasks::enqueue(&mut tx, vec![new_sms("x")], Utc::now(), None)
        .await
        .unwrap();
    let (task, head) = tasks::get_for_update(&mut tx, created[0].task().id)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    dispatch(&pool, task.id, 1).await;

    let mut tx = Tx::begin(&pool).await.unwrap();
    let stale = events::record(
        &mut tx,
        &task,
        &head,
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
    let a = tasks::enqueue(
        &mut slow,
        vec![new_sms("first, commits last")],
        Utc::now(),
        None,
    )
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
        a[0].task().id.to_string()
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
                    None,
                )
                .await
                .unwrap();
                let pause = rand::random_range(2..40);
                tokio::time::sleep(Duration::from_millis(pause)).await;
                if round % 5 == 4 {
                    // rolled back: must never be seen
                    drop(tx);
                } else {
                    tx.commit().await.unwrap();
                    committed.extend(made.iter().map(|m| m.task().id));
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
async fn verify_names_every_broken_chain_at_its_first_bad_link(pool: PgPool) {
    let c = client(pool.clone()).await;
    let mut ids = Vec::new();
    for i in 0..6 {
        let (_, t) = post(&c, "/tasks", &sms(&format!("m{i}"))).await;
        let id: TaskId = t["id"].as_str().unwrap().parse().unwrap();
        dispatch(&pool, id, 2).await;
        ids.push(id);
    }
    let report = audit::verify(&pool, |_| {}).await.unwrap();
    assert_eq!((report.tasks, report.events, report.ok()), (6, 18, true));

    // Five ways to break a chain, one task each; the sixth task stays intact.
    tamper(
        &pool,
        "UPDATE task_events SET data = jsonb_set(data, '{attempt}', '7') WHERE task_id = $1 AND sequence = 2",
        ids[1],
    )
    .await;
    tamper(
        &pool,
        "DELETE FROM task_events WHERE task_id = $1 AND sequence = 3",
        ids[2],
    )
    .await;
    tamper(
        &pool,
        "DELETE FROM task_events WHERE task_id = $1 AND sequence = 2",
        ids[0],
    )
    .await;
    // a whole history removed, the projection row left
    tamper(&pool, "DELETE FROM task_events WHERE task_id = $1", ids[3]).await;
    // a projection row removed, its events left
    sqlx::query("DELETE FROM outbox WHERE task_id = $1")
        .bind(ids[4])
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("DELETE FROM task_leases WHERE task_id = $1")
        .bind(ids[4])
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("DELETE FROM tasks WHERE id = $1")
        .bind(ids[4])
        .execute(&pool)
        .await
        .unwrap();

    let report = audit::verify(&pool, |_| {}).await.unwrap();
    assert!(!report.ok());
    assert_eq!(report.broken_total, 5, "{report:?}");
    let found = |id: TaskId| report.broken.iter().find(|b| b.task_id == id).cloned();
    let b = found(ids[1]).expect("the altered event");
    assert_eq!(b.sequence, 2);
    assert!(b.reason.contains("altered"), "{}", b.reason);
    let b = found(ids[2]).expect("the removed tail");
    assert_eq!(b.sequence, 3);
    assert!(b.reason.contains("removed"), "{}", b.reason);
    let b = found(ids[0]).expect("the gap");
    assert_eq!(b.sequence, 3);
    assert!(b.reason.contains("missing"), "{}", b.reason);
    let b = found(ids[3]).expect("the removed history");
    assert!(b.reason.contains("no events"), "{}", b.reason);
    let b = found(ids[4]).expect("the removed projection row");
    assert!(b.reason.contains("no projection row"), "{}", b.reason);
    assert!(found(ids[5]).is_none());

    // One task's verdict.
    let ok = audit::verify_task(&pool, ids[5]).await.unwrap().unwrap();
    assert_eq!((ok.events, ok.ok()), (3, true));
    let bad = audit::verify_task(&pool, ids[3]).await.unwrap().unwrap();
    assert_eq!(bad.broken.len(), 1);
    assert!(audit::verify_task(&pool, TaskId::new())
        .await
        .unwrap()
        .is_none());
    let (status, verdict) = common::get(&c, &format!("/audit/verify/{}", ids[1])).await;
    assert_eq!(status, 200);
    assert_eq!(verdict["ok"], false);
    assert!(
        verdict["problem"].as_str().unwrap().starts_with("event 2:"),
        "{verdict}"
    );

    // The CLI names all five, as text and as JSON, and exits 2.
    let run = |json: bool| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_arnela"));
        cmd.args(["audit", "verify"]);
        if json {
            cmd.arg("--json");
        }
        let out = cmd
            .env("DATABASE_URL", database_url(&pool))
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, stdout) = run(false);
    assert_eq!(code, Some(2), "{stdout}");
    for id in &ids[..5] {
        assert!(stdout.contains(&format!("BROKEN: task {id}")), "{stdout}");
    }
    assert!(!stdout.contains(&ids[5].to_string()), "{stdout}");
    let (code, stdout) = run(true);
    assert_eq!(code, Some(2));
    let doc: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON document");
    assert_eq!(doc["ok"], false);
    assert_eq!(doc["broken_total"], 5);
    assert_eq!(doc["broken"].as_array().unwrap().len(), 5);
}

#[sqlx::test]
async fn verify_reads_the_log_in_pages_of_tasks(pool: PgPool) {
    let n = audit::PAGE_TASKS as usize * 2 + 500;
    let mut tx = arnela::store::Tx::begin(&pool).await.unwrap();
    let news = (0..n).map(|i| new_sms(&format!("m{i}"))).collect();
    arnela::store::tasks::enqueue(&mut tx, news, chrono::Utc::now(), None)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let mut pages = Vec::new();
    let report = audit::verify(&pool, |p| pages.push(p.tasks)).await.unwrap();
    assert!(report.ok());
    assert_eq!(report.tasks, n as u64);
    let page = audit::PAGE_TASKS as u64;
    assert_eq!(pages, vec![page, 2 * page, n as u64]);
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

#[sqlx::test]
async fn the_log_refuses_truncate_even_to_a_superuser(pool: PgPool) {
    let c = client(pool.clone()).await;
    post(&c, "/tasks", &sms("x")).await;
    for table in ["task_events", "schedule_events"] {
        let err = sqlx::query(&format!("TRUNCATE {table} CASCADE"))
            .execute(&pool)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("append-only"), "{table}: {err}");
    }
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM task_events")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(events, 1);
}

#[sqlx::test]
async fn the_runtime_role_appends_to_the_log_but_cannot_rewrite_it(pool: PgPool) {
    let role = runtime_role(&pool).await;
    let runtime = pool_as(&pool, &role).await;
    let powers = arnela::store::role_powers(&runtime).await.unwrap();
    assert_eq!(
        (powers.superuser, powers.owns_log, powers.may_migrate),
        (false, false, false),
        "{powers:?}"
    );
    let owner = arnela::store::role_powers(&pool).await.unwrap();
    assert!(owner.superuser && owner.owns_log, "{owner:?}");

    // The service's writes work: enqueue (tasks, events, outbox) and a transition.
    let mut tx = Tx::begin(&runtime).await.unwrap();
    let made = tasks::enqueue(&mut tx, vec![new_sms("hola")], Utc::now(), None)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let id = made[0].task().id;
    dispatch(&runtime, id, 1).await;
    assert_eq!(events::history(&runtime, id).await.unwrap().len(), 2);

    // Rewriting the log is refused by privilege, not only by trigger.
    for sql in [
        "UPDATE task_events SET data = '{}'",
        "DELETE FROM task_events",
        "TRUNCATE task_events",
        "ALTER TABLE task_events DISABLE TRIGGER task_events_append_only",
        "DROP TRIGGER task_events_append_only ON task_events",
        "UPDATE schedule_events SET data = '{}'",
        "DELETE FROM _sqlx_migrations",
    ] {
        let err = sqlx::query(sql).execute(&runtime).await.unwrap_err();
        let code = err
            .as_database_error()
            .and_then(|e| e.code())
            .map(|c| c.into_owned());
        assert_eq!(code.as_deref(), Some("42501"), "{sql}: {err}");
    }
    runtime.close().await;
    drop_role(&pool, &role).await;
}

#[sqlx::test]
async fn production_refuses_a_superuser_and_runs_as_a_runtime_role(pool: PgPool) {
    use common::process::{arnela_command, free_port, run_to_exit, spawn};
    let prefix = common::unique_prefix();
    let signing = "33".repeat(32);
    let production = [
        ("APP_ENV", "production"),
        ("ALLOW_LOG_CHANNEL", "true"),
        ("RUST_LOG", "warn"),
        ("AUDIT_SIGNING_KEY", signing.as_str()),
        ("AUDIT_CHECKPOINT_SECS", "1"),
    ];
    // As the superuser the tests connect with: refused before anything starts.
    let cmd = arnela_command(
        "serve",
        &database_url(&pool),
        &common::redis_url(),
        &prefix,
        &production,
    );
    let (status, stderr) = run_to_exit(cmd, Duration::from_secs(60));
    assert!(!status.success());
    assert!(
        stderr.contains("refusing to start in production") && stderr.contains("superuser"),
        "{stderr}"
    );

    // As a member of arnela_runtime: it starts and runs a task through every role.
    let role = runtime_role(&pool).await;
    let url =
        database_url(&pool).replacen("postgres://postgres@", &format!("postgres://{role}@"), 1);
    let port = free_port().to_string();
    let mut env = production.to_vec();
    env.push(("APP_PORT", port.as_str()));
    let serve = spawn(
        arnela_command("serve", &url, &common::redis_url(), &prefix, &env),
        "serve",
    );
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    common::until_live(&base).await;
    let resp = http
        .post(format!("{base}/tasks"))
        .bearer_auth(common::token(arnela::api::auth::Role::Producer))
        .json(&sms("desde producción"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let id: TaskId = resp.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    eventually(Duration::from_secs(60), "the task to succeed", || {
        let pool = pool.clone();
        async move {
            let s: String = sqlx::query_scalar("SELECT status FROM tasks WHERE id = $1")
                .bind(id)
                .fetch_one(&pool)
                .await
                .unwrap();
            (s == "succeeded").then_some(())
        }
    })
    .await;
    // the projectors and the health page work under the role too
    let health = http
        .get(format!("{base}/health"))
        .bearer_auth(common::token(arnela::api::auth::Role::Auditor))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    // the checkpointer writes signed checkpoints under the role too
    eventually(Duration::from_secs(30), "a checkpoint", || {
        let pool = pool.clone();
        async move {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_checkpoints")
                .fetch_one(&pool)
                .await
                .unwrap();
            (n > 0).then_some(())
        }
    })
    .await;
    // the failed list's outbox under the role: a copy written, then taken (row locks) and pushed
    {
        use arnela::domain::task::DeadLetter;
        use arnela::store::failed_copies;
        let as_role = PgPool::connect(&url).await.unwrap();
        let dead = DeadLetter {
            task_id: TaskId::new(),
            task_type: arnela::domain::TaskType::SendSms,
            attempts: 1,
            reason: "as the runtime role".into(),
            at: chrono::Utc::now(),
        };
        let mut tx = Tx::begin(&as_role).await.unwrap();
        failed_copies::record(&mut tx, &[dead]).await.unwrap();
        tx.commit().await.unwrap();
        let keys = arnela::queue::Keys::new(prefix.clone());
        let pushed =
            arnela::dead_letters::push_pending(&as_role, &mut common::redis().await, &keys).await;
        assert!(
            pushed.is_ok_and(|n| n <= 1),
            "taken and pushed under the role"
        );
        assert_eq!(failed_copies::pending(&as_role).await.unwrap(), 0);
        as_role.close().await;
    }
    drop(serve);
    common::delete_prefix(&prefix).await;
    // the role's sessions end with the process; then it can be dropped
    eventually(
        Duration::from_secs(10),
        "the role's sessions to end",
        || {
            let pool = pool.clone();
            let role = role.clone();
            async move {
                let n: i64 =
                    sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE usename = $1")
                        .bind(&role)
                        .fetch_one(&pool)
                        .await
                        .unwrap();
                (n == 0).then_some(())
            }
        },
    )
    .await;
    drop_role(&pool, &role).await;
}

#[sqlx::test]
async fn the_hash_covers_where_and_when_an_event_was_stored(pool: PgPool) {
    use arnela::domain::event::{canonical_bytes, event_hash, Placement};
    let c = client(pool.clone()).await;
    let mut ids = Vec::new();
    for i in 0..4 {
        let (_, t) = post(&c, "/tasks", &sms(&format!("p{i}"))).await;
        let id: TaskId = t["id"].as_str().unwrap().parse().unwrap();
        dispatch(&pool, id, 1).await;
        ids.push(id);
    }
    // the enqueue (hashed in its statement) and a transition (hashed here) both write version 2,
    // and the SQL function an auditor can use gives the same hashes
    let history = events::history(&pool, ids[0]).await.unwrap();
    assert_eq!(
        history.iter().map(|e| e.hash_version).collect::<Vec<_>>(),
        [2, 2]
    );
    for e in &history {
        let document = canonical_bytes(
            2,
            e.task_id.into_uuid(),
            e.sequence,
            &e.event_type,
            e.event_version,
            &e.data,
            e.occurred_at,
        );
        let placed = Placement {
            position: e.position,
            recorded_at: e.recorded_at,
        };
        let ours = event_hash(e.prev_hash.as_deref(), &document, Some(placed));
        let theirs: Vec<u8> = sqlx::query_scalar("SELECT event_hash_v2($1, $2, $3, $4)")
            .bind(&e.prev_hash)
            .bind(&document)
            .bind(e.position)
            .bind(e.recorded_at)
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(
            (ours.as_slice(), theirs.as_slice()),
            (e.hash.as_slice(), e.hash.as_slice())
        );
    }
    assert!(audit::verify(&pool, |_| {}).await.unwrap().ok());

    // moved in the global log, re-dated, or passed off as version 1: each is caught
    tamper(
        &pool,
        "UPDATE task_events SET position = position + 1 WHERE task_id = $1 AND sequence = 2",
        ids[0],
    )
    .await;
    tamper(
        &pool,
        "UPDATE task_events SET recorded_at = recorded_at - interval '1 microsecond' \
         WHERE task_id = $1 AND sequence = 1",
        ids[1],
    )
    .await;
    tamper(
        &pool,
        "UPDATE task_events SET hash_version = 1 WHERE task_id = $1 AND sequence = 2",
        ids[2],
    )
    .await;
    let report = audit::verify(&pool, |_| {}).await.unwrap();
    assert_eq!(report.broken_total, 3, "{report:?}");
    let found = |id: TaskId| report.broken.iter().find(|b| b.task_id == id).cloned();
    for (id, sequence) in [(ids[0], 2), (ids[1], 1), (ids[2], 2)] {
        let b = found(id).unwrap_or_else(|| panic!("task {id} is reported"));
        assert_eq!(b.sequence, sequence, "{b:?}");
    }
    assert!(found(ids[2]).unwrap().reason.contains("never goes back"));
    assert!(found(ids[3]).is_none());
}

#[sqlx::test]
async fn chains_written_before_version_2_still_verify(pool: PgPool) {
    use arnela::domain::event::{canonical_bytes, chain_hash};
    let c = client(pool.clone()).await;
    let (_, t) = post(&c, "/tasks", &sms("old")).await;
    let id: TaskId = t["id"].as_str().unwrap().parse().unwrap();
    dispatch(&pool, id, 1).await;
    // Rewrite the task's events into the version 1 form a database migrated from an older
    // release holds: hashes over the document alone, chained, with `last_hash` to match.
    let mut prev: Option<Vec<u8>> = None;
    for e in events::history(&pool, id).await.unwrap() {
        let document = canonical_bytes(
            1,
            e.task_id.into_uuid(),
            e.sequence,
            &e.event_type,
            e.event_version,
            &e.data,
            e.occurred_at,
        );
        let hash = chain_hash(prev.as_deref(), &document).to_vec();
        let sql = format!(
            "UPDATE task_events SET hash_version = 1, hash = '\\x{}', prev_hash = {} \
             WHERE task_id = $1 AND sequence = {}",
            hex::encode(&hash),
            prev.as_ref()
                .map_or("NULL".to_owned(), |p| format!("'\\x{}'", hex::encode(p))),
            e.sequence
        );
        tamper(&pool, &sql, id).await;
        prev = Some(hash);
    }
    sqlx::query("UPDATE tasks SET last_hash = $2 WHERE id = $1")
        .bind(id)
        .bind(&prev)
        .execute(&pool)
        .await
        .unwrap();
    assert!(audit::verify_task(&pool, id).await.unwrap().unwrap().ok());
    // the events appended now are version 2, chained to the version 1 head
    dispatch(&pool, id, 1).await;
    let history = events::history(&pool, id).await.unwrap();
    assert_eq!(
        history.iter().map(|e| e.hash_version).collect::<Vec<_>>(),
        [1, 1, 2]
    );
    assert!(audit::verify_task(&pool, id).await.unwrap().unwrap().ok());
    let report = audit::verify(&pool, |_| {}).await.unwrap();
    assert_eq!((report.events, report.ok()), (3, true), "{report:?}");
}

#[sqlx::test]
async fn numbers_jsonb_normalises_still_verify(pool: PgPool) {
    let c = client(pool.clone()).await;
    // -0.0 is stored by jsonb as 0.0, exponents and escapes are rewritten: a producer must not
    // be able to plant a broken chain
    let body = serde_json::from_str::<Value>(
        r#"{"type": "sync_calendar", "payload": {"event_id": "evt-0", "action": "create",
            "appointment_data": {"starts_at": "2030-01-01T10:00:00Z", "summary": "Revisi\u00f3n ☃ 😀 \ud83d\ude00",
                                 "clinic_ref": -0.0, "weights": [-0.0, 1.5, 1e2, -7, 1.5e-7,
                                 1e20, 100.0, 12345678901234567890, 0.1, 2.5E+3]}}}"#,
    )
    .unwrap();
    let (status, task) = post(&c, "/tasks", &body).await;
    assert_eq!(status, 201, "{task}");
    let id: TaskId = task["id"].as_str().unwrap().parse().unwrap();
    let report = audit::verify_task(&pool, id).await.unwrap().unwrap();
    assert!(report.ok(), "{report:?}");
}

#[sqlx::test]
async fn checkpoints_catch_what_the_chains_alone_cannot(pool: PgPool) {
    use arnela::domain::checkpoint::signing_key;
    use arnela::store::checkpoints;
    let key = signing_key(&"11".repeat(32)).unwrap();
    let public = key.verifying_key().to_bytes();
    let c = client(pool.clone()).await;
    let mut ids = Vec::new();
    for i in 0..4 {
        let (_, t) = post(&c, "/tasks", &sms(&format!("c{i}"))).await;
        let id: TaskId = t["id"].as_str().unwrap().parse().unwrap();
        dispatch(&pool, id, 1).await;
        ids.push(id);
    }
    // Checkpoints cover the log up to its commit-safe horizon, which a transaction of another
    // test running on this server may hold back for a moment: write until all four are in.
    let recorded = |pool: PgPool, key: ed25519_dalek::SigningKey| async move {
        checkpoints::write(&pool, &key).await.unwrap();
        // each task's last event (its second): a checkpoint may have seen only its first
        let n: i64 = sqlx::query_scalar(
            "SELECT count(DISTINCT task_id) FROM audit_checkpoint_heads WHERE version = 2",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        (n == 4).then_some(())
    };
    eventually(
        Duration::from_secs(30),
        "checkpoints of the four tasks",
        || recorded(pool.clone(), key.clone()),
    )
    .await;
    assert!(
        checkpoints::write(&pool, &key).await.unwrap().is_none(),
        "nothing new"
    );
    let report = checkpoints::verify(&pool, Some(&public)).await.unwrap();
    assert!(report.heads >= 4 && report.broken.is_empty(), "{report:?}");
    let ours = report.checkpoints;
    // auditors read them over the API, signed with the public key they were given
    let (status, page) = get(&c, "/audit/checkpoints").await;
    assert_eq!(status, 200, "{page}");
    let listed = page["checkpoints"].as_array().unwrap();
    assert_eq!(listed.len() as u64, ours);
    assert_eq!(listed[0]["public_key"], json!(hex::encode(public)));
    assert_eq!(page["next_after"], json!(ours));

    // A whole history removed with its task row, and a tail cut with last_hash rewritten to
    // match: every remaining chain still verifies on its own ...
    tamper(&pool, "DELETE FROM task_events WHERE task_id = $1", ids[0]).await;
    for table in ["outbox", "task_leases"] {
        sqlx::query(&format!("DELETE FROM {table} WHERE task_id = $1"))
            .bind(ids[0])
            .execute(&pool)
            .await
            .unwrap();
    }
    sqlx::query("DELETE FROM tasks WHERE id = $1")
        .bind(ids[0])
        .execute(&pool)
        .await
        .unwrap();
    tamper(
        &pool,
        "DELETE FROM task_events WHERE task_id = $1 AND sequence = 2",
        ids[1],
    )
    .await;
    sqlx::query(
        "UPDATE tasks SET version = 1, \
           last_hash = (SELECT hash FROM task_events WHERE task_id = $1 AND sequence = 1) \
         WHERE id = $1",
    )
    .bind(ids[1])
    .execute(&pool)
    .await
    .unwrap();
    assert!(audit::verify(&pool, |_| {}).await.unwrap().ok());
    // ... but the checkpoint recorded both heads.
    let report = checkpoints::verify(&pool, Some(&public)).await.unwrap();
    // (a task's first event may have been a head too, of an earlier checkpoint)
    assert!(
        report.broken.len() >= 2
            && report
                .broken
                .iter()
                .all(|p| p.contains(&ids[0].to_string()) || p.contains(&ids[1].to_string())),
        "{:?}",
        report.broken
    );
    for id in &ids[..2] {
        assert!(
            report
                .broken
                .iter()
                .any(|p| p.contains(&id.to_string()) && p.contains("missing or altered")),
            "{:?}",
            report.broken
        );
    }

    // The CLI reports them, with the key from AUDIT_SIGNING_KEY, and exits 2.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_arnela"))
        .args(["audit", "verify"])
        .env("DATABASE_URL", database_url(&pool))
        .env("AUDIT_SIGNING_KEY", "11".repeat(32))
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{stdout}");
    assert!(stdout.contains(&format!("task {}", ids[0])), "{stdout}");

    // A checkpoint signed with another key is refused against the trusted one; an altered one
    // no longer matches its hash.
    dispatch(&pool, ids[2], 1).await;
    let stranger = signing_key(&"22".repeat(32)).unwrap();
    let forged = eventually(
        Duration::from_secs(30),
        "a checkpoint by another key",
        || {
            let (pool, stranger) = (pool.clone(), stranger.clone());
            async move { checkpoints::write(&pool, &stranger).await.unwrap() }
        },
    )
    .await;
    assert_eq!(forged.seq, ours as i64 + 1);
    let report = checkpoints::verify(&pool, Some(&public)).await.unwrap();
    let expected = format!("checkpoint {}: signed with another key", forged.seq);
    assert!(
        report.broken.iter().any(|p| p.starts_with(&expected)),
        "{:?}",
        report.broken
    );
    let mut conn = pool.acquire().await.unwrap();
    for sql in [
        "ALTER TABLE audit_checkpoints DISABLE TRIGGER audit_checkpoints_append_only",
        "UPDATE audit_checkpoints SET tasks = tasks + 1 WHERE seq = 1",
        "ALTER TABLE audit_checkpoints ENABLE TRIGGER audit_checkpoints_append_only",
    ] {
        sqlx::query(sql).execute(&mut *conn).await.unwrap();
    }
    drop(conn);
    let report = checkpoints::verify(&pool, Some(&public)).await.unwrap();
    assert!(
        report
            .broken
            .iter()
            .any(|p| p.starts_with("checkpoint 1: content does not match")),
        "{:?}",
        report.broken
    );
    // and the runtime role may add checkpoints but not change them
    let err = sqlx::query("DELETE FROM audit_checkpoints")
        .execute(&pool)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("append-only"), "{err}");
}

#[sqlx::test]
async fn an_exported_copy_of_the_checkpoints_is_checked_without_the_database(pool: PgPool) {
    use arnela::domain::checkpoint::signing_key;
    use arnela::store::checkpoints;
    let key = signing_key(&"33".repeat(32)).unwrap();
    let public = hex::encode(key.verifying_key().to_bytes());
    let c = client(pool.clone()).await;
    // three checkpoints, each over a task of its own
    for i in 0..3 {
        let (_, t) = post(&c, "/tasks", &sms(&format!("e{i}"))).await;
        let id: TaskId = t["id"].as_str().unwrap().parse().unwrap();
        eventually(Duration::from_secs(30), "a checkpoint of the task", || {
            let (pool, key) = (pool.clone(), key.clone());
            async move {
                checkpoints::write(&pool, &key).await.unwrap();
                let n: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM audit_checkpoint_heads WHERE task_id = $1",
                )
                .bind(id)
                .fetch_one(&pool)
                .await
                .unwrap();
                (n == 1).then_some(())
            }
        })
        .await;
    }
    let arnela = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_arnela"))
            .args(args)
            .env("DATABASE_URL", database_url(&pool))
            .env("RUST_LOG", "warn")
            .env_remove("AUDIT_SIGNING_KEY")
            .env_remove("AUDIT_PUBLIC_KEY")
            .output()
            .unwrap()
    };
    let out = arnela(&["audit", "checkpoints"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let export = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = export.lines().collect();
    assert_eq!(lines.len(), 3, "{export}");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("checkpoints.jsonl");
    let write = |text: &str| std::fs::write(&file, text).unwrap();
    let path = file.to_str().unwrap();

    // the copy verifies against the trusted key, with no database at all
    write(&export);
    let offline = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_arnela"))
            .args(args)
            .env("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none")
            .env_remove("AUDIT_SIGNING_KEY")
            .env_remove("AUDIT_PUBLIC_KEY")
            .output()
            .unwrap()
    };
    let out = offline(&["audit", "verify-checkpoints", path, "--public-key", &public]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("ok: 3 checkpoints"), "{stdout}");
    // another trusted key, an altered line, a line left out: each is refused (exit 2)
    let stranger = hex::encode(
        signing_key(&"44".repeat(32))
            .unwrap()
            .verifying_key()
            .to_bytes(),
    );
    let out = offline(&[
        "audit",
        "verify-checkpoints",
        path,
        "--public-key",
        &stranger,
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(2), "{stdout}");
    assert!(
        stdout.contains("checkpoint 1: signed with another key"),
        "{stdout}"
    );
    let mut altered: Value = serde_json::from_str(lines[1]).unwrap();
    altered["upto_position"] = json!(altered["upto_position"].as_i64().unwrap() + 1);
    write(&format!("{}\n{altered}\n{}\n", lines[0], lines[2]));
    let out = offline(&["audit", "verify-checkpoints", path, "--public-key", &public]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(2), "{stdout}");
    assert!(
        stdout.contains("checkpoint 2: content does not match"),
        "{stdout}"
    );
    write(&format!("{}\n{}\n", lines[0], lines[2]));
    let out = offline(&["audit", "verify-checkpoints", path, "--public-key", &public]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(2), "{stdout}");
    assert!(stdout.contains("expected checkpoint 2"), "{stdout}");

    // Against the database: the newest checkpoint removed (which the database alone cannot
    // show, its chain still holds) is found by comparing with the exported copy.
    write(&export);
    let out = arnela(&[
        "audit",
        "verify",
        "--public-key",
        &public,
        "--checkpoints",
        path,
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let mut conn = pool.acquire().await.unwrap();
    for sql in [
        "ALTER TABLE audit_checkpoints DISABLE TRIGGER audit_checkpoints_append_only",
        "DELETE FROM audit_checkpoints WHERE seq = 3",
        "ALTER TABLE audit_checkpoints ENABLE TRIGGER audit_checkpoints_append_only",
    ] {
        sqlx::query(sql).execute(&mut *conn).await.unwrap();
    }
    drop(conn);
    let report = checkpoints::verify(&pool, Some(&key.verifying_key().to_bytes()))
        .await
        .unwrap();
    assert!(report.broken.is_empty(), "{:?}", report.broken);
    let out = arnela(&[
        "audit",
        "verify",
        "--public-key",
        &public,
        "--checkpoints",
        path,
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(2), "{stdout}");
    assert!(
        stdout.contains("checkpoint 3: in the exported copy but no longer in the database"),
        "{stdout}"
    );
}

#[test]
fn keygen_draws_a_new_signing_key_whose_public_half_it_prints() {
    let run = || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_arnela"))
            .args(["audit", "keygen"])
            .output()
            .expect("arnela audit keygen runs");
        assert!(out.status.success(), "{out:?}");
        let text = String::from_utf8(out.stdout).unwrap();
        let value = |name: &str| -> [u8; 32] {
            let hex_value = text
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{name}=")))
                .unwrap_or_else(|| panic!("no {name} in:\n{text}"));
            hex::decode(hex_value).unwrap().try_into().unwrap()
        };
        (value("AUDIT_SIGNING_KEY"), value("AUDIT_PUBLIC_KEY"))
    };
    let (secret, public) = run();
    let signing = ed25519_dalek::SigningKey::from_bytes(&secret);
    assert_eq!(signing.verifying_key().to_bytes(), public);
    let (again, _) = run();
    assert_ne!(secret, again, "each run draws a new key");
    assert_ne!(secret, [0u8; 32]);
}
