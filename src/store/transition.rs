//! The one path of every state change after enqueue: the relay's dispatch, the worker's claim
//! and completion, the rescuer's expired leases and the operator's requeue and cancel all go
//! through [`apply`]. Callers only decide; everything that follows from the decided events is
//! derived here, in one place.
//!
//! One call, inside the caller's transaction:
//!
//! 1. locks the tasks' rows in id order (a fixed order: two transitions never deadlock on rows)
//!    and reads the database's clock (every decision uses Postgres's time);
//! 2. decodes each row (an unreadable one is skipped and logged, never failing the batch) and
//!    asks the caller's `decide` for the events;
//! 3. derives the outbox changes from the events:
//!    - `dispatched` changes no row here: the relay marks the rows it holds and published (an
//!      enqueue that dispatches writes its rows published, see
//!      [`super::tasks::enqueue_dispatched`]);
//!    - `attempt_started` removes the task's outbox rows (the delivery was used), and so do
//!      `cancelled`, `dead_lettered` and `requeued` (every pending delivery);
//!    - `retry_scheduled`, `attempt_released` and `requeued` add a delivery of the next attempt,
//!      due at the backoff or now, and wake the relays (`NOTIFY` at commit);
//! 4. appends the events, updates the projection and removes the used outbox rows in one
//!    statement ([`events::record_batch`]), then adds the new deliveries;
//! 5. writes the copies of the dead letters for the failed list (`failed_copies`, the failed
//!    list's outbox) and returns them; the caller pushes them after commit with
//!    [`crate::dead_letters::push_pending`], and a rescuer pass pushes any it could not.
//!
//! **Locking.** With [`Lock::Wait`] a row another transaction holds is waited for (a worker
//! claiming a delivery must see the relay's dispatch). With [`Lock::SkipLocked`] it is left for
//! the next pass (rescuers, which any number of processes run). Removing outbox rows skips rows
//! a relay holds: waiting for them would deadlock with that relay, which holds the row and waits
//! for the task; the relay finds the task no longer waiting and drops the row itself.

use chrono::{DateTime, Utc};
use sqlx::postgres::PgRow;
use sqlx::{FromRow, Row};
use uuid::Uuid;

use super::tasks::{TaskRow, TASK_COLUMNS, TASK_COLUMNS_NO_PAYLOAD};
use super::{events, failed_copies, outbox, Result, Tx};
use crate::domain::{Task, TaskEvent, TaskId, TaskType};
use std::collections::HashSet;

/// How rows that another transaction holds are treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lock {
    Wait,
    SkipLocked,
}

/// Whether the tasks' payloads are read (only a claim hands them to a handler; every other
/// transition decides without them, and a payload is the largest part of a row to decode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Payload {
    Load,
    /// `Task::payload` is JSON `null`.
    Skip,
}

/// Which tasks to lock.
#[derive(Debug, Clone, Copy)]
pub enum Target<'a> {
    /// These tasks (missing ones are reported as `missing`).
    Ids(&'a [TaskId], Lock, Payload),
    /// Up to `limit` running attempts whose lease ran out, oldest first, skipping locked rows
    /// and attempts of `live_owners` (worker processes whose heartbeat is current: they record
    /// the outcome themselves once they reach the database again) whose lease ran out less than
    /// `live_grace` ago, or whatever their age with `None` (the caller has not been in reach of
    /// the database for that grace yet). Past that grace even a live owner's attempt is taken
    /// over: an owner that still held it would have renewed it since it reached the database
    /// again, so the attempt is one it lost track of (say a claim whose commit it never heard
    /// about).
    ExpiredLeases {
        limit: i64,
        live_owners: &'a [Uuid],
        live_grace: Option<std::time::Duration>,
    },
}

pub use crate::domain::task::DeadLetter;

/// One task's change: its state before, the events appended and its state after.
#[derive(Debug, Clone)]
pub struct Changed {
    pub before: Task,
    pub events: Vec<TaskEvent>,
    pub after: Task,
}

/// What [`apply`] did.
#[derive(Debug, Default)]
pub struct Applied {
    /// The database's clock when the rows were locked.
    pub now: DateTime<Utc>,
    /// Tasks that changed, in id order.
    pub changed: Vec<Changed>,
    /// Tasks locked whose `decide` returned no events.
    pub unchanged: Vec<TaskId>,
    /// Tasks whose row could not be read (logged; left as they are).
    pub unreadable: Vec<TaskId>,
    /// Requested tasks that do not exist (with [`Lock::SkipLocked`], also those held elsewhere).
    pub missing: Vec<TaskId>,
    /// Copies for the failed list, written to `failed_copies` for a push after commit.
    pub dead_letters: Vec<DeadLetter>,
}

impl Applied {
    /// The change of one task, if it changed.
    pub fn get(&self, id: TaskId) -> Option<&Changed> {
        self.changed
            .binary_search_by(|c| c.after.id.cmp(&id))
            .ok()
            .map(|i| &self.changed[i])
    }
}

/// The database's clock and the transaction's position of slot 0, read with the lock so that
/// hashing the events costs no round trip of its own (see [`Tx::placement_base`]), and the task
/// types paused as the lock's statement saw them.
fn clock(row: &PgRow) -> sqlx::Result<(DateTime<Utc>, i64, HashSet<TaskType>)> {
    let paused: Vec<String> = row.try_get("paused_types")?;
    Ok((
        row.try_get("db_now")?,
        row.try_get("position_base")?,
        // a name this build does not know pauses nothing it could run
        paused.iter().filter_map(|n| n.parse().ok()).collect(),
    ))
}

/// Locks the target tasks, asks `decide` for each one's events (`None` or an empty list: no
/// change) and records them with every outbox change they imply (see the module docs). An error
/// from `decide` fails the call; the caller's transaction must then be rolled back.
pub async fn apply<F>(tx: &mut Tx, target: Target<'_>, mut decide: F) -> Result<Applied>
where
    F: FnMut(&Task, DateTime<Utc>) -> Result<Option<Vec<TaskEvent>>>,
{
    apply_seeing_pauses(tx, target, |task, now, _| decide(task, now)).await
}

/// [`apply`], where `decide` also gets the task types paused, read in the statement that locks
/// the rows (a claim starts no attempt of a type paused before it; reading the pauses there
/// costs no statement of its own).
pub async fn apply_seeing_pauses<F>(
    tx: &mut Tx,
    target: Target<'_>,
    mut decide: F,
) -> Result<Applied>
where
    F: FnMut(&Task, DateTime<Utc>, &HashSet<TaskType>) -> Result<Option<Vec<TaskEvent>>>,
{
    let (rows, requested) = lock(tx, target).await?;
    let Some((now, base, paused)) = rows.first().map(clock).transpose()? else {
        return Ok(Applied {
            now: super::tasks::db_now(tx).await?,
            missing: requested,
            ..Applied::default()
        });
    };
    tx.set_placement_base(base, now);
    let mut applied = Applied {
        now,
        ..Applied::default()
    };
    if !requested.is_empty() {
        let found = rows
            .iter()
            .map(|r| r.try_get("id"))
            .collect::<sqlx::Result<std::collections::HashSet<TaskId>>>()?;
        applied.missing = requested
            .into_iter()
            .filter(|id| !found.contains(id))
            .collect();
    }
    let mut items = Vec::with_capacity(rows.len());
    for r in rows {
        // a row that does not decode (a type or status this version does not know) is left
        // as it is; the others go on
        let (task, last_hash) = match TaskRow::from_row(&r) {
            Ok(row) => row.into_task(),
            Err(e) => {
                let id: TaskId = r.try_get("id")?;
                tracing::error!(task.id = %id, error = %e, "skipping an unreadable task");
                applied.unreadable.push(id);
                continue;
            }
        };
        let id = task.id;
        match decide(&task, now, &paused)? {
            Some(events) if !events.is_empty() => items.push((task, last_hash, events)),
            _ => applied.unchanged.push(id),
        }
    }
    // the deliveries used up: their rows are removed in the statement that records the events
    let used: Vec<TaskId> = items
        .iter()
        .filter(|(_, _, evs)| evs.iter().any(uses_delivery))
        .map(|(task, _, _)| task.id)
        .collect();
    let afters = events::record_batch(tx, &items, now, &used).await?;

    let mut effects = outbox::Effects::default();
    for ((before, _, evs), after) in items.into_iter().zip(afters) {
        for e in &evs {
            match e {
                TaskEvent::RetryScheduled {
                    next_attempt,
                    available_at,
                    ..
                } => effects.add(after.id, *next_attempt, *available_at),
                TaskEvent::AttemptReleased { attempt, .. } => effects.add(after.id, *attempt, now),
                TaskEvent::Requeued { .. } => effects.add(after.id, after.next_attempt(), now),
                TaskEvent::DeadLettered { reason } => {
                    applied.dead_letters.push(DeadLetter {
                        task_id: after.id,
                        task_type: after.task_type,
                        attempts: after.attempts,
                        reason: reason.clone(),
                        at: now,
                    });
                }
                TaskEvent::Enqueued { .. }
                | TaskEvent::AttemptStarted { .. }
                | TaskEvent::Cancelled { .. }
                | TaskEvent::Dispatched { .. }
                | TaskEvent::AttemptStopped { .. }
                | TaskEvent::Erased { .. }
                | TaskEvent::AttemptSucceeded { .. }
                | TaskEvent::AttemptFailed { .. } => {}
            }
        }
        applied.changed.push(Changed {
            before,
            events: evs,
            after,
        });
    }
    outbox::apply_effects(tx, effects).await?;
    failed_copies::record(tx, &applied.dead_letters).await?;
    Ok(applied)
}

/// Whether `event` uses up the task's pending deliveries: the attempt was claimed, or the task
/// was requeued (its next delivery is added), cancelled or dead-lettered.
fn uses_delivery(event: &TaskEvent) -> bool {
    matches!(
        event,
        TaskEvent::AttemptStarted { .. }
            | TaskEvent::Requeued { .. }
            | TaskEvent::Cancelled { .. }
            | TaskEvent::DeadLettered { .. }
    )
}

/// The paused task types, in a locking statement's select list (computed once per statement;
/// the table holds a row per paused type).
const PAUSED_TYPES: &str =
    "(SELECT coalesce(array_agg(p.task_type), '{}') FROM task_type_pauses p)";

/// Locks the target rows in id order; returns them and the ids asked for.
///
/// Not checked queries: the rows come back undecoded, so that [`apply`] decodes them one by one
/// and a row this version cannot read fails only itself; and the statement varies with the lock
/// and payload wanted.
async fn lock(tx: &mut Tx, target: Target<'_>) -> Result<(Vec<PgRow>, Vec<TaskId>)> {
    Ok(match target {
        Target::Ids(ids, lock, payload) => {
            let mut ids = ids.to_vec();
            ids.sort();
            ids.dedup();
            let skip = if lock == Lock::SkipLocked {
                " SKIP LOCKED"
            } else {
                ""
            };
            let columns = match payload {
                Payload::Load => TASK_COLUMNS,
                Payload::Skip => TASK_COLUMNS_NO_PAYLOAD,
            };
            let rows = sqlx::query(&format!(
                "SELECT {columns}, now() AS db_now, event_position(0) AS position_base, \
                        {PAUSED_TYPES} AS paused_types FROM tasks \
                 WHERE id = ANY($1) ORDER BY id FOR UPDATE{skip}"
            ))
            .bind(&ids)
            .fetch_all(tx.conn())
            .await?;
            (rows, ids)
        }
        Target::ExpiredLeases {
            limit,
            live_owners,
            live_grace,
        } => {
            let rows = sqlx::query(&format!(
                "SELECT {TASK_COLUMNS_NO_PAYLOAD}, now() AS db_now, \
                        event_position(0) AS position_base, {PAUSED_TYPES} AS paused_types \
                 FROM task_leases l JOIN tasks ON tasks.id = l.task_id \
                 WHERE l.expires_at < now() \
                   AND lease_owner IS NOT NULL AND lease_expires_at < now() \
                   AND (lease_owner <> ALL($2) OR lease_expires_at < now() - $3::interval) \
                 ORDER BY l.expires_at LIMIT $1 FOR UPDATE OF tasks SKIP LOCKED"
            ))
            .bind(limit)
            .bind(live_owners)
            .bind(live_grace)
            .fetch_all(tx.conn())
            .await?;
            (rows, Vec::new())
        }
    })
}
