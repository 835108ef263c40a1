//! Schedules: the API and its change log, the scheduler step with an injected clock, and
//! exactly one task per slot with real `arnela serve` processes (three at once; one killed in
//! the middle of a step).

use crate::common;

use arnela::api::auth::Role;
use arnela::domain::schedule::{Cadence, MissedRuns};
use arnela::domain::{validate_payload, TaskType};
use arnela::store::schedules::{self, NewSchedule};
use chrono::{DateTime, Duration as ChronoDuration, TimeZone, Utc};
use common::process::{arnela, Proc};
use common::{bearer, call, client, database_url, eventually, get, post, redis_url, unique_prefix};
use poem::http::Method;
use serde_json::{json, Value};
use sqlx::PgPool;
use std::time::Duration;
use uuid::Uuid;

fn sms_schedule(cron: &str, zone: &str) -> Value {
    json!({
        "name": "appointment reminders",
        "cron": cron,
        "time_zone": zone,
        "type": "send_sms",
        "payload": {"phone": "+34600000000", "message": "Recuerde su cita de mañana"},
    })
}

/// A schedule created through the store (the processes' tests need no API).
async fn every_second(pool: &PgPool, missed: MissedRuns) -> Uuid {
    let payload = validate_payload(
        TaskType::SendSms,
        json!({"phone": "+34600000001", "message": "tick"}),
    )
    .unwrap();
    schedules::create(
        pool,
        NewSchedule {
            name: "every second".into(),
            cadence: Cadence::parse("* * * * * *", "Europe/Madrid").unwrap(),
            task_type: TaskType::SendSms,
            payload,
            max_attempts: 3,
            missed,
            paused: false,
            owner: "clinic".into(),
        },
        "test",
        Utc::now(),
    )
    .await
    .unwrap()
    .id
}

/// The fired slots of schedule `id`, oldest first, with their tasks.
async fn runs(pool: &PgPool, id: Uuid) -> Vec<(DateTime<Utc>, Uuid)> {
    sqlx::query_as("SELECT slot, task_id FROM schedule_runs WHERE schedule_id = $1 ORDER BY slot")
        .bind(id)
        .fetch_all(pool)
        .await
        .unwrap()
}

/// Every task of schedule `id`: its idempotency key and id.
async fn slot_tasks(pool: &PgPool, id: Uuid) -> Vec<(String, Uuid)> {
    sqlx::query_as("SELECT idempotency_key, id FROM tasks WHERE idempotency_key LIKE $1 ORDER BY 1")
        .bind(format!("schedule:{id}:%"))
        .fetch_all(pool)
        .await
        .unwrap()
}

/// Asserts one task per fired slot, no slot twice and no second missing between the first
/// and the last fired slot; returns how many slots fired.
async fn assert_each_slot_once(pool: &PgPool, id: Uuid) -> usize {
    let runs = runs(pool, id).await;
    let tasks = slot_tasks(pool, id).await;
    assert!(!runs.is_empty(), "no slot fired");
    for pair in runs.windows(2) {
        assert_eq!(
            pair[1].0 - pair[0].0,
            ChronoDuration::seconds(1),
            "slots {} and {} are not consecutive seconds (a slot was skipped)",
            pair[0].0,
            pair[1].0
        );
    }
    assert_eq!(
        tasks.len(),
        runs.len(),
        "{} tasks for {} slots",
        tasks.len(),
        runs.len()
    );
    for (slot, task) in &runs {
        let key = arnela::domain::schedule::slot_key(id, *slot);
        let found: Vec<&(String, Uuid)> = tasks.iter().filter(|(k, _)| *k == key).collect();
        assert_eq!(found.len(), 1, "slot {slot} has {} tasks", found.len());
        assert_eq!(found[0].1, *task, "slot {slot}'s run names another task");
    }
    runs.len()
}

#[sqlx::test]
async fn a_schedule_is_created_changed_paused_and_deleted_with_a_chained_change_log(pool: PgPool) {
    let c = client(pool.clone()).await;
    let (status, created) = post(
        &c,
        "/schedules",
        &sms_schedule("0 9 * * MON-FRI", "Europe/Madrid"),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_str().unwrap().to_owned();
    assert_eq!(created["missed_runs"], "skip");
    assert_eq!(created["owner"], "test-admin");
    let next: Vec<DateTime<Utc>> = serde_json::from_value(created["next_runs"].clone()).unwrap();
    assert_eq!(next.len(), 5);
    let madrid: chrono_tz::Tz = "Europe/Madrid".parse().unwrap();
    for at in &next {
        let local = at.with_timezone(&madrid);
        assert_eq!(local.format("%H:%M:%S").to_string(), "09:00:00", "{at}");
        assert!(!matches!(
            local.format("%a").to_string().as_str(),
            "Sat" | "Sun"
        ));
    }
    let next_run_at: DateTime<Utc> =
        serde_json::from_value(created["next_run_at"].clone()).unwrap();
    assert_eq!(next_run_at, next[0]);

    // Readable by auditors, not by producers; written by admins only.
    let auditor = common::context(pool.clone()).await;
    let auditor = poem::test::TestClient::new(arnela::api::endpoint(auditor))
        .default_header("authorization", bearer(Role::Auditor));
    let (status, listed) = get(&auditor, "/schedules").await;
    assert_eq!(status, 200);
    assert_eq!(listed["schedules"][0]["id"], json!(id));
    let (status, body) = post(&auditor, "/schedules", &sms_schedule("* * * * *", "UTC")).await;
    assert_eq!((status, body["code"].as_str()), (403, Some("forbidden")));
    let producer =
        poem::test::TestClient::new(arnela::api::endpoint(common::context(pool.clone()).await))
            .default_header("authorization", bearer(Role::Producer));
    assert_eq!(get(&producer, "/schedules").await.0, 403);

    // A change of expression moves the next slot; the event lists what changed.
    let (status, changed) = call(
        &c,
        Method::PATCH,
        &format!("/schedules/{id}"),
        Some(&json!({"cron": "30 8 * * *", "missed_runs": "catch_up", "catch_up_limit": 3})),
    )
    .await;
    assert_eq!(status, 200, "{changed}");
    assert_eq!(changed["cron"], "30 8 * * *");
    assert_eq!(changed["catch_up_limit"], 3);
    let first: DateTime<Utc> = serde_json::from_value(changed["next_run_at"].clone()).unwrap();
    assert_eq!(
        first.with_timezone(&madrid).format("%H:%M").to_string(),
        "08:30"
    );

    let (status, paused) = post(&c, &format!("/schedules/{id}/pause"), &json!({})).await;
    assert_eq!(status, 200);
    assert_eq!(
        (paused["paused"].clone(), paused["next_runs"].clone()),
        (json!(true), json!([]))
    );
    assert!(paused.get("next_run_at").is_none());
    let (status, resumed) = post(&c, &format!("/schedules/{id}/resume"), &json!({})).await;
    assert_eq!((status, resumed["paused"].clone()), (200, json!(false)));

    let (status, one) = get(&c, &format!("/schedules/{id}")).await;
    assert_eq!(status, 200);
    assert_eq!(one["recent_runs"], json!([]));

    let (status, body) = call(&c, Method::DELETE, &format!("/schedules/{id}"), None).await;
    assert_eq!((status, body), (204, Value::Null));
    assert_eq!(get(&c, &format!("/schedules/{id}")).await.0, 404);
    assert_eq!(
        post(&c, &format!("/schedules/{id}/pause"), &json!({}))
            .await
            .0,
        404
    );

    // The change log outlives the schedule and is chained.
    let (status, events) = get(&auditor, &format!("/schedules/{id}/events")).await;
    assert_eq!(status, 200);
    let types: Vec<&str> = events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        ["created", "updated", "paused", "resumed", "deleted"]
    );
    assert_eq!(events[0]["data"]["cron"], "0 9 * * MON-FRI");
    assert_eq!(events[0]["data"]["by"], "test-admin");
    assert_eq!(
        events[1]["data"]["changes"],
        json!({"cron": "30 8 * * *", "missed_runs": "catch_up", "catch_up_limit": 3})
    );
    assert!(events[0].get("prev_hash").is_none());
    for pair in events.as_array().unwrap().windows(2) {
        assert_eq!(pair[1]["prev_hash"], pair[0]["hash"]);
    }
    let (checked, broken) = schedules::verify(&pool).await.unwrap();
    assert_eq!((checked, broken), (5, vec![]));

    // An altered event is found (the trigger is disabled as an owner could).
    sqlx::query("ALTER TABLE schedule_events DISABLE TRIGGER schedule_events_append_only")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("UPDATE schedule_events SET data = jsonb_set(data, '{by}', '\"mallory\"') WHERE sequence = 3")
        .execute(&pool)
        .await
        .unwrap();
    let (_, broken) = schedules::verify(&pool).await.unwrap();
    assert_eq!(broken.len(), 1);
    assert_eq!(broken[0].sequence, 3);
    assert!(broken[0].reason.contains("altered"), "{}", broken[0].reason);

    // A schedule's row removed behind the API's back is found too.
    let (_, other) = post(&c, "/schedules", &sms_schedule("0 9 * * *", "UTC")).await;
    sqlx::query("DELETE FROM schedules WHERE id = $1")
        .bind(Uuid::parse_str(other["id"].as_str().unwrap()).unwrap())
        .execute(&pool)
        .await
        .unwrap();
    let (_, broken) = schedules::verify(&pool).await.unwrap();
    assert_eq!(broken.len(), 2, "{broken:?}");
    assert!(
        broken.iter().any(|b| b.reason.contains("removed without")),
        "{broken:?}"
    );
}

#[sqlx::test]
async fn bad_schedules_are_refused_naming_the_field_and_change_nothing(pool: PgPool) {
    let c = client(pool.clone()).await;
    let cases = [
        (sms_schedule("61 * * * *", "UTC"), "cron", "invalid_format"),
        (sms_schedule("* * *", "UTC"), "cron", "invalid_format"),
        (sms_schedule("0 0 30 2 *", "UTC"), "cron", "invalid_value"),
        (
            sms_schedule("* * * * *", "Mars/Olympus"),
            "time_zone",
            "invalid_value",
        ),
        (
            {
                let mut s = sms_schedule("* * * * *", "UTC");
                s["payload"]["phone"] = json!("612");
                s
            },
            "payload.phone",
            "invalid_format",
        ),
        (
            {
                let mut s = sms_schedule("* * * * *", "UTC");
                s["catch_up_limit"] = json!(5);
                s
            },
            "catch_up_limit",
            "invalid_combination",
        ),
    ];
    for (body, field, reason) in cases {
        let (status, err) = post(&c, "/schedules", &body).await;
        assert_eq!(status, 422, "{body}: {err}");
        assert_eq!(err["code"], "validation_failed");
        assert_eq!(
            (err["field"].as_str(), err["reason"].as_str()),
            (Some(field), Some(reason)),
            "{err}"
        );
    }
    let (status, err) = post(&c, "/schedules", &json!({"name": "x"})).await;
    assert_eq!(
        (status, err["code"].as_str()),
        (400, Some("malformed_request")),
        "{err}"
    );

    let (_, created) = post(&c, "/schedules", &sms_schedule("0 9 * * *", "UTC")).await;
    let id = created["id"].as_str().unwrap();
    let (status, err) = call(
        &c,
        Method::PATCH,
        &format!("/schedules/{id}"),
        Some(&json!({"type": "send_email"})),
    )
    .await;
    assert_eq!(
        (status, err["field"].as_str()),
        (422, Some("payload")),
        "{err}"
    );
    let (status, err) = call(
        &c,
        Method::PATCH,
        &format!("/schedules/{id}"),
        Some(&json!({"time_zone": "Nowhere"})),
    )
    .await;
    assert_eq!(
        (status, err["field"].as_str()),
        (422, Some("time_zone")),
        "{err}"
    );
    let missing = Uuid::now_v7();
    let (status, _) = call(
        &c,
        Method::PATCH,
        &format!("/schedules/{missing}"),
        Some(&json!({"name": "y"})),
    )
    .await;
    assert_eq!(status, 404);

    let schedules: i64 = sqlx::query_scalar("SELECT count(*) FROM schedules")
        .fetch_one(&pool)
        .await
        .unwrap();
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM schedule_events")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!((schedules, events), (1, 1));
}

#[sqlx::test]
async fn a_step_fires_each_due_slot_once_and_records_skipped_ones(pool: PgPool) {
    let id = every_second(&pool, MissedRuns::Skip).await;
    let t0 = Utc.with_ymd_and_hms(2026, 5, 4, 10, 0, 0).unwrap();
    sqlx::query("UPDATE schedules SET next_run_at = $2 WHERE id = $1")
        .bind(id)
        .bind(t0)
        .execute(&pool)
        .await
        .unwrap();

    // Three slots due at t0 + 2 s.
    let fired = schedules::fire_due(&pool, t0 + ChronoDuration::seconds(2), None)
        .await
        .unwrap();
    assert_eq!((fired.schedules, fired.created, fired.skipped), (1, 3, 0));
    // The same instant again: nothing is due any more.
    let again = schedules::fire_due(&pool, t0 + ChronoDuration::seconds(2), None)
        .await
        .unwrap();
    assert_eq!(again.created, 0);
    // Two steps racing for the next slot: one task.
    let at = t0 + ChronoDuration::seconds(3);
    let (a, b) = tokio::join!(
        schedules::fire_due(&pool, at, None),
        schedules::fire_due(&pool, at, None)
    );
    assert_eq!(a.unwrap().created + b.unwrap().created, 1);
    assert_eq!(assert_each_slot_once(&pool, id).await, 4);

    // The slot's task is an ordinary task of the schedule's owner and type.
    let (key, task) = slot_tasks(&pool, id).await.remove(0);
    assert_eq!(key, format!("schedule:{id}:2026-05-04T10:00:00Z"));
    let (task_type, owner, max_attempts): (String, String, i32) =
        sqlx::query_as("SELECT task_type, owner, max_attempts FROM tasks WHERE id = $1")
            .bind(task)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(
        (task_type.as_str(), owner.as_str(), max_attempts),
        ("send_sms", "clinic", 3)
    );

    // An hour later (every scheduler down): the missed slots are skipped, recorded, and the
    // ones within the grace fire.
    let later = t0 + ChronoDuration::hours(1);
    let fired = schedules::fire_due(&pool, later, None).await.unwrap();
    assert_eq!(fired.skipped, 1);
    assert_eq!(
        fired.created, 31,
        "the 30 s of grace and the slot at `later`"
    );
    let history = schedules::history(&pool, id).await.unwrap();
    let skipped = history.last().unwrap();
    assert_eq!(skipped.event_type, "slots_skipped");
    assert_eq!(skipped.data["from"], json!(t0 + ChronoDuration::seconds(4)));
    assert_eq!(
        skipped.data["to"],
        json!(later - ChronoDuration::seconds(31))
    );
    let (_, broken) = schedules::verify(&pool).await.unwrap();
    assert!(broken.is_empty(), "{broken:?}");

    // With catch-up, the most recent missed slots run.
    sqlx::query(
        "UPDATE schedules SET missed_runs = 'catch_up', catch_up_limit = 5, next_run_at = $2 \
         WHERE id = $1",
    )
    .bind(id)
    .bind(later + ChronoDuration::hours(1))
    .execute(&pool)
    .await
    .unwrap();
    let fired = schedules::fire_due(
        &pool,
        later + ChronoDuration::hours(1) + ChronoDuration::minutes(5),
        None,
    )
    .await
    .unwrap();
    assert_eq!(fired.created, 5 + 31);

    // A paused schedule fires nothing.
    schedules::set_paused(&pool, id, true, "test", Utc::now())
        .await
        .unwrap();
    let fired = schedules::fire_due(&pool, later + ChronoDuration::hours(5), None)
        .await
        .unwrap();
    assert_eq!(fired, schedules::Fired::default());
}

/// Starts `arnela serve` on a free port against the test's database and key prefix.
fn serve(pool: &PgPool, prefix: &str) -> Proc {
    let port = common::process::free_port().to_string();
    arnela(
        "serve",
        &database_url(pool),
        &redis_url(),
        prefix,
        &[("APP_PORT", port.as_str()), ("WORKERS", "2")],
    )
}

#[sqlx::test]
async fn three_processes_give_each_one_second_slot_exactly_one_task(pool: PgPool) {
    let prefix = unique_prefix();
    // The first process applies the migrations; the schedule is created once they are there.
    let _a = serve(&pool, &prefix);
    let _b = serve(&pool, &prefix);
    let _c = serve(&pool, &prefix);
    let id = every_second(&pool, MissedRuns::Skip).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    schedules::set_paused(&pool, id, true, "test", Utc::now())
        .await
        .unwrap();
    // a step under way when the pause committed has ended once no process holds the row
    tokio::time::sleep(Duration::from_millis(500)).await;
    let fired = assert_each_slot_once(&pool, id).await;
    assert!(fired >= 8, "only {fired} slots fired in 10 s");
    common::delete_prefix(&prefix).await;
}

#[sqlx::test]
async fn a_process_killed_mid_step_neither_skips_nor_duplicates_a_slot(pool: PgPool) {
    let prefix = unique_prefix();
    let mut first = serve(&pool, &prefix);
    let id = every_second(&pool, MissedRuns::Skip).await;
    eventually(Duration::from_secs(60), "two slots fired", || {
        let pool = pool.clone();
        async move { (runs(&pool, id).await.len() >= 2).then_some(()) }
    })
    .await;

    // Hold the step at its record of the slot: its tasks are written (uncommitted) and the
    // schedule row is locked when the process dies.
    let mut blocker = pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE schedule_runs IN SHARE ROW EXCLUSIVE MODE")
        .execute(&mut *blocker)
        .await
        .unwrap();
    eventually(
        Duration::from_secs(10),
        "a step waiting on the lock",
        || {
            let pool = pool.clone();
            async move {
                let waiting: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM pg_locks \
                 WHERE relation = 'schedule_runs'::regclass AND NOT granted \
                   AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
                )
                .fetch_one(&pool)
                .await
                .unwrap();
                (waiting > 0).then_some(())
            }
        },
    )
    .await;
    let in_flight: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND wait_event_type = 'Lock' \
         AND query LIKE 'INSERT INTO schedule_runs%' AND datname = current_database()",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(in_flight, 1, "the step is held at its record of the slot");
    let fired_before = runs(&pool, id).await.len();
    first.kill9();
    tokio::time::sleep(Duration::from_secs(1)).await;
    blocker.commit().await.unwrap();

    // Another process takes over; the held slot and those since fire once each.
    let killed_at = Utc::now();
    let _second = serve(&pool, &prefix);
    eventually(Duration::from_secs(60), "slots after the kill", || {
        let pool = pool.clone();
        async move {
            let r = runs(&pool, id).await;
            r.last()
                .filter(|(slot, _)| *slot > killed_at + ChronoDuration::seconds(2))
                .map(|_| ())
        }
    })
    .await;
    schedules::set_paused(&pool, id, true, "test", Utc::now())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let fired = assert_each_slot_once(&pool, id).await;
    assert!(
        fired > fired_before + 3,
        "{fired} slots after {fired_before}"
    );
    common::delete_prefix(&prefix).await;
}
