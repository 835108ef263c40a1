//! Shared test fixtures: a Redis connection under a key prefix unique to the test, the API
//! bound to the test's own database, and polling helpers (no fixed sleeps).

#![allow(dead_code)]

use arnela::api::{self, ApiContext};
use arnela::queue::Keys;
use poem::test::TestClient;
use poem::Endpoint;
use redis::aio::ConnectionManager;
use sqlx::PgPool;
use std::future::Future;
use std::time::Duration;

pub fn redis_url() -> String {
    std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

pub async fn redis() -> ConnectionManager {
    let client = redis::Client::open(redis_url()).expect("redis url");
    ConnectionManager::new(client)
        .await
        .expect("redis is running")
}

/// A key prefix no other test uses.
pub fn unique_prefix() -> String {
    format!("test-{}", uuid::Uuid::new_v4().simple())
}

pub async fn context(pool: PgPool) -> ApiContext {
    ApiContext {
        pool,
        redis: redis().await,
        keys: Keys::new(unique_prefix()),
        health_timeout: Duration::from_millis(1000),
        max_body_bytes: 1024 * 1024,
    }
}

pub async fn client(pool: PgPool) -> TestClient<impl Endpoint> {
    TestClient::new(api::endpoint(context(pool).await))
}

/// Polls `check` until it returns `Some`, failing the test after `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Row counts of the three tables enqueue writes.
pub async fn counts(pool: &PgPool) -> (i64, i64, i64) {
    let q = |t: &str| format!("SELECT count(*) FROM {t}");
    let tasks: i64 = sqlx::query_scalar(&q("tasks"))
        .fetch_one(pool)
        .await
        .unwrap();
    let events: i64 = sqlx::query_scalar(&q("task_events"))
        .fetch_one(pool)
        .await
        .unwrap();
    let outbox: i64 = sqlx::query_scalar(&q("outbox"))
        .fetch_one(pool)
        .await
        .unwrap();
    (tasks, events, outbox)
}

pub fn sms(message: &str) -> serde_json::Value {
    serde_json::json!({
        "type": "send_sms",
        "payload": {"phone": "+34123456789", "message": message},
    })
}

/// Sends a request and returns the status and the JSON body (`Null` for an empty one).
pub async fn call<E: Endpoint>(
    client: &TestClient<E>,
    method: poem::http::Method,
    path: &str,
    body: Option<&serde_json::Value>,
) -> (u16, serde_json::Value) {
    let mut req = client.request(method, path);
    if let Some(b) = body {
        req = req.body_json(b);
    }
    let resp = req.send().await;
    let status = resp.0.status().as_u16();
    let bytes = resp.0.into_body().into_vec().await.expect("body");
    let json = if bytes.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(&bytes)))
    };
    (status, json)
}

pub async fn post<E: Endpoint>(
    client: &TestClient<E>,
    path: &str,
    body: &serde_json::Value,
) -> (u16, serde_json::Value) {
    call(client, poem::http::Method::POST, path, Some(body)).await
}

pub async fn get<E: Endpoint>(client: &TestClient<E>, path: &str) -> (u16, serde_json::Value) {
    call(client, poem::http::Method::GET, path, None).await
}

/// A `postgres://` URL for the test's own database (for spawned processes).
pub fn database_url(pool: &PgPool) -> String {
    let o = pool.connect_options();
    format!(
        "postgres://{}@{}:{}/{}",
        o.get_username(),
        o.get_host(),
        o.get_port(),
        o.get_database().expect("test database name")
    )
}
