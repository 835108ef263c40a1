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
use sqlx::postgres::PgRow;
use sqlx::{FromRow, PgPool, Row};
use std::collections::BTreeMap;

use super::{Result, Tx};
use crate::domain::{EventType, TaskId, TaskType};

/// The next batch of the log (up to `limit` events after the checkpoint, below the commit-safe
/// horizon, in log order) as the totals projector needs it: counted in SQL per task type, event
/// type and attempt duration, so a batch of a thousand events comes back as a handful of rows
/// (the type is stored with each event: no lookup per event).
#[derive(Debug, Clone, PartialEq)]
pub struct EventCount {
    /// The task's type (from its projection row, else from its `enqueued` event), as stored:
    /// the totals keep a row for any name, known to this version or not.
    pub task_type: Option<String>,
    /// `None` for a type this version does not know (a newer one wrote it): such events count
    /// nowhere, and do not hold up the projection.
    pub event_type: Option<EventType>,
    /// `duration_ms` of `attempt_succeeded` and `attempt_failed` events.
    pub duration_ms: Option<i64>,
    pub count: i64,
    /// The batch's last position and its number of events (the same on every row).
    pub last_position: i64,
    pub batch_events: i64,
}

impl FromRow<'_, PgRow> for EventCount {
    fn from_row(row: &PgRow) -> sqlx::Result<Self> {
        let event_type: &str = row.try_get("event_type")?;
        Ok(EventCount {
            task_type: row.try_get("task_type")?,
            event_type: event_type.parse().ok(),
            duration_ms: row.try_get("duration_ms")?,
            count: row.try_get("count")?,
            last_position: row.try_get("last_position")?,
            batch_events: row.try_get("batch_events")?,
        })
    }
}

/// The next batch of the log as the cache-invalidation projector needs it: one row per task
/// with an event in the batch, and for a task that succeeded in it, its type and `invalidates`
/// (the only event that invalidates more than the task's own key), and the enqueued payload of
/// a task of the type asked for (the one whose success invalidates keys named in its payload,
/// see [`crate::cache::invalidation::PAYLOAD_RULES_TYPE`]; the others' payloads are neither sent
/// nor decoded).
#[derive(Debug, Clone, PartialEq, FromRow)]
pub struct TaskTouched {
    pub task_id: TaskId,
    pub succeeded: bool,
    pub task_type: Option<TaskType>,
    pub payload: Option<Value>,
    pub invalidates: Option<Value>,
    /// The batch's last position and its number of events (the same on every row).
    pub last_position: i64,
    pub batch_events: i64,
}

/// The batch of the log after `after` (shared by both reads below).
const BATCH: &str = "batch AS ( \
       SELECT e.position, e.task_id, e.event_type, e.task_type, \
              CASE WHEN e.event_type IN ('attempt_succeeded', 'attempt_failed') \
                   THEN (e.data->>'duration_ms')::int8 END AS duration_ms \
       FROM task_events e \
       WHERE e.position > $1 AND e.position < event_log_horizon() \
       ORDER BY e.position LIMIT $2)";

/// The type of the task of event `b`: stored with the event (events written before the column
/// existed fall back to the task's row, then to its `enqueued` event).
const TASK_TYPE: &str = "coalesce(b.task_type, \
       (SELECT t.task_type FROM tasks t WHERE t.id = b.task_id), \
       (SELECT f.data->>'task_type' FROM task_events f \
        WHERE f.task_id = b.task_id AND f.sequence = 1))";

/// Takes the projector's lock for the rest of `tx`; `None` when another instance holds it.
/// Otherwise returns the checkpoint (0 for a projector that never ran).
pub async fn try_lock(tx: &mut Tx, name: &str) -> Result<Option<i64>> {
    let locked = sqlx::query_scalar!(
        r#"SELECT pg_try_advisory_xact_lock(hashtextextended('arnela.projector.' || $1, 0))
             AS "locked!""#,
        name
    )
    .fetch_one(tx.conn())
    .await?;
    if !locked {
        return Ok(None);
    }
    let position = sqlx::query_scalar!(
        "SELECT position FROM projector_checkpoints WHERE name = $1",
        name
    )
    .fetch_optional(tx.conn())
    .await?;
    Ok(Some(position.unwrap_or(0)))
}

/// Counts the batch after `after` (see [`EventCount`]); empty when nothing is past it yet.
pub async fn count_after(tx: &mut Tx, after: i64, limit: i64) -> Result<Vec<EventCount>> {
    Ok(sqlx::query_as(&format!(
        "WITH {BATCH} \
         SELECT {TASK_TYPE} AS task_type, b.event_type, b.duration_ms, count(*) AS count, \
                max(max(b.position)) OVER () AS last_position, \
                (sum(count(*)) OVER ())::int8 AS batch_events \
         FROM batch b GROUP BY 1, 2, 3"
    ))
    .bind(after)
    .bind(limit)
    .fetch_all(tx.conn())
    .await?)
}

/// The tasks the batch after `after` touched (see [`TaskTouched`]), with the payloads of the
/// succeeded tasks of type `payload_of`.
///
/// Only a success reads what the task declared, from its row (one primary-key lookup; the row
/// holds the payload and `invalidates` as enqueued) or, when retention removed the row, from its
/// `enqueued` event (a lookup in every partition of the log). Both say the same where both
/// exist; the `LIMIT 1` over the two reads stops at the row when there is one, so the log is
/// read only for removed rows. `b.succeeded`
/// inside the subquery gates both reads: the planner keeps it there, as the subquery has a
/// limit, instead of filtering after the lookups.
pub async fn touched_after(
    tx: &mut Tx,
    after: i64,
    limit: i64,
    payload_of: TaskType,
) -> Result<Vec<TaskTouched>> {
    Ok(sqlx::query_as(&format!(
        "WITH {BATCH}, touched AS ( \
           SELECT b.task_id, min(b.task_type) AS task_type, \
                  bool_or(b.event_type = 'attempt_succeeded') AS succeeded, \
                  max(max(b.position)) OVER () AS last_position, \
                  (sum(count(*)) OVER ())::int8 AS batch_events \
           FROM batch b GROUP BY b.task_id) \
         SELECT b.task_id, b.succeeded, b.last_position, b.batch_events, \
                CASE WHEN b.succeeded THEN {TASK_TYPE} END AS task_type, \
                f.payload, f.invalidates \
         FROM touched b \
         LEFT JOIN LATERAL ( \
           SELECT CASE WHEN t.task_type = $3 THEN t.payload END AS payload, t.invalidates \
           FROM tasks t \
           WHERE b.succeeded AND t.id = b.task_id \
           UNION ALL \
           SELECT CASE WHEN coalesce(b.task_type, f.data->>'task_type') = $3 \
                       THEN f.data->'payload' END, \
                  nullif(f.data->'invalidates', '[]'::jsonb) \
           FROM task_events f \
           WHERE b.succeeded AND f.task_id = b.task_id AND f.sequence = 1 \
           LIMIT 1) f ON true"
    ))
    .bind(after)
    .bind(limit)
    .bind(payload_of.as_str())
    .fetch_all(tx.conn())
    .await?)
}

/// Moves the projector's checkpoint to `position`, counting `events` more read.
pub async fn advance(tx: &mut Tx, name: &str, position: i64, events: i64) -> Result<()> {
    sqlx::query!(
        "INSERT INTO projector_checkpoints (name, position, events, updated_at) \
         VALUES ($1, $2, $3, now()) \
         ON CONFLICT (name) DO UPDATE \
           SET position = EXCLUDED.position, \
               events = projector_checkpoints.events + EXCLUDED.events, \
               updated_at = EXCLUDED.updated_at",
        name,
        position,
        events
    )
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
    /// Adds `n` events of the type `event_type`.
    pub fn count(&mut self, event_type: EventType, n: i64) {
        let total = match event_type {
            EventType::Enqueued => &mut self.enqueued,
            EventType::AttemptStarted => &mut self.attempts_started,
            EventType::AttemptSucceeded => &mut self.succeeded,
            EventType::AttemptFailed => &mut self.attempts_failed,
            EventType::RetryScheduled => &mut self.retries,
            EventType::DeadLettered => &mut self.dead,
            EventType::Cancelled => &mut self.cancelled,
            EventType::Requeued => &mut self.requeued,
            EventType::Dispatched
            | EventType::AttemptReleased
            | EventType::AttemptStopped
            | EventType::Erased => return,
        };
        *total += n;
    }
}

/// Adds `deltas` to the totals.
pub async fn add_totals(tx: &mut Tx, deltas: &[TypeTotals]) -> Result<()> {
    if deltas.is_empty() {
        return Ok(());
    }
    let col = |f: fn(&TypeTotals) -> i64| deltas.iter().map(f).collect::<Vec<i64>>();
    let types: Vec<&str> = deltas.iter().map(|d| d.task_type.as_str()).collect();
    sqlx::query!(
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
        &types as &[&str],
        &col(|d| d.enqueued),
        &col(|d| d.attempts_started),
        &col(|d| d.succeeded),
        &col(|d| d.attempts_failed),
        &col(|d| d.retries),
        &col(|d| d.dead),
        &col(|d| d.cancelled),
        &col(|d| d.requeued)
    )
    .execute(tx.conn())
    .await?;
    Ok(())
}

/// Every type's totals, by type name.
pub async fn totals(pool: &PgPool) -> Result<Vec<TypeTotals>> {
    Ok(sqlx::query_as!(
        TypeTotals,
        "SELECT task_type, enqueued, attempts_started, succeeded, attempts_failed, retries, \
                dead, cancelled, requeued \
         FROM task_totals ORDER BY task_type"
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
    sqlx::query!(
        "INSERT INTO attempt_durations AS d (task_type, outcome, le_ms, count, sum_ms) \
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::int8[], $4::int8[], $5::int8[]) \
         ON CONFLICT (task_type, outcome, le_ms) DO UPDATE SET \
           count = d.count + EXCLUDED.count, sum_ms = d.sum_ms + EXCLUDED.sum_ms",
        &types as &[&str],
        &outcomes as &[&str],
        &bounds,
        &counts,
        &sums
    )
    .execute(tx.conn())
    .await?;
    Ok(())
}

/// Every stored bucket, ordered by type, outcome and bound (+Inf last).
pub async fn durations(pool: &PgPool) -> Result<Vec<DurationBucket>> {
    Ok(sqlx::query_as!(
        DurationBucket,
        "SELECT task_type, outcome, le_ms, count, sum_ms FROM attempt_durations \
         ORDER BY task_type, outcome, le_ms = -1, le_ms"
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
    Ok(sqlx::query_as!(
        Checkpoint,
        r#"SELECT c.name, c.position, c.events, c.updated_at,
                  COALESCE((
                    SELECT extract(epoch FROM now() - e.recorded_at)::float8
                    FROM task_events e
                    WHERE e.position > c.position
                    ORDER BY e.position LIMIT 1), 0) AS "lag_seconds!"
           FROM projector_checkpoints c ORDER BY c.name"#
    )
    .fetch_all(pool)
    .await?)
}

/// Current task counts per type and status, from the `tasks` projection.
pub async fn status_counts(pool: &PgPool) -> Result<Vec<(String, String, i64)>> {
    let mut scan = super::Tx::begin_scan(pool).await?;
    let counts = sqlx::query!(
        r#"SELECT task_type, status, count(*) AS "count!" FROM tasks
           GROUP BY task_type, status ORDER BY task_type, status"#
    )
    .fetch_all(scan.conn())
    .await?
    .into_iter()
    .map(|r| (r.task_type, r.status, r.count))
    .collect();
    scan.commit().await?;
    Ok(counts)
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
            t.count(e.parse().unwrap(), 1);
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
