//! Redis as transport: the queue's key names, the delivery message, and the list operations.
//!
//! Redis never holds the only copy of a task (Postgres does); the lists are how deliveries
//! travel from the relay to the workers:
//!
//! - the relay `LPUSH`es deliveries on `{prefix}:tasks` (pipelined, in outbox order);
//! - a worker takes the oldest with `BLMOVE {prefix}:tasks {prefix}:tasks:processing RIGHT LEFT`,
//!   so a delivery is never only in a worker's memory (FIFO: pushed left, taken right);
//! - once the outcome is committed in Postgres the worker acknowledges with `LREM`;
//! - every published delivery is also a member of the set `{prefix}:tasks:transit` until it is
//!   acknowledged (added in the same `MULTI` as the push, removed in the same `MULTI` as the
//!   `LREM`), so the rescuer can tell a delivery that waits from one Redis lost;
//! - dead-lettered tasks get a copy on `{prefix}:tasks:failed` (newest first, capped at
//!   [`FAILED_LIST_CAP`] entries by `LTRIM` in the same `MULTI`), pushed from their outbox in
//!   Postgres ([`crate::dead_letters`]).
//!
//! The namespace is bound to one database: `{prefix}:tasks:database` names it, and is set
//! together with the seeded marker ([`mark_seeded_bound`]) or at start ([`bind`]); the
//! comparison and its error live in [`crate::binding`].
//!
//! With queue shards ([`Keys::shard_of`]) each delivery travels on its task's shard: the
//! functions here that take entries group them by shard (one round trip per shard), those that
//! read one list read the shard of the keys they are given.
//!
//! Every Redis error is returned to the caller.

pub mod conn;
pub mod keys;

pub use conn::RedisConn;
pub use keys::Keys;

use crate::domain::TaskId;
use chrono::{DateTime, Utc};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::time::Duration;
use uuid::Uuid;

use crate::domain::task::DeadLetter;

/// The most entries kept on the failed list (older copies are trimmed; Postgres keeps all).
pub const FAILED_LIST_CAP: isize = 10_000;

/// Errors of the Redis transport.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("redis error: {0}")]
    Redis(#[from] redis::RedisError),
}

pub type Result<T, E = QueueError> = std::result::Result<T, E>;

/// Whether Redis answers (for `/health`): one `PING`; on a cluster, one to each master that holds
/// the namespace's keys (the prefix's slot and every queue shard's), so a master holding none of
/// them, or one being replaced, does not make the service unready.
pub async fn ping(conn: &mut RedisConn, keys: &Keys) -> Result<()> {
    if !conn.is_cluster() {
        redis::cmd("PING").query_async::<String>(conn).await?;
        return Ok(());
    }
    let mut slots: Vec<u16> = keys.all_shards().map(|k| k.queue_slot()).collect();
    slots.push(keys.slot());
    slots.sort_unstable();
    slots.dedup();
    for slot in slots {
        conn.query_on_slot::<String>(redis::cmd("PING"), slot)
            .await?;
    }
    Ok(())
}

/// Binds the namespace to `shards` queue shards if it is unbound (`SET NX`); returns the count it
/// is bound to. Every process of a deployment must use the same count (see [`keys`]).
pub async fn bind_shards(conn: &mut RedisConn, keys: &Keys) -> Result<usize> {
    set_if_absent(conn, &keys.shard_count(), keys.shards()).await
}

/// Sets `key` to `value` unless it is set (`SET NX`), and returns what it holds then, in one
/// round trip.
async fn set_if_absent<V, T>(conn: &mut RedisConn, key: &str, value: V) -> Result<T>
where
    V: redis::ToRedisArgs,
    T: redis::FromRedisValue,
{
    let (held,): (T,) = redis::pipe()
        .cmd("SET")
        .arg(key)
        .arg(value)
        .arg("NX")
        .ignore()
        .cmd("GET")
        .arg(key)
        .query_async(conn)
        .await?;
    Ok(held)
}

/// Where Redis is: the connection (`redis://`, or TLS with `rediss://` / `REDIS_TLS`) and the
/// certificate authority to trust for TLS, when not the system's (`REDIS_CA_CERT`).
#[derive(Debug, Clone)]
pub struct RedisTarget {
    pub info: redis::ConnectionInfo,
    /// PEM of the CA that signed the server's certificate.
    pub root_cert: Option<Vec<u8>>,
    /// The address is one node of a Redis Cluster (`REDIS_CLUSTER`); the others are discovered.
    pub cluster: bool,
    /// More nodes of the cluster to start from, when the first does not answer.
    pub seeds: Vec<redis::ConnectionInfo>,
}

impl From<redis::ConnectionInfo> for RedisTarget {
    fn from(info: redis::ConnectionInfo) -> Self {
        RedisTarget {
            info,
            root_cert: None,
            cluster: false,
            seeds: Vec::new(),
        }
    }
}

/// Opens a managed (auto-reconnecting) connection whose commands time out after `timeout`
/// (plus any blocking time they ask for).
pub async fn connect_with_timeout(
    target: impl Into<RedisTarget>,
    timeout: Duration,
) -> Result<RedisConn> {
    let target = target.into();
    if target.cluster {
        return connect_cluster(target, timeout).await;
    }
    let client = match target.root_cert {
        Some(root_cert) => redis::Client::build_with_tls(
            target.info,
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(root_cert),
            },
        )?,
        None => redis::Client::open(target.info)?,
    };
    // Reconnection: two retries, 10 ms and 20 ms after the failure (at most 2 s apart), so a
    // restarted Redis is used again at once and one that is down fails the call quickly; the
    // loops above retry with their own backoff.
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(3)))
        .set_response_timeout(Some(timeout))
        .set_min_delay(Duration::from_millis(10))
        .set_exponent_base(2.0)
        .set_max_delay(Duration::from_secs(2))
        .set_number_of_retries(2);
    Ok(RedisConn::Single(
        ConnectionManager::new_with_config(client, config).await?,
    ))
}

/// A cluster connection from the seed nodes (the first that answers gives the slot map). A request that meets a moved slot or a failed node
/// is retried three times (10 ms to 1 s apart) after the slot map is refreshed, so a failover
/// shows as a short delay or as an error that the loops above retry with their own backoff.
async fn connect_cluster(target: RedisTarget, timeout: Duration) -> Result<RedisConn> {
    let nodes = std::iter::once(target.info).chain(target.seeds);
    let mut builder = redis::cluster::ClusterClientBuilder::new(nodes)
        .connection_timeout(Duration::from_secs(3))
        .response_timeout(timeout)
        .retries(3)
        .min_retry_wait(10)
        .max_retry_wait(1000);
    if let Some(root_cert) = target.root_cert {
        builder = builder.certs(redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(root_cert),
        });
    }
    let client = builder.build()?;
    Ok(RedisConn::Cluster(client.get_async_connection().await?))
}

/// Opens a managed connection with a 5 s command timeout.
pub async fn connect(target: impl Into<RedisTarget>) -> Result<RedisConn> {
    connect_with_timeout(target, Duration::from_secs(5)).await
}

/// What travels on the queue: which attempt of which task to run. The payload stays in
/// Postgres, so nothing secret or personal is copied to Redis.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    pub task_id: TaskId,
    pub attempt: i32,
    #[serde(rename = "type")]
    pub task_type: String,
}

impl Delivery {
    pub fn encode(&self) -> String {
        serde_json::to_string(self).expect("deliveries serialize")
    }

    pub fn decode(raw: &str) -> Option<Delivery> {
        serde_json::from_str(raw).ok()
    }
}

/// The operator's copy of a dead-lettered task on the failed list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailedCopy {
    pub task_id: TaskId,
    #[serde(rename = "type")]
    pub task_type: String,
    pub attempts: i32,
    pub reason: String,
    pub failed_at: DateTime<Utc>,
}

/// Pushes deliveries in one round trip, first one first out.
pub async fn publish(conn: &mut RedisConn, keys: &Keys, deliveries: &[Delivery]) -> Result<()> {
    if deliveries.is_empty() {
        return Ok(());
    }
    let mut shards: Vec<Vec<String>> = vec![Vec::new(); keys.shards()];
    for d in deliveries {
        shards[keys.shard_of(d.task_id)].push(d.encode());
    }
    // one MULTI per shard, the shards at once (on a cluster, on their own masters)
    let pushes = shards
        .iter()
        .enumerate()
        .filter(|(_, encoded)| !encoded.is_empty())
        .map(|(k, encoded)| {
            let (keys, mut conn) = (keys.shard(k), conn.clone());
            async move {
                // One LPUSH with many values pushes them left one after the other, so the first
                // ends nearest the right end, where workers take from.
                redis::pipe()
                    .atomic()
                    .cmd("LPUSH")
                    .arg(keys.tasks())
                    .arg(encoded)
                    .ignore()
                    .cmd("SADD")
                    .arg(keys.transit())
                    .arg(encoded)
                    .ignore()
                    .query_async::<()>(&mut conn)
                    .await
            }
        });
    futures::future::try_join_all(pushes).await?;
    Ok(())
}

/// The shards an entry may be on: its task's, or every shard for an entry that cannot be
/// decoded (it was not published by a relay).
fn shards_of(keys: &Keys, raw: &str) -> Vec<Keys> {
    match Delivery::decode(raw) {
        Some(d) => vec![keys.for_task(d.task_id)],
        None if keys.shards() == 1 => vec![keys.clone()],
        None => keys.all_shards().collect(),
    }
}

/// The shard of an entry's task (an undecodable entry: the shard of `keys`).
fn shard_index_of(keys: &Keys, raw: &str) -> usize {
    Delivery::decode(raw).map_or(keys.shard_index(), |d| keys.shard_of(d.task_id))
}

/// The positions of the entries grouped by the shard of their task (see [`shard_index_of`]);
/// with one shard, one group and nothing decoded.
fn by_shard<S: AsRef<str>>(keys: &Keys, raws: &[S]) -> Vec<(Keys, Vec<usize>)> {
    if keys.shards() == 1 {
        return vec![(keys.clone(), (0..raws.len()).collect())];
    }
    let mut groups: Vec<Vec<usize>> = vec![Vec::new(); keys.shards()];
    for (i, raw) in raws.iter().enumerate() {
        groups[shard_index_of(keys, raw.as_ref())].push(i);
    }
    groups
        .into_iter()
        .enumerate()
        .filter(|(_, g)| !g.is_empty())
        .map(|(k, g)| (keys.shard(k), g))
        .collect()
}

/// Waits up to `block` for the oldest delivery and moves it atomically onto the processing
/// list. Returns the raw entry (needed to acknowledge it) or `None` on time-out.
pub async fn take(conn: &mut RedisConn, keys: &Keys, block: Duration) -> Result<Option<String>> {
    Ok(redis::cmd("BLMOVE")
        .arg(keys.tasks())
        .arg(keys.processing())
        .arg("RIGHT")
        .arg("LEFT")
        .arg(block.as_secs_f64())
        .query_async::<Option<String>>(conn)
        .await?)
}

/// Moves up to `max` deliveries that are already waiting onto the processing list, without
/// blocking, in one command (a script: each move is the same atomic `LMOVE` as [`take`]).
pub async fn take_waiting(conn: &mut RedisConn, keys: &Keys, max: usize) -> Result<Vec<String>> {
    static SCRIPT: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
        redis::Script::new(
            r"
local taken = {}
for i = 1, tonumber(ARGV[1]) do
  local entry = redis.call('LMOVE', KEYS[1], KEYS[2], 'RIGHT', 'LEFT')
  if not entry then break end
  taken[i] = entry
end
return taken",
        )
    });
    if max == 0 {
        return Ok(Vec::new());
    }
    Ok(SCRIPT
        .key(keys.tasks())
        .key(keys.processing())
        .arg(max)
        .invoke_async(conn)
        .await?)
}

/// Removes one copy of each entry from the processing list, in one round trip. Takes push on
/// the left, so the oldest entries, which finish first, are near the right end: `LREM` with a
/// negative count searches from there instead of walking the whole list.
pub async fn ack_many(conn: &mut RedisConn, keys: &Keys, raws: &[&str]) -> Result<()> {
    if raws.is_empty() {
        return Ok(());
    }
    for (keys, group) in by_shard(keys, raws) {
        let shard_raws: Vec<&str> = group.iter().map(|&i| raws[i]).collect();
        let mut pipe = redis::pipe();
        pipe.atomic();
        for raw in &shard_raws {
            pipe.lrem(keys.processing(), -1, *raw).ignore();
        }
        pipe.cmd("SREM")
            .arg(keys.transit())
            .arg(&shard_raws)
            .ignore();
        pipe.query_async::<()>(conn).await?;
    }
    Ok(())
}

/// Which of these entries Redis still holds in transit (one round trip).
pub async fn in_transit(conn: &mut RedisConn, keys: &Keys, raws: &[String]) -> Result<Vec<bool>> {
    if raws.is_empty() {
        return Ok(Vec::new());
    }
    let mut present = vec![false; raws.len()];
    for (keys, group) in by_shard(keys, raws) {
        let found: Vec<bool> = redis::cmd("SMISMEMBER")
            .arg(keys.transit())
            .arg(group.iter().map(|&i| &raws[i]).collect::<Vec<_>>())
            .query_async(conn)
            .await?;
        for (&i, f) in group.iter().zip(found) {
            present[i] = f;
        }
    }
    Ok(present)
}

/// Removes one copy of `raw` from the processing list (the delivery is done with).
pub async fn ack(conn: &mut RedisConn, keys: &Keys, raw: &str) -> Result<bool> {
    let mut removed_any = false;
    for keys in shards_of(keys, raw) {
        let (removed,): (i64,) = redis::pipe()
            .atomic()
            .lrem(keys.processing(), -1, raw)
            .srem(keys.transit(), raw)
            .ignore()
            .query_async(conn)
            .await?;
        removed_any |= removed > 0;
    }
    Ok(removed_any)
}

impl From<&DeadLetter> for FailedCopy {
    fn from(d: &DeadLetter) -> FailedCopy {
        FailedCopy {
            task_id: d.task_id,
            task_type: d.task_type.to_string(),
            attempts: d.attempts,
            reason: d.reason.clone(),
            failed_at: d.at,
        }
    }
}

impl FailedCopy {
    /// What tells this copy from every other in [`Keys::failed_pushed`]: the task and when it
    /// was dead-lettered (a task dead-lettered again after an operator's retry has a new copy).
    pub fn member(&self) -> String {
        format!("{}:{}", self.task_id, self.failed_at.timestamp_micros())
    }
}

/// Pushes the copies of `dead` (oldest first: the last ends up at the head) onto the failed
/// list, except those pushed before, and keeps the list to [`FAILED_LIST_CAP`] entries.
/// Returns how many it pushed. One script, which writes nothing when it fails: a key of
/// another type is refused before the first write, and under `maxmemory` Redis refuses a
/// script's first write, not the ones after it.
///
/// Callers push the copies they took from the failed list's outbox
/// ([`crate::dead_letters::push_pending`]), whose transaction then deletes them; when that
/// commit fails after the push, the next push of the same copies finds them in
/// [`Keys::failed_pushed`] and leaves them out. That set keeps the newest [`FAILED_LIST_CAP`]
/// copies pushed (by their dead-lettering time), as the list does.
pub async fn push_failed(conn: &mut RedisConn, keys: &Keys, dead: &[DeadLetter]) -> Result<usize> {
    static SCRIPT: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
        redis::Script::new(
            r"
-- a script's writes are not undone when a later command fails: refuse before the first write
-- if a key has another type, and write each copy before its note
for i, want in ipairs({'list', 'zset'}) do
  local t = redis.call('TYPE', KEYS[i]).ok
  if t ~= want and t ~= 'none' then
    return redis.error_reply('WRONGTYPE ' .. KEYS[i] .. ' holds a ' .. t .. ', not a ' .. want)
  end
end
local cap = tonumber(ARGV[1])
local pushed = 0
for i = 2, #ARGV, 3 do
  if not redis.call('ZSCORE', KEYS[2], ARGV[i]) then
    redis.call('LPUSH', KEYS[1], ARGV[i + 2])
    redis.call('ZADD', KEYS[2], ARGV[i + 1], ARGV[i])
    pushed = pushed + 1
  end
end
if pushed > 0 then
  redis.call('LTRIM', KEYS[1], 0, cap - 1)
  redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -cap - 1)
end
return pushed",
        )
    });
    if dead.is_empty() {
        return Ok(0);
    }
    let mut invocation = SCRIPT.key(keys.failed());
    invocation.key(keys.failed_pushed()).arg(FAILED_LIST_CAP);
    for d in dead {
        let copy = FailedCopy::from(d);
        invocation
            .arg(copy.member())
            .arg(copy.failed_at.timestamp_micros())
            .arg(serde_json::to_string(&copy).expect("failed copies serialize"));
    }
    Ok(invocation.invoke_async(conn).await?)
}

/// LPUSH + LTRIM in one MULTI: the list never grows past [`FAILED_LIST_CAP`]. `entries` go
/// oldest first: the last ends up at the head.
async fn push_failed_entries(conn: &mut RedisConn, keys: &Keys, entries: &[String]) -> Result<()> {
    redis::pipe()
        .atomic()
        .lpush(keys.failed(), entries)
        .ignore()
        .ltrim(keys.failed(), 0, FAILED_LIST_CAP - 1)
        .ignore()
        .query_async::<()>(conn)
        .await?;
    Ok(())
}

/// How long one rescuer has to restore the failed list before another may try (see
/// [`take_failed_restore`]).
pub const FAILED_RESTORE_LEASE: Duration = Duration::from_secs(60);

/// Whether the caller is to restore the failed list: the marker [`Keys::failed_seeded`] is
/// missing (Redis lost its data, or the list was never restored) and the caller took it, for
/// [`FAILED_RESTORE_LEASE`]. It then reads the dead letters from Postgres and calls
/// [`restore_failed`], which sets the marker for good, or [`give_up_failed_restore`].
pub async fn take_failed_restore(conn: &mut RedisConn, keys: &Keys) -> Result<bool> {
    let taken: Option<String> = redis::cmd("SET")
        .arg(keys.failed_seeded())
        .arg("restoring")
        .arg("NX")
        .arg("EX")
        .arg(FAILED_RESTORE_LEASE.as_secs())
        .query_async(conn)
        .await?;
    Ok(taken.is_some())
}

/// Appends to the failed list the copies of `dead` (newest first) that it does not hold,
/// behind the copies pushed since it was lost, keeps it to [`FAILED_LIST_CAP`] and marks it
/// restored, atomically. Returns how many copies were put back.
pub async fn restore_failed(
    conn: &mut RedisConn,
    keys: &Keys,
    dead: &[DeadLetter],
) -> Result<usize> {
    let held: Vec<String> = redis::cmd("LRANGE")
        .arg(keys.failed())
        .arg(0)
        .arg(-1)
        .query_async(conn)
        .await?;
    let present: HashSet<TaskId> = held
        .iter()
        .filter_map(|entry| serde_json::from_str::<FailedCopy>(entry).ok())
        .map(|copy| copy.task_id)
        .collect();
    let missing: Vec<String> = dead
        .iter()
        .filter(|d| !present.contains(&d.task_id))
        .map(|d| serde_json::to_string(&FailedCopy::from(d)).expect("failed copies serialize"))
        .collect();
    let mut pipe = redis::pipe();
    pipe.atomic();
    if !missing.is_empty() {
        pipe.rpush(keys.failed(), &missing)
            .ignore()
            .ltrim(keys.failed(), 0, FAILED_LIST_CAP - 1)
            .ignore();
    }
    pipe.set(keys.failed_seeded(), "restored").ignore();
    pipe.query_async::<()>(conn).await?;
    Ok(missing.len())
}

/// Gives a restore taken with [`take_failed_restore`] up, so that the next pass tries again.
pub async fn give_up_failed_restore(conn: &mut RedisConn, keys: &Keys) -> Result<()> {
    redis::cmd("DEL")
        .arg(keys.failed_seeded())
        .query_async::<()>(conn)
        .await?;
    Ok(())
}

/// The `limit` oldest entries of the processing list (takes push on the left, so the oldest are
/// on the right), and the list's length.
pub async fn processing(
    conn: &mut RedisConn,
    keys: &Keys,
    limit: isize,
) -> Result<(Vec<String>, i64)> {
    Ok(redis::pipe()
        .cmd("LRANGE")
        .arg(keys.processing())
        .arg(-limit)
        .arg(-1)
        .llen(keys.processing())
        .query_async(conn)
        .await?)
}

/// The seeded marker and the namespace's binding after [`mark_seeded_bound`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeedMark {
    /// The marker was missing and is now set: every delivery must be published again.
    pub reseeded: bool,
    /// The marker's value (`None` only when the namespace is bound elsewhere and unmarked).
    pub epoch: Option<String>,
    /// The database the namespace is bound to; when it is not the caller's, nothing was set.
    pub bound_to: String,
}

/// Binds an unbound namespace to `binding`, then sets the seeded marker if it is missing, in one
/// atomic step; when the namespace is bound to something else it changes nothing. KEYS: seeded,
/// database; ARGV: new epoch, binding. Returns {set (0|1), epoch ('' for none), bound to}.
static MARK_SEEDED_BOUND: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        r#"
local bound = redis.call('GET', KEYS[2])
if bound and bound ~= ARGV[2] then
  return {0, redis.call('GET', KEYS[1]) or '', bound}
end
if not bound then
  redis.call('SET', KEYS[2], ARGV[2])
end
local set = redis.call('SET', KEYS[1], ARGV[1], 'NX')
return {set and 1 or 0, redis.call('GET', KEYS[1]) or '', ARGV[2]}
"#,
    )
});

/// Sets the marker that says "this Redis has been seeded from Postgres" (`SET NX`, a value
/// unique to this seeding, so a relay can tell a re-seed from the marker it saw), binding the
/// namespace to `binding` if it is unbound. A marker that was missing means Redis is new, was
/// restarted without its data, or was emptied: every delivery it held must be published again,
/// and whoever re-seeds also re-establishes the binding. A namespace bound to another database
/// is never marked seeded by this one (its own deployment must find the marker missing).
pub async fn mark_seeded_bound(
    conn: &mut RedisConn,
    keys: &Keys,
    binding: &str,
) -> Result<SeedMark> {
    let (set, epoch, bound_to): (i64, String, String) = MARK_SEEDED_BOUND
        .key(keys.seeded())
        .key(keys.database())
        .arg(Uuid::new_v4().to_string())
        .arg(binding)
        .invoke_async(conn)
        .await?;
    Ok(SeedMark {
        reseeded: set == 1,
        epoch: Some(epoch).filter(|e| !e.is_empty()),
        bound_to,
    })
}

/// Binds the namespace to `binding` if it is unbound (`SET NX`, the seeded marker untouched);
/// returns what it is bound to.
pub async fn bind(conn: &mut RedisConn, keys: &Keys, binding: &str) -> Result<String> {
    set_if_absent(conn, &keys.database(), binding).await
}

/// Moves each entry still on the processing list back to the far end of the queue. KEYS:
/// processing, tasks; ARGV: the entries. Returns how many were moved.
static REQUEUE_LAST: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        r#"
local moved = 0
for i = 1, #ARGV do
  if redis.call('LREM', KEYS[1], 1, ARGV[i]) > 0 then
    redis.call('LPUSH', KEYS[2], ARGV[i])
    moved = moved + 1
  end
end
return moved
"#,
    )
});

/// Moves deliveries from the processing list back to the far end of the queue (taken after
/// every delivery already waiting), atomically: a delivery this process cannot serve is left for
/// the deployment that can. An entry no longer on the processing list is not pushed again.
pub async fn requeue_last(conn: &mut RedisConn, keys: &Keys, raws: &[&str]) -> Result<u64> {
    if raws.is_empty() {
        return Ok(0);
    }
    let mut moved = 0;
    for (keys, group) in by_shard(keys, raws) {
        let mut script = REQUEUE_LAST.key(keys.processing());
        script.key(keys.tasks());
        for i in group {
            script.arg(raws[i]);
        }
        moved += script.invoke_async::<u64>(conn).await?;
    }
    Ok(moved)
}

/// The value of the seeded marker (`None` if missing): it changes whenever Redis is re-seeded.
pub async fn seeded_epoch(conn: &mut RedisConn, keys: &Keys) -> Result<Option<String>> {
    Ok(redis::cmd("GET")
        .arg(keys.seeded())
        .query_async(conn)
        .await?)
}

/// Records when an entry of the processing list was first seen by a rescuer; returns that time
/// (milliseconds since the epoch).
pub async fn first_seen(conn: &mut RedisConn, keys: &Keys, raw: &str, now_ms: i64) -> Result<i64> {
    let (seen,): (Option<i64>,) = redis::pipe()
        .cmd("HSETNX")
        .arg(keys.processing_seen())
        .arg(raw)
        .arg(now_ms)
        .ignore()
        .cmd("HGET")
        .arg(keys.processing_seen())
        .arg(raw)
        .query_async(conn)
        .await?;
    Ok(seen.unwrap_or(now_ms))
}

/// Forgets first-seen times of entries no longer on the processing list.
pub async fn forget_seen(conn: &mut RedisConn, keys: &Keys, raws: &[String]) -> Result<()> {
    if raws.is_empty() {
        return Ok(());
    }
    redis::cmd("HDEL")
        .arg(keys.processing_seen())
        .arg(raws)
        .query_async::<()>(conn)
        .await?;
    Ok(())
}

/// Every field of the first-seen hash.
pub async fn seen_entries(conn: &mut RedisConn, keys: &Keys) -> Result<Vec<String>> {
    Ok(redis::cmd("HKEYS")
        .arg(keys.processing_seen())
        .query_async(conn)
        .await?)
}

/// Lengths of the three lists: waiting, processing (each summed over the shards), failed.
pub async fn depths(conn: &mut RedisConn, keys: &Keys) -> Result<(i64, i64, i64)> {
    let (mut waiting, mut processing, failed): (i64, i64, i64) = redis::pipe()
        .llen(keys.tasks())
        .llen(keys.processing())
        .llen(keys.failed())
        .query_async(conn)
        .await?;
    for shard in keys.all_shards().skip(1) {
        let (w, p): (i64, i64) = redis::pipe()
            .llen(shard.tasks())
            .llen(shard.processing())
            .query_async(conn)
            .await?;
        waiting += w;
        processing += p;
    }
    Ok((waiting, processing, failed))
}

/// The oldest delivery waiting on the queue, raw (`LINDEX tasks -1`: the relays push on the
/// left and workers take from the right), or `None` when the queue is empty. Decode it with
/// [`Delivery::decode`].
pub async fn oldest_waiting(conn: &mut RedisConn, keys: &Keys) -> Result<Option<String>> {
    Ok(redis::cmd("LINDEX")
        .arg(keys.tasks())
        .arg(-1)
        .query_async(conn)
        .await?)
}

/// Puts an entry that could not be decoded on the failed list, with the reason.
pub async fn push_failed_raw(
    conn: &mut RedisConn,
    keys: &Keys,
    raw: &str,
    reason: &str,
) -> Result<()> {
    let entry =
        serde_json::json!({"raw": raw, "reason": reason, "failed_at": Utc::now()}).to_string();
    push_failed_entries(conn, keys, &[entry]).await
}

/// Moves a delivery that was taken but not started back to the right end of the queue, so it
/// is the next one taken.
pub async fn return_unstarted(conn: &mut RedisConn, keys: &Keys, raw: &str) -> Result<()> {
    let keys = keys.shard(shard_index_of(keys, raw));
    redis::pipe()
        .atomic()
        .lrem(keys.processing(), -1, raw)
        .ignore()
        .rpush(keys.tasks(), raw)
        .ignore()
        .query_async::<()>(conn)
        .await?;
    Ok(())
}

/// Announces that `process` runs `workers` workers, for `ttl`.
pub async fn worker_heartbeat(
    conn: &mut RedisConn,
    keys: &Keys,
    process: Uuid,
    workers: usize,
    ttl: Duration,
) -> Result<()> {
    let expires = Utc::now().timestamp_millis() + ttl.as_millis() as i64;
    redis::pipe()
        .atomic()
        .zadd(keys.workers(), process.to_string(), expires)
        .ignore()
        .hset(keys.worker_counts(), process.to_string(), workers)
        .ignore()
        .query_async::<()>(conn)
        .await?;
    Ok(())
}

/// Withdraws a process's heartbeat (clean stop).
pub async fn worker_heartbeat_stop(conn: &mut RedisConn, keys: &Keys, process: Uuid) -> Result<()> {
    redis::pipe()
        .atomic()
        .zrem(keys.workers(), process.to_string())
        .ignore()
        .hdel(keys.worker_counts(), process.to_string())
        .ignore()
        .query_async::<()>(conn)
        .await?;
    Ok(())
}

/// Workers of every process whose heartbeat has not expired (expired ones are pruned).
pub async fn live_workers(conn: &mut RedisConn, keys: &Keys) -> Result<i64> {
    Ok(live_processes(conn, keys).await?.iter().map(|p| p.1).sum())
}

/// Removes the heartbeats that expired by ARGV[1] (ms) and returns the workers per live process.
/// KEYS: workers (sorted set), worker counts (hash). One script, so a heartbeat renewed while
/// the expired ones are pruned is never removed with them.
static LIVE_PROCESSES: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        r#"
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
for i = 1, #expired do
  redis.call('ZREM', KEYS[1], expired[i])
  redis.call('HDEL', KEYS[2], expired[i])
end
return redis.call('HGETALL', KEYS[2])
"#,
    )
});

/// Each live worker process (its id) with its number of workers; expired heartbeats are pruned.
pub async fn live_processes(conn: &mut RedisConn, keys: &Keys) -> Result<Vec<(String, i64)>> {
    let now = Utc::now().timestamp_millis();
    let mut counts: Vec<(String, i64)> = LIVE_PROCESSES
        .key(keys.workers())
        .key(keys.worker_counts())
        .arg(now)
        .invoke_async(conn)
        .await?;
    counts.sort();
    Ok(counts)
}
