//! The operator console and its operations with real processes: the console in a real browser
//! (Debian's Chromium driven by `tests/ui/console.mjs` with playwright-core), pausing a task type
//! across worker processes, and the operator CLI against a live service.

use crate::common;

use arnela::api::auth::Role;
use common::process::{arnela, free_port, Proc};
use common::{database_url, eventually, redis_url, token, unique_prefix};
use serde_json::{json, Value};
use sqlx::PgPool;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use uuid::Uuid;
use wiremock::matchers::{body_string_contains, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

const TWILIO_MESSAGES: &str = "/2010-04-01/Accounts/AC0123/Messages.json";

/// A live `arnela serve` (SMS to a fake Twilio) and an HTTP client with tokens of each role.
struct Live {
    url: String,
    http: reqwest::Client,
    _serve: Proc,
}

/// The environment that sends SMS to the fake Twilio at `uri`.
fn twilio_env(uri: &str) -> Vec<(&'static str, String)> {
    vec![
        ("TWILIO_BASE_URL", uri.to_owned()),
        ("TWILIO_ACCOUNT_SID", "AC0123".to_owned()),
        ("TWILIO_AUTH_TOKEN", "twilio-auth-token".to_owned()),
        ("TWILIO_SMS_FROM", "+34910000000".to_owned()),
        ("TWILIO_RATE_LIMIT_PER_SEC", "0".to_owned()),
    ]
}

impl Live {
    /// `arnela serve` (or `role`, when it serves the API) on a free port, SMS to `twilio`.
    fn start(pool: &PgPool, prefix: &str, twilio: &str, role: &str) -> Live {
        let port = free_port();
        let mut env = twilio_env(twilio);
        env.push(("APP_PORT", port.to_string()));
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        Live {
            url: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::new(),
            _serve: arnela(role, &database_url(pool), &redis_url(), prefix, &env),
        }
    }

    async fn ready(&self) {
        let url = format!("{}/health/live", self.url);
        eventually(Duration::from_secs(60), "the service to answer", || {
            let req = self.http.get(&url);
            async move { req.send().await.ok().filter(|r| r.status().is_success()) }
        })
        .await;
    }

    async fn call(&self, role: Role, m: reqwest::Method, path: &str, body: Value) -> (u16, Value) {
        let mut req = self
            .http
            .request(m, format!("{}{path}", self.url))
            .bearer_auth(token(role));
        if !body.is_null() {
            req = req.json(&body);
        }
        let resp = req.send().await.expect("the service answers");
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn enqueue(&self, body: Value) -> Uuid {
        let (status, task) = self
            .call(Role::Admin, reqwest::Method::POST, "/tasks", body)
            .await;
        assert_eq!(status, 201, "{task}");
        task["id"].as_str().unwrap().parse().unwrap()
    }
}

fn sms(message: &str) -> Value {
    json!({"type": "send_sms", "max_attempts": 1,
           "payload": {"phone": "+34600000001", "message": message}})
}

fn email(subject: &str) -> Value {
    json!({"type": "send_email",
           "payload": {"to": "ana@example.com", "subject": subject, "body": "<p>hello</p>"}})
}

async fn until_status(pool: &PgPool, ids: &[Uuid], status: &str) {
    eventually(
        Duration::from_secs(60),
        &format!("{} tasks to be {status}", ids.len()),
        || async {
            let n: i64 =
                sqlx::query_scalar("SELECT count(*) FROM tasks WHERE id = ANY($1) AND status = $2")
                    .bind(ids)
                    .bind(status)
                    .fetch_one(pool)
                    .await
                    .unwrap();
            (n == ids.len() as i64).then_some(())
        },
    )
    .await;
}

async fn event_count(pool: &PgPool, ids: &[Uuid], event_type: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM task_events WHERE task_id = ANY($1) AND event_type = $2",
    )
    .bind(ids)
    .bind(event_type)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Outbox rows of these tasks that are published (`true`) or waiting to be (`false`).
async fn outbox_rows(pool: &PgPool, ids: &[Uuid], published: bool) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM outbox WHERE task_id = ANY($1) AND (published_at IS NOT NULL) = $2",
    )
    .bind(ids)
    .bind(published)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// A fake Twilio: messages containing `fail-once` are refused (permanently) the first time,
/// messages containing `fail-always` every time, everything else is accepted.
async fn twilio() -> MockServer {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(TWILIO_MESSAGES))
        .and(body_string_contains("fail-once"))
        .respond_with(
            ResponseTemplate::new(400)
                .set_body_json(json!({"code": 21610, "message": "unsubscribed recipient"})),
        )
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path(TWILIO_MESSAGES))
        .and(body_string_contains("fail-always"))
        .respond_with(
            ResponseTemplate::new(400)
                .set_body_json(json!({"code": 21211, "message": "the number is not valid"})),
        )
        .with_priority(2)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path(TWILIO_MESSAGES))
        .respond_with(
            ResponseTemplate::new(201).set_body_json(json!({"sid": "SM0123", "status": "queued"})),
        )
        .with_priority(3)
        .mount(&server)
        .await;
    server
}

fn ui_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ui")
}

/// `node` with playwright-core installed in `tests/ui` (`npm ci` there when it is missing) and
/// the system Chromium. Missing tools fail the test: `.ci/run` installs them.
fn browser_tools() -> (PathBuf, String) {
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        Path::new(&chromium).exists(),
        "{chromium} is missing: install Debian's chromium (apt-get install chromium) or set CHROMIUM"
    );
    let dir = ui_dir();
    if !dir.join("node_modules/playwright-core").exists() {
        let ok = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(&dir)
            .status()
            .expect("npm is installed")
            .success();
        assert!(ok, "npm ci in tests/ui");
    }
    (dir, chromium)
}

#[sqlx::test]
async fn the_console_works_in_a_real_browser(pool: PgPool) {
    let (dir, chromium) = browser_tools();
    let fake = twilio().await;
    let prefix = unique_prefix();
    let live = Live::start(&pool, &prefix, &fake.uri(), "serve");
    live.ready().await;

    let succeeded = live.enqueue(email("Your appointment")).await;
    let dead = live.enqueue(sms("fail-once: reminder")).await;
    let mut bulk = Vec::new();
    for i in 0..3 {
        bulk.push(live.enqueue(sms(&format!("fail-always {i}"))).await);
    }
    until_status(&pool, &[succeeded], "succeeded").await;
    until_status(&pool, &[dead], "dead").await;
    until_status(&pool, &bulk, "dead").await;
    // a schedule firing every two seconds (e-mails to the log channel)
    let (status, schedule) = live
        .call(
            Role::Admin,
            reqwest::Method::POST,
            "/schedules",
            json!({"name": "reminder run", "cron": "*/2 * * * * *", "time_zone": "Europe/Madrid",
                   "type": "send_email",
                   "payload": {"to": "ana@example.com", "subject": "Reminder", "body": "<p>Tomorrow</p>"}}),
        )
        .await;
    assert_eq!(status, 201, "{schedule}");
    let schedule = schedule["id"].as_str().unwrap().to_owned();

    let shots = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/ui-screenshots");
    let out = Command::new("node")
        .arg("console.mjs")
        .current_dir(&dir)
        .env("CHROMIUM", &chromium)
        .env("ARNELA_URL", &live.url)
        .env("ADMIN_TOKEN", token(Role::Admin))
        .env("AUDITOR_TOKEN", token(Role::Auditor))
        .env("SCREENSHOT_DIR", &shots)
        .env("SUCCEEDED_TASK_ID", succeeded.to_string())
        .env("DEAD_TASK_ID", dead.to_string())
        .env("BULK_TYPE", "send_sms")
        .env("BULK_REASON", "code 21211")
        .env("BULK_COUNT", bulk.len().to_string())
        .env("PAUSE_TYPE", "send_whatsapp")
        .env("SCHEDULE_ID", &schedule)
        .output()
        .expect("node runs");
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "the browser test failed:\n{log}");

    // what the clicks did, read from the log: one requeue each, by the admin
    let by: Vec<String> = sqlx::query_scalar(
        "SELECT data->>'by' FROM task_events WHERE event_type = 'requeued' ORDER BY task_id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(by, vec!["test-admin"; 1 + bulk.len()], "{log}");
    assert_eq!(event_count(&pool, &[dead], "requeued").await, 1);
    assert_eq!(event_count(&pool, &bulk, "requeued").await, 3);
    until_status(&pool, &[dead], "succeeded").await;
    let paused: i64 = sqlx::query_scalar("SELECT count(*) FROM task_type_pauses")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(paused, 0, "the type was resumed");
    let schedule_events: Vec<(String, Option<String>)> =
        sqlx::query_as("SELECT event_type, data->>'by' FROM schedule_events ORDER BY sequence")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(
        schedule_events,
        [
            ("created".to_owned(), Some("test-admin".to_owned())),
            ("paused".to_owned(), Some("test-admin".to_owned()))
        ],
        "{log}"
    );
    for name in [
        "overview.png",
        "timeline.png",
        "dead-letters.png",
        "auditor-timeline.png",
        "schedule.png",
    ] {
        assert!(shots.join(name).exists(), "{name} was saved");
    }
    drop(live);
    common::delete_prefix(&prefix).await;
}

/// `arnela tasks …` against the live service with `token`; returns success, stdout, stderr.
fn cli(live: &Live, role: Role, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_arnela"))
        .arg("tasks")
        .args(args)
        .env("ARNELA_URL", &live.url)
        .env("ARNELA_TOKEN", token(role))
        .env("RUST_LOG", "warn")
        .output()
        .expect("arnela runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[sqlx::test]
async fn the_operator_cli_works_against_a_live_service(pool: PgPool) {
    let fake = twilio().await;
    let prefix = unique_prefix();
    let live = Live::start(&pool, &prefix, &fake.uri(), "serve");
    live.ready().await;
    let done = live.enqueue(email("Reminder")).await;
    let dead = vec![
        live.enqueue(sms("fail-always a")).await,
        live.enqueue(sms("fail-always b")).await,
    ];
    until_status(&pool, &[done], "succeeded").await;
    until_status(&pool, &dead, "dead").await;
    // listings show a task once every older transaction has ended: wait for the listing
    eventually(
        Duration::from_secs(30),
        "the tasks to be listed",
        || async {
            let (ok, out, _) = cli(&live, Role::Auditor, &["list", "--json"]);
            (ok && serde_json::from_str::<Vec<Value>>(&out).ok()?.len() == 3).then_some(())
        },
    )
    .await;

    let (ok, out, err) = cli(
        &live,
        Role::Auditor,
        &["list", "--status", "succeeded", "--json"],
    );
    assert!(ok, "{err}");
    let listed: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["id"], json!(done));

    let (ok, out, err) = cli(
        &live,
        Role::Auditor,
        &["list", "--type", "send_sms", "--since", "1h"],
    );
    assert!(ok, "{err}");
    assert!(out.starts_with("ID"), "{out}");
    assert_eq!(
        out.lines().filter(|l| l.contains(" dead ")).count(),
        2,
        "{out}"
    );
    assert!(out.contains("code 21211"), "{out}");

    let (ok, out, err) = cli(&live, Role::Auditor, &["show", &done.to_string()]);
    assert!(ok, "{err}");
    for event in [
        "enqueued",
        "dispatched",
        "attempt_started",
        "attempt_succeeded",
    ] {
        assert!(out.contains(event), "{event} in {out}");
    }
    assert!(out.contains("hash chain intact (4 events)"), "{out}");

    // bulk actions count first, act only with --yes
    let (ok, out, err) = cli(&live, Role::Admin, &["retry-dead", "--type", "send_sms"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("2 dead letter(s) match; nothing changed"),
        "{out}"
    );
    assert_eq!(event_count(&pool, &dead, "requeued").await, 0);
    let (ok, out, err) = cli(
        &live,
        Role::Admin,
        &[
            "cancel-dead",
            "--type",
            "send_sms",
            "--reason",
            "21211",
            "--yes",
        ],
    );
    assert!(ok, "{err}");
    assert!(out.contains("2 dead letter(s) matched, 2 changed"), "{out}");
    until_status(&pool, &dead, "cancelled").await;

    let (ok, out, err) = cli(&live, Role::Admin, &["pause", "send_whatsapp"]);
    assert!(ok, "{err}");
    assert!(out.contains("send_whatsapp: paused since"), "{out}");
    let (ok, out, _) = cli(&live, Role::Auditor, &["types", "--json"]);
    assert!(ok);
    let types: Value = serde_json::from_str(&out).unwrap();
    let paused: Vec<&Value> = types["types"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["paused"] == json!(true))
        .map(|t| &t["type"])
        .collect();
    assert_eq!(paused, [&json!("send_whatsapp")]);
    let (ok, out, _) = cli(&live, Role::Admin, &["resume", "send_whatsapp"]);
    assert!(ok && out.contains("send_whatsapp: active"), "{out}");

    // an auditor is refused every action; a finished task cannot be requeued
    let (ok, _, err) = cli(&live, Role::Auditor, &["pause", "send_sms"]);
    assert!(!ok && err.contains("403"), "{err}");
    let (ok, _, err) = cli(&live, Role::Auditor, &["retry-dead", "--yes"]);
    assert!(!ok && err.contains("403"), "{err}");
    let (ok, _, err) = cli(&live, Role::Admin, &["retry", &done.to_string()]);
    assert!(!ok && err.contains("409"), "{err}");

    // the log from its start: the first events, one JSON document per line
    let (ok, out, err) = cli(
        &live,
        Role::Auditor,
        &["tail", "--after", "0", "--count", "3", "--json"],
    );
    assert!(ok, "{err}");
    let events: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), 3);
    assert!(events
        .iter()
        .all(|e| e["type"] == json!("enqueued") || e["sequence"].as_i64() > Some(0)));
    drop(live);
    common::delete_prefix(&prefix).await;
}

#[sqlx::test]
async fn a_paused_type_stays_queued_across_worker_processes_until_resumed(pool: PgPool) {
    let fake = twilio().await;
    let prefix = unique_prefix();
    let db = database_url(&pool);
    let sms_env = twilio_env(&fake.uri());
    let env: Vec<(&str, &str)> = sms_env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let live = Live::start(&pool, &prefix, &fake.uri(), "api");
    live.ready().await;
    let _relay = arnela("relay", &db, &redis_url(), &prefix, &env);

    // published to Redis before the pause: no worker runs yet
    let mut sms_ids = Vec::new();
    for i in 0..10 {
        sms_ids.push(live.enqueue(sms(&format!("reminder {i}"))).await);
    }
    eventually(
        Duration::from_secs(30),
        "the deliveries to be published",
        || async { (outbox_rows(&pool, &sms_ids, true).await == 10).then_some(()) },
    )
    .await;
    let (status, state) = live
        .call(
            Role::Admin,
            reqwest::Method::POST,
            "/task-types/send_sms/pause",
            Value::Null,
        )
        .await;
    assert_eq!((status, &state["paused"]), (200, &json!(true)), "{state}");

    // two worker processes take the deliveries and give them back; other types run
    let _w1 = arnela("worker", &db, &redis_url(), &prefix, &env);
    let mut w2 = arnela("worker", &db, &redis_url(), &prefix, &env);
    let mut emails = Vec::new();
    for i in 0..10 {
        emails.push(live.enqueue(email(&format!("Appointment {i}"))).await);
    }
    until_status(&pool, &emails, "succeeded").await;
    eventually(
        Duration::from_secs(30),
        "the deliveries to be given back",
        || async { (outbox_rows(&pool, &sms_ids, false).await == 10).then_some(()) },
    )
    .await;

    // a worker killed and started again, and more tasks enqueued: still paused
    w2.kill9();
    let _w3 = arnela("worker", &db, &redis_url(), &prefix, &env);
    for i in 10..15 {
        sms_ids.push(live.enqueue(sms(&format!("reminder {i}"))).await);
    }
    let more_emails = vec![live.enqueue(email("After the restart")).await];
    until_status(&pool, &more_emails, "succeeded").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(event_count(&pool, &sms_ids, "attempt_started").await, 0);
    until_status(&pool, &sms_ids, "queued").await;
    let keys = arnela::queue::Keys::new(prefix.clone());
    let (waiting, taken): (i64, i64) = redis::pipe()
        .llen(keys.tasks())
        .llen(keys.processing())
        .query_async(&mut common::redis().await)
        .await
        .unwrap();
    assert_eq!(
        (waiting, taken),
        (0, 0),
        "no delivery of the paused type waits in Redis"
    );
    assert!(fake
        .received_requests()
        .await
        .unwrap()
        .iter()
        .all(|r| r.url.path() != TWILIO_MESSAGES));

    let (status, state) = live
        .call(
            Role::Admin,
            reqwest::Method::POST,
            "/task-types/send_sms/resume",
            Value::Null,
        )
        .await;
    assert_eq!((status, &state["paused"]), (200, &json!(false)), "{state}");
    until_status(&pool, &sms_ids, "succeeded").await;
    assert_eq!(event_count(&pool, &sms_ids, "attempt_started").await, 15);
    assert_eq!(event_count(&pool, &sms_ids, "attempt_succeeded").await, 15);
    drop(live);
    common::delete_prefix(&prefix).await;
}
