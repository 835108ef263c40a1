//! The outbox relay: moves due outbox rows to the Redis queue and records that each task was
//! dispatched. [`Relay::run_once`] does one batch; [`Relay::run`] loops around it. New tasks due
//! now are published by their own enqueue instead ([`Publisher`]); the relays publish the rest
//! (scheduled tasks, retries, requeues, re-publishing, and what an enqueue could not publish).
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
use crate::metrics::{LeftToRelays, Metrics};
use crate::queue::{self, Delivery, Keys};
use crate::store::outbox::OutboxListener;
use crate::store::tasks::Dispatched;
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

/// How long enqueues leave their deliveries to the relays after the namespace could not be
/// verified or a push failed, before trying Redis again (an unreachable Redis must not cost
/// every request a failed round trip).
const UNAVAILABLE_FOR: Duration = Duration::from_secs(5);

/// The longest a check of the namespace may take; past it the enqueues leave their deliveries
/// to the relays (for [`UNAVAILABLE_FOR`]).
const CHECK_TIMEOUT: Duration = Duration::from_millis(250);

/// How long a successful check of the namespace holds (as [`crate::binding::VERIFY_EVERY`]).
const VERIFIED_FOR: Duration = crate::binding::VERIFY_EVERY;

/// How long enqueues leave their deliveries to the relays after finding the namespace not yet
/// seeded (a relay or rescuer seeds it within one of its passes).
const NOT_SEEDED_RECHECK: Duration = Duration::from_millis(100);

/// The longest an enqueue waits for its push after the commit; past it the rows go back to the
/// relays (a push that lands later only duplicates a delivery, which the claim refuses).
const PUSH_TIMEOUT: Duration = Duration::from_secs(1);

/// The API's publication of what it has just enqueued: the relay's step for new tasks that are
/// due now, without the relay's transaction.
///
/// [`crate::store::tasks::enqueue_dispatched`] records each such task's `dispatched` event and
/// writes its outbox row published, in the enqueue's own transaction; after the commit,
/// [`Publisher::publish`] pushes the deliveries (the relay's `LPUSH` and `SADD` to the transit
/// set). The order is the reverse of the relay's (push, then commit): the enqueue's commit is
/// what makes the task exist, and nothing reaches Redis for a task Postgres does not hold
/// committed.
///
/// - Before the transaction, [`Publisher::ready`] checks that the namespace serves this
///   database and is seeded (at most once a second); if it cannot (Redis unreachable, bound
///   elsewhere, not seeded yet), the enqueue writes its rows unpublished and the relays take
///   them, as they take scheduled tasks and retries.
/// - A push that fails marks its rows unpublished again, so the relays publish them, and the
///   enqueues of the next [`UNAVAILABLE_FOR`] leave theirs to the relays without trying.
/// - A push that never happens (the process died between the commit and the push, or the rows
///   could not be marked unpublished either) leaves a published row whose delivery is in
///   neither list nor transit set: the rescuer's transit check publishes it again after
///   `REPUBLISH_AFTER_SECS`.
/// - Redis emptied around the push: the relays and rescuers re-seed from Postgres (their
///   seeded marker), which re-publishes rows committed before it; a push landing after a
///   re-seed is a duplicate at worst.
#[derive(Clone)]
pub struct Publisher {
    inner: Arc<PublisherInner>,
}

struct PublisherInner {
    pool: PgPool,
    redis: RedisConn,
    keys: Keys,
    binding: Binding,
    waker: outbox::OutboxWaker,
    metrics: Metrics,
    state: std::sync::Mutex<PublisherState>,
    /// Held by the one request that checks the namespace; the others wait for its verdict
    /// instead of asking Redis too.
    checking: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct PublisherState {
    /// Until when the last successful check holds.
    verified_until: Option<std::time::Instant>,
    /// Until when enqueues leave their deliveries to the relays without asking Redis, and why.
    unavailable_until: Option<(std::time::Instant, LeftToRelays)>,
}

impl Publisher {
    pub fn new(
        pool: PgPool,
        redis: RedisConn,
        keys: Keys,
        waker: outbox::OutboxWaker,
        metrics: Metrics,
    ) -> Publisher {
        Publisher {
            inner: Arc::new(PublisherInner {
                binding: Binding::new(pool.clone(), keys.clone()),
                pool,
                redis,
                keys,
                waker,
                metrics,
                state: std::sync::Mutex::default(),
                checking: tokio::sync::Mutex::new(()),
            }),
        }
    }

    /// Whether an enqueue may publish its deliveries itself: within the last second the
    /// namespace was seen to serve this database ([`Binding::check`]) and to be seeded (the
    /// marker relays and rescuers set, [`queue::mark_seeded_bound`]). Without the marker the
    /// first relay or rescuer to set it re-publishes everything in transit, so a delivery
    /// pushed before would be pushed twice; the enqueue leaves it to the relays instead. When
    /// not ready, the reason is counted for `n` deliveries (and an unusable namespace logged, at
    /// most once per [`UNAVAILABLE_FOR`]).
    pub async fn ready(&self, n: usize) -> bool {
        let me = &self.inner;
        if let Some(verdict) = self.known(n) {
            return verdict;
        }
        // one check at a time; whoever waited for it reads its verdict
        let _checking = me.checking.lock().await;
        if let Some(verdict) = self.known(n) {
            return verdict;
        }
        let now = std::time::Instant::now();
        let mut conn = me.redis.clone();
        let checked = tokio::time::timeout(CHECK_TIMEOUT, async {
            me.binding.check(&mut conn).await?;
            Ok::<_, crate::binding::BindingError>(queue::seeded_epoch(&mut conn, &me.keys).await?)
        })
        .await;
        let (reason, wait) = match checked {
            Ok(Ok(Some(_))) => {
                me.state.lock().expect("publisher state").verified_until = Some(now + VERIFIED_FOR);
                return true;
            }
            Ok(Ok(None)) => (LeftToRelays::NotSeeded, NOT_SEEDED_RECHECK),
            Ok(Err(e)) => {
                tracing::warn!(
                    error = %e,
                    "enqueues leave their deliveries to the relays for {UNAVAILABLE_FOR:?}"
                );
                (LeftToRelays::NamespaceUnavailable, UNAVAILABLE_FOR)
            }
            Err(_) => {
                tracing::warn!(
                    "no answer from Redis within {CHECK_TIMEOUT:?}; enqueues leave their \
                     deliveries to the relays for {UNAVAILABLE_FOR:?}"
                );
                (LeftToRelays::NamespaceUnavailable, UNAVAILABLE_FOR)
            }
        };
        me.state.lock().expect("publisher state").unavailable_until = Some((now + wait, reason));
        me.metrics.observe_enqueue_left_to_relays(reason, n);
        false
    }

    /// The verdict of the last check while it holds (counting a "no" for `n` deliveries).
    fn known(&self, n: usize) -> Option<bool> {
        let me = &self.inner;
        let now = std::time::Instant::now();
        let state = me.state.lock().expect("publisher state");
        if state.verified_until.is_some_and(|until| now < until) {
            return Some(true);
        }
        let (_, reason) = state.unavailable_until.filter(|(until, _)| now < *until)?;
        me.metrics.observe_enqueue_left_to_relays(reason, n);
        Some(false)
    }

    /// Pushes the deliveries of attempt 1 of `dispatched` (committed by
    /// [`crate::store::tasks::enqueue_dispatched`]). If the push fails, their rows are marked
    /// unpublished and the relays woken; if that fails too, the rescuer's transit check finds
    /// them (see the type's docs). Either way the enqueue has succeeded: the error is logged,
    /// not returned.
    ///
    /// The push and its fallback run in a task of their own, which the caller awaits: a request
    /// dropped after its commit (the client went away) still publishes its deliveries.
    pub async fn publish(&self, dispatched: Vec<Dispatched>) {
        if dispatched.is_empty() {
            return;
        }
        let publisher = self.clone();
        let pushed = tokio::spawn(async move { publisher.push(&dispatched).await });
        if let Err(e) = pushed.await {
            tracing::error!(error = %e, "the push of new deliveries did not finish");
        }
    }

    async fn push(&self, dispatched: &[Dispatched]) {
        let me = &self.inner;
        let deliveries: Vec<Delivery> = dispatched
            .iter()
            .map(|d| Delivery {
                task_id: d.task_id,
                attempt: 1,
                task_type: d.task_type.to_string(),
            })
            .collect();
        let mut conn = me.redis.clone();
        let pushed = tokio::time::timeout(
            PUSH_TIMEOUT,
            queue::publish(&mut conn, &me.keys, &deliveries),
        )
        .await;
        let error = match pushed {
            Ok(Ok(())) => {
                me.metrics.observe_enqueue_published(deliveries.len());
                return;
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer from Redis within {PUSH_TIMEOUT:?}"),
        };
        me.metrics
            .observe_enqueue_left_to_relays(LeftToRelays::PushFailed, deliveries.len());
        {
            let mut state = me.state.lock().expect("publisher state");
            state.verified_until = None;
            state.unavailable_until = Some((
                std::time::Instant::now() + UNAVAILABLE_FOR,
                LeftToRelays::NamespaceUnavailable,
            ));
        }
        let pairs: Vec<(TaskId, i32)> = dispatched.iter().map(|d| (d.task_id, 1)).collect();
        match self.unpublish(&pairs).await {
            Ok(n) => {
                tracing::warn!(
                    error = %error,
                    deliveries = n,
                    "cannot push new deliveries; the relays will publish them"
                );
                me.waker.wake();
            }
            Err(e) => tracing::error!(
                error = %error,
                unpublish_error = %e,
                deliveries = pairs.len(),
                "cannot push new deliveries nor give them back to the relays; the rescuer's \
                 transit check will publish them again"
            ),
        }
    }

    /// One statement, atomic by itself.
    async fn unpublish(&self, pairs: &[(TaskId, i32)]) -> crate::store::Result<u64> {
        outbox::unpublish(&mut Tx::autocommit(&self.inner.pool).await?, pairs).await
    }
}
