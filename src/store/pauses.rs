//! Paused task types. A paused type is not dispatched by the relays ([`super::outbox::claim_due`]
//! skips its rows) and not claimed by the workers (a claim reads the pauses with its lock,
//! [`super::transition::apply_seeing_pauses`], and a delivery already in Redis goes back to the
//! outbox unpublished, [`super::outbox::unpublish`]). The state lives in `task_type_pauses`, so
//! it holds across restarts and for every process at once.

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use super::Result;
use crate::domain::TaskType;

/// A paused type: since when and by whom.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pause {
    pub task_type: String,
    pub paused_at: DateTime<Utc>,
    pub paused_by: String,
}

/// Every paused type.
pub async fn list(pool: &PgPool) -> Result<Vec<Pause>> {
    Ok(sqlx::query_as!(
        Pause,
        "SELECT task_type, paused_at, paused_by FROM task_type_pauses ORDER BY task_type"
    )
    .fetch_all(pool)
    .await?)
}

/// Pauses `task_type` (pausing a paused type keeps its first pause). Returns the pause.
pub async fn pause(pool: &PgPool, task_type: TaskType, by: &str) -> Result<Pause> {
    Ok(sqlx::query_as!(
        Pause,
        r#"WITH added AS (
             INSERT INTO task_type_pauses (task_type, paused_by) VALUES ($1, $2)
             ON CONFLICT (task_type) DO NOTHING
             RETURNING task_type, paused_at, paused_by
           )
           SELECT task_type AS "task_type!", paused_at AS "paused_at!", paused_by AS "paused_by!"
           FROM added
           UNION ALL
           SELECT task_type, paused_at, paused_by FROM task_type_pauses WHERE task_type = $1
           LIMIT 1"#,
        task_type.as_str(),
        by
    )
    .fetch_one(pool)
    .await?)
}

/// Resumes `task_type`; returns whether it was paused. The relays are woken at commit, so the
/// type's waiting deliveries are published at once.
pub async fn resume(pool: &PgPool, task_type: TaskType) -> Result<bool> {
    let removed = sqlx::query_scalar!(
        r#"WITH removed AS (DELETE FROM task_type_pauses WHERE task_type = $1 RETURNING 1)
           SELECT count(*) AS "count!" FROM removed, pg_notify($2, '')"#,
        task_type.as_str(),
        super::outbox::CHANNEL
    )
    .fetch_one(pool)
    .await?;
    Ok(removed > 0)
}
