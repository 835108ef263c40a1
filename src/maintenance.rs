//! The maintenance loop: keeps the event log's next monthly partitions made and applies the
//! retention of finished tasks' projection rows (README "Retention"). [`Maintenance::run_once`]
//! is its one step; every process with the relay role runs it every `MAINTENANCE_INTERVAL_SECS`.

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

use crate::store::retention;

/// Tasks retired per statement.
pub const RETIRE_BATCH: i64 = 1000;
/// Statements per pass at most (the rest waits for the next pass).
const MAX_BATCHES: usize = 100;

pub struct Maintenance {
    pub pool: PgPool,
    /// `RETENTION_FINISHED_TASKS_DAYS` (none: keep).
    pub retention: Option<chrono::Duration>,
    pub interval: Duration,
}

/// What one pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pass {
    pub partitions_created: Vec<String>,
    pub tasks_retired: u64,
}

impl Maintenance {
    /// One pass as of `now`: makes the missing partitions, then retires finished tasks last
    /// changed before `now - retention`, a batch at a time.
    pub async fn run_once(&self, now: DateTime<Utc>) -> crate::store::Result<Pass> {
        let mut pass = Pass {
            partitions_created: retention::ensure_partitions(&self.pool, now).await?,
            ..Pass::default()
        };
        if let Some(keep) = self.retention {
            for _ in 0..MAX_BATCHES {
                let n = retention::retire_finished(&self.pool, now - keep, RETIRE_BATCH).await?;
                pass.tasks_retired += n;
                if n < RETIRE_BATCH as u64 {
                    break;
                }
            }
        }
        if !pass.partitions_created.is_empty() || pass.tasks_retired > 0 {
            tracing::info!(
                partitions_created = ?pass.partitions_created,
                tasks_retired = pass.tasks_retired,
                "maintenance pass"
            );
        }
        Ok(pass)
    }

    pub async fn run(&self, shutdown: CancellationToken) {
        let mut failures = 0u32;
        while !shutdown.is_cancelled() {
            let wait = match self.run_once(Utc::now()).await {
                Ok(_) => {
                    failures = 0;
                    self.interval
                }
                Err(e) => {
                    failures += 1;
                    tracing::error!(error = %e, "maintenance pass failed");
                    crate::backoff::Backoff::LOOP
                        .delay(failures)
                        .min(self.interval)
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(wait) => {}
            }
        }
        tracing::info!("maintenance stopped");
    }
}
