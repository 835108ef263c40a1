//! Workers: take a delivery from Redis, claim the attempt in Postgres, run the handler under a
//! lease, record the outcome, acknowledge the delivery.
//!
//! **Claim.** A delivery names a task and an attempt. The worker locks the task row and appends
//! `attempt_started` only if the task is waiting, due, within its attempt budget and the
//! delivery is for its next attempt; otherwise the delivery is a duplicate (the relay published
//! twice, Redis was re-seeded) and is dropped and counted. Claiming deletes the task's outbox rows.
//! A delivery whose task is not in this database at all is never dropped: it is logged, counted
//! (`arnela_deliveries_skipped_total{reason="task_not_found"}`) and put back at the far end of
//! the queue for the deployment whose database holds it; a batch of nothing else makes the
//! worker back off (10 ms doubling to 1 s) rather than take the same deliveries at full speed.
//! Before taking deliveries a worker checks that the Redis namespace serves its database (see
//! [`crate::binding`]).
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
mod skip;

use chrono::{DateTime, Utc};
use futures::FutureExt;
use redis::aio::ConnectionManager;
use sqlx::PgPool;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use crate::binding::{Binding, BindingError};
use crate::domain::{FailureKind, RetryDecision, RetryPolicy, Task, TaskEvent, TaskStatus};
use crate::metrics::Metrics;
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
    /// The Redis namespace serves another database: nothing is taken.
    #[error(transparent)]
    Binding(#[from] BindingError),
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
    /// The delivery's task is not in this database: it was put back on the queue for the
    /// deployment whose database holds it.
    Skipped(Uuid),
}

/// Takes deliveries, claims them, runs their handlers and records their outcomes. A
/// [`WorkerPool`] runs one `Worker` with many handlers at once; tests drive it one delivery at a
/// time with [`Worker::process_next`].
pub struct Worker {
    /// The lease owner of every attempt this worker claims.
    pub id: Uuid,
    pool: PgPool,
    /// Dedicated to the blocking take (`BLMOVE` blocks the connection it runs on).
    blocking: ConnectionManager,
    /// For everything else (acknowledgements, failed copies).
    commands: ConnectionManager,
    keys: Keys,
    registry: Arc<Registry>,
    config: WorkerConfig,
    stats: Arc<WorkerStats>,
    metrics: Metrics,
    /// Checked before every take (see [`Binding::verify`]).
    binding: Binding,
    /// Consecutive batches of nothing but deliveries of unknown tasks.
    skip_streak: AtomicU32,
}

/// A claimed attempt, ready to run.
#[derive(Clone)]
pub struct Claimed {
    raw: String,
    pub ctx: TaskContext,
}

/// How a handler run ended.
#[derive(Clone)]
pub enum Ending {
    Done(std::result::Result<serde_json::Value, HandlerError>),
    TimedOut(Duration),
    LeaseLost,
    Interrupted,
}

/// A finished run, waiting to be recorded.
#[derive(Clone)]
pub struct Finished {
    pub claimed: Claimed,
    pub ending: Ending,
    pub duration_ms: i64,
}

enum Decision {
    Start(TaskEvent),
    DeadLetter(TaskEvent, String),
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
        Worker::with_connections(
            pool,
            blocking.clone(),
            blocking,
            keys,
            registry,
            config,
            stats,
        )
    }

    /// A worker with separate connections for the blocking take and other commands (needed when
    /// acknowledgements run while a take is blocking).
    pub fn with_connections(
        pool: PgPool,
        blocking: ConnectionManager,
        commands: ConnectionManager,
        keys: Keys,
        registry: Arc<Registry>,
        config: WorkerConfig,
        stats: Arc<WorkerStats>,
    ) -> Worker {
        Worker {
            id: Uuid::new_v4(),
            binding: Binding::new(pool.clone(), keys.clone()),
            skip_streak: AtomicU32::new(0),
            pool,
            blocking,
            commands,
            keys,
            registry,
            config,
            stats,
            metrics: Metrics::new(),
        }
    }

    /// Records finished attempts in `metrics` (by default in a registry of the worker's own).
    pub fn with_metrics(mut self, metrics: Metrics) -> Worker {
        self.metrics = metrics;
        self
    }

    /// Takes at most one delivery and sees it through. `shutdown` stops new work from starting;
    /// `hard_stop` interrupts a running handler.
    pub async fn process_next(
        &self,
        shutdown: &CancellationToken,
        hard_stop: &CancellationToken,
    ) -> Result<Processed> {
        let raws = self.take(1).await?;
        let Some(raw) = raws.into_iter().next() else {
            return Ok(Processed::Idle);
        };
        if shutdown.is_cancelled() {
            let id = Delivery::decode(&raw)
                .map(|d| d.task_id)
                .unwrap_or_default();
            let mut conn = self.commands.clone();
            queue::return_unstarted(&mut conn, &self.keys, &raw).await?;
            return Ok(Processed::Returned(id));
        }
        let (mut claimed, refused) = self.claim(vec![raw]).await?;
        let Some(claimed) = claimed.pop() else {
            return Ok(refused.into_iter().next().unwrap_or(Processed::Idle));
        };
        let lease_lost = CancellationToken::new();
        let heartbeat =
            self.heartbeat(claimed.ctx.task_id, claimed.ctx.attempt, lease_lost.clone());
        let (finished, ()) = tokio::join!(
            async {
                let f = self.execute(claimed, &lease_lost, hard_stop).await;
                lease_lost.cancel();
                f
            },
            heartbeat
        );
        let mut processed = self.complete(vec![finished]).await?;
        Ok(processed.remove(0))
    }

    /// Takes up to `max` deliveries onto the processing list: waits up to the block time for the
    /// first, then takes only what is already waiting.
    pub async fn take(&self, max: usize) -> Result<Vec<String>> {
        self.binding.verify(&mut self.commands.clone()).await?;
        let mut conn = self.blocking.clone();
        let Some(first) = queue::take(&mut conn, &self.keys, self.config.block).await? else {
            return Ok(Vec::new());
        };
        let mut raws = vec![first];
        if max > 1 {
            raws.extend(queue::take_waiting(&mut conn, &self.keys, max - 1).await?);
        }
        Ok(raws)
    }

    /// Claims the attempts the deliveries name, in one transaction. Returns the claimed attempts
    /// and what happened to the others (duplicates, undecodable entries, types without a
    /// handler), which are acknowledged here.
    pub async fn claim(&self, raws: Vec<String>) -> Result<(Vec<Claimed>, Vec<Processed>)> {
        let mut conn = self.commands.clone();
        let mut done = Vec::new();
        let mut deliveries = Vec::with_capacity(raws.len());
        for raw in raws {
            match Delivery::decode(&raw) {
                Some(d) => deliveries.push((raw, d)),
                None => done.push(self.undecodable(&mut conn, &raw).await?),
            }
        }
        if deliveries.is_empty() {
            return Ok((Vec::new(), done));
        }
        let mut ids: Vec<Uuid> = deliveries.iter().map(|(_, d)| d.task_id).collect();
        ids.sort();
        ids.dedup();

        let mut tx = Tx::begin(&self.pool).await?;
        let rows = tasks::lock_many(&mut tx, &ids).await?;
        let now = tasks::db_now(&mut tx).await?;
        let lease_until = now + chrono::Duration::from_std(self.config.lease).unwrap_or_default();
        let by_id: HashMap<Uuid, &tasks::TaskRow> = rows.iter().map(|r| (r.id, r)).collect();
        let mut seen = HashSet::new();
        let mut items = Vec::new();
        let mut decided = Vec::new();
        let mut refused = Vec::new();
        let mut unknown = Vec::new();
        for (raw, d) in deliveries {
            let decision = match by_id.get(&d.task_id) {
                None => {
                    unknown.push((raw, d.task_id));
                    continue;
                }
                Some(row) if seen.insert(d.task_id) => {
                    // an unreadable row is refused here, not allowed to fail the whole batch
                    let task = match row.to_task() {
                        Ok(t) => t,
                        Err(e) => {
                            tracing::error!(error = %e, "refusing a delivery of an unreadable task");
                            refused.push((raw, d.task_id));
                            continue;
                        }
                    };
                    let decision = self.decide_claim(&task, &d, now, lease_until);
                    decision.map(|dec| (task, row.last_hash.clone(), dec))
                }
                _ => None,
            };
            match decision {
                Some((task, hash, dec)) => {
                    let event = match &dec {
                        Decision::Start(e) | Decision::DeadLetter(e, _) => e.clone(),
                    };
                    items.push((task, hash, vec![event]));
                    decided.push((raw, dec));
                }
                None => refused.push((raw, d.task_id)),
            }
        }
        let afters = events::record_batch(&mut tx, &items, now).await?;
        let started_ids: Vec<Uuid> = afters.iter().map(|t| t.id).collect();
        outbox::delete_for_tasks(&mut tx, &started_ids).await?;
        tx.commit().await?;

        let mut claimed = Vec::new();
        for ((raw, dec), after) in decided.into_iter().zip(afters) {
            match dec {
                Decision::Start(_) => {
                    let attempt = after.attempts;
                    let id = after.id;
                    claimed.push(Claimed {
                        raw,
                        ctx: TaskContext {
                            task_id: id,
                            task_type: after.task_type,
                            attempt,
                            payload: after.payload,
                            idempotency_key: format!("{id}:{attempt}"),
                        },
                    });
                }
                Decision::DeadLetter(_, reason) => {
                    // The claims are committed: a Redis error from here on must not drop them
                    // (the rescuer cleans the processing entry later).
                    let copy = failed_copy(&after, reason, now);
                    if let Err(e) = queue::push_failed(&mut conn, &self.keys, &copy).await {
                        tracing::error!(task.id = %after.id, error = %e, "cannot copy a dead letter to the failed list");
                    } else if let Err(e) = queue::ack(&mut conn, &self.keys, &raw).await {
                        tracing::error!(task.id = %after.id, error = %e, "cannot acknowledge a delivery");
                    }
                    self.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
                    done.push(Processed::DeadLettered(after.id));
                }
            }
        }
        if !refused.is_empty() {
            let raws: Vec<&str> = refused.iter().map(|(r, _)| r.as_str()).collect();
            if let Err(e) = queue::ack_many(&mut conn, &self.keys, &raws).await {
                tracing::error!(error = %e, "cannot acknowledge duplicate deliveries");
            }
            for (_, id) in refused {
                self.stats.duplicates.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(task.id = %id, "duplicate delivery dropped");
                done.push(Processed::Duplicate(id));
            }
        }
        done.extend(self.leave_unknown(&mut conn, unknown).await);
        self.pause_if_only_skipped(&claimed, &done).await;
        Ok((claimed, done))
    }

    /// Whether a delivery may start its attempt now; `None` for a duplicate.
    fn decide_claim(
        &self,
        task: &Task,
        d: &Delivery,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
    ) -> Option<Decision> {
        if d.attempt != task.next_attempt() {
            return None;
        }
        if self.registry.handler(task.task_type).is_none() {
            let reason = format!("no handler is registered for task type {}", task.task_type);
            let event = task.dead_letter(reason.clone()).ok()?;
            return Some(Decision::DeadLetter(event, reason));
        }
        task.start_attempt(self.id, now, lease_until)
            .ok()
            .map(Decision::Start)
    }

    /// Runs the handler of a claimed attempt under its time limit, until it ends, the lease is
    /// lost or `hard_stop` fires.
    pub async fn execute(
        &self,
        claimed: Claimed,
        lease_lost: &CancellationToken,
        hard_stop: &CancellationToken,
    ) -> Finished {
        let ctx = &claimed.ctx;
        let span = tracing::info_span!(
            "attempt",
            task.id = %ctx.task_id,
            task.r#type = %ctx.task_type,
            attempt = ctx.attempt
        );
        let started = Instant::now();
        self.stats.active.fetch_add(1, Ordering::Relaxed);
        let ending = match self.registry.handler(ctx.task_type) {
            None => Ending::Done(Err(HandlerError::permanent(
                "no handler for this task type",
            ))),
            Some(handler) => {
                let limit = self.registry.timeout(ctx.task_type);
                // a panicking handler fails its attempt (retryably) instead of the worker
                let guarded = std::panic::AssertUnwindSafe(handler.handle(ctx)).catch_unwind();
                let work = tokio::time::timeout(limit, guarded).instrument(span);
                tokio::select! {
                    r = work => match r {
                        Ok(Ok(result)) => Ending::Done(result),
                        Ok(Err(_)) => Ending::Done(Err(HandlerError::retryable("the handler panicked"))),
                        Err(_) => Ending::TimedOut(limit),
                    },
                    () = lease_lost.cancelled() => Ending::LeaseLost,
                    () = hard_stop.cancelled() => Ending::Interrupted,
                }
            }
        };
        self.stats.active.fetch_sub(1, Ordering::Relaxed);
        Finished {
            claimed,
            ending,
            duration_ms: started.elapsed().as_millis() as i64,
        }
    }

    /// Renews one attempt's lease every third of its length until `stop` fires; fires `stop`
    /// itself when the lease is lost.
    async fn heartbeat(&self, task: Uuid, attempt: i32, stop: CancellationToken) {
        let every = self.config.lease / 3;
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
            match tasks::renew_leases(&self.pool, &[(task, attempt)], self.id, self.config.lease)
                .await
            {
                Ok(held) if held.is_empty() => {
                    tracing::warn!(task.id = %task, "lease lost; stopping the handler");
                    stop.cancel();
                    return;
                }
                Ok(_) => {}
                // A failed renewal is not a lost lease: try again next beat (the lease has
                // two more beats of slack).
                Err(e) => tracing::warn!(task.id = %task, error = %e, "lease renewal failed"),
            }
        }
    }

    /// Records the outcomes of finished runs in one transaction, then acknowledges their
    /// deliveries. An outcome is recorded only while this worker still holds the attempt.
    pub async fn complete(&self, finished: Vec<Finished>) -> Result<Vec<Processed>> {
        if finished.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<Uuid> = finished.iter().map(|f| f.claimed.ctx.task_id).collect();
        let mut tx = Tx::begin(&self.pool).await?;
        let rows = tasks::lock_many(&mut tx, &ids).await?;
        let now = tasks::db_now(&mut tx).await?;
        let by_id: HashMap<Uuid, &tasks::TaskRow> = rows.iter().map(|r| (r.id, r)).collect();

        let mut processed = Vec::with_capacity(finished.len());
        let mut items = Vec::new();
        for f in &finished {
            let id = f.claimed.ctx.task_id;
            // a missing or unreadable row records nothing (the others in the batch still are)
            let Some(task) = by_id.get(&id).and_then(|row| match row.to_task() {
                Ok(t) => Some(t),
                Err(e) => {
                    tracing::error!(error = %e, "cannot record the outcome of an unreadable task");
                    None
                }
            }) else {
                processed.push(Processed::Fenced(id));
                continue;
            };
            let row = by_id[&id];
            match self.outcome(&task, f, now)? {
                Some((events, p)) => {
                    items.push((task, row.last_hash.clone(), events));
                    processed.push(p);
                }
                None => processed.push(Processed::Fenced(id)),
            }
        }
        let afters = events::record_batch(&mut tx, &items, now).await?;
        let mut deliveries = Vec::new();
        let mut copies = Vec::new();
        for ((_, _, evs), after) in items.iter().zip(&afters) {
            for e in evs {
                match e {
                    TaskEvent::RetryScheduled {
                        next_attempt,
                        available_at,
                        ..
                    } => deliveries.push((after.id, *next_attempt, *available_at)),
                    TaskEvent::AttemptReleased { attempt, .. } => {
                        deliveries.push((after.id, *attempt, now))
                    }
                    TaskEvent::DeadLettered { reason } => {
                        copies.push(failed_copy(after, reason.clone(), now))
                    }
                    _ => {}
                }
            }
        }
        outbox::insert_many(&mut tx, &deliveries).await?;
        tx.commit().await?;
        for (f, p) in finished.iter().zip(&processed) {
            if let Some(outcome) = attempt_outcome(p) {
                let took = Duration::from_millis(f.duration_ms.max(0) as u64);
                self.metrics
                    .observe_attempt(f.claimed.ctx.task_type, outcome, took);
            }
        }

        let mut conn = self.commands.clone();
        for copy in &copies {
            queue::push_failed(&mut conn, &self.keys, copy).await?;
        }
        let raws: Vec<&str> = finished.iter().map(|f| f.claimed.raw.as_str()).collect();
        queue::ack_many(&mut conn, &self.keys, &raws).await?;
        for p in &processed {
            let counter = match p {
                Processed::Succeeded(_) => &self.stats.succeeded,
                Processed::Released(_) => &self.stats.released,
                Processed::Fenced(_) => &self.stats.fenced,
                Processed::DeadLettered(_) => &self.stats.dead_lettered,
                Processed::CancelledWhileRunning(_) => continue,
                _ => &self.stats.failed,
            };
            counter.fetch_add(1, Ordering::Relaxed);
        }
        Ok(processed)
    }

    /// The events that record a finished run, or `None` if this worker no longer holds the
    /// attempt (fencing).
    fn outcome(
        &self,
        task: &Task,
        f: &Finished,
        now: DateTime<Utc>,
    ) -> Result<Option<(Vec<TaskEvent>, Processed)>> {
        let id = task.id;
        if !task.is_held_by(self.id, f.claimed.ctx.attempt) {
            tracing::warn!(task.id = %id, attempt = f.claimed.ctx.attempt, "lease was taken over; outcome not recorded");
            return Ok(None);
        }
        let duration_ms = f.duration_ms;
        if task.status == TaskStatus::Cancelled {
            let event = match &f.ending {
                Ending::Done(Ok(result)) => task.succeed(result.clone(), duration_ms)?,
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
            return Ok(Some((vec![event], Processed::CancelledWhileRunning(id))));
        }
        let result = match &f.ending {
            Ending::Done(Ok(result)) => (
                vec![task.succeed(result.clone(), duration_ms)?],
                Processed::Succeeded(id),
            ),
            Ending::Interrupted => (
                vec![task.release("the worker shut down before the handler finished".into())?],
                Processed::Released(id),
            ),
            // The renewal found the lease gone although the row still names this worker: a
            // rescuer is about to take the attempt over. Record nothing.
            Ending::LeaseLost => return Ok(None),
            Ending::Done(Err(err)) => {
                let (kind, retry_after) = match err {
                    HandlerError::Retryable { retry_after, .. } => {
                        (FailureKind::Retryable, *retry_after)
                    }
                    HandlerError::Permanent { .. } => (FailureKind::Permanent, None),
                };
                self.failure(task, kind, err.to_string(), retry_after, duration_ms, now)?
            }
            Ending::TimedOut(limit) => self.failure(
                task,
                FailureKind::Timeout,
                format!("the handler did not finish within {limit:?}"),
                None,
                duration_ms,
                now,
            )?,
        };
        Ok(Some(result))
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

/// The bounded metric label of a finished attempt's outcome (`None` for what is not an attempt).
pub fn attempt_outcome(p: &Processed) -> Option<&'static str> {
    Some(match p {
        Processed::Succeeded(_) => "succeeded",
        Processed::Retrying(_) => "retrying",
        Processed::DeadLettered(_) => "dead_lettered",
        Processed::Released(_) => "released",
        Processed::Fenced(_) => "fenced",
        Processed::CancelledWhileRunning(_) => "cancelled",
        Processed::Idle
        | Processed::Duplicate(_)
        | Processed::Returned(_)
        | Processed::Undecodable
        | Processed::Skipped(_) => return None,
    })
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

/// The workers of one process: `slots` attempts run at once. One fetcher takes as many
/// deliveries as there are free slots and claims them in one transaction; each attempt runs in
/// its own task; one renewer extends every held lease in one statement; one completer records
/// finished attempts in batches (one transaction for all the outcomes that are ready). A
/// heartbeat in Redis lets `/health` count live workers.
pub struct WorkerPool {
    worker: Worker,
    slots: usize,
    pub stats: Arc<WorkerStats>,
    pub process_id: Uuid,
    heartbeats: ConnectionManager,
    keys: Keys,
}

/// Most outcomes recorded in one transaction.
const COMPLETE_BATCH: usize = 512;

impl WorkerPool {
    /// Builds a pool running up to `slots` attempts at once.
    pub async fn build(
        slots: usize,
        pool: PgPool,
        redis_info: redis::ConnectionInfo,
        keys: Keys,
        registry: Registry,
        config: WorkerConfig,
    ) -> Result<WorkerPool> {
        let stats = Arc::new(WorkerStats::default());
        // A blocking take holds its connection for `block`; allow that plus a margin.
        let blocking =
            queue::connect_with_timeout(redis_info.clone(), config.block + Duration::from_secs(5))
                .await?;
        let commands = queue::connect(redis_info).await?;
        let worker = Worker::with_connections(
            pool,
            blocking,
            commands.clone(),
            keys.clone(),
            Arc::new(registry),
            config,
            stats.clone(),
        );
        Ok(WorkerPool {
            worker,
            slots: slots.max(1),
            stats,
            process_id: Uuid::new_v4(),
            heartbeats: commands,
            keys,
        })
    }

    /// Records finished attempts in `metrics` (by default in a registry of the pool's own).
    pub fn with_metrics(mut self, metrics: Metrics) -> WorkerPool {
        self.worker = self.worker.with_metrics(metrics);
        self
    }

    /// Runs until `shutdown`; then lets running attempts finish for up to `drain`, releases those
    /// that did not, records every outcome and returns.
    pub async fn run(self, shutdown: CancellationToken, drain: Duration) {
        let worker = Arc::new(self.worker);
        let hard_stop = CancellationToken::new();
        let in_flight: InFlight = Arc::new(Mutex::new(HashMap::new()));
        let slots = Arc::new(Semaphore::new(self.slots));
        let (done_tx, done_rx) = mpsc::unbounded_channel::<(Finished, OwnedSemaphorePermit)>();

        // the heartbeat lasts until the drain is over: a draining process still runs attempts
        let beat_stop = CancellationToken::new();
        let beat = tokio::spawn(heartbeat_loop(
            self.heartbeats.clone(),
            self.keys.clone(),
            self.process_id,
            self.slots,
            beat_stop.clone(),
        ));
        let renewer_stop = CancellationToken::new();
        let renewer = tokio::spawn(renew_loop(
            worker.clone(),
            in_flight.clone(),
            renewer_stop.clone(),
        ));
        let completer = tokio::spawn(complete_loop(worker.clone(), done_rx, in_flight.clone()));

        let mut running = tokio::task::JoinSet::new();
        let mut failures = 0u32;
        // `slots` bounds the handlers running; `pending` bounds the attempts claimed and not yet
        // recorded, so the fetcher can claim again while the completer records earlier outcomes.
        let pending = Arc::new(Semaphore::new((self.slots * 4).max(256)));
        while !shutdown.is_cancelled() {
            let first = tokio::select! {
                p = async {
                    let slot = slots.clone().acquire_owned().await?;
                    let record = pending.clone().acquire_owned().await?;
                    Ok::<_, tokio::sync::AcquireError>((slot, record))
                } => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
                () = shutdown.cancelled() => break,
            };
            let mut permits = vec![first];
            // let attempts that are about to end free their slots, so one claim takes many
            tokio::task::yield_now().await;
            while let Ok(slot) = slots.clone().try_acquire_owned() {
                match pending.clone().try_acquire_owned() {
                    Ok(record) => permits.push((slot, record)),
                    Err(_) => break,
                }
            }
            let claimed = match fetch(&worker, permits.len(), &shutdown).await {
                Ok(c) => {
                    failures = 0;
                    c
                }
                Err(e) => {
                    failures += 1;
                    tracing::error!(error = %e, "taking or claiming deliveries failed");
                    let pause = Duration::from_millis(100 * u64::from(failures.min(50)));
                    tokio::select! {
                        () = tokio::time::sleep(pause) => {}
                        () = shutdown.cancelled() => {}
                    }
                    continue;
                }
            };
            for c in claimed {
                let (slot, record) = permits.pop().expect("one permit per claimed attempt");
                let lease_lost = CancellationToken::new();
                let key = (c.ctx.task_id, c.ctx.attempt);
                in_flight
                    .lock()
                    .expect("in-flight map")
                    .insert(key, lease_lost.clone());
                let (worker, hard_stop, done_tx) =
                    (worker.clone(), hard_stop.clone(), done_tx.clone());
                running.spawn(async move {
                    let finished = worker.execute(c, &lease_lost, &hard_stop).await;
                    drop(slot);
                    // the lease stays renewed until the completer has recorded the outcome;
                    // the completer outlives every sender
                    done_tx.send((finished, record)).ok();
                });
            }
            // reap finished runs so the set does not grow
            while running.try_join_next().is_some() {}
        }

        tracing::info!(running = running.len(), ?drain, "draining workers");
        let deadline = tokio::time::sleep(drain);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                joined = running.join_next() => match joined {
                    None => break,
                    Some(Err(e)) => tracing::error!(error = %e, "an attempt task panicked"),
                    Some(Ok(())) => {}
                },
                () = &mut deadline, if !hard_stop.is_cancelled() => {
                    tracing::warn!("drain deadline passed; releasing unfinished attempts");
                    hard_stop.cancel();
                }
            }
        }
        drop(done_tx);
        if let Err(e) = completer.await {
            tracing::error!(error = %e, "the completer panicked");
        }
        renewer_stop.cancel();
        if let Err(e) = renewer.await {
            tracing::error!(error = %e, "the lease renewer panicked");
        }
        beat_stop.cancel();
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

/// Attempts (task, attempt number) running in this process, with the token that stops each
/// when its lease is lost.
type InFlight = Arc<Mutex<HashMap<(Uuid, i32), CancellationToken>>>;

/// Takes up to `max` deliveries and claims them; a delivery taken after shutdown began goes
/// back to the queue unstarted.
async fn fetch(worker: &Worker, max: usize, shutdown: &CancellationToken) -> Result<Vec<Claimed>> {
    let raws = worker.take(max).await?;
    if raws.is_empty() {
        return Ok(Vec::new());
    }
    if shutdown.is_cancelled() {
        let mut conn = worker.commands.clone();
        for raw in &raws {
            queue::return_unstarted(&mut conn, &worker.keys, raw).await?;
        }
        return Ok(Vec::new());
    }
    Ok(worker.claim(raws).await?.0)
}

/// Extends every held lease each third of the lease; stops the attempts whose lease was lost,
/// and stops them all when renewals have failed for two thirds of a lease (a rescuer may soon
/// hand the attempts to another worker: they must not run on here at the same time).
async fn renew_loop(worker: Arc<Worker>, in_flight: InFlight, stop: CancellationToken) {
    let every = worker.config.lease / 3;
    let mut last_ok = Instant::now();
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        let held_now: Vec<(Uuid, i32)> = in_flight
            .lock()
            .expect("in-flight map")
            .keys()
            .copied()
            .collect();
        if held_now.is_empty() {
            last_ok = Instant::now();
            continue;
        }
        match tasks::renew_leases(&worker.pool, &held_now, worker.id, worker.config.lease).await {
            Ok(held) => {
                last_ok = Instant::now();
                let held: HashSet<(Uuid, i32)> = held.into_iter().collect();
                let map = in_flight.lock().expect("in-flight map");
                for key in held_now.iter().filter(|k| !held.contains(k)) {
                    if let Some(token) = map.get(key) {
                        tracing::warn!(task.id = %key.0, attempt = key.1, "lease lost; stopping the handler");
                        token.cancel();
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "lease renewal failed");
                if last_ok.elapsed() >= worker.config.lease * 2 / 3 {
                    tracing::error!("leases could not be renewed for two thirds of a lease; stopping every attempt");
                    for token in in_flight.lock().expect("in-flight map").values() {
                        token.cancel();
                    }
                }
            }
        }
    }
}

/// Records finished attempts in batches until every sender is gone. A failed batch is tried
/// again a few times, then item by item, so one bad row or a passing database error does not
/// throw away the other outcomes. Attempts stay in `in_flight` (their leases renewed) until
/// their outcome is recorded or given up.
async fn complete_loop(
    worker: Arc<Worker>,
    mut done: mpsc::UnboundedReceiver<(Finished, OwnedSemaphorePermit)>,
    in_flight: InFlight,
) {
    while let Some(first) = done.recv().await {
        let mut batch = vec![first];
        while batch.len() < COMPLETE_BATCH {
            match done.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let (finished, permits): (Vec<Finished>, Vec<OwnedSemaphorePermit>) =
            batch.into_iter().unzip();
        let keys: Vec<(Uuid, i32)> = finished
            .iter()
            .map(|f| (f.claimed.ctx.task_id, f.claimed.ctx.attempt))
            .collect();
        record_with_retries(&worker, finished).await;
        let mut map = in_flight.lock().expect("in-flight map");
        for key in &keys {
            map.remove(key);
        }
        drop(map);
        drop(permits);
    }
}

async fn record_with_retries(worker: &Worker, finished: Vec<Finished>) {
    for round in 1..=3u32 {
        match worker.complete(finished.clone()).await {
            Ok(_) => return,
            Err(e) => {
                tracing::warn!(error = %e, attempts = finished.len(), round, "recording outcomes failed; retrying");
                tokio::time::sleep(Duration::from_millis(200 * u64::from(round))).await;
            }
        }
    }
    // One by one: the rows that can be recorded are; the others are left to the rescuer (their
    // leases expire and the attempts are retried), which loses attempts, never tasks.
    for f in finished {
        let id = f.claimed.ctx.task_id;
        if let Err(e) = worker.complete(vec![f]).await {
            tracing::error!(task.id = %id, error = %e, "cannot record an outcome; the lease will expire");
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
