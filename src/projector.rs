//! Projectors: read the global event log from a durable checkpoint and derive something from
//! each event. [`Projector::run_once`] does one batch; [`Projector::run`] loops around it.
//!
//! - **`totals`** counts events per task type into `task_totals` and attempt durations into
//!   `attempt_durations`: the cluster-wide figures of `/health`, `/stats` and `/metrics`, correct
//!   across restarts and any number of worker processes because they come from the log, not from
//!   a process's memory. The counts and the checkpoint commit together: each event is counted
//!   exactly once.
//! - **`cache_invalidation`** turns events into cache invalidations ([`crate::cache::invalidation`]
//!   has the rules): it deletes the keys, then publishes them on `{prefix}:cache:invalidations`,
//!   then commits its checkpoint. If it dies between the two, the next step invalidates the same
//!   keys again: invalidations are at least once, which is harmless for deletes.
//!
//! One batch is one transaction holding the projector's advisory lock (see
//! [`crate::store::projection`]): several instances of a projector may run (one per process);
//! while one works, the others' steps return [`Step::busy`] and do nothing.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::cache::invalidation::{EventFacts, Targets, PAYLOAD_RULES_TYPE};
use crate::cache::{keys, Cache, CacheError, Invalidation};
use crate::domain::EventType;
use crate::store::projection::{self, EventCount, TaskTouched, TypeTotals};
use crate::store::{StoreError, Tx};

#[derive(Debug, thiserror::Error)]
pub enum ProjectorError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cache: {0}")]
    Cache(#[from] CacheError),
}

pub type Result<T, E = ProjectorError> = std::result::Result<T, E>;

/// What a projector derives from the events.
#[derive(Clone)]
pub enum Projection {
    /// Totals per task type and attempt-duration histograms in Postgres.
    Totals,
    /// Cache invalidations in Redis.
    CacheInvalidation(Box<Cache>),
}

/// What one step did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Step {
    /// Events read and applied.
    pub events: usize,
    /// The checkpoint after the step.
    pub position: i64,
    /// Another instance held the projector: this step did nothing.
    pub busy: bool,
}

/// One projector.
#[derive(Clone)]
pub struct Projector {
    pool: PgPool,
    projection: Projection,
    batch: i64,
    /// The cache whose `stats:tasks` the totals feed (see [`Projector::with_stats_cache`]).
    stats_cache: Option<Box<Cache>>,
}

impl Projector {
    /// Events read per step by default.
    pub const BATCH: i64 = 1000;

    pub fn new(pool: PgPool, projection: Projection) -> Projector {
        Projector {
            pool,
            projection,
            batch: Self::BATCH,
            stats_cache: None,
        }
    }

    /// The totals projector also drops the cached task statistics (`stats:tasks`, built from
    /// the totals) before it commits new totals, so they are never served older than the totals
    /// once projected. A Redis failure then fails the step: the totals wait for Redis.
    pub fn with_stats_cache(mut self, cache: Cache) -> Projector {
        self.stats_cache = Some(Box::new(cache));
        self
    }

    pub fn with_batch(mut self, batch: i64) -> Projector {
        self.batch = batch.max(1);
        self
    }

    /// The checkpoint's name.
    pub fn name(&self) -> &'static str {
        match self.projection {
            Projection::Totals => "totals",
            Projection::CacheInvalidation(_) => "cache_invalidation",
        }
    }

    /// Reads up to one batch of events after the checkpoint, applies them and advances the
    /// checkpoint, all in one transaction.
    pub async fn run_once(&self) -> Result<Step> {
        // replayable: a step lost in a crash leaves its checkpoint behind (see `Tx`)
        let mut tx = Tx::begin_replayable(&self.pool).await?;
        match self.step(&mut tx).await {
            Ok(step) => {
                // also ends the read-only steps: the advisory lock is released at once
                tx.commit().await?;
                Ok(step)
            }
            Err(e) => {
                if let Err(r) = tx.rollback().await {
                    tracing::warn!(projector = self.name(), error = %r, "cannot roll back a failed step");
                }
                Err(e)
            }
        }
    }

    async fn step(&self, tx: &mut Tx) -> Result<Step> {
        let Some(from) = projection::try_lock(tx, self.name()).await? else {
            return Ok(Step {
                busy: true,
                ..Step::default()
            });
        };
        let (last, events) = match &self.projection {
            Projection::Totals => {
                let counts = projection::count_after(tx, from, self.batch).await?;
                let Some(batch) =
                    batch_of(counts.first().map(|c| (c.last_position, c.batch_events)))
                else {
                    return Ok(Step {
                        position: from,
                        ..Step::default()
                    });
                };
                let (totals, durations) = count(&counts);
                projection::add_totals(tx, &totals).await?;
                projection::add_durations(tx, &durations).await?;
                if let Some(cache) = &self.stats_cache {
                    cache.delete(&keys::task_stats()).await?;
                }
                batch
            }
            Projection::CacheInvalidation(cache) => {
                let touched =
                    projection::touched_after(tx, from, self.batch, PAYLOAD_RULES_TYPE).await?;
                let Some((last, events)) =
                    batch_of(touched.first().map(|t| (t.last_position, t.batch_events)))
                else {
                    return Ok(Step {
                        position: from,
                        ..Step::default()
                    });
                };
                let targets = invalidations(&touched);
                cache
                    .invalidate(&Invalidation {
                        keys: targets.keys.into_iter().collect(),
                        patterns: targets.patterns.into_iter().collect(),
                        position: Some(last),
                    })
                    .await?;
                (last, events)
            }
        };
        projection::advance(tx, self.name(), last, events).await?;
        Ok(Step {
            events: events as usize,
            position: last,
            busy: false,
        })
    }

    /// Runs steps until `shutdown`: at once while batches come back full, every `idle`
    /// otherwise, backing off (up to 5 s) while steps fail.
    pub async fn run(&self, shutdown: CancellationToken, idle: Duration) {
        let mut failures: u32 = 0;
        loop {
            let wait = match self.run_once().await {
                Ok(step) if step.events as i64 >= self.batch => {
                    failures = 0;
                    Duration::ZERO
                }
                Ok(_) => {
                    failures = 0;
                    idle
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    tracing::error!(projector = self.name(), error = %e, failures, "projector step failed");
                    crate::backoff::Backoff {
                        base: idle.max(crate::backoff::Backoff::LOOP.base),
                        max: crate::backoff::Backoff::LOOP.max,
                    }
                    .delay(failures)
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
}

/// The batch's last position and size, if it holds any event.
fn batch_of(first_row: Option<(i64, i64)>) -> Option<(i64, i64)> {
    first_row.filter(|&(_, n)| n > 0)
}

/// Totals per type and duration buckets of a batch.
type DurationDeltas = BTreeMap<(String, &'static str, i64), (i64, i64)>;

fn count(counts: &[EventCount]) -> (Vec<TypeTotals>, DurationDeltas) {
    let mut totals: HashMap<&str, TypeTotals> = HashMap::new();
    let mut durations = DurationDeltas::new();
    for c in counts {
        let task_type = c.task_type.as_deref().unwrap_or("unknown");
        let Some(event_type) = c.event_type else {
            continue;
        };
        totals
            .entry(task_type)
            .or_insert_with(|| TypeTotals {
                task_type: task_type.to_owned(),
                ..TypeTotals::default()
            })
            .count(event_type, c.count);
        let outcome = match event_type {
            EventType::AttemptSucceeded => "succeeded",
            EventType::AttemptFailed => "failed",
            _ => continue,
        };
        if let Some(ms) = c.duration_ms {
            let ms = ms.max(0);
            let slot = durations
                .entry((task_type.to_owned(), outcome, projection::bucket_of(ms)))
                .or_default();
            slot.0 += c.count;
            slot.1 += ms * c.count;
        }
    }
    let mut totals: Vec<TypeTotals> = totals.into_values().collect();
    totals.sort_by(|a, b| a.task_type.cmp(&b.task_type));
    (totals, durations)
}

fn invalidations(touched: &[TaskTouched]) -> Targets {
    let mut targets = Targets::default();
    for t in touched {
        // every event drops the task's own key; only a success drops more (see `add_event`)
        targets.add_event(EventFacts {
            task_id: t.task_id,
            succeeded: t.succeeded,
            task_type: t.task_type,
            payload: t.payload.as_ref(),
            declared: t.invalidates.as_ref(),
        });
    }
    if !touched.is_empty() {
        targets.keys.insert(keys::task_stats());
    }
    targets
}
