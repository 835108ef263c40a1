//! The delivery engine driven step by step: relay → worker → outcome, retries, dead letters,
//! duplicates, fencing, time limits, recovery, operator actions and graceful shutdown.

use crate::common;
use arnela::domain::TaskId;

use arnela::domain::TaskType;
use arnela::queue::{self, Delivery};
use arnela::worker::handler::HandlerError;
use arnela::worker::Processed;
use common::engine::{config, engine, engine_with, registry, Script};
use common::{client, post};
use serde_json::json;
use sqlx::PgPool;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

async fn enqueue(pool: &PgPool, n: usize, max_attempts: i32) -> Vec<TaskId> {
    common::enqueue_tasks(pool, TaskType::SendSms, n, max_attempts).await
}

#[sqlx::test]
async fn a_task_is_published_claimed_and_succeeds_with_its_history_in_order(pool: PgPool) {
    let script = Script::answering(vec![]);
    let e = engine(pool.clone(), script.clone(), config(0.0)).await;
    let ids = enqueue(&pool, 5, 3).await;

    assert_eq!(e.relay_once().await, 5);
    assert_eq!(
        e.relay_once().await,
        0,
        "published rows are not published again"
    );
    assert_eq!(e.len(e.keys.tasks()).await, 5);
    for id in &ids {
        assert_eq!(e.step().await, Processed::Succeeded(*id), "FIFO order");
    }
    assert_eq!(e.step().await, Processed::Idle);
    assert_eq!(e.len(e.keys.processing()).await, 0, "acknowledged");

    let calls = script.calls();
    assert_eq!(calls.iter().map(|c| c.0).collect::<Vec<_>>(), ids);
    assert_eq!(
        calls[0].2,
        format!("{}:1", ids[0]),
        "idempotency key is task:attempt"
    );

    let events = e.events(ids[0]).await;
    let types: Vec<&str> = events.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(
        types,
        [
            "enqueued",
            "dispatched",
            "attempt_started",
            "attempt_succeeded"
        ]
    );
    assert_eq!(events[3].1["result"], json!({"provider_id": "ok"}));
    assert_eq!(e.status(ids[0]).await, "succeeded");
    let outbox: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(outbox, 0, "claimed deliveries leave the outbox");
    assert_eq!(e.stats.succeeded.load(Ordering::Relaxed), 5);
}

#[sqlx::test]
async fn a_retryable_failure_is_retried_after_its_backoff_and_then_succeeds(pool: PgPool) {
    // jitter 0.5 of a 1 s ceiling: the retry waits 500 ms
    let script = Script::answering(vec![Err(HandlerError::retryable("provider said 503"))]);
    let e = engine(pool.clone(), script.clone(), config(0.5)).await;
    let id = enqueue(&pool, 1, 3).await[0];

    e.relay_once().await;
    assert_eq!(e.step().await, Processed::Retrying(id));
    assert_eq!(e.status(id).await, "retrying");
    let events = e.events(id).await;
    let (kind, scheduled) = (&events[3].1, &events[4].1);
    assert_eq!(
        (events[3].0.as_str(), kind["kind"].as_str()),
        ("attempt_failed", Some("retryable"))
    );
    assert_eq!(kind["error"], "provider said 503");
    assert_eq!(events[4].0, "retry_scheduled");
    assert_eq!(
        (
            scheduled["delay_ms"].as_i64(),
            scheduled["next_attempt"].as_i64()
        ),
        (Some(500), Some(2))
    );

    // The next attempt waits in Postgres (an outbox row due later), not in memory.
    let (attempt, due_in_ms): (i32, f64) = sqlx::query_as(
        "SELECT attempt, (extract(epoch FROM available_at - now()) * 1000)::float8 FROM outbox WHERE task_id = $1",
    )
    .bind(id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(attempt, 2);
    assert!(due_in_ms > 0.0 && due_in_ms <= 500.0, "{due_in_ms}");
    assert_eq!(e.relay_once().await, 0, "not published before it is due");

    common::eventually(Duration::from_secs(10), "the retry to fall due", || async {
        (e.relay_once().await == 1).then_some(())
    })
    .await;
    assert_eq!(e.step().await, Processed::Succeeded(id));
    assert_eq!(
        e.history(id).await,
        [
            "enqueued",
            "dispatched",
            "attempt_started",
            "attempt_failed",
            "retry_scheduled",
            "dispatched",
            "attempt_started",
            "attempt_succeeded"
        ]
    );
    let attempts: Vec<i32> = script.calls().iter().map(|c| c.1).collect();
    assert_eq!(attempts, [1, 2]);
}

#[sqlx::test]
async fn exhausted_retries_dead_letter_with_every_error_in_the_history(pool: PgPool) {
    let script = Script::answering(vec![
        Err(HandlerError::retryable("timeout talking to provider")),
        Err(HandlerError::retryable("502 bad gateway")),
        Err(HandlerError::retryable("503 unavailable")),
    ]);
    // jitter 0: retries are due at once
    let e = engine(pool.clone(), script, config(0.0)).await;
    let id = enqueue(&pool, 1, 3).await[0];
    for expected in [
        Processed::Retrying(id),
        Processed::Retrying(id),
        Processed::DeadLettered(id),
    ] {
        assert_eq!(e.relay_once().await, 1);
        assert_eq!(e.step().await, expected);
    }
    assert_eq!(e.status(id).await, "dead");
    let errors: Vec<String> = e
        .events(id)
        .await
        .into_iter()
        .filter(|(t, _)| t == "attempt_failed")
        .map(|(_, d)| d["error"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        errors,
        [
            "timeout talking to provider",
            "502 bad gateway",
            "503 unavailable"
        ]
    );
    assert_eq!(e.history(id).await.last().unwrap(), "dead_lettered");

    let failed = e.range(e.keys.failed()).await;
    assert_eq!(failed.len(), 1);
    let copy: serde_json::Value = serde_json::from_str(&failed[0]).unwrap();
    assert_eq!(copy["task_id"], json!(id));
    assert_eq!(copy["attempts"], 3);
    assert!(copy["reason"].as_str().unwrap().contains("503 unavailable"));
    assert!(copy["failed_at"].is_string());
    assert_eq!(e.relay_once().await, 0, "nothing left to deliver");
}

/// A provider answer with NUL (which Postgres refuses) is stored with U+FFFD: the outcome is
/// recorded once, not lost and the message sent again.
#[sqlx::test]
async fn a_provider_answer_with_nul_is_recorded(pool: PgPool) {
    let script = Script::answering(vec![
        Ok(json!({"sid": "SM\u{0}42", "raw": "a\u{0}b"})),
        Err(HandlerError::permanent("bad \u{0} answer")),
    ]);
    let e = engine(pool.clone(), script.clone(), config(0.0)).await;
    let ids = enqueue(&pool, 2, 3).await;
    e.relay_once().await;
    assert_eq!(e.step().await, Processed::Succeeded(ids[0]));
    assert_eq!(e.step().await, Processed::DeadLettered(ids[1]));
    assert_eq!(script.calls().len(), 2);
    let events = e.events(ids[0]).await;
    assert_eq!(events[3].1["result"]["sid"], "SM\u{FFFD}42");
    let events = e.events(ids[1]).await;
    assert_eq!(events[3].1["error"], "bad \u{FFFD} answer");
}

/// A requeue that would take a task past the 100 attempts a task may have is a 409, not a 500
/// from the table's check constraint.
#[sqlx::test]
async fn a_requeue_past_the_attempt_budget_is_refused(pool: PgPool) {
    let script = Script::answering(vec![Err(HandlerError::permanent(
        "21211 invalid 'To' number",
    ))]);
    let e = engine(pool.clone(), script, config(0.0)).await;
    let id = enqueue(&pool, 1, 3).await[0];
    e.relay_once().await;
    assert_eq!(e.step().await, Processed::DeadLettered(id));
    // as if it had been requeued and had failed many times
    sqlx::query("UPDATE tasks SET attempts = 90 WHERE id = $1")
        .bind(id)
        .execute(&pool)
        .await
        .unwrap();
    let c = client(pool.clone()).await;
    let (status, err) = post(&c, &format!("/tasks/{id}/retry?attempts=11"), &json!(null)).await;
    assert_eq!(
        (status, err["code"].as_str()),
        (409, Some("attempt_budget_exhausted")),
        "{err}"
    );
    assert_eq!(e.history(id).await.last().unwrap(), "dead_lettered");
    let (status, task) = post(&c, &format!("/tasks/{id}/retry?attempts=10"), &json!(null)).await;
    assert_eq!(
        (status, task["max_attempts"].as_i64()),
        (200, Some(100)),
        "{task}"
    );
}

#[sqlx::test]
async fn a_permanent_error_dead_letters_at_once(pool: PgPool) {
    let script = Script::answering(vec![Err(HandlerError::permanent(
        "21211 invalid 'To' number",
    ))]);
    let e = engine(pool.clone(), script.clone(), config(0.0)).await;
    let id = enqueue(&pool, 1, 5).await[0];
    e.relay_once().await;
    assert_eq!(e.step().await, Processed::DeadLettered(id));
    assert_eq!(script.calls().len(), 1);
    let events = e.events(id).await;
    assert_eq!(events[3].1["kind"], "permanent");
    assert_eq!(events[4].0, "dead_lettered");
}

#[sqlx::test]
async fn a_provider_retry_after_is_honoured(pool: PgPool) {
    let script = Script::answering(vec![Err(HandlerError::Retryable {
        message: "429".into(),
        retry_after: Some(Duration::from_secs(42)),
    })]);
    let e = engine(pool.clone(), script, config(0.0)).await;
    let id = enqueue(&pool, 1, 3).await[0];
    e.relay_once().await;
    e.step().await;
    let events = e.events(id).await;
    assert_eq!(events[4].1["delay_ms"], 42_000);
}

#[sqlx::test]
async fn a_duplicate_delivery_runs_once_and_is_counted(pool: PgPool) {
    let script = Script::answering(vec![]);
    let e = engine(pool.clone(), script.clone(), config(0.0)).await;
    let id = enqueue(&pool, 1, 3).await[0];
    e.relay_once().await;
    // a relay that died after pushing but before marking: the same delivery again
    let mut conn = e.redis.clone();
    let again = Delivery {
        task_id: id,
        attempt: 1,
        task_type: "send_sms".into(),
    };
    queue::publish(&mut conn, &e.keys, &[again.clone(), again])
        .await
        .unwrap();

    assert_eq!(e.step().await, Processed::Succeeded(id));
    assert_eq!(e.step().await, Processed::Duplicate(id));
    assert_eq!(e.step().await, Processed::Duplicate(id));
    assert_eq!(script.calls().len(), 1);
    assert_eq!(e.stats.duplicates.load(Ordering::Relaxed), 2);
    assert_eq!(e.len(e.keys.processing()).await, 0);
    let started = e
        .history(id)
        .await
        .iter()
        .filter(|t| *t == "attempt_started")
        .count();
    assert_eq!(started, 1);
}

/// An engine whose handler waits at `gate`, and one task published for it.
async fn held_at_the_gate(
    pool: &PgPool,
) -> (common::engine::Engine, TaskId, Arc<tokio::sync::Semaphore>) {
    held_at_the_gate_with(pool, 3).await
}

/// [`held_at_the_gate`], the task allowed `max_attempts`.
async fn held_at_the_gate_with(
    pool: &PgPool,
    max_attempts: i32,
) -> (common::engine::Engine, TaskId, Arc<tokio::sync::Semaphore>) {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let script = Arc::new(Script {
        gate: Some(gate.clone()),
        ..Script::default()
    });
    let e = engine(pool.clone(), script, config(0.0)).await;
    let id = enqueue(pool, 1, max_attempts).await[0];
    e.relay_once().await;
    (e, id, gate)
}

#[sqlx::test]
async fn a_lease_missing_from_the_lease_index_is_still_taken_over(pool: PgPool) {
    let (e, id, gate) = held_at_the_gate(&pool).await;

    let worker = async { e.step().await };
    let takeover = async {
        e.until_running(id).await;
        // as a process built before `task_leases` existed leaves a lease: in `tasks` alone
        common::expire_lease(&pool, id).await;
        sqlx::query("DELETE FROM task_leases WHERE task_id = $1")
            .bind(id)
            .execute(&pool)
            .await
            .unwrap();
        let rescued = e.rescuer.run_once().await.unwrap();
        assert_eq!(rescued.leases_indexed, 1, "the lease is listed again");
        assert_eq!(rescued.leases_expired, 1, "and taken over");
        gate.add_permits(1);
    };
    let (processed, ()) = tokio::join!(worker, takeover);
    assert_eq!(processed, Processed::Fenced(id));
    assert_eq!(e.status(id).await, "retrying");
    let leases: i64 = sqlx::query_scalar("SELECT count(*) FROM task_leases")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(leases, 0, "a lease taken over leaves the index");
}

/// An attempt whose owner's heartbeat is current is left to that owner past its lease: a rescuer
/// takes it over only once the lease ran out more than the live-owner grace ago *and* the
/// rescuer has been in reach of Postgres for that grace (counted from its first pass here, from
/// its reconnection after an outage), however long ago the lease ran out.
#[sqlx::test]
async fn a_live_owners_attempt_waits_for_the_grace_counted_from_the_rescuers_reach(pool: PgPool) {
    let (e, id, gate) = held_at_the_gate(&pool).await;

    let worker = async { e.step().await };
    let takeover = async {
        e.until_running(id).await;
        // the lease ran out an hour ago, and its owner's process heartbeat is current
        let owner: Uuid = sqlx::query_scalar(
            "WITH t AS (UPDATE tasks SET lease_expires_at = now() - interval '1 hour' \
                        WHERE id = $1 RETURNING id, lease_expires_at, lease_owner), \
                  l AS (UPDATE task_leases l SET expires_at = t.lease_expires_at \
                        FROM t WHERE l.task_id = t.id) \
             SELECT lease_owner FROM t",
        )
        .bind(id)
        .fetch_one(&pool)
        .await
        .unwrap();
        let mut redis = e.redis.clone();
        queue::worker_heartbeat(&mut redis, &e.keys, owner, 1, Duration::from_secs(60))
            .await
            .unwrap();
        let grace = Duration::from_millis(500);
        let rescuer = arnela::rescuer::Rescuer::new(
            pool.clone(),
            e.redis.clone(),
            e.keys.clone(),
            arnela::rescuer::RescuerConfig {
                live_owner_grace: grace,
                ..arnela::rescuer::RescuerConfig::default()
            },
        );
        let first = rescuer.run_once().await.unwrap();
        assert_eq!(first.leases_expired, 0, "left to its live owner");
        tokio::time::sleep(grace).await;
        let later = rescuer.run_once().await.unwrap();
        assert_eq!(
            later.leases_expired, 1,
            "taken over after the grace in reach"
        );
        gate.add_permits(1);
    };
    let (processed, ()) = tokio::join!(worker, takeover);
    assert_eq!(processed, Processed::Fenced(id));
    assert_eq!(e.status(id).await, "retrying");
}

#[sqlx::test]
async fn a_worker_whose_lease_was_taken_over_cannot_record_its_outcome(pool: PgPool) {
    let (e, id, gate) = held_at_the_gate(&pool).await;

    let worker = async { e.step().await };
    let takeover = async {
        e.until_running(id).await;
        // the worker stalls past its lease; a rescuer takes the attempt over
        common::expire_lease(&pool, id).await;
        let rescued = e.rescuer.run_once().await.unwrap();
        assert_eq!(rescued.leases_expired, 1);
        gate.add_permits(1);
    };
    let (processed, ()) = tokio::join!(worker, takeover);
    assert_eq!(processed, Processed::Fenced(id));
    let events = e.events(id).await;
    let types: Vec<&str> = events.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(
        types,
        [
            "enqueued",
            "dispatched",
            "attempt_started",
            "attempt_failed",
            "retry_scheduled"
        ],
        "the stale worker's success was not recorded"
    );
    assert_eq!(events[3].1["kind"], "lease_expired");
    assert_eq!(e.status(id).await, "retrying");
}

/// Takes up to `n` published deliveries and claims their attempts, none left over.
async fn take_and_claim(e: &common::engine::Engine, n: usize) -> Vec<arnela::worker::Claimed> {
    let (claimed, others) = e
        .worker
        .claim(e.worker.take(n).await.unwrap())
        .await
        .unwrap();
    assert!(others.is_empty(), "every delivery is claimed: {others:?}");
    claimed
}

/// The worker's answer to `COMMIT` can be lost after the server has committed (the connection
/// breaks in between, as in a Postgres restart); the worker then records the same outcomes again.
/// That second try finds its own outcomes in the log: it reports them as recorded, not as a
/// takeover, and writes nothing more.
#[sqlx::test]
async fn outcomes_recorded_again_after_a_lost_commit_answer_are_not_a_takeover(pool: PgPool) {
    let script = Script::answering(vec![Err(HandlerError::retryable("provider said 503"))]);
    let e = engine(pool.clone(), script, config(0.0)).await;
    let ids = enqueue(&pool, 2, 3).await;
    e.relay_once().await;
    let claimed = take_and_claim(&e, 2).await;
    assert_eq!(claimed.len(), 2);
    let never = CancellationToken::new();
    let mut finished = Vec::new();
    for c in claimed {
        finished.push(e.worker.execute(c, &never, &never).await);
    }
    let first = e.worker.complete(finished.clone()).await.unwrap();
    assert_eq!(first.len(), 2);
    assert!(first.iter().any(|p| matches!(p, Processed::Retrying(_))));
    assert!(first.iter().any(|p| matches!(p, Processed::Succeeded(_))));
    let before = (e.events(ids[0]).await, e.events(ids[1]).await);

    let again = e.worker.complete(finished).await.unwrap();
    assert_eq!(
        again, first,
        "each outcome is found as recorded, none as fenced"
    );
    let after = (e.events(ids[0]).await, e.events(ids[1]).await);
    assert_eq!(after, before, "nothing more is written");
    assert_eq!(e.stats.fenced.load(Ordering::Relaxed), 0);
}

/// A failed run whose attempt a rescuer took over is fenced, however often it is recorded: the
/// rescuer's `attempt_failed` (kind `lease_expired`) is not the worker's own.
#[sqlx::test]
async fn a_failed_run_taken_over_is_fenced_on_every_try(pool: PgPool) {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let script = Arc::new(Script {
        outcomes: std::sync::Mutex::new(vec![Err(HandlerError::retryable("503"))].into()),
        gate: Some(gate.clone()),
        ..Script::default()
    });
    let e = engine(pool.clone(), script, config(0.0)).await;
    let id = enqueue(&pool, 1, 3).await[0];
    e.relay_once().await;
    let claimed = take_and_claim(&e, 1).await;
    let never = CancellationToken::new();
    let run = e
        .worker
        .execute(claimed.into_iter().next().unwrap(), &never, &never);
    let takeover = async {
        e.until_running(id).await;
        common::expire_lease(&pool, id).await;
        assert_eq!(e.rescuer.run_once().await.unwrap().leases_expired, 1);
        gate.add_permits(1);
    };
    let (finished, ()) = tokio::join!(run, takeover);
    assert!(matches!(
        finished.ending,
        arnela::worker::Ending::Done(Err(_))
    ));
    for _ in 0..2 {
        let processed = e.worker.complete(vec![finished.clone()]).await.unwrap();
        assert_eq!(processed, [Processed::Fenced(id)]);
    }
    let events = e.events(id).await;
    let types: Vec<&str> = events.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(
        types.len(),
        5,
        "nothing after the rescuer's retry: {types:?}"
    );
    assert_eq!(types[3], "attempt_failed");
    assert_eq!(
        events[3].1["kind"], "lease_expired",
        "the one failure recorded is the rescuer's"
    );
}

/// A run stopped because its lease was lost is recorded once, however often the worker tries:
/// after a takeover as `attempt_stopped` (here written after the next attempt's start), while
/// the worker still held the attempt as its own `attempt_failed` (kind `lease_expired`). A try
/// after a commit whose answer was lost finds that record and writes no second end of the same
/// run.
#[sqlx::test]
async fn a_run_stopped_for_a_lost_lease_is_recorded_once_on_every_try(pool: PgPool) {
    let e = engine(pool.clone(), Script::answering(vec![]), config(0.0)).await;
    let ids = enqueue(&pool, 2, 3).await;
    e.relay_once().await;
    let claimed = take_and_claim(&e, 2).await;
    let stopped = |c: arnela::worker::Claimed| arnela::worker::Finished {
        claimed: c,
        ending: arnela::worker::Ending::LeaseLost,
        duration_ms: 7,
    };
    let (mut taken_over, mut still_held) = (None, None);
    for c in claimed {
        if c.ctx.task_id == ids[0] {
            taken_over = Some(stopped(c));
        } else {
            still_held = Some(stopped(c));
        }
    }
    let (taken_over, still_held) = (taken_over.unwrap(), still_held.unwrap());
    common::expire_lease(&pool, ids[0]).await;
    assert_eq!(e.rescuer.run_once().await.unwrap().leases_expired, 1);
    // the retry starts before the stopped run is recorded (its worker was cut off meanwhile)
    e.relay_once().await;
    let next = take_and_claim(&e, 1).await;
    assert_eq!(
        (next[0].ctx.task_id, next[0].ctx.attempt),
        (ids[0], 2),
        "attempt 2 started"
    );

    let both = vec![taken_over, still_held];
    let first = e.worker.complete(both.clone()).await.unwrap();
    assert_eq!(
        first,
        [Processed::Fenced(ids[0]), Processed::Retrying(ids[1])]
    );
    let before = (e.events(ids[0]).await, e.events(ids[1]).await);
    let ends = |events: &[(String, serde_json::Value)]| -> Vec<String> {
        events
            .iter()
            .filter(|(t, _)| t == "attempt_stopped" || t == "attempt_failed")
            .map(|(t, d)| format!("{t}/{}", d["kind"].as_str().unwrap_or("-")))
            .collect()
    };
    assert_eq!(
        ends(&before.0),
        ["attempt_failed/lease_expired", "attempt_stopped/-"],
        "the rescuer's failure, then the worker's stop"
    );
    assert_eq!(ends(&before.1), ["attempt_failed/lease_expired"]);

    for _ in 0..2 {
        let again = e.worker.complete(both.clone()).await.unwrap();
        assert_eq!(again, first, "found as recorded, reported as before");
        let after = (e.events(ids[0]).await, e.events(ids[1]).await);
        assert_eq!(after, before, "nothing more is written");
    }
}

#[sqlx::test]
async fn a_handler_over_its_time_limit_fails_retryably(pool: PgPool) {
    let script = Arc::new(Script {
        delay: Some(Duration::from_secs(30)),
        ..Script::default()
    });
    let registry = registry(script).with_timeout(TaskType::SendSms, Duration::from_millis(200));
    let e = engine_with(pool.clone(), registry, config(0.0)).await;
    let id = enqueue(&pool, 1, 3).await[0];
    e.relay_once().await;
    assert_eq!(e.step().await, Processed::Retrying(id));
    let events = e.events(id).await;
    assert_eq!(events[3].1["kind"], "timeout");
}

/// An engine whose registry has no handler: every task it takes is dead-lettered at once.
async fn without_handlers(pool: &PgPool) -> common::engine::Engine {
    engine_with(
        pool.clone(),
        arnela::worker::handler::Registry::new(),
        config(0.0),
    )
    .await
}

#[sqlx::test]
async fn a_task_type_without_a_handler_is_dead_lettered_at_once(pool: PgPool) {
    let e = without_handlers(&pool).await;
    let id = enqueue(&pool, 1, 3).await[0];
    e.relay_once().await;
    assert_eq!(e.step().await, Processed::DeadLettered(id));
    assert_eq!(e.history(id).await.last().unwrap(), "dead_lettered");
    assert_eq!(e.len(e.keys.failed()).await, 1);
}

/// Redis loses the failed list (with every other key): the next rescuer pass puts back the
/// copies of the tasks Postgres holds as dead-lettered, behind a copy pushed since, and a later
/// pass adds none twice.
#[sqlx::test]
async fn the_failed_list_is_restored_from_postgres_after_redis_lost_it(pool: PgPool) {
    let e = without_handlers(&pool).await;
    let ids = enqueue(&pool, 3, 3).await;
    e.relay_once().await;
    for id in &ids {
        assert_eq!(e.step().await, Processed::DeadLettered(*id));
    }
    let before = e.range(e.keys.failed()).await;
    assert_eq!(before.len(), 3);
    assert_eq!(
        e.rescuer.run_once().await.unwrap().failed_restored,
        0,
        "a first pass finds the list whole"
    );
    // Redis loses everything under our prefix; one more task is dead-lettered meanwhile
    let mut conn = e.redis.clone();
    let _: () = redis::cmd("DEL")
        .arg(e.keys.failed())
        .arg(e.keys.failed_seeded())
        .arg(e.keys.seeded())
        .query_async(&mut conn)
        .await
        .unwrap();
    let late = enqueue(&pool, 1, 3).await[0];
    e.relay_once().await;
    assert_eq!(e.step().await, Processed::DeadLettered(late));

    assert_eq!(e.rescuer.run_once().await.unwrap().failed_restored, 3);
    let after: Vec<serde_json::Value> = e
        .range(e.keys.failed())
        .await
        .iter()
        .map(|c| serde_json::from_str(c).unwrap())
        .collect();
    let listed: Vec<String> = after
        .iter()
        .map(|c| c["task_id"].as_str().unwrap().to_owned())
        .collect();
    let mut restored = listed[1..].to_vec();
    restored.sort();
    let mut expected: Vec<String> = ids.iter().map(|id| id.to_string()).collect();
    expected.sort();
    assert_eq!(
        listed[0],
        late.to_string(),
        "the copy pushed since stays first"
    );
    assert_eq!(restored, expected, "every dead letter once");
    let originals: Vec<serde_json::Value> = before
        .iter()
        .map(|c| serde_json::from_str(c).unwrap())
        .collect();
    for copy in &after[1..] {
        let original = originals
            .iter()
            .find(|o| o["task_id"] == copy["task_id"])
            .unwrap();
        assert_eq!(copy, original, "restored as it was pushed");
    }
    assert_eq!(e.rescuer.run_once().await.unwrap().failed_restored, 0);
    assert_eq!(e.len(e.keys.failed()).await, 4, "nothing twice");
}

/// Makes every push to the failed list fail with an error while Redis keeps its data: the key
/// holds a string, so `LPUSH` answers `WRONGTYPE`.
async fn refuse_failed_pushes(e: &common::engine::Engine) {
    let mut conn = e.redis.clone();
    let _: () = redis::cmd("SET")
        .arg(e.keys.failed())
        .arg("not a list")
        .query_async(&mut conn)
        .await
        .unwrap();
}

async fn accept_failed_pushes(e: &common::engine::Engine) {
    let mut conn = e.redis.clone();
    let held: String = redis::cmd("GET")
        .arg(e.keys.failed())
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(held, "not a list", "nothing was pushed meanwhile");
    let _: () = redis::cmd("DEL")
        .arg(e.keys.failed())
        .query_async(&mut conn)
        .await
        .unwrap();
}

fn failed_tasks(entries: &[String]) -> Vec<String> {
    entries
        .iter()
        .map(|c| {
            let copy: serde_json::Value = serde_json::from_str(c).unwrap();
            copy["task_id"].as_str().unwrap().to_owned()
        })
        .collect()
}

async fn pending_copies(pool: &PgPool) -> i64 {
    arnela::store::failed_copies::pending(pool).await.unwrap()
}

/// An engine without handlers whose failed list was restored, and a task it dead-lettered while
/// Redis refused the copy's push.
async fn dead_lettered_while_redis_refuses_its_copy(
    pool: &PgPool,
) -> (common::engine::Engine, arnela::domain::TaskId) {
    let e = without_handlers(pool).await;
    let id = enqueue(pool, 1, 3).await[0];
    e.relay_once().await;
    assert_eq!(e.rescuer.run_once().await.unwrap().failed_restored, 0);
    refuse_failed_pushes(&e).await;
    assert_eq!(e.step().await, Processed::DeadLettered(id));
    (e, id)
}

/// Redis refuses a dead letter's copy after its transition committed, keeping its data (the
/// marker stays, so no restore would bring the copy back): the copy waits in Postgres, in the
/// failed list's outbox, and the next rescuer pass pushes it, before any newer copy.
#[sqlx::test]
async fn a_dead_letter_copy_redis_refused_waits_in_postgres_for_the_rescuer(pool: PgPool) {
    let (e, first) = dead_lettered_while_redis_refuses_its_copy(&pool).await;
    assert_eq!(e.history(first).await.last().unwrap(), "dead_lettered");
    assert_eq!(pending_copies(&pool).await, 1, "kept with the dead letter");
    let rescued = e.rescuer.run_once().await.unwrap();
    assert_eq!(rescued.failed_copies_pushed, 0, "still refused");
    assert_eq!(pending_copies(&pool).await, 1, "a refused push keeps it");
    accept_failed_pushes(&e).await;

    assert_eq!(e.rescuer.run_once().await.unwrap().failed_copies_pushed, 1);
    assert_eq!(pending_copies(&pool).await, 0);
    let listed = failed_tasks(&e.range(e.keys.failed()).await);
    assert_eq!(listed, vec![first.to_string()], "pushed by the rescuer");

    let second = enqueue(&pool, 1, 3).await[0];
    e.relay_once().await;
    assert_eq!(e.step().await, Processed::DeadLettered(second));
    assert_eq!(pending_copies(&pool).await, 0, "pushed by its worker");
    let listed = failed_tasks(&e.range(e.keys.failed()).await);
    assert_eq!(
        listed,
        vec![second.to_string(), first.to_string()],
        "newest first, nothing twice"
    );
    assert_eq!(e.rescuer.run_once().await.unwrap().failed_copies_pushed, 0);
}

/// The push of a dead letter's copy goes through and the commit that removes the copy from
/// Postgres then fails (a deferred trigger makes it fail at `COMMIT`, after the push): the copy
/// stays in the failed list's outbox and the next rescuer pass pushes it again, yet the failed
/// list holds it once. A later copy of the same task (dead-lettered again) is listed beside it.
#[sqlx::test]
async fn a_dead_letter_copy_pushed_again_after_a_failed_commit_is_listed_once(pool: PgPool) {
    let (e, id) = dead_lettered_while_redis_refuses_its_copy(&pool).await;
    accept_failed_pushes(&e).await;
    sqlx::raw_sql(
        "CREATE FUNCTION refuse_commit() RETURNS trigger LANGUAGE plpgsql AS \
           $$BEGIN RAISE EXCEPTION 'commit refused by the test'; END$$; \
         CREATE CONSTRAINT TRIGGER refuse_commit AFTER DELETE ON failed_copies \
           DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION refuse_commit();",
    )
    .execute(&pool)
    .await
    .unwrap();
    let mut conn = e.redis.clone();
    assert!(
        arnela::dead_letters::push_pending(&pool, &mut conn, &e.keys)
            .await
            .is_err(),
        "the push fails at the commit"
    );
    assert_eq!(pending_copies(&pool).await, 1, "the copy stays in Postgres");
    let listed = failed_tasks(&e.range(e.keys.failed()).await);
    assert_eq!(
        listed,
        vec![id.to_string()],
        "pushed before the commit failed"
    );

    sqlx::raw_sql("DROP TRIGGER refuse_commit ON failed_copies")
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(e.rescuer.run_once().await.unwrap().failed_copies_pushed, 1);
    assert_eq!(pending_copies(&pool).await, 0);
    let listed = failed_tasks(&e.range(e.keys.failed()).await);
    assert_eq!(listed, vec![id.to_string()], "pushed again, listed once");

    // the same task dead-lettered again (after an operator's retry) is a copy of its own
    let again = arnela::domain::task::DeadLetter {
        task_id: id,
        task_type: TaskType::SendSms,
        attempts: 6,
        reason: "dead-lettered again".into(),
        at: chrono::Utc::now(),
    };
    assert_eq!(
        queue::push_failed(&mut conn, &e.keys, std::slice::from_ref(&again))
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        queue::push_failed(&mut conn, &e.keys, &[again])
            .await
            .unwrap(),
        0,
        "and is listed once too"
    );
    let listed = failed_tasks(&e.range(e.keys.failed()).await);
    assert_eq!(listed, vec![id.to_string(), id.to_string()]);
}

/// After Redis refused a copy, the process's workers leave their copies to the rescuer for a
/// pause (no push per completion while Redis refuses) even if Redis takes pushes again meanwhile;
/// the rescuer's next pass pushes them all, oldest first, and ends the pause.
#[sqlx::test]
async fn after_a_refusal_workers_leave_their_copies_to_the_rescuer(pool: PgPool) {
    let (e, first) = dead_lettered_while_redis_refuses_its_copy(&pool).await;
    accept_failed_pushes(&e).await;

    let second = enqueue(&pool, 1, 3).await[0];
    e.relay_once().await;
    assert_eq!(e.step().await, Processed::DeadLettered(second));
    assert_eq!(pending_copies(&pool).await, 2, "left to the rescuer");
    assert!(e.range(e.keys.failed()).await.is_empty());

    assert_eq!(e.rescuer.run_once().await.unwrap().failed_copies_pushed, 2);
    let listed = failed_tasks(&e.range(e.keys.failed()).await);
    assert_eq!(listed, vec![second.to_string(), first.to_string()]);

    let third = enqueue(&pool, 1, 3).await[0];
    e.relay_once().await;
    assert_eq!(e.step().await, Processed::DeadLettered(third));
    assert_eq!(pending_copies(&pool).await, 0, "pushed by its worker again");
    let listed = failed_tasks(&e.range(e.keys.failed()).await);
    assert_eq!(
        listed,
        vec![third.to_string(), second.to_string(), first.to_string()]
    );
}

/// A task whose copy waits in the failed list's outbox is left out of a restore of the list:
/// the copy's own push brings it, so it is listed once.
#[sqlx::test]
async fn a_restore_leaves_a_waiting_copy_to_its_push(pool: PgPool) {
    let (e, id) = dead_lettered_while_redis_refuses_its_copy(&pool).await;

    let dead = arnela::store::tasks::dead_lettered(&pool, 100)
        .await
        .unwrap();
    assert!(dead.is_empty(), "left to the push: {dead:?}");
    accept_failed_pushes(&e).await;
    let mut conn = e.redis.clone();
    let _: () = redis::cmd("DEL")
        .arg(e.keys.failed_seeded())
        .query_async(&mut conn)
        .await
        .unwrap();
    let rescued = e.rescuer.run_once().await.unwrap();
    assert_eq!(rescued.failed_copies_pushed, 1);
    assert_eq!(rescued.failed_restored, 0, "the push brought it");
    let dead = arnela::store::tasks::dead_lettered(&pool, 100)
        .await
        .unwrap();
    assert_eq!(dead.len(), 1, "listed for restores once pushed");
    assert_eq!(
        failed_tasks(&e.range(e.keys.failed()).await),
        vec![id.to_string()]
    );
}

/// The rescuer dead-letters an attempt whose lease ran out, and Redis refuses the copy: the
/// pass goes on, and the copy, kept in Postgres, is pushed at the rescuer's next pass.
#[sqlx::test]
async fn a_dead_letter_copy_redis_refused_is_pushed_at_the_rescuers_next_pass(pool: PgPool) {
    let (e, id, gate) = held_at_the_gate_with(&pool, 1).await;
    assert_eq!(e.rescuer.run_once().await.unwrap().failed_restored, 0);

    let worker = async { e.step().await };
    let takeover = async {
        e.until_running(id).await;
        common::expire_lease(&pool, id).await;
        refuse_failed_pushes(&e).await;
        let rescued = e.rescuer.run_once().await.unwrap();
        assert_eq!(rescued.leases_expired, 1, "the pass goes on");
        assert_eq!(pending_copies(&pool).await, 1);
        accept_failed_pushes(&e).await;
        let rescued = e.rescuer.run_once().await.unwrap();
        assert_eq!(rescued.failed_copies_pushed, 1);
        gate.add_permits(1);
    };
    let (processed, ()) = tokio::join!(worker, takeover);
    assert_eq!(processed, Processed::Fenced(id));
    assert_eq!(e.status(id).await, "dead");
    let listed = failed_tasks(&e.range(e.keys.failed()).await);
    assert_eq!(listed, vec![id.to_string()]);
    assert_eq!(e.rescuer.run_once().await.unwrap().failed_copies_pushed, 0);
}

/// Copies refused in several pushes wait in order and go out oldest first, ahead of the copies
/// written after Redis takes pushes again, in batches, each once.
#[sqlx::test]
async fn refused_dead_letter_copies_keep_their_order(pool: PgPool) {
    use arnela::dead_letters::push_pending;
    use arnela::domain::task::DeadLetter;
    use arnela::domain::TaskType;
    use arnela::store::{failed_copies, Tx};
    let e = without_handlers(&pool).await;
    let dead: Vec<DeadLetter> = (0..1_205)
        .map(|n| DeadLetter {
            task_id: arnela::domain::TaskId::new(),
            task_type: TaskType::SendSms,
            attempts: 3,
            reason: format!("failure {n}"),
            at: chrono::Utc::now(),
        })
        .collect();
    let record = |copies: &[DeadLetter]| {
        let (pool, copies) = (pool.clone(), copies.to_vec());
        async move {
            let mut tx = Tx::begin(&pool).await.unwrap();
            failed_copies::record(&mut tx, &copies).await.unwrap();
            tx.commit().await.unwrap();
        }
    };
    let mut conn = e.redis.clone();
    refuse_failed_pushes(&e).await;
    record(&dead[0..2]).await;
    assert!(push_pending(&pool, &mut conn, &e.keys).await.is_err());
    record(&dead[2..3]).await;
    assert!(push_pending(&pool, &mut conn, &e.keys).await.is_err());
    assert_eq!(pending_copies(&pool).await, 3);
    accept_failed_pushes(&e).await;

    record(&dead[3..]).await;
    assert_eq!(
        push_pending(&pool, &mut conn, &e.keys).await.unwrap(),
        1_205,
        "in two batches"
    );
    assert_eq!(pending_copies(&pool).await, 0);
    let expected: Vec<String> = dead.iter().rev().map(|d| d.task_id.to_string()).collect();
    assert_eq!(failed_tasks(&e.range(e.keys.failed()).await), expected);
    let copy: serde_json::Value = serde_json::from_str(&e.range(e.keys.failed()).await[0]).unwrap();
    assert_eq!(copy["reason"], "failure 1204");
    assert_eq!(copy["type"], "send_sms");
    assert_eq!(copy["attempts"], 3);
    assert_eq!(push_pending(&pool, &mut conn, &e.keys).await.unwrap(), 0);
}

#[sqlx::test]
async fn an_undecodable_delivery_goes_to_the_failed_list(pool: PgPool) {
    let e = engine(pool.clone(), Script::answering(vec![]), config(0.0)).await;
    let mut conn = e.redis.clone();
    let _: () = redis::cmd("LPUSH")
        .arg(e.keys.tasks())
        .arg("{not json")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(e.step().await, Processed::Undecodable);
    assert_eq!(e.len(e.keys.processing()).await, 0);
    let failed = e.range(e.keys.failed()).await;
    assert!(failed[0].contains("undecodable"), "{failed:?}");
}

#[sqlx::test]
async fn redis_losing_its_data_is_noticed_and_deliveries_are_published_again(pool: PgPool) {
    let e = engine(pool.clone(), Script::answering(vec![]), config(0.0)).await;
    let ids = enqueue(&pool, 3, 3).await;
    assert_eq!(
        e.rescuer.run_once().await.unwrap().republished_after_loss,
        0,
        "first pass seeds"
    );
    e.relay_once().await;
    // Redis loses everything under our prefix (as a restart without persistence would)
    let mut conn = e.redis.clone();
    let _: () = redis::cmd("DEL")
        .arg(e.keys.tasks())
        .arg(e.keys.seeded())
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(e.step().await, Processed::Idle);
    assert_eq!(
        e.rescuer.run_once().await.unwrap().republished_after_loss,
        3
    );
    assert_eq!(e.relay_once().await, 3);
    for id in ids {
        assert_eq!(e.step().await, Processed::Succeeded(id));
    }
}

#[sqlx::test]
async fn a_delivery_taken_by_a_worker_that_died_before_claiming_is_published_again(pool: PgPool) {
    let e = engine(pool.clone(), Script::answering(vec![]), config(0.0)).await;
    let id = enqueue(&pool, 1, 3).await[0];
    e.relay_once().await;
    // a worker took it and died at once
    let mut conn = e.redis.clone();
    let taken = queue::take(&mut conn, &e.keys, Duration::from_secs(1))
        .await
        .unwrap();
    assert!(taken.is_some());
    let first = e.rescuer.run_once().await.unwrap(); // records first sight (grace 0)
    let second = e.rescuer.run_once().await.unwrap();
    assert_eq!(first.orphans + second.orphans, 1);
    assert_eq!(e.len(e.keys.processing()).await, 0);
    assert_eq!(e.relay_once().await, 1);
    assert_eq!(e.step().await, Processed::Succeeded(id));
}

#[sqlx::test]
async fn operators_cancel_waiting_tasks_and_requeue_dead_ones_through_the_api(pool: PgPool) {
    let script = Script::answering(vec![Err(HandlerError::permanent("bad number"))]);
    let e = engine(pool.clone(), script, config(0.0)).await;
    let c = client(pool.clone()).await;
    let (_, a) = post(&c, "/tasks", &common::sms("to cancel")).await;
    let (_, b) = post(&c, "/tasks", &common::sms("to requeue")).await;
    let (a, b): (TaskId, TaskId) = (
        a["id"].as_str().unwrap().parse().unwrap(),
        b["id"].as_str().unwrap().parse().unwrap(),
    );

    let (status, cancelled) = post(
        &c,
        &format!("/tasks/{a}/cancel?reason=patient%20called"),
        &json!(null),
    )
    .await;
    assert_eq!(
        (status, cancelled["status"].as_str()),
        (200, Some("cancelled")),
        "{cancelled}"
    );
    assert_eq!(e.relay_once().await, 1, "only the other task is delivered");
    assert_eq!(e.step().await, Processed::DeadLettered(b));
    let (status, err) = post(&c, &format!("/tasks/{a}/cancel"), &json!(null)).await;
    assert_eq!(
        (status, err["code"].as_str()),
        (409, Some("invalid_transition"))
    );
    let (status, err) = post(&c, &format!("/tasks/{a}/retry"), &json!(null)).await;
    assert_eq!(
        (status, err["code"].as_str()),
        (409, Some("invalid_transition"))
    );

    // dead letters are listed through the audit API
    // (the listing shows a task once every older transaction on the server has ended)
    let dead = common::eventually(
        Duration::from_secs(30),
        "the dead letter to be listed",
        || async {
            let (_, dead) = common::get(&c, "/tasks?status=dead").await;
            (!dead["items"].as_array().unwrap().is_empty()).then_some(dead)
        },
    )
    .await;
    assert_eq!(dead["items"][0]["id"], json!(b));
    assert!(dead["items"][0]["last_error"]
        .as_str()
        .unwrap()
        .contains("bad number"));

    let (status, requeued) = post(&c, &format!("/tasks/{b}/retry?attempts=2"), &json!(null)).await;
    assert_eq!(
        (status, requeued["status"].as_str()),
        (200, Some("queued")),
        "{requeued}"
    );
    assert_eq!(requeued["max_attempts"], 3);
    assert_eq!(e.relay_once().await, 1);
    assert_eq!(e.step().await, Processed::Succeeded(b));
    assert_eq!(
        e.history(b).await,
        [
            "enqueued",
            "dispatched",
            "attempt_started",
            "attempt_failed",
            "dead_lettered",
            "requeued",
            "dispatched",
            "attempt_started",
            "attempt_succeeded"
        ]
    );
    assert_eq!(e.history(a).await, ["enqueued", "cancelled"]);
    let (status, _) = post(
        &c,
        &format!("/tasks/{}/cancel", Uuid::new_v4()),
        &json!(null),
    )
    .await;
    assert_eq!(status, 404);
    let (status, _) = post(&c, &format!("/tasks/{b}/retry?attempts=0"), &json!(null)).await;
    assert_eq!(status, 400);
}

#[sqlx::test]
async fn a_task_cancelled_while_running_is_not_retried(pool: PgPool) {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let script = Arc::new(Script {
        gate: Some(gate.clone()),
        outcomes: std::sync::Mutex::new(vec![Err(HandlerError::retryable("503"))].into()),
        ..Script::default()
    });
    let e = engine(pool.clone(), script, config(0.0)).await;
    let id = enqueue(&pool, 1, 3).await[0];
    e.relay_once().await;
    let (processed, ()) = tokio::join!(e.step(), async {
        common::eventually(Duration::from_secs(10), "running", || async {
            (e.status(id).await == "running").then_some(())
        })
        .await;
        arnela::store::operator::cancel(&pool, id, "no longer needed".into(), "test")
            .await
            .unwrap();
        gate.add_permits(1);
    });
    assert_eq!(processed, Processed::CancelledWhileRunning(id));
    assert_eq!(e.status(id).await, "cancelled");
    assert_eq!(
        e.history(id).await,
        [
            "enqueued",
            "dispatched",
            "attempt_started",
            "cancelled",
            "attempt_failed"
        ]
    );
    assert_eq!(e.relay_once().await, 0);
    let lease: Option<Uuid> = sqlx::query_scalar("SELECT lease_owner FROM tasks WHERE id = $1")
        .bind(id)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(lease, None);
}

struct Panics;

impl arnela::worker::handler::Handler for Panics {
    fn handle<'a>(
        &'a self,
        _task: &'a arnela::worker::handler::TaskContext,
    ) -> futures::future::BoxFuture<'a, arnela::worker::handler::HandlerResult> {
        Box::pin(async { panic!("a bug in a handler") })
    }
}

#[sqlx::test]
async fn a_panicking_handler_fails_its_attempt_and_the_task_is_retried(pool: PgPool) {
    let registry =
        arnela::worker::handler::Registry::new().register(TaskType::SendSms, Arc::new(Panics));
    let e = engine_with(pool.clone(), registry, config(0.0)).await;
    let id = enqueue(&pool, 1, 3).await[0];
    e.relay_once().await;
    assert_eq!(e.step().await, Processed::Retrying(id));
    let events = e.events(id).await;
    assert_eq!(events[3].1["error"], "the handler panicked");
    let lease: Option<Uuid> = sqlx::query_scalar("SELECT lease_owner FROM tasks WHERE id = $1")
        .bind(id)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(lease, None, "nothing stays claimed");
}

#[sqlx::test]
async fn an_unreadable_task_row_does_not_hold_up_the_others(pool: PgPool) {
    let e = engine(pool.clone(), Script::answering(vec![]), config(0.0)).await;
    let ids = enqueue(&pool, 2, 3).await;
    // a row a newer build wrote (a task type this build does not know)
    sqlx::query("UPDATE tasks SET task_type = 'send_fax' WHERE id = $1")
        .bind(ids[0])
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(e.relay_once().await, 1, "the readable task is published");
    assert_eq!(e.step().await, Processed::Succeeded(ids[1]));
    assert_eq!(
        e.status(ids[0]).await,
        "queued",
        "the unreadable one waits untouched"
    );
}

#[sqlx::test]
async fn a_handler_stopped_because_its_attempt_was_taken_over_records_attempt_stopped(
    pool: PgPool,
) {
    // a handler that never finishes by itself, and a lease renewed every second
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let script = Arc::new(Script {
        gate: Some(gate),
        ..Script::default()
    });
    let mut cfg = config(0.0);
    cfg.lease = Duration::from_secs(3);
    let e = engine(pool.clone(), script, cfg).await;
    let id = enqueue(&pool, 1, 3).await[0];
    e.relay_once().await;

    let worker = async { e.step().await };
    let takeover = async {
        e.until_running(id).await;
        // the worker stalls past its lease (no heartbeat: it is not a live process) and a
        // rescuer takes the attempt over; a renewal may slip in between, so try until it does
        common::eventually(
            Duration::from_secs(10),
            "a rescuer to take over",
            || async {
                common::expire_lease(&pool, id).await;
                (e.rescuer.run_once().await.unwrap().leases_expired == 1).then_some(())
            },
        )
        .await;
    };
    let (processed, ()) = tokio::join!(worker, takeover);
    assert_eq!(processed, Processed::Fenced(id));
    let events = e.events(id).await;
    let types: Vec<&str> = events.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(
        types,
        [
            "enqueued",
            "dispatched",
            "attempt_started",
            "attempt_failed",
            "retry_scheduled",
            "attempt_stopped"
        ],
        "the stopped handler is recorded, after the takeover"
    );
    assert_eq!(events[5].1["attempt"], 1);
    assert_eq!(events[5].1["worker_id"], e.worker.id.to_string());
    assert_eq!(e.status(id).await, "retrying", "the stop changes nothing");
}

/// Ages every published delivery of the engine's database by `secs` seconds.
async fn age_published(pool: &PgPool, secs: i32) {
    sqlx::query(
        "UPDATE outbox SET published_at = published_at - make_interval(secs => $1) \
         WHERE published_at IS NOT NULL",
    )
    .bind(secs as f64)
    .execute(pool)
    .await
    .unwrap();
}

#[sqlx::test]
async fn a_published_delivery_redis_lost_while_its_marker_survived_is_published_again(
    pool: PgPool,
) {
    let e = engine(pool.clone(), Script::answering(vec![]), config(0.0)).await;
    let ids = enqueue(&pool, 3, 3).await;
    e.rescuer.run_once().await.unwrap();
    assert_eq!(e.relay_once().await, 3);
    // Redis comes back from its append-only file without the last second: the seeded marker
    // is there, the deliveries pushed in that second are not
    let mut conn = e.redis.clone();
    let _: () = redis::cmd("DEL")
        .arg(e.keys.tasks())
        .arg(e.keys.transit())
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        e.rescuer.run_once().await.unwrap().republished_lost,
        0,
        "younger than REPUBLISH_AFTER_SECS: still in flight for all the rescuer knows"
    );
    age_published(&pool, 11).await;
    let pass = e.rescuer.run_once().await.unwrap();
    assert_eq!(pass.republished_after_loss, 0, "the marker survived");
    assert_eq!(pass.republished_lost, 3);
    assert_eq!(e.relay_once().await, 3);
    for id in ids {
        assert_eq!(e.step().await, Processed::Succeeded(id));
    }
}

#[sqlx::test]
async fn a_backlog_that_waits_long_is_never_published_twice(pool: PgPool) {
    let e = engine(pool.clone(), Script::answering(vec![]), config(0.0)).await;
    let ids = enqueue(&pool, 40, 3).await;
    e.rescuer.run_once().await.unwrap();
    assert_eq!(e.relay_once().await, 40);
    // nobody takes them for a long while (no worker running)
    age_published(&pool, 3600).await;
    for _ in 0..3 {
        assert_eq!(e.rescuer.run_once().await.unwrap().republished_lost, 0);
    }
    assert_eq!(e.relay_once().await, 0, "nothing to publish again");
    for id in &ids {
        assert_eq!(e.step().await, Processed::Succeeded(*id));
    }
    assert_eq!(e.step().await, Processed::Idle);
    let dispatched: Vec<i64> = sqlx::query_scalar(
        "SELECT count(*) FILTER (WHERE event_type = 'dispatched') FROM task_events \
         WHERE task_id = ANY($1) GROUP BY task_id",
    )
    .bind(&ids)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(dispatched.len(), 40);
    assert!(
        dispatched.iter().all(|&n| n == 1),
        "every task dispatched once: {dispatched:?}"
    );
    let succeeded: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM tasks WHERE id = ANY($1) AND status = 'succeeded'",
    )
    .bind(&ids)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(succeeded, 40);
}

/// A handler whose provider turn comes late: the wait is not part of its time limit.
struct SlowTurn {
    turn: Duration,
}

impl arnela::worker::handler::Handler for SlowTurn {
    fn handle<'a>(
        &'a self,
        _task: &'a arnela::worker::handler::TaskContext,
    ) -> futures::future::BoxFuture<'a, arnela::worker::handler::HandlerResult> {
        Box::pin(async { Ok(json!({"sent": true})) })
    }

    fn slot<'a>(
        &'a self,
        _task: &'a arnela::worker::handler::TaskContext,
    ) -> futures::future::BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            tokio::time::sleep(self.turn).await;
            Ok(())
        })
    }
}

/// With a low provider rate, attempts wait for their turn instead of timing out: the wait for
/// the turn comes before the handler's time limit starts.
#[sqlx::test]
async fn waiting_for_a_provider_turn_does_not_time_an_attempt_out(pool: PgPool) {
    let registry = arnela::worker::handler::Registry::new()
        .with_default_timeout(Duration::from_millis(200))
        .register(
            TaskType::SendSms,
            Arc::new(SlowTurn {
                turn: Duration::from_millis(600),
            }),
        );
    let e = engine_with(pool.clone(), registry, config(0.0)).await;
    let id = enqueue(&pool, 1, 1).await[0];
    e.relay_once().await;
    assert_eq!(e.step().await, Processed::Succeeded(id));
}

/// The rate limit holds across processes: two limiters on one Redis key (as two worker
/// processes have) never grant two turns closer than the interval.
#[tokio::test]
async fn the_rate_limit_is_shared_by_every_process() {
    use arnela::channel::ratelimit::RateLimiter;
    let prefix = common::unique_prefix();
    let a = Arc::new(RateLimiter::shared(
        20.0,
        common::redis().await,
        &prefix,
        "twilio",
    ));
    let b = Arc::new(RateLimiter::shared(
        20.0,
        common::redis().await,
        &prefix,
        "twilio",
    ));
    let grants = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut callers = Vec::new();
    for i in 0..16 {
        let limiter = if i % 2 == 0 { a.clone() } else { b.clone() };
        let grants = grants.clone();
        callers.push(tokio::spawn(async move {
            limiter.acquire().await.unwrap();
            grants.lock().unwrap().push(std::time::Instant::now());
        }));
    }
    for c in callers {
        c.await.unwrap();
    }
    let mut at = grants.lock().unwrap().clone();
    at.sort();
    // a lower bound only: a slow machine spaces the turns further apart, never closer
    for pair in at.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(gap >= Duration::from_millis(40), "two turns {gap:?} apart");
    }
}

/// The lease renewer locks the task rows it extends in id order, as every transition does: a
/// renewal and an outcome recorded at the same time on the same attempts wait for each other
/// and never deadlock (Postgres would abort one of them after `deadlock_timeout`).
#[sqlx::test]
async fn renewing_leases_while_a_transition_locks_the_same_tasks_does_not_deadlock(pool: PgPool) {
    // enough rows that the renewal's plan looks its tasks up in the order it is given them
    let mut all = enqueue(&pool, 2000, 3).await;
    sqlx::query("ANALYZE tasks").execute(&pool).await.unwrap();
    all.sort_by_key(|id| *id.as_uuid());
    let (low, high) = (all[0], all[all.len() - 1]);
    let ids = vec![low, high];
    let worker = Uuid::now_v7();
    // both attempts running under `worker`'s lease
    sqlx::query(
        "UPDATE tasks SET status = 'running', attempts = 1, lease_owner = $2, \
                lease_expires_at = now() + interval '30 seconds' WHERE id = ANY($1)",
    )
    .bind(&ids)
    .bind(worker)
    .execute(&pool)
    .await
    .unwrap();

    // a transition has locked the first of its rows (in id order) and goes on to the next
    let mut transition = pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM tasks WHERE id = $1 FOR UPDATE")
        .bind(low)
        .execute(&mut *transition)
        .await
        .unwrap();
    // the renewer is handed the attempts in another order
    let renewal = tokio::spawn({
        let pool = pool.clone();
        async move {
            arnela::store::tasks::renew_leases(
                &pool,
                &[(high, 1), (low, 1)],
                worker,
                Duration::from_secs(30),
            )
            .await
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = sqlx::query("SELECT 1 FROM tasks WHERE id = $1 FOR UPDATE")
        .bind(high)
        .execute(&mut *transition)
        .await;
    assert!(second.is_ok(), "the transition deadlocked: {second:?}");
    transition.commit().await.unwrap();
    let mut held = renewal.await.unwrap().expect("the renewal deadlocked");
    held.sort_by_key(|(id, _)| *id.as_uuid());
    assert_eq!(held, vec![(low, 1), (high, 1)], "both leases renewed");
}

/// Runs `step` while every claim fails before it commits (a table its statement reads is renamed
/// away meanwhile).
async fn while_claims_fail<T>(pool: &PgPool, step: impl std::future::Future<Output = T>) -> T {
    sqlx::query("ALTER TABLE task_type_pauses RENAME TO task_type_pauses_away")
        .execute(pool)
        .await
        .unwrap();
    let out = step.await;
    sqlx::query("ALTER TABLE task_type_pauses_away RENAME TO task_type_pauses")
        .execute(pool)
        .await
        .unwrap();
    out
}

/// A claim that failed is settled before the fetcher claims again. Here it failed without
/// committing (a statement of the claim failed), its delivery went back to the queue, and the
/// next step claims that delivery itself: the attempt it starts stays held. Were the failed
/// claim settled only after that (as a settlement running beside the fetcher could be), it would
/// find the new attempt held by this worker and release it while its handler is about to run,
/// and the task would run twice.
#[sqlx::test]
async fn a_failed_claim_is_settled_before_the_fetcher_claims_again(pool: PgPool) {
    let e = engine(pool.clone(), Script::answering(vec![]), config(0.0)).await;
    let id = enqueue(&pool, 1, 3).await[0];
    e.relay_once().await;
    let leases = arnela::worker::lease::Leases::new();
    let mut fetcher = arnela::worker::pool::Fetcher::new(&e.worker, &leases);
    let never = CancellationToken::new();

    assert!(
        while_claims_fail(&pool, fetcher.step(1, &never))
            .await
            .is_err(),
        "the claim fails before it commits"
    );
    assert_eq!(e.status(id).await, "queued");
    assert_eq!(
        e.len(e.keys.tasks()).await,
        1,
        "the delivery is back on the queue"
    );

    let claimed = fetcher.step(1, &never).await.unwrap();
    assert_eq!(claimed.len(), 1, "the returned delivery is claimed again");
    assert_eq!(e.status(id).await, "running");
    assert_eq!(
        fetcher.step(1, &never).await.unwrap().len(),
        0,
        "nothing more to claim, and nothing left to settle"
    );
    assert_eq!(
        e.status(id).await,
        "running",
        "the attempt claimed again is not released"
    );
    assert_eq!(
        e.history(id).await,
        ["enqueued", "dispatched", "attempt_started"]
    );
}

/// A claim that failed just before shutdown is settled when the fetcher finishes: had it
/// committed after all (here the worker claims the returned delivery itself, outside the
/// fetcher, which leaves Postgres as such a claim would), its attempt is released at once instead
/// of staying `running` until its lease and the rescuer's grace for live owners pass.
#[sqlx::test]
async fn a_failed_claim_is_settled_when_the_fetcher_finishes_at_shutdown(pool: PgPool) {
    let e = engine(pool.clone(), Script::answering(vec![]), config(0.0)).await;
    let id = enqueue(&pool, 1, 3).await[0];
    e.relay_once().await;
    let leases = arnela::worker::lease::Leases::new();
    let mut fetcher = arnela::worker::pool::Fetcher::new(&e.worker, &leases);
    let never = CancellationToken::new();
    assert!(
        while_claims_fail(&pool, fetcher.step(1, &never))
            .await
            .is_err(),
        "the claim fails"
    );
    let raws = e.worker.take(1).await.unwrap();
    let (claimed, _) = e.worker.claim(raws).await.unwrap();
    assert_eq!(
        claimed.len(),
        1,
        "held by this worker, as if the claim had committed"
    );

    fetcher.finish().await;
    assert_eq!(e.status(id).await, "queued", "released at shutdown");
    assert_eq!(
        e.history(id).await,
        [
            "enqueued",
            "dispatched",
            "attempt_started",
            "attempt_released"
        ]
    );
}

/// A claim that committed although the worker saw its `COMMIT` fail (Postgres stopped between
/// the two): the worker returned the delivery and forgot the attempt, which its live process
/// would otherwise leave running until the lease and the rescuer's grace for live owners pass.
/// Settling it releases the attempt at once; it then runs once.
#[sqlx::test]
async fn a_claim_whose_commit_the_worker_did_not_hear_is_released_and_runs_once(pool: PgPool) {
    let script = Script::answering(vec![]);
    let e = engine(pool.clone(), script.clone(), config(0.0)).await;
    let id = enqueue(&pool, 1, 3).await[0];
    e.relay_once().await;
    let raws = e.worker.take(1).await.unwrap();
    let (claimed, _) = e.worker.claim(raws.clone()).await.unwrap();
    assert_eq!(claimed.len(), 1, "the claim committed");
    // what the pool does when the claim reports an error: the deliveries go back to the queue
    let mut conn = e.redis.clone();
    queue::return_unstarted(&mut conn, &e.keys, &raws[0])
        .await
        .unwrap();
    assert_eq!(
        e.step().await,
        Processed::Duplicate(id),
        "the attempt is running"
    );

    // an attempt the worker holds (claimed again since) is left alone
    let held = e.worker.settle_unconfirmed(&[(id, 1)], |_| true).await;
    assert_eq!(held.unwrap(), 0);
    assert_eq!(
        e.worker
            .settle_unconfirmed(&[(id, 1)], |_| false)
            .await
            .unwrap(),
        1
    );
    assert_eq!(e.status(id).await, "queued");
    assert_eq!(
        e.worker
            .settle_unconfirmed(&[(id, 1)], |_| false)
            .await
            .unwrap(),
        0,
        "nothing left to settle"
    );
    e.relay_once().await;
    assert_eq!(e.step().await, Processed::Succeeded(id));
    assert_eq!(script.calls().len(), 1);
    assert_eq!(
        e.history(id).await,
        [
            "enqueued",
            "dispatched",
            "attempt_started",
            "attempt_released",
            "dispatched",
            "attempt_started",
            "attempt_succeeded"
        ]
    );
}

/// A renewal that no longer finds a lease stops a running handler, but not one that has ended
/// and whose outcome is on its way to the completer (the renewal raced its recording): that one
/// has nothing to stop.
#[sqlx::test]
async fn a_renewal_stops_running_handlers_only(pool: PgPool) {
    use arnela::worker::lease::Leases;
    let leases = Leases::new();
    // neither attempt is held in the database (no such tasks): both leases count as lost
    let running = leases.hold((TaskId::new(), 1));
    let ended_key = (TaskId::new(), 1);
    let ended = leases.hold(ended_key);
    leases.finished(&ended_key);
    leases
        .renew_once(
            &pool,
            uuid::Uuid::new_v4(),
            std::time::Duration::from_secs(30),
        )
        .await
        .unwrap();
    assert!(running.is_cancelled());
    assert!(!ended.is_cancelled());
    assert!(
        leases.holds(&ended_key),
        "held until the completer releases it"
    );
}
