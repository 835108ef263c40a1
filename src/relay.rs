//! The outbox relay: moves due outbox rows to the Redis queue and records that each task was
//! dispatched. [`Relay::run_once`] does one batch; [`Relay::run`] loops around it.
//!
//! One batch is one transaction: lock up to `batch` due rows (`FOR UPDATE SKIP LOCKED`, so any
//! number of relays share the work), lock their tasks, append a `dispatched` event to each task
//! still waiting for that attempt, push the deliveries to Redis in one command (in outbox order),
//! mark the rows published, commit. Rows whose task moved on (cancelled, already claimed) are
//! deleted instead.
//!
//! The push happens before the commit. If the relay dies between the two, the rows stay
//! unpublished and are pushed again: the second delivery of the same attempt is refused by the
//! worker's claim, so the duplicate is harmless. The reverse order could lose a delivery.
//!
//! Before each batch the relay checks that the Redis namespace serves its database
//! ([`crate::binding`]); if it does not, the batch fails with [`RelayError::Binding`] and nothing
//! is published.
//!
//! Wake-ups: `LISTEN arnela_outbox` (the API notifies after enqueues commit, at most once per
//! couple of milliseconds), the due time of the next scheduled row, and a polling interval as the
//! fallback for missed notifications or a pooler that drops them.

use crate::domain::TaskId;
use crate::queue::RedisConn;
use chrono::Utc;
use sqlx::PgPool;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::binding::Binding;
use crate::domain::TaskStatus;
use crate::metrics::Metrics;
use crate::queue::{self, Delivery, Keys};
use crate::store::outbox::OutboxListener;
use crate::store::transition::{self, Lock, Payload, Target};
use crate::store::{outbox, Tx};

/// The shortest sleep between batches when nothing was claimed (rows another relay holds must
/// not make this one spin).
const MIN_WAIT: Duration = Duration::from_millis(10);

/// The channel enqueues notify (see [`outbox::OutboxWaker`]).
pub use crate::store::outbox::CHANNEL;

/// Errors that stop one relay batch (the loop logs them and carries on).
pub type RelayError = crate::engine::StepError;

pub type Result<T, E = RelayError> = std::result::Result<T, E>;

/// Relay settings.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Rows per batch.
    pub batch: i64,
    /// Longest sleep without a notification.
    pub poll: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            batch: 500,
            poll: Duration::from_millis(500),
        }
    }
}

/// How often a relay whose `LISTEN` connection failed tries it again (it polls meanwhile).
const LISTEN_RETRY: Duration = Duration::from_secs(5);

/// What one batch did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Batch {
    /// Rows claimed.
    pub claimed: usize,
    /// Deliveries pushed to Redis.
    pub published: usize,
    /// Rows dropped because their task no longer waits for that attempt.
    pub dropped: usize,
}

pub struct Relay {
    pool: PgPool,
    redis: RedisConn,
    keys: Keys,
    config: RelayConfig,
    metrics: Metrics,
    binding: Binding,
    listen: Listen,
}

/// Where a relay `LISTEN`s for new outbox rows.
#[derive(Clone, Debug)]
pub enum Listen {
    /// On a connection of the relay's pool (Postgres itself, or a pooler in session mode).
    Pool,
    /// On this pool's connection straight to Postgres (`DATABASE_LISTEN_URL`): behind a
    /// transaction pooler a `LISTEN` stays on whichever server session ran it.
    Direct(PgPool),
    /// Nowhere: the relay polls every [`RelayConfig::poll`].
    Off,
}

impl Relay {
    pub fn new(pool: PgPool, redis: RedisConn, keys: Keys, config: RelayConfig) -> Relay {
        Relay {
            binding: Binding::new(pool.clone(), keys.clone()),
            pool,
            redis,
            keys,
            config,
            metrics: Metrics::new(),
            listen: Listen::Pool,
        }
    }

    /// Listens for new outbox rows there (by default on a connection of the pool).
    pub fn with_listen(mut self, listen: Listen) -> Relay {
        self.listen = listen;
        self
    }

    /// Records batches in `metrics` (by default in a registry of the relay's own).
    pub fn with_metrics(mut self, metrics: Metrics) -> Relay {
        self.metrics = metrics;
        self
    }

    /// Publishes one batch of due rows.
    pub async fn run_once(&self) -> Result<Batch> {
        // Before anything reaches this Redis, make sure it holds what Postgres says is in
        // transit (the rescuer checks the same marker; whoever sets it re-publishes).
        let mut conn = self.redis.clone();
        let (reseeded, epoch) = self.binding.mark_seeded(&mut conn).await?;
        if reseeded {
            let n = outbox::republish_all(&self.pool).await?;
            if n > 0 {
                tracing::warn!(
                    deliveries = n,
                    "Redis had lost its queue; re-publishing from Postgres"
                );
            }
        }
        // replayable: a batch lost in a crash leaves its rows unpublished (see `Tx`)
        let mut tx = Tx::begin_replayable(&self.pool).await?;
        let due = outbox::claim_due(&mut tx, self.config.batch).await?;
        if due.is_empty() {
            return Ok(Batch::default());
        }
        let ids: Vec<TaskId> = due.iter().map(|d| d.task_id).collect();
        let carried: HashSet<(TaskId, i32)> = due.iter().map(|d| (d.task_id, d.attempt)).collect();
        let applied = transition::apply(
            &mut tx,
            Target::Ids(&ids, Lock::Wait, Payload::Skip),
            |task, _| {
                // a task still waiting for the attempt a row carries is dispatched (once per batch)
                let waiting = matches!(task.status, TaskStatus::Queued | TaskStatus::Retrying);
                if !waiting || !carried.contains(&(task.id, task.next_attempt())) {
                    return Ok(None);
                }
                Ok(Some(vec![task.dispatch(task.next_attempt())?]))
            },
        )
        .await?;
        let unreadable: HashSet<TaskId> = applied.unreadable.iter().copied().collect();
        // one delivery per dispatched task, in outbox order; every other row is dropped (its
        // task moved on, or it repeats a row of the same attempt)
        let mut deliveries = Vec::new();
        let mut publish_ids = Vec::new();
        let mut drop_ids = Vec::new();
        let mut sent = HashSet::new();
        for d in &due {
            let dispatched = applied
                .get(d.task_id)
                .filter(|c| c.before.next_attempt() == d.attempt);
            if let Some(change) = dispatched.filter(|_| sent.insert(d.task_id)) {
                publish_ids.push(d.id);
                deliveries.push(Delivery {
                    task_id: d.task_id,
                    attempt: d.attempt,
                    task_type: change.after.task_type.to_string(),
                });
            } else if !unreadable.contains(&d.task_id) {
                // rows of unreadable tasks stay for a build that can read them
                drop_ids.push(d.id);
            }
        }
        outbox::mark_published(&mut tx, &publish_ids, applied.now).await?;
        if !drop_ids.is_empty() {
            outbox::delete(&mut tx, &drop_ids).await?;
        }
        // Push before commit: a crash in between re-publishes (harmless), never loses.
        queue::publish(&mut conn, &self.keys, &deliveries).await?;
        tx.commit().await?;
        self.metrics
            .observe_relay_batch(due.len(), deliveries.len());
        // A Redis loss between the push and the commit may have been repaired (marker re-set,
        // published rows re-published) before these rows counted as published: publish them
        // again rather than leave them for the safety net.
        if !publish_ids.is_empty() && queue::seeded_epoch(&mut conn, &self.keys).await? != epoch {
            let n = outbox::republish_ids(&self.pool, &publish_ids).await?;
            tracing::warn!(
                deliveries = n,
                "Redis was reset during a batch; re-publishing it"
            );
        }
        Ok(Batch {
            claimed: due.len(),
            published: deliveries.len(),
            dropped: drop_ids.len(),
        })
    }

    /// Publishes until `shutdown`, waking on notifications, due times and the poll interval.
    pub async fn run(&self, shutdown: CancellationToken) {
        let stop_listening = shutdown.child_token();
        let wake = self.spawn_listener(stop_listening.clone());
        let mut failures = 0u32;
        while !shutdown.is_cancelled() {
            let full = match self.run_once().await {
                Ok(b) => {
                    failures = 0;
                    if b.published > 0 {
                        tracing::debug!(
                            published = b.published,
                            dropped = b.dropped,
                            "relay batch"
                        );
                    }
                    b.claimed as i64 >= self.config.batch
                }
                Err(e) => {
                    failures += 1;
                    tracing::error!(error = %e, "relay batch failed");
                    false
                }
            };
            if full {
                continue;
            }
            let wait = if failures > 0 {
                crate::backoff::Backoff::LOOP.delay(failures)
            } else {
                self.until_next_due().await
            };
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(wait) => {}
                () = wake.notified() => {}
            }
        }
        stop_listening.cancel();
        tracing::info!("relay stopped");
    }

    /// Keeps a `LISTEN` connection (see [`Listen`]) in a task of its own, reconnecting every
    /// [`LISTEN_RETRY`] while it cannot, so the relay's loop never waits for it; each
    /// notification (or one that arrived while the loop was busy) wakes the loop once.
    fn spawn_listener(&self, stop: CancellationToken) -> Arc<Notify> {
        let wake = Arc::new(Notify::new());
        let pool = match &self.listen {
            Listen::Pool => self.pool.clone(),
            Listen::Direct(direct) => direct.clone(),
            Listen::Off => return wake,
        };
        let notify = wake.clone();
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                match OutboxListener::connect(&pool).await {
                    Ok(mut listener) => loop {
                        tokio::select! {
                            () = stop.cancelled() => return,
                            received = listener.recv() => match received {
                                Ok(()) => notify.notify_one(),
                                Err(e) => {
                                    tracing::warn!(error = %e, "LISTEN connection lost; polling until it is back");
                                    break;
                                }
                            },
                        }
                    },
                    Err(e) => tracing::warn!(error = %e, "cannot LISTEN; polling meanwhile"),
                }
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(LISTEN_RETRY) => {}
                }
            }
        });
        wake
    }

    /// The poll interval, or less if a scheduled row falls due sooner.
    async fn until_next_due(&self) -> Duration {
        match outbox::next_due(&self.pool).await {
            Ok(Some(at)) => (at - Utc::now())
                .to_std()
                .unwrap_or(Duration::ZERO)
                .clamp(MIN_WAIT, self.config.poll.max(MIN_WAIT)),
            Ok(None) => self.config.poll,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the next due time");
                self.config.poll
            }
        }
    }
}
