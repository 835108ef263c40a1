//! `/health`: 200 with the seed's shape when both dependencies answer, 503 when one does not,
//! and back to 200 when it returns.

mod common;

use arnela::api::{self, ApiContext};
use arnela::queue::Keys;
use common::process::{free_port, redis_server};
use common::{context, eventually, get};
use poem::test::TestClient;
use sqlx::PgPool;
use std::time::Duration;

#[sqlx::test]
async fn health_is_200_with_the_known_shape_when_both_answer(pool: PgPool) {
    let c = TestClient::new(api::endpoint(context(pool).await));
    let (status, body) = get(&c, "/health").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "healthy");
    assert_eq!(body["database"], "connected");
    assert_eq!(body["redis"], "connected");
    for k in ["tasks_processed", "tasks_failed", "active_workers"] {
        assert!(body["workers"][k].is_i64(), "workers.{k} in {body}");
    }
    assert_eq!(get(&c, "/health/ready").await.0, 200);
    assert_eq!(get(&c, "/health/live").await.0, 200);
}

#[sqlx::test]
async fn health_is_503_when_postgres_is_unreachable(pool: PgPool) {
    let mut ctx = context(pool).await;
    // nothing listens on port 1
    let unreachable = pool_options_for_port(1);
    ctx.pool = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(Duration::from_millis(300))
        .connect_lazy_with(unreachable);
    let c = TestClient::new(api::endpoint(ctx));
    let (status, body) = get(&c, "/health").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["status"], "unhealthy");
    assert_eq!(body["database"], "disconnected");
    assert_eq!(body["redis"], "connected");
    assert_eq!(
        get(&c, "/health/live").await.0,
        200,
        "liveness does not depend on Postgres"
    );

    // The API itself answers 503 rather than 500 while the database is away.
    let (status, err) = get(&c, "/tasks").await;
    assert_eq!(
        (status, err["code"].as_str()),
        (503, Some("database_unavailable"))
    );
}

fn pool_options_for_port(port: u16) -> sqlx::postgres::PgConnectOptions {
    sqlx::postgres::PgConnectOptions::new()
        .host("127.0.0.1")
        .port(port)
        .username("postgres")
}

async fn connect_when_up(port: u16) -> redis::aio::ConnectionManager {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
    eventually(
        Duration::from_secs(10),
        "own redis to accept connections",
        || {
            let client = client.clone();
            async move { redis::aio::ConnectionManager::new(client).await.ok() }
        },
    )
    .await
}

#[sqlx::test]
async fn health_is_503_while_redis_is_down_and_recovers(pool: PgPool) {
    let port = free_port();
    let mut own = redis_server(port);
    let redis = connect_when_up(port).await;
    let ctx = ApiContext {
        pool: pool.clone(),
        redis,
        keys: Keys::new(common::unique_prefix()),
        health_timeout: Duration::from_millis(500),
        max_body_bytes: 1024,
        channels: Default::default(),
        waker: arnela::store::outbox::OutboxWaker::spawn(pool.clone(), Duration::from_millis(2)),
        metrics: Default::default(),
    };
    let c = TestClient::new(api::endpoint(ctx));
    assert_eq!(get(&c, "/health").await.0, 200);

    own.kill9();
    let (status, body) = get(&c, "/health").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(
        (body["database"].as_str(), body["redis"].as_str()),
        (Some("connected"), Some("disconnected"))
    );

    let _again = redis_server(port);
    eventually(Duration::from_secs(20), "health to recover", || {
        let c = &c;
        async move { (get(c, "/health").await.0 == 200).then_some(()) }
    })
    .await;
}

#[sqlx::test]
async fn active_workers_come_from_live_heartbeats(pool: PgPool) {
    let ctx = context(pool.clone()).await;
    let keys = ctx.keys.clone();
    let c = TestClient::new(api::endpoint(ctx));
    let (_, body) = get(&c, "/health").await;
    assert_eq!(body["workers"]["active_workers"], 0);

    let info = redis::IntoConnectionInfo::into_connection_info(common::redis_url()).unwrap();
    let registry = arnela::worker::handler::Registry::new();
    let mut handles = Vec::new();
    let shutdown = tokio_util::sync::CancellationToken::new();
    for n in [3, 4] {
        let workers = arnela::worker::WorkerPool::build(
            n,
            pool.clone(),
            info.clone(),
            keys.clone(),
            registry.clone(),
            Default::default(),
        )
        .await
        .unwrap();
        handles.push(tokio::spawn(
            workers.run(shutdown.clone(), Duration::from_secs(1)),
        ));
    }
    eventually(
        Duration::from_secs(20),
        "two processes' workers to be counted",
        || {
            let c = &c;
            async move {
                let (_, body) = get(c, "/health").await;
                (body["workers"]["active_workers"] == 7).then_some(())
            }
        },
    )
    .await;
    shutdown.cancel();
    for h in handles {
        h.await.unwrap();
    }
    let (_, body) = get(&c, "/health").await;
    assert_eq!(
        body["workers"]["active_workers"], 0,
        "a clean stop withdraws the heartbeat"
    );
}

#[sqlx::test]
async fn health_names_the_channel_of_each_task_type(pool: PgPool) {
    // no provider credentials: every type is on the log channel, and /health says so
    let settings = arnela::config::Settings::from_vars(&Default::default()).unwrap();
    let app = arnela::app::App::from_parts(settings, pool, common::redis().await);
    let c = TestClient::new(api::endpoint(app.api_context()));
    let (_, body) = get(&c, "/health").await;
    for t in ["send_email", "send_sms", "send_whatsapp", "sync_calendar"] {
        assert_eq!(body["channels"][t], "log", "{body}");
    }
}
