//! Operator actions on one task: requeue a dead task, cancel a waiting or running one. Each is
//! one transaction: lock the row, decide the event, append it with the projection, adjust the
//! outbox.

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use super::tasks::{self, TaskRow};
use super::{events, outbox, Result, StoreError, Tx};

/// Gives a dead task `extra_attempts` more attempts and queues it now.
pub async fn requeue(pool: &PgPool, id: Uuid, extra_attempts: i32, by: &str) -> Result<TaskRow> {
    act(pool, id, |task, now| {
        let event = task.requeue(extra_attempts, by.to_owned())?;
        Ok((event, Some((task.next_attempt(), now))))
    })
    .await
}

/// Cancels a task that has not ended. Its pending deliveries are removed.
pub async fn cancel(pool: &PgPool, id: Uuid, reason: String, by: &str) -> Result<TaskRow> {
    act(pool, id, |task, _| {
        Ok((task.cancel(reason, by.to_owned())?, None))
    })
    .await
}

type Decision = (crate::domain::TaskEvent, Option<(i32, DateTime<Utc>)>);

async fn act<F>(pool: &PgPool, id: Uuid, decide: F) -> Result<TaskRow>
where
    F: FnOnce(&crate::domain::Task, DateTime<Utc>) -> Result<Decision>,
{
    let mut tx = Tx::begin(pool).await?;
    let (row, now) = tasks::lock_with_now(&mut tx, id)
        .await?
        .ok_or(StoreError::NotFound(id))?;
    let task = row.to_task()?;
    let (event, delivery) = decide(&task, now)?;
    events::record(&mut tx, &task, &row.last_hash, &[event], now).await?;
    outbox::delete_for_task(&mut tx, id).await?;
    if let Some((attempt, at)) = delivery {
        outbox::insert(&mut tx, id, attempt, at).await?;
        sqlx::query("SELECT pg_notify('arnela_outbox', '')")
            .execute(tx.conn())
            .await?;
    }
    let row = tasks::lock_with_now(&mut tx, id)
        .await?
        .ok_or(StoreError::NotFound(id))?
        .0;
    tx.commit().await?;
    Ok(row)
}
