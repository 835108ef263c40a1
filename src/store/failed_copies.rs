//! The failed list's outbox (`failed_copies`): the copy of each dead-lettered task for Redis's
//! failed list is written in the transaction that records its `dead_lettered` event
//! ([`super::transition::apply`]) and deleted by the transaction that pushes it
//! ([`crate::dead_letters::push_pending`]). A copy therefore outlives a Redis that refuses it
//! and a process that dies before pushing it.

use super::{Result, Tx};
use crate::domain::task::DeadLetter;
use crate::domain::{TaskId, TaskType};

/// Writes the copies of `dead`, in order, for a later [`take`].
pub async fn record(tx: &mut Tx, dead: &[DeadLetter]) -> Result<()> {
    if dead.is_empty() {
        return Ok(());
    }
    let ids: Vec<TaskId> = dead.iter().map(|d| d.task_id).collect();
    let types: Vec<&str> = dead.iter().map(|d| d.task_type.as_str()).collect();
    let attempts: Vec<i32> = dead.iter().map(|d| d.attempts).collect();
    let reasons: Vec<&str> = dead.iter().map(|d| d.reason.as_str()).collect();
    let at: Vec<_> = dead.iter().map(|d| d.at).collect();
    sqlx::query!(
        "INSERT INTO failed_copies (task_id, task_type, attempts, reason, failed_at) \
         SELECT task_id, task_type, attempts, reason, failed_at \
         FROM UNNEST($1::uuid[], $2::text[], $3::int4[], $4::text[], $5::timestamptz[]) \
           WITH ORDINALITY AS c(task_id, task_type, attempts, reason, failed_at, n) ORDER BY n",
        &ids as &[TaskId],
        &types as &[&str],
        &attempts,
        &reasons as &[&str],
        &at
    )
    .execute(tx.conn())
    .await?;
    Ok(())
}

/// Deletes up to `limit` copies, oldest first, and returns them in that order; rows that another
/// transaction holds are skipped (it is pushing them), and so are copies of task types this
/// build does not know (a newer process wrote them, and pushes them). The caller pushes them
/// before it commits: a rollback leaves them for the next.
pub async fn take(tx: &mut Tx, limit: i64) -> Result<Vec<DeadLetter>> {
    let known: Vec<&str> = TaskType::ALL.iter().map(|t| t.as_str()).collect();
    let mut rows = sqlx::query!(
        r#"DELETE FROM failed_copies WHERE id IN
             (SELECT id FROM failed_copies WHERE task_type = ANY($2)
              ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED)
           RETURNING id, task_id AS "task_id: TaskId", task_type, attempts, reason, failed_at"#,
        limit,
        &known as &[&str]
    )
    .fetch_all(tx.conn())
    .await?;
    rows.sort_by_key(|r| r.id);
    Ok(rows
        .into_iter()
        .filter_map(|r| {
            Some(DeadLetter {
                task_id: r.task_id,
                task_type: r.task_type.parse().ok()?,
                attempts: r.attempts,
                reason: r.reason,
                at: r.failed_at,
            })
        })
        .collect())
}

/// How many copies wait for their push.
pub async fn pending(pool: &sqlx::PgPool) -> Result<i64> {
    Ok(
        sqlx::query_scalar!(r#"SELECT count(*) AS "n!" FROM failed_copies"#)
            .fetch_one(pool)
            .await?,
    )
}
