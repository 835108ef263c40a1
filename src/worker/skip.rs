//! Deliveries of tasks this database does not hold: never dropped, put back on the queue for
//! the deployment whose database holds them (one Redis namespace serves one database, see
//! [`crate::binding`]; this is the second line of defence when that is broken, e.g. by a
//! process of an older build). And deliveries of paused task types, given back to the outbox.

use crate::domain::TaskId;
use crate::queue::RedisConn;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::{Claimed, Processed, Worker};
use crate::metrics::SkipReason;
use crate::queue;

/// The first pause after a batch of nothing but deliveries of unknown tasks; it doubles while
/// such batches follow each other, up to [`SKIP_PAUSE_MAX`].
const SKIP_PAUSE_MIN: Duration = Duration::from_millis(10);
const SKIP_PAUSE_MAX: Duration = Duration::from_secs(1);

impl Worker {
    /// Puts deliveries whose task this database does not hold back at the far end of the queue,
    /// for the deployment whose database holds them: logged and counted, never dropped. If Redis
    /// fails here, the entries stay on the processing list and the rescuer puts them back.
    pub(super) async fn leave_unknown(
        &self,
        conn: &mut RedisConn,
        unknown: Vec<(String, TaskId)>,
    ) -> Vec<Processed> {
        if unknown.is_empty() {
            return Vec::new();
        }
        let raws: Vec<&str> = unknown.iter().map(|(r, _)| r.as_str()).collect();
        if let Err(e) = queue::requeue_last(conn, &self.keys, &raws).await {
            tracing::error!(error = %e, "cannot put back deliveries of tasks not in this database; the rescuer will");
        }
        self.metrics
            .observe_skipped(SkipReason::TaskNotFound, unknown.len() as u64);
        unknown
            .into_iter()
            .map(|(_, id)| {
                tracing::warn!(task.id = %id, reason = SkipReason::TaskNotFound.as_str(), "delivery of a task this database does not hold; put back on the queue for its own deployment");
                Processed::Skipped(id)
            })
            .collect()
    }

    /// Acknowledges deliveries of paused types, whose outbox rows the claim made unpublished
    /// again. A failed acknowledgement leaves an entry on the processing list, which the
    /// rescuer handles like any orphan (a later claim finds it paused or already running).
    pub(super) async fn give_back_paused(
        &self,
        conn: &mut RedisConn,
        given_back: Vec<(String, TaskId)>,
    ) -> Vec<Processed> {
        if given_back.is_empty() {
            return Vec::new();
        }
        let raws: Vec<&str> = given_back.iter().map(|(r, _)| r.as_str()).collect();
        if let Err(e) = queue::ack_many(conn, &self.keys, &raws).await {
            tracing::error!(error = %e, "cannot acknowledge deliveries of paused types; the rescuer will");
        }
        self.metrics
            .observe_skipped(SkipReason::TypePaused, given_back.len() as u64);
        given_back
            .into_iter()
            .map(|(_, id)| {
                tracing::info!(task.id = %id, reason = SkipReason::TypePaused.as_str(), "delivery of a paused task type given back to the outbox");
                Processed::Paused(id)
            })
            .collect()
    }

    /// Backs off after a batch of nothing but deliveries of unknown tasks, so a queue holding
    /// only those is not taken round and round at full speed: [`SKIP_PAUSE_MIN`], doubling while
    /// such batches follow each other, at most [`SKIP_PAUSE_MAX`]. Any other batch resets it.
    pub(super) async fn pause_if_only_skipped(&self, claimed: &[Claimed], done: &[Processed]) {
        let only_skipped = claimed.is_empty()
            && !done.is_empty()
            && done
                .iter()
                .all(|p| matches!(p, Processed::Skipped(_) | Processed::Paused(_)));
        if !only_skipped {
            self.skip_streak.store(0, Ordering::Relaxed);
            return;
        }
        let streak = self.skip_streak.fetch_add(1, Ordering::Relaxed).min(10);
        tokio::time::sleep((SKIP_PAUSE_MIN * 2u32.pow(streak)).min(SKIP_PAUSE_MAX)).await;
    }
}
