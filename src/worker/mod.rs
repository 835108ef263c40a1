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
//! **Lease and fencing.** The claim sets `lease_owner` (this worker) and `lease_expires_at`; the
//! renewer ([`lease`]) extends it every third of the lease while the attempt is held. If a
//! rescuer has taken the attempt over (the worker's process stopped heartbeating past its
//! lease), the renewal finds it gone and the handler is stopped, which is recorded as
//! `attempt_stopped`; an outcome is only recorded while `lease_owner` is still this worker, so a
//! stale worker can never overwrite a newer attempt.
//!
//! **Outcome.** Success appends `attempt_succeeded` with the handler's result. A failure appends
//! `attempt_failed` and then `retry_scheduled` (with an outbox row due after the backoff) or
//! `dead_lettered` (with a copy on the failed list). A handler over its time limit fails
//! retryably (`timeout`). Only then is the delivery removed from the processing list.
//!
//! **Shutdown.** When the shutdown token fires, workers stop taking deliveries; a delivery taken
//! but not claimed goes back to the queue, and an attempt claimed but not started is released. Handlers that are running get until the drain
//! deadline (`hard_stop`); one still running then is stopped and its attempt released
//! (`attempt_released`: queued again with the same attempt number and idempotency key).

pub mod handler;
pub mod lease;
pub mod log_channel;
pub mod pool;
mod skip;

pub use pool::{WorkerPool, HEARTBEAT_EVERY, HEARTBEAT_TTL};

use crate::domain::TaskId;
use crate::queue::RedisConn;
use chrono::{DateTime, Utc};
use futures::FutureExt;
use sqlx::PgPool;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use crate::binding::Binding;
use crate::domain::sealing::{open_payload, payload_is_sealed, DataKey, MasterKey, Opening};
use crate::domain::task::{DeadLetter, InvalidTransition};
use crate::domain::{
    EventType, FailureKind, RetryDecision, RetryPolicy, Task, TaskEvent, TaskStatus,
};
use crate::metrics::Metrics;
use crate::queue::{self, Delivery, Keys};
use crate::store::transition::{self, Lock, Payload, Target};
use crate::store::{events, outbox, Tx};
use handler::{HandlerError, Registry, TaskContext};

/// Errors that stop one step of a worker (the loop logs them and carries on).
pub type WorkerError = crate::engine::StepError;

pub type Result<T, E = WorkerError> = std::result::Result<T, E>;

pub use crate::domain::retry::Jitter;

/// Worker settings.
#[derive(Clone)]
pub struct WorkerConfig {
    /// How long a claim lasts without a heartbeat.
    pub lease: Duration,
    /// How long one `BLMOVE` waits for a delivery.
    pub block: Duration,
    pub retry: RetryPolicy,
    pub jitter: Jitter,
    /// Opens the sealed personal fields of the tasks it runs (`AUDIT_DATA_KEY`).
    pub data_key: Option<Arc<MasterKey>>,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            lease: Duration::from_secs(30),
            block: Duration::from_secs(1),
            retry: RetryPolicy::default(),
            jitter: Arc::new(rand::random::<f64>),
            data_key: None,
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
    Succeeded(TaskId),
    /// Failed; the next attempt is scheduled.
    Retrying(TaskId),
    DeadLettered(TaskId),
    /// The delivery was for an attempt that cannot start (already running, finished, cancelled,
    /// not yet due): dropped.
    Duplicate(TaskId),
    /// The worker lost its lease before it could record the outcome: nothing was recorded.
    Fenced(TaskId),
    /// Shutdown stopped the handler; the attempt was released to run again.
    Released(TaskId),
    /// Shutdown began after the delivery was taken: it went back to the queue unstarted.
    Returned(TaskId),
    /// The task was cancelled while the attempt ran: its outcome was recorded, nothing more.
    CancelledWhileRunning(TaskId),
    /// The delivery could not be decoded; it was moved to the failed list.
    Undecodable,
    /// The delivery's task is not in this database: it was put back on the queue for the
    /// deployment whose database holds it.
    Skipped(TaskId),
    /// The delivery's task type is paused: the delivery went back to the outbox unpublished,
    /// and the relays publish it again once the type is resumed.
    Paused(TaskId),
}

/// Takes deliveries, claims them, runs their handlers and records their outcomes. A
/// [`WorkerPool`] runs one `Worker` with many handlers at once; tests drive it one delivery at a
/// time with [`Worker::process_next`].
pub struct Worker {
    /// The lease owner of every attempt this worker claims.
    pub id: Uuid,
    pool: PgPool,
    /// Dedicated to the blocking take (`BLMOVE` blocks the connection it runs on).
    blocking: RedisConn,
    /// For everything else (acknowledgements, failed copies).
    commands: RedisConn,
    keys: Keys,
    registry: Arc<Registry>,
    config: WorkerConfig,
    stats: Arc<WorkerStats>,
    metrics: Metrics,
    /// Checked before every take (see [`Binding::verify`]).
    binding: Binding,
    /// Consecutive batches of nothing but deliveries of unknown tasks.
    skip_streak: AtomicU32,
    /// The queue shard the next take starts at (shards are served in turn).
    next_shard: AtomicUsize,
    /// What pushes of dead-letter copies met in this process.
    failed_pushes: crate::dead_letters::Refusals,
}

/// The longest blocking take on one shard when there are several: a delivery that arrives on
/// another shard waits at most this long for an idle worker.
const SHARD_BLOCK: Duration = Duration::from_millis(50);

/// A claimed attempt, ready to run.
#[derive(Clone)]
pub struct Claimed {
    raw: String,
    pub ctx: TaskContext,
    /// The task's data key, which its provider result is sealed with (tasks whose payload was
    /// sealed).
    data_key: Option<DataKey>,
}

impl Claimed {
    /// A provider result as it is recorded: sealed with the task's data key, if it has one.
    fn sealed(&self, result: &serde_json::Value) -> serde_json::Value {
        crate::store::data_keys::seal_result(
            self.data_key.as_ref(),
            self.ctx.task_id,
            result.clone(),
        )
    }
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

impl Worker {
    pub fn new(
        pool: PgPool,
        blocking: RedisConn,
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
        blocking: RedisConn,
        commands: RedisConn,
        keys: Keys,
        registry: Arc<Registry>,
        config: WorkerConfig,
        stats: Arc<WorkerStats>,
    ) -> Worker {
        Worker {
            id: Uuid::new_v4(),
            binding: Binding::new(pool.clone(), keys.clone()),
            skip_streak: AtomicU32::new(0),
            next_shard: AtomicUsize::new(0),
            failed_pushes: Default::default(),
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

    /// Shares what the pushes of dead-letter copies meet with the process's rescuer (by default
    /// the worker notes them alone).
    pub fn with_failed_pushes(mut self, refusals: crate::dead_letters::Refusals) -> Worker {
        self.failed_pushes = refusals;
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
        let key = (claimed.ctx.task_id, claimed.ctx.attempt);
        let leases = lease::Leases::new();
        let lease_lost = leases.hold(key);
        let renewer_stop = CancellationToken::new();
        let renewer = tokio::spawn(leases.clone().run(
            self.pool.clone(),
            self.id,
            self.config.lease,
            None,
            renewer_stop.clone(),
        ));
        let finished = self.execute(claimed, &lease_lost, hard_stop).await;
        leases.finished(&key);
        let recorded = self.complete(vec![finished]).await;
        renewer_stop.cancel();
        if let Err(e) = renewer.await {
            tracing::error!(error = %e, "the lease renewer panicked");
        }
        let mut processed = recorded?;
        Ok(processed.remove(0))
    }

    /// Puts the copies of tasks this worker dead-lettered on the failed list. Their transitions
    /// are committed, with the copies in the failed list's outbox, so an error does not fail the
    /// caller: the next rescuer pass pushes what is left ([`crate::dead_letters`]). Within
    /// [`PAUSE`](crate::dead_letters::PAUSE) of a refusal the copies are left to the rescuer.
    async fn copy_dead_letters(&self, conn: &mut RedisConn, dead: &[DeadLetter]) {
        let now = std::time::Instant::now();
        if !dead.is_empty() && self.failed_pushes.worker_may_push(now, dead.len()) {
            // logged by `push`; the copies wait in Postgres
            let _ = self.failed_pushes.push(&self.pool, conn, &self.keys).await;
        }
    }

    /// Takes up to `max` deliveries onto the processing list: waits up to the block time for the
    /// first, then takes only what is already waiting.
    pub async fn take(&self, max: usize) -> Result<Vec<String>> {
        self.binding.verify(&mut self.commands.clone()).await?;
        let mut conn = self.blocking.clone();
        let shards = self.keys.shards();
        let start = self.next_shard.fetch_add(1, Ordering::Relaxed) % shards;
        let mut block = self.config.block;
        if shards > 1 {
            // what already waits on any shard, starting after the shard served last
            let mut raws = Vec::new();
            for i in 0..shards {
                let keys = self.keys.shard(start + i);
                match queue::take_waiting(&mut conn, &keys, max - raws.len()).await {
                    Ok(taken) => raws.extend(taken),
                    // what earlier shards gave is on their processing lists: work it, and
                    // leave this shard (its master may be failing over) for the next take
                    Err(e) if !raws.is_empty() => {
                        tracing::warn!(error = %e, shard = keys.shard_index(), "cannot take from a queue shard");
                        break;
                    }
                    Err(e) => return Err(e.into()),
                }
                if raws.len() >= max {
                    break;
                }
            }
            if !raws.is_empty() {
                return Ok(raws);
            }
            block = block.min(SHARD_BLOCK);
        }
        let keys = self.keys.shard(start);
        let Some(first) = queue::take(&mut conn, &keys, block).await? else {
            return Ok(Vec::new());
        };
        let mut raws = vec![first];
        if max > 1 {
            raws.extend(queue::take_waiting(&mut conn, &keys, max - 1).await?);
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
        // the attempt each task's first delivery in the batch names (a second one is a duplicate)
        let mut wanted: HashMap<TaskId, i32> = HashMap::with_capacity(deliveries.len());
        for (_, d) in &deliveries {
            wanted.entry(d.task_id).or_insert(d.attempt);
        }
        let ids: Vec<TaskId> = wanted.keys().copied().collect();
        let lease = chrono::Duration::from_std(self.config.lease).unwrap_or_default();

        let mut tx = Tx::begin(&self.pool).await?;
        let mut held = Vec::new();
        // the pauses are read with the lock: a type paused before this claim is never started
        let applied = transition::apply_seeing_pauses(
            &mut tx,
            Target::Ids(&ids, Lock::Wait, Payload::Load),
            |task, now, paused| {
                let attempt = wanted[&task.id];
                let event = self.decide_claim(task, attempt, now, now + lease);
                if event.is_some() && paused.contains(&task.task_type) {
                    held.push((task.id, attempt));
                    return Ok(None);
                }
                Ok(event.map(|e| vec![e]))
            },
        )
        .await?;
        if !held.is_empty() {
            outbox::unpublish(&mut tx, &held).await?;
        }
        let keys = self.data_keys(&mut tx, &applied).await?;
        tx.commit().await?;
        let held: HashSet<TaskId> = held.into_iter().map(|(id, _)| id).collect();

        let mut claimed = Vec::new();
        let mut refused = Vec::new();
        // a task this database does not hold is another deployment's: never dropped
        let missing: HashSet<TaskId> = applied.missing.iter().copied().collect();
        let mut unknown = Vec::new();
        let mut given_back = Vec::new();
        let mut used = HashSet::with_capacity(applied.changed.len());
        for (raw, d) in deliveries {
            if missing.contains(&d.task_id) {
                unknown.push((raw, d.task_id));
                continue;
            }
            if held.contains(&d.task_id)
                && wanted[&d.task_id] == d.attempt
                && used.insert(d.task_id)
            {
                given_back.push((raw, d.task_id));
                continue;
            }
            let change = applied
                .get(d.task_id)
                .filter(|_| wanted[&d.task_id] == d.attempt && used.insert(d.task_id));
            let Some(change) = change else {
                refused.push((raw, d.task_id));
                continue;
            };
            let after = &change.after;
            if matches!(change.events[..], [TaskEvent::AttemptStarted { .. }]) {
                let (id, attempt) = (after.id, after.attempts);
                let mut payload = after.payload.clone();
                let data_key = keys.get(&id).cloned();
                if payload_is_sealed(after.task_type, &payload) {
                    let how = match (&data_key, &self.config.data_key) {
                        (Some(k), _) => Opening::Key(k),
                        (None, Some(_)) => Opening::Erased,
                        (None, None) => Opening::NoMasterKey,
                    };
                    if let Err(e) = open_payload(after.task_type, &mut payload, id, how) {
                        // the handler sees the envelopes and fails on them
                        tracing::error!(task.id = %id, error = %e, "cannot open the task's payload");
                    }
                }
                claimed.push(Claimed {
                    raw,
                    ctx: TaskContext {
                        task_id: id,
                        task_type: after.task_type,
                        attempt,
                        payload,
                        idempotency_key: format!("{id}:{attempt}"),
                        trace: after.trace.clone(),
                    },
                    data_key,
                });
                continue;
            }
            // dead-lettered (no handler for its type). The claims are committed: a Redis error
            // from here on must not drop them (the rescuer cleans the processing entry later).
            if let Err(e) = queue::ack(&mut conn, &self.keys, &raw).await {
                tracing::error!(task.id = %after.id, error = %e, "cannot acknowledge a delivery");
            }
            self.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
            done.push(Processed::DeadLettered(after.id));
        }
        self.copy_dead_letters(&mut conn, &applied.dead_letters)
            .await;
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
        done.extend(self.give_back_paused(&mut conn, given_back).await);
        self.pause_if_only_skipped(&claimed, &done).await;
        Ok((claimed, done))
    }

    /// The data keys of the claimed tasks whose payload is sealed (one query, and only when
    /// there are some): their payloads are opened for the handlers, their results sealed.
    async fn data_keys(
        &self,
        tx: &mut Tx,
        applied: &transition::Applied,
    ) -> Result<HashMap<TaskId, DataKey>> {
        let Some(master) = self.config.data_key.as_deref() else {
            return Ok(HashMap::new());
        };
        let sealed: Vec<TaskId> = applied
            .changed
            .iter()
            .filter(|c| payload_is_sealed(c.after.task_type, &c.after.payload))
            .map(|c| c.after.id)
            .collect();
        if sealed.is_empty() {
            return Ok(HashMap::new());
        }
        Ok(crate::store::data_keys::keys(tx.conn(), master, &sealed).await?)
    }

    /// Gives back the attempts of a claim whose commit this worker never heard about (the
    /// connection failed during `COMMIT`): of `wanted`, each attempt this worker holds is
    /// released (`attempt_released`: queued again under the same attempt number), so it runs
    /// again at once instead of after its lease and the rescuer's grace for live owners. The
    /// deliveries were returned to the queue; whichever copy comes first is claimed, the other
    /// refused as a duplicate. An attempt `held` says this worker runs (a duplicate delivery of
    /// an attempt it is running) is left alone. The pool settles a failed claim before it claims
    /// again (see [`pool::Fetcher`]): an attempt claimed since would be held by this worker too,
    /// and released here while its handler is about to run. Returns how many were released
    /// (none when the claim did not commit).
    pub async fn settle_unconfirmed(
        &self,
        wanted: &[(TaskId, i32)],
        held: impl Fn(&(TaskId, i32)) -> bool,
    ) -> Result<usize> {
        let attempts: HashMap<TaskId, i32> = wanted.iter().copied().collect();
        let ids: Vec<TaskId> = attempts.keys().copied().collect();
        let mut tx = Tx::begin(&self.pool).await?;
        let applied = transition::apply(
            &mut tx,
            Target::Ids(&ids, Lock::Wait, Payload::Skip),
            |task, _now| {
                let attempt = attempts[&task.id];
                if task.status == TaskStatus::Running
                    && task.is_held_by(self.id, attempt)
                    && !held(&(task.id, attempt))
                {
                    let why = "the worker did not hear whether its claim committed".to_owned();
                    return Ok(Some(vec![task.release(why)?]));
                }
                Ok(None)
            },
        )
        .await?;
        tx.commit().await?;
        Ok(applied.changed.len())
    }

    /// The event that claims `attempt` now, a dead letter for a type without a handler, or
    /// `None` for a duplicate (the attempt is not the task's next, or it cannot start now).
    fn decide_claim(
        &self,
        task: &Task,
        attempt: i32,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
    ) -> Option<TaskEvent> {
        if attempt != task.next_attempt() {
            return None;
        }
        if self.registry.handler(task.task_type).is_none() {
            let reason = format!("no handler is registered for task type {}", task.task_type);
            return task.dead_letter(reason).ok();
        }
        task.start_attempt(self.id, now, lease_until).ok()
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
        let span = crate::telemetry::attempt_span(
            ctx.task_id,
            ctx.task_type,
            ctx.attempt,
            ctx.trace.as_ref(),
        );
        let started = Instant::now();
        self.stats.active.fetch_add(1, Ordering::Relaxed);
        let ending = match self.registry.handler(ctx.task_type) {
            None => Ending::Done(Err(HandlerError::permanent(
                "no handler for this task type",
            ))),
            Some(handler) => {
                let limit = self.registry.timeout(ctx.task_type);
                let work = async {
                    // the provider's turn first: waiting for it is not part of the time limit
                    let turn = std::panic::AssertUnwindSafe(handler.slot(ctx)).catch_unwind();
                    match turn.await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => return Ending::Done(Err(e)),
                        Err(_) => {
                            return Ending::Done(Err(HandlerError::retryable(
                                "the handler panicked while waiting for its turn",
                            )))
                        }
                    }
                    // a panicking handler fails its attempt (retryably) instead of the worker
                    let guarded = std::panic::AssertUnwindSafe(handler.handle(ctx)).catch_unwind();
                    match tokio::time::timeout(limit, guarded).await {
                        Ok(Ok(result)) => Ending::Done(result),
                        Ok(Err(_)) => {
                            Ending::Done(Err(HandlerError::retryable("the handler panicked")))
                        }
                        Err(_) => Ending::TimedOut(limit),
                    }
                }
                .instrument(span);
                tokio::select! {
                    ending = work => ending,
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

    /// Records the outcomes of finished runs in one transaction, then acknowledges their
    /// deliveries. An outcome is recorded only while this worker still holds the attempt.
    pub async fn complete(&self, finished: Vec<Finished>) -> Result<Vec<Processed>> {
        if finished.is_empty() {
            return Ok(Vec::new());
        }
        let by_id: HashMap<TaskId, &Finished> = finished
            .iter()
            .map(|f| (f.claimed.ctx.task_id, f))
            .collect();
        let ids: Vec<TaskId> = by_id.keys().copied().collect();
        let mut outcomes: HashMap<TaskId, Processed> = HashMap::with_capacity(ids.len());
        // the rows of attempts this worker no longer holds, as they are now
        let mut unheld: HashMap<TaskId, (TaskStatus, i32)> = HashMap::new();
        // runs stopped for a lost lease whose stop an earlier try already recorded: not again
        let stops = self.stops_recorded_earlier(&finished).await?;
        let mut stopped_earlier: HashMap<TaskId, Processed> = HashMap::new();
        let mut tx = Tx::begin(&self.pool).await?;
        let applied = transition::apply(
            &mut tx,
            Target::Ids(&ids, Lock::Wait, Payload::Skip),
            |task, now| {
                let f = by_id[&task.id];
                if let Some(found) = stops.get(&task.id) {
                    let processed = if found == EventType::AttemptStopped.as_str() {
                        Processed::Fenced(task.id)
                    } else {
                        recorded_as(f, task.status, task.attempts)
                    };
                    let attempt = f.claimed.ctx.attempt;
                    tracing::info!(task.id = %task.id, attempt, recorded_as = %found, "stop already recorded by an earlier try whose commit was not acknowledged");
                    stopped_earlier.insert(task.id, processed);
                    return Ok(None);
                }
                if !task.is_held_by(self.id, f.claimed.ctx.attempt) {
                    unheld.insert(task.id, (task.status, task.attempts));
                }
                Ok(self.outcome(task, f, now)?.map(|(events, p)| {
                    outcomes.insert(task.id, p);
                    events
                }))
            },
        )
        .await?;
        tx.commit().await?;
        let mut earlier = self.recorded_earlier(&by_id, &unheld).await?;
        // a missing or unreadable row, or a lease taken over, records nothing (fenced)
        let processed: Vec<Processed> = finished
            .iter()
            .map(|f| {
                let id = f.claimed.ctx.task_id;
                let found = outcomes
                    .remove(&id)
                    .or_else(|| earlier.remove(&id))
                    .or_else(|| stopped_earlier.remove(&id));
                match found {
                    Some(p) if !matches!(p, Processed::Fenced(_)) => p,
                    _ => {
                        if unheld.contains_key(&id) {
                            let trace_id =
                                f.claimed.ctx.trace.as_ref().map_or("", |t| t.trace_id());
                            let attempt = f.claimed.ctx.attempt;
                            tracing::warn!(task.id = %id, attempt, trace_id, "lease was taken over; outcome not recorded");
                        }
                        Processed::Fenced(id)
                    }
                }
            })
            .collect();
        for (f, p) in finished.iter().zip(&processed) {
            if let Some(outcome) = attempt_outcome(p) {
                let took = Duration::from_millis(f.duration_ms.max(0) as u64);
                self.metrics
                    .observe_attempt(f.claimed.ctx.task_type, outcome, took);
            }
        }

        // The outcomes are committed: a Redis error from here on must not fail the call, whose
        // retry would find them recorded and count them again (the rescuer cleans the processing
        // entries later; a dead letter's copy waits in Postgres's `failed_copies`)
        let mut conn = self.commands.clone();
        self.copy_dead_letters(&mut conn, &applied.dead_letters)
            .await;
        let raws: Vec<&str> = finished.iter().map(|f| f.claimed.raw.as_str()).collect();
        if let Err(e) = queue::ack_many(&mut conn, &self.keys, &raws).await {
            tracing::error!(error = %e, "cannot acknowledge finished deliveries");
        }
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

    /// Of the finished runs whose attempts this worker no longer holds (`unheld`: their rows as
    /// they are now), those whose outcome an earlier try of this worker did record, as if
    /// recorded now. A commit whose answer was lost to a broken connection is recorded all the
    /// same, and the try after it finds the attempt ended: that is not a takeover. Only outcomes
    /// the holder alone records are looked for; runs stopped for a lost lease are looked for
    /// before the transaction ([`Worker::stops_recorded_earlier`]).
    async fn recorded_earlier(
        &self,
        by_id: &HashMap<TaskId, &Finished>,
        unheld: &HashMap<TaskId, (TaskStatus, i32)>,
    ) -> Result<HashMap<TaskId, Processed>> {
        let wanted: Vec<(TaskId, i32, &str)> = unheld
            .keys()
            .filter_map(|id| {
                let f = by_id[id];
                let event_type = match &f.ending {
                    Ending::Done(Ok(_)) => EventType::AttemptSucceeded,
                    Ending::Interrupted => EventType::AttemptReleased,
                    Ending::Done(Err(_)) | Ending::TimedOut(_) => EventType::AttemptFailed,
                    // looked for before the transaction (see `stops_recorded_earlier`)
                    Ending::LeaseLost => return None,
                };
                Some((*id, f.claimed.ctx.attempt, event_type.as_str()))
            })
            .collect();
        if wanted.is_empty() {
            return Ok(HashMap::new());
        }
        let recorded =
            events::outcomes_recorded_by(&self.pool, self.id, &wanted, LEASE_NOT_RENEWED).await?;
        Ok(recorded
            .into_iter()
            .map(|(id, _)| {
                let (f, (status, attempts)) = (by_id[&id], unheld[&id]);
                let attempt = f.claimed.ctx.attempt;
                tracing::info!(task.id = %id, attempt, "outcome already recorded by an earlier try whose commit was not acknowledged");
                (id, recorded_as(f, status, attempts))
            })
            .collect())
    }

    /// Of the finished runs stopped for a lost lease, those whose stop an earlier try of this
    /// worker already recorded (its commit went through, the answer was lost), with the type it
    /// was recorded as: `attempt_stopped` (the attempt had been taken over) or the worker's own
    /// `attempt_failed` (it still held the attempt). Recording either again would put a second
    /// end of the same run in the log, so this is asked before the transaction; it runs only
    /// when some run was stopped that way.
    async fn stops_recorded_earlier(
        &self,
        finished: &[Finished],
    ) -> Result<HashMap<TaskId, String>> {
        let wanted: Vec<(TaskId, i32, &str)> = finished
            .iter()
            .filter(|f| matches!(f.ending, Ending::LeaseLost))
            .flat_map(|f| {
                let (id, attempt) = (f.claimed.ctx.task_id, f.claimed.ctx.attempt);
                [
                    (id, attempt, EventType::AttemptStopped.as_str()),
                    (id, attempt, EventType::AttemptFailed.as_str()),
                ]
            })
            .collect();
        if wanted.is_empty() {
            return Ok(HashMap::new());
        }
        let mut found: HashMap<TaskId, String> = HashMap::new();
        for (id, event_type) in
            events::outcomes_recorded_by(&self.pool, self.id, &wanted, LEASE_NOT_RENEWED).await?
        {
            // the worker's own failure is the run's end if both are there (a stop after it is
            // the kind of second end this looks for)
            if event_type == EventType::AttemptFailed.as_str() || !found.contains_key(&id) {
                found.insert(id, event_type);
            }
        }
        Ok(found)
    }

    /// The events that record a finished run, or `None` if this worker no longer holds the
    /// attempt (fencing).
    fn outcome(
        &self,
        task: &Task,
        f: &Finished,
        now: DateTime<Utc>,
    ) -> Result<Option<(Vec<TaskEvent>, Processed)>, InvalidTransition> {
        let id = task.id;
        let attempt = f.claimed.ctx.attempt;
        if !task.is_held_by(self.id, attempt) {
            // the run is not recorded, but a handler stopped for it is (never a silent stop)
            return Ok(matches!(f.ending, Ending::LeaseLost).then(|| {
                let stopped = TaskEvent::AttemptStopped {
                    attempt,
                    worker_id: self.id,
                    reason: "the lease was lost: another process took the attempt over".into(),
                };
                (vec![stopped], Processed::Fenced(id))
            }));
        }
        let duration_ms = f.duration_ms;
        if task.status == TaskStatus::Cancelled {
            let event = match &f.ending {
                Ending::Done(Ok(result)) => task.succeed(f.claimed.sealed(result), duration_ms)?,
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
                vec![task.succeed(f.claimed.sealed(result), duration_ms)?],
                Processed::Succeeded(id),
            ),
            Ending::Interrupted => (
                vec![task.release("the worker shut down before the handler finished".into())?],
                Processed::Released(id),
            ),
            // Stopped while this worker still holds the attempt (its leases could not be
            // renewed for long enough that others may take them over): recorded as a failed
            // attempt, retried by the usual rules.
            Ending::LeaseLost => self.failure(
                task,
                FailureKind::LeaseExpired,
                LEASE_NOT_RENEWED.into(),
                None,
                duration_ms,
                now,
            )?,
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

    async fn undecodable(&self, conn: &mut RedisConn, raw: &str) -> Result<Processed> {
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
    ) -> Result<(Vec<TaskEvent>, Processed), InvalidTransition> {
        let decision = self
            .config
            .retry
            .decision(task.attempts, &self.config.jitter, retry_after);
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

/// The error of the `attempt_failed` a worker records when it stops a handler whose attempt it
/// still holds because the lease could not be renewed (the rescuer's takeover says otherwise):
/// it tells the worker's own lease-expired failure from the rescuer's in the log.
const LEASE_NOT_RENEWED: &str = "the handler was stopped: its lease could not be renewed";

/// What an outcome of `f` that an earlier try recorded amounts to, by its task's row as it is
/// now (`status`, `attempts`).
fn recorded_as(f: &Finished, status: TaskStatus, attempts: i32) -> Processed {
    let id = f.claimed.ctx.task_id;
    match (&f.ending, status) {
        (_, TaskStatus::Cancelled) => Processed::CancelledWhileRunning(id),
        (Ending::Done(Ok(_)), _) => Processed::Succeeded(id),
        (Ending::Interrupted, _) => Processed::Released(id),
        (_, TaskStatus::Dead) if attempts == f.claimed.ctx.attempt => Processed::DeadLettered(id),
        _ => Processed::Retrying(id),
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
        | Processed::Skipped(_)
        | Processed::Paused(_) => return None,
    })
}
