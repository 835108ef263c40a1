//! The outbox: deliveries waiting to be published to Redis, or in transit.
//!
//! **Claiming.** [`claim_due`] selects due, unpublished rows in FIFO order (`available_at`, then
//! id) with `FOR UPDATE SKIP LOCKED`, so any number of relays can run: each row is taken by one
//! transaction, and a relay that dies mid-batch releases its rows when its transaction aborts.
//!
//! **Invariant.** A task has outbox rows only while a delivery is pending or in transit: claiming
//! an attempt and every terminal transition delete them (the effects [`super::transition`]
//! derives from the events). Published rows are thus exactly what Redis should hold, which is
//! what [`republish_all`] and the rescuer's check against `{prefix}:tasks:transit` rely on.

use crate::domain::TaskId;
use chrono::{DateTime, Utc};
use sqlx::{FromRow, PgPool};

use super::{Result, Tx};

/// A due delivery claimed by a relay.
#[derive(Debug, Clone, PartialEq, Eq, FromRow)]
pub struct DueRow {
    pub id: i64,
    pub task_id: TaskId,
    pub attempt: i32,
}

/// Rows of a paused task type are not published: `NOT_PAUSED` holds for a row of `outbox o`
/// whose task's type is not paused. While no type is paused (almost always) the first arm is
/// true, computed once per statement, and the task is not looked up at all.
const NOT_PAUSED: &str = "(NOT EXISTS (SELECT 1 FROM task_type_pauses) \
     OR NOT EXISTS (SELECT 1 FROM tasks t JOIN task_type_pauses p ON p.task_type = t.task_type \
                    WHERE t.id = o.task_id))";

/// Locks up to `limit` due, unpublished rows for this transaction, oldest first, skipping rows
/// of paused task types (each batch steps over them: a large backlog of a paused type slows the
/// relays until it is resumed).
pub async fn claim_due(tx: &mut Tx, limit: i64) -> Result<Vec<DueRow>> {
    Ok(sqlx::query_as(&format!(
        "SELECT o.id, o.task_id, o.attempt \
         FROM outbox o \
         WHERE o.published_at IS NULL AND o.available_at <= now() AND {NOT_PAUSED} \
         ORDER BY o.available_at, o.id \
         LIMIT $1 \
         FOR UPDATE SKIP LOCKED"
    ))
    .bind(limit)
    .fetch_all(tx.conn())
    .await?)
}

/// Marks the rows a relay holds and has published (by key: the relay locked them).
pub async fn mark_published(tx: &mut Tx, ids: &[i64], at: DateTime<Utc>) -> Result<()> {
    sqlx::query!(
        "UPDATE outbox SET published_at = $2 WHERE id = ANY($1)",
        ids,
        at
    )
    .execute(tx.conn())
    .await?;
    Ok(())
}

/// Removes rows that will never be delivered (the task was cancelled or moved on).
pub async fn delete(tx: &mut Tx, ids: &[i64]) -> Result<()> {
    sqlx::query!("DELETE FROM outbox WHERE id = ANY($1)", ids)
        .execute(tx.conn())
        .await?;
    Ok(())
}

/// The deliveries a transition adds (derived from its events by [`super::transition::apply`];
/// the rows of deliveries it used up are removed with its events, see
/// [`super::events::record_batch`]).
#[derive(Debug, Default)]
pub(crate) struct Effects {
    /// New deliveries `(task, attempt, due)`.
    pub added: Vec<(TaskId, i32, DateTime<Utc>)>,
}

impl Effects {
    pub fn add(&mut self, task: TaskId, attempt: i32, due: DateTime<Utc>) {
        self.added.push((task, attempt, due));
    }
}

/// Adds the new deliveries of `effects` in `tx` and, when any was added, wakes the relays at
/// commit.
pub(crate) async fn apply_effects(tx: &mut Tx, effects: Effects) -> Result<()> {
    if !effects.added.is_empty() {
        let tasks: Vec<TaskId> = effects.added.iter().map(|r| r.0).collect();
        let attempts: Vec<i32> = effects.added.iter().map(|r| r.1).collect();
        let due: Vec<DateTime<Utc>> = effects.added.iter().map(|r| r.2).collect();
        sqlx::query!(
            "WITH added AS ( \
               INSERT INTO outbox (task_id, attempt, available_at) \
               SELECT * FROM UNNEST($1::uuid[], $2::int4[], $3::timestamptz[]) \
             ) SELECT pg_notify($4, '')",
            &tasks as &[TaskId],
            &attempts,
            &due,
            CHANNEL
        )
        .execute(tx.conn())
        .await?;
    }
    Ok(())
}

/// Marks every published row unpublished, so the relays publish them again (after Redis lost its
/// data). Returns how many. Duplicates this may create are dropped by the claim.
pub async fn republish_all(pool: &PgPool) -> Result<u64> {
    Ok(
        sqlx::query!("UPDATE outbox SET published_at = NULL WHERE published_at IS NOT NULL")
            .execute(pool)
            .await?
            .rows_affected(),
    )
}

/// Marks these published rows unpublished (their push may have been lost). Returns how many.
pub async fn republish_ids(pool: &PgPool, ids: &[i64]) -> Result<u64> {
    Ok(sqlx::query!(
        "UPDATE outbox SET published_at = NULL WHERE id = ANY($1) AND published_at IS NOT NULL",
        ids
    )
    .execute(pool)
    .await?
    .rows_affected())
}

/// Marks one task's published delivery of `attempt` unpublished (it was lost in transit).
pub async fn republish(pool: &PgPool, task_id: TaskId, attempt: i32) -> Result<u64> {
    Ok(sqlx::query!(
        "UPDATE outbox SET published_at = NULL \
         WHERE task_id = $1 AND attempt = $2 AND published_at IS NOT NULL",
        task_id as TaskId,
        attempt
    )
    .execute(pool)
    .await?
    .rows_affected())
}

/// A published delivery, as the rescuer checks it against Redis.
#[derive(Debug, Clone, PartialEq, Eq, FromRow)]
pub struct PublishedRow {
    pub id: i64,
    pub task_id: TaskId,
    pub attempt: i32,
    pub task_type: String,
    pub published_at: DateTime<Utc>,
}

/// Up to `limit` rows published more than `age` ago (by the database's clock), in publishing
/// order after the cursor `(published_at, id)`; the rescuer walks them a window per pass.
pub async fn published_before(
    pool: &PgPool,
    age: std::time::Duration,
    after: Option<(DateTime<Utc>, i64)>,
    limit: i64,
) -> Result<Vec<PublishedRow>> {
    let (after_at, after_id) = after.unzip();
    Ok(sqlx::query_as!(
        PublishedRow,
        r#"SELECT o.id, o.task_id AS "task_id: TaskId", o.attempt, t.task_type,
                  o.published_at AS "published_at!"
           FROM outbox o JOIN tasks t ON t.id = o.task_id
           WHERE o.published_at IS NOT NULL AND o.published_at < now() - $1::interval
             AND ($2::timestamptz IS NULL OR (o.published_at, o.id) > ($2, $3))
           ORDER BY o.published_at, o.id LIMIT $4"#,
        age as std::time::Duration,
        after_at,
        after_id,
        limit
    )
    .fetch_all(pool)
    .await?)
}

/// When the next unpublished row of a type that is not paused falls due, if any.
pub async fn next_due(pool: &PgPool) -> Result<Option<DateTime<Utc>>> {
    Ok(sqlx::query_scalar(&format!(
        "SELECT min(available_at) FROM outbox o WHERE published_at IS NULL AND {NOT_PAUSED}"
    ))
    .fetch_one(pool)
    .await?)
}

/// Unpublished rows that are due (of types not paused), and the age in seconds of the oldest.
pub async fn backlog(pool: &PgPool) -> Result<(i64, f64)> {
    Ok(sqlx::query_as(&format!(
        "SELECT count(*), coalesce(extract(epoch FROM now() - min(available_at))::float8, 0) \
         FROM outbox o WHERE published_at IS NULL AND available_at <= now() AND {NOT_PAUSED}"
    ))
    .fetch_one(pool)
    .await?)
}

/// Seconds since the delivery `(task_id, attempt)` was published, by the database's clock, or
/// `None` when no published row of it exists (the task was claimed, cancelled or finished, or
/// the delivery belongs to another database). Of two published rows of the same attempt, the
/// earlier counts.
pub async fn published_age(pool: &PgPool, task_id: TaskId, attempt: i32) -> Result<Option<f64>> {
    Ok(sqlx::query_scalar!(
        "SELECT extract(epoch FROM now() - min(published_at))::float8 \
         FROM outbox WHERE task_id = $1 AND attempt = $2 AND published_at IS NOT NULL",
        task_id as TaskId,
        attempt
    )
    .fetch_one(pool)
    .await?)
}

/// Gives deliveries back to the outbox unpublished: `(task, attempt)` pairs a worker took from
/// Redis but will not claim (their type is paused). The relays publish them again once they may.
pub async fn unpublish(tx: &mut Tx, deliveries: &[(TaskId, i32)]) -> Result<u64> {
    let (tasks, attempts): (Vec<TaskId>, Vec<i32>) = deliveries.iter().copied().unzip();
    Ok(sqlx::query!(
        "UPDATE outbox o SET published_at = NULL \
         FROM UNNEST($1::uuid[], $2::int4[]) AS d(task_id, attempt) \
         WHERE o.task_id = d.task_id AND o.attempt = d.attempt AND o.published_at IS NOT NULL",
        &tasks as &[TaskId],
        &attempts
    )
    .execute(tx.conn())
    .await?
    .rows_affected())
}

/// The channel relays `LISTEN` on.
pub const CHANNEL: &str = "arnela_outbox";

/// A relay's subscription to [`CHANNEL`] (`LISTEN` on a connection of its own).
pub struct OutboxListener(sqlx::postgres::PgListener);

impl OutboxListener {
    pub async fn connect(pool: &PgPool) -> Result<OutboxListener> {
        let mut l = sqlx::postgres::PgListener::connect_with(pool).await?;
        l.listen(CHANNEL).await?;
        Ok(OutboxListener(l))
    }

    /// Waits for the next notification; an error means the connection was lost.
    pub async fn recv(&mut self) -> Result<()> {
        self.0.recv().await?;
        Ok(())
    }
}

/// Wakes the relays after new outbox rows commit: `NOTIFY arnela_outbox`, sent from a
/// background task at most once per `min_interval` however many enqueues asked for it. Sending
/// it inside every enqueue would make all enqueue commits queue on Postgres's notification lock;
/// a missed or merged wake-up costs at most the relays' polling interval.
#[derive(Clone)]
pub struct OutboxWaker {
    wanted: std::sync::Arc<tokio::sync::Notify>,
}

impl OutboxWaker {
    /// Starts the background task on `pool`; it stops when every clone is dropped.
    pub fn spawn(pool: PgPool, min_interval: std::time::Duration) -> OutboxWaker {
        let wanted = std::sync::Arc::new(tokio::sync::Notify::new());
        let task_wanted = wanted.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = task_wanted.notified() => {}
                    () = tokio::time::sleep(std::time::Duration::from_secs(1)) => {
                        // every waker is gone: stop
                        if std::sync::Arc::strong_count(&task_wanted) == 1 {
                            return;
                        }
                        continue;
                    }
                }
                if let Err(e) = sqlx::query!("SELECT pg_notify($1, '')", CHANNEL)
                    .execute(&pool)
                    .await
                {
                    tracing::warn!(error = %e, "cannot notify the relays; they will poll");
                }
                tokio::time::sleep(min_interval).await;
            }
        });
        OutboxWaker { wanted }
    }

    /// Asks for a wake-up (never blocks).
    pub fn wake(&self) {
        self.wanted.notify_one();
    }
}
