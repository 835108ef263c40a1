//! The `tasks` projection and the transactional enqueue.
//!
//! [`enqueue`] writes, for every new task, the `enqueued` event, the projection row and the
//! outbox row in a single statement inside the caller's transaction: there is no moment at which
//! one of the three exists without the others. Idempotency keys are unique in `tasks`; a second
//! request with a key in use (even one racing the first) inserts nothing and gets the existing
//! task back, or a conflict if it asked for something else.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{FromRow, PgPool, QueryBuilder};
use std::collections::{HashMap, HashSet};
use uuid::Uuid;

use super::events::EventRows;
use super::{Result, StoreError, Tx};
use crate::domain::event::{db_time, HASH_VERSION};
use crate::domain::sealing::{seal_payload, DataKey, MasterKey};
use crate::domain::task::DeadLetter;
use crate::domain::{NewTask, Task, TaskEvent, TaskId, TaskStatus, TaskType, TraceContext};

/// A row of the `tasks` projection, as read; the store's callers get a [`Task`] (and, to append,
/// the hash of its head).
#[derive(Debug, Clone, PartialEq, FromRow)]
pub(super) struct TaskRow {
    pub id: TaskId,
    pub task_type: TaskType,
    pub payload: Value,
    pub status: TaskStatus,
    pub attempts: i32,
    pub max_attempts: i32,
    pub run_at: DateTime<Utc>,
    pub idempotency_key: Option<String>,
    pub last_error: Option<String>,
    pub version: i32,
    pub last_hash: Vec<u8>,
    pub enqueued_position: i64,
    pub lease_owner: Option<Uuid>,
    pub lease_expires_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Who the task belongs to ('' for tasks written before owners existed).
    pub owner: String,
    /// The W3C trace context it was enqueued with (NULL for tasks written before it was kept).
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
}

/// The columns of [`TaskRow`], for the two reads that are assembled at run time: the listing
/// (its filters) and the transition's lock (decoded row by row). Every other read of a task is a
/// checked query that spells them out.
pub(super) const TASK_COLUMNS: &str = "id, task_type, payload, status, attempts, max_attempts, \
    run_at, idempotency_key, last_error, version, last_hash, enqueued_position, lease_owner, \
    lease_expires_at, created_at, updated_at, owner, traceparent, tracestate";

/// [`TASK_COLUMNS`] with a JSON `null` for the payload, for readers that decide without it.
pub(super) const TASK_COLUMNS_NO_PAYLOAD: &str = "id, task_type, 'null'::jsonb AS payload, \
    status, attempts, max_attempts, run_at, idempotency_key, last_error, version, last_hash, \
    enqueued_position, lease_owner, lease_expires_at, created_at, updated_at, owner, traceparent, \
    tracestate";

impl TaskRow {
    /// The domain state held by this row and the hash the task's next event chains to, without
    /// copying the payload.
    pub(super) fn into_task(self) -> (Task, Vec<u8>) {
        let task = Task {
            id: self.id,
            task_type: self.task_type,
            payload: self.payload,
            status: self.status,
            attempts: self.attempts,
            max_attempts: self.max_attempts,
            run_at: self.run_at,
            idempotency_key: self.idempotency_key,
            last_error: self.last_error,
            lease_owner: self.lease_owner,
            lease_expires_at: self.lease_expires_at,
            version: self.version,
            created_at: self.created_at,
            updated_at: self.updated_at,
            trace: self.traceparent.map(|traceparent| TraceContext {
                traceparent,
                tracestate: self.tracestate,
            }),
            owner: self.owner,
        };
        (task, self.last_hash)
    }
}

impl From<TaskRow> for Task {
    fn from(row: TaskRow) -> Task {
        row.into_task().0
    }
}

/// What happened to one requested task.
#[derive(Debug, Clone, PartialEq)]
pub enum Enqueued {
    /// A new task was written.
    Created(Task),
    /// The idempotency key was already used for the same request: the existing task.
    Existing(Task),
}

impl Enqueued {
    pub fn task(&self) -> &Task {
        match self {
            Enqueued::Created(r) | Enqueued::Existing(r) => r,
        }
    }

    pub fn into_task(self) -> Task {
        match self {
            Enqueued::Created(r) | Enqueued::Existing(r) => r,
        }
    }
}

/// Writes the tasks, their `enqueued` events and their outbox rows in `tx`; the relays publish
/// them.
///
/// Results come back in request order. A key repeated within `requests` must carry the same
/// request each time (the later ones get the first's task); a key already held by a different
/// request fails the whole call with [`StoreError::IdempotencyConflict`], so the caller's
/// transaction can be rolled back and a batch stays all-or-nothing.
///
/// With `master` (`AUDIT_DATA_KEY`), each new task gets a data key: the personal fields of its
/// payload are stored sealed, in its row and its `enqueued` event, and the key is stored wrapped
/// in `task_data_keys` (see [`crate::domain::sealing`]). The rows returned hold the payloads as
/// they were asked for.
pub async fn enqueue(
    tx: &mut Tx,
    requests: Vec<NewTask>,
    now: DateTime<Utc>,
    master: Option<&MasterKey>,
) -> Result<Vec<Enqueued>> {
    Ok(write(tx, requests, now, master, false).await?.0)
}

/// A task [`enqueue_dispatched`] recorded as dispatched: its caller publishes the delivery of
/// attempt 1 once the transaction has committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dispatched {
    pub task_id: TaskId,
    pub task_type: TaskType,
}

/// [`enqueue`], and in the same statement the `dispatched` event of attempt 1 of every new task
/// that is due now (by the database's clock) and whose type is not paused, with its outbox row
/// written as published. The caller pushes those deliveries to Redis after the commit (the
/// relay's step, without the relay's transaction); every other new task is left to the relays.
///
/// A delivery whose push never happens (the process died after the commit, or Redis failed and
/// so did marking the rows unpublished again) is published but absent from Redis: the rescuer's
/// transit check publishes it again after `REPUBLISH_AFTER_SECS` (see [`crate::rescuer`]).
pub async fn enqueue_dispatched(
    tx: &mut Tx,
    requests: Vec<NewTask>,
    now: DateTime<Utc>,
    master: Option<&MasterKey>,
) -> Result<(Vec<Enqueued>, Vec<Dispatched>)> {
    write(tx, requests, now, master, true).await
}

async fn write(
    tx: &mut Tx,
    requests: Vec<NewTask>,
    now: DateTime<Utc>,
    master: Option<&MasterKey>,
    dispatch: bool,
) -> Result<(Vec<Enqueued>, Vec<Dispatched>)> {
    let now = db_time(now);
    // the `dispatched` event of each new task, numbered 2: its document, slot and data (the
    // statement hashes it after the `enqueued` event, which it chains to)
    let mut second = EventRows::default();
    let mut rows = EventRows::default();
    let mut ids = Vec::with_capacity(requests.len());
    let mut types = Vec::with_capacity(requests.len());
    let mut payloads = Vec::with_capacity(requests.len());
    let mut plain_payloads = Vec::with_capacity(requests.len());
    let mut wrapped_keys: (Vec<TaskId>, Vec<Vec<u8>>) = (Vec::new(), Vec::new());
    let mut max_attempts = Vec::with_capacity(requests.len());
    let mut run_ats = Vec::with_capacity(requests.len());
    let mut keys = Vec::with_capacity(requests.len());
    let mut owners = Vec::with_capacity(requests.len());
    let mut traceparents = Vec::with_capacity(requests.len());
    let mut tracestates = Vec::with_capacity(requests.len());
    let mut by_key: HashMap<(&str, &str), usize> = HashMap::new();
    let mut first_of_key: Vec<Option<usize>> = Vec::with_capacity(requests.len());

    for (i, req) in requests.iter().enumerate() {
        if let Some(key) = req.idempotency_key.as_deref() {
            if let Some(&first) = by_key.get(&(req.owner.as_str(), key)) {
                let a = &requests[first];
                if a.task_type != req.task_type || a.payload != req.payload {
                    return Err(StoreError::IdempotencyConflict {
                        key: key.to_owned(),
                        existing: ids[first],
                    });
                }
                first_of_key.push(Some(first));
                ids.push(ids[first]);
                continue;
            }
            by_key.insert((req.owner.as_str(), key), i);
        }
        first_of_key.push(None);
        let id = TaskId::new();
        ids.push(id);
        let mut event = Task::enqueue(req.clone());
        let mut payload = req.payload.as_json().clone();
        if let Some(master) = master {
            let key = DataKey::generate();
            seal_payload(req.task_type, &mut payload, &key, id);
            if let TaskEvent::Enqueued { payload: p, .. } = &mut event {
                p.clone_from(&payload);
            }
            wrapped_keys.0.push(id);
            wrapped_keys.1.push(master.wrap(&key, id));
        }
        rows.push_unhashed(tx, (id, req.task_type), 1, &event, now);
        if dispatch {
            let dispatched = TaskEvent::Dispatched { attempt: 1 };
            second.push_unhashed(tx, (id, req.task_type), 2, &dispatched, now);
        }
        types.push(req.task_type.as_str());
        payloads.push(payload);
        plain_payloads.push(req.payload.as_json().clone());
        max_attempts.push(req.max_attempts);
        run_ats.push(db_time(req.run_at));
        keys.push(req.idempotency_key.clone());
        owners.push(req.owner.as_str());
        traceparents.push(req.trace.as_ref().map(|t| t.traceparent.as_str()));
        tracestates.push(req.trace.as_ref().and_then(|t| t.tracestate.as_deref()));
    }

    // One statement: the projection rows (skipping keys already in use), then the events and
    // outbox rows of exactly the tasks that were inserted. Relays are woken after the commit by
    // the caller (see `OutboxWaker`): a NOTIFY inside the statement would serialize every
    // enqueue's commit on Postgres's notification lock.
    // The event's hash (version 2, as the SQL function `event_hash_v2` computes it) covers its
    // position, assigned here, and `now()`: both are computed once per row in `input` and shared
    // by the task row and its event. Spelled out rather than calling the function, which
    // Postgres would run as a function call of its own for every row.
    // With `dispatch`, a new task due now and of a type that is not paused also gets its
    // `dispatched` event (sequence 2, chained to the first, hashed the same way), its row is at
    // version 2 and its outbox row is written published; the pause is read in the statement's
    // snapshot, so a pause that commits later finds the delivery in Redis, where the workers
    // give it back, as they do with a relay's.
    let inserted = sqlx::query!(
        r#"WITH stamp AS (
           SELECT int8send((extract(epoch FROM now()) * 1000000)::bigint) AS recorded
         ), placed AS (
           SELECT i.*, p.position,
                  sha256('\x0000000000000000000000000000000000000000000000000000000000000000'::bytea
                         || i.document || int8send(p.position) || stamp.recorded) AS hash,
                  i.document2 IS NOT NULL AND i.run_at <= now()
                    AND NOT EXISTS (SELECT 1 FROM task_type_pauses tp
                                    WHERE tp.task_type = i.task_type) AS dispatch,
                  stamp.recorded
           FROM UNNEST($1::uuid[], $2::text[], $3::jsonb[], $4::int4[], $5::timestamptz[],
                       $6::text[], $7::bytea[], $8::int8[], $9::int2[], $10::jsonb[],
                       $12::text[], $13::text[], $14::text[], $18::bytea[], $19::int8[],
                       $20::int2[], $21::jsonb[])
             AS i(id, task_type, payload, max_attempts, run_at, idempotency_key, document, slot,
                  event_version, data, owner, traceparent, tracestate, document2, slot2,
                  event_version2, data2)
           CROSS JOIN LATERAL (SELECT event_position(i.slot) AS position) p
           CROSS JOIN stamp
         ), input AS MATERIALIZED (
           SELECT placed.*, d.position2,
                  sha256(placed.hash || placed.document2 || int8send(d.position2)
                         || placed.recorded) AS hash2
           FROM placed
           CROSS JOIN LATERAL (SELECT CASE WHEN placed.dispatch
                                           THEN event_position(placed.slot2) END AS position2) d
         ), task AS (
           INSERT INTO tasks (id, task_type, payload, status, attempts, max_attempts, run_at,
                              idempotency_key, version, last_hash, enqueued_position,
                              created_at, updated_at, owner, traceparent, tracestate,
                              invalidates)
           SELECT id, task_type, payload, 'queued', 0, max_attempts, run_at, idempotency_key,
                  CASE WHEN dispatch THEN 2 ELSE 1 END, coalesce(hash2, hash), position,
                  $11, $11, owner, traceparent, tracestate,
                  nullif(data->'invalidates', '[]'::jsonb)
           FROM input ORDER BY slot
           ON CONFLICT (owner, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
           RETURNING id
         ), event AS (
           INSERT INTO task_events (position, task_id, sequence, event_type, event_version, data,
                                    occurred_at, prev_hash, hash, task_type, recorded_at,
                                    hash_version)
           SELECT i.position, task.id, 1, 'enqueued', i.event_version, i.data, $11,
                  NULL, i.hash, i.task_type, now(), $15::int2
           FROM task JOIN input i USING (id)
           UNION ALL
           SELECT i.position2, task.id, 2, 'dispatched', i.event_version2, i.data2, $11,
                  i.hash, i.hash2, i.task_type, now(), $15::int2
           FROM task JOIN input i USING (id) WHERE i.dispatch
         ), outbox_row AS (
           INSERT INTO outbox (task_id, attempt, available_at, published_at)
           SELECT task.id, 1, i.run_at, CASE WHEN i.dispatch THEN now() END
           FROM task JOIN input i USING (id) ORDER BY i.slot
         ), data_key AS (
           INSERT INTO task_data_keys (task_id, wrapped_key)
           SELECT k.id, k.wrapped FROM UNNEST($16::uuid[], $17::bytea[]) AS k(id, wrapped)
           JOIN task USING (id)
         )
         SELECT task.id AS "id!: TaskId", i.dispatch AS "dispatch!"
         FROM task JOIN input i USING (id)"#,
        &ids_unique(&ids, &first_of_key) as &[TaskId],
        &types as &[&str],
        &payloads,
        &max_attempts,
        &run_ats,
        &keys as &[Option<String>],
        &rows.documents,
        &rows.slots,
        &rows.versions,
        &rows.data,
        now,
        &owners as &[&str],
        &traceparents as &[Option<&str>],
        &tracestates as &[Option<&str>],
        HASH_VERSION,
        &wrapped_keys.0 as &[TaskId],
        &wrapped_keys.1,
        &second.documents,
        &second.slots,
        &second.versions,
        &second.data
    )
    .fetch_all(tx.conn())
    .await?;

    // The rows just written are rebuilt from what was sent rather than read back: only the
    // position, which the database assigns, comes back.
    let dispatched_ids: HashSet<TaskId> = inserted
        .iter()
        .filter(|r| r.dispatch)
        .map(|r| r.id)
        .collect();
    let mut positions: HashSet<TaskId> = inserted.into_iter().map(|r| r.id).collect();
    let mut dispatched = Vec::with_capacity(dispatched_ids.len());
    let mut created: HashMap<TaskId, Task> = HashMap::with_capacity(positions.len());
    let unique = requests
        .iter()
        .zip(&first_of_key)
        .zip(&ids)
        .filter(|((_, first), _)| first.is_none());
    for (k, ((req, _), id)) in unique.enumerate() {
        if !positions.remove(id) {
            continue;
        }
        let sent = dispatched_ids.contains(id);
        if sent {
            dispatched.push(Dispatched {
                task_id: *id,
                task_type: req.task_type,
            });
        }
        created.insert(
            *id,
            Task {
                id: *id,
                task_type: req.task_type,
                payload: std::mem::take(&mut plain_payloads[k]),
                status: TaskStatus::Queued,
                attempts: 0,
                max_attempts: req.max_attempts,
                run_at: run_ats[k],
                idempotency_key: req.idempotency_key.clone(),
                last_error: None,
                version: if sent { 2 } else { 1 },
                lease_owner: None,
                lease_expires_at: None,
                created_at: now,
                updated_at: now,
                owner: req.owner.clone(),
                trace: req.trace.clone(),
            },
        );
    }

    // Requests whose key was taken before this call: fetch the holders and compare.
    let (taken_owners, taken): (Vec<&str>, Vec<String>) = requests
        .iter()
        .zip(&first_of_key)
        .zip(&ids)
        .filter(|((_, first), id)| first.is_none() && !created.contains_key(id))
        .filter_map(|((r, _), _)| Some((r.owner.as_str(), r.idempotency_key.clone()?)))
        .unzip();
    let mut holders: HashMap<(String, String), Task> = HashMap::new();
    if !taken.is_empty() {
        let mut existing = sqlx::query_as!(
            TaskRow,
            r#"SELECT id AS "id: TaskId", task_type AS "task_type: TaskType", payload,
                      status AS "status: TaskStatus", attempts, max_attempts, run_at, idempotency_key,
                      last_error, version, last_hash, enqueued_position, lease_owner,
                      lease_expires_at, created_at, updated_at, owner, traceparent, tracestate
               FROM tasks
               WHERE (owner, idempotency_key) IN (SELECT * FROM UNNEST($1::text[], $2::text[]))"#,
            &taken_owners as &[&str],
            &taken
        )
        .fetch_all(tx.conn())
        .await?
        .into_iter()
        .map(Task::from)
        .collect::<Vec<_>>();
        // compared with the requests, and returned, as they were asked for
        super::data_keys::open_tasks(tx.conn(), master, &mut existing).await?;
        for task in existing {
            if let Some(key) = task.idempotency_key.clone() {
                holders.insert((task.owner.clone(), key), task);
            }
        }
    }

    let mut out: Vec<Enqueued> = Vec::with_capacity(requests.len());
    for (i, req) in requests.iter().enumerate() {
        if let Some(first) = first_of_key[i] {
            let again = match &out[first] {
                Enqueued::Created(r) | Enqueued::Existing(r) => Enqueued::Existing(r.clone()),
            };
            out.push(again);
            continue;
        }
        if let Some(row) = created.remove(&ids[i]) {
            out.push(Enqueued::Created(row));
            continue;
        }
        let key = req
            .idempotency_key
            .clone()
            .ok_or_else(|| StoreError::Corrupt(format!("task {} was not inserted", ids[i])))?;
        let holder = holders
            .remove(&(req.owner.clone(), key.clone()))
            .ok_or_else(|| {
                StoreError::Corrupt(format!(
                    "idempotency key {key:?} conflicted but has no holder"
                ))
            })?;
        let same = holder.task_type == req.task_type && &holder.payload == req.payload.as_json();
        if !same {
            return Err(StoreError::IdempotencyConflict {
                key,
                existing: holder.id,
            });
        }
        holders.insert((req.owner.clone(), key), holder.clone());
        out.push(Enqueued::Existing(holder));
    }
    Ok((out, dispatched))
}

/// The ids of the rows to insert: the requests that are not repeats within the call.
fn ids_unique(ids: &[TaskId], first_of_key: &[Option<usize>]) -> Vec<TaskId> {
    ids.iter()
        .zip(first_of_key)
        .filter(|(_, f)| f.is_none())
        .map(|(id, _)| *id)
        .collect()
}

/// The current state of one task.
pub async fn get(pool: &PgPool, id: TaskId) -> Result<Option<Task>> {
    Ok(get_many(pool, &[id]).await?.pop())
}

/// Reads a task for update in `tx` (locks the row until the transaction ends); returns it with
/// the hash its next event chains to.
pub async fn get_for_update(tx: &mut Tx, id: TaskId) -> Result<(Task, Vec<u8>)> {
    Ok(sqlx::query_as!(
        TaskRow,
        r#"SELECT id AS "id: TaskId", task_type AS "task_type: TaskType", payload,
                  status AS "status: TaskStatus", attempts, max_attempts, run_at, idempotency_key,
                  last_error, version, last_hash, enqueued_position, lease_owner,
                  lease_expires_at, created_at, updated_at, owner, traceparent, tracestate
           FROM tasks WHERE id = $1 FOR UPDATE"#,
        id as TaskId
    )
    .fetch_optional(tx.conn())
    .await?
    .ok_or(StoreError::NotFound(id.into()))?
    .into_task())
}

/// Filters of the task listing; `None` means "any".
#[derive(Debug, Clone, Default)]
pub struct TaskFilter {
    pub task_type: Option<TaskType>,
    pub status: Option<TaskStatus>,
    pub created_from: Option<DateTime<Utc>>,
    pub created_to: Option<DateTime<Utc>>,
    pub idempotency_key: Option<String>,
}

/// A page of the task listing.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskListing {
    pub tasks: Vec<Task>,
    /// The cursor of the last task listed (its `enqueued` event's position).
    pub last_position: Option<i64>,
}

/// Up to `limit` tasks after the cursor `after` (an `enqueued_position`), oldest first.
///
/// The cursor is the position of the task's `enqueued` event and only tasks below the log
/// horizon are listed (see [`super::events`]), so paging never skips a task whose enqueue
/// committed late.
///
/// Not a checked query: the filters given are the only conditions written, so that each
/// combination plans with the indexes it can use (a `$n IS NULL OR ...` condition would plan
/// without them once Postgres settles on a generic plan).
pub async fn list(
    pool: &PgPool,
    filter: &TaskFilter,
    after: i64,
    limit: i64,
) -> Result<TaskListing> {
    let mut q = QueryBuilder::new("SELECT ");
    q.push(TASK_COLUMNS)
        .push(" FROM tasks WHERE enqueued_position > ");
    q.push_bind(after);
    q.push(" AND enqueued_position < event_log_horizon()");
    if let Some(t) = filter.task_type {
        q.push(" AND task_type = ").push_bind(t.as_str());
    }
    if let Some(s) = filter.status {
        q.push(" AND status = ").push_bind(s.as_str());
    }
    if let Some(from) = filter.created_from {
        q.push(" AND created_at >= ").push_bind(from);
    }
    if let Some(to) = filter.created_to {
        q.push(" AND created_at < ").push_bind(to);
    }
    if let Some(key) = &filter.idempotency_key {
        q.push(" AND idempotency_key = ").push_bind(key.clone());
    }
    q.push(" ORDER BY enqueued_position LIMIT ")
        .push_bind(limit);
    let rows: Vec<TaskRow> = q.build_query_as().fetch_all(pool).await?;
    Ok(TaskListing {
        last_position: rows.last().map(|r| r.enqueued_position),
        tasks: rows.into_iter().map(Task::from).collect(),
    })
}

/// Reads several tasks without locking them.
pub async fn get_many(pool: &PgPool, ids: &[TaskId]) -> Result<Vec<Task>> {
    Ok(sqlx::query_as!(
        TaskRow,
        r#"SELECT id AS "id: TaskId", task_type AS "task_type: TaskType", payload,
                  status AS "status: TaskStatus", attempts, max_attempts, run_at, idempotency_key,
                  last_error, version, last_hash, enqueued_position, lease_owner,
                  lease_expires_at, created_at, updated_at, owner, traceparent, tracestate
           FROM tasks WHERE id = ANY($1)"#,
        ids as &[TaskId]
    )
    .fetch_all(pool)
    .await?
    .into_iter()
    .map(Task::from)
    .collect())
}

/// The database's clock, as seen by `tx`.
pub async fn db_now(tx: &mut Tx) -> Result<DateTime<Utc>> {
    Ok(sqlx::query_scalar!(r#"SELECT now() AS "now!""#)
        .fetch_one(tx.conn())
        .await?)
}

/// Lists in `task_leases` every lease held in `tasks` that it does not list (leases written by a
/// process older than the table), and drops the rows of leases that ran out over ten minutes ago
/// on tasks no longer holding one (the rescuer takes an expired lease over within minutes, so
/// such a row is left over, never live). Returns how many leases were added. Scans `tasks`.
///
/// The rows are locked as they are read: a task whose transition is under way is skipped (that
/// transition writes the index itself), and one whose transition committed since this statement
/// began is read again, so a lease just given up is not listed again after its transition
/// removed it.
pub async fn index_leases(pool: &PgPool) -> Result<u64> {
    let mut scan = Tx::begin_scan(pool).await?;
    let added = sqlx::query!(
        "INSERT INTO task_leases (task_id, expires_at)
         SELECT id, lease_expires_at FROM tasks
         WHERE lease_owner IS NOT NULL AND lease_expires_at IS NOT NULL
         FOR UPDATE SKIP LOCKED
         ON CONFLICT (task_id) DO NOTHING"
    )
    .execute(scan.conn())
    .await?
    .rows_affected();
    sqlx::query!(
        "DELETE FROM task_leases l USING tasks t
         WHERE t.id = l.task_id AND l.expires_at < now() - interval '10 minutes'
           AND t.lease_owner IS NULL"
    )
    .execute(scan.conn())
    .await?;
    scan.commit().await?;
    Ok(added)
}

/// Extends the leases `worker` holds on these attempts `(task, attempt)` to now + `lease` (in
/// the task rows and in `task_leases`, where the rescuer looks for expired ones);
/// returns the attempts it still holds (one missing from the answer was taken over or ended: its
/// handler must stop). The rows are locked in id order, as a transition locks them, so a renewal
/// and a transition on the same attempts wait for each other instead of deadlocking.
pub async fn renew_leases(
    pool: &PgPool,
    attempts: &[(TaskId, i32)],
    worker: Uuid,
    lease: std::time::Duration,
) -> Result<Vec<(TaskId, i32)>> {
    let (ids, numbers): (Vec<TaskId>, Vec<i32>) = attempts.iter().copied().unzip();
    Ok(sqlx::query!(
        r#"WITH held AS (
             SELECT t.id FROM tasks t
             JOIN UNNEST($1::uuid[], $2::int4[]) AS v(id, attempt)
               ON t.id = v.id AND t.attempts = v.attempt
             WHERE t.lease_owner = $3
             ORDER BY t.id FOR UPDATE OF t
           ), renewed AS (
             UPDATE tasks t SET lease_expires_at = now() + $4::interval
             FROM held WHERE t.id = held.id
             RETURNING t.id, t.attempts, t.lease_expires_at
           ), moved AS (
             UPDATE task_leases l SET expires_at = r.lease_expires_at
             FROM renewed r WHERE l.task_id = r.id
           )
           SELECT id AS "id!: TaskId", attempts AS "attempts!" FROM renewed"#,
        &ids as &[TaskId],
        &numbers,
        worker,
        lease as std::time::Duration
    )
    .fetch_all(pool)
    .await?
    .into_iter()
    .map(|r| (r.id, r.attempts))
    .collect())
}

/// The newest `limit` dead-lettered tasks, newest first, as their copies on the failed list
/// read (the reason and time of their `dead_lettered` event): what the failed list is restored
/// from after Redis lost it. No index serves the status, so this reads all of `tasks`; it runs
/// once per loss of Redis's data. A task of a type this version does not know is left out, and
/// so is a task whose copy still waits in the failed list's outbox (its push brings it; one
/// statement, so a copy is either here or there).
pub async fn dead_lettered(pool: &PgPool, limit: i64) -> Result<Vec<DeadLetter>> {
    let mut tx = Tx::begin_scan(pool).await?;
    let rows = sqlx::query!(
        r#"SELECT t.id AS "id!: TaskId", t.task_type AS "task_type!", t.attempts AS "attempts!",
                  d.reason AS "reason!", d.at AS "at!"
           FROM (SELECT id, task_type, attempts FROM tasks WHERE status = 'dead'
                   AND NOT EXISTS (SELECT 1 FROM failed_copies f WHERE f.task_id = tasks.id)
                 ORDER BY updated_at DESC LIMIT $1) t
           CROSS JOIN LATERAL (
             SELECT coalesce(e.data->>'reason', '') AS reason, e.occurred_at AS at
             FROM task_events e
             WHERE e.task_id = t.id AND e.event_type = 'dead_lettered'
             ORDER BY e.sequence DESC LIMIT 1) d
           ORDER BY d.at DESC"#,
        limit
    )
    .fetch_all(tx.conn())
    .await?;
    tx.commit().await?;
    Ok(rows
        .into_iter()
        .filter_map(|r| {
            Some(DeadLetter {
                task_id: r.id,
                task_type: r.task_type.parse().ok()?,
                attempts: r.attempts,
                reason: r.reason,
                at: r.at,
            })
        })
        .collect())
}
