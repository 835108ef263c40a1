//! The copies of dead-lettered tasks on Redis's failed list (`{prefix}:tasks:failed`), through
//! an outbox of their own.
//!
//! A transition that dead-letters a task writes the task's copy to `failed_copies` in its own
//! transaction ([`crate::store::transition::apply`]). [`push_pending`] moves the copies from
//! there to the list: it deletes a batch of rows, pushes their copies and commits, so a copy
//! leaves Postgres only once Redis took it. The process that dead-lettered a task pushes right
//! after its commit; every rescuer pass pushes whatever is left, so a copy that Redis refused,
//! or whose process died before pushing it, reaches the list within a rescuer interval of
//! Redis taking pushes again (README "Recovery bounds").
//!
//! If the push went through and its transaction's commit then failed, the copy stays in
//! Postgres and is pushed again; the list does not take it twice ([`queue::push_failed`] skips
//! the copies it holds a note of in `{prefix}:tasks:failed:pushed`).
//!
//! A process's pushes share one [`Refusals`]: after Redis refused a push, its workers stop
//! pushing after their commits for [`PAUSE`] (or until a rescuer pass of the process pushes
//! again) and leave the copies to the rescuer, and the refusals are logged at most once per
//! [`PAUSE`]. Without it every completion batch with a dead letter ran a push transaction and
//! logged a warning while Redis refused the list.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::PgPool;

use crate::engine::StepError;
use crate::queue::{self, Keys, RedisConn, FAILED_LIST_CAP};
use crate::store::{failed_copies, Tx};

/// Copies pushed per transaction (one `MULTI`).
const BATCH: i64 = 1_000;

/// Pushes the copies that wait in `failed_copies`, oldest first, a batch per transaction, and
/// returns how many it pushed. At most [`FAILED_LIST_CAP`] per call (more would be trimmed
/// anyway). Copies another call is pushing are left to it. On an error the batch in hand stays
/// in Postgres for the next call.
pub async fn push_pending(
    pool: &PgPool,
    conn: &mut RedisConn,
    keys: &Keys,
) -> Result<usize, StepError> {
    let mut pushed = 0;
    while pushed < FAILED_LIST_CAP as usize {
        let mut tx = Tx::begin(pool).await?;
        let copies = failed_copies::take(&mut tx, BATCH).await?;
        if copies.is_empty() {
            tx.commit().await?;
            break;
        }
        if let Err(e) = queue::push_failed(conn, keys, &copies).await {
            if let Err(r) = tx.rollback().await {
                // the rows are freed when the server drops the transaction with its connection
                tracing::warn!(error = %r, "cannot roll back after a refused push of dead-letter copies");
            }
            return Err(e.into());
        }
        tx.commit().await?;
        pushed += copies.len();
        if copies.len() < BATCH as usize {
            break;
        }
    }
    Ok(pushed)
}

/// How long after a refusal a worker leaves the copies to the rescuer, and how often a refusal
/// that goes on is logged.
pub const PAUSE: Duration = Duration::from_secs(10);

/// What a process's pushes of dead-letter copies met: shared by its workers and its rescuer
/// (clones share it).
#[derive(Clone, Debug, Default)]
pub struct Refusals {
    state: Arc<Mutex<RefusalState>>,
}

#[derive(Debug, Default)]
struct RefusalState {
    /// When the last push was refused (`None`: none since the last push that went through).
    refused_at: Option<Instant>,
    /// When the last refusal was logged.
    logged_at: Option<Instant>,
    /// Copies of dead letters the workers left to the rescuer since that log line.
    left: usize,
}

/// What to log about a refusal.
#[derive(Debug, PartialEq, Eq)]
enum Refused {
    /// The first since a push went through, or the first for [`PAUSE`]: log it, with the copies
    /// the workers left to the rescuer since the last line.
    Log { left: usize },
    /// Logged less than [`PAUSE`] ago.
    Quiet,
}

impl Refusals {
    /// [`push_pending`], noting what it met: a refusal is logged at most once per [`PAUSE`]
    /// (the copies stay in Postgres for the rescuer's next pass), and the first push that goes
    /// through after refusals once.
    pub async fn push(
        &self,
        pool: &PgPool,
        conn: &mut RedisConn,
        keys: &Keys,
    ) -> Result<usize, StepError> {
        match push_pending(pool, conn, keys).await {
            Ok(n) => {
                if self.pushed() {
                    tracing::info!(
                        copies = n,
                        "the failed list takes dead-letter copies again; pushed those that waited"
                    );
                }
                Ok(n)
            }
            Err(e) => {
                if let Refused::Log { left } = self.refused(Instant::now()) {
                    tracing::warn!(
                        error = %e,
                        left_by_workers = left,
                        pause_secs = PAUSE.as_secs(),
                        "cannot push the dead-letter copies that wait in Postgres; the rescuer tries \
                         again every pass, and this process's workers leave theirs to it for the pause"
                    );
                }
                Err(e)
            }
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, RefusalState> {
        // the state is a few plain fields, valid whatever a panicking holder left
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a worker pushes the `copies` it just dead-lettered now: not within [`PAUSE`] of
    /// a refusal (they wait for the rescuer's next pass, and are counted).
    pub fn worker_may_push(&self, now: Instant, copies: usize) -> bool {
        let mut s = self.state();
        match s.refused_at {
            Some(at) if now.saturating_duration_since(at) < PAUSE => {
                s.left += copies;
                false
            }
            _ => true,
        }
    }

    /// Notes a refused push at `now`.
    fn refused(&self, now: Instant) -> Refused {
        let mut s = self.state();
        s.refused_at = Some(now);
        match s.logged_at {
            Some(at) if now.saturating_duration_since(at) < PAUSE => Refused::Quiet,
            _ => {
                s.logged_at = Some(now);
                Refused::Log {
                    left: std::mem::take(&mut s.left),
                }
            }
        }
    }

    /// Notes a push that went through; true if it ends refusals (worth a line in the log).
    fn pushed(&self) -> bool {
        let mut s = self.state();
        s.left = 0;
        s.logged_at = None;
        s.refused_at.take().is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_pauses_the_workers_pushes_and_is_logged_once_per_pause() {
        let r = Refusals::default();
        let t0 = Instant::now();
        assert!(r.worker_may_push(t0, 1));
        assert_eq!(r.refused(t0), Refused::Log { left: 0 });

        assert!(!r.worker_may_push(t0 + Duration::from_secs(1), 2));
        assert!(!r.worker_may_push(t0 + PAUSE - Duration::from_millis(1), 3));
        // the rescuer's passes still push, and their refusals within the pause are quiet
        assert_eq!(r.refused(t0 + Duration::from_secs(5)), Refused::Quiet);
        // the pause counts from the last refusal
        assert!(!r.worker_may_push(t0 + PAUSE, 1));
        assert!(r.worker_may_push(t0 + Duration::from_secs(5) + PAUSE, 1));
        // logged again a pause after the last line, with what the workers left meanwhile
        assert_eq!(r.refused(t0 + PAUSE), Refused::Log { left: 6 });
        assert_eq!(
            r.refused(t0 + PAUSE + Duration::from_secs(1)),
            Refused::Quiet
        );
    }

    #[test]
    fn a_push_that_goes_through_ends_the_pause() {
        let r = Refusals::default();
        let t0 = Instant::now();
        assert!(!r.pushed(), "nothing was refused");
        r.refused(t0);
        assert!(!r.worker_may_push(t0, 4));
        assert!(r.pushed(), "ends refusals");
        assert!(!r.pushed());
        assert!(r.worker_may_push(t0 + Duration::from_secs(1), 1));
        // a new refusal is logged at once, with nothing left over from before
        assert_eq!(
            r.refused(t0 + Duration::from_secs(1)),
            Refused::Log { left: 0 }
        );
    }

    #[test]
    fn clones_share_what_they_met() {
        let worker = Refusals::default();
        let rescuer = worker.clone();
        let t0 = Instant::now();
        worker.refused(t0);
        assert!(rescuer.pushed());
        assert!(worker.worker_may_push(t0, 1));
    }
}
