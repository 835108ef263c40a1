//! Every Redis key Arnela uses, built from one configurable prefix.
//!
//! With the default prefix `arnela` the names are the ones operators already know:
//! `arnela:tasks` (waiting deliveries, FIFO: pushed on the left, taken from the right),
//! `arnela:tasks:processing` (deliveries a worker has taken and not yet acknowledged) and
//! `arnela:tasks:failed` (copies of dead-lettered tasks, newest first, capped).

/// The key names under one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: impl Into<String>) -> Keys {
        Keys {
            prefix: prefix.into(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Deliveries waiting for a worker.
    pub fn tasks(&self) -> String {
        format!("{}:tasks", self.prefix)
    }

    /// Deliveries taken by a worker and not yet acknowledged.
    pub fn processing(&self) -> String {
        format!("{}:tasks:processing", self.prefix)
    }

    /// Copies of dead-lettered tasks for operators.
    pub fn failed(&self) -> String {
        format!("{}:tasks:failed", self.prefix)
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
        format!("{}:tasks:transit", self.prefix)
    }

    /// Which database this namespace serves (string: JSON `{"system_identifier","database"}`),
    /// set with `SET NX` by the first process to start or to re-seed an emptied Redis. A process
    /// connected to another database refuses to use the namespace (see [`crate::binding`]).
    pub fn database(&self) -> String {
        format!("{}:tasks:database", self.prefix)
    }

    /// When the rescuer first saw each processing entry (hash: entry → epoch ms).
    pub fn processing_seen(&self) -> String {
        format!("{}:tasks:processing:seen", self.prefix)
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

    /// What the generation counter of a cache key starts with (the guarded writes).
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_names_are_the_ones_operators_know() {
        let k = Keys::default();
        assert_eq!(k.tasks(), "arnela:tasks");
        assert_eq!(k.processing(), "arnela:tasks:processing");
        assert_eq!(k.failed(), "arnela:tasks:failed");
        assert_eq!(k.database(), "arnela:tasks:database");
        assert_eq!(Keys::new("t1").tasks(), "t1:tasks");
    }
}
