//! The event log: appends with an expected version and the hash chain, the per-task history and
//! the global log in commit-safe order.
//!
//! **Ordering.** Within a task, events are numbered by `sequence` (1, 2, ...; unique with the
//! task id, so two writers can never both append sequence `n`). Globally, `position` is
//! `(transaction id << 20) + n` with `n` counted by [`Tx`]. [`global_log`] returns only
//! positions below the *horizon* `pg_snapshot_xmin(snapshot) << 20`: every transaction older than
//! the oldest one still running has ended, and any transaction that is still running or has not
//! started has an id at least that large. A reader that resumes after the last position it saw
//! therefore never skips an event whose transaction committed late; a long transaction only
//! delays the log until it ends.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::FromRow;

use super::{Result, StoreError, Tx};
use crate::domain::event::{
    canonical_bytes, db_time, event_hash, jsonb_stable, Placement, HASH_VERSION,
};
use crate::domain::{Task, TaskEvent, TaskId, TaskStatus, TaskType};
use uuid::Uuid;

/// One stored event.
#[derive(Debug, Clone, PartialEq, FromRow)]
pub struct StoredEvent {
    pub position: i64,
    pub task_id: TaskId,
    pub sequence: i32,
    /// The name as stored, hashed and served: an event type this version does not know (from a
    /// newer version) is still shown and verified, and the projectors skip it
    /// (they read it as a [`crate::domain::EventType`], and a name that does not parse is none).
    pub event_type: String,
    pub event_version: i16,
    pub data: Value,
    pub occurred_at: DateTime<Utc>,
    pub recorded_at: DateTime<Utc>,
    pub prev_hash: Option<Vec<u8>>,
    pub hash: Vec<u8>,
    /// The form of `hash` (1 or 2, see [`crate::domain::event::event_hash`]).
    pub hash_version: i16,
}

impl StoredEvent {
    /// The domain event, if the stored type is known.
    pub fn event(&self) -> Result<TaskEvent> {
        TaskEvent::from_stored(&self.event_type, &self.data).map_err(|e| {
            StoreError::Corrupt(format!(
                "event {} of task {}: {e}",
                self.sequence, self.task_id
            ))
        })
    }
}

/// Events ready to insert: numbered, timed and hashed (hash version 2, see
/// [`crate::domain::event::event_hash`]).
#[derive(Debug, Default)]
pub(crate) struct EventRows {
    pub task_ids: Vec<TaskId>,
    /// The task's type, stored beside each event (outside the hashed content).
    pub task_types: Vec<&'static str>,
    pub sequences: Vec<i32>,
    pub types: Vec<&'static str>,
    pub versions: Vec<i16>,
    pub data: Vec<Value>,
    pub occurred_at: Vec<DateTime<Utc>>,
    pub prev_hashes: Vec<Option<Vec<u8>>>,
    /// The hashes, when the placement is known here ([`EventRows::push_stream`]).
    pub hashes: Vec<Vec<u8>>,
    /// The canonical documents, when the statement that assigns the positions hashes them
    /// ([`EventRows::push_unhashed`]).
    pub documents: Vec<Vec<u8>>,
    /// Offset of each event within the transaction (the low bits of its position).
    pub slots: Vec<i64>,
    /// The transaction's position of slot 0 and start time, when known here.
    base: Option<(i64, DateTime<Utc>)>,
}

impl EventRows {
    /// Rows for a transaction whose placement is read from it ([`Tx::placement_base`]).
    pub async fn placed(tx: &mut Tx) -> Result<EventRows> {
        Ok(EventRows {
            base: Some(tx.placement_base().await?),
            ..EventRows::default()
        })
    }

    /// Adds `events` of the task `(id, type)`, the first numbered `first_sequence` and chained
    /// to `prev_hash`; returns the hash of the last one. Only for rows made by
    /// [`EventRows::placed`].
    pub fn push_stream(
        &mut self,
        tx: &mut Tx,
        (task_id, task_type): (TaskId, TaskType),
        first_sequence: i32,
        prev_hash: Option<&[u8]>,
        events: &[TaskEvent],
        at: DateTime<Utc>,
    ) -> Vec<u8> {
        let (base, recorded_at) = self.base.expect("events hashed here are placed");
        let at = db_time(at);
        let mut prev = prev_hash.map(<[u8]>::to_vec);
        let first_slot = tx.reserve(events.len());
        for (i, event) in events.iter().enumerate() {
            let sequence = first_sequence + i as i32;
            let slot = first_slot + i as i64;
            let (document, data) = document(task_id, sequence, event, at);
            let placed = Placement {
                position: base + slot,
                recorded_at,
            };
            let hash = event_hash(prev.as_deref(), &document, Some(placed)).to_vec();
            self.push_row((task_id, task_type), sequence, event, data, at, slot);
            self.prev_hashes.push(prev.take());
            self.hashes.push(hash.clone());
            prev = Some(hash);
        }
        prev.unwrap_or_default()
    }

    /// Adds event `sequence` of a new task, leaving its hash to the statement that inserts it
    /// (`event_hash_v2` over the previous hash, the document, the position assigned there and
    /// `now()`): the enqueue's `enqueued` event (sequence 1) and, when it dispatches, its
    /// `dispatched` event (sequence 2).
    pub fn push_unhashed(
        &mut self,
        tx: &mut Tx,
        (task_id, task_type): (TaskId, TaskType),
        sequence: i32,
        event: &TaskEvent,
        at: DateTime<Utc>,
    ) {
        let at = db_time(at);
        let slot = tx.reserve(1);
        let (document, data) = document(task_id, sequence, event, at);
        self.documents.push(document);
        self.push_row((task_id, task_type), sequence, event, data, at, slot);
        self.prev_hashes.push(None);
    }

    fn push_row(
        &mut self,
        (task_id, task_type): (TaskId, TaskType),
        sequence: i32,
        event: &TaskEvent,
        data: Value,
        at: DateTime<Utc>,
        slot: i64,
    ) {
        self.task_ids.push(task_id);
        self.task_types.push(task_type.as_str());
        self.sequences.push(sequence);
        self.types.push(event.type_name());
        self.versions.push(event.version());
        self.data.push(data);
        self.occurred_at.push(at);
        self.slots.push(slot);
    }
}

/// The canonical document of event `sequence` of a task (hash version 2) and its data as jsonb
/// gives it back.
pub(crate) fn document(
    task_id: TaskId,
    sequence: i32,
    event: &TaskEvent,
    at: DateTime<Utc>,
) -> (Vec<u8>, Value) {
    let mut data = event.data();
    jsonb_stable(&mut data);
    let document = canonical_bytes(
        HASH_VERSION,
        task_id.into_uuid(),
        sequence,
        event.type_name(),
        event.version(),
        &data,
        at,
    );
    (document, data)
}

/// Records `events` for a task read at `before`: appends them (checked against the version read)
/// and updates the projection row, in `tx`. Returns the new state.
pub async fn record(
    tx: &mut Tx,
    before: &Task,
    last_hash: &[u8],
    events: &[TaskEvent],
    at: DateTime<Utc>,
) -> Result<Task> {
    let item = (before.clone(), last_hash.to_vec(), events.to_vec());
    let mut after = record_batch(tx, std::slice::from_ref(&item), at, &[]).await?;
    Ok(after.remove(0))
}

/// [`record`] for many tasks in one statement, which also removes the outbox rows of the tasks
/// in `used` (their deliveries were used up: [`super::transition`] derives them from the events),
/// skipping rows another transaction holds (see [`super::transition`]). Fails with
/// [`StoreError::VersionConflict`] if
/// any task changed since it was read (the caller's transaction must then be rolled back).
pub async fn record_batch(
    tx: &mut Tx,
    items: &[(Task, Vec<u8>, Vec<TaskEvent>)],
    at: DateTime<Utc>,
    used: &[TaskId],
) -> Result<Vec<Task>> {
    if items.is_empty() {
        return Ok(Vec::new());
    }
    let at = db_time(at);
    let mut rows = EventRows::placed(tx).await?;
    let mut afters = Vec::with_capacity(items.len());
    let mut hashes = Vec::with_capacity(items.len());
    for (before, last_hash, events) in items {
        let mut after = before.clone();
        for e in events.iter() {
            after.apply(e, at);
        }
        let hash = rows.push_stream(
            tx,
            (before.id, before.task_type),
            before.version + 1,
            Some(last_hash),
            events,
            at,
        );
        afters.push(after);
        hashes.push(hash);
    }

    // The rescuer finds running attempts by their expiry in `task_leases`, kept here in the
    // statement that writes the lease itself: a lease taken or moved is upserted, one given up
    // is removed.
    let mut held: (Vec<TaskId>, Vec<DateTime<Utc>>) = (Vec::new(), Vec::new());
    let mut freed: Vec<TaskId> = Vec::new();
    for ((before, _, _), after) in items.iter().zip(&afters) {
        let lease = |t: &Task| t.lease_owner.and(t.lease_expires_at);
        match (lease(before), lease(after)) {
            (_, Some(until)) => {
                if before.lease_owner != after.lease_owner || lease(before) != Some(until) {
                    held.0.push(after.id);
                    held.1.push(until);
                }
            }
            (Some(_), None) => freed.push(after.id),
            (None, None) => {}
        }
    }

    // The conditional update is the optimistic lock: a row matches only if nobody appended
    // since it was read, and it stays locked until commit.
    let ids: Vec<TaskId> = afters.iter().map(|t| t.id).collect();
    let expected: Vec<i32> = items.iter().map(|(b, _, _)| b.version).collect();
    let statuses: Vec<TaskStatus> = afters.iter().map(|t| t.status).collect();
    let attempts: Vec<i32> = afters.iter().map(|t| t.attempts).collect();
    let max_attempts: Vec<i32> = afters.iter().map(|t| t.max_attempts).collect();
    let run_at: Vec<DateTime<Utc>> = afters.iter().map(|t| t.run_at).collect();
    let last_errors: Vec<Option<String>> = afters.iter().map(|t| t.last_error.clone()).collect();
    let lease_owners: Vec<Option<Uuid>> = afters.iter().map(|t| t.lease_owner).collect();
    let lease_expiries: Vec<Option<DateTime<Utc>>> =
        afters.iter().map(|t| t.lease_expires_at).collect();
    let versions: Vec<i32> = afters.iter().map(|t| t.version).collect();
    // One statement: the projection rows, the leases, the events and the used outbox rows (a
    // transition costs the lock, this statement and the commit).
    let (base, recorded_at) = rows.base.expect("events hashed here are placed");
    let updated = sqlx::query_scalar!(
        r#"WITH updated AS (
             UPDATE tasks t SET status = v.status, attempts = v.attempts,
               max_attempts = v.max_attempts, run_at = v.run_at, last_error = v.last_error,
               lease_owner = v.lease_owner, lease_expires_at = v.lease_expires_at,
               version = v.version, last_hash = v.last_hash, updated_at = $12
             FROM UNNEST($1::uuid[], $2::int4[], $3::text[], $4::int4[], $5::int4[],
                         $6::timestamptz[], $7::text[], $8::uuid[], $9::timestamptz[],
                         $10::int4[], $11::bytea[])
               AS v(id, expected, status, attempts, max_attempts, run_at, last_error,
                    lease_owner, lease_expires_at, version, last_hash)
             WHERE t.id = v.id AND t.version = v.expected
             RETURNING 1
           ), held AS (
             INSERT INTO task_leases (task_id, expires_at)
             SELECT * FROM UNNEST($13::uuid[], $14::timestamptz[])
             ON CONFLICT (task_id) DO UPDATE SET expires_at = EXCLUDED.expires_at
           ), freed AS (
             DELETE FROM task_leases WHERE task_id = ANY($15)
           ), appended AS (
             INSERT INTO task_events
               (position, task_id, sequence, event_type, event_version, data, occurred_at,
                prev_hash, hash, task_type, recorded_at, hash_version)
             SELECT $26 + e.slot, e.task_id, e.sequence, e.event_type, e.event_version,
                    e.data, e.occurred_at, e.prev_hash, e.hash, e.task_type, $27, $28
             FROM UNNEST($16::uuid[], $17::int4[], $18::text[], $19::int2[], $20::jsonb[],
                         $21::timestamptz[], $22::bytea[], $23::bytea[], $24::int8[], $25::text[])
               AS e(task_id, sequence, event_type, event_version, data, occurred_at, prev_hash,
                    hash, slot, task_type)
           ), used AS (
             DELETE FROM outbox WHERE id IN
               (SELECT id FROM outbox WHERE task_id = ANY($29) FOR UPDATE SKIP LOCKED)
           )
           SELECT count(*) AS "updated!" FROM updated"#,
        &ids as &[TaskId],
        &expected,
        &statuses as &[TaskStatus],
        &attempts,
        &max_attempts,
        &run_at,
        &last_errors as &[Option<String>],
        &lease_owners as &[Option<Uuid>],
        &lease_expiries as &[Option<DateTime<Utc>>],
        &versions,
        &hashes,
        at,
        &held.0 as &[TaskId],
        &held.1,
        &freed as &[TaskId],
        &rows.task_ids as &[TaskId],
        &rows.sequences,
        &rows.types as &[&str],
        &rows.versions,
        &rows.data,
        &rows.occurred_at,
        &rows.prev_hashes as &[Option<Vec<u8>>],
        &rows.hashes,
        &rows.slots,
        &rows.task_types as &[&str],
        base,
        recorded_at,
        HASH_VERSION,
        used as &[TaskId]
    )
    .fetch_one(tx.conn())
    .await
    .map_err(|e| appended_conflict(e, &rows))?;
    if updated != items.len() as i64 {
        let (first, _, _) = &items[0];
        return Err(StoreError::VersionConflict {
            task_id: first.id,
            expected: first.version,
        });
    }
    Ok(afters)
}

/// An event numbered like one already appended means the task changed since it was read: a
/// [`StoreError::VersionConflict`]. Other errors pass through.
fn appended_conflict(e: sqlx::Error, rows: &EventRows) -> StoreError {
    match e {
        sqlx::Error::Database(db)
            if db
                .constraint()
                .is_some_and(|c| c.ends_with("_task_id_sequence_key")) =>
        {
            StoreError::VersionConflict {
                task_id: rows.task_ids.first().copied().unwrap_or_default(),
                expected: rows.sequences.first().copied().unwrap_or(1) - 1,
            }
        }
        e => e.into(),
    }
}

/// Inserts prepared event rows in one statement.
pub(crate) async fn insert(tx: &mut Tx, rows: &EventRows) -> Result<()> {
    let (base, recorded_at) = rows.base.expect("inserted rows are placed");
    let result = sqlx::query!(
        "INSERT INTO task_events
           (position, task_id, sequence, event_type, event_version, data, occurred_at, prev_hash,
            hash, task_type, recorded_at, hash_version)
         SELECT $11 + e.slot, e.task_id, e.sequence, e.event_type, e.event_version,
                e.data, e.occurred_at, e.prev_hash, e.hash, e.task_type, $12, $13
         FROM UNNEST($1::uuid[], $2::int4[], $3::text[], $4::int2[], $5::jsonb[],
                     $6::timestamptz[], $7::bytea[], $8::bytea[], $9::int8[], $10::text[])
           AS e(task_id, sequence, event_type, event_version, data, occurred_at, prev_hash, hash,
                slot, task_type)",
        &rows.task_ids as &[TaskId],
        &rows.sequences,
        &rows.types as &[&str],
        &rows.versions,
        &rows.data,
        &rows.occurred_at,
        &rows.prev_hashes as &[Option<Vec<u8>>],
        &rows.hashes,
        &rows.slots,
        &rows.task_types as &[&str],
        base,
        recorded_at,
        HASH_VERSION
    )
    .execute(tx.conn())
    .await;
    result.map(|_| ()).map_err(|e| appended_conflict(e, rows))
}

/// A task's full history, in order.
pub async fn history(pool: &sqlx::PgPool, task_id: TaskId) -> Result<Vec<StoredEvent>> {
    Ok(sqlx::query_as!(
        StoredEvent,
        r#"SELECT position, task_id AS "task_id: TaskId", sequence, event_type, event_version,
                  data, occurred_at, recorded_at, prev_hash, hash, hash_version
           FROM task_events WHERE task_id = $1 ORDER BY sequence"#,
        task_id as TaskId
    )
    .fetch_all(pool)
    .await?)
}

/// Up to `limit` events of the global log after `after`, in commit-safe order (see the module
/// docs). An empty page means "nothing committed past `after` yet", not "the end".
pub async fn global_log(pool: &sqlx::PgPool, after: i64, limit: i64) -> Result<Vec<StoredEvent>> {
    Ok(sqlx::query_as!(
        StoredEvent,
        r#"SELECT position, task_id AS "task_id: TaskId", sequence, event_type, event_version,
                  data, occurred_at, recorded_at, prev_hash, hash, hash_version
           FROM task_events
           WHERE position > $1 AND position < event_log_horizon()
           ORDER BY position LIMIT $2"#,
        after,
        limit
    )
    .fetch_all(pool)
    .await?)
}

/// Which of `attempts` (task, attempt number, an event type its outcome is recorded as) already
/// have that outcome in the log, recorded by `worker` itself: an event of that type for that
/// attempt after `worker`'s `attempt_started` of it, with no other start of that attempt in
/// between (a start of a later attempt may be: a stop is written when the worker reaches the
/// database again, after the rescuer's takeover and maybe the next attempt's start). Returns the
/// task and the type found. An `attempt_failed` of kind `lease_expired` counts only with the
/// error `own_lease_lost_error`, the one the worker writes itself when a handler it still held
/// was stopped for want of renewals: with any other error it is the rescuer's, the one outcome
/// another process records for an attempt.
///
/// A worker asks this of outcomes it no longer holds the lease of when it records them again
/// after an error: if its earlier commit went through but the answer was lost (the connection
/// broke after `COMMIT` reached the server), the attempt is recorded, not taken over. A task may
/// be asked about under several types (a stopped run is recorded as one of two).
pub async fn outcomes_recorded_by(
    pool: &sqlx::PgPool,
    worker: Uuid,
    attempts: &[(TaskId, i32, &str)],
    own_lease_lost_error: &str,
) -> Result<Vec<(TaskId, String)>> {
    let ids: Vec<TaskId> = attempts.iter().map(|a| a.0).collect();
    let numbers: Vec<i32> = attempts.iter().map(|a| a.1).collect();
    let types: Vec<&str> = attempts.iter().map(|a| a.2).collect();
    Ok(sqlx::query!(
        r#"SELECT DISTINCT w.task_id AS "task_id!: TaskId", w.event_type AS "event_type!"
           FROM UNNEST($1::uuid[], $2::int4[], $3::text[]) AS w(task_id, attempt, event_type)
           JOIN task_events s ON s.task_id = w.task_id AND s.event_type = 'attempt_started'
                AND (s.data->>'attempt')::int4 = w.attempt AND s.data->>'worker_id' = $4
           JOIN task_events o ON o.task_id = w.task_id AND o.sequence > s.sequence
                AND o.event_type = w.event_type AND (o.data->>'attempt')::int4 = w.attempt
                AND NOT (o.event_type = 'attempt_failed'
                         AND o.data->>'kind' IS NOT DISTINCT FROM 'lease_expired'
                         AND o.data->>'error' IS DISTINCT FROM $5)
           WHERE NOT EXISTS (
             SELECT 1 FROM task_events n
             WHERE n.task_id = w.task_id AND n.event_type = 'attempt_started'
               AND (n.data->>'attempt')::int4 = w.attempt
               AND n.sequence > s.sequence AND n.sequence < o.sequence)"#,
        &ids as &[TaskId],
        &numbers,
        &types as &[&str],
        worker.to_string(),
        own_lease_lost_error
    )
    .fetch_all(pool)
    .await?
    .into_iter()
    .map(|r| (r.task_id, r.event_type))
    .collect())
}
