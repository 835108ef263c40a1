//! Workers: take a delivery from Redis, claim the attempt in Postgres, run the handler under a
//! lease, record the outcome, acknowledge the delivery.
//!
//! **Claim.** A delivery names a task and an attempt. The worker locks the task row and appends
//! `attempt_started` only if the task is waiting, due, within its attempt budget and the
//! delivery is for its next attempt; otherwise the delivery is a duplicate (the relay published
//! twice, Redis was re-seeded) and is dropped and counted. Claiming deletes the task's outbox rows.
//!
//! **Lease and fencing.** The claim sets `lease_owner` (this worker) and `lease_expires_at`; a
//! heartbeat renews it every third of the lease while the handler runs. If a rescuer has taken
//! the attempt over (the worker stalled past its lease), the renewal fails and the handler is
//! stopped; an outcome is only recorded while `lease_owner` is still this worker, so a stale
//! worker can never overwrite a newer attempt.
//!
//! **Outcome.** Success appends `attempt_succeeded` with the handler's result. A failure appends
//! `attempt_failed` and then `retry_scheduled` (with an outbox row due after the backoff) or
//! `dead_lettered` (with a copy on the failed list). A handler over its time limit fails
//! retryably (`timeout`). Only then is the delivery removed from the processing list.
//!
//! **Shutdown.** When the shutdown token fires, workers stop taking deliveries; a delivery taken
//! but not started goes back to the queue. Handlers that are running get until the drain
//! deadline (`hard_stop`); one still running then is stopped and its attempt released
//! (`attempt_released`: queued again with the same attempt number and idempotency key).

pub mod handler;
pub mod log_channel;

use chrono::{DateTime, Utc};
use redis::aio::ConnectionManager;
use sqlx::PgPool;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use crate::domain::{FailureKind, RetryDecision, RetryPolicy, Task, TaskEvent, TaskType};
use crate::queue::{self, Delivery, FailedCopy, Keys, QueueError};
use crate::store::{events, outbox, tasks, StoreError, Tx};
use handler::{HandlerError, Registry, TaskContext};

/// Errors that stop one step of a worker (the loop logs them and carries on).
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Queue(#[from] QueueError),
}

impl From<crate::domain::task::InvalidTransition> for WorkerError {
    fn from(e: crate::domain::task::InvalidTransition) -> Self {
        WorkerError::Store(e.into())
    }
}

impl From<redis::RedisError> for WorkerError {
    fn from(e: redis::RedisError) -> Self {
        WorkerError::Queue(e.into())
    }
}

impl From<sqlx::Error> for WorkerError {
    fn from(e: sqlx::Error) -> Self {
        WorkerError::Store(e.into())
    }
}

pub type Result<T, E = WorkerError> = std::result::Result<T, E>;

/// Source of the uniform draw for backoff jitter (injected in tests).
pub type Jitter = Arc<dyn Fn() -> f64 + Send + Sync>;

/// Worker settings.
#[derive(Clone)]
pub struct WorkerConfig {
    /// How long a claim lasts without a heartbeat.
    pub lease: Duration,
    /// How long one `BLMOVE` waits for a delivery.
    pub block: Duration,
    pub retry: RetryPolicy,
    pub jitter: Jitter,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            lease: Duration::from_secs(30),
            block: Duration::from_secs(1),
            retry: RetryPolicy::default(),
            jitter: Arc::new(rand::random::<f64>),
        }
    }
}

/// Counters of one process's workers.
#[derive(Debug, Default)]
pub struct WorkerStats {
    pub succeeded: AtomicU64,
    pub failed: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub duplicates: AtomicU64,
    pub fenced: AtomicU64,
    pub released: AtomicU64,
    pub undecodable: AtomicU64,
    /// Handlers running right now.
    pub active: AtomicI64,
}

/// What one step did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Processed {
    /// No delivery arrived within the block time.
    Idle,
    Succeeded(Uuid),
    /// Failed; the next attempt is scheduled.
    Retrying(Uuid),
    DeadLettered(Uuid),
    /// The delivery was for an attempt that cannot start (already running, finished, cancelled,
    /// not yet due): dropped.
    Duplicate(Uuid),
    /// The worker lost its lease before it could record the outcome: nothing was recorded.
    Fenced(Uuid),
    /// Shutdown stopped the handler; the attempt was released to run again.
    Released(Uuid),
    /// Shutdown began after the delivery was taken: it went back to the queue unstarted.
    Returned(Uuid),
    /// The task was cancelled while the attempt ran: its outcome was recorded, nothing more.
    CancelledWhileRunning(Uuid),
    /// The delivery could not be decoded; it was moved to the failed list.
    Undecodable,
}

/// One worker: one Redis connection of its own for the blocking take.
pub struct Worker {
    pub id: Uuid,
    pool: PgPool,
    /// Dedicated to this worker: `BLMOVE` blocks the connection it runs on.
    blocking: ConnectionManager,
    keys: Keys,
    registry: Arc<Registry>,
    config: WorkerConfig,
    stats: Arc<WorkerStats>,
}

enum Ending {
    Done(std::result::Result<serde_json::Value, HandlerError>),
    TimedOut(Duration),
    LeaseLost,
    Interrupted,
}

impl Worker {
    pub fn new(
        pool: PgPool,
        blocking: ConnectionManager,
        keys: Keys,
        registry: Arc<Registry>,
        config: WorkerConfig,
        stats: Arc<WorkerStats>,
    ) -> Worker {
        Worker {
            id: Uuid::new_v4(),
            pool,
            blocking,
            keys,
            registry,
            config,
            stats,
        }
    }

    /// Takes at most one delivery and sees it through. `shutdown` stops new work from starting;
    /// `hard_stop` interrupts a running handler.
    pub async fn process_next(
        &self,
        shutdown: &CancellationToken,
        hard_stop: &CancellationToken,
    ) -> Result<Processed> {
        let mut conn = self.blocking.clone();
        let Some(raw) = queue::take(&mut conn, &self.keys, self.config.block).await? else {
            return Ok(Processed::Idle);
        };
        let Some(delivery) = Delivery::decode(&raw) else {
            return self.undecodable(&mut conn, &raw).await;
        };
        if shutdown.is_cancelled() {
            queue::return_unstarted(&mut conn, &self.keys, &raw).await?;
            return Ok(Processed::Returned(delivery.task_id));
        }
        let span = tracing::info_span!(
            "delivery",
            task.id = %delivery.task_id,
            task.r#type = %delivery.task_type,
            attempt = delivery.attempt
        );
        self.deliver(&raw, &delivery, &mut conn, hard_stop)
            .instrument(span)
            .await
    }

    async fn deliver(
        &self,
        raw: &str,
        delivery: &Delivery,
        conn: &mut ConnectionManager,
        hard_stop: &CancellationToken,
    ) -> Result<Processed> {
        let id = delivery.task_id;
        let (task, task_type) = match self.claim(delivery).await? {
            Claim::Started(task, t) => (task, t),
            Claim::Refused => {
                self.stats.duplicates.fetch_add(1, Ordering::Relaxed);
                tracing::debug!("duplicate delivery dropped");
                queue::ack(conn, &self.keys, raw).await?;
                return Ok(Processed::Duplicate(id));
            }
            Claim::DeadLettered(copy) => {
                queue::push_failed(conn, &self.keys, &copy).await?;
                queue::ack(conn, &self.keys, raw).await?;
                self.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
                return Ok(Processed::DeadLettered(id));
            }
        };

        let attempt = task.attempts;
        let ctx = TaskContext {
            task_id: id,
            task_type,
            attempt,
            payload: task.payload.clone(),
            idempotency_key: format!("{id}:{attempt}"),
        };
        let started = Instant::now();
        self.stats.active.fetch_add(1, Ordering::Relaxed);
        let ending = self.run_handler(&ctx, hard_stop).await;
        self.stats.active.fetch_sub(1, Ordering::Relaxed);
        let duration_ms = started.elapsed().as_millis() as i64;

        let processed = self.record(&ctx, ending, duration_ms, conn).await?;
        queue::ack(conn, &self.keys, raw).await?;
        Ok(processed)
    }

    async fn undecodable(&self, conn: &mut ConnectionManager, raw: &str) -> Result<Processed> {
        self.stats.undecodable.fetch_add(1, Ordering::Relaxed);
        tracing::error!(
            entry.len = raw.len(),
            "undecodable delivery moved to the failed list"
        );
        queue::push_failed_raw(conn, &self.keys, raw, "undecodable delivery").await?;
        queue::ack(conn, &self.keys, raw).await?;
        Ok(Processed::Undecodable)
    }

    async fn claim(&self, d: &Delivery) -> Result<Claim> {
        let mut tx = Tx::begin(&self.pool).await?;
        let Some((row, now)) = tasks::lock_with_now(&mut tx, d.task_id).await? else {
            return Ok(Claim::Refused);
        };
        let task = row.to_task()?;
        if d.attempt != task.next_attempt() {
            return Ok(Claim::Refused);
        }
        let task_type = task.task_type;
        if self.registry.handler(task_type).is_none() {
            let reason = format!("no handler is registered for task type {task_type}");
            let event = match task.dead_letter(reason.clone()) {
                Ok(e) => e,
                Err(_) => return Ok(Claim::Refused),
            };
            events::record(&mut tx, &task, &row.last_hash, &[event], now).await?;
            outbox::delete_for_task(&mut tx, task.id).await?;
            tx.commit().await?;
            return Ok(Claim::DeadLettered(failed_copy(&task, reason, now)));
        }
        let lease_until = now + chrono::Duration::from_std(self.config.lease).unwrap_or_default();
        let Ok(event) = task.start_attempt(self.id, now, lease_until) else {
            return Ok(Claim::Refused);
        };
        let after = events::record(&mut tx, &task, &row.last_hash, &[event], now).await?;
        outbox::delete_for_task(&mut tx, task.id).await?;
        tx.commit().await?;
        Ok(Claim::Started(after, task_type))
    }

    async fn run_handler(&self, ctx: &TaskContext, hard_stop: &CancellationToken) -> Ending {
        let handler = self
            .registry
            .handler(ctx.task_type)
            .expect("the claim checked the handler exists");
        let limit = self.registry.timeout(ctx.task_type);
        let work = tokio::time::timeout(limit, handler.handle(ctx));
        let heartbeat = self.heartbeat(ctx.task_id);
        tokio::select! {
            r = work => match r {
                Ok(result) => Ending::Done(result),
                Err(_) => Ending::TimedOut(limit),
            },
            () = heartbeat => Ending::LeaseLost,
            () = hard_stop.cancelled() => Ending::Interrupted,
        }
    }

    /// Renews the lease every third of its length; returns only when it is lost.
    async fn heartbeat(&self, task: Uuid) {
        let every = self.config.lease / 3;
        loop {
            tokio::time::sleep(every).await;
            match tasks::renew_lease(&self.pool, task, self.id, self.config.lease).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!(task.id = %task, "lease lost; stopping the handler");
                    return;
                }
                // A failed renewal is not a lost lease: try again next beat (the lease has
                // two more beats of slack).
                Err(e) => tracing::warn!(task.id = %task, error = %e, "lease renewal failed"),
            }
        }
    }

    async fn record(
        &self,
        ctx: &TaskContext,
        ending: Ending,
        duration_ms: i64,
        conn: &mut ConnectionManager,
    ) -> Result<Processed> {
        let id = ctx.task_id;
        let mut tx = Tx::begin(&self.pool).await?;
        let Some((row, now)) = tasks::lock_with_now(&mut tx, id).await? else {
            return Err(StoreError::NotFound(id).into());
        };
        let task = row.to_task()?;
        if !task.is_held_by(self.id, ctx.attempt) {
            self.stats.fenced.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(task.id = %id, attempt = ctx.attempt, "lease was taken over; outcome not recorded");
            return Ok(Processed::Fenced(id));
        }
        let cancelled = task.status == crate::domain::TaskStatus::Cancelled;
        let (events, processed) = match ending {
            Ending::Done(Ok(_))
            | Ending::Done(Err(_))
            | Ending::TimedOut(_)
            | Ending::Interrupted
                if cancelled =>
            {
                let event = match ending {
                    Ending::Done(Ok(result)) => task.succeed(result, duration_ms)?,
                    _ => task
                        .fail(
                            FailureKind::Retryable,
                            "the attempt did not succeed after the task was cancelled".into(),
                            duration_ms,
                            now,
                            RetryDecision::DeadLetter,
                        )?
                        .remove(0),
                };
                (vec![event], Processed::CancelledWhileRunning(id))
            }
            Ending::Done(Ok(result)) => (
                vec![task.succeed(result, duration_ms)?],
                Processed::Succeeded(id),
            ),
            Ending::Interrupted => (
                vec![task.release("the worker shut down before the handler finished".into())?],
                Processed::Released(id),
            ),
            Ending::LeaseLost => {
                // renewal said the lease is gone, but the row says it is ours: the attempt was
                // ended meanwhile by the rescuer and re-claimed by us is impossible; treat as
                // fenced to be safe.
                self.stats.fenced.fetch_add(1, Ordering::Relaxed);
                return Ok(Processed::Fenced(id));
            }
            Ending::Done(Err(err)) => {
                let (kind, retry_after) = match &err {
                    HandlerError::Retryable { retry_after, .. } => {
                        (FailureKind::Retryable, *retry_after)
                    }
                    HandlerError::Permanent { .. } => (FailureKind::Permanent, None),
                };
                self.failure(&task, kind, err.to_string(), retry_after, duration_ms, now)?
            }
            Ending::TimedOut(limit) => self.failure(
                &task,
                FailureKind::Timeout,
                format!("the handler did not finish within {limit:?}"),
                None,
                duration_ms,
                now,
            )?,
        };
        let after = events::record(&mut tx, &task, &row.last_hash, &events, now).await?;
        let mut dead = None;
        for e in &events {
            match e {
                TaskEvent::RetryScheduled {
                    next_attempt,
                    available_at,
                    ..
                } => outbox::insert(&mut tx, id, *next_attempt, *available_at).await?,
                TaskEvent::AttemptReleased { attempt, .. } => {
                    outbox::insert(&mut tx, id, *attempt, now).await?
                }
                TaskEvent::DeadLettered { reason } => {
                    dead = Some(failed_copy(&after, reason.clone(), now))
                }
                _ => {}
            }
        }
        tx.commit().await?;
        match &processed {
            Processed::Succeeded(_) => self.stats.succeeded.fetch_add(1, Ordering::Relaxed),
            Processed::Released(_) => self.stats.released.fetch_add(1, Ordering::Relaxed),
            Processed::CancelledWhileRunning(_) => 0,
            _ => self.stats.failed.fetch_add(1, Ordering::Relaxed),
        };
        if let Some(copy) = dead {
            self.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
            queue::push_failed(conn, &self.keys, &copy).await?;
        }
        Ok(processed)
    }

    fn failure(
        &self,
        task: &Task,
        kind: FailureKind,
        error: String,
        retry_after: Option<Duration>,
        duration_ms: i64,
        now: DateTime<Utc>,
    ) -> Result<(Vec<TaskEvent>, Processed)> {
        let decision = retry_decision(&self.config, task.attempts, retry_after);
        let events = task.fail(kind, error, duration_ms, now, decision)?;
        let processed = if events
            .iter()
            .any(|e| matches!(e, TaskEvent::RetryScheduled { .. }))
        {
            Processed::Retrying(task.id)
        } else {
            Processed::DeadLettered(task.id)
        };
        Ok((events, processed))
    }
}

enum Claim {
    Started(Task, TaskType),
    Refused,
    DeadLettered(FailedCopy),
}

/// The retry policy's answer for a failed `attempt`.
pub fn retry_decision(
    config: &WorkerConfig,
    attempt: i32,
    retry_after: Option<Duration>,
) -> RetryDecision {
    let requested = retry_after.map(|d| d.as_millis().min(i64::MAX as u128) as i64);
    RetryDecision::RetryAfterMs(config.retry.delay_ms(attempt, (config.jitter)(), requested))
}

/// The operator's copy of a dead-lettered task.
pub fn failed_copy(task: &Task, reason: String, at: DateTime<Utc>) -> FailedCopy {
    FailedCopy {
        task_id: task.id,
        task_type: task.task_type.to_string(),
        attempts: task.attempts,
        reason,
        failed_at: at,
    }
}

/// A pool of workers in this process, with a heartbeat so `/health` can count live workers.
pub struct WorkerPool {
    pub workers: Vec<Worker>,
    pub stats: Arc<WorkerStats>,
    pub process_id: Uuid,
    heartbeats: ConnectionManager,
    keys: Keys,
}

impl WorkerPool {
    /// Builds `n` workers, each with its own blocking Redis connection.
    pub async fn build(
        n: usize,
        pool: PgPool,
        redis_info: redis::ConnectionInfo,
        keys: Keys,
        registry: Registry,
        config: WorkerConfig,
    ) -> Result<WorkerPool> {
        let registry = Arc::new(registry);
        let stats = Arc::new(WorkerStats::default());
        // A blocking take may hold its connection for `block`; allow that plus a margin.
        let timeout = config.block + Duration::from_secs(5);
        let mut workers = Vec::with_capacity(n);
        for _ in 0..n {
            let conn = queue::connect_with_timeout(redis_info.clone(), timeout).await?;
            workers.push(Worker::new(
                pool.clone(),
                conn,
                keys.clone(),
                registry.clone(),
                config.clone(),
                stats.clone(),
            ));
        }
        let heartbeats = queue::connect(redis_info).await?;
        Ok(WorkerPool {
            workers,
            stats,
            process_id: Uuid::new_v4(),
            heartbeats,
            keys,
        })
    }

    /// Runs every worker until `shutdown`; then lets running handlers finish for up to `drain`,
    /// releases those that did not, and returns once every worker has stopped.
    pub async fn run(self, shutdown: CancellationToken, drain: Duration) {
        let hard_stop = CancellationToken::new();
        let n = self.workers.len();
        let mut set = tokio::task::JoinSet::new();
        for worker in self.workers {
            let shutdown = shutdown.clone();
            let hard_stop = hard_stop.clone();
            set.spawn(async move { worker_loop(worker, shutdown, hard_stop).await });
        }
        let beat = heartbeat_loop(
            self.heartbeats.clone(),
            self.keys.clone(),
            self.process_id,
            n,
            shutdown.clone(),
        );
        let beat = tokio::spawn(beat);

        shutdown.cancelled().await;
        tracing::info!(workers = n, ?drain, "draining workers");
        let deadline = tokio::time::sleep(drain);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                joined = set.join_next() => match joined {
                    None => break,
                    Some(Err(e)) => tracing::error!(error = %e, "a worker task panicked"),
                    Some(Ok(())) => {}
                },
                () = &mut deadline, if !hard_stop.is_cancelled() => {
                    tracing::warn!("drain deadline passed; releasing unfinished attempts");
                    hard_stop.cancel();
                }
            }
        }
        if let Err(e) = beat.await {
            tracing::error!(error = %e, "heartbeat task panicked");
        }
        let mut conn = self.heartbeats;
        if let Err(e) = queue::worker_heartbeat_stop(&mut conn, &self.keys, self.process_id).await {
            tracing::warn!(error = %e, "cannot remove the worker heartbeat");
        }
        tracing::info!("workers stopped");
    }
}

async fn worker_loop(worker: Worker, shutdown: CancellationToken, hard_stop: CancellationToken) {
    let mut failures = 0u32;
    while !shutdown.is_cancelled() {
        match worker.process_next(&shutdown, &hard_stop).await {
            Ok(_) => failures = 0,
            Err(e) => {
                failures += 1;
                tracing::error!(worker = %worker.id, error = %e, "worker step failed");
                // back off while a dependency is down, but stay responsive to shutdown
                let pause = Duration::from_millis(100 * u64::from(failures.min(50)));
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    () = shutdown.cancelled() => {}
                }
            }
        }
    }
}

/// How often a worker process announces it is alive, and how long the announcement lasts.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(5);
pub const HEARTBEAT_TTL: Duration = Duration::from_secs(15);

async fn heartbeat_loop(
    mut conn: ConnectionManager,
    keys: Keys,
    process: Uuid,
    workers: usize,
    shutdown: CancellationToken,
) {
    loop {
        if let Err(e) =
            queue::worker_heartbeat(&mut conn, &keys, process, workers, HEARTBEAT_TTL).await
        {
            tracing::warn!(error = %e, "worker heartbeat failed");
        }
        tokio::select! {
            () = tokio::time::sleep(HEARTBEAT_EVERY) => {}
            () = shutdown.cancelled() => return,
        }
    }
}
