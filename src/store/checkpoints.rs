//! Signed checkpoints of the log (see [`crate::domain::checkpoint`] and migration 13):
//! [`write()`] is the checkpointer's one step; [`verify`] re-checks every checkpoint and every
//! head it recorded against the log as it is now.

use crate::domain::TaskId;
use chrono::{DateTime, Utc};
use ed25519_dalek::SigningKey;
use sqlx::PgPool;

use super::Result;
use crate::domain::checkpoint::{check_link, checkpoint_hash, merkle_root, sign, Head, Link};

/// A stored checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub seq: i64,
    pub created_at: DateTime<Utc>,
    pub upto_position: i64,
    pub tasks: i32,
    pub merkle_root: Vec<u8>,
    pub prev_hash: Option<Vec<u8>>,
    pub hash: Vec<u8>,
    pub public_key: Vec<u8>,
    pub signature: Vec<u8>,
}

impl Checkpoint {
    /// The fields its chain, hash and signature cover.
    pub fn link(&self) -> Link<'_> {
        Link {
            seq: self.seq,
            upto_position: self.upto_position,
            tasks: self.tasks,
            merkle_root: &self.merkle_root,
            prev_hash: self.prev_hash.as_deref(),
            hash: &self.hash,
            public_key: &self.public_key,
            signature: &self.signature,
        }
    }
}

/// Checks an exported copy of the checkpoints (every one from the first, in order) without the
/// database: numbering, links, hashes and signatures (and the key, when `trusted` is given).
/// Returns every problem, each naming its checkpoint.
pub fn verify_exported(checkpoints: &[Checkpoint], trusted: Option<&[u8]>) -> Vec<String> {
    let mut problems = Vec::new();
    let mut prev: Option<&[u8]> = None;
    for (i, c) in checkpoints.iter().enumerate() {
        let found = check_link(&c.link(), i as i64 + 1, prev, trusted);
        problems.extend(
            found
                .into_iter()
                .map(|p| format!("checkpoint {}: {p}", c.seq)),
        );
        prev = Some(&c.hash);
    }
    problems
}

/// Compares an exported copy with the database's checkpoints: every exported checkpoint must
/// still be there, unchanged. Finds the newest checkpoints removed (with their heads' events
/// rewritten after them), which the database alone cannot show.
pub async fn compare_exported(pool: &PgPool, exported: &[Checkpoint]) -> Result<Vec<String>> {
    let stored: std::collections::HashMap<i64, Checkpoint> =
        list(pool).await?.into_iter().map(|c| (c.seq, c)).collect();
    let mut problems = Vec::new();
    for c in exported {
        match stored.get(&c.seq) {
            None => problems.push(format!(
                "checkpoint {}: in the exported copy but no longer in the database (removed)",
                c.seq
            )),
            Some(s) if s.link().hash != c.hash || s.signature != c.signature => {
                problems.push(format!(
                    "checkpoint {}: differs from the exported copy (replaced)",
                    c.seq
                ))
            }
            Some(_) => {}
        }
    }
    Ok(problems)
}

/// Writes the next checkpoint: the heads of the tasks whose history grew since the previous one,
/// up to the log's horizon now, signed with `key`. Returns it, or `None` when nothing changed
/// (or another process wrote the same checkpoint first).
pub async fn write(pool: &PgPool, key: &SigningKey) -> Result<Option<Checkpoint>> {
    // one snapshot: the horizon and the heads read below agree
    let mut tx = super::begin_snapshot(pool, false).await?;
    let last = sqlx::query!(
        "SELECT seq, upto_position, hash FROM audit_checkpoints ORDER BY seq DESC LIMIT 1"
    )
    .fetch_optional(&mut *tx)
    .await?
    .map(|r| (r.seq, r.upto_position, r.hash));
    let (seq, from, prev) = match &last {
        Some((seq, upto, hash)) => (seq + 1, *upto, Some(hash.as_slice())),
        None => (1, 0, None),
    };
    let horizon = sqlx::query_scalar!(r#"SELECT event_log_horizon() AS "horizon!""#)
        .fetch_one(&mut *tx)
        .await?;
    let rows: Vec<(TaskId, i32, Vec<u8>)> = sqlx::query!(
        r#"SELECT DISTINCT ON (task_id) task_id AS "task_id!: TaskId", sequence AS "sequence!",
                  hash AS "hash!"
           FROM task_events
           WHERE position >= $1 AND position < $2 ORDER BY task_id, sequence DESC"#,
        from,
        horizon
    )
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .map(|r| (r.task_id, r.sequence, r.hash))
    .collect();
    if rows.is_empty() {
        tx.rollback().await?;
        return Ok(None);
    }
    let heads: Vec<Head> = rows.into_iter().map(Head::from).collect();
    let root = merkle_root(&heads);
    let tasks = heads.len() as i32;
    let hash = checkpoint_hash(seq, horizon, tasks, &root, prev);
    let checkpoint = Checkpoint {
        seq,
        created_at: crate::domain::event::db_time(Utc::now()),
        upto_position: horizon,
        tasks,
        merkle_root: root.to_vec(),
        prev_hash: prev.map(<[u8]>::to_vec),
        hash: hash.to_vec(),
        public_key: key.verifying_key().to_bytes().to_vec(),
        signature: sign(key, &hash),
    };
    let inserted = sqlx::query!(
        "INSERT INTO audit_checkpoints (seq, created_at, upto_position, tasks, merkle_root,
                                        prev_hash, hash, public_key, signature)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
         ON CONFLICT (seq) DO NOTHING",
        checkpoint.seq,
        checkpoint.created_at,
        checkpoint.upto_position,
        checkpoint.tasks,
        &checkpoint.merkle_root,
        checkpoint.prev_hash.as_deref(),
        &checkpoint.hash,
        &checkpoint.public_key,
        &checkpoint.signature
    )
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if inserted == 0 {
        tx.rollback().await?;
        return Ok(None);
    }
    let ids: Vec<TaskId> = heads.iter().map(|h| h.task_id).collect();
    let versions: Vec<i32> = heads.iter().map(|h| h.version).collect();
    let hashes: Vec<Vec<u8>> = heads.iter().map(|h| h.hash.clone()).collect();
    sqlx::query!(
        "INSERT INTO audit_checkpoint_heads (seq, task_id, version, head_hash) \
         SELECT $1, * FROM UNNEST($2::uuid[], $3::int4[], $4::bytea[])",
        seq,
        &ids as &[TaskId],
        &versions,
        &hashes
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Some(checkpoint))
}

/// Every checkpoint, in order.
pub async fn list(pool: &PgPool) -> Result<Vec<Checkpoint>> {
    page(pool, 0, i64::MAX).await
}

/// Up to `limit` checkpoints after number `after`, in order.
pub async fn page(pool: &PgPool, after: i64, limit: i64) -> Result<Vec<Checkpoint>> {
    Ok(sqlx::query_as!(
        Checkpoint,
        "SELECT seq, created_at, upto_position, tasks, merkle_root, prev_hash, hash, public_key,
                signature
         FROM audit_checkpoints WHERE seq > $1 ORDER BY seq LIMIT $2",
        after,
        limit
    )
    .fetch_all(pool)
    .await?)
}

/// The checkpoints numbered `seqs`, in order.
pub(crate) async fn numbered(pool: &PgPool, seqs: &[i64]) -> Result<Vec<Checkpoint>> {
    Ok(sqlx::query_as!(
        Checkpoint,
        "SELECT seq, created_at, upto_position, tasks, merkle_root, prev_hash, hash, public_key,
                signature
         FROM audit_checkpoints WHERE seq = ANY($1) ORDER BY seq",
        seqs
    )
    .fetch_all(pool)
    .await?)
}

/// What [`verify`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct CheckpointReport {
    pub checkpoints: u64,
    pub heads: u64,
    /// Heads whose event is now in an archive (covered by the task's anchor).
    pub archived_heads: u64,
    /// Every problem, in checkpoint order.
    pub broken: Vec<String>,
}

/// Re-checks the checkpoint chain: numbering, links, hashes, signatures (by the key each was
/// signed with, which must be `trusted` when given), each Merkle root over the heads stored
/// with it, and that every head it recorded is still in the log with the same hash (a task's
/// history cannot have been removed, cut short or rewritten since).
pub async fn verify(pool: &PgPool, trusted: Option<&[u8]>) -> Result<CheckpointReport> {
    let mut report = CheckpointReport::default();
    let mut prev: Option<Vec<u8>> = None;
    for (i, c) in list(pool).await?.into_iter().enumerate() {
        report.checkpoints += 1;
        let mut problems = check_link(&c.link(), i as i64 + 1, prev.as_deref(), trusted);
        let heads: Vec<(TaskId, i32, Vec<u8>)> = sqlx::query!(
            r#"SELECT task_id AS "task_id: TaskId", version, head_hash
               FROM audit_checkpoint_heads WHERE seq = $1 ORDER BY task_id"#,
            c.seq
        )
        .fetch_all(pool)
        .await?
        .into_iter()
        .map(|r| (r.task_id, r.version, r.head_hash))
        .collect();
        let heads: Vec<Head> = heads.into_iter().map(Head::from).collect();
        if merkle_root(&heads).as_slice() != c.merkle_root || heads.len() as i32 != c.tasks {
            problems
                .push("its recorded heads do not give its Merkle root (heads were changed)".into());
        }
        // a head whose event was archived is checked against the archive (`arnela audit
        // verify --archive`); here it must be covered by its task's anchor
        let gone: Vec<(TaskId, i32, bool)> = sqlx::query!(
            r#"SELECT h.task_id AS "task_id: TaskId", h.version,
                      e.hash IS NULL AND EXISTS (
                        SELECT FROM task_event_anchors a WHERE a.task_id = h.task_id
                          AND (a.sequence > h.version
                               OR (a.sequence = h.version AND a.hash = h.head_hash)))
                        AS "archived!"
               FROM audit_checkpoint_heads h
               LEFT JOIN task_events e ON e.task_id = h.task_id AND e.sequence = h.version
               WHERE h.seq = $1 AND e.hash IS DISTINCT FROM h.head_hash ORDER BY h.task_id"#,
            c.seq
        )
        .fetch_all(pool)
        .await?
        .into_iter()
        .map(|r| (r.task_id, r.version, r.archived))
        .collect();
        let (archived, gone): (Vec<_>, Vec<_>) = gone.into_iter().partition(|g| g.2);
        report.archived_heads += archived.len() as u64;
        for (task, version, _) in gone {
            problems.push(format!(
                "task {task}: event {version} it recorded is missing or altered (the history \
                 was removed, cut short or rewritten)"
            ));
        }
        report.broken.extend(
            problems
                .into_iter()
                .map(|p| format!("checkpoint {}: {p}", c.seq)),
        );
        report.heads += heads.len() as u64;
        prev = Some(c.hash.clone());
    }
    Ok(report)
}
