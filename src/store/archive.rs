//! The database side of `arnela audit archive` and `arnela audit restore` (the files are
//! [`crate::archive`]'s): reading a closed monthly partition in pages, the checkpoints that
//! name its events, removing it once its archive is written and verified (recording each task's
//! anchor first), and putting an archive's events back into a scratch database.
//!
//! These run as the log's owner: the runtime role may not read a partition directly, detach or
//! drop one, or write anchors.

use crate::domain::TaskId;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

use super::checkpoints::Checkpoint;
use super::retention::Partition;
use super::Result;
use crate::domain::checkpoint::Head;

/// An event as an archive holds it: every stored column.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow)]
pub struct ArchivedEvent {
    pub position: i64,
    pub task_id: TaskId,
    pub sequence: i32,
    pub event_type: String,
    pub event_version: i16,
    pub data: serde_json::Value,
    pub occurred_at: DateTime<Utc>,
    pub recorded_at: DateTime<Utc>,
    #[serde(with = "hex_opt")]
    pub prev_hash: Option<Vec<u8>>,
    #[serde(with = "hex_bytes")]
    pub hash: Vec<u8>,
    pub hash_version: i16,
    pub task_type: Option<String>,
}

impl ArchivedEvent {
    /// The stored form the chain checks read.
    pub fn stored(&self) -> super::events::StoredEvent {
        super::events::StoredEvent {
            position: self.position,
            task_id: self.task_id,
            sequence: self.sequence,
            event_type: self.event_type.clone(),
            event_version: self.event_version,
            data: self.data.clone(),
            occurred_at: self.occurred_at,
            recorded_at: self.recorded_at,
            prev_hash: self.prev_hash.clone(),
            hash: self.hash.clone(),
            hash_version: self.hash_version,
        }
    }
}

const COLUMNS: &str = "position, task_id, sequence, event_type, event_version, data, occurred_at, \
    recorded_at, prev_hash, hash, hash_version, task_type";

/// Up to `limit` events of `partition` after `(task, sequence)`, in task and sequence order,
/// each page in its own short transaction.
pub async fn events_page(
    pool: &PgPool,
    partition: &Partition,
    after: Option<(TaskId, i32)>,
    limit: i64,
) -> Result<Vec<ArchivedEvent>> {
    let (task, sequence) = after.unwrap_or((TaskId::default(), 0));
    Ok(sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM {} WHERE (task_id, sequence) > ($1, $2) \
         ORDER BY task_id, sequence LIMIT $3",
        partition.name
    ))
    .bind(task)
    .bind(sequence)
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

/// How many events `partition` holds.
pub async fn count(pool: &PgPool, partition: &Partition) -> Result<i64> {
    Ok(
        sqlx::query_scalar(&format!("SELECT count(*) FROM {}", partition.name))
            .fetch_one(pool)
            .await?,
    )
}

/// Transactions of this database that started before `at`: one of them could still append an
/// event dated before `at` (an event's `recorded_at` is its transaction's start).
pub async fn transactions_started_before(pool: &PgPool, at: DateTime<Utc>) -> Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity \
         WHERE datname = current_database() AND xact_start < $1 AND pid <> pg_backend_pid()",
    )
    .bind(at)
    .fetch_one(pool)
    .await?)
}

/// Every checkpoint that names an event of `partition`, with all the heads it recorded.
pub async fn checkpoints_naming(
    pool: &PgPool,
    partition: &Partition,
) -> Result<Vec<(Checkpoint, Vec<Head>)>> {
    let seqs: Vec<i64> = sqlx::query_scalar(&format!(
        "SELECT DISTINCT h.seq FROM audit_checkpoint_heads h \
         JOIN {} e ON e.task_id = h.task_id AND e.sequence = h.version ORDER BY h.seq",
        partition.name
    ))
    .fetch_all(pool)
    .await?;
    // two queries for the month, not two per checkpoint (a month holds tens of thousands)
    let checkpoints = super::checkpoints::numbered(pool, &seqs).await?;
    let heads: Vec<(i64, TaskId, i32, Vec<u8>)> = sqlx::query_as(
        "SELECT seq, task_id, version, head_hash FROM audit_checkpoint_heads \
         WHERE seq = ANY($1) ORDER BY seq, task_id",
    )
    .bind(&seqs)
    .fetch_all(pool)
    .await?;
    let mut heads = heads.into_iter().peekable();
    Ok(checkpoints
        .into_iter()
        .map(|c| {
            let mut own = Vec::new();
            while let Some((_, task, version, hash)) = heads.next_if(|h| h.0 == c.seq) {
                own.push(Head::from((task, version, hash)));
            }
            (c, own)
        })
        .collect())
}

/// Of the links `(task, sequence, hash)` a partition's chains continue from, the ones no
/// earlier archive recorded as that task's anchor with that hash.
pub async fn unanchored(
    pool: &PgPool,
    links: &[(TaskId, i32, Vec<u8>)],
) -> Result<Vec<(TaskId, i32)>> {
    if links.is_empty() {
        return Ok(Vec::new());
    }
    Ok(sqlx::query_as(
        "SELECT l.task_id, l.sequence FROM UNNEST($1::uuid[], $2::int4[], $3::bytea[]) \
           AS l(task_id, sequence, hash) \
         WHERE NOT EXISTS (SELECT FROM task_event_anchors a WHERE a.task_id = l.task_id \
                           AND a.sequence = l.sequence AND a.hash = l.hash) \
         ORDER BY l.task_id",
    )
    .bind(links.iter().map(|l| l.0).collect::<Vec<_>>())
    .bind(links.iter().map(|l| l.1).collect::<Vec<_>>())
    .bind(links.iter().map(|l| l.2.clone()).collect::<Vec<_>>())
    .fetch_all(pool)
    .await?)
}

/// What the log keeps of an archived partition.
#[derive(Debug, Clone)]
pub struct ArchiveRecord<'a> {
    pub partition: &'a Partition,
    pub events: i64,
    pub tasks: i64,
    pub manifest: &'a serde_json::Value,
}

/// Removes `partition` from the log, in one transaction: records the archive and each task's
/// last archived event (its anchor), then detaches and drops the partition. Waits at most
/// `lock_timeout` for the log's lock (the detach needs it alone for a moment).
pub async fn remove_partition(
    pool: &PgPool,
    record: ArchiveRecord<'_>,
    lock_timeout: std::time::Duration,
) -> Result<u64> {
    let mut tx = pool.begin().await?;
    sqlx::query(&format!(
        "SET LOCAL lock_timeout = {}",
        lock_timeout.as_millis().max(1)
    ))
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO task_event_archives (name, starts_at, ends_at, events, tasks, manifest) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(&record.partition.name)
    .bind(record.partition.starts_at)
    .bind(record.partition.ends_at)
    .bind(record.events)
    .bind(record.tasks)
    .bind(record.manifest)
    .execute(&mut *tx)
    .await?;
    let anchors = sqlx::query(&format!(
        "INSERT INTO task_event_anchors (task_id, sequence, hash, archive) \
         SELECT DISTINCT ON (task_id) task_id, sequence, hash, $1 FROM {} \
         ORDER BY task_id, sequence DESC",
        record.partition.name
    ))
    .bind(&record.partition.name)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    sqlx::query(&format!(
        "ALTER TABLE task_events DETACH PARTITION {}",
        record.partition.name
    ))
    .execute(&mut *tx)
    .await?;
    sqlx::query(&format!("DROP TABLE {}", record.partition.name))
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(anchors)
}

/// The archives the log no longer holds, oldest first.
pub async fn archived(pool: &PgPool) -> Result<Vec<(String, i64, DateTime<Utc>)>> {
    Ok(sqlx::query_as(
        "SELECT name, events, archived_at FROM task_event_archives ORDER BY starts_at",
    )
    .fetch_all(pool)
    .await?)
}

/// Why the database `pool` points at is a service's own rather than a scratch database, if it
/// is: it holds tasks, or archived a month itself.
pub async fn live_database(pool: &PgPool) -> Result<Option<String>> {
    let (tasks, archived): (bool, Option<String>) = sqlx::query_as(
        "SELECT EXISTS (SELECT FROM tasks), (SELECT min(name) FROM task_event_archives)",
    )
    .fetch_one(pool)
    .await?;
    Ok(match (tasks, archived) {
        (true, _) => Some("this database holds tasks".into()),
        (false, Some(name)) => Some(format!("this database archived {name} itself")),
        (false, None) => None,
    })
}

/// Puts archived events back (into a scratch database, for an auditor's queries): makes their
/// month's partition, inserts them as they were stored, records where a chain continues from
/// an earlier archive (its anchor, from the first event's link) and each chain's head in
/// `retired_tasks` (status `restored`), so that `arnela audit verify` checks them there.
/// Events already present are skipped.
pub async fn restore(
    pool: &PgPool,
    archive: &str,
    partition: &Partition,
    events: &[ArchivedEvent],
) -> Result<u64> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT task_events_partition($1)")
        .bind(partition.starts_at)
        .execute(&mut *tx)
        .await?;
    let added = sqlx::query(
        "INSERT INTO task_events (position, task_id, sequence, event_type, event_version, data, \
           occurred_at, recorded_at, prev_hash, hash, hash_version, task_type) \
         SELECT e.* FROM UNNEST($1::int8[], $2::uuid[], $3::int4[], $4::text[], $5::int2[], \
           $6::jsonb[], $7::timestamptz[], $8::timestamptz[], $9::bytea[], $10::bytea[], \
           $11::int2[], $12::text[]) \
           AS e(position, task_id, sequence, event_type, event_version, data, occurred_at, \
                recorded_at, prev_hash, hash, hash_version, task_type) \
         WHERE NOT EXISTS (SELECT FROM task_events t \
                           WHERE t.task_id = e.task_id AND t.sequence = e.sequence)",
    )
    .bind(events.iter().map(|e| e.position).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.task_id).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.sequence).collect::<Vec<_>>())
    .bind(
        events
            .iter()
            .map(|e| e.event_type.clone())
            .collect::<Vec<_>>(),
    )
    .bind(events.iter().map(|e| e.event_version).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.data.clone()).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.occurred_at).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.recorded_at).collect::<Vec<_>>())
    .bind(
        events
            .iter()
            .map(|e| e.prev_hash.clone())
            .collect::<Vec<_>>(),
    )
    .bind(events.iter().map(|e| e.hash.clone()).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.hash_version).collect::<Vec<_>>())
    .bind(
        events
            .iter()
            .map(|e| e.task_type.clone())
            .collect::<Vec<_>>(),
    )
    .execute(&mut *tx)
    .await?
    .rows_affected();
    // where a chain continues from an archive not restored, and each chain's head
    let chains: Vec<(&ArchivedEvent, &ArchivedEvent)> = events
        .chunk_by(|a, b| a.task_id == b.task_id)
        .map(|c| (&c[0], &c[c.len() - 1]))
        .collect();
    let links: Vec<(TaskId, i32, Vec<u8>)> = chains
        .iter()
        .filter(|(first, _)| first.sequence > 1)
        .filter_map(|(first, _)| {
            let link = first.prev_hash.clone()?;
            Some((first.task_id, first.sequence - 1, link))
        })
        .collect();
    sqlx::query(
        "INSERT INTO task_event_anchors (task_id, sequence, hash, archive) \
         SELECT l.*, $4 FROM UNNEST($1::uuid[], $2::int4[], $3::bytea[]) AS l \
         ON CONFLICT DO NOTHING",
    )
    .bind(links.iter().map(|l| l.0).collect::<Vec<_>>())
    .bind(links.iter().map(|l| l.1).collect::<Vec<_>>())
    .bind(links.iter().map(|l| l.2.clone()).collect::<Vec<_>>())
    .bind(archive)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO retired_tasks (id, task_type, status, owner, attempts, max_attempts, \
           run_at, version, last_hash, created_at, updated_at) \
         SELECT h.id, coalesce(h.task_type, ''), 'restored', '', 0, 0, h.created_at, h.version, \
                h.last_hash, h.created_at, h.updated_at \
         FROM UNNEST($1::uuid[], $2::text[], $3::int4[], $4::bytea[], $5::timestamptz[], \
                     $6::timestamptz[]) \
           AS h(id, task_type, version, last_hash, created_at, updated_at) \
         ON CONFLICT (id) DO UPDATE SET version = excluded.version, \
           last_hash = excluded.last_hash, updated_at = excluded.updated_at \
         WHERE retired_tasks.version < excluded.version",
    )
    .bind(chains.iter().map(|c| c.0.task_id).collect::<Vec<_>>())
    .bind(
        chains
            .iter()
            .map(|c| c.1.task_type.clone())
            .collect::<Vec<_>>(),
    )
    .bind(chains.iter().map(|c| c.1.sequence).collect::<Vec<_>>())
    .bind(chains.iter().map(|c| c.1.hash.clone()).collect::<Vec<_>>())
    .bind(chains.iter().map(|c| c.0.occurred_at).collect::<Vec<_>>())
    .bind(chains.iter().map(|c| c.1.recorded_at).collect::<Vec<_>>())
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(added)
}

mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        hex::decode(String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

mod hex_opt {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(b) => s.serialize_str(&hex::encode(b)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|h| hex::decode(h).map_err(serde::de::Error::custom))
            .transpose()
    }
}
