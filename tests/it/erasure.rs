//! Erasable personal data: sealed per task, opened for handlers and readers, erased by
//! destroying the task's data key while the log still verifies.

use crate::common;
use arnela::domain::TaskId;

use arnela::domain::TaskType;
use arnela::store::audit;
use arnela::worker::handler::{Handler, HandlerResult, Registry, TaskContext};
use arnela::worker::Processed;
use common::engine::{config, engine_with};
use common::{client, get, post};
use futures::future::BoxFuture;
use serde_json::{json, Value};
use sqlx::PgPool;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use uuid::Uuid;

/// What the patient's data looks like; none of it may be found in the database as plain text.
const NAME: &str = "Lucía Fernández";
const PHONE: &str = "+34611223344";
const RECEIPT: &str = "SM-receipt-for-Lucía";

/// A handler that keeps the payloads it was given and answers with a result naming the patient.
#[derive(Default)]
struct Keeper {
    seen: Mutex<Vec<Value>>,
}

impl Handler for Keeper {
    fn handle<'a>(&'a self, task: &'a TaskContext) -> BoxFuture<'a, HandlerResult> {
        Box::pin(async move {
            self.seen.lock().unwrap().push(task.payload.clone());
            Ok(json!({"provider": "twilio", "sid": RECEIPT}))
        })
    }
}

/// The rows of every table of the test's database that hold `needle` as text.
async fn plain_text_rows(pool: &PgPool, needle: &str) -> Vec<String> {
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT tablename::text FROM pg_tables WHERE schemaname = current_schema() ORDER BY 1",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert!(tables.iter().any(|t| t == "task_events"), "{tables:?}");
    let mut found = Vec::new();
    for table in tables {
        let n: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM {table} AS r WHERE r::text LIKE '%' || $1 || '%'"
        ))
        .bind(needle)
        .fetch_one(pool)
        .await
        .unwrap();
        if n > 0 {
            found.push(format!("{table}: {n} rows"));
        }
    }
    found
}

#[sqlx::test]
async fn an_erased_task_keeps_a_verifying_history_and_no_personal_data(pool: PgPool) {
    let c = client(pool.clone()).await;
    let (status, task) = post(
        &c,
        "/tasks",
        &json!({"type": "send_sms", "payload": {"phone": PHONE,
                "message": format!("{NAME}, su cita es mañana a las 10:00")}}),
    )
    .await;
    assert_eq!(status, 201, "{task}");
    assert_eq!(task["payload"]["phone"], json!(PHONE), "answered as asked");
    let id: Uuid = task["id"].as_str().unwrap().parse().unwrap();

    // Run it: the handler gets the plain payload, and its result is stored sealed.
    let keeper = Arc::new(Keeper::default());
    let registry = Registry::new()
        .with_default_timeout(Duration::from_secs(5))
        .register(TaskType::SendSms, keeper.clone());
    let e = engine_with(pool.clone(), registry, config(0.0)).await;
    e.relay_once().await;
    assert_eq!(e.step().await, Processed::Succeeded(TaskId::from(id)));
    let seen = keeper.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0]["phone"], json!(PHONE));
    assert!(seen[0]["message"].as_str().unwrap().starts_with(NAME));

    // Stored sealed everywhere (the search itself finds what is stored in the clear) ...
    assert!(!plain_text_rows(&pool, "send_sms").await.is_empty());
    for needle in [NAME, PHONE, "611223344", RECEIPT] {
        assert_eq!(
            plain_text_rows(&pool, needle).await,
            Vec::<String>::new(),
            "{needle}"
        );
    }
    // ... and read back in plain text by those allowed to read it.
    let (_, read) = get(&c, &format!("/tasks/{id}")).await;
    assert_eq!(read["payload"]["phone"], json!(PHONE), "{read}");
    let (_, history) = get(&c, &format!("/tasks/{id}/events")).await;
    let of = |history: &Value, kind: &str| -> Value {
        history
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["type"] == kind)
            .unwrap_or_else(|| panic!("a {kind} event in {history}"))
            .clone()
    };
    assert_eq!(
        of(&history, "enqueued")["data"]["payload"]["phone"],
        json!(PHONE)
    );
    assert_eq!(
        of(&history, "attempt_succeeded")["data"]["result"]["sid"],
        json!(RECEIPT)
    );

    // Erase.
    let (status, erased) = post(
        &c,
        &format!("/tasks/{id}/erase?reason=data%20subject%20request"),
        &Value::Null,
    )
    .await;
    assert_eq!(status, 200, "{erased}");
    assert_eq!(erased["status"], json!("succeeded"), "the state stays");
    assert_eq!(erased["payload"]["phone"], json!("[erased]"));
    assert_eq!(erased["payload"]["message"], json!("[erased]"));
    let (_, read) = get(&c, &format!("/tasks/{id}")).await;
    assert_eq!(read["payload"]["phone"], json!("[erased]"), "{read}");
    let (_, history) = get(&c, &format!("/tasks/{id}/events")).await;
    assert_eq!(
        of(&history, "enqueued")["data"]["payload"]["message"],
        json!("[erased]")
    );
    assert_eq!(
        of(&history, "attempt_succeeded")["data"]["result"],
        json!("[erased]")
    );
    let record = of(&history, "erased");
    assert_eq!(record["data"]["reason"], json!("data subject request"));
    assert_eq!(record["data"]["by"], json!("test-admin"));
    let events = history.as_array().unwrap().len();
    let (_, global) = get(&c, "/events?limit=1000").await;
    let text = global.to_string();
    assert!(!text.contains(PHONE) && !text.contains(NAME), "{text}");

    // The history still verifies, and the key is gone: nothing can open the fields again.
    assert!(audit::verify_task(&pool, TaskId::from(id))
        .await
        .unwrap()
        .unwrap()
        .ok());
    assert!(audit::verify(&pool, |_| {}).await.unwrap().ok());
    let keys: i64 = sqlx::query_scalar("SELECT count(*) FROM task_data_keys WHERE task_id = $1")
        .bind(id)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(keys, 0);
    for needle in [NAME, PHONE, "611223344", RECEIPT] {
        assert_eq!(
            plain_text_rows(&pool, needle).await,
            Vec::<String>::new(),
            "{needle}"
        );
    }

    // Erasing again changes nothing.
    let (status, again) = post(&c, &format!("/tasks/{id}/erase"), &Value::Null).await;
    assert_eq!(status, 200, "{again}");
    let (_, history) = get(&c, &format!("/tasks/{id}/events")).await;
    assert_eq!(history.as_array().unwrap().len(), events);
}

#[sqlx::test]
async fn a_waiting_task_is_cancelled_when_erased_and_never_runs(pool: PgPool) {
    let c = client(pool.clone()).await;
    let (_, task) = post(
        &c,
        "/tasks",
        &json!({"type": "send_email", "payload": {"to": "lucia@example.com",
                "subject": "Su cita", "body": "Hola Lucía"}}),
    )
    .await;
    let id: Uuid = task["id"].as_str().unwrap().parse().unwrap();
    let e = engine_with(
        pool.clone(),
        Registry::new().register(TaskType::SendEmail, Arc::new(Keeper::default())),
        config(0.0),
    )
    .await;
    e.relay_once().await;
    // erased while its delivery waits in Redis
    let (status, erased) = post(&c, &format!("/tasks/{id}/erase"), &Value::Null).await;
    assert_eq!(status, 200, "{erased}");
    assert_eq!(erased["status"], json!("cancelled"));
    assert_eq!(erased["payload"]["to"], json!("[erased]"));
    assert!(matches!(e.step().await, Processed::Duplicate(_)));
    let (_, history) = get(&c, &format!("/tasks/{id}/events")).await;
    let kinds: Vec<&str> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["enqueued", "dispatched", "cancelled", "erased"]);
    assert!(audit::verify_task(&pool, TaskId::from(id))
        .await
        .unwrap()
        .unwrap()
        .ok());
    assert_eq!(
        plain_text_rows(&pool, "lucia@example.com").await,
        Vec::<String>::new()
    );
}

#[sqlx::test]
async fn a_process_without_the_data_key_of_sealed_tasks_refuses_to_start(pool: PgPool) {
    use common::process::{arnela_command, run_to_exit, spawn};
    let c = client(pool.clone()).await;
    let (_, task) = post(
        &c,
        "/tasks",
        &json!({"type": "send_sms", "payload": {"phone": PHONE, "message": "hola"}}),
    )
    .await;
    let id = task["id"].as_str().unwrap().to_owned();
    let prefix = common::unique_prefix();
    let url = common::database_url(&pool);
    let worker = |extra: &[(&str, &str)]| {
        arnela_command("worker", &url, &common::redis_url(), &prefix, extra)
    };
    // without the key, or with another one, it would dead-letter the sealed tasks
    let (status, stderr) = run_to_exit(worker(&[]), Duration::from_secs(60));
    assert!(!status.success());
    assert!(stderr.contains("set AUDIT_DATA_KEY"), "{stderr}");
    let other = "17".repeat(32);
    let (status, stderr) = run_to_exit(
        worker(&[("AUDIT_DATA_KEY", other.as_str())]),
        Duration::from_secs(60),
    );
    assert!(!status.success());
    assert!(stderr.contains("does not open the data key"), "{stderr}");
    // with it, the worker process opens the payload and runs the task
    let mut relay = spawn(
        arnela_command(
            "relay",
            &url,
            &common::redis_url(),
            &prefix,
            &[("AUDIT_DATA_KEY", common::DATA_KEY_HEX)],
        ),
        "relay",
    );
    let mut run = spawn(
        worker(&[("AUDIT_DATA_KEY", common::DATA_KEY_HEX)]),
        "worker",
    );
    let id: Uuid = id.parse().unwrap();
    common::eventually(Duration::from_secs(30), "the task to succeed", || {
        let pool = pool.clone();
        async move {
            let status: String = sqlx::query_scalar("SELECT status FROM tasks WHERE id = $1")
                .bind(id)
                .fetch_one(&pool)
                .await
                .unwrap();
            (status == "succeeded").then_some(())
        }
    })
    .await;
    // its result was sealed by the worker process, and reads open it
    let (_, history) = get(&c, &format!("/tasks/{id}/events")).await;
    let success = history
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["type"] == "attempt_succeeded")
        .cloned()
        .unwrap();
    let stored: Value = sqlx::query_scalar(
        "SELECT data->'result' FROM task_events WHERE task_id = $1 AND event_type = 'attempt_succeeded'",
    )
    .bind(id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(stored.get("$sealed").is_some(), "{stored}");
    assert!(success["data"]["result"].is_object(), "{success}");
    assert!(
        success["data"]["result"].get("$sealed").is_none(),
        "{success}"
    );
    run.kill9();
    relay.kill9();
}
