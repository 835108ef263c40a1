//! Schedules in Postgres: their definitions, their hash-chained change log, the slots fired, and
//! [`fire_due`], the scheduler's one step.
//!
//! **Exactly one task per slot.** [`fire_due`] locks the due schedules (`FOR UPDATE SKIP
//! LOCKED`, so processes share the work without waiting on each other), enqueues each due slot's
//! task with the idempotency key [`slot_key`], records the slot in `schedule_runs` and moves the
//! schedule's `next_run_at` past it, in one transaction. Two processes never fire one slot twice:
//! the second sees the moved `next_run_at`, and even one that read the old value gets the first
//! one's task back from the idempotency key. A process that dies mid-step commits nothing, so the
//! slot is still due for the next step of any process.

use crate::domain::TaskId;
use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use sqlx::{FromRow, PgPool};
use std::collections::HashMap;
use uuid::Uuid;

use super::tasks::{self, Enqueued};
use super::{Result, StoreError, Tx};
use crate::domain::event::{canonical_bytes, chain_hash, db_time, jsonb_stable};
use crate::domain::schedule::{due, slot_key, Cadence, MissedRuns};
use crate::domain::{validate_payload, NewTask, TaskType, ValidPayload};

/// A row of `schedules`. The task type and missed-runs policy stay the names stored and are
/// read through [`ScheduleRow::task`] and [`ScheduleRow::missed`], like the cron expression
/// through [`ScheduleRow::cadence`]: a row holding a name this version does not know (written by
/// a newer version during a rolling upgrade) fails only itself, not every read that lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct ScheduleRow {
    pub id: Uuid,
    pub name: String,
    pub cron: String,
    pub time_zone: String,
    pub task_type: String,
    pub payload: Value,
    pub max_attempts: i32,
    pub missed_runs: String,
    pub catch_up_limit: i32,
    pub paused: bool,
    pub next_run_at: Option<DateTime<Utc>>,
    pub last_run_at: Option<DateTime<Utc>>,
    pub owner: String,
    pub version: i32,
    pub last_hash: Vec<u8>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl ScheduleRow {
    /// The stored expression and zone, read again.
    pub fn cadence(&self) -> Result<Cadence> {
        Cadence::parse(&self.cron, &self.time_zone).map_err(|e| self.corrupt(e.message))
    }

    pub fn missed(&self) -> MissedRuns {
        match self.missed_runs.as_str() {
            "catch_up" => MissedRuns::CatchUp {
                limit: self.catch_up_limit.max(0) as u32,
            },
            _ => MissedRuns::Skip,
        }
    }

    /// The task type and payload each slot's task gets.
    pub fn task(&self) -> Result<(TaskType, ValidPayload)> {
        let t: TaskType = self
            .task_type
            .parse()
            .map_err(|e: crate::domain::payload::UnknownTaskType| self.corrupt(e.to_string()))?;
        let payload =
            validate_payload(t, self.payload.clone()).map_err(|e| self.corrupt(e.to_string()))?;
        Ok((t, payload))
    }

    fn corrupt(&self, what: impl std::fmt::Display) -> StoreError {
        StoreError::Corrupt(format!("schedule {}: {what}", self.id))
    }
}

/// A schedule to create.
#[derive(Debug, Clone)]
pub struct NewSchedule {
    pub name: String,
    pub cadence: Cadence,
    pub task_type: TaskType,
    pub payload: ValidPayload,
    pub max_attempts: i32,
    pub missed: MissedRuns,
    pub paused: bool,
    pub owner: String,
}

/// Changes to a schedule; `None` keeps a field.
#[derive(Debug, Clone, Default)]
pub struct ScheduleChange {
    pub name: Option<String>,
    pub cadence: Option<Cadence>,
    /// A new task type and payload (checked together).
    pub task: Option<(TaskType, ValidPayload)>,
    pub max_attempts: Option<i32>,
    pub missed: Option<MissedRuns>,
}

/// One stored schedule event.
#[derive(Debug, Clone, PartialEq, FromRow)]
pub struct ScheduleEvent {
    pub schedule_id: Uuid,
    pub sequence: i32,
    pub event_type: String,
    pub data: Value,
    pub occurred_at: DateTime<Utc>,
    pub recorded_at: DateTime<Utc>,
    pub prev_hash: Option<Vec<u8>>,
    pub hash: Vec<u8>,
}

/// The version of every schedule event's form.
const EVENT_VERSION: i16 = 1;

/// Appends one event to schedule `id`'s chain (after event `version`, hash `prev`); returns the
/// new version and hash. The caller updates the schedule row (or deletes it).
async fn append(
    tx: &mut Tx,
    id: Uuid,
    (version, prev): (i32, Option<&[u8]>),
    event_type: &'static str,
    mut data: Value,
    at: DateTime<Utc>,
) -> Result<(i32, Vec<u8>)> {
    let sequence = version + 1;
    jsonb_stable(&mut data);
    let at = db_time(at);
    let canonical = canonical_bytes(1, id, sequence, event_type, EVENT_VERSION, &data, at);
    let hash = chain_hash(prev, &canonical).to_vec();
    sqlx::query!(
        "INSERT INTO schedule_events (schedule_id, sequence, event_type, data, occurred_at, \
                                      prev_hash, hash) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
        id,
        sequence,
        event_type,
        &data,
        at,
        prev,
        &hash
    )
    .execute(tx.conn())
    .await?;
    Ok((sequence, hash))
}

fn definition(s: &ScheduleRow) -> Value {
    json!({
        "name": s.name,
        "cron": s.cron,
        "time_zone": s.time_zone,
        "type": s.task_type,
        "payload": s.payload,
        "max_attempts": s.max_attempts,
        "missed_runs": s.missed_runs,
        "catch_up_limit": s.catch_up_limit,
        "paused": s.paused,
    })
}

/// Creates a schedule and its `created` event; its first slot is the first after `now`.
pub async fn create(
    pool: &PgPool,
    new: NewSchedule,
    by: &str,
    now: DateTime<Utc>,
) -> Result<ScheduleRow> {
    let now = db_time(now);
    let mut row = ScheduleRow {
        id: Uuid::now_v7(),
        name: new.name,
        cron: new.cadence.expression().to_owned(),
        time_zone: new.cadence.zone().to_owned(),
        task_type: new.task_type.as_str().to_owned(),
        payload: new.payload.into_json(),
        max_attempts: new.max_attempts,
        missed_runs: new.missed.as_str().to_owned(),
        catch_up_limit: new.missed.limit() as i32,
        paused: new.paused,
        next_run_at: new.cadence.next_after(now),
        last_run_at: None,
        owner: new.owner,
        version: 0,
        last_hash: Vec::new(),
        created_at: now,
        updated_at: now,
    };
    let mut data = definition(&row);
    data["by"] = json!(by);
    let mut tx = Tx::begin(pool).await?;
    let (version, hash) = append(&mut tx, row.id, (0, None), "created", data, now).await?;
    row.version = version;
    row.last_hash = hash;
    save(&mut tx, &row).await?;
    tx.commit().await?;
    Ok(row)
}

pub async fn get(pool: &PgPool, id: Uuid) -> Result<Option<ScheduleRow>> {
    Ok(sqlx::query_as!(
        ScheduleRow,
        "SELECT id, name, cron, time_zone, task_type, payload, max_attempts, missed_runs,
                  catch_up_limit, paused, next_run_at, last_run_at, owner, version, last_hash,
                  created_at, updated_at
         FROM schedules WHERE id = $1",
        id
    )
    .fetch_optional(pool)
    .await?)
}

/// Up to `limit` schedules after the id `after`, oldest first (ids grow with time).
pub async fn list(pool: &PgPool, after: Option<Uuid>, limit: i64) -> Result<Vec<ScheduleRow>> {
    Ok(sqlx::query_as!(
        ScheduleRow,
        "SELECT id, name, cron, time_zone, task_type, payload, max_attempts, missed_runs,
                  catch_up_limit, paused, next_run_at, last_run_at, owner, version, last_hash,
                  created_at, updated_at
         FROM schedules WHERE $1::uuid IS NULL OR id > $1 ORDER BY id LIMIT $2",
        after,
        limit
    )
    .fetch_all(pool)
    .await?)
}

async fn lock(tx: &mut Tx, id: Uuid) -> Result<ScheduleRow> {
    sqlx::query_as!(
        ScheduleRow,
        "SELECT id, name, cron, time_zone, task_type, payload, max_attempts, missed_runs,
                  catch_up_limit, paused, next_run_at, last_run_at, owner, version, last_hash,
                  created_at, updated_at
         FROM schedules WHERE id = $1 FOR UPDATE",
        id
    )
    .fetch_optional(tx.conn())
    .await?
    .ok_or(StoreError::NotFound(id))
}

/// Writes `s` whole: inserts a new schedule or replaces the stored one.
async fn save(tx: &mut Tx, s: &ScheduleRow) -> Result<()> {
    sqlx::query!(
        "INSERT INTO schedules (id, name, cron, time_zone, task_type, payload, max_attempts, missed_runs,
                                catch_up_limit, paused, next_run_at, last_run_at, owner, version, last_hash,
                                created_at, updated_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)
         ON CONFLICT (id) DO UPDATE SET name = $2, cron = $3, time_zone = $4, task_type = $5,
           payload = $6, max_attempts = $7, missed_runs = $8, catch_up_limit = $9,
           paused = $10, next_run_at = $11, last_run_at = $12, version = $14,
           last_hash = $15, updated_at = $17",
        s.id,
        &s.name,
        &s.cron,
        &s.time_zone,
        &s.task_type,
        &s.payload,
        s.max_attempts,
        &s.missed_runs,
        s.catch_up_limit,
        s.paused,
        s.next_run_at,
        s.last_run_at,
        &s.owner,
        s.version,
        &s.last_hash,
        s.created_at,
        s.updated_at
    )
    .execute(tx.conn())
    .await?;
    Ok(())
}

/// Applies `change` and records an `updated` event listing the changed fields (nothing changed:
/// nothing recorded). A new expression or zone moves the next slot to the first after `now`.
pub async fn update(
    pool: &PgPool,
    id: Uuid,
    change: ScheduleChange,
    by: &str,
    now: DateTime<Utc>,
) -> Result<ScheduleRow> {
    let now = db_time(now);
    let mut tx = Tx::begin(pool).await?;
    let before = lock(&mut tx, id).await?;
    let mut s = before.clone();
    if let Some(name) = change.name {
        s.name = name;
    }
    if let Some(c) = &change.cadence {
        s.cron = c.expression().to_owned();
        s.time_zone = c.zone().to_owned();
    }
    if let Some((t, payload)) = change.task {
        s.task_type = t.as_str().to_owned();
        s.payload = payload.into_json();
    }
    if let Some(m) = change.max_attempts {
        s.max_attempts = m;
    }
    if let Some(m) = change.missed {
        s.missed_runs = m.as_str().to_owned();
        s.catch_up_limit = m.limit() as i32;
    }
    let (old, new) = (definition(&before), definition(&s));
    let changes: serde_json::Map<String, Value> = new
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(k, v)| old.get(k.as_str()) != Some(v))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if changes.is_empty() {
        tx.rollback().await?;
        return Ok(before);
    }
    if let (Some(c), true) = (
        &change.cadence,
        s.cron != before.cron || s.time_zone != before.time_zone,
    ) {
        s.next_run_at = c.next_after(now);
    }
    let data = json!({ "changes": changes, "by": by });
    let (version, hash) = append(
        &mut tx,
        id,
        (s.version, Some(&before.last_hash)),
        "updated",
        data,
        now,
    )
    .await?;
    s.version = version;
    s.last_hash = hash;
    s.updated_at = now;
    save(&mut tx, &s).await?;
    tx.commit().await?;
    Ok(s)
}

/// Pauses or resumes a schedule, recorded as `paused` or `resumed` (already in that state:
/// nothing recorded). A paused schedule fires nothing; resuming starts again from the first slot
/// after `now` (the slots of the pause are not caught up).
pub async fn set_paused(
    pool: &PgPool,
    id: Uuid,
    paused: bool,
    by: &str,
    now: DateTime<Utc>,
) -> Result<ScheduleRow> {
    let now = db_time(now);
    let mut tx = Tx::begin(pool).await?;
    let mut s = lock(&mut tx, id).await?;
    if s.paused == paused {
        tx.rollback().await?;
        return Ok(s);
    }
    let event = if paused { "paused" } else { "resumed" };
    let prev = s.last_hash.clone();
    let (version, hash) = append(
        &mut tx,
        id,
        (s.version, Some(&prev)),
        event,
        json!({ "by": by }),
        now,
    )
    .await?;
    s.paused = paused;
    if !paused {
        s.next_run_at = s.cadence()?.next_after(now);
    }
    s.version = version;
    s.last_hash = hash;
    s.updated_at = now;
    save(&mut tx, &s).await?;
    tx.commit().await?;
    Ok(s)
}

/// Deletes a schedule, recorded as `deleted` (its events and fired slots stay). Tasks already
/// enqueued for it are not touched.
pub async fn delete(pool: &PgPool, id: Uuid, by: &str, now: DateTime<Utc>) -> Result<()> {
    let mut tx = Tx::begin(pool).await?;
    let s = lock(&mut tx, id).await?;
    append(
        &mut tx,
        id,
        (s.version, Some(&s.last_hash)),
        "deleted",
        json!({ "by": by }),
        now,
    )
    .await?;
    sqlx::query!("DELETE FROM schedules WHERE id = $1", id)
        .execute(tx.conn())
        .await?;
    tx.commit().await?;
    Ok(())
}

/// Every event of schedule `id`, in order (also after it was deleted).
pub async fn history(pool: &PgPool, id: Uuid) -> Result<Vec<ScheduleEvent>> {
    Ok(sqlx::query_as!(
        ScheduleEvent,
        "SELECT schedule_id, sequence, event_type, data, occurred_at, recorded_at, prev_hash, \
                hash \
         FROM schedule_events WHERE schedule_id = $1 ORDER BY sequence",
        id
    )
    .fetch_all(pool)
    .await?)
}

/// A fired slot and its task's current status.
#[derive(Debug, Clone, PartialEq, FromRow)]
pub struct Run {
    pub slot: DateTime<Utc>,
    pub task_id: TaskId,
    pub status: Option<String>,
}

/// The `limit` most recent fired slots of schedule `id`, newest first.
pub async fn runs(pool: &PgPool, id: Uuid, limit: i64) -> Result<Vec<Run>> {
    Ok(sqlx::query_as!(
        Run,
        r#"SELECT r.slot, r.task_id AS "task_id: TaskId", t.status AS "status?"
           FROM schedule_runs r
           LEFT JOIN tasks t ON t.id = r.task_id
           WHERE r.schedule_id = $1 ORDER BY r.slot DESC LIMIT $2"#,
        id,
        limit
    )
    .fetch_all(pool)
    .await?)
}

/// What one scheduler step did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fired {
    /// Schedules that had due slots.
    pub schedules: usize,
    /// Tasks created for slots.
    pub created: usize,
    /// Slots whose task existed already (a repeated step after a lost answer).
    pub existing: usize,
    /// Schedules that recorded a run of skipped missed slots.
    pub skipped: usize,
}

/// Most schedules one step handles (the rest are handled by the next step at once).
pub const STEP_SCHEDULES: i64 = 100;

/// The scheduler's one step at time `now`: fires every due slot of up to [`STEP_SCHEDULES`] due
/// schedules not locked by another process, in one transaction (see the module's doc). A
/// schedule that can no longer be read (an expression or payload this build refuses) is logged
/// and left as it is.
pub async fn fire_due(
    pool: &PgPool,
    now: DateTime<Utc>,
    master: Option<&crate::domain::sealing::MasterKey>,
) -> Result<Fired> {
    let now = db_time(now);
    let mut tx = Tx::begin(pool).await?;
    let rows = sqlx::query_as!(
        ScheduleRow,
        "SELECT id, name, cron, time_zone, task_type, payload, max_attempts, missed_runs,
                  catch_up_limit, paused, next_run_at, last_run_at, owner, version, last_hash,
                  created_at, updated_at
         FROM schedules WHERE NOT paused AND next_run_at <= $1
         ORDER BY next_run_at LIMIT $2 FOR UPDATE SKIP LOCKED",
        now,
        STEP_SCHEDULES
    )
    .fetch_all(tx.conn())
    .await?;
    let mut fired = Fired::default();
    if rows.is_empty() {
        tx.rollback().await?;
        return Ok(fired);
    }

    let mut requests = Vec::new();
    let mut slots: Vec<(Uuid, DateTime<Utc>)> = Vec::new();
    // (schedule, its next unfired slot, its last fired slot) after this step
    type Move = (Uuid, Option<DateTime<Utc>>, Option<DateTime<Utc>>);
    let mut moves: Vec<Move> = Vec::new();
    let mut skips = Vec::new();
    for s in &rows {
        let (cadence, (task_type, payload)) = match s.cadence().and_then(|c| Ok((c, s.task()?))) {
            Ok(x) => x,
            Err(e) => {
                tracing::error!(schedule.id = %s.id, error = %e, "schedule cannot fire; left as it is");
                continue;
            }
        };
        let Some(next) = s.next_run_at else { continue };
        let d = due(&cadence, next, now, s.missed());
        for slot in &d.fire {
            requests.push(NewTask {
                task_type,
                payload: payload.clone(),
                max_attempts: s.max_attempts,
                run_at: now,
                idempotency_key: Some(slot_key(s.id, *slot)),
                invalidates: Vec::new(),
                owner: s.owner.clone(),
                // each slot's task starts a trace of its own
                trace: crate::telemetry::context_for_new_trace(),
            });
            slots.push((s.id, *slot));
        }
        if let Some((from, to)) = d.skipped {
            skips.push((s, from, to));
        }
        moves.push((s.id, d.next, d.fire.last().copied().or(s.last_run_at)));
        fired.schedules += 1;
    }

    let enqueued = tasks::enqueue(&mut tx, requests, now, master).await?;
    for e in &enqueued {
        match e {
            Enqueued::Created(_) => fired.created += 1,
            Enqueued::Existing(_) => fired.existing += 1,
        }
    }
    let (slot_schedules, slot_times): (Vec<Uuid>, Vec<DateTime<Utc>>) =
        slots.iter().copied().unzip();
    let slot_tasks: Vec<TaskId> = enqueued.iter().map(|e| e.task().id).collect();
    sqlx::query!(
        "INSERT INTO schedule_runs (schedule_id, slot, task_id)
         SELECT * FROM UNNEST($1::uuid[], $2::timestamptz[], $3::uuid[])
         ON CONFLICT DO NOTHING",
        &slot_schedules,
        &slot_times,
        &slot_tasks as &[TaskId]
    )
    .execute(tx.conn())
    .await?;

    // Skipped missed slots are part of the schedule's audit trail.
    let mut chains: HashMap<Uuid, (i32, Vec<u8>)> = HashMap::new();
    for (s, from, to) in skips {
        let data = json!({ "from": from, "to": to, "policy": s.missed_runs });
        let link = append(
            &mut tx,
            s.id,
            (s.version, Some(&s.last_hash)),
            "slots_skipped",
            data,
            now,
        )
        .await?;
        tracing::warn!(schedule.id = %s.id, %from, %to, "missed slots skipped");
        chains.insert(s.id, link);
        fired.skipped += 1;
    }
    let ids: Vec<Uuid> = moves.iter().map(|m| m.0).collect();
    let versions: Vec<Option<i32>> = ids.iter().map(|id| chains.get(id).map(|c| c.0)).collect();
    let hashes: Vec<Option<Vec<u8>>> = ids
        .iter()
        .map(|id| chains.get(id).map(|c| c.1.clone()))
        .collect();
    let next_runs: Vec<Option<DateTime<Utc>>> = moves.iter().map(|m| m.1).collect();
    let last_runs: Vec<Option<DateTime<Utc>>> = moves.iter().map(|m| m.2).collect();
    sqlx::query!(
        "UPDATE schedules s SET next_run_at = m.next_run_at, last_run_at = m.last_run_at,
           version = COALESCE(m.version, s.version), last_hash = COALESCE(m.hash, s.last_hash)
         FROM UNNEST($1::uuid[], $2::timestamptz[], $3::timestamptz[], $4::int4[], $5::bytea[])
           AS m(id, next_run_at, last_run_at, version, hash)
         WHERE s.id = m.id",
        &ids,
        &next_runs as &[Option<DateTime<Utc>>],
        &last_runs as &[Option<DateTime<Utc>>],
        &versions as &[Option<i32>],
        &hashes as &[Option<Vec<u8>>]
    )
    .execute(tx.conn())
    .await?;
    tx.commit().await?;
    Ok(fired)
}

/// The time of the earliest slot due among active schedules, to sleep until.
pub async fn next_due(pool: &PgPool) -> Result<Option<DateTime<Utc>>> {
    Ok(
        sqlx::query_scalar!("SELECT min(next_run_at) FROM schedules WHERE NOT paused")
            .fetch_one(pool)
            .await?,
    )
}

/// The first broken link of a schedule's chain.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BrokenSchedule {
    pub schedule_id: Uuid,
    pub sequence: i32,
    pub reason: String,
}

/// Re-checks every schedule's event chain (numbering, links, hashes, and the row's last link).
/// Returns how many events were checked and every schedule whose chain breaks.
pub async fn verify(pool: &PgPool) -> Result<(u64, Vec<BrokenSchedule>)> {
    let events: Vec<ScheduleEvent> = sqlx::query_as!(
        ScheduleEvent,
        "SELECT schedule_id, sequence, event_type, data, occurred_at, recorded_at, prev_hash, \
                hash \
         FROM schedule_events ORDER BY schedule_id, sequence"
    )
    .fetch_all(pool)
    .await?;
    let heads: HashMap<Uuid, (i32, Vec<u8>)> =
        sqlx::query!("SELECT id, version, last_hash FROM schedules")
            .fetch_all(pool)
            .await?
            .into_iter()
            .map(|r| (r.id, (r.version, r.last_hash)))
            .collect();
    let mut broken = Vec::new();
    let mut last: HashMap<Uuid, (i32, Vec<u8>, bool)> = HashMap::new();
    let mut bad: std::collections::HashSet<Uuid> = Default::default();
    for e in &events {
        if bad.contains(&e.schedule_id) {
            continue;
        }
        let (expected, prev) = match last.get(&e.schedule_id) {
            Some((seq, hash, _)) => (seq + 1, Some(hash.as_slice())),
            None => (1, None),
        };
        let canonical = canonical_bytes(
            1,
            e.schedule_id,
            e.sequence,
            &e.event_type,
            EVENT_VERSION,
            &e.data,
            e.occurred_at,
        );
        let reason = if e.sequence != expected {
            Some(format!("expected event {expected}, found {}", e.sequence))
        } else if e.prev_hash.as_deref() != prev {
            Some("does not link to the previous event's hash".to_owned())
        } else if chain_hash(prev, &canonical).as_slice() != e.hash.as_slice() {
            Some("content does not match its hash (the event was altered)".to_owned())
        } else {
            None
        };
        if let Some(reason) = reason {
            bad.insert(e.schedule_id);
            broken.push(BrokenSchedule {
                schedule_id: e.schedule_id,
                sequence: e.sequence,
                reason,
            });
            continue;
        }
        last.insert(
            e.schedule_id,
            (e.sequence, e.hash.clone(), e.event_type == "deleted"),
        );
    }
    for (id, (version, hash)) in &heads {
        if bad.contains(id) {
            continue;
        }
        let ok = matches!(last.get(id), Some((v, h, false)) if v == version && h == hash);
        if !ok {
            broken.push(BrokenSchedule {
                schedule_id: *id,
                sequence: *version,
                reason: "the schedule's last link differs from its last event".into(),
            });
        }
    }
    // a chain that does not end in `deleted` belongs to a schedule that must still exist
    let mut gone: Vec<(Uuid, i32)> = last
        .iter()
        .filter(|(id, (_, _, deleted))| !deleted && !heads.contains_key(id) && !bad.contains(id))
        .map(|(id, (sequence, _, _))| (*id, *sequence))
        .collect();
    gone.sort();
    for (schedule_id, sequence) in gone {
        broken.push(BrokenSchedule {
            schedule_id,
            sequence,
            reason: "the schedule's row was removed without a deleted event".into(),
        });
    }
    Ok((events.len() as u64, broken))
}
