//! The scheduler: fires the slots of schedules as they fall due. [`Scheduler::run_once`] is one
//! step ([`crate::store::schedules::fire_due`]); [`Scheduler::run`] loops around it, sleeping
//! until the earliest next slot (at most the polling interval, so a schedule created or changed
//! by another process is seen within it).
//!
//! Every process with the relay role runs one; they share the due schedules through row locks,
//! and each slot gets exactly one task whichever of them fires it.

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

use crate::domain::sealing::MasterKey;
use crate::store::outbox::OutboxWaker;
use crate::store::schedules::{self, Fired};
use crate::store::Result;

/// The shortest sleep between steps.
const MIN_WAIT: Duration = Duration::from_millis(10);

#[derive(Clone)]
pub struct Scheduler {
    pool: PgPool,
    waker: OutboxWaker,
    /// The longest sleep between steps.
    poll: Duration,
    /// Seals the personal fields of the tasks it creates (`AUDIT_DATA_KEY`).
    data_key: Option<Arc<MasterKey>>,
}

impl Scheduler {
    pub fn new(pool: PgPool, waker: OutboxWaker, poll: Duration) -> Scheduler {
        Scheduler {
            pool,
            waker,
            poll,
            data_key: None,
        }
    }

    /// Seals the personal fields of the tasks it creates with data keys wrapped under `key`.
    pub fn with_data_key(mut self, key: Option<Arc<MasterKey>>) -> Scheduler {
        self.data_key = key;
        self
    }

    /// Fires every slot due at `now` (see [`schedules::fire_due`]) and wakes the relays if a
    /// task was created.
    pub async fn run_once(&self, now: DateTime<Utc>) -> Result<Fired> {
        let fired = schedules::fire_due(&self.pool, now, self.data_key.as_deref()).await?;
        if fired.created > 0 {
            self.waker.wake();
            tracing::debug!(
                schedules = fired.schedules,
                tasks = fired.created,
                "scheduled slots fired"
            );
        }
        Ok(fired)
    }

    pub async fn run(&self, shutdown: CancellationToken) {
        let mut failures = 0u32;
        while !shutdown.is_cancelled() {
            let wait = match self.run_once(Utc::now()).await {
                // a full step may have left due schedules behind
                Ok(f) if f.schedules as i64 >= schedules::STEP_SCHEDULES => Duration::ZERO,
                Ok(_) => {
                    failures = 0;
                    self.until_next_slot().await
                }
                Err(e) => {
                    failures += 1;
                    tracing::error!(error = %e, "scheduler step failed");
                    Duration::from_millis(100 * u64::from(failures.min(50)))
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(wait) => {}
            }
        }
        tracing::info!("scheduler stopped");
    }

    async fn until_next_slot(&self) -> Duration {
        match schedules::next_due(&self.pool).await {
            Ok(Some(at)) => (at - Utc::now())
                .to_std()
                .unwrap_or(Duration::ZERO)
                .clamp(MIN_WAIT, self.poll.max(MIN_WAIT)),
            Ok(None) => self.poll,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the next slot");
                self.poll
            }
        }
    }
}
