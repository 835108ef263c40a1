//! Graceful shutdown: running attempts finish within the drain deadline or are released; nothing
//! stays claimed and no delivery is lost.

use crate::common;

use arnela::domain::TaskType;
use arnela::worker::WorkerPool;
use common::engine::{config, engine, registry, Script};
use sqlx::PgPool;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

async fn enqueue(pool: &PgPool, n: usize) -> Vec<arnela::domain::TaskId> {
    common::enqueue_tasks(pool, TaskType::SendEmail, n, 1).await
}

async fn running(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM tasks WHERE status = 'running'")
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn claimed(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM tasks WHERE lease_owner IS NOT NULL")
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn start_pool(
    e: &common::engine::Engine,
    script: Arc<Script>,
    shutdown: CancellationToken,
    drain: Duration,
) -> tokio::task::JoinHandle<()> {
    let info = common::redis_target();
    let pool = WorkerPool::build(
        5,
        e.pool.clone(),
        info,
        e.keys.clone(),
        registry(script),
        config(0.0),
    )
    .await
    .unwrap();
    tokio::spawn(pool.run(shutdown, drain))
}

#[sqlx::test]
async fn in_flight_attempts_finish_within_the_drain_deadline(pool: PgPool) {
    let script = Arc::new(Script {
        delay: Some(Duration::from_millis(500)),
        ..Script::default()
    });
    let e = engine(pool.clone(), script.clone(), config(0.0)).await;
    let ids = enqueue(&pool, 5).await;
    e.relay_once().await;
    let shutdown = CancellationToken::new();
    let handle = start_pool(&e, script, shutdown.clone(), Duration::from_secs(20)).await;
    common::eventually(Duration::from_secs(20), "all five to run", || async {
        (running(&pool).await == 5).then_some(())
    })
    .await;
    shutdown.cancel();
    handle.await.unwrap();
    for id in ids {
        assert_eq!(e.status(id).await, "succeeded");
    }
    assert_eq!(claimed(&pool).await, 0);
    assert_eq!(e.len(e.keys.processing()).await, 0);
}

#[sqlx::test]
async fn attempts_unfinished_at_the_deadline_are_released_and_run_again(pool: PgPool) {
    let slow = Arc::new(Script {
        delay: Some(Duration::from_secs(60)),
        ..Script::default()
    });
    let e = engine(pool.clone(), slow.clone(), config(0.0)).await;
    let ids = enqueue(&pool, 7).await;
    e.relay_once().await;
    let shutdown = CancellationToken::new();
    let handle = start_pool(&e, slow, shutdown.clone(), Duration::from_millis(300)).await;
    common::eventually(Duration::from_secs(20), "five to run", || async {
        (running(&pool).await == 5).then_some(())
    })
    .await;
    shutdown.cancel();
    handle.await.unwrap();

    assert_eq!(claimed(&pool).await, 0, "nothing stays claimed");
    assert_eq!(e.len(e.keys.processing()).await, 0);
    let mut released = 0;
    for id in &ids {
        let h = e.history(*id).await;
        assert_eq!(e.status(*id).await, "queued", "{h:?}");
        if h.contains(&"attempt_released".to_string()) {
            released += 1;
        }
    }
    assert_eq!(released, 5);
    assert_eq!(
        e.len(e.keys.tasks()).await,
        2,
        "the two never started are still queued in Redis"
    );

    // A new pool runs every task, each released attempt again under the same number (and so the
    // same idempotency key), within the budget of one attempt.
    e.relay_once().await;
    let fast = Script::answering(vec![]);
    let shutdown = CancellationToken::new();
    let handle = start_pool(&e, fast.clone(), shutdown.clone(), Duration::from_secs(5)).await;
    common::eventually(Duration::from_secs(20), "all to succeed", || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks WHERE status = 'succeeded'")
            .fetch_one(&pool)
            .await
            .unwrap();
        (n == 7).then_some(())
    })
    .await;
    shutdown.cancel();
    handle.await.unwrap();
    assert!(fast
        .calls()
        .iter()
        .all(|(id, attempt, key)| *attempt == 1 && *key == format!("{id}:1")));
    assert_eq!(fast.calls().len(), 7);
}
