//! Operator actions on one task: requeue a dead task, cancel a waiting or running one. Each is
//! one [`transition::apply`]: the operator only decides the event.

use sqlx::PgPool;
use uuid::Uuid;

use super::tasks::{self, TaskRow};
use super::transition::{self, Lock, Payload, Target};
use super::{Result, StoreError, Tx};
use crate::domain::task::MAX_TOTAL_ATTEMPTS;
use crate::domain::{Task, TaskEvent};

/// Gives a dead task `extra_attempts` more attempts and queues it now; refused when the task
/// would have more than [`MAX_TOTAL_ATTEMPTS`] in all.
pub async fn requeue(pool: &PgPool, id: Uuid, extra_attempts: i32, by: &str) -> Result<TaskRow> {
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
pub async fn cancel(pool: &PgPool, id: Uuid, reason: String, by: &str) -> Result<TaskRow> {
    act(pool, id, |task| {
        Ok(task.cancel(reason.clone(), by.to_owned())?)
    })
    .await
}

async fn act<F>(pool: &PgPool, id: Uuid, decide: F) -> Result<TaskRow>
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
        return Err(StoreError::NotFound(id));
    }
    let row = tasks::get_for_update(&mut tx, id).await?;
    tx.commit().await?;
    Ok(row)
}
