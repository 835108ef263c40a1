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

use crate::cache::invalidation::{EventFacts, Targets};
use crate::cache::{keys, Cache, CacheError, Invalidation};
use crate::store::projection::{self, LogEvent, TypeTotals};
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
        let mut tx = Tx::begin(&self.pool).await?;
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
        let with_payload = matches!(self.projection, Projection::CacheInvalidation(_));
        let events = projection::read_after(tx, from, self.batch, with_payload).await?;
        let Some(last) = events.last().map(|e| e.position) else {
            return Ok(Step {
                position: from,
                ..Step::default()
            });
        };
        match &self.projection {
            Projection::Totals => {
                let (totals, durations) = count(&events);
                projection::add_totals(tx, &totals).await?;
                projection::add_durations(tx, &durations).await?;
                if let Some(cache) = &self.stats_cache {
                    cache.delete(&keys::task_stats()).await?;
                }
            }
            Projection::CacheInvalidation(cache) => {
                let targets = invalidations(&events);
                cache
                    .invalidate(&Invalidation {
                        keys: targets.keys.into_iter().collect(),
                        patterns: targets.patterns.into_iter().collect(),
                        position: Some(last),
                    })
                    .await?;
            }
        }
        projection::advance(tx, self.name(), last, events.len() as i64).await?;
        Ok(Step {
            events: events.len(),
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
                    (idle * 2u32.saturating_pow(failures.min(8))).min(Duration::from_secs(5))
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
}

/// Totals per type and duration buckets of a batch.
type DurationDeltas = BTreeMap<(String, &'static str, i64), (i64, i64)>;

fn count(events: &[LogEvent]) -> (Vec<TypeTotals>, DurationDeltas) {
    let mut totals: HashMap<&str, TypeTotals> = HashMap::new();
    let mut durations = DurationDeltas::new();
    for e in events {
        let task_type = e.task_type.as_deref().unwrap_or("unknown");
        totals
            .entry(task_type)
            .or_insert_with(|| TypeTotals {
                task_type: task_type.to_owned(),
                ..TypeTotals::default()
            })
            .count(&e.event_type);
        let outcome = match e.event_type.as_str() {
            "attempt_succeeded" => "succeeded",
            "attempt_failed" => "failed",
            _ => continue,
        };
        if let Some(ms) = e.data.get("duration_ms").and_then(|v| v.as_i64()) {
            let ms = ms.max(0);
            let slot = durations
                .entry((task_type.to_owned(), outcome, projection::bucket_of(ms)))
                .or_default();
            slot.0 += 1;
            slot.1 += ms;
        }
    }
    let mut totals: Vec<TypeTotals> = totals.into_values().collect();
    totals.sort_by(|a, b| a.task_type.cmp(&b.task_type));
    (totals, durations)
}

fn invalidations(events: &[LogEvent]) -> Targets {
    let mut targets = Targets::default();
    for e in events {
        targets.add_event(EventFacts {
            task_id: e.task_id,
            event_type: &e.event_type,
            task_type: e.task_type.as_deref(),
            payload: e.payload.as_ref(),
            declared: e.invalidates.as_ref(),
        });
    }
    if !events.is_empty() {
        targets.keys.insert(keys::task_stats());
    }
    targets
}
