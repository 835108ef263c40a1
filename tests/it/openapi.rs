//! The committed OpenAPI document is what the code produces; each operation documents exactly
//! the statuses it can answer with; the documented examples are accepted.

use crate::common;

use arnela::api::auth::Role;
use arnela::worker::handler::HandlerError;
use arnela::worker::Processed;
use common::engine::{config, engine, Script};
use poem::http::Method;
use poem::test::TestClient;
use serde_json::{json, Value};
use sqlx::PgPool;
use std::collections::{BTreeMap, BTreeSet};

const COMMITTED: &str = "openapi/openapi.json";

#[test]
fn the_committed_spec_matches_the_code() {
    let produced = arnela::api::spec_json();
    let committed = std::fs::read_to_string(COMMITTED).unwrap_or_default();
    assert!(
        committed.trim_end() == produced.trim_end(),
        "{COMMITTED} is out of date; regenerate it with \
         `cargo run --quiet -- openapi --output {COMMITTED}` and commit it"
    );
}

/// One request of the status probe.
struct Probe<'a> {
    method: Method,
    /// The operation's path template, as the spec names it.
    template: &'a str,
    path: String,
    role: Option<Role>,
    body: Option<Body>,
}

enum Body {
    Json(Value),
    Raw(&'static str, String),
    Oversized(usize),
    /// A JSON body whose first bytes arrive and the rest never.
    Stalled,
}

fn probe(method: Method, template: &str, path: impl Into<String>, role: Option<Role>) -> Probe<'_> {
    Probe {
        method,
        template,
        path: path.into(),
        role,
        body: None,
    }
}

impl Probe<'_> {
    fn json(mut self, body: Value) -> Self {
        self.body = Some(Body::Json(body));
        self
    }

    fn raw(mut self, content_type: &'static str, body: &str) -> Self {
        self.body = Some(Body::Raw(content_type, body.to_owned()));
        self
    }

    fn oversized(mut self, bytes: usize) -> Self {
        self.body = Some(Body::Oversized(bytes));
        self
    }

    fn stalled(mut self) -> Self {
        self.body = Some(Body::Stalled);
        self
    }
}

async fn send<E: poem::Endpoint>(c: &TestClient<E>, p: &Probe<'_>) -> u16 {
    let mut req = c.request(p.method.clone(), &p.path);
    if let Some(role) = p.role {
        req = req.header("authorization", common::bearer(role));
    }
    req = match &p.body {
        None => req,
        Some(Body::Json(v)) => req.body_json(v),
        Some(Body::Raw(ct, b)) => req.content_type(*ct).body(b.clone()),
        Some(Body::Oversized(n)) => req
            .content_type("application/json")
            .header("content-length", n.to_string())
            .body(" ".repeat(*n)),
        Some(Body::Stalled) => {
            use futures::StreamExt;
            let chunks = futures::stream::once(async { Ok::<_, std::io::Error>(&b"{"[..]) })
                .chain(futures::stream::pending());
            req.content_type("application/json")
                .body(poem::Body::from_bytes_stream(chunks))
        }
    };
    let resp = req.send().await;
    resp.0.status().as_u16()
}

fn documented(spec: &Value) -> BTreeMap<(String, String), BTreeSet<u16>> {
    let mut out = BTreeMap::new();
    for (path, ops) in spec["paths"].as_object().unwrap() {
        for (method, op) in ops.as_object().unwrap() {
            let statuses = op["responses"]
                .as_object()
                .unwrap()
                .keys()
                .map(|s| s.parse::<u16>().unwrap())
                .collect();
            out.insert((method.to_uppercase(), path.clone()), statuses);
        }
    }
    out
}

/// The paths of the operator's operations probed below.
const PAUSE: &str = "/task-types/{task_type}/pause";
const RESUME: &str = "/task-types/{task_type}/resume";
const RETRY_DEAD: &str = "/dead-letters/retry";
const CANCEL_DEAD: &str = "/dead-letters/cancel";
const SCHEDULES: &str = "/schedules";
const AUDIT_VERIFY: &str = "/audit/verify/{task_id}";
const CHECKPOINTS: &str = "/audit/checkpoints";
const SCHEDULE: &str = "/schedules/{id}";
const SCHEDULE_PAUSE: &str = "/schedules/{id}/pause";
const SCHEDULE_RESUME: &str = "/schedules/{id}/resume";
const SCHEDULE_EVENTS: &str = "/schedules/{id}/events";

/// Drives every operation into every outcome it has (wrong token, wrong role, bad input, missing
/// task, conflict, oversized or non-JSON body, success, and a closed database), and compares the
/// statuses seen with the ones the spec documents: none undocumented, none documented in vain.
/// 500 is documented where an operation touches a dependency and is never expected.
#[sqlx::test]
async fn each_operation_answers_exactly_the_statuses_it_documents(pool: PgPool) {
    let mut ctx = common::context(pool.clone()).await;
    // bodies must arrive within 300 ms here, so the 408 is quick to reach
    ctx.limits = arnela::api::limits::HttpLimits::new(
        64,
        64,
        1024 * 1024,
        std::time::Duration::from_millis(300),
    );
    let prefix = ctx.keys.prefix().to_owned();
    let mut redis = ctx.redis.clone();
    let c = TestClient::new(arnela::api::endpoint(ctx));
    let admin = Some(Role::Admin);
    let producer = Some(Role::Producer);
    let auditor = Some(Role::Auditor);
    let spec: Value = serde_json::from_str(&arnela::api::spec_json()).unwrap();

    // A queued task (cancelled below), and a dead one to requeue.
    let sms = |key: &str, message: &str| json!({"type": "send_sms", "payload": {"phone": "+34600111222", "message": message}, "idempotency_key": key});
    let seeder = common::client(pool.clone()).await;
    let seed = |body: Value| {
        let seeder = &seeder;
        async move {
            let (status, task) = common::post(seeder, "/tasks", &body).await;
            assert_eq!(status, 201, "{task}");
            task["id"].as_str().unwrap().to_owned()
        }
    };
    let dead = seed(sms("to-kill", "adiós")).await;
    let script = Script::answering(vec![Err(HandlerError::permanent(
        "21211 invalid 'To' number",
    ))]);
    let e = engine(pool.clone(), script, config(0.0)).await;
    e.relay_once().await;
    assert!(matches!(e.step().await, Processed::DeadLettered(_)));
    let queued = seed(sms("seed", "hola")).await;
    // a task stored before AUDIT_DATA_KEY was set: its fields cannot be erased
    let plain = {
        let mut tx = arnela::store::Tx::begin(&pool).await.unwrap();
        let new = common::new_sms("plain");
        let made = arnela::store::tasks::enqueue(&mut tx, vec![new], chrono::Utc::now(), None)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        made[0].task().id
    };
    let missing = uuid::Uuid::new_v4();
    let batch = |key: &str, message: &str| json!({"tasks": [sms(key, message)]});
    // a time range that ends before it starts
    let backwards =
        json!({"failed_from": "2026-02-01T00:00:00Z", "failed_to": "2026-01-01T00:00:00Z"});
    // Two schedules: one to change, pause and read, one to delete.
    let schedule = json!({"name": "reminders", "cron": "0 9 * * *", "time_zone": "Europe/Madrid",
                          "type": "send_sms", "payload": {"phone": "+34600111222", "message": "cita"}});
    let (_, kept) = common::post(&seeder, "/schedules", &schedule).await;
    let kept = kept["id"].as_str().unwrap().to_owned();
    let (_, doomed) = common::post(&seeder, "/schedules", &schedule).await;
    let doomed = doomed["id"].as_str().unwrap().to_owned();
    let one = format!("/schedules/{kept}");
    let gone = format!("/schedules/{missing}");

    let probes = vec![
        // POST /tasks
        probe(Method::POST, "/tasks", "/tasks", admin).json(sms("k1", "a")),
        probe(Method::POST, "/tasks", "/tasks", admin).json(sms("k1", "a")),
        probe(Method::POST, "/tasks", "/tasks", admin).json(sms("k1", "b")),
        probe(Method::POST, "/tasks", "/tasks", None).json(sms("k2", "a")),
        probe(Method::POST, "/tasks", "/tasks", auditor).json(sms("k2", "a")),
        probe(Method::POST, "/tasks", "/tasks", admin).raw("application/json", "{\"type\":"),
        probe(Method::POST, "/tasks", "/tasks", admin).raw("text/plain", "send_sms"),
        probe(Method::POST, "/tasks", "/tasks", admin).oversized(2 * 1024 * 1024),
        probe(Method::POST, "/tasks", "/tasks", admin).stalled(),
        probe(Method::POST, "/tasks", "/tasks", admin)
            .json(json!({"type": "send_sms", "payload": {"phone": "612345678", "message": "a"}})),
        // POST /tasks/batch
        probe(Method::POST, "/tasks/batch", "/tasks/batch", admin).json(batch("b1", "a")),
        probe(Method::POST, "/tasks/batch", "/tasks/batch", admin).json(batch("b1", "a")),
        probe(Method::POST, "/tasks/batch", "/tasks/batch", admin).json(batch("b1", "b")),
        probe(Method::POST, "/tasks/batch", "/tasks/batch", None).json(batch("b2", "a")),
        probe(Method::POST, "/tasks/batch", "/tasks/batch", auditor).json(batch("b2", "a")),
        probe(Method::POST, "/tasks/batch", "/tasks/batch", admin).raw("application/json", "["),
        probe(Method::POST, "/tasks/batch", "/tasks/batch", admin).raw("text/plain", "x"),
        probe(Method::POST, "/tasks/batch", "/tasks/batch", admin).oversized(2 * 1024 * 1024),
        probe(Method::POST, "/tasks/batch", "/tasks/batch", admin).stalled(),
        probe(Method::POST, "/tasks/batch", "/tasks/batch", admin).json(json!({"tasks": []})),
        // GET /tasks
        probe(Method::GET, "/tasks", "/tasks?status=queued", auditor),
        probe(Method::GET, "/tasks", "/tasks", None),
        probe(Method::GET, "/tasks", "/tasks", producer),
        probe(Method::GET, "/tasks", "/tasks?limit=0", auditor),
        probe(Method::GET, "/tasks", "/tasks?type=send_fax", auditor),
        // GET /tasks/{id}
        probe(
            Method::GET,
            "/tasks/{id}",
            format!("/tasks/{queued}"),
            auditor,
        ),
        probe(Method::GET, "/tasks/{id}", format!("/tasks/{queued}"), None),
        probe(Method::GET, "/tasks/{id}", "/tasks/not-a-uuid", producer),
        probe(
            Method::GET,
            "/tasks/{id}",
            format!("/tasks/{missing}"),
            producer,
        ),
        // GET /tasks/{id}/events
        probe(
            Method::GET,
            "/tasks/{id}/events",
            format!("/tasks/{queued}/events"),
            auditor,
        ),
        probe(
            Method::GET,
            "/tasks/{id}/events",
            format!("/tasks/{queued}/events"),
            None,
        ),
        probe(
            Method::GET,
            "/tasks/{id}/events",
            format!("/tasks/{queued}/events"),
            producer,
        ),
        probe(
            Method::GET,
            "/tasks/{id}/events",
            "/tasks/x/events",
            auditor,
        ),
        probe(
            Method::GET,
            "/tasks/{id}/events",
            format!("/tasks/{missing}/events"),
            auditor,
        ),
        // POST /tasks/{id}/retry
        probe(
            Method::POST,
            "/tasks/{id}/retry",
            format!("/tasks/{dead}/retry"),
            admin,
        ),
        probe(
            Method::POST,
            "/tasks/{id}/retry",
            format!("/tasks/{dead}/retry"),
            None,
        ),
        probe(
            Method::POST,
            "/tasks/{id}/retry",
            format!("/tasks/{dead}/retry"),
            auditor,
        ),
        probe(
            Method::POST,
            "/tasks/{id}/retry",
            format!("/tasks/{dead}/retry?attempts=0"),
            admin,
        ),
        probe(
            Method::POST,
            "/tasks/{id}/retry",
            format!("/tasks/{missing}/retry"),
            admin,
        ),
        probe(
            Method::POST,
            "/tasks/{id}/retry",
            format!("/tasks/{queued}/retry"),
            admin,
        ),
        // POST /tasks/{id}/cancel
        probe(
            Method::POST,
            "/tasks/{id}/cancel",
            format!("/tasks/{queued}/cancel"),
            admin,
        ),
        probe(
            Method::POST,
            "/tasks/{id}/cancel",
            format!("/tasks/{queued}/cancel"),
            None,
        ),
        probe(
            Method::POST,
            "/tasks/{id}/cancel",
            format!("/tasks/{queued}/cancel"),
            producer,
        ),
        probe(Method::POST, "/tasks/{id}/cancel", "/tasks/x/cancel", admin),
        probe(
            Method::POST,
            "/tasks/{id}/cancel",
            format!("/tasks/{missing}/cancel"),
            admin,
        ),
        probe(
            Method::POST,
            "/tasks/{id}/cancel",
            format!("/tasks/{queued}/cancel"),
            admin,
        ),
        // POST /tasks/{id}/erase (after the cancel: the queued task is cancelled by now)
        probe(
            Method::POST,
            "/tasks/{id}/erase",
            format!("/tasks/{queued}/erase?reason=request%20of%20the%20patient"),
            admin,
        ),
        probe(
            Method::POST,
            "/tasks/{id}/erase",
            format!("/tasks/{queued}/erase"),
            admin,
        ),
        probe(
            Method::POST,
            "/tasks/{id}/erase",
            format!("/tasks/{queued}/erase"),
            None,
        ),
        probe(
            Method::POST,
            "/tasks/{id}/erase",
            format!("/tasks/{queued}/erase"),
            producer,
        ),
        probe(Method::POST, "/tasks/{id}/erase", "/tasks/x/erase", admin),
        probe(
            Method::POST,
            "/tasks/{id}/erase",
            format!("/tasks/{plain}/erase"),
            admin,
        ),
        probe(
            Method::POST,
            "/tasks/{id}/erase",
            format!("/tasks/{missing}/erase"),
            admin,
        ),
        // GET /tasks/{id}/verify
        probe(
            Method::GET,
            "/tasks/{id}/verify",
            format!("/tasks/{queued}/verify"),
            auditor,
        ),
        probe(
            Method::GET,
            "/tasks/{id}/verify",
            format!("/tasks/{queued}/verify"),
            None,
        ),
        probe(
            Method::GET,
            "/tasks/{id}/verify",
            format!("/tasks/{queued}/verify"),
            producer,
        ),
        probe(
            Method::GET,
            "/tasks/{id}/verify",
            "/tasks/x/verify",
            auditor,
        ),
        probe(
            Method::GET,
            "/tasks/{id}/verify",
            format!("/tasks/{missing}/verify"),
            auditor,
        ),
        probe(Method::GET, AUDIT_VERIFY, format!("/audit/verify/{queued}"), auditor),
        probe(Method::GET, AUDIT_VERIFY, format!("/audit/verify/{queued}"), None),
        probe(Method::GET, AUDIT_VERIFY, format!("/audit/verify/{queued}"), producer),
        probe(Method::GET, AUDIT_VERIFY, "/audit/verify/x", auditor),
        probe(Method::GET, CHECKPOINTS, CHECKPOINTS, auditor),
        probe(Method::GET, CHECKPOINTS, CHECKPOINTS, None),
        probe(Method::GET, CHECKPOINTS, CHECKPOINTS, producer),
        probe(Method::GET, CHECKPOINTS, "/audit/checkpoints?limit=0", auditor),
        probe(Method::GET, AUDIT_VERIFY, format!("/audit/verify/{missing}"), auditor),
        // the operator's operations
        probe(Method::GET, "/whoami", "/whoami", producer),
        probe(Method::GET, "/whoami", "/whoami", None),
        probe(Method::GET, "/task-types", "/task-types", auditor),
        probe(Method::GET, "/task-types", "/task-types", None),
        probe(Method::GET, "/task-types", "/task-types", producer),
        probe(
            Method::POST,
            PAUSE,
            "/task-types/send_whatsapp/pause",
            admin,
        ),
        probe(Method::POST, PAUSE, "/task-types/send_whatsapp/pause", None),
        probe(
            Method::POST,
            PAUSE,
            "/task-types/send_whatsapp/pause",
            auditor,
        ),
        probe(Method::POST, PAUSE, "/task-types/send_fax/pause", admin),
        probe(
            Method::POST,
            RESUME,
            "/task-types/send_whatsapp/resume",
            admin,
        ),
        probe(
            Method::POST,
            RESUME,
            "/task-types/send_whatsapp/resume",
            None,
        ),
        probe(
            Method::POST,
            RESUME,
            "/task-types/send_whatsapp/resume",
            auditor,
        ),
        probe(Method::POST, RESUME, "/task-types/send_fax/resume", admin),
        // dead letters in bulk (counted only: the dead task above stays for the probes before)
        probe(Method::POST, RETRY_DEAD, RETRY_DEAD, admin).json(json!({"dry_run": true})),
        probe(Method::POST, RETRY_DEAD, RETRY_DEAD, None).json(json!({"dry_run": true})),
        probe(Method::POST, RETRY_DEAD, RETRY_DEAD, auditor).json(json!({"dry_run": true})),
        probe(Method::POST, RETRY_DEAD, RETRY_DEAD, admin).raw("application/json", "{"),
        probe(Method::POST, RETRY_DEAD, RETRY_DEAD, admin).raw("text/plain", "x"),
        probe(Method::POST, RETRY_DEAD, RETRY_DEAD, admin).oversized(2 * 1024 * 1024),
        probe(Method::POST, RETRY_DEAD, RETRY_DEAD, admin).stalled(),
        probe(Method::POST, RETRY_DEAD, RETRY_DEAD, admin).json(backwards.clone()),
        probe(Method::POST, CANCEL_DEAD, CANCEL_DEAD, admin).json(json!({"dry_run": true})),
        probe(Method::POST, CANCEL_DEAD, CANCEL_DEAD, None).json(json!({"dry_run": true})),
        probe(Method::POST, CANCEL_DEAD, CANCEL_DEAD, auditor).json(json!({"dry_run": true})),
        probe(Method::POST, CANCEL_DEAD, CANCEL_DEAD, admin).raw("application/json", "{"),
        probe(Method::POST, CANCEL_DEAD, CANCEL_DEAD, admin).raw("text/plain", "x"),
        probe(Method::POST, CANCEL_DEAD, CANCEL_DEAD, admin).oversized(2 * 1024 * 1024),
        probe(Method::POST, CANCEL_DEAD, CANCEL_DEAD, admin).stalled(),
        probe(Method::POST, CANCEL_DEAD, CANCEL_DEAD, admin).json(backwards),
        // schedules
        probe(Method::POST, SCHEDULES, SCHEDULES, admin).json(schedule.clone()),
        probe(Method::POST, SCHEDULES, SCHEDULES, None).json(schedule.clone()),
        probe(Method::POST, SCHEDULES, SCHEDULES, auditor).json(schedule.clone()),
        probe(Method::POST, SCHEDULES, SCHEDULES, admin).raw("application/json", "{"),
        probe(Method::POST, SCHEDULES, SCHEDULES, admin).raw("text/plain", "x"),
        probe(Method::POST, SCHEDULES, SCHEDULES, admin).oversized(2 * 1024 * 1024),
        probe(Method::POST, SCHEDULES, SCHEDULES, admin).stalled(),
        probe(Method::POST, SCHEDULES, SCHEDULES, admin)
            .json(json!({"name": "x", "cron": "99 * * * *", "time_zone": "UTC", "type": "send_sms", "payload": {}})),
        probe(Method::GET, SCHEDULES, SCHEDULES, auditor),
        probe(Method::GET, SCHEDULES, SCHEDULES, None),
        probe(Method::GET, SCHEDULES, SCHEDULES, producer),
        probe(Method::GET, SCHEDULES, "/schedules?limit=0", auditor),
        probe(Method::GET, SCHEDULE, one.clone(), auditor),
        probe(Method::GET, SCHEDULE, one.clone(), None),
        probe(Method::GET, SCHEDULE, one.clone(), producer),
        probe(Method::GET, SCHEDULE, "/schedules/x", auditor),
        probe(Method::GET, SCHEDULE, gone.clone(), auditor),
        probe(Method::PATCH, SCHEDULE, one.clone(), admin).json(json!({"name": "renamed"})),
        probe(Method::PATCH, SCHEDULE, one.clone(), None).json(json!({"name": "renamed"})),
        probe(Method::PATCH, SCHEDULE, one.clone(), auditor).json(json!({"name": "renamed"})),
        probe(Method::PATCH, SCHEDULE, gone.clone(), admin).json(json!({"name": "renamed"})),
        probe(Method::PATCH, SCHEDULE, one.clone(), admin).json(json!({"time_zone": "Nowhere"})),
        probe(Method::PATCH, SCHEDULE, one.clone(), admin).raw("application/json", "{"),
        probe(Method::PATCH, SCHEDULE, one.clone(), admin).raw("text/plain", "x"),
        probe(Method::PATCH, SCHEDULE, one.clone(), admin).oversized(2 * 1024 * 1024),
        probe(Method::PATCH, SCHEDULE, one.clone(), admin).stalled(),
        probe(Method::POST, SCHEDULE_PAUSE, format!("{one}/pause"), admin),
        probe(Method::POST, SCHEDULE_PAUSE, format!("{one}/pause"), None),
        probe(Method::POST, SCHEDULE_PAUSE, format!("{one}/pause"), auditor),
        probe(Method::POST, SCHEDULE_PAUSE, "/schedules/x/pause", admin),
        probe(Method::POST, SCHEDULE_PAUSE, format!("{gone}/pause"), admin),
        probe(Method::POST, SCHEDULE_RESUME, format!("{one}/resume"), admin),
        probe(Method::POST, SCHEDULE_RESUME, format!("{one}/resume"), None),
        probe(Method::POST, SCHEDULE_RESUME, format!("{one}/resume"), auditor),
        probe(Method::POST, SCHEDULE_RESUME, "/schedules/x/resume", admin),
        probe(Method::POST, SCHEDULE_RESUME, format!("{gone}/resume"), admin),
        probe(Method::GET, SCHEDULE_EVENTS, format!("{one}/events"), auditor),
        probe(Method::GET, SCHEDULE_EVENTS, format!("{one}/events"), None),
        probe(Method::GET, SCHEDULE_EVENTS, format!("{one}/events"), producer),
        probe(Method::GET, SCHEDULE_EVENTS, "/schedules/x/events", auditor),
        probe(Method::GET, SCHEDULE_EVENTS, format!("{gone}/events"), auditor),
        probe(Method::DELETE, SCHEDULE, format!("/schedules/{doomed}"), admin),
        probe(Method::DELETE, SCHEDULE, format!("/schedules/{doomed}"), admin),
        probe(Method::DELETE, SCHEDULE, one.clone(), None),
        probe(Method::DELETE, SCHEDULE, one.clone(), auditor),
        probe(Method::DELETE, SCHEDULE, "/schedules/x", admin),
        // GET /events
        probe(Method::GET, "/events", "/events", auditor),
        probe(Method::GET, "/events", "/events", None),
        probe(Method::GET, "/events", "/events", producer),
        probe(Method::GET, "/events", "/events?limit=0", auditor),
        // GET /stats
        probe(Method::GET, "/stats", "/stats", auditor),
        probe(Method::GET, "/stats", "/stats", None),
        probe(Method::GET, "/stats", "/stats", producer),
        // health and metrics
        probe(Method::GET, "/health", "/health", auditor),
        probe(Method::GET, "/health", "/health", None),
        probe(Method::GET, "/health", "/health", producer),
        probe(Method::GET, "/health/ready", "/health/ready", None),
        probe(Method::GET, "/health/live", "/health/live", None),
        probe(Method::GET, "/metrics", "/metrics", auditor),
        probe(Method::GET, "/metrics", "/metrics", None),
        probe(Method::GET, "/metrics", "/metrics", producer),
    ];
    let mut seen: BTreeMap<(String, String), BTreeSet<u16>> = BTreeMap::new();
    for p in &probes {
        let status = send(&c, p).await;
        seen.entry((p.method.to_string(), p.template.to_owned()))
            .or_default()
            .insert(status);
    }

    // With the database gone: every operation that needs it says 503. Cached reads are dropped
    // first, so each read reaches the database.
    let cached: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut redis)
        .await
        .unwrap();
    if !cached.is_empty() {
        let _: () = redis::cmd("DEL")
            .arg(&cached)
            .query_async(&mut redis)
            .await
            .unwrap();
    }
    pool.close().await;
    let unavailable = vec![
        probe(Method::POST, "/tasks", "/tasks", admin).json(sms("k9", "a")),
        probe(Method::POST, "/tasks/batch", "/tasks/batch", admin).json(batch("b9", "a")),
        probe(Method::GET, "/tasks", "/tasks", auditor),
        probe(
            Method::GET,
            "/tasks/{id}",
            format!("/tasks/{queued}"),
            producer,
        ),
        probe(
            Method::GET,
            "/tasks/{id}/events",
            format!("/tasks/{queued}/events"),
            auditor,
        ),
        probe(
            Method::POST,
            "/tasks/{id}/retry",
            format!("/tasks/{dead}/retry"),
            admin,
        ),
        probe(
            Method::POST,
            "/tasks/{id}/cancel",
            format!("/tasks/{queued}/cancel"),
            admin,
        ),
        probe(
            Method::POST,
            "/tasks/{id}/erase",
            format!("/tasks/{queued}/erase"),
            admin,
        ),
        probe(Method::GET, "/events", "/events", auditor),
        probe(Method::GET, "/stats", "/stats", auditor),
        probe(Method::GET, "/health", "/health", auditor),
        probe(Method::GET, "/health/ready", "/health/ready", None),
        probe(
            Method::GET,
            "/tasks/{id}/verify",
            format!("/tasks/{queued}/verify"),
            auditor,
        ),
        probe(
            Method::GET,
            AUDIT_VERIFY,
            format!("/audit/verify/{queued}"),
            auditor,
        ),
        probe(Method::GET, CHECKPOINTS, CHECKPOINTS, auditor),
        probe(Method::GET, "/task-types", "/task-types", auditor),
        probe(Method::POST, PAUSE, "/task-types/send_sms/pause", admin),
        probe(Method::POST, RESUME, "/task-types/send_sms/resume", admin),
        probe(Method::POST, RETRY_DEAD, RETRY_DEAD, admin).json(json!({"dry_run": true})),
        probe(Method::POST, CANCEL_DEAD, CANCEL_DEAD, admin).json(json!({"dry_run": true})),
        probe(Method::POST, SCHEDULES, SCHEDULES, admin).json(schedule.clone()),
        probe(Method::GET, SCHEDULES, SCHEDULES, auditor),
        probe(Method::GET, SCHEDULE, one.clone(), auditor),
        probe(Method::PATCH, SCHEDULE, one.clone(), admin).json(json!({"name": "again"})),
        probe(Method::DELETE, SCHEDULE, one.clone(), admin),
        probe(Method::POST, SCHEDULE_PAUSE, format!("{one}/pause"), admin),
        probe(
            Method::POST,
            SCHEDULE_RESUME,
            format!("{one}/resume"),
            admin,
        ),
        probe(
            Method::GET,
            SCHEDULE_EVENTS,
            format!("{one}/events"),
            auditor,
        ),
    ];
    for p in &unavailable {
        let status = send(&c, p).await;
        assert_eq!(
            status, 503,
            "{} {} with the database closed",
            p.method, p.path
        );
        seen.entry((p.method.to_string(), p.template.to_owned()))
            .or_default()
            .insert(status);
    }

    let documented = documented(&spec);
    assert_eq!(
        documented.keys().collect::<Vec<_>>(),
        seen.keys().collect::<Vec<_>>(),
        "every operation is probed"
    );
    for (op, statuses) in &documented {
        let got = &seen[op];
        assert!(!got.contains(&500), "{op:?} answered 500");
        let expected: BTreeSet<u16> = statuses.iter().copied().filter(|s| *s != 500).collect();
        assert_eq!(
            got, &expected,
            "{op:?}: seen (left) and documented (right) differ"
        );
    }
}

/// The examples the spec shows for the four task types and the batch are accepted as they are.
#[sqlx::test]
async fn the_documented_request_examples_are_accepted(pool: PgPool) {
    let c = common::client(pool.clone()).await;
    let examples: BTreeMap<_, _> = arnela::api::spec::examples().into_iter().collect();
    for name in [
        "SendEmailTask",
        "SendSmsTask",
        "SendWhatsappTask",
        "SyncCalendarTask",
    ] {
        let (status, body) = common::post(&c, "/tasks", &examples[name]).await;
        assert_eq!(status, 201, "{name}: {body}");
    }
    let (status, body) = common::post(&c, "/tasks/batch", &examples["TaskBatch"]).await;
    assert!(status == 201 || status == 200, "TaskBatch: {status} {body}");
}
