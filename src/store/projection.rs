//! Read models projected from the global event log: projector checkpoints, cluster-wide task
//! totals and attempt-duration histograms (see [`crate::projector`]).
//!
//! **Exclusivity.** A projector step runs in one transaction that first takes a transaction-level
//! advisory lock on the projector's name ([`try_lock`]). Another instance of the same projector
//! finds the lock taken and skips its step, so any number of processes may run every projector
//! and each event is still applied once. The advisory lock does not give the transaction an id,
//! so holding it does not hold back the log's horizon for other readers.
//!
//! **Resuming.** The checkpoint row is advanced in the same transaction as the totals derived from
//! the events read ([`advance`]): a crash before the commit leaves both untouched, and the next
//! step reads the same events again. The log is read with the same commit-safe horizon as
//! `GET /events`, so an event whose transaction commits late is read later, never skipped.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{FromRow, PgPool};
use std::collections::BTreeMap;
use uuid::Uuid;

use super::{Result, Tx};

/// One event of the log with what the projectors need to know about its task (from the task's
/// own first event, `enqueued`).
#[derive(Debug, Clone, PartialEq, FromRow)]
pub struct LogEvent {
    pub position: i64,
    pub task_id: Uuid,
    pub sequence: i32,
    pub event_type: String,
    pub data: Value,
    pub recorded_at: DateTime<Utc>,
    /// `enqueued.task_type` of the task.
    pub task_type: Option<String>,
    /// `enqueued.payload` of the task.
    pub payload: Option<Value>,
    /// `enqueued.invalidates` of the task: cache keys or patterns to drop when it succeeds.
    pub invalidates: Option<Value>,
}

/// Takes the projector's lock for the rest of `tx`; `None` when another instance holds it.
/// Otherwise returns the checkpoint (0 for a projector that never ran).
pub async fn try_lock(tx: &mut Tx, name: &str) -> Result<Option<i64>> {
    let locked: bool =
        sqlx::query_scalar("SELECT pg_try_advisory_xact_lock(hashtextextended($1, 0))")
            .bind(format!("arnela.projector.{name}"))
            .fetch_one(tx.conn())
            .await?;
    if !locked {
        return Ok(None);
    }
    let position: Option<i64> =
        sqlx::query_scalar("SELECT position FROM projector_checkpoints WHERE name = $1")
            .bind(name)
            .fetch_optional(tx.conn())
            .await?;
    Ok(Some(position.unwrap_or(0)))
}

/// Up to `limit` events after `after`, below the commit-safe horizon, in log order. The task's
/// payload and `invalidates` are read only `with_payload` (the totals need the type alone).
pub async fn read_after(
    tx: &mut Tx,
    after: i64,
    limit: i64,
    with_payload: bool,
) -> Result<Vec<LogEvent>> {
    Ok(sqlx::query_as(
        "SELECT e.position, e.task_id, e.sequence, e.event_type, e.data, e.recorded_at, \
                f.data->>'task_type' AS task_type, \
                CASE WHEN $3 THEN f.data->'payload' END AS payload, \
                CASE WHEN $3 THEN f.data->'invalidates' END AS invalidates \
         FROM task_events e \
         LEFT JOIN task_events f ON f.task_id = e.task_id AND f.sequence = 1 \
         WHERE e.position > $1 AND e.position < event_log_horizon() \
         ORDER BY e.position LIMIT $2",
    )
    .bind(after)
    .bind(limit)
    .bind(with_payload)
    .fetch_all(tx.conn())
    .await?)
}

/// Moves the projector's checkpoint to `position`, counting `events` more read.
pub async fn advance(tx: &mut Tx, name: &str, position: i64, events: i64) -> Result<()> {
    sqlx::query(
        "INSERT INTO projector_checkpoints (name, position, events, updated_at) \
         VALUES ($1, $2, $3, now()) \
         ON CONFLICT (name) DO UPDATE \
           SET position = EXCLUDED.position, \
               events = projector_checkpoints.events + EXCLUDED.events, \
               updated_at = EXCLUDED.updated_at",
    )
    .bind(name)
    .bind(position)
    .bind(events)
    .execute(tx.conn())
    .await?;
    Ok(())
}

/// Counts per task type, cluster-wide.
#[derive(Debug, Clone, Default, PartialEq, Eq, FromRow, serde::Serialize)]
pub struct TypeTotals {
    pub task_type: String,
    pub enqueued: i64,
    pub attempts_started: i64,
    /// Tasks that finished successfully.
    pub succeeded: i64,
    pub attempts_failed: i64,
    /// Retries scheduled after failed attempts.
    pub retries: i64,
    /// Tasks that failed for good (dead-lettered).
    pub dead: i64,
    pub cancelled: i64,
    pub requeued: i64,
}

impl TypeTotals {
    /// Adds one event of the type `event_type` (unknown types count nowhere).
    pub fn count(&mut self, event_type: &str) {
        match event_type {
            "enqueued" => self.enqueued += 1,
            "attempt_started" => self.attempts_started += 1,
            "attempt_succeeded" => self.succeeded += 1,
            "attempt_failed" => self.attempts_failed += 1,
            "retry_scheduled" => self.retries += 1,
            "dead_lettered" => self.dead += 1,
            "cancelled" => self.cancelled += 1,
            "requeued" => self.requeued += 1,
            _ => {}
        }
    }
}

/// Adds `deltas` to the totals.
pub async fn add_totals(tx: &mut Tx, deltas: &[TypeTotals]) -> Result<()> {
    if deltas.is_empty() {
        return Ok(());
    }
    let col = |f: fn(&TypeTotals) -> i64| deltas.iter().map(f).collect::<Vec<i64>>();
    let types: Vec<&str> = deltas.iter().map(|d| d.task_type.as_str()).collect();
    sqlx::query(
        "INSERT INTO task_totals AS t (task_type, enqueued, attempts_started, succeeded, \
                                       attempts_failed, retries, dead, cancelled, requeued) \
         SELECT * FROM UNNEST($1::text[], $2::int8[], $3::int8[], $4::int8[], $5::int8[], \
                              $6::int8[], $7::int8[], $8::int8[], $9::int8[]) \
         ON CONFLICT (task_type) DO UPDATE SET \
           enqueued = t.enqueued + EXCLUDED.enqueued, \
           attempts_started = t.attempts_started + EXCLUDED.attempts_started, \
           succeeded = t.succeeded + EXCLUDED.succeeded, \
           attempts_failed = t.attempts_failed + EXCLUDED.attempts_failed, \
           retries = t.retries + EXCLUDED.retries, \
           dead = t.dead + EXCLUDED.dead, \
           cancelled = t.cancelled + EXCLUDED.cancelled, \
           requeued = t.requeued + EXCLUDED.requeued",
    )
    .bind(&types)
    .bind(col(|d| d.enqueued))
    .bind(col(|d| d.attempts_started))
    .bind(col(|d| d.succeeded))
    .bind(col(|d| d.attempts_failed))
    .bind(col(|d| d.retries))
    .bind(col(|d| d.dead))
    .bind(col(|d| d.cancelled))
    .bind(col(|d| d.requeued))
    .execute(tx.conn())
    .await?;
    Ok(())
}

/// Every type's totals, by type name.
pub async fn totals(pool: &PgPool) -> Result<Vec<TypeTotals>> {
    Ok(sqlx::query_as(
        "SELECT task_type, enqueued, attempts_started, succeeded, attempts_failed, retries, \
                dead, cancelled, requeued \
         FROM task_totals ORDER BY task_type",
    )
    .fetch_all(pool)
    .await?)
}

/// Upper bounds (ms) of the attempt-duration buckets; durations above the last go to +Inf.
pub const DURATION_BOUNDS_MS: [i64; 12] =
    [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000];

/// The stored bound of the +Inf bucket.
pub const INF_BOUND: i64 = -1;

/// The bucket (its upper bound) a duration falls in.
pub fn bucket_of(duration_ms: i64) -> i64 {
    DURATION_BOUNDS_MS
        .into_iter()
        .find(|&b| duration_ms <= b)
        .unwrap_or(INF_BOUND)
}

/// One histogram bucket (not cumulative).
#[derive(Debug, Clone, PartialEq, Eq, FromRow)]
pub struct DurationBucket {
    pub task_type: String,
    /// `succeeded` or `failed`.
    pub outcome: String,
    /// Upper bound in ms; [`INF_BOUND`] for +Inf.
    pub le_ms: i64,
    pub count: i64,
    pub sum_ms: i64,
}

/// Adds attempt durations: (task type, outcome) → bucket → (count, sum).
pub async fn add_durations(
    tx: &mut Tx,
    deltas: &BTreeMap<(String, &'static str, i64), (i64, i64)>,
) -> Result<()> {
    if deltas.is_empty() {
        return Ok(());
    }
    let types: Vec<&str> = deltas.keys().map(|k| k.0.as_str()).collect();
    let outcomes: Vec<&str> = deltas.keys().map(|k| k.1).collect();
    let bounds: Vec<i64> = deltas.keys().map(|k| k.2).collect();
    let counts: Vec<i64> = deltas.values().map(|v| v.0).collect();
    let sums: Vec<i64> = deltas.values().map(|v| v.1).collect();
    sqlx::query(
        "INSERT INTO attempt_durations AS d (task_type, outcome, le_ms, count, sum_ms) \
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::int8[], $4::int8[], $5::int8[]) \
         ON CONFLICT (task_type, outcome, le_ms) DO UPDATE SET \
           count = d.count + EXCLUDED.count, sum_ms = d.sum_ms + EXCLUDED.sum_ms",
    )
    .bind(&types)
    .bind(&outcomes)
    .bind(&bounds)
    .bind(&counts)
    .bind(&sums)
    .execute(tx.conn())
    .await?;
    Ok(())
}

/// Every stored bucket, ordered by type, outcome and bound (+Inf last).
pub async fn durations(pool: &PgPool) -> Result<Vec<DurationBucket>> {
    Ok(sqlx::query_as(
        "SELECT task_type, outcome, le_ms, count, sum_ms FROM attempt_durations \
         ORDER BY task_type, outcome, le_ms = -1, le_ms",
    )
    .fetch_all(pool)
    .await?)
}

/// Where a projector is and how far behind the log it is.
#[derive(Debug, Clone, PartialEq, FromRow)]
pub struct Checkpoint {
    pub name: String,
    pub position: i64,
    pub events: i64,
    pub updated_at: DateTime<Utc>,
    /// Age in seconds of the oldest committed event the projector has not read (0 if none),
    /// including events the log's horizon still holds back behind a long transaction.
    pub lag_seconds: f64,
}

/// Every projector's checkpoint and lag.
pub async fn checkpoints(pool: &PgPool) -> Result<Vec<Checkpoint>> {
    Ok(sqlx::query_as(
        "SELECT c.name, c.position, c.events, c.updated_at, \
                COALESCE(( \
                  SELECT extract(epoch FROM now() - e.recorded_at)::float8 \
                  FROM task_events e \
                  WHERE e.position > c.position \
                  ORDER BY e.position LIMIT 1), 0) AS lag_seconds \
         FROM projector_checkpoints c ORDER BY c.name",
    )
    .fetch_all(pool)
    .await?)
}

/// Current task counts per type and status, from the `tasks` projection.
pub async fn status_counts(pool: &PgPool) -> Result<Vec<(String, String, i64)>> {
    Ok(sqlx::query_as(
        "SELECT task_type, status, count(*) FROM tasks GROUP BY task_type, status \
         ORDER BY task_type, status",
    )
    .fetch_all(pool)
    .await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_fall_in_the_first_bucket_that_holds_them() {
        assert_eq!(bucket_of(0), 5);
        assert_eq!(bucket_of(5), 5);
        assert_eq!(bucket_of(6), 10);
        assert_eq!(bucket_of(30000), 30000);
        assert_eq!(bucket_of(30001), INF_BOUND);
    }

    #[test]
    fn totals_count_each_event_type_in_its_column() {
        let mut t = TypeTotals::default();
        for e in [
            "enqueued",
            "dispatched",
            "attempt_started",
            "attempt_failed",
            "retry_scheduled",
            "attempt_started",
            "attempt_succeeded",
        ] {
            t.count(e);
        }
        assert_eq!(
            (
                t.enqueued,
                t.attempts_started,
                t.attempts_failed,
                t.retries,
                t.succeeded,
                t.dead
            ),
            (1, 2, 1, 1, 1, 0)
        );
    }
}
