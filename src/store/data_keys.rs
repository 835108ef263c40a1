//! The tasks' data keys (migration 15, [`crate::domain::sealing`]): read to open sealed
//! personal fields, deleted to erase them.

use crate::domain::TaskId;
use serde_json::Value;
use std::collections::{HashMap, HashSet};

use super::events::StoredEvent;
use super::{Result, StoreError};
use crate::domain::sealing::{self, DataKey, MasterKey, Opening};
use crate::domain::{Task, TaskType};

/// The data keys of those of `ids` that have one (not erased, sealed when written), unwrapped.
pub async fn keys(
    conn: &mut sqlx::PgConnection,
    master: &MasterKey,
    ids: &[TaskId],
) -> Result<HashMap<TaskId, DataKey>> {
    Ok(load(conn, Some(master), ids).await?.keys)
}

/// What [`load`] found.
#[derive(Default)]
struct Loaded {
    keys: HashMap<TaskId, DataKey>,
    /// The ids that have a key row (unwrapped or not).
    present: HashSet<TaskId>,
}

/// Reads the keys of `ids` and unwraps them when this process has the master key. A key that
/// does not unwrap (another master key) is left out and logged: its fields read as sealed, never
/// as plain text.
async fn load(
    conn: &mut sqlx::PgConnection,
    master: Option<&MasterKey>,
    ids: &[TaskId],
) -> Result<Loaded> {
    let mut out = Loaded::default();
    if ids.is_empty() {
        return Ok(out);
    }
    let rows = sqlx::query!(
        r#"SELECT task_id AS "task_id: TaskId", wrapped_key
           FROM task_data_keys WHERE task_id = ANY($1)"#,
        ids as &[TaskId]
    )
    .fetch_all(conn)
    .await?;
    for row in rows {
        let (id, wrapped) = (row.task_id, row.wrapped_key);
        out.present.insert(id);
        let Some(master) = master else { continue };
        match master.unwrap(&wrapped, id) {
            Ok(key) => {
                out.keys.insert(id, key);
            }
            Err(e) => {
                tracing::error!(task.id = %id, error = %e, "a data key does not unwrap with AUDIT_DATA_KEY");
            }
        }
    }
    Ok(out)
}

/// One stored data key (wrapped), if any: what a process checks its master key against at
/// start-up.
pub async fn any(conn: &mut sqlx::PgConnection) -> Result<Option<(TaskId, Vec<u8>)>> {
    let row = sqlx::query!(
        r#"SELECT task_id AS "task_id: TaskId", wrapped_key FROM task_data_keys LIMIT 1"#
    )
    .fetch_optional(conn)
    .await?;
    Ok(row.map(|r| (r.task_id, r.wrapped_key)))
}

/// Whether `id` still has a data key.
pub async fn exists(conn: &mut sqlx::PgConnection, id: TaskId) -> Result<bool> {
    Ok(sqlx::query_scalar!(
        r#"SELECT EXISTS (SELECT FROM task_data_keys WHERE task_id = $1) AS "exists!""#,
        id as TaskId
    )
    .fetch_one(conn)
    .await?)
}

/// Destroys `id`'s data key; whether there was one.
pub async fn destroy(conn: &mut sqlx::PgConnection, id: TaskId) -> Result<bool> {
    let done = sqlx::query!(
        "DELETE FROM task_data_keys WHERE task_id = $1",
        id as TaskId
    )
    .execute(conn)
    .await?;
    Ok(done.rows_affected() > 0)
}

/// How to show the sealed fields of task `id`.
fn opening(loaded: &Loaded, id: TaskId) -> Opening<'_> {
    match loaded.keys.get(&id) {
        Some(key) => Opening::Key(key),
        None if !loaded.present.contains(&id) => Opening::Erased,
        None => Opening::NoMasterKey,
    }
}

fn corrupt(id: TaskId, e: sealing::SealError) -> StoreError {
    StoreError::Corrupt(format!("task {id}: {e}"))
}

/// Opens the sealed personal fields of `tasks` in place: plain text with the task's key,
/// [`sealing::ERASED`] once it was erased, [`sealing::SEALED`] without `AUDIT_DATA_KEY`.
pub async fn open_tasks(
    conn: &mut sqlx::PgConnection,
    master: Option<&MasterKey>,
    rows: &mut [Task],
) -> Result<()> {
    let sealed: Vec<(usize, TaskType)> = rows
        .iter()
        .enumerate()
        .filter_map(|(i, r)| {
            sealing::payload_is_sealed(r.task_type, &r.payload).then_some((i, r.task_type))
        })
        .collect();
    if sealed.is_empty() {
        return Ok(());
    }
    let ids: Vec<TaskId> = sealed.iter().map(|(i, _)| rows[*i].id).collect();
    let loaded = load(conn, master, &ids).await?;
    for (i, t) in sealed {
        let row = &mut rows[i];
        let how = opening(&loaded, row.id);
        sealing::open_payload(t, &mut row.payload, row.id, how).map_err(|e| corrupt(row.id, e))?;
    }
    Ok(())
}

/// The sealed parts of an event's data: an `enqueued` event's payload, a success's result.
fn sealed_parts(e: &StoredEvent) -> Option<Option<TaskType>> {
    match e.event_type.as_str() {
        "enqueued" => {
            let t = e
                .data
                .get("task_type")?
                .as_str()?
                .parse::<TaskType>()
                .ok()?;
            let payload = e.data.get("payload")?;
            sealing::payload_is_sealed(t, payload).then_some(Some(t))
        }
        "attempt_succeeded" => sealing::is_envelope(e.data.get("result")?).then_some(None),
        _ => None,
    }
}

/// Opens the sealed parts of `events` in place (see [`open_tasks`]).
pub async fn open_events(
    conn: &mut sqlx::PgConnection,
    master: Option<&MasterKey>,
    events: &mut [StoredEvent],
) -> Result<()> {
    let sealed: Vec<(usize, Option<TaskType>)> = events
        .iter()
        .enumerate()
        .filter_map(|(i, e)| Some((i, sealed_parts(e)?)))
        .collect();
    if sealed.is_empty() {
        return Ok(());
    }
    let mut ids: Vec<TaskId> = sealed.iter().map(|(i, _)| events[*i].task_id).collect();
    ids.sort();
    ids.dedup();
    let loaded = load(conn, master, &ids).await?;
    for (i, part) in sealed {
        let e = &mut events[i];
        let how = opening(&loaded, e.task_id);
        let opened = match part {
            Some(t) => match e.data.get_mut("payload") {
                Some(p) => sealing::open_payload(t, p, e.task_id, how),
                None => Ok(()),
            },
            None => match e.data.get_mut("result") {
                Some(r) => sealing::open_result(r, e.task_id, how),
                None => Ok(()),
            },
        };
        opened.map_err(|err| corrupt(e.task_id, err))?;
    }
    Ok(())
}

/// Seals a provider result of task `id` with its key, when it has one.
pub fn seal_result(key: Option<&DataKey>, id: TaskId, result: Value) -> Value {
    match key {
        Some(k) => k.seal(id, sealing::RESULT_FIELD, &result),
        None => result,
    }
}
