//! The rescuer: finds work that a crash, a stall or a lost Redis left behind and puts it back
//! on its way. [`Rescuer::run_once`] does one pass; [`Rescuer::run`] repeats it. Any number of
//! rescuers may run: each pass locks what it changes (`SKIP LOCKED`) and every repair is
//! idempotent.
//!
//! One pass:
//!
//! 1. **Redis lost its data.** The marker `{prefix}:tasks:seeded` is set with `SET NX` (and the
//!    namespace bound to this database if it was not, see [`crate::binding`]; a pass in a
//!    namespace bound to another database fails and changes nothing); if it was
//!    missing, Redis is new, restarted empty or was flushed, so every published outbox row (the
//!    deliveries Redis should hold) is marked unpublished and the relays push it again. Relays
//!    make the same check before each batch, so whichever runs first after a loss re-publishes.
//!    Bound: one relay batch or one rescuer interval, whichever comes first.
//! 2. **Expired leases.** A running attempt whose lease ran out (its worker died or hung) is
//!    recorded as failed (`lease_expired`) and retried or dead-lettered by the usual rules.
//!    Bound: the lease plus one rescuer interval after the worker stopped renewing.
//! 3. **The processing list.** An entry seen for longer than `grace` is removed when its attempt
//!    is over; if its attempt never started (the worker died between taking and claiming it),
//!    the task's delivery is published again.
//!    An entry whose task is not in this database is put back on the queue for the deployment
//!    whose database holds it (logged and counted, never dropped).
//! 4. **Safety net.** Deliveries published longer ago than `republish_after` and still not
//!    claimed are published again (duplicates are dropped by the claim).

use chrono::Utc;
use redis::aio::ConnectionManager;
use sqlx::PgPool;
use std::collections::{HashMap, HashSet};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::binding::Binding;
use crate::domain::{FailureKind, Task, TaskEvent, TaskStatus};
use crate::metrics::{Metrics, SkipReason};
use crate::queue::{self, Delivery, Keys};
use crate::store::{events, outbox, tasks, Tx};
use crate::worker::{failed_copy, retry_decision, WorkerConfig, WorkerError};

/// Rescuer settings.
#[derive(Clone)]
pub struct RescuerConfig {
    pub interval: Duration,
    /// How long a processing entry may stay before it is examined.
    pub grace: Duration,
    pub republish_after: Duration,
    /// Expired leases handled per pass.
    pub batch: i64,
    /// Processing entries examined per pass.
    pub scan: isize,
    /// Backoff for attempts whose lease expired.
    pub worker: WorkerConfig,
}

impl Default for RescuerConfig {
    fn default() -> Self {
        RescuerConfig {
            interval: Duration::from_secs(1),
            grace: Duration::from_secs(30),
            republish_after: Duration::from_secs(15 * 60),
            batch: 100,
            scan: 1000,
            worker: WorkerConfig::default(),
        }
    }
}

/// What one pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rescued {
    /// Deliveries re-published because Redis had lost its data.
    pub republished_after_loss: u64,
    /// Attempts whose lease expired, recorded as failed.
    pub leases_expired: usize,
    /// Processing entries removed because their attempt is over.
    pub stale_entries: usize,
    /// Processing entries whose attempt never started, re-published.
    pub orphans: usize,
    /// Deliveries re-published by the safety net.
    pub republished_stale: u64,
    /// Processing entries whose task is not in this database, put back on the queue.
    pub returned_unknown: usize,
}

pub struct Rescuer {
    pool: PgPool,
    redis: ConnectionManager,
    keys: Keys,
    config: RescuerConfig,
    binding: Binding,
    metrics: Metrics,
}

impl Rescuer {
    pub fn new(
        pool: PgPool,
        redis: ConnectionManager,
        keys: Keys,
        config: RescuerConfig,
    ) -> Rescuer {
        Rescuer {
            binding: Binding::new(pool.clone(), keys.clone()),
            metrics: Metrics::new(),
            pool,
            redis,
            keys,
            config,
        }
    }

    /// Counts skipped deliveries in `metrics` (by default in a registry of the rescuer's own).
    pub fn with_metrics(mut self, metrics: Metrics) -> Rescuer {
        self.metrics = metrics;
        self
    }

    /// One pass of every check.
    pub async fn run_once(&self) -> Result<Rescued, WorkerError> {
        let mut out = Rescued::default();
        let mut conn = self.redis.clone();
        if self.binding.mark_seeded(&mut conn).await?.0 {
            out.republished_after_loss = outbox::republish_all(&self.pool).await?;
            if out.republished_after_loss > 0 {
                tracing::warn!(
                    deliveries = out.republished_after_loss,
                    "Redis had lost its queue; re-publishing from Postgres"
                );
            }
        }
        out.leases_expired = self.expire_leases(&mut conn).await?;
        let (stale, orphans, unknown) = self.sweep_processing(&mut conn).await?;
        out.stale_entries = stale;
        out.orphans = orphans;
        out.returned_unknown = unknown;
        out.republished_stale =
            outbox::republish_older_than(&self.pool, self.config.republish_after).await?;
        Ok(out)
    }

    async fn expire_leases(&self, conn: &mut ConnectionManager) -> Result<usize, WorkerError> {
        let mut tx = Tx::begin(&self.pool).await?;
        let (rows, now) = tasks::lock_expired_leases(&mut tx, self.config.batch).await?;
        if rows.is_empty() {
            return Ok(0);
        }
        let mut items: Vec<(Task, Vec<u8>, Vec<TaskEvent>)> = Vec::with_capacity(rows.len());
        for row in &rows {
            let task = match row.to_task() {
                Ok(t) => t,
                Err(e) => {
                    tracing::error!(error = %e, "skipping an unreadable task with an expired lease");
                    continue;
                }
            };
            let worker = task.lease_owner.map(|w| w.to_string()).unwrap_or_default();
            let error = format!("lease expired: worker {worker} stopped renewing it");
            let decision = retry_decision(&self.config.worker, task.attempts, None);
            let events = task.fail(FailureKind::LeaseExpired, error, 0, now, decision)?;
            items.push((task, row.last_hash.clone(), events));
        }
        let afters = events::record_batch(&mut tx, &items, now).await?;
        let mut copies = Vec::new();
        for ((task, _, evs), after) in items.iter().zip(&afters) {
            for e in evs {
                match e {
                    TaskEvent::RetryScheduled {
                        next_attempt,
                        available_at,
                        ..
                    } => outbox::insert(&mut tx, task.id, *next_attempt, *available_at).await?,
                    TaskEvent::DeadLettered { reason } => {
                        copies.push(failed_copy(after, reason.clone(), now))
                    }
                    _ => {}
                }
            }
            tracing::warn!(task.id = %task.id, attempt = task.attempts, "lease expired; attempt recorded as failed");
        }
        tx.commit().await?;
        for copy in &copies {
            queue::push_failed(conn, &self.keys, copy).await?;
        }
        Ok(rows.len())
    }

    async fn sweep_processing(
        &self,
        conn: &mut ConnectionManager,
    ) -> Result<(usize, usize, usize), WorkerError> {
        let (entries, len) = queue::processing(conn, &self.keys, self.config.scan).await?;
        let now_ms = Utc::now().timestamp_millis();
        let grace_ms = self.config.grace.as_millis() as i64;
        let mut old = Vec::new();
        for raw in &entries {
            let seen = queue::first_seen(conn, &self.keys, raw, now_ms).await?;
            if now_ms - seen >= grace_ms {
                old.push(raw.clone());
            }
        }
        // forget entries that left the list by themselves (only when the whole list was read:
        // otherwise an unread entry would lose its first-seen time)
        if len <= entries.len() as i64 {
            let present: HashSet<&String> = entries.iter().collect();
            let gone: Vec<String> = queue::seen_entries(conn, &self.keys)
                .await?
                .into_iter()
                .filter(|e| !present.contains(e))
                .collect();
            queue::forget_seen(conn, &self.keys, &gone).await?;
        }
        if old.is_empty() {
            return Ok((0, 0, 0));
        }

        let decoded: Vec<(String, Option<Delivery>)> = old
            .into_iter()
            .map(|raw| {
                let d = Delivery::decode(&raw);
                (raw, d)
            })
            .collect();
        let ids: Vec<Uuid> = decoded
            .iter()
            .filter_map(|(_, d)| d.as_ref().map(|d| d.task_id))
            .collect();
        let rows: HashMap<Uuid, Task> = tasks::get_many(&self.pool, &ids)
            .await?
            .iter()
            .filter_map(|r| r.to_task().ok().map(|t| (t.id, t)))
            .collect();
        let (mut stale, mut orphans) = (0, 0);
        let mut removed = Vec::new();
        let mut unknown = Vec::new();
        for (raw, delivery) in decoded {
            let verdict = match delivery.as_ref() {
                None => Verdict::Stale,
                Some(d) => match rows.get(&d.task_id) {
                    None => Verdict::Unknown(d.task_id),
                    Some(t) => judge(d, t),
                },
            };
            match verdict {
                Verdict::Live => continue,
                Verdict::Unknown(task_id) => {
                    unknown.push((raw, task_id));
                    continue;
                }
                Verdict::Stale => stale += 1,
                Verdict::Orphan(task_id, attempt) => {
                    orphans += 1;
                    outbox::republish(&self.pool, task_id, attempt).await?;
                    tracing::warn!(task.id = %task_id, attempt, "delivery taken but never claimed; re-publishing");
                }
            }
            queue::ack(conn, &self.keys, &raw).await?;
            removed.push(raw);
        }
        queue::forget_seen(conn, &self.keys, &removed).await?;
        let unknown = self.return_unknown(conn, unknown).await?;
        Ok((stale, orphans, unknown))
    }

    /// Puts processing entries whose task is not in this database back on the queue, for the
    /// deployment whose database holds it (a worker took them and stopped before doing so).
    async fn return_unknown(
        &self,
        conn: &mut ConnectionManager,
        unknown: Vec<(String, Uuid)>,
    ) -> Result<usize, WorkerError> {
        if unknown.is_empty() {
            return Ok(0);
        }
        let raws: Vec<&str> = unknown.iter().map(|(r, _)| r.as_str()).collect();
        let moved = queue::requeue_last(conn, &self.keys, &raws).await?;
        let gone: Vec<String> = unknown.iter().map(|(r, _)| r.clone()).collect();
        queue::forget_seen(conn, &self.keys, &gone).await?;
        self.metrics
            .observe_skipped(SkipReason::TaskNotFound, moved);
        for (_, task_id) in &unknown {
            tracing::warn!(task.id = %task_id, reason = SkipReason::TaskNotFound.as_str(), "processing entry of a task this database does not hold; put back on the queue for its own deployment");
        }
        Ok(moved as usize)
    }

    /// Runs a pass every interval until `shutdown`.
    pub async fn run(&self, shutdown: CancellationToken) {
        while !shutdown.is_cancelled() {
            match self.run_once().await {
                Ok(r) if r != Rescued::default() => tracing::info!(?r, "rescuer pass"),
                Ok(_) => {}
                Err(e) => tracing::error!(error = %e, "rescuer pass failed"),
            }
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(self.config.interval) => {}
            }
        }
        tracing::info!("rescuer stopped");
    }
}

enum Verdict {
    /// The attempt is running (or its lease will expire and be handled): keep the entry.
    Live,
    /// The attempt is over: the entry is garbage.
    Stale,
    /// The attempt never started: publish it again.
    Orphan(Uuid, i32),
    /// The task is not in this database: the entry goes back on the queue for its own.
    Unknown(Uuid),
}

fn judge(d: &Delivery, t: &Task) -> Verdict {
    let running =
        matches!(t.status, TaskStatus::Running | TaskStatus::Cancelled) && t.lease_owner.is_some();
    if running && t.attempts == d.attempt {
        return Verdict::Live;
    }
    let waiting = matches!(t.status, TaskStatus::Queued | TaskStatus::Retrying);
    if waiting && d.attempt == t.next_attempt() {
        return Verdict::Orphan(t.id, d.attempt);
    }
    Verdict::Stale
}
