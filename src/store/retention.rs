//! What the log and the projection keep, and for how long (migration 16, README "Retention"):
//! the monthly partitions of `task_events` made ahead of time ([`ensure_partitions`]), their
//! listing for the archive command ([`partitions`]), and the removal of finished tasks'
//! projection rows after the retention period ([`retire_finished`]).

use chrono::{DateTime, Datelike, Months, NaiveDate, TimeZone, Utc};
use sqlx::PgPool;

use super::Result;
use crate::domain::{TaskId, TaskStatus, TaskType};

/// Months of partitions kept ready after the current one.
pub const MONTHS_AHEAD: u32 = 2;

/// A monthly partition of the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// `task_events_pYYYYMM`.
    pub name: String,
    /// First instant of the month (UTC), included.
    pub starts_at: DateTime<Utc>,
    /// First instant of the next month, excluded.
    pub ends_at: DateTime<Utc>,
}

impl Partition {
    /// The partition of the month holding `at`.
    pub fn of(at: DateTime<Utc>) -> Partition {
        let first = NaiveDate::from_ymd_opt(at.year(), at.month(), 1).expect("a month's first day");
        Partition::from_month_start(first)
    }

    /// The partition named `task_events_pYYYYMM`, if `name` is one.
    pub fn from_name(name: &str) -> Option<Partition> {
        let digits = name.strip_prefix("task_events_p")?;
        if digits.len() != 6 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let year: i32 = digits[..4].parse().ok()?;
        let month: u32 = digits[4..].parse().ok()?;
        Some(Partition::from_month_start(NaiveDate::from_ymd_opt(
            year, month, 1,
        )?))
    }

    fn from_month_start(first: NaiveDate) -> Partition {
        let next = first + Months::new(1);
        let at = |d: NaiveDate| Utc.from_utc_datetime(&d.and_hms_opt(0, 0, 0).expect("midnight"));
        Partition {
            name: format!("task_events_p{}", first.format("%Y%m")),
            starts_at: at(first),
            ends_at: at(next),
        }
    }

    /// The partition of the month after this one.
    pub fn next(&self) -> Partition {
        Partition::of(self.ends_at)
    }
}

/// The monthly partitions of the log, oldest first (the default partition is not listed).
pub async fn partitions(pool: &PgPool) -> Result<Vec<Partition>> {
    let names = sqlx::query_scalar!(
        r#"SELECT c.relname::text AS "name!" FROM pg_inherits i
           JOIN pg_class c ON c.oid = i.inhrelid
           WHERE i.inhparent = 'task_events'::regclass"#
    )
    .fetch_all(pool)
    .await?;
    let mut found: Vec<Partition> = names
        .iter()
        .filter_map(|n| Partition::from_name(n))
        .collect();
    found.sort_by_key(|p| p.starts_at);
    Ok(found)
}

/// Makes sure the partitions of `now`'s month and the [`MONTHS_AHEAD`] after it exist (through
/// the owner's `task_events_partition`, so the runtime role can). Returns the ones created.
/// Months already archived are never made again: only the current month and later ones are.
pub async fn ensure_partitions(pool: &PgPool, now: DateTime<Utc>) -> Result<Vec<String>> {
    let existing = partitions(pool).await?;
    let mut wanted = Partition::of(now);
    let mut created = Vec::new();
    for _ in 0..=MONTHS_AHEAD {
        if !existing.contains(&wanted) {
            let name = sqlx::query_scalar!(
                r#"SELECT task_events_partition($1) AS "name!""#,
                wanted.starts_at
            )
            .fetch_one(pool)
            .await?;
            created.push(name);
        }
        wanted = wanted.next();
    }
    Ok(created)
}

/// The statuses a task never leaves (the ones retention may remove from the projection).
pub const FINISHED: [&str; 3] = ["succeeded", "dead", "cancelled"];

/// Moves up to `limit` finished tasks whose last change is older than `older_than` out of the
/// projection: their chain's head goes to `retired_tasks`, their row (and its idempotency key),
/// any delivery row and lease left with it are deleted, in one transaction. Rows another
/// transaction holds are skipped. Returns how many were retired.
pub async fn retire_finished(pool: &PgPool, older_than: DateTime<Utc>, limit: i64) -> Result<u64> {
    let retired = sqlx::query_scalar!(
        r#"WITH gone AS (
           SELECT id FROM tasks
           WHERE created_at < $1 AND updated_at < $1 AND status = ANY($2)
           ORDER BY created_at LIMIT $3 FOR UPDATE SKIP LOCKED
         ), kept AS (
           INSERT INTO retired_tasks (id, task_type, status, owner, attempts, max_attempts,
             run_at, version, last_hash, created_at, updated_at)
           SELECT id, task_type, status, owner, attempts, max_attempts, run_at, version,
             last_hash, created_at, updated_at
           FROM tasks WHERE id IN (SELECT id FROM gone)
           RETURNING id
         ), outbox_rows AS (
           DELETE FROM outbox WHERE task_id IN (SELECT id FROM gone)
         ), leases AS (
           DELETE FROM task_leases WHERE task_id IN (SELECT id FROM gone)
         ), removed AS (
           DELETE FROM tasks WHERE id IN (SELECT id FROM kept) RETURNING 1
         ) SELECT count(*) AS "retired!" FROM removed"#,
        older_than,
        &FINISHED[..] as &[&str],
        limit
    )
    .fetch_one(pool)
    .await?;
    Ok(retired as u64)
}

/// A retired task's head: what the projection row said of its chain when it was removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetiredTask {
    pub id: crate::domain::TaskId,
    pub task_type: crate::domain::TaskType,
    pub status: crate::domain::TaskStatus,
    pub owner: String,
    pub attempts: i32,
    pub max_attempts: i32,
    pub run_at: DateTime<Utc>,
    pub version: i32,
    pub last_hash: Vec<u8>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub retired_at: DateTime<Utc>,
}

/// What a retired task's payload reads.
pub const RETIRED: &str = "[retired]";

impl RetiredTask {
    /// The task as the API shows it: its payload, idempotency key and last error are gone
    /// (the payload reads [`RETIRED`], or `"[erased]"` once erased).
    pub fn into_task(self, erased: bool) -> crate::domain::Task {
        let payload = if erased {
            crate::domain::sealing::ERASED
        } else {
            RETIRED
        };
        crate::domain::Task {
            id: self.id,
            task_type: self.task_type,
            payload: serde_json::Value::String(payload.into()),
            status: self.status,
            attempts: self.attempts,
            max_attempts: self.max_attempts,
            run_at: self.run_at,
            idempotency_key: None,
            last_error: None,
            version: self.version,
            lease_owner: None,
            lease_expires_at: None,
            created_at: self.created_at,
            updated_at: self.updated_at,
            owner: self.owner,
            trace: None,
        }
    }
}

/// The retired task `id`, if retention removed its projection row.
pub async fn retired(pool: &PgPool, id: crate::domain::TaskId) -> Result<Option<RetiredTask>> {
    Ok(sqlx::query_as!(
        RetiredTask,
        r#"SELECT id AS "id: TaskId", task_type AS "task_type: TaskType",
                  status AS "status: TaskStatus", owner, attempts, max_attempts, run_at, version,
                  last_hash, created_at, updated_at, retired_at
           FROM retired_tasks WHERE id = $1"#,
        id as TaskId
    )
    .fetch_optional(pool)
    .await?)
}

/// The retired task `id`, locked for an append to its chain.
pub(crate) async fn retired_for_update(
    tx: &mut super::Tx,
    id: crate::domain::TaskId,
) -> Result<Option<RetiredTask>> {
    Ok(sqlx::query_as!(
        RetiredTask,
        r#"SELECT id AS "id: TaskId", task_type AS "task_type: TaskType",
                  status AS "status: TaskStatus", owner, attempts, max_attempts, run_at, version,
                  last_hash, created_at, updated_at, retired_at
           FROM retired_tasks WHERE id = $1 FOR UPDATE"#,
        id as TaskId
    )
    .fetch_optional(tx.conn())
    .await?)
}

/// Moves a retired task's head to its new last event (`task`'s version and hash).
pub(crate) async fn advance_retired(tx: &mut super::Tx, task: &RetiredTask) -> Result<()> {
    sqlx::query!(
        "UPDATE retired_tasks SET version = $2, last_hash = $3, updated_at = $4 WHERE id = $1",
        task.id as TaskId,
        task.version,
        &task.last_hash,
        task.updated_at
    )
    .execute(tx.conn())
    .await?;
    Ok(())
}

/// The archive holding task `id`'s newest archived event, if any of its history was archived.
pub async fn archived_in(pool: &PgPool, id: crate::domain::TaskId) -> Result<Option<String>> {
    Ok(sqlx::query_scalar!(
        "SELECT archive FROM task_event_anchors WHERE task_id = $1 ORDER BY sequence DESC LIMIT 1",
        id as TaskId
    )
    .fetch_optional(pool)
    .await?)
}

/// Whether task `id`'s history records an erasure (in the partitions still here).
pub(crate) async fn was_erased(
    conn: &mut sqlx::PgConnection,
    id: crate::domain::TaskId,
) -> Result<bool> {
    Ok(sqlx::query_scalar!(
        r#"SELECT EXISTS (SELECT FROM task_events WHERE task_id = $1 AND event_type = 'erased')
             AS "erased!""#,
        id as TaskId
    )
    .fetch_one(conn)
    .await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_named_by_month_and_cover_it() {
        let p = Partition::of(Utc.with_ymd_and_hms(2026, 12, 31, 23, 59, 59).unwrap());
        assert_eq!(p.name, "task_events_p202612");
        assert_eq!(
            p.starts_at,
            Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0).unwrap()
        );
        assert_eq!(
            p.ends_at,
            Utc.with_ymd_and_hms(2027, 1, 1, 0, 0, 0).unwrap()
        );
        assert_eq!(p.next().name, "task_events_p202701");
        assert_eq!(Partition::from_name("task_events_p202612"), Some(p));
        assert_eq!(Partition::from_name("task_events_default"), None);
        assert_eq!(Partition::from_name("task_events_p202613"), None);
    }
}
