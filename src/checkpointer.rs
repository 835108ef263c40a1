//! The checkpointer: writes a signed checkpoint of the log every `AUDIT_CHECKPOINT_SECS`
//! ([`crate::store::checkpoints::write`] is its one step). Every process with the relay role runs
//! one when `AUDIT_SIGNING_KEY` is set; two writing the same checkpoint number keep the first.

use ed25519_dalek::SigningKey;
use sqlx::PgPool;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

use crate::store::checkpoints;

pub struct Checkpointer {
    pub pool: PgPool,
    pub key: SigningKey,
    pub interval: Duration,
}

impl Checkpointer {
    pub async fn run_once(&self) -> crate::store::Result<Option<checkpoints::Checkpoint>> {
        let written = checkpoints::write(&self.pool, &self.key).await?;
        if let Some(c) = &written {
            tracing::debug!(seq = c.seq, tasks = c.tasks, "audit checkpoint written");
        }
        Ok(written)
    }

    pub async fn run(&self, shutdown: CancellationToken) {
        while !shutdown.is_cancelled() {
            if let Err(e) = self.run_once().await {
                tracing::error!(error = %e, "audit checkpoint failed");
            }
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(self.interval) => {}
            }
        }
        tracing::info!("checkpointer stopped");
    }
}
