//! Every Redis key Arnela uses, built from one configurable prefix.
//!
//! With the default prefix `arnela` the names are the ones operators already know:
//! `arnela:tasks` (waiting deliveries, FIFO: pushed on the left, taken from the right),
//! `arnela:tasks:processing` (deliveries a worker has taken and not yet acknowledged) and
//! `arnela:tasks:failed` (copies of dead-lettered tasks, newest first, capped).
//!
//! **Hash tags.** On a Redis Cluster the keys one command or script uses together must hash to
//! one slot. A prefix with a hash tag (`{arnela}`, which `REDIS_CLUSTER=true` makes of a prefix
//! without one) gives every key the slot of its tag: `{arnela}:tasks`, `{arnela}:cache:...`.
//!
//! **Queue shards** (`QUEUE_SHARDS`, default 1). With more than one, each task's deliveries go to
//! the shard of its id ([`Keys::shard_of`]), and each shard has its own waiting list, processing
//! list, transit set and first-seen hash. Shard 0 keeps the names above; shard `k` replaces the
//! hash tag `{T}` by `{T-k}` (or the prefix `P` by `P-k` when there is no tag), with a suffix
//! `.j` added when needed so that shard `k`'s slot lies `k` N-ths of the slot range after shard
//! 0's: on a cluster whose masters hold equal ranges (as `redis-cli --cluster create` makes
//! them), the shards land on different masters. Everything else (failed list, seeded marker,
//! binding, worker registry, cache) stays under the prefix itself.

use crate::domain::TaskId;

/// The number of hash slots of a Redis Cluster.
pub const SLOTS: u16 = 16384;

/// The key names under one prefix, pointing at one queue shard (shard 0 unless taken from
/// [`Keys::shard`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
    /// The queue keys' prefix of this shard (`prefix` for shard 0).
    queue: String,
    shard: usize,
    shards: usize,
}

impl Keys {
    pub fn new(prefix: impl Into<String>) -> Keys {
        let prefix = prefix.into();
        Keys {
            queue: prefix.clone(),
            prefix,
            shard: 0,
            shards: 1,
        }
    }

    /// The same names with `shards` queue shards (at least 1).
    pub fn with_shards(mut self, shards: usize) -> Keys {
        self.shards = shards.max(1);
        self.shard(0)
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// How many queue shards there are.
    pub fn shards(&self) -> usize {
        self.shards
    }

    /// Which shard these keys point at.
    pub fn shard_index(&self) -> usize {
        self.shard
    }

    /// The keys of shard `k` (modulo the number of shards).
    pub fn shard(&self, k: usize) -> Keys {
        let k = k % self.shards;
        Keys {
            queue: shard_prefix(&self.prefix, k, self.shards),
            prefix: self.prefix.clone(),
            shard: k,
            shards: self.shards,
        }
    }

    /// Every shard's keys, shard 0 first.
    pub fn all_shards(&self) -> impl Iterator<Item = Keys> + '_ {
        (0..self.shards).map(|k| self.shard(k))
    }

    /// The shard a task's deliveries travel on: a hash of its id (stable across processes and
    /// builds).
    pub fn shard_of(&self, task: TaskId) -> usize {
        if self.shards == 1 {
            return 0;
        }
        (crc16(task.to_string().as_bytes()) as usize) % self.shards
    }

    /// The keys of the shard a task's deliveries travel on.
    pub fn for_task(&self, task: TaskId) -> Keys {
        self.shard(self.shard_of(task))
    }

    /// The hash slot every key of this shard's queue maps to on a cluster.
    pub fn queue_slot(&self) -> u16 {
        key_slot(&self.queue)
    }

    /// The hash slot of the keys under the prefix itself (cache, registry, markers).
    pub fn slot(&self) -> u16 {
        key_slot(&self.prefix)
    }

    /// Deliveries waiting for a worker.
    pub fn tasks(&self) -> String {
        format!("{}:tasks", self.queue)
    }

    /// Deliveries taken by a worker and not yet acknowledged.
    pub fn processing(&self) -> String {
        format!("{}:tasks:processing", self.queue)
    }

    /// Copies of dead-lettered tasks for operators.
    pub fn failed(&self) -> String {
        format!("{}:tasks:failed", self.prefix)
    }

    /// Marker set once the failed list holds the copies of the tasks Postgres says are
    /// dead-lettered; its absence means Redis lost its data (or never had the list).
    pub fn failed_seeded(&self) -> String {
        format!("{}:tasks:failed:seeded", self.prefix)
    }

    /// The copies already pushed onto the failed list (a sorted set of [`FailedCopy::member`]s
    /// by their dead-lettering time, the newest [`FAILED_LIST_CAP`] kept), so that a copy
    /// pushed again is not listed twice.
    ///
    /// [`FailedCopy::member`]: super::FailedCopy::member
    /// [`FAILED_LIST_CAP`]: super::FAILED_LIST_CAP
    pub fn failed_pushed(&self) -> String {
        format!("{}:tasks:failed:pushed", self.prefix)
    }

    /// Marker set once Redis holds every delivery Postgres says it should; its absence means
    /// Redis lost its data.
    pub fn seeded(&self) -> String {
        format!("{}:tasks:seeded", self.prefix)
    }

    /// Every delivery published and not yet acknowledged (set of entries), waiting or taken:
    /// what Redis holds of the deliveries Postgres says are in transit. A published delivery
    /// missing from it was lost (see [`crate::rescuer`]).
    pub fn transit(&self) -> String {
        format!("{}:tasks:transit", self.queue)
    }

    /// Which database this namespace serves (string: JSON `{"system_identifier","database"}`),
    /// set with `SET NX` by the first process to start or to re-seed an emptied Redis. A process
    /// connected to another database refuses to use the namespace (see [`crate::binding`]).
    pub fn database(&self) -> String {
        format!("{}:tasks:database", self.prefix)
    }

    /// How many queue shards the namespace's processes use (string), set with `SET NX` by the
    /// first process to start; a process with another `QUEUE_SHARDS` refuses to start.
    pub fn shard_count(&self) -> String {
        format!("{}:tasks:shards", self.prefix)
    }

    /// When the rescuer first saw each processing entry (hash: entry → epoch ms).
    pub fn processing_seen(&self) -> String {
        format!("{}:tasks:processing:seen", self.queue)
    }

    /// Live worker processes (sorted set: process id → heartbeat expiry, epoch ms).
    pub fn workers(&self) -> String {
        format!("{}:workers", self.prefix)
    }

    /// Workers per live process (hash: process id → worker count).
    pub fn worker_counts(&self) -> String {
        format!("{}:workers:count", self.prefix)
    }

    /// What every cached value's key starts with (the cache adds its own key, see
    /// [`crate::cache::keys`]).
    pub fn cache_prefix(&self) -> String {
        format!("{}:cache:", self.prefix)
    }

    /// What the generation of a cache key starts with (the guarded writes).
    pub fn cache_generation_prefix(&self) -> String {
        format!("{}:cache-gen:", self.prefix)
    }

    /// The channel cache invalidations are published on.
    pub fn cache_invalidations(&self) -> String {
        format!("{}:cache:invalidations", self.prefix)
    }
}

impl Default for Keys {
    fn default() -> Self {
        Keys::new("arnela")
    }
}

/// The hash tag of a key (what Redis Cluster hashes): the part between the first `{` and the
/// next `}`, when not empty; otherwise the whole key.
pub fn hash_tag(key: &str) -> &str {
    if let Some(open) = key.find('{') {
        if let Some(len) = key[open + 1..].find('}') {
            if len > 0 {
                return &key[open + 1..open + 1 + len];
            }
        }
    }
    key
}

/// The cluster hash slot of a key (CRC16-XMODEM of its hash tag, modulo 16384).
pub fn key_slot(key: &str) -> u16 {
    crc16(hash_tag(key).as_bytes()) % SLOTS
}

/// CRC16-CCITT (XMODEM), the checksum Redis Cluster uses.
fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in bytes {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The prefix wrapped in a hash tag (`arnela` → `{arnela}`), unless it has one already.
pub fn tagged(prefix: &str) -> String {
    if hash_tag(prefix) != prefix {
        prefix.to_owned()
    } else {
        format!("{{{prefix}}}")
    }
}

/// The queue keys' prefix of shard `k` of `shards` (see the module's documentation).
fn shard_prefix(prefix: &str, k: usize, shards: usize) -> String {
    if k == 0 {
        return prefix.to_owned();
    }
    let tag = hash_tag(prefix);
    let has_tag = tag != prefix;
    let rename = |inner: &str| {
        if has_tag {
            prefix.replacen(&format!("{{{tag}}}"), &format!("{{{inner}}}"), 1)
        } else {
            inner.to_owned()
        }
    };
    let width = u32::from(SLOTS) / shards as u32;
    let base = (u32::from(key_slot(prefix)) / width.max(1)).min(shards as u32 - 1);
    let wanted = (base + k as u32) % shards as u32;
    let mut candidate = format!("{tag}-{k}");
    for j in 1..10_000u32 {
        let slot = u32::from(key_slot(&candidate));
        if (slot / width.max(1)).min(shards as u32 - 1) == wanted {
            break;
        }
        candidate = format!("{tag}-{k}.{j}");
    }
    rename(&candidate)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_names_are_the_ones_operators_know() {
        let k = Keys::default();
        assert_eq!(k.tasks(), "arnela:tasks");
        assert_eq!(k.processing(), "arnela:tasks:processing");
        assert_eq!(k.failed(), "arnela:tasks:failed");
        assert_eq!(k.failed_seeded(), "arnela:tasks:failed:seeded");
        assert_eq!(k.failed_pushed(), "arnela:tasks:failed:pushed");
        assert_eq!(k.database(), "arnela:tasks:database");
        assert_eq!(Keys::new("t1").tasks(), "t1:tasks");
    }

    #[test]
    fn slots_are_the_ones_redis_computes() {
        // values from CLUSTER KEYSLOT
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(key_slot("foo"), 12182);
        assert_eq!(key_slot("{foo}bar"), 12182);
        assert_eq!(key_slot("{}foo"), key_slot("{}foo"));
        assert_eq!(hash_tag("{}foo"), "{}foo");
        assert_eq!(tagged("arnela"), "{arnela}");
        assert_eq!(tagged("{arnela}"), "{arnela}");
        assert_eq!(tagged("app:{x}"), "app:{x}");
        // an empty tag is no tag: Redis hashes the whole key
        assert_ne!(hash_tag(&tagged("{}")), "{}");
    }

    #[test]
    fn shard_keys_share_a_slot_and_spread_over_the_slot_range() {
        let keys = Keys::new(tagged("arnela")).with_shards(3);
        assert_eq!(keys.tasks(), "{arnela}:tasks", "shard 0 keeps the names");
        let mut thirds = Vec::new();
        for shard in keys.all_shards() {
            let slot = shard.queue_slot();
            for k in [
                shard.tasks(),
                shard.processing(),
                shard.transit(),
                shard.processing_seen(),
            ] {
                assert_eq!(key_slot(&k), slot, "{k}");
            }
            assert_eq!(shard.failed(), "{arnela}:tasks:failed", "not sharded");
            thirds.push((slot / (SLOTS / 3)).min(2));
        }
        thirds.sort();
        thirds.dedup();
        assert_eq!(thirds.len(), 3, "one shard in each third of the slots");
        assert!(keys.shard(1).tasks().starts_with("{arnela-1"));
        // without a tag (one Redis): plain names
        let plain = Keys::new("arnela").with_shards(2);
        assert!(plain.shard(1).tasks().starts_with("arnela-1"));
        // every task has one shard, the same in every process
        let id = TaskId::new();
        assert_eq!(keys.shard_of(id), keys.shard_of(id));
        assert_eq!(Keys::new("x").shard_of(id), 0);
    }
}
