//! Trace context from the request to the worker and the provider: `arnela serve` exports its
//! spans over OTLP (HTTP, JSON encoding) to a receiver in the test, and an SMS's trace is
//! followed from the producer's `traceparent` to the Twilio call.

use crate::common;

use arnela::api::auth::Role;
use common::process::{arnela_command, free_port, spawn};
use common::{database_url, eventually, redis_url, token, unique_prefix};
use serde_json::{json, Value};
use sqlx::PgPool;
use std::time::Duration;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

const TWILIO_MESSAGES: &str = "/2010-04-01/Accounts/AC0123/Messages.json";

/// A span as the OTLP/JSON export carries it.
#[derive(Debug, Clone)]
struct Span {
    trace_id: String,
    span_id: String,
    parent: String,
    name: String,
    service: String,
}

/// Every span the receiver got so far.
async fn received_spans(otlp: &MockServer) -> Vec<Span> {
    let mut spans = Vec::new();
    for req in otlp.received_requests().await.unwrap_or_default() {
        let Ok(body) = serde_json::from_slice::<Value>(&req.body) else {
            continue;
        };
        for rs in body["resourceSpans"].as_array().into_iter().flatten() {
            let service = rs["resource"]["attributes"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|a| a["key"] == "service.name")
                .and_then(|a| a["value"]["stringValue"].as_str())
                .unwrap_or_default()
                .to_owned();
            for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
                for s in ss["spans"].as_array().into_iter().flatten() {
                    let text = |k: &str| s[k].as_str().unwrap_or_default().to_lowercase();
                    spans.push(Span {
                        trace_id: text("traceId"),
                        span_id: text("spanId"),
                        parent: text("parentSpanId"),
                        name: text("name"),
                        service: service.clone(),
                    });
                }
            }
        }
    }
    spans
}

#[sqlx::test]
async fn one_trace_runs_from_the_request_through_the_attempt_to_the_provider(pool: PgPool) {
    let otlp = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/traces"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({})))
        .mount(&otlp)
        .await;
    let twilio = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(TWILIO_MESSAGES))
        .respond_with(
            ResponseTemplate::new(201).set_body_json(json!({"sid": "SM0123", "status": "queued"})),
        )
        .mount(&twilio)
        .await;

    let prefix = unique_prefix();
    let port = free_port();
    let log_path = std::env::temp_dir().join(format!("arnela-tracing-{prefix}.log"));
    let mut cmd = arnela_command(
        "serve",
        &database_url(&pool),
        &redis_url(),
        &prefix,
        &[
            ("APP_PORT", &port.to_string()),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &otlp.uri()),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ("OTEL_SERVICE_NAME", "arnela-under-test"),
            ("LOG_FORMAT", "json"),
            ("RUST_LOG", "info"),
            ("TWILIO_BASE_URL", &twilio.uri()),
            ("TWILIO_ACCOUNT_SID", "AC0123"),
            ("TWILIO_AUTH_TOKEN", "twilio-auth-token"),
            ("TWILIO_SMS_FROM", "+34910000000"),
            ("TWILIO_RATE_LIMIT_PER_SEC", "0"),
        ],
    );
    cmd.stderr(std::fs::File::create(&log_path).unwrap());
    let mut serve = spawn(cmd, "serve");
    let url = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    eventually(Duration::from_secs(60), "the service to answer", || {
        let req = http.get(format!("{url}/health/live"));
        async move { req.send().await.ok().filter(|r| r.status().is_success()) }
    })
    .await;

    // The producer's own trace: the task joins it.
    let trace_id = format!("{:032x}", rand::random::<u128>() | 1);
    let producer_span = "00f067aa0ba902b7";
    let resp = http
        .post(format!("{url}/tasks"))
        .bearer_auth(token(Role::Producer))
        .header("traceparent", format!("00-{trace_id}-{producer_span}-01"))
        .header("tracestate", "clinic=front-desk")
        .json(&json!({"type": "send_sms",
                      "payload": {"phone": "+34600000001", "message": "Su cita es mañana"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let task: Value = resp.json().await.unwrap();
    let id: uuid::Uuid = task["id"].as_str().unwrap().parse().unwrap();
    eventually(Duration::from_secs(60), "the task to succeed", || {
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

    // The enqueued event keeps the context, under the producer's trace.
    let trace: Value = sqlx::query_scalar(
        "SELECT data->'trace' FROM task_events WHERE task_id = $1 AND sequence = 1",
    )
    .bind(id)
    .fetch_one(&pool)
    .await
    .unwrap();
    let stored = trace["traceparent"].as_str().unwrap().to_owned();
    assert!(stored.starts_with(&format!("00-{trace_id}-")), "{stored}");
    assert_eq!(trace["tracestate"], "clinic=front-desk");

    let spans = eventually(Duration::from_secs(30), "the spans of the trace", || {
        let otlp = &otlp;
        let trace_id = trace_id.clone();
        async move {
            let spans: Vec<Span> = received_spans(otlp)
                .await
                .into_iter()
                .filter(|s| s.trace_id == trace_id)
                .collect();
            let has = |name: &str| spans.iter().any(|s| s.name == name);
            (has("post /tasks") && has("attempt send_sms") && has("twilio create message"))
                .then_some(spans)
        }
    })
    .await;
    let named = |name: &str| spans.iter().find(|s| s.name == name).unwrap().clone();
    let server = named("post /tasks");
    let attempt = named("attempt send_sms");
    let provider = named("twilio create message");
    assert_eq!(server.service, "arnela-under-test");
    // the API's span continues the producer's
    assert_eq!(server.parent, producer_span, "{spans:#?}");
    // the attempt's parent is the span that enqueued the task (the stored context), a span
    // of the API's request under its server span
    assert_eq!(stored, format!("00-{trace_id}-{}-01", attempt.parent));
    let enqueuing = spans
        .iter()
        .find(|s| s.span_id == attempt.parent)
        .unwrap_or_else(|| panic!("no exported span is the attempt's parent: {spans:#?}"));
    assert!(
        enqueuing.span_id == server.span_id || enqueuing.parent == server.span_id,
        "the attempt's parent {enqueuing:?} is not the request's span {server:?}"
    );
    // the provider call is the attempt's child, and Twilio got its context
    assert_eq!(provider.parent, attempt.span_id, "{spans:#?}");
    let sent = twilio.received_requests().await.unwrap();
    assert_eq!(sent.len(), 1);
    let header = sent[0]
        .headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert_eq!(header, format!("00-{trace_id}-{}-01", provider.span_id));

    // Without a traceparent, the request starts a trace of its own, which the task keeps.
    let resp = http
        .post(format!("{url}/tasks"))
        .bearer_auth(token(Role::Producer))
        .json(&json!({"type": "send_sms",
                      "payload": {"phone": "+34600000002", "message": "Sin traza previa"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let other: uuid::Uuid = resp.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let started: Option<String> = sqlx::query_scalar("SELECT traceparent FROM tasks WHERE id = $1")
        .bind(other)
        .fetch_one(&pool)
        .await
        .unwrap();
    let started = arnela::domain::TraceContext::parse(&started.expect("a trace"), None).unwrap();
    assert_ne!(started.trace_id(), trace_id);

    // Every log line written inside the attempt names the task, the attempt and the trace.
    serve.terminate();
    let log = std::fs::read_to_string(&log_path).unwrap();
    std::fs::remove_file(&log_path).ok();
    let attempt_lines: Vec<Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| {
            l["spans"]
                .as_array()
                .is_some_and(|s| s.iter().any(|s| s["name"] == "attempt"))
        })
        .collect();
    assert!(
        !attempt_lines.is_empty(),
        "no log line inside an attempt:\n{log}"
    );
    for line in &attempt_lines {
        let span = line["spans"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == "attempt")
            .unwrap();
        assert!(
            span["task.id"]
                .as_str()
                .is_some_and(|t| t.parse::<uuid::Uuid>().is_ok()),
            "{line}"
        );
        assert!(span["attempt"].as_i64().is_some_and(|a| a >= 1), "{line}");
        let t = span["trace_id"].as_str().unwrap_or_default();
        assert!(
            t.len() == 32 && t.bytes().all(|b| b.is_ascii_hexdigit()),
            "{line}"
        );
        if span["task.id"] == json!(id.to_string()) {
            assert_eq!(span["trace_id"], json!(trace_id), "{line}");
        }
    }
    assert!(
        attempt_lines.iter().any(|l| l["spans"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["task.id"] == json!(id.to_string()))),
        "no log line of the first task's attempt:\n{log}"
    );
    common::delete_prefix(&prefix).await;
}

#[sqlx::test]
async fn without_an_exporter_a_task_still_keeps_the_producers_context(pool: PgPool) {
    let c = common::client(pool.clone()).await;
    let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let resp = c
        .post("/tasks")
        .header("traceparent", parent)
        .body_json(&common::sms("hola"))
        .send()
        .await;
    resp.assert_status(poem::http::StatusCode::CREATED);
    let resp = c
        .post("/tasks")
        .header("traceparent", "00-not-a-trace")
        .body_json(&common::sms("adiós"))
        .send()
        .await;
    resp.assert_status(poem::http::StatusCode::CREATED);
    let stored: Vec<String> = sqlx::query_scalar(
        "SELECT data->'trace'->>'traceparent' FROM task_events WHERE sequence = 1 \
         AND data ? 'trace' ORDER BY position",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(stored, [parent], "a valid context is kept as it came");
    // an invalid one is ignored: without an exporter no trace is started, so none is kept
    let columns: Vec<Option<String>> =
        sqlx::query_scalar("SELECT traceparent FROM tasks ORDER BY enqueued_position")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(columns, [Some(parent.to_owned()), None]);
    let without: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM task_events WHERE sequence = 1 AND NOT data ? 'trace'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        without, 1,
        "the event of the second task has no trace field"
    );
}
