//! Cache-aside over Redis for the clinic's hot reads: `get`, `set`, `delete`, `exists`,
//! `delete_pattern` and `get_or_set`, under a configurable key prefix.
//!
//! `get_or_set` never lets the cache fail a read: Redis down, a value that no longer decodes or a
//! failed write all fall back to the loader's value (the problem is logged and counted). Misses
//! are single-flight: concurrent misses on one key in a process call the loader once, and a short
//! Redis lock (`SET NX PX`) keeps other processes from loading the same key at the same time.
//!
//! **No stale value survives an invalidation.** A load on a miss first makes sure the key has a
//! generation: a random token, created if missing (`SET NX`, with the generation TTL). Deleting a
//! key ([`Cache::delete`], [`Cache::invalidate`]) deletes its generation with it (a pattern delete
//! bumps one epoch for the whole cache). `get_or_set` writes the loaded value only if the key
//! still has the generation the load began with and the epoch did not move meanwhile (one Lua
//! script). A loader that read the old data before a write committed can therefore not put it
//! back after the invalidation that followed the write: its value is returned to its caller but
//! not cached.
//!
//! Only loads create generations. An invalidation of a key nobody read (the common case: the
//! projector invalidates every task's own key at each of its events) leaves nothing behind in
//! Redis and costs two `UNLINK` arguments, sent with the batch's other keys in one round trip.

pub mod invalidation;
pub mod keys;

use crate::queue::RedisConn;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

/// Errors of the explicit cache operations (`get_or_set` absorbs them).
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("redis error: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("cached value does not decode: {0}")]
    Decode(#[from] serde_json::Error),
}

pub type Result<T, E = CacheError> = std::result::Result<T, E>;

/// TTL tiers. Each set adds up to 5% of jitter so keys written together do not expire together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ttl {
    /// 5 minutes: data that changes often.
    Short,
    /// 15 minutes.
    Medium,
    /// 1 hour.
    Long,
    /// 24 hours: data that rarely changes.
    Day,
}

impl Ttl {
    pub fn base(self) -> Duration {
        Duration::from_secs(match self {
            Ttl::Short => 5 * 60,
            Ttl::Medium => 15 * 60,
            Ttl::Long => 60 * 60,
            Ttl::Day => 24 * 60 * 60,
        })
    }

    fn jittered_ms(self) -> u64 {
        let base = self.base().as_millis() as u64;
        base + rand::random_range(0..=base / 20)
    }
}

/// Cache counters (totals; per key family in [`CacheStats::by_family`]).
#[derive(Debug, Default)]
pub struct CacheStats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub errors: AtomicU64,
    pub loads: AtomicU64,
    /// Passes over the keyspace for invalidation patterns (one per projector batch that has any).
    pub pattern_passes: AtomicU64,
    /// family → (hits, misses, errors, load time in µs)
    pub by_family: Mutex<HashMap<&'static str, [u64; 4]>>,
}

impl CacheStats {
    fn count(&self, key: &str, slot: usize, amount: u64) {
        let total = match slot {
            0 => &self.hits,
            1 => &self.misses,
            2 => &self.errors,
            _ => &self.loads,
        };
        total.fetch_add(if slot == 3 { 1 } else { amount }, Ordering::Relaxed);
        let mut map = self.by_family.lock().expect("cache stats");
        map.entry(keys::family(key)).or_default()[slot] += amount;
    }
}

/// Most distinct globs matched key by key in one pass; beyond it they are widened to families.
pub const MAX_PATTERNS_PER_PASS: usize = 256;

/// The globs deduplicated, and widened to their key families when more than
/// [`MAX_PATTERNS_PER_PASS`] remain (`appointments:client:42:*` to `appointments:client:*`).
pub fn coalesce<S: AsRef<str>>(globs: &[S]) -> Vec<String> {
    let mut out: Vec<String> = globs.iter().map(|g| g.as_ref().to_owned()).collect();
    out.sort();
    out.dedup();
    if out.len() <= MAX_PATTERNS_PER_PASS {
        return out;
    }
    let mut wide: Vec<String> = out
        .iter()
        .map(|g| match keys::pattern_family(g) {
            Some(f) => format!("{f}*"),
            // not a declared family (enqueue refuses those): widen to its literal start
            None => {
                let literal = g.find(['*', '?', '[', '\\']).unwrap_or(g.len());
                format!("{}*", &g[..literal])
            }
        })
        .collect();
    wide.sort();
    wide.dedup();
    wide
}

/// How long a key's generation (and the cache epoch) lives: far longer than any load. A load
/// that outlasts its generation only leaves its value uncached.
const GENERATION_TTL_MS: u64 = 60 * 60 * 1000;

/// The key's generation, created as ARGV[1] (with ARGV[2] ms to live) when it has none.
/// KEYS: generation.
static GENERATION: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
local generation = redis.call('GET', KEYS[1])
if generation then
  return generation
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return ARGV[1]
"#,
    )
});

/// Sets a value only if the key's generation and the cache epoch are still what the loader saw.
/// KEYS: value, generation, epoch; ARGV: seen generation, seen epoch ('' for none), value, ttl ms.
static SET_IF_GENERATION: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
local generation = redis.call('GET', KEYS[2]) or ''
local epoch = redis.call('GET', KEYS[3]) or ''
if generation ~= ARGV[1] or epoch ~= ARGV[2] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4])
return 1
"#,
    )
});

/// Deletes the load lock only if it still holds this loader's token. KEYS: lock; ARGV: token.
static RELEASE_LOCK: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#,
    )
});

/// Removes a key's flight from the map when dropped, unless another reader still waits on it.
struct ForgetFlight<'a> {
    flights: &'a Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    key: &'a str,
    flight: &'a Arc<tokio::sync::Mutex<()>>,
}

impl Drop for ForgetFlight<'_> {
    fn drop(&mut self) {
        let mut flights = self.flights.lock().expect("cache flights");
        // the map's reference and this reader's: nobody else waits
        if flights
            .get(self.key)
            .is_some_and(|f| Arc::ptr_eq(f, self.flight) && Arc::strong_count(f) <= 2)
        {
            flights.remove(self.key);
        }
    }
}

/// The generation of a key and the cache epoch as a load found them.
#[derive(Debug, Clone, Default)]
struct Generation {
    generation: Option<String>,
    epoch: Option<String>,
}

/// What one invalidation dropped, as published on the invalidation channel.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Invalidation {
    /// Exact keys (without the cache prefix).
    pub keys: Vec<String>,
    /// Glob patterns (without the cache prefix).
    pub patterns: Vec<String>,
    /// The last event position this invalidation covers, when it came from the event log.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub position: Option<i64>,
}

/// How long a process waits for another process's load before loading itself.
const LOCK_WAIT: Duration = Duration::from_millis(1000);
/// How long the cross-process load lock lives (a crashed loader frees it after this).
const LOCK_TTL_MS: u64 = 5000;

/// The cache service.
#[derive(Clone)]
pub struct Cache {
    conn: RedisConn,
    prefix: String,
    /// The cluster slot of every cache key (their common hash tag).
    slot: u16,
    /// `{prefix}:cache-gen:`: the keys' generations, outside the namespace patterns match.
    gen_prefix: String,
    /// `{prefix}:cache:invalidations`: where invalidations are published.
    channel: String,
    flights: Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
    pub stats: Arc<CacheStats>,
}

impl Cache {
    /// A cache whose keys all start with `{prefix}:cache:` (see [`crate::queue::Keys`]).
    pub fn new(conn: RedisConn, prefix: &str) -> Cache {
        let keys = crate::queue::Keys::new(prefix);
        Cache {
            conn,
            slot: keys.slot(),
            prefix: keys.cache_prefix(),
            gen_prefix: keys.cache_generation_prefix(),
            channel: keys.cache_invalidations(),
            flights: Arc::default(),
            stats: Arc::default(),
        }
    }

    fn full(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    fn generation(&self, key: &str) -> String {
        format!("{}{key}", self.gen_prefix)
    }

    fn epoch(&self) -> String {
        format!("{}*epoch", self.gen_prefix)
    }

    /// Keys with a load in progress in this process (single-flight entries).
    pub fn loads_in_flight(&self) -> usize {
        self.flights.lock().expect("cache flights").len()
    }

    /// The Redis channel invalidations are published on (`{prefix}:cache:invalidations`).
    pub fn channel(&self) -> &str {
        &self.channel
    }

    pub async fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        let mut c = self.conn.clone();
        let raw: Option<String> = redis::cmd("GET")
            .arg(self.full(key))
            .query_async(&mut c)
            .await?;
        Ok(match raw {
            Some(s) => Some(serde_json::from_str(&s)?),
            None => None,
        })
    }

    pub async fn set<T: Serialize>(&self, key: &str, value: &T, ttl: Ttl) -> Result<()> {
        let mut c = self.conn.clone();
        let encoded = serde_json::to_string(value)?;
        redis::cmd("SET")
            .arg(self.full(key))
            .arg(encoded)
            .arg("PX")
            .arg(ttl.jittered_ms())
            .query_async::<()>(&mut c)
            .await?;
        Ok(())
    }

    /// Deletes the key and its generation (see the module docs); true if it existed.
    pub async fn delete(&self, key: &str) -> Result<bool> {
        Ok(self.delete_keys(&[key]).await? > 0)
    }

    /// Deletes the keys and their generations (a load under way then caches nothing), 500 keys
    /// to a round trip; returns how many values existed. Every cache key shares the prefix's hash
    /// tag, so one `UNLINK` may name many of them on a cluster too.
    ///
    /// The generations go first: the pipeline is not atomic, and a load that finished between
    /// the two commands could otherwise write its old value after the values' `UNLINK` and
    /// before the generations'. In this order such a write either fails its generation check
    /// or is deleted by the values' `UNLINK`.
    pub async fn delete_keys<S: AsRef<str>>(&self, keys: &[S]) -> Result<u64> {
        let mut deleted = 0;
        for chunk in keys.chunks(500) {
            let mut values = redis::cmd("UNLINK");
            let mut generations = redis::cmd("UNLINK");
            for key in chunk {
                values.arg(self.full(key.as_ref()));
                generations.arg(self.generation(key.as_ref()));
            }
            let mut c = self.conn.clone();
            let (_, n): (u64, u64) = redis::pipe()
                .add_command(generations)
                .add_command(values)
                .query_async(&mut c)
                .await?;
            deleted += n;
        }
        Ok(deleted)
    }

    /// Deletes `keys` and every key matching one of `patterns`, then publishes what was
    /// invalidated on [`Cache::channel`] (a JSON [`Invalidation`]) so other services can drop
    /// local copies. Returns how many keys existed.
    pub async fn invalidate(&self, inv: &Invalidation) -> Result<u64> {
        if inv.keys.is_empty() && inv.patterns.is_empty() {
            return Ok(0);
        }
        let mut deleted = self.delete_keys(&inv.keys).await?;
        // what is deleted and published: the patterns deduplicated, widened beyond the bound
        let patterns = coalesce(&inv.patterns);
        if !patterns.is_empty() {
            deleted += self.delete_patterns(&patterns).await?;
        }
        let message = serde_json::to_string(&Invalidation {
            keys: inv.keys.clone(),
            patterns,
            position: inv.position,
        })?;
        let mut c = self.conn.clone();
        redis::cmd("PUBLISH")
            .arg(&self.channel)
            .arg(message)
            .query_async::<()>(&mut c)
            .await?;
        Ok(deleted)
    }

    pub async fn exists(&self, key: &str) -> Result<bool> {
        let mut c = self.conn.clone();
        let n: i64 = redis::cmd("EXISTS")
            .arg(self.full(key))
            .query_async(&mut c)
            .await?;
        Ok(n > 0)
    }

    /// Deletes every key matching any of the globs in one pass over the keyspace, whatever
    /// their number: one epoch bump and one `SCAN` of the cache's keys, each key matched against
    /// every glob here. More than [`MAX_PATTERNS_PER_PASS`] globs are first widened to their key
    /// families (`appointments:client:42:*` to `appointments:client:*`), so the work per pass
    /// stays bounded. Returns how many keys were deleted.
    pub async fn delete_patterns<S: AsRef<str>>(&self, globs: &[S]) -> Result<u64> {
        let globs = coalesce(globs);
        self.stats.pattern_passes.fetch_add(1, Ordering::Relaxed);
        let mut c = self.conn.clone();
        redis::pipe()
            .incr(self.epoch(), 1)
            .ignore()
            .pexpire(self.epoch(), GENERATION_TTL_MS as i64)
            .ignore()
            .query_async::<()>(&mut c)
            .await?;
        let all = format!("{}*", self.prefix);
        let mut cursor: u64 = 0;
        let mut deleted = 0u64;
        loop {
            let mut scan = redis::cmd("SCAN");
            scan.arg(cursor)
                .arg("MATCH")
                .arg(&all)
                .arg("COUNT")
                .arg(1000);
            // on a cluster every cache key has the prefix's hash tag: its master holds them all
            let (next, batch): (u64, Vec<String>) = c.query_on_slot(scan, self.slot).await?;
            let doomed: Vec<&String> = batch
                .iter()
                .filter(|k| {
                    k.strip_prefix(self.prefix.as_str())
                        .is_some_and(|key| globs.iter().any(|g| keys::glob_matches(g, key)))
                })
                .collect();
            if !doomed.is_empty() {
                let n: u64 = redis::cmd("UNLINK")
                    .arg(&doomed)
                    .query_async(&mut c)
                    .await?;
                deleted += n;
            }
            if next == 0 {
                return Ok(deleted);
            }
            cursor = next;
        }
    }

    /// Deletes every key matching the glob (e.g. `client:*`): [`Cache::delete_patterns`] with
    /// one glob (`SCAN` and batched `UNLINK`, never `KEYS`; the epoch bumped first, so no load
    /// that started before the delete can write back a removed value). Returns how many were
    /// deleted.
    pub async fn delete_pattern(&self, glob: &str) -> Result<u64> {
        self.delete_patterns(&[glob]).await
    }

    /// The cached value, or the loader's (then cached for `ttl`). Cache problems never fail the
    /// read; only the loader's own error is returned.
    pub async fn get_or_set<T, E, F, Fut>(&self, key: &str, ttl: Ttl, loader: F) -> Result<T, E>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let guard = match self.read_guarded(key).await {
            Ok((Some(raw), guard)) => match serde_json::from_str::<T>(&raw) {
                Ok(v) => {
                    self.stats.count(key, 0, 1);
                    return Ok(v);
                }
                Err(e) => {
                    tracing::warn!(cache.family = keys::family(key), error = %e, "cached value does not decode; replacing it");
                    self.stats.count(key, 2, 1);
                    guard
                }
            },
            Ok((None, guard)) => guard,
            Err(e) => {
                tracing::warn!(cache.family = keys::family(key), error = %e, "cache unavailable; loading directly");
                self.stats.count(key, 2, 1);
                return self.load(key, loader).await;
            }
        };
        self.stats.count(key, 1, 1);
        let guard = match guard.generation {
            Some(_) => guard,
            None => match self.create_generation(key).await {
                Ok(generation) => Generation {
                    generation: Some(generation),
                    ..guard
                },
                Err(e) => {
                    tracing::warn!(cache.family = keys::family(key), error = %e, "cache unavailable; loading directly");
                    self.stats.count(key, 2, 1);
                    return self.load(key, loader).await;
                }
            },
        };

        // one load per key and process at a time
        let flight = {
            let mut flights = self.flights.lock().expect("cache flights");
            flights.entry(key.to_owned()).or_default().clone()
        };
        // forgets the flight on every way out (value, loader error, cancelled request) once
        // nobody else waits on it
        let _forget = ForgetFlight {
            flights: &self.flights,
            key,
            flight: &flight,
        };
        let _guard = flight.lock().await;
        if let Ok(Some(v)) = self.get::<T>(key).await {
            return Ok(v);
        }
        let value = self.load_across_processes(key, loader).await?;
        // write before letting the waiting readers in, so they find the value
        match self.set_guarded(key, &value, ttl, &guard).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::debug!(
                    cache.family = keys::family(key),
                    "key invalidated while loading; the loaded value is not cached"
                );
            }
            Err(e) => {
                tracing::warn!(cache.family = keys::family(key), error = %e, "cache write failed; returning the loaded value");
                self.stats.count(key, 2, 1);
            }
        }
        Ok(value)
    }

    /// The raw value with the key's generation and the cache epoch, in one round trip.
    async fn read_guarded(&self, key: &str) -> Result<(Option<String>, Generation)> {
        let mut c = self.conn.clone();
        let (raw, generation, epoch): (Option<String>, Option<String>, Option<String>) =
            redis::cmd("MGET")
                .arg(self.full(key))
                .arg(self.generation(key))
                .arg(self.epoch())
                .query_async(&mut c)
                .await?;
        Ok((raw, Generation { generation, epoch }))
    }

    /// The key's generation, a new random one if it has none.
    async fn create_generation(&self, key: &str) -> Result<String> {
        let mut c = self.conn.clone();
        Ok(GENERATION
            .key(self.generation(key))
            // a number, so that a process of an earlier version, whose invalidation `INCR`s the
            // generation, can still invalidate the key during a rolling upgrade
            .arg(rand::random_range(1..i64::MAX).to_string())
            .arg(GENERATION_TTL_MS)
            .invoke_async(&mut c)
            .await?)
    }

    /// Sets the value unless the key was invalidated since `seen` was read; true if set.
    async fn set_guarded<T: Serialize>(
        &self,
        key: &str,
        value: &T,
        ttl: Ttl,
        seen: &Generation,
    ) -> Result<bool> {
        let encoded = serde_json::to_string(value)?;
        let mut c = self.conn.clone();
        let set: i64 = SET_IF_GENERATION
            .key(self.full(key))
            .key(self.generation(key))
            .key(self.epoch())
            .arg(seen.generation.as_deref().unwrap_or(""))
            .arg(seen.epoch.as_deref().unwrap_or(""))
            .arg(encoded)
            .arg(ttl.jittered_ms())
            .invoke_async(&mut c)
            .await?;
        Ok(set == 1)
    }

    async fn load_across_processes<T, E, F, Fut>(&self, key: &str, loader: F) -> Result<T, E>
    where
        T: DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let lock = self.full(&format!("lock:{key}"));
        let mut c = self.conn.clone();
        let token = uuid::Uuid::new_v4().to_string();
        let acquired: Option<String> = redis::cmd("SET")
            .arg(&lock)
            .arg(&token)
            .arg("NX")
            .arg("PX")
            .arg(LOCK_TTL_MS)
            .query_async(&mut c)
            .await
            .unwrap_or_else(|e| {
                tracing::warn!(error = %e, "cache lock unavailable");
                // as if acquired: load without coordination
                Some("OK".into())
            });
        if acquired.is_none() {
            // another process is loading: wait for its value for a short while
            let deadline = tokio::time::Instant::now() + LOCK_WAIT;
            while tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(25)).await;
                if let Ok(Some(v)) = self.get::<T>(key).await {
                    return Ok(v);
                }
            }
        }
        let value = self.load(key, loader).await;
        if acquired.is_some() {
            // only our own lock: after LOCK_TTL_MS another process may hold it
            let released = RELEASE_LOCK
                .key(&lock)
                .arg(&token)
                .invoke_async::<i64>(&mut c)
                .await;
            if let Err(e) = released {
                tracing::warn!(error = %e, "cannot release the cache lock (it expires by itself)");
            }
        }
        value
    }

    async fn load<T, E, F, Fut>(&self, key: &str, loader: F) -> Result<T, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let started = std::time::Instant::now();
        let value = loader().await;
        self.stats
            .count(key, 3, started.elapsed().as_micros() as u64);
        value
    }
}
