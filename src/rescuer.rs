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
//!    The failed list has a marker of its own, `{prefix}:tasks:failed:seeded`: a pass that
//!    finds it missing takes it (for [`queue::FAILED_RESTORE_LEASE`], so a rescuer that dies
//!    meanwhile leaves the restore to the next) and puts back the copies of the newest
//!    [`queue::FAILED_LIST_CAP`] tasks that are dead-lettered in Postgres, behind the copies
//!    pushed since the loss, except those still in the failed list's outbox, which are pushed
//!    from there. Bound: one rescuer interval. Every pass first pushes the copies left in
//!    that outbox ([`crate::dead_letters`]): a copy Redis refused, or whose process died before
//!    pushing it, is on the list one rescuer interval after Redis takes pushes again.
//! 2. **Expired leases.** A running attempt whose lease ran out and whose worker process has no
//!    current heartbeat in Redis (it died or hung) is recorded as failed (`lease_expired`) and
//!    retried or dead-lettered by the usual rules. An attempt of a live process is left alone:
//!    its leases lapse only when that process cannot reach Postgres, and it records the
//!    outcome itself when it can again, so an attempt whose outcome is known never runs twice.
//!    Once the lease ran out more than the live-owner grace ago (`LIVE_OWNER_GRACE_SECS`, 120)
//!    *and* this rescuer has been in reach of Postgres for that long, the attempt is taken over
//!    even so: a live owner still holding it would have renewed it by then. The grace counts
//!    from the rescuer's reconnection, so after an outage of any length the owners get the
//!    whole grace to record what they kept (leases that ran out during the outage are all
//!    older than the grace when it ends).
//!    Bound: the lease (or the heartbeat's time to live, if longer) plus one rescuer interval
//!    after the worker stopped.
//! 3. **The processing list.** An entry seen for longer than `grace` is removed when its attempt
//!    is over; if its attempt never started (the worker died between taking and claiming it),
//!    the task's delivery is published again.
//!    An entry whose task is not in this database is put back on the queue for the deployment
//!    whose database holds it (logged and counted, never dropped).
//! 4. **Lost deliveries.** A delivery published longer ago than `republish_after` whose entry is
//!    not in the transit set `{prefix}:tasks:transit` (pushed and not acknowledged; see
//!    [`crate::queue`]) was lost by Redis without the seeded marker going (say the last second
//!    of an `appendfsync everysec` file) and is published again. A delivery that simply waits
//!    in a long queue is in the set and is never published twice. Each pass checks the next
//!    window of published rows, so a backlog of any size is covered in turn.
//! 5. **The lease index.** Step 2 finds running attempts through `task_leases`, which every lease
//!    change writes in the same statement. A process built before that table existed (during a
//!    rolling deploy) writes leases without it, so the first pass and every
//!    [`LEASE_INDEX_EVERY`] after add any lease missing from it (one scan of `tasks`), and drop
//!    rows left for attempts that ended long ago.

use crate::dead_letters::Refusals;
use crate::domain::TaskId;
use crate::queue::RedisConn;
use chrono::{DateTime, Utc};
use sqlx::PgPool;
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::binding::Binding;
use crate::domain::retry::Jitter;
use crate::domain::{FailureKind, RetryPolicy, Task, TaskStatus};
use crate::metrics::{Metrics, SkipReason};
use crate::queue::{self, Delivery, Keys};
use crate::store::transition::{self, Target};
use crate::store::{outbox, tasks, Tx};

/// How long after its lease ran out, and after the rescuer is in reach of Postgres again, an
/// attempt of a live worker process is left to that process (`LIVE_OWNER_GRACE_SECS`).
pub const LIVE_OWNER_GRACE: Duration = Duration::from_secs(120);

/// How often the lease index is checked against the leases in `tasks` (step 5).
pub const LEASE_INDEX_EVERY: Duration = Duration::from_secs(600);

/// Why a rescuer pass stopped.
pub type RescuerError = crate::engine::StepError;

/// Rescuer settings.
#[derive(Clone)]
pub struct RescuerConfig {
    pub interval: Duration,
    /// How long a processing entry may stay before it is examined.
    pub grace: Duration,
    pub republish_after: Duration,
    /// How long a live worker process has to record an attempt whose lease ran out, counted
    /// from the lease's end and from when this rescuer reached Postgres again.
    pub live_owner_grace: Duration,
    /// Expired leases handled per pass.
    pub batch: i64,
    /// Processing entries examined per pass.
    pub scan: isize,
    /// Published deliveries checked against Redis per pass.
    pub reconcile_batch: i64,
    /// Backoff for attempts whose lease expired (the workers' policy).
    pub retry: RetryPolicy,
    pub jitter: Jitter,
}

impl Default for RescuerConfig {
    fn default() -> Self {
        RescuerConfig {
            interval: Duration::from_secs(1),
            grace: Duration::from_secs(30),
            republish_after: Duration::from_secs(10),
            live_owner_grace: LIVE_OWNER_GRACE,
            batch: 100,
            scan: 1000,
            reconcile_batch: 2000,
            retry: RetryPolicy::default(),
            jitter: std::sync::Arc::new(rand::random::<f64>),
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
    /// Published deliveries missing from Redis, re-published.
    pub republished_lost: u64,
    /// Processing entries whose task is not in this database, put back on the queue.
    pub returned_unknown: usize,
    /// Leases found in `tasks` that `task_leases` did not list, now listed.
    pub leases_indexed: u64,
    /// Copies of dead-lettered tasks put back on the failed list after Redis lost it.
    pub failed_restored: usize,
    /// Copies of dead-lettered tasks left in the failed list's outbox (their push failed, or
    /// their process died before it), pushed now.
    pub failed_copies_pushed: usize,
}

pub struct Rescuer {
    pool: PgPool,
    redis: RedisConn,
    keys: Keys,
    config: RescuerConfig,
    /// Where the next check of published deliveries starts (`None`: from the oldest).
    cursor: Mutex<Option<(DateTime<Utc>, i64)>>,
    /// When the lease index was last checked (`None`: never, so the first pass does).
    lease_index_checked: Mutex<Option<std::time::Instant>>,
    /// Since when Postgres has been in reach of this rescuer (`None`: not since its last pass
    /// that found it out of reach; set by the next pass that checks expired leases).
    in_reach_since: Mutex<Option<std::time::Instant>>,
    binding: Binding,
    metrics: Metrics,
    /// What pushes of dead-letter copies met in this process.
    failed_pushes: Refusals,
}

impl Rescuer {
    pub fn new(pool: PgPool, redis: RedisConn, keys: Keys, config: RescuerConfig) -> Rescuer {
        Rescuer {
            binding: Binding::new(pool.clone(), keys.clone()),
            metrics: Metrics::new(),
            pool,
            redis,
            keys,
            config,
            cursor: Mutex::new(None),
            lease_index_checked: Mutex::new(None),
            in_reach_since: Mutex::new(None),
            failed_pushes: Default::default(),
        }
    }

    /// Counts skipped deliveries in `metrics` (by default in a registry of the rescuer's own).
    pub fn with_metrics(mut self, metrics: Metrics) -> Rescuer {
        self.metrics = metrics;
        self
    }

    /// Shares what the pushes of dead-letter copies meet with the process's workers (see
    /// [`Refusals`]).
    pub fn with_failed_pushes(mut self, refusals: Refusals) -> Rescuer {
        self.failed_pushes = refusals;
        self
    }

    /// One pass of every check. A pass that finds Postgres out of reach restarts the live
    /// owners' grace (see the module docs).
    pub async fn run_once(&self) -> Result<Rescued, RescuerError> {
        let pass = self.pass().await;
        if pass.as_ref().is_err_and(RescuerError::is_unavailable) {
            *self.in_reach_since.lock().expect("rescuer reach clock") = None;
        }
        pass
    }

    async fn pass(&self) -> Result<Rescued, RescuerError> {
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
        // the failed list is a copy: a Redis that refuses it does not stop the other checks
        match self
            .failed_pushes
            .push(&self.pool, &mut conn, &self.keys)
            .await
        {
            Ok(n) => out.failed_copies_pushed = n,
            Err(e) if e.is_unavailable() => return Err(e),
            // logged by `push`
            Err(_) => {}
        }
        out.failed_restored = self.restore_failed_list(&mut conn).await?;
        if out.failed_restored > 0 {
            tracing::warn!(
                copies = out.failed_restored,
                "Redis had lost the failed list; copies of the dead-lettered tasks put back from Postgres"
            );
        }
        let due = self
            .lease_index_checked
            .lock()
            .expect("lease index clock")
            .is_none_or(|at| at.elapsed() >= LEASE_INDEX_EVERY);
        if due {
            out.leases_indexed = tasks::index_leases(&self.pool).await?;
            *self.lease_index_checked.lock().expect("lease index clock") =
                Some(std::time::Instant::now());
            if out.leases_indexed > 0 {
                tracing::warn!(
                    leases = out.leases_indexed,
                    "leases missing from the lease index (written by an older process) added"
                );
            }
        }
        out.leases_expired = self.expire_leases(&mut conn).await?;
        let (mut stale, mut orphans, mut unknown) = (0, 0, 0);
        for keys in self.keys.all_shards() {
            let (s, o, u) = self.sweep_processing(&mut conn, &keys).await?;
            (stale, orphans, unknown) = (stale + s, orphans + o, unknown + u);
        }
        out.stale_entries = stale;
        out.orphans = orphans;
        out.returned_unknown = unknown;
        out.republished_lost = self.reconcile(&mut conn).await?;
        Ok(out)
    }

    async fn expire_leases(&self, conn: &mut RedisConn) -> Result<usize, RescuerError> {
        // an attempt of a process whose heartbeat is current is left to that process, which
        // renews it or records its outcome once it reaches the database again
        let live_owners: Vec<Uuid> = queue::live_processes(conn, &self.keys)
            .await?
            .iter()
            .filter_map(|(id, _)| id.parse().ok())
            .collect();
        let mut tx = Tx::begin(&self.pool).await?;
        // their owners get the whole grace once Postgres is in reach again
        let in_reach_for = self
            .in_reach_since
            .lock()
            .expect("rescuer reach clock")
            .get_or_insert_with(std::time::Instant::now)
            .elapsed();
        let grace = self.config.live_owner_grace;
        let target = Target::ExpiredLeases {
            limit: self.config.batch,
            live_owners: &live_owners,
            live_grace: (in_reach_for >= grace).then_some(grace),
        };
        let applied = transition::apply(&mut tx, target, |task, now| {
            let worker = task.lease_owner.map(|w| w.to_string()).unwrap_or_default();
            let error = format!("lease expired: worker {worker} stopped renewing it");
            let decision = self
                .config
                .retry
                .decision(task.attempts, &self.config.jitter, None);
            Ok(Some(task.fail(
                FailureKind::LeaseExpired,
                error,
                0,
                now,
                decision,
            )?))
        })
        .await?;
        tx.commit().await?;
        for c in &applied.changed {
            tracing::warn!(task.id = %c.after.id, attempt = c.before.attempts, "lease expired; attempt recorded as failed");
        }
        // committed with their copies: a Redis error leaves them for the next pass, and this
        // pass goes on (the failed list is a copy; the other checks do not depend on it)
        if !applied.dead_letters.is_empty() {
            // logged by `push`; the copies wait for the next pass
            let _ = self.failed_pushes.push(&self.pool, conn, &self.keys).await;
        }
        Ok(applied.changed.len())
    }

    /// Restores the failed list if its marker is missing and this pass takes the restore (see
    /// the module docs); a restore that fails is given up for the next pass to try.
    async fn restore_failed_list(&self, conn: &mut RedisConn) -> Result<usize, RescuerError> {
        if !queue::take_failed_restore(conn, &self.keys).await? {
            return Ok(0);
        }
        let restored = match tasks::dead_lettered(&self.pool, queue::FAILED_LIST_CAP as i64).await {
            Ok(dead) => queue::restore_failed(conn, &self.keys, &dead)
                .await
                .map_err(RescuerError::from),
            Err(e) => Err(e.into()),
        };
        if restored.is_err() {
            if let Err(e) = queue::give_up_failed_restore(conn, &self.keys).await {
                tracing::error!(error = %e, "cannot give the failed list's restore up; the next rescuer takes it once its lease ends");
            }
        }
        restored
    }

    /// Re-publishes published deliveries that Redis no longer holds in transit; checks the next
    /// window of published rows.
    async fn reconcile(&self, conn: &mut RedisConn) -> Result<u64, RescuerError> {
        let after = *self.cursor.lock().expect("rescuer cursor");
        let rows = outbox::published_before(
            &self.pool,
            self.config.republish_after,
            after,
            self.config.reconcile_batch,
        )
        .await?;
        let next = if (rows.len() as i64) < self.config.reconcile_batch {
            None
        } else {
            rows.last().map(|r| (r.published_at, r.id))
        };
        *self.cursor.lock().expect("rescuer cursor") = next;
        let raws: Vec<String> = rows
            .iter()
            .map(|r| {
                Delivery {
                    task_id: r.task_id,
                    attempt: r.attempt,
                    task_type: r.task_type.clone(),
                }
                .encode()
            })
            .collect();
        let present = queue::in_transit(conn, &self.keys, &raws).await?;
        let lost: Vec<i64> = rows
            .iter()
            .zip(present)
            .filter(|(_, held)| !held)
            .map(|(r, _)| r.id)
            .collect();
        if lost.is_empty() {
            return Ok(0);
        }
        let n = outbox::republish_ids(&self.pool, &lost).await?;
        if n > 0 {
            tracing::warn!(
                deliveries = n,
                "published deliveries are missing from Redis; re-publishing them"
            );
        }
        Ok(n)
    }

    async fn sweep_processing(
        &self,
        conn: &mut RedisConn,
        keys: &Keys,
    ) -> Result<(usize, usize, usize), RescuerError> {
        let (entries, len) = queue::processing(conn, keys, self.config.scan).await?;
        let now_ms = Utc::now().timestamp_millis();
        let grace_ms = self.config.grace.as_millis() as i64;
        let mut old = Vec::new();
        for raw in &entries {
            let seen = queue::first_seen(conn, keys, raw, now_ms).await?;
            if now_ms - seen >= grace_ms {
                old.push(raw.clone());
            }
        }
        // forget entries that left the list by themselves (only when the whole list was read:
        // otherwise an unread entry would lose its first-seen time)
        if len <= entries.len() as i64 {
            let present: HashSet<&String> = entries.iter().collect();
            let gone: Vec<String> = queue::seen_entries(conn, keys)
                .await?
                .into_iter()
                .filter(|e| !present.contains(e))
                .collect();
            queue::forget_seen(conn, keys, &gone).await?;
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
        let ids: Vec<TaskId> = decoded
            .iter()
            .filter_map(|(_, d)| d.as_ref().map(|d| d.task_id))
            .collect();
        let rows: HashMap<TaskId, Task> = tasks::get_many(&self.pool, &ids)
            .await?
            .into_iter()
            .map(|t| (t.id, t))
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
            queue::ack(conn, keys, &raw).await?;
            removed.push(raw);
        }
        queue::forget_seen(conn, keys, &removed).await?;
        let unknown = self.return_unknown(conn, keys, unknown).await?;
        Ok((stale, orphans, unknown))
    }

    /// Puts processing entries whose task is not in this database back on the queue, for the
    /// deployment whose database holds it (a worker took them and stopped before doing so).
    async fn return_unknown(
        &self,
        conn: &mut RedisConn,
        keys: &Keys,
        unknown: Vec<(String, TaskId)>,
    ) -> Result<usize, RescuerError> {
        if unknown.is_empty() {
            return Ok(0);
        }
        let raws: Vec<&str> = unknown.iter().map(|(r, _)| r.as_str()).collect();
        let moved = queue::requeue_last(conn, keys, &raws).await?;
        let gone: Vec<String> = unknown.iter().map(|(r, _)| r.clone()).collect();
        queue::forget_seen(conn, keys, &gone).await?;
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
    Orphan(TaskId, i32),
    /// The task is not in this database: the entry goes back on the queue for its own.
    Unknown(TaskId),
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
