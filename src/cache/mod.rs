//! Cache-aside over Redis for the clinic's hot reads: `get`, `set`, `delete`, `exists`,
//! `delete_pattern` and `get_or_set`, under a configurable key prefix.
//!
//! `get_or_set` never lets the cache fail a read: Redis down, a value that no longer decodes or a
//! failed write all fall back to the loader's value (the problem is logged and counted). Misses
//! are single-flight: concurrent misses on one key in a process call the loader once, and a short
//! Redis lock (`SET NX PX`) keeps other processes from loading the same key at the same time.

pub mod keys;

use rand::Rng;
use redis::aio::ConnectionManager;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
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
        base + rand::thread_rng().gen_range(0..=base / 20)
    }
}

/// Cache counters (totals; per key family in [`CacheStats::by_family`]).
#[derive(Debug, Default)]
pub struct CacheStats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub errors: AtomicU64,
    pub loads: AtomicU64,
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

/// How long a process waits for another process's load before loading itself.
const LOCK_WAIT: Duration = Duration::from_millis(1000);
/// How long the cross-process load lock lives (a crashed loader frees it after this).
const LOCK_TTL_MS: u64 = 5000;

/// The cache service.
#[derive(Clone)]
pub struct Cache {
    conn: ConnectionManager,
    prefix: String,
    flights: Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
    pub stats: Arc<CacheStats>,
}

impl Cache {
    /// A cache whose keys all start with `{prefix}:cache:`.
    pub fn new(conn: ConnectionManager, prefix: &str) -> Cache {
        Cache {
            conn,
            prefix: format!("{prefix}:cache:"),
            flights: Arc::default(),
            stats: Arc::default(),
        }
    }

    fn full(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
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

    pub async fn delete(&self, key: &str) -> Result<bool> {
        let mut c = self.conn.clone();
        let n: i64 = redis::cmd("UNLINK")
            .arg(self.full(key))
            .query_async(&mut c)
            .await?;
        Ok(n > 0)
    }

    pub async fn exists(&self, key: &str) -> Result<bool> {
        let mut c = self.conn.clone();
        let n: i64 = redis::cmd("EXISTS")
            .arg(self.full(key))
            .query_async(&mut c)
            .await?;
        Ok(n > 0)
    }

    /// Deletes every key matching the glob (e.g. `client:*`), with `SCAN` and batched `UNLINK`
    /// (never `KEYS`, which blocks Redis). Returns how many were deleted.
    pub async fn delete_pattern(&self, glob: &str) -> Result<u64> {
        let mut c = self.conn.clone();
        let pattern = self.full(glob);
        let mut cursor: u64 = 0;
        let mut deleted = 0u64;
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut c)
                .await?;
            if !batch.is_empty() {
                let n: u64 = redis::cmd("UNLINK").arg(&batch).query_async(&mut c).await?;
                deleted += n;
            }
            if next == 0 {
                return Ok(deleted);
            }
            cursor = next;
        }
    }

    /// The cached value, or the loader's (then cached for `ttl`). Cache problems never fail the
    /// read; only the loader's own error is returned.
    pub async fn get_or_set<T, E, F, Fut>(&self, key: &str, ttl: Ttl, loader: F) -> Result<T, E>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        match self.get::<T>(key).await {
            Ok(Some(v)) => {
                self.stats.count(key, 0, 1);
                return Ok(v);
            }
            Ok(None) => {}
            Err(CacheError::Decode(e)) => {
                tracing::warn!(cache.family = keys::family(key), error = %e, "cached value does not decode; replacing it");
                self.stats.count(key, 2, 1);
            }
            Err(e) => {
                tracing::warn!(cache.family = keys::family(key), error = %e, "cache unavailable; loading directly");
                self.stats.count(key, 2, 1);
                return self.load(key, loader).await;
            }
        }
        self.stats.count(key, 1, 1);

        // one load per key and process at a time
        let flight = {
            let mut flights = self.flights.lock().expect("cache flights");
            flights.entry(key.to_owned()).or_default().clone()
        };
        let _guard = flight.lock().await;
        if let Ok(Some(v)) = self.get::<T>(key).await {
            return Ok(v);
        }
        let value = self.load_across_processes(key, loader).await?;
        drop(_guard);
        {
            // forget the flight once nobody else waits on it
            let mut flights = self.flights.lock().expect("cache flights");
            if flights.get(key).is_some_and(|f| Arc::strong_count(f) <= 2) {
                flights.remove(key);
            }
        }
        if let Err(e) = self.set(key, &value, ttl).await {
            tracing::warn!(cache.family = keys::family(key), error = %e, "cache write failed; returning the loaded value");
            self.stats.count(key, 2, 1);
        }
        Ok(value)
    }

    async fn load_across_processes<T, E, F, Fut>(&self, key: &str, loader: F) -> Result<T, E>
    where
        T: DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let lock = self.full(&format!("lock:{key}"));
        let mut c = self.conn.clone();
        let acquired: Option<String> = redis::cmd("SET")
            .arg(&lock)
            .arg(std::process::id())
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
            if let Err(e) = redis::cmd("DEL").arg(&lock).query_async::<()>(&mut c).await {
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
