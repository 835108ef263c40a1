//! Re-checking the hash chains: the evidence that no stored event was edited, removed or
//! reordered since it was written.
//!
//! For each task, events must be numbered 1, 2, 3, ... without gaps, each must link to the hash of
//! the one before (the first to none), each stored hash must equal the hash recomputed from the
//! stored content, and the projection's `last_hash` and `version` must point at the last event (so
//! a removed tail is caught too).

use futures::TryStreamExt;
use sqlx::PgPool;
use uuid::Uuid;

use super::events::StoredEvent;
use super::Result;
use crate::domain::event::{canonical_bytes, chain_hash};

/// The first broken link found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokenLink {
    pub task_id: Uuid,
    /// The sequence number of the first event that does not verify (or the projection's version).
    pub sequence: i32,
    pub reason: String,
}

/// What a verification run saw.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VerifyReport {
    pub tasks: u64,
    pub events: u64,
    pub broken: Option<BrokenLink>,
}

/// Verifies every chain, or only `task`'s, stopping at the first broken link.
pub async fn verify(pool: &PgPool, task: Option<Uuid>) -> Result<VerifyReport> {
    let mut report = VerifyReport::default();
    let sql = "SELECT position, task_id, sequence, event_type, event_version, data, occurred_at, \
               recorded_at, prev_hash, hash FROM task_events \
               WHERE ($1::uuid IS NULL OR task_id = $1) ORDER BY task_id, sequence";
    let mut scan = super::Tx::begin_scan(pool).await?;
    let mut rows = sqlx::query_as::<_, StoredEvent>(sql)
        .bind(task)
        .fetch(scan.conn());
    let mut current: Option<(Uuid, i32, Vec<u8>)> = None;
    while let Some(e) = rows.try_next().await? {
        report.events += 1;
        let (expected_seq, prev) = match &current {
            Some((id, seq, hash)) if *id == e.task_id => (seq + 1, Some(hash.clone())),
            Some((id, seq, hash)) => {
                if let Some(b) = check_projection(pool, *id, *seq, hash).await? {
                    report.broken = Some(b);
                    return Ok(report);
                }
                report.tasks += 1;
                (1, None)
            }
            None => {
                report.tasks += 1;
                (1, None)
            }
        };
        if let Some(reason) = check_event(&e, expected_seq, prev.as_deref()) {
            report.broken = Some(BrokenLink {
                task_id: e.task_id,
                sequence: e.sequence,
                reason,
            });
            return Ok(report);
        }
        current = Some((e.task_id, e.sequence, e.hash));
    }
    drop(rows);
    if let Some((id, seq, hash)) = current {
        report.broken = check_projection(pool, id, seq, &hash).await?;
    }
    if let (Some(id), 0) = (task, report.events) {
        report.broken = check_projection(pool, id, 0, &[]).await?;
    }
    Ok(report)
}

fn check_event(e: &StoredEvent, expected_seq: i32, prev: Option<&[u8]>) -> Option<String> {
    if e.sequence != expected_seq {
        return Some(format!(
            "expected event {expected_seq}, found {} (an event is missing)",
            e.sequence
        ));
    }
    if e.prev_hash.as_deref() != prev {
        return Some("does not link to the previous event's hash".into());
    }
    let canonical = canonical_bytes(
        e.task_id,
        e.sequence,
        &e.event_type,
        e.event_version,
        &e.data,
        e.occurred_at,
    );
    if chain_hash(prev, &canonical).as_slice() != e.hash.as_slice() {
        return Some("content does not match its hash (the event was altered)".into());
    }
    None
}

async fn check_projection(
    pool: &PgPool,
    task_id: Uuid,
    last_seq: i32,
    last_hash: &[u8],
) -> Result<Option<BrokenLink>> {
    let row: Option<(i32, Vec<u8>)> =
        sqlx::query_as("SELECT version, last_hash FROM tasks WHERE id = $1")
            .bind(task_id)
            .fetch_optional(pool)
            .await?;
    let broken = |sequence, reason: &str| BrokenLink {
        task_id,
        sequence,
        reason: reason.to_owned(),
    };
    Ok(match row {
        None if last_seq == 0 => None,
        None => Some(broken(last_seq, "events exist for a task with no projection row")),
        Some((version, _)) if version != last_seq => Some(broken(
            last_seq + 1,
            &format!("the task is at version {version} but its history ends at event {last_seq} (events were removed)"),
        )),
        Some((_, hash)) if hash != last_hash => Some(broken(
            last_seq,
            "the task's last hash differs from its last event's",
        )),
        Some(_) => None,
    })
}
