//! Re-checking the hash chains: the evidence that no stored event was edited, removed or
//! reordered since it was written.
//!
//! For each task, events must be numbered 1, 2, 3, ... without gaps, each must link to the hash of
//! the one before (the first to none), each stored hash must equal the hash recomputed from the
//! stored content, and the projection's `last_hash` and `version` must point at the last event (so
//! a removed tail is caught too). A projection row without any event, and events without a
//! projection row, are broken as well. The head of a task retention retired is its row in
//! `retired_tasks`; a history whose oldest events were archived starts at its anchor (its last
//! archived event, `task_event_anchors`): the first event still stored must link to it.
//!
//! [`verify`] walks the log in pages of tasks (by id), each read in its own short read-only
//! transaction, so a run over millions of events holds no snapshot for long (it never holds back
//! the commit-safe horizon of `/events`, `GET /tasks` and the projectors) and keeps one page in
//! memory. It reports every broken chain, one link per task (the first that does not hold).

use crate::domain::TaskId;
use sqlx::PgPool;
use std::collections::BTreeMap;

use super::events::StoredEvent;
use super::Result;
use crate::domain::event::{canonical_bytes, event_hash, Placement};

/// Tasks per page of [`verify`].
pub const PAGE_TASKS: i64 = 1000;
/// Broken links kept in a report; more are counted only.
pub const MAX_REPORTED: usize = 10_000;

/// A broken link: the first of its task.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BrokenLink {
    pub task_id: TaskId,
    /// The sequence number of the first event that does not verify (or the projection's version).
    pub sequence: i32,
    pub reason: String,
}

/// What a verification run saw.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct VerifyReport {
    pub tasks: u64,
    pub events: u64,
    /// Broken links, in task id order (at most [`MAX_REPORTED`]).
    pub broken: Vec<BrokenLink>,
    /// Every broken chain found, also those beyond [`MAX_REPORTED`].
    pub broken_total: u64,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.broken_total == 0
    }

    fn add(&mut self, b: BrokenLink) {
        self.broken_total += 1;
        if self.broken.len() < MAX_REPORTED {
            self.broken.push(b);
        }
    }
}

/// Progress of a run, after each page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub tasks: u64,
    pub events: u64,
    pub broken: u64,
}

/// Verifies every chain, page by page (see the module's doc), calling `progress` after each page.
pub async fn verify(pool: &PgPool, mut progress: impl FnMut(Progress)) -> Result<VerifyReport> {
    let mut report = VerifyReport::default();
    let mut after = TaskId::default();
    loop {
        let (last, done) = verify_page(pool, after, &mut report).await?;
        progress(Progress {
            tasks: report.tasks,
            events: report.events,
            broken: report.broken_total,
        });
        if done {
            return Ok(report);
        }
        after = last;
    }
}

/// Verifies one task's chain. `None` when the task has neither events nor a head.
pub async fn verify_task(pool: &PgPool, id: TaskId) -> Result<Option<VerifyReport>> {
    let mut tx = super::begin_snapshot(pool, true).await?;
    let heads = heads_in(&mut tx, id, Some(id)).await?;
    let anchors = anchors_in(&mut tx, id, Some(id)).await?;
    let events = events_in(&mut tx, id, Some(id)).await?;
    tx.commit().await?;
    if heads.is_empty() && events.is_empty() && anchors.is_empty() {
        return Ok(None);
    }
    let mut report = VerifyReport::default();
    check_tasks(&heads, &anchors, &events, &mut report);
    Ok(Some(report))
}

/// The head of a task's chain as its projection row (or, once retention removed that,
/// `retired_tasks`) holds it.
struct Head {
    id: TaskId,
    version: i32,
    last_hash: Vec<u8>,
}

/// Where a task's history continues from an archive: its last archived event.
pub(crate) struct Anchor {
    pub task_id: TaskId,
    pub sequence: i32,
    pub hash: Vec<u8>,
}

/// Checks the tasks with ids in `(after, upper]`, where `upper` is the [`PAGE_TASKS`]-th task
/// id after `after` (or everything that is left). Returns `upper` and whether the log is done.
async fn verify_page(
    pool: &PgPool,
    after: TaskId,
    report: &mut VerifyReport,
) -> Result<(TaskId, bool)> {
    // one snapshot for the page: the heads and the events agree with each other
    let mut tx = super::begin_snapshot(pool, true).await?;
    // each side limited first, so that both are read by index, a page at most
    let upper = sqlx::query_scalar!(
        r#"SELECT id AS "id!: TaskId"
           FROM ((SELECT id FROM tasks WHERE id > $1 ORDER BY id LIMIT $2)
                 UNION ALL
                 (SELECT id FROM retired_tasks WHERE id > $1 ORDER BY id LIMIT $2)) heads
           ORDER BY id OFFSET $2 - 1 LIMIT 1"#,
        after as TaskId,
        PAGE_TASKS
    )
    .fetch_optional(&mut *tx)
    .await?;
    // the last page runs to the end of every table (events of tasks without a head included)
    let from = successor(after);
    let heads = heads_in(&mut tx, from, upper).await?;
    let anchors = anchors_in(&mut tx, from, upper).await?;
    let events = events_in(&mut tx, from, upper).await?;
    tx.commit().await?;
    check_tasks(&heads, &anchors, &events, report);
    Ok((upper.unwrap_or(after), upper.is_none()))
}

/// The first id after `id` (the lower bound of the page that follows it).
fn successor(id: TaskId) -> TaskId {
    TaskId::from_uuid(uuid::Uuid::from_u128(
        id.as_uuid().as_u128().saturating_add(1),
    ))
}

/// The heads of the tasks with ids in `[from, to]` (`to` `None`: to the end).
async fn heads_in(
    tx: &mut sqlx::PgConnection,
    from: TaskId,
    to: Option<TaskId>,
) -> Result<Vec<Head>> {
    Ok(sqlx::query_as!(
        Head,
        r#"SELECT id AS "id!: TaskId", version AS "version!", last_hash AS "last_hash!"
           FROM tasks WHERE id >= $1 AND ($2::uuid IS NULL OR id <= $2)
           UNION ALL
           SELECT id, version, last_hash
           FROM retired_tasks WHERE id >= $1 AND ($2::uuid IS NULL OR id <= $2)
           ORDER BY 1"#,
        from as TaskId,
        to as Option<TaskId>
    )
    .fetch_all(tx)
    .await?)
}

/// The newest anchor of each task in the range.
async fn anchors_in(
    tx: &mut sqlx::PgConnection,
    from: TaskId,
    to: Option<TaskId>,
) -> Result<Vec<Anchor>> {
    Ok(sqlx::query_as!(
        Anchor,
        r#"SELECT DISTINCT ON (task_id) task_id AS "task_id: TaskId", sequence, hash
           FROM task_event_anchors
           WHERE task_id >= $1 AND ($2::uuid IS NULL OR task_id <= $2)
           ORDER BY task_id, sequence DESC"#,
        from as TaskId,
        to as Option<TaskId>
    )
    .fetch_all(tx)
    .await?)
}

/// The events of the tasks in the range, in task and sequence order.
async fn events_in(
    tx: &mut sqlx::PgConnection,
    from: TaskId,
    to: Option<TaskId>,
) -> Result<Vec<StoredEvent>> {
    Ok(sqlx::query_as!(
        StoredEvent,
        r#"SELECT position, task_id AS "task_id: TaskId", sequence, event_type, event_version,
                  data, occurred_at, recorded_at, prev_hash, hash, hash_version
           FROM task_events
           WHERE task_id >= $1 AND ($2::uuid IS NULL OR task_id <= $2)
           ORDER BY task_id, sequence"#,
        from as TaskId,
        to as Option<TaskId>
    )
    .fetch_all(tx)
    .await?)
}

/// Checks every task of a page: its events (in task, sequence order) from its anchor (if its
/// oldest events were archived) to its head.
fn check_tasks(
    heads: &[Head],
    anchors: &[Anchor],
    events: &[StoredEvent],
    report: &mut VerifyReport,
) {
    type Parts<'a> = (Option<&'a Head>, Option<&'a Anchor>, &'a [StoredEvent]);
    let mut tasks: BTreeMap<TaskId, Parts<'_>> = BTreeMap::new();
    for h in heads {
        tasks.entry(h.id).or_default().0 = Some(h);
    }
    for a in anchors {
        tasks.entry(a.task_id).or_default().1 = Some(a);
    }
    for chain in events.chunk_by(|a, b| a.task_id == b.task_id) {
        tasks.entry(chain[0].task_id).or_default().2 = chain;
    }
    for (id, (head, anchor, chain)) in tasks {
        report.tasks += 1;
        report.events += chain.len() as u64;
        if let Some(b) = check_chain(id, chain, anchor, head) {
            report.add(b);
        }
    }
}

/// The first broken link of one task's events (in sequence order, possibly none), read from
/// its anchor (the last archived event) when there is one, up to its head.
fn check_chain(
    task_id: TaskId,
    chain: &[StoredEvent],
    anchor: Option<&Anchor>,
    head: Option<&Head>,
) -> Option<BrokenLink> {
    let broken = |sequence, reason: String| {
        Some(BrokenLink {
            task_id,
            sequence,
            reason,
        })
    };
    // where the stored events start: after the anchor when the ones before were archived
    let continues = anchor.filter(|a| chain.first().is_none_or(|e| e.sequence == a.sequence + 1));
    let mut prev: Option<Link<'_>> = continues.map(|a| Link {
        hash: &a.hash,
        hash_version: 0,
    });
    let first = continues.map_or(1, |a| a.sequence + 1);
    for (i, e) in chain.iter().enumerate() {
        if let Some(reason) = check_event(e, first + i as i32, prev) {
            return broken(e.sequence, reason);
        }
        prev = Some(Link {
            hash: &e.hash,
            hash_version: e.hash_version,
        });
    }
    // an archive's anchor inside the stored events (a restored archive) must match them
    if let Some(a) = anchor.filter(|_| continues.is_none()) {
        match chain.iter().find(|e| e.sequence == a.sequence) {
            Some(e) if e.hash == a.hash => {}
            Some(_) => {
                return broken(
                    a.sequence,
                    "differs from the event the archive recorded (the event was altered)".into(),
                )
            }
            None => {
                return broken(
                    a.sequence,
                    format!(
                        "event {} was archived but the stored history ends at event {}",
                        a.sequence,
                        chain.last().map_or(0, |e| e.sequence)
                    ),
                )
            }
        }
    }
    let (last_sequence, last_hash) = match (chain.last(), continues) {
        (Some(e), _) => (e.sequence, e.hash.as_slice()),
        (None, Some(a)) => (a.sequence, a.hash.as_slice()),
        (None, None) => {
            let version = head.map_or(0, |h| h.version);
            return broken(
                1,
                format!(
                    "the task is at version {version} but has no events (its history was removed)"
                ),
            );
        }
    };
    match head {
        None => broken(
            last_sequence,
            "events exist for a task with no projection row".into(),
        ),
        Some(h) if h.version != last_sequence => broken(
            last_sequence + 1,
            format!(
                "the task is at version {} but its history ends at event {last_sequence} \
                 (events were removed)",
                h.version
            ),
        ),
        Some(h) if h.last_hash != last_hash => broken(
            last_sequence,
            "the task's last hash differs from its last event's".into(),
        ),
        Some(_) => None,
    }
}

/// The event a stored event links to: its hash and hash version (0 for an archived event).
#[derive(Debug, Clone, Copy)]
pub struct Link<'a> {
    pub hash: &'a [u8],
    pub hash_version: i16,
}

/// What is wrong with event `e`, expected to be number `expected_seq` and to follow `prev`
/// (`None` for a task's first event): its number, its link, its hash version, its hash.
pub fn check_event(e: &StoredEvent, expected_seq: i32, prev: Option<Link<'_>>) -> Option<String> {
    if e.sequence != expected_seq {
        return Some(format!(
            "expected event {expected_seq}, found {} (an event is missing)",
            e.sequence
        ));
    }
    let prev_hash = prev.map(|p| p.hash);
    if e.prev_hash.as_deref() != prev_hash {
        return Some("does not link to the previous event's hash".into());
    }
    if let Some(p) = prev.filter(|p| e.hash_version < p.hash_version) {
        return Some(format!(
            "hash version {} after version {} (a chain never goes back)",
            e.hash_version, p.hash_version
        ));
    }
    let placed = match e.hash_version {
        1 => None,
        2 => Some(Placement {
            position: e.position,
            recorded_at: e.recorded_at,
        }),
        v => return Some(format!("unknown hash version {v}")),
    };
    let document = canonical_bytes(
        e.hash_version,
        e.task_id.into_uuid(),
        e.sequence,
        &e.event_type,
        e.event_version,
        &e.data,
        e.occurred_at,
    );
    if event_hash(prev_hash, &document, placed).as_slice() != e.hash.as_slice() {
        return Some(
            "content, position or recording time does not match its hash (the event was altered)"
                .into(),
        );
    }
    None
}
