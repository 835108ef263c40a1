//! The cluster's figures, read from Redis and Postgres at scrape time: each a [`Collector`] of
//! its own source, so one store that does not answer leaves only its families out.

use crate::queue::RedisConn;
use futures::future::BoxFuture;
use sqlx::PgPool;

use super::{Collector, Family, HistogramValue, Result};
use crate::queue::{self, Delivery, Keys};
use crate::store::{failed_copies, outbox, projection};

/// Queue depths and live workers, from Redis (source `redis`).
pub struct QueueCollector {
    pub redis: RedisConn,
    pub keys: Keys,
}

impl Collector for QueueCollector {
    fn source(&self) -> &'static str {
        "redis"
    }

    fn collect(&self) -> BoxFuture<'_, Result<Vec<Family>>> {
        Box::pin(async move {
            let mut conn = self.redis.clone();
            let (waiting, processing, failed) = queue::depths(&mut conn, &self.keys).await?;
            let workers = queue::live_workers(&mut conn, &self.keys).await?;
            let depth = Family::gauge(
                "arnela_queue_depth",
                "Entries on the Redis lists: tasks (waiting deliveries), processing (taken, \
                 not yet acknowledged), failed (dead-letter copies).",
            )
            .with(&[("list", "tasks")], waiting as f64)
            .with(&[("list", "processing")], processing as f64)
            .with(&[("list", "failed")], failed as f64);
            let live = Family::gauge(
                "arnela_workers_live",
                "Workers in every process whose heartbeat is current.",
            )
            .with(&[], workers as f64);
            Ok(vec![depth, live])
        })
    }
}

/// The outbox backlog and the failed list's outbox, from Postgres (source `postgres`).
pub struct OutboxCollector {
    pub pool: PgPool,
}

impl Collector for OutboxCollector {
    fn source(&self) -> &'static str {
        "postgres"
    }

    fn collect(&self) -> BoxFuture<'_, Result<Vec<Family>>> {
        Box::pin(async move {
            let (rows, age) = outbox::backlog(&self.pool).await?;
            let copies = failed_copies::pending(&self.pool).await?;
            Ok(vec![
                Family::gauge(
                    "arnela_outbox_backlog",
                    "Outbox rows that are due and not yet published.",
                )
                .with(&[], rows as f64),
                Family::gauge(
                    "arnela_outbox_oldest_due_age_seconds",
                    "How long the oldest due, unpublished outbox row has waited (0 when none).",
                )
                .with(&[], age.max(0.0)),
                Family::gauge(
                    "arnela_failed_copies_waiting",
                    "Copies of dead-lettered tasks not yet on the failed list (Redis refused them, \
                     or their process died before pushing them; the rescuers push them).",
                )
                .with(&[], copies as f64),
            ])
        })
    }
}

/// The read replica (source `read_replica`): whether it serves the audit reads now and its lag,
/// measured at scrape time, and the reads each server answered in this process.
pub struct ReplicaCollector {
    pub reads: crate::store::replica::Reads,
}

impl Collector for ReplicaCollector {
    fn source(&self) -> &'static str {
        "read_replica"
    }

    fn collect(&self) -> BoxFuture<'_, Result<Vec<Family>>> {
        Box::pin(async move {
            let (replica, primary) = self.reads.served();
            let mut families = vec![Family::counter(
                "arnela_audit_reads_total",
                "Audit reads (the log, task lists, histories, statistics) answered, by the server that answered.",
            )
            .with(&[("source", "replica")], replica as f64)
            .with(&[("source", "primary")], primary as f64)];
            if let Some((state, lag)) = self.reads.replica_state().await {
                let serving = state == crate::store::replica::State::Serving;
                families.push(
                    Family::gauge(
                        "arnela_read_replica_serving",
                        "1 while the read replica serves the audit reads, 0 while the primary does.",
                    )
                    .with(&[], if serving { 1.0 } else { 0.0 }),
                );
                if let Some(lag) = lag {
                    families.push(
                        Family::gauge(
                            "arnela_read_replica_lag_seconds",
                            "How far the read replica is behind the primary (absent when it does not answer or is not a standby).",
                        )
                        .with(&[], lag.as_secs_f64()),
                    );
                }
            }
            Ok(families)
        })
    }
}

/// How long the oldest delivery waiting on the Redis queue has been there (source `queue_age`):
/// the entry at the right end of `{prefix}:tasks` (where workers take from), aged from its
/// outbox row's `published_at` by Postgres's clock. An entry that does not decode, or whose
/// published row is gone (its task was cancelled or already claimed, or it belongs to another
/// database), reads 0, as does an empty queue. It reads both stores, so it has a source of its
/// own: sharing `redis` would count a failure twice and let a Postgres failure mark Redis down.
pub struct QueueAgeCollector {
    pub redis: RedisConn,
    pub keys: Keys,
    pub pool: PgPool,
}

impl Collector for QueueAgeCollector {
    fn source(&self) -> &'static str {
        "queue_age"
    }

    fn collect(&self) -> BoxFuture<'_, Result<Vec<Family>>> {
        Box::pin(async move {
            let mut conn = self.redis.clone();
            // the oldest of each shard's oldest
            let mut age: f64 = 0.0;
            for keys in self.keys.all_shards() {
                let oldest = queue::oldest_waiting(&mut conn, &keys).await?;
                if let Some(d) = oldest.as_deref().and_then(Delivery::decode) {
                    let shard_age = outbox::published_age(&self.pool, d.task_id, d.attempt)
                        .await?
                        .unwrap_or(0.0);
                    age = age.max(shard_age);
                }
            }
            Ok(vec![Family::gauge(
                "arnela_queue_oldest_age_seconds",
                "How long the oldest delivery waiting on the Redis queue has been there (since \
                 its outbox row was published; 0 when the queue is empty).",
            )
            .with(&[], age.max(0.0))])
        })
    }
}

/// The cluster-wide figures the projectors derive from the event log (source `projections`):
/// task totals by type, attempt durations by type and outcome, and each projector's lag.
pub struct ProjectionCollector {
    pub pool: PgPool,
}

impl Collector for ProjectionCollector {
    fn source(&self) -> &'static str {
        "projections"
    }

    fn collect(&self) -> BoxFuture<'_, Result<Vec<Family>>> {
        Box::pin(async move {
            let totals = projection::totals(&self.pool).await?;
            let durations = projection::durations(&self.pool).await?;
            let checkpoints = projection::checkpoints(&self.pool).await?;
            let counter = |name: &str, help: &str, f: fn(&projection::TypeTotals) -> i64| {
                totals.iter().fold(Family::counter(name, help), |fam, t| {
                    fam.with(&[("type", t.task_type.as_str())], f(t) as f64)
                })
            };
            let mut families = vec![
                counter(
                    "arnela_tasks_enqueued_total",
                    "Tasks enqueued, by type (from the event log, cluster-wide).",
                    |t| t.enqueued,
                ),
                counter(
                    "arnela_tasks_succeeded_total",
                    "Tasks that finished successfully, by type (from the event log).",
                    |t| t.succeeded,
                ),
                counter(
                    "arnela_task_attempts_started_total",
                    "Attempts started, by type (from the event log).",
                    |t| t.attempts_started,
                ),
                counter(
                    "arnela_task_attempts_failed_total",
                    "Attempts that failed (retried or not), by type (from the event log).",
                    |t| t.attempts_failed,
                ),
                counter(
                    "arnela_tasks_retried_total",
                    "Retries scheduled after a failed attempt, by type (from the event log).",
                    |t| t.retries,
                ),
                counter(
                    "arnela_tasks_dead_total",
                    "Tasks dead-lettered (failed for good), by type (from the event log).",
                    |t| t.dead,
                ),
                counter(
                    "arnela_tasks_cancelled_total",
                    "Tasks cancelled by an operator, by type (from the event log).",
                    |t| t.cancelled,
                ),
            ];
            let mut histogram = Family::histogram(
                "arnela_task_attempt_duration_seconds",
                "Attempt durations by type and outcome (succeeded, failed), from the event log, \
                 cluster-wide.",
            );
            let mut series: std::collections::BTreeMap<
                (&str, &str),
                Vec<&projection::DurationBucket>,
            > = Default::default();
            for b in &durations {
                series
                    .entry((b.task_type.as_str(), b.outcome.as_str()))
                    .or_default()
                    .push(b);
            }
            for ((task_type, outcome), buckets) in series {
                let mut cumulative = 0u64;
                let mut value = HistogramValue {
                    buckets: Vec::new(),
                    count: 0,
                    sum: 0.0,
                };
                for bound in projection::DURATION_BOUNDS_MS {
                    cumulative += buckets
                        .iter()
                        .filter(|b| b.le_ms == bound)
                        .map(|b| b.count as u64)
                        .sum::<u64>();
                    value.buckets.push((bound as f64 / 1000.0, cumulative));
                }
                value.count = buckets.iter().map(|b| b.count as u64).sum();
                value.sum = buckets.iter().map(|b| b.sum_ms as f64).sum::<f64>() / 1000.0;
                histogram =
                    histogram.with_histogram(&[("type", task_type), ("outcome", outcome)], value);
            }
            families.push(histogram);
            families.push(checkpoints.iter().fold(
                Family::gauge(
                    "arnela_projector_lag_seconds",
                    "Age of the oldest committed event a projector has not applied (0 when caught \
                     up).",
                ),
                |fam, c| fam.with(&[("projector", c.name.as_str())], c.lag_seconds),
            ));
            families.push(checkpoints.iter().fold(
                Family::counter(
                    "arnela_projector_events_total",
                    "Events a projector has applied since it first ran.",
                ),
                |fam, c| fam.with(&[("projector", c.name.as_str())], c.events as f64),
            ));
            Ok(families)
        })
    }
}
