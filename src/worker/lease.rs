//! The lease renewer: one per worker, for every path that runs attempts (the pool and
//! [`super::Worker::process_next`]).
//!
//! Every held attempt `(task, attempt)` is registered with a token. Each third of the lease the
//! renewer extends all held leases in one statement ([`tasks::renew_leases`]); an attempt missing
//! from the answer was taken over (a rescuer expired it) and its token is cancelled, which stops
//! its handler. An attempt stays registered until its outcome is recorded, so its lease is
//! renewed while the completer waits for the database.
//!
//! **Postgres unreachable.** A rescuer takes an attempt over only when its lease ran out *and*
//! the owning process's heartbeat in Redis has expired (see [`crate::rescuer`]). So while this
//! process keeps its heartbeat, its handlers run on and finish through a database outage, and
//! their outcomes are recorded when Postgres is back. Only when renewals have failed for two
//! thirds of a lease and the heartbeat has failed for two thirds of its time to live (others may
//! soon take the attempts over) is every token cancelled, so that no attempt runs here and
//! elsewhere at once.

use crate::domain::TaskId;
use sqlx::PgPool;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::store::tasks;

/// An attempt: task id and attempt number.
pub type AttemptKey = (TaskId, i32);

/// When the process's heartbeat last reached Redis (shared by the heartbeat loop and the
/// renewer).
#[derive(Debug, Default)]
pub struct Liveness {
    /// Milliseconds since [`Liveness::epoch`] of the last successful heartbeat; 0 = never.
    last_ok_ms: AtomicU64,
}

impl Liveness {
    fn epoch() -> Instant {
        static EPOCH: OnceLock<Instant> = OnceLock::new();
        *EPOCH.get_or_init(Instant::now)
    }

    /// A heartbeat reached Redis now.
    pub fn beat(&self) {
        let ms = Self::epoch().elapsed().as_millis() as u64;
        self.last_ok_ms.store(ms.max(1), Ordering::Relaxed);
    }

    /// How long since the last successful heartbeat (`None`: never).
    pub fn since_last(&self) -> Option<Duration> {
        match self.last_ok_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(
                Self::epoch()
                    .elapsed()
                    .saturating_sub(Duration::from_millis(ms)),
            ),
        }
    }
}

/// The attempts a worker holds, each with the token that stops it when its lease is lost.
#[derive(Default)]
pub struct Leases {
    held: Mutex<HashMap<AttemptKey, Held>>,
}

/// One held attempt.
struct Held {
    /// Stops the handler.
    token: CancellationToken,
    /// The handler has ended and its outcome is on its way to the completer: a renewal that no
    /// longer finds the lease has most likely raced the recording of that outcome, and there is
    /// no handler left to stop.
    finished: bool,
}

impl Leases {
    pub fn new() -> Arc<Leases> {
        Arc::new(Leases::default())
    }

    /// Registers a claimed attempt; the token fires if its lease is lost.
    pub fn hold(&self, key: AttemptKey) -> CancellationToken {
        let token = CancellationToken::new();
        self.map().insert(
            key,
            Held {
                token: token.clone(),
                finished: false,
            },
        );
        token
    }

    /// Marks `key`'s handler as ended (its lease stays renewed until the outcome is recorded).
    pub fn finished(&self, key: &AttemptKey) {
        if let Some(held) = self.map().get_mut(key) {
            held.finished = true;
        }
    }

    /// Whether this worker holds `key` (claimed it and has not recorded its outcome).
    pub fn holds(&self, key: &AttemptKey) -> bool {
        self.map().contains_key(key)
    }

    /// Forgets attempts whose outcome is recorded (or given up).
    pub fn release(&self, keys: &[AttemptKey]) {
        let mut map = self.map();
        for key in keys {
            map.remove(key);
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<AttemptKey, Held>> {
        self.held.lock().expect("lease map")
    }

    /// One renewal: extends every held lease; cancels the tokens of those no longer held.
    pub async fn renew_once(
        &self,
        pool: &PgPool,
        worker: Uuid,
        lease: Duration,
    ) -> crate::store::Result<()> {
        let held_now: Vec<AttemptKey> = self.map().keys().copied().collect();
        if held_now.is_empty() {
            return Ok(());
        }
        let held: HashSet<AttemptKey> = tasks::renew_leases(pool, &held_now, worker, lease)
            .await?
            .into_iter()
            .collect();
        let map = self.map();
        for key in held_now.iter().filter(|k| !held.contains(k)) {
            match map.get(key) {
                // recorded meanwhile (the completer has not released it yet), or taken over
                // after the handler ended (the completer's fenced write finds out)
                Some(h) if h.finished => {
                    tracing::debug!(task.id = %key.0, attempt = key.1, "lease gone after the handler ended");
                }
                Some(h) => {
                    tracing::warn!(task.id = %key.0, attempt = key.1, "lease lost; stopping the handler");
                    h.token.cancel();
                }
                None => {}
            }
        }
        Ok(())
    }

    /// Renews each third of `lease` until `stop`. `liveness` is the process's heartbeat, if it
    /// has one (without one, renewals failing for two thirds of a lease stop every attempt).
    pub async fn run(
        self: Arc<Self>,
        pool: PgPool,
        worker: Uuid,
        lease: Duration,
        liveness: Option<Arc<Liveness>>,
        stop: CancellationToken,
    ) {
        let every = lease / 3;
        let mut last_ok = Instant::now();
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
            match self.renew_once(&pool, worker, lease).await {
                Ok(()) => last_ok = Instant::now(),
                Err(e) => {
                    tracing::warn!(error = %e, "lease renewal failed");
                    let heartbeat_lost = liveness
                        .as_ref()
                        .and_then(|l| l.since_last())
                        .is_none_or(|d| d >= super::HEARTBEAT_TTL * 2 / 3);
                    if last_ok.elapsed() >= lease * 2 / 3 && heartbeat_lost {
                        tracing::error!("neither leases nor the heartbeat could be renewed; stopping every attempt");
                        for held in self.map().values() {
                            held.token.cancel();
                        }
                    }
                }
            }
        }
    }
}
