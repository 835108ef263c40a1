//! Operator actions: requeue a dead task, cancel a waiting, running or dead one, one task at a
//! time or every dead letter matching a filter; erase a task's personal data. Each is a [`transition::apply`]: the operator
//! only decides the event.

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use super::retention;
use super::tasks;
use super::transition::{self, Lock, Payload, Target};
use super::{Result, StoreError, Tx};
use crate::domain::sealing::payload_is_sealed;
use crate::domain::task::MAX_TOTAL_ATTEMPTS;
use crate::domain::{Task, TaskEvent, TaskId, TaskStatus, TaskType};

/// Gives a dead task `extra_attempts` more attempts and queues it now; refused when the task
/// would have more than [`MAX_TOTAL_ATTEMPTS`] in all.
pub async fn requeue(pool: &PgPool, id: TaskId, extra_attempts: i32, by: &str) -> Result<Task> {
    act(pool, id, |task| {
        let event = task.requeue(extra_attempts, by.to_owned())?;
        if task.attempts + extra_attempts > MAX_TOTAL_ATTEMPTS {
            return Err(StoreError::AttemptBudget {
                task_id: task.id,
                used: task.attempts,
                max: MAX_TOTAL_ATTEMPTS,
            });
        }
        Ok(event)
    })
    .await
}

/// Cancels a task that has not ended. Its pending deliveries are removed.
pub async fn cancel(pool: &PgPool, id: TaskId, reason: String, by: &str) -> Result<Task> {
    act(pool, id, |task| {
        Ok(task.cancel(reason.clone(), by.to_owned())?)
    })
    .await
}

/// What [`erase`] did.
#[derive(Debug)]
pub enum Erasure {
    /// The data key was destroyed and an `erased` event recorded (after a `cancelled` one for a
    /// task that could still run).
    Erased(Task),
    /// It was erased before: nothing changed.
    AlreadyErased(Task),
}

/// Erases task `id`'s personal data: destroys its data key and records `erased` (see
/// [`Task::erase`]), in one transaction. Refused for a running task, and for a task stored
/// before its fields were sealed (nothing could erase them without rewriting the log).
pub async fn erase(pool: &PgPool, id: TaskId, reason: String, by: &str) -> Result<Erasure> {
    let mut tx = Tx::begin(pool).await?;
    let (row, _) = match tasks::get_for_update(&mut tx, id).await {
        Err(StoreError::NotFound(_)) => return erase_retired(tx, id, reason, by).await,
        found => found?,
    };
    let sealed = payload_is_sealed(row.task_type, &row.payload);
    if !super::data_keys::exists(tx.conn(), id).await? {
        tx.rollback().await?;
        return if sealed {
            Ok(Erasure::AlreadyErased(row))
        } else {
            Err(StoreError::NotErasable(id))
        };
    }
    transition::apply(
        &mut tx,
        Target::Ids(&[id], Lock::Wait, Payload::Skip),
        |task, _| Ok(Some(task.erase(reason.clone(), by.to_owned())?)),
    )
    .await?;
    super::data_keys::destroy(tx.conn(), id).await?;
    let (task, _) = tasks::get_for_update(&mut tx, id).await?;
    tx.commit().await?;
    Ok(Erasure::Erased(task))
}

/// [`erase`] for a task retention moved out of the projection (its head is in
/// `retired_tasks`, and it has finished, so nothing is cancelled first).
async fn erase_retired(mut tx: Tx, id: TaskId, reason: String, by: &str) -> Result<Erasure> {
    let Some(mut task) = retention::retired_for_update(&mut tx, id).await? else {
        tx.rollback().await?;
        return Err(StoreError::NotFound(id.into()));
    };
    let task_type = task.task_type;
    if !super::data_keys::exists(tx.conn(), id).await? {
        let erased = retention::was_erased(tx.conn(), id).await?;
        tx.rollback().await?;
        return if erased {
            Ok(Erasure::AlreadyErased(task.into_task(true)))
        } else {
            Err(StoreError::NotErasable(id))
        };
    }
    let now = crate::domain::event::db_time(Utc::now());
    let event = TaskEvent::Erased {
        reason,
        by: by.to_owned(),
    };
    let mut rows = super::events::EventRows::placed(&mut tx).await?;
    let hash = rows.push_stream(
        &mut tx,
        (id, task_type),
        task.version + 1,
        Some(&task.last_hash),
        std::slice::from_ref(&event),
        now,
    );
    super::events::insert(&mut tx, &rows).await?;
    task.version += 1;
    task.last_hash = hash;
    task.updated_at = now;
    retention::advance_retired(&mut tx, &task).await?;
    super::data_keys::destroy(tx.conn(), id).await?;
    tx.commit().await?;
    Ok(Erasure::Erased(task.into_task(true)))
}

async fn act<F>(pool: &PgPool, id: TaskId, decide: F) -> Result<Task>
where
    F: Fn(&Task) -> Result<TaskEvent>,
{
    let mut tx = Tx::begin(pool).await?;
    let applied = transition::apply(
        &mut tx,
        Target::Ids(&[id], Lock::Wait, Payload::Skip),
        |task, _| Ok(Some(vec![decide(task)?])),
    )
    .await?;
    if !applied.missing.is_empty() {
        return Err(StoreError::NotFound(id.into()));
    }
    let (task, _) = tasks::get_for_update(&mut tx, id).await?;
    tx.commit().await?;
    Ok(task)
}

/// Which dead letters a bulk action takes.
#[derive(Debug, Clone, Default)]
pub struct DeadFilter {
    pub task_type: Option<TaskType>,
    /// A case-insensitive part of the reason (`last_error`).
    pub reason: Option<String>,
    /// Dead-lettered at or after this time.
    pub failed_from: Option<DateTime<Utc>>,
    /// Dead-lettered before this time.
    pub failed_to: Option<DateTime<Utc>>,
}

/// What to do with each dead letter a filter matches.
#[derive(Debug, Clone)]
pub enum DeadAction {
    /// Requeue with this many new attempts (a task that would pass the budget is left dead).
    Requeue { extra_attempts: i32 },
    /// Discard (`cancelled`), with this reason.
    Cancel { reason: String },
}

/// The outcome of a bulk action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bulk {
    /// Dead letters matching the filter when they were listed.
    pub matched: u64,
    /// Tasks changed (a task that left `dead` meanwhile, or would pass the attempt budget, is
    /// not).
    pub changed: u64,
}

/// Tasks changed per transaction of a bulk action.
const BULK_CHUNK: usize = 500;

/// The ids of the dead letters `filter` matches, oldest first. `tasks` has no index on the
/// status (see migration 7), so this reads the table: an operator's action, not a hot path.
pub async fn dead_letters(pool: &PgPool, filter: &DeadFilter) -> Result<Vec<TaskId>> {
    let mut tx = Tx::begin_scan(pool).await?;
    let ids = sqlx::query_scalar!(
        r#"SELECT id AS "id: TaskId" FROM tasks WHERE status = $1
             AND ($2::text IS NULL OR task_type = $2)
             AND ($3::text IS NULL OR strpos(lower(coalesce(last_error, '')), lower($3)) > 0)
             AND ($4::timestamptz IS NULL OR updated_at >= $4)
             AND ($5::timestamptz IS NULL OR updated_at < $5)
           ORDER BY updated_at, id"#,
        TaskStatus::Dead as TaskStatus,
        filter.task_type as Option<TaskType>,
        filter.reason.as_deref(),
        filter.failed_from,
        filter.failed_to
    )
    .fetch_all(tx.conn())
    .await?;
    tx.commit().await?;
    Ok(ids)
}

/// Applies `action` to every dead letter `filter` matches, `BULK_CHUNK` tasks per
/// transaction; `dry_run` only counts them. Each change is the same event as the one-task
/// action, recorded with `by`. Returns the ids changed with the counts.
pub async fn bulk(
    pool: &PgPool,
    filter: &DeadFilter,
    action: &DeadAction,
    by: &str,
    dry_run: bool,
) -> Result<(Bulk, Vec<TaskId>)> {
    let ids = dead_letters(pool, filter).await?;
    let mut outcome = Bulk {
        matched: ids.len() as u64,
        changed: 0,
    };
    if dry_run {
        return Ok((outcome, Vec::new()));
    }
    let mut changed = Vec::new();
    for chunk in ids.chunks(BULK_CHUNK) {
        let mut tx = Tx::begin(pool).await?;
        let applied = transition::apply(
            &mut tx,
            Target::Ids(chunk, Lock::Wait, Payload::Skip),
            |task, _| {
                if task.status != TaskStatus::Dead {
                    return Ok(None);
                }
                Ok(match action {
                    DeadAction::Requeue { extra_attempts } => (task.attempts + extra_attempts
                        <= MAX_TOTAL_ATTEMPTS)
                        .then(|| task.requeue(*extra_attempts, by.to_owned()))
                        .transpose()?,
                    DeadAction::Cancel { reason } => {
                        Some(task.cancel(reason.clone(), by.to_owned())?)
                    }
                }
                .map(|e| vec![e]))
            },
        )
        .await?;
        tx.commit().await?;
        changed.extend(applied.changed.iter().map(|c| c.after.id));
    }
    outcome.changed = changed.len() as u64;
    Ok((outcome, changed))
}
