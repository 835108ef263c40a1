//! The workers of one process: `slots` handlers run at once (`WORKERS`).
//!
//! One fetcher takes deliveries and claims them in one transaction; each claimed attempt waits
//! for a handler slot in its own task; one [`Leases`] renewer extends every held lease in one
//! statement; one completer records finished attempts in batches (one transaction for all the
//! outcomes that are ready). A heartbeat in Redis lets `/health` count live workers.
//!
//! **How much is claimed at once.** Claiming only as many deliveries as there are free slots
//! makes every claim a transaction of a handful of rows when handlers are quick. The fetcher
//! therefore claims up to the free slots plus a *prefetch* that follows the handlers' measured
//! duration ([`Pace`]): as many attempts as the slots can start within [`PREFETCH_WAIT`]. Quick
//! handlers (a few hundred microseconds) get claims of hundreds of rows; handlers that take
//! hundreds of milliseconds get none, so a busy process never hoards deliveries another process
//! could start, and an attempt never waits long between its `attempt_started` and its handler.
//! A claimed attempt that has not started when shutdown begins is released at once.

use crate::domain::TaskId;
use crate::queue::RedisConn;
use sqlx::PgPool;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::handler::Registry;
use super::lease::{Leases, Liveness};
use super::{Claimed, Ending, Finished, Result, Worker, WorkerConfig, WorkerStats};
use crate::metrics::Metrics;
use crate::queue::{self, Keys};

/// Most outcomes recorded in one transaction.
const COMPLETE_BATCH: usize = 512;

/// How long a prefetched attempt should wait for a handler slot, at the measured pace.
pub const PREFETCH_WAIT: Duration = Duration::from_millis(10);

/// The most attempts claimed ahead of free slots.
pub const MAX_PREFETCH: usize = 512;

/// How long outcomes are kept while the database cannot be reached before they are given up
/// (their attempts then run again once their leases expire).
pub const KEEP_OUTCOMES_FOR: Duration = Duration::from_secs(600);

/// How often a worker process announces it is alive, and how long the announcement lasts.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(5);
pub const HEARTBEAT_TTL: Duration = Duration::from_secs(15);

pub struct WorkerPool {
    worker: Worker,
    slots: usize,
    pub stats: Arc<WorkerStats>,
    pub process_id: Uuid,
    heartbeats: RedisConn,
    keys: Keys,
}

/// The fetcher's pace: attempts claimed and not yet finished, and the handlers' mean duration.
pub struct Pace {
    slots: usize,
    /// Claimed attempts whose handler has not finished (waiting for a slot or running).
    outstanding: AtomicUsize,
    /// Exponentially weighted mean handler duration, in microseconds; 0 until one finished.
    mean_us: AtomicU64,
    /// When a handler last finished, in microseconds since the pace was made.
    last_finished_us: AtomicU64,
    started: Instant,
    /// Fired when an attempt finishes (room for the fetcher).
    freed: Notify,
}

impl Pace {
    pub fn new(slots: usize) -> Pace {
        Pace {
            slots,
            outstanding: AtomicUsize::new(0),
            mean_us: AtomicU64::new(0),
            last_finished_us: AtomicU64::new(0),
            started: Instant::now(),
            freed: Notify::new(),
        }
    }

    /// Attempts claimed ahead of free slots at the measured pace. None before a handler has
    /// finished, and none while no handler has finished for [`PREFETCH_WAIT`] × 10 (handlers
    /// that suddenly take long are not waited for with a full prefetch).
    pub fn prefetch(&self) -> usize {
        self.prefetch_at(self.started.elapsed())
    }

    /// [`Pace::prefetch`] when `now` has passed since the pace was made.
    fn prefetch_at(&self, now: Duration) -> usize {
        let mean_us = self.mean_us.load(Ordering::Relaxed);
        let last = Duration::from_micros(self.last_finished_us.load(Ordering::Relaxed));
        let quiet = now.saturating_sub(last);
        if mean_us == 0 || quiet > PREFETCH_WAIT * 10 {
            return 0;
        }
        let per_slot = PREFETCH_WAIT.as_micros() as u64 / mean_us;
        (self.slots as u64 * per_slot).min(MAX_PREFETCH as u64) as usize
    }

    /// How many attempts the fetcher may claim now.
    pub fn room(&self) -> usize {
        (self.slots + self.prefetch()).saturating_sub(self.outstanding.load(Ordering::Relaxed))
    }

    fn claimed(&self, n: usize) {
        self.outstanding.fetch_add(n, Ordering::Relaxed);
    }

    fn finished(&self, took: Option<Duration>) {
        if let Some(took) = took {
            let us = (took.as_micros().min(u64::MAX as u128) as u64).max(1);
            let old = self.mean_us.load(Ordering::Relaxed);
            // weight 1/16: follows a change of pace within a few dozen attempts
            let mean = if old == 0 { us } else { (old * 15 + us) / 16 };
            self.mean_us.store(mean.max(1), Ordering::Relaxed);
            let now = self.started.elapsed().as_micros() as u64;
            self.last_finished_us.store(now.max(1), Ordering::Relaxed);
        }
        self.outstanding.fetch_sub(1, Ordering::Relaxed);
        self.freed.notify_one();
    }
}

impl WorkerPool {
    /// Builds a pool running up to `slots` handlers at once.
    pub async fn build(
        slots: usize,
        pool: PgPool,
        redis_info: impl Into<queue::RedisTarget>,
        keys: Keys,
        registry: Registry,
        config: WorkerConfig,
    ) -> Result<WorkerPool> {
        let redis_info: queue::RedisTarget = redis_info.into();
        let stats = Arc::new(WorkerStats::default());
        // A blocking take holds its connection for `block`; allow that plus a margin.
        let blocking =
            queue::connect_with_timeout(redis_info.clone(), config.block + Duration::from_secs(5))
                .await?;
        let commands = queue::connect(redis_info).await?;
        let worker = Worker::with_connections(
            pool,
            blocking,
            commands.clone(),
            keys.clone(),
            Arc::new(registry),
            config,
            stats.clone(),
        );
        Ok(WorkerPool {
            process_id: worker.id,
            worker,
            slots: slots.max(1),
            stats,
            heartbeats: commands,
            keys,
        })
    }

    /// Records finished attempts in `metrics` (by default in a registry of the pool's own).
    pub fn with_metrics(mut self, metrics: Metrics) -> WorkerPool {
        self.worker = self.worker.with_metrics(metrics);
        self
    }

    /// Shares what the pushes of dead-letter copies meet with the process's rescuer (see
    /// [`Refusals`](crate::dead_letters::Refusals)).
    pub fn with_failed_pushes(mut self, refusals: crate::dead_letters::Refusals) -> WorkerPool {
        self.worker = self.worker.with_failed_pushes(refusals);
        self
    }

    /// Runs until `shutdown`; then lets running attempts finish for up to `drain`, releases those
    /// that did not (and those claimed but not started), records every outcome and returns.
    pub async fn run(self, shutdown: CancellationToken, drain: Duration) {
        let worker = Arc::new(self.worker);
        let hard_stop = CancellationToken::new();
        let leases = Leases::new();
        let slots = Arc::new(Semaphore::new(self.slots));
        let pace = Arc::new(Pace::new(self.slots));
        let (done_tx, done_rx) = mpsc::unbounded_channel::<(Finished, OwnedSemaphorePermit)>();

        // the heartbeat lasts until the drain is over: a draining process still runs attempts.
        // Its id is the lease owner of this process's attempts (see `crate::rescuer`).
        let liveness = Arc::new(Liveness::default());
        let beat_stop = CancellationToken::new();
        let beat = tokio::spawn(heartbeat_loop(
            self.heartbeats.clone(),
            self.keys.clone(),
            self.process_id,
            self.slots,
            liveness.clone(),
            beat_stop.clone(),
        ));
        let renewer_stop = CancellationToken::new();
        let renewer = tokio::spawn(leases.clone().run(
            worker.pool.clone(),
            worker.id,
            worker.config.lease,
            Some(liveness),
            renewer_stop.clone(),
        ));
        let completer = tokio::spawn(complete_loop(worker.clone(), done_rx, leases.clone()));

        let mut fetcher = Fetcher::new(&worker, &leases);
        let mut running = tokio::task::JoinSet::new();
        let mut failures = 0u32;
        // `pending` bounds the attempts claimed and not yet recorded, so the fetcher can claim
        // again while the completer records earlier outcomes, but not without limit.
        let pending = Arc::new(Semaphore::new(
            (self.slots + MAX_PREFETCH) * 2 + COMPLETE_BATCH,
        ));
        while !shutdown.is_cancelled() {
            let room = pace.room();
            if room == 0 {
                tokio::select! {
                    () = pace.freed.notified() => continue,
                    () = shutdown.cancelled() => break,
                }
            }
            let first = tokio::select! {
                p = pending.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
                () = shutdown.cancelled() => break,
            };
            let mut permits = vec![first];
            // let attempts that are about to end make room, so one claim takes many
            tokio::task::yield_now().await;
            let room = pace.room().max(1);
            while permits.len() < room {
                match pending.clone().try_acquire_owned() {
                    Ok(p) => permits.push(p),
                    Err(_) => break,
                }
            }
            tracing::trace!(
                asked = permits.len(),
                prefetch = pace.prefetch(),
                mean_us = pace.mean_us.load(Ordering::Relaxed),
                "claiming"
            );
            let claimed = match fetcher.step(permits.len(), &shutdown).await {
                Ok(c) => {
                    failures = 0;
                    c
                }
                Err(e) => {
                    failures += 1;
                    tracing::error!(error = %e, "taking or claiming deliveries failed");
                    let pause = crate::backoff::Backoff::LOOP.delay(failures);
                    tokio::select! {
                        () = tokio::time::sleep(pause) => {}
                        () = shutdown.cancelled() => {}
                    }
                    continue;
                }
            };
            pace.claimed(claimed.len());
            for c in claimed {
                let record = permits.pop().expect("one permit per claimed attempt");
                let key = (c.ctx.task_id, c.ctx.attempt);
                let lease_lost = leases.hold(key);
                let (worker, slots, pace, leases) =
                    (worker.clone(), slots.clone(), pace.clone(), leases.clone());
                let (hard_stop, shutdown, done_tx) =
                    (hard_stop.clone(), shutdown.clone(), done_tx.clone());
                running.spawn(async move {
                    let finished = run_attempt(
                        &worker,
                        c,
                        &slots,
                        &pace,
                        &lease_lost,
                        &shutdown,
                        &hard_stop,
                    )
                    .await;
                    // the lease stays renewed until the completer has recorded the outcome;
                    // the completer outlives every sender
                    leases.finished(&key);
                    done_tx.send((finished, record)).ok();
                });
            }
            // reap finished runs so the set does not grow
            while running.try_join_next().is_some() {}
        }
        fetcher.finish().await;

        tracing::info!(running = running.len(), ?drain, "draining workers");
        let deadline = tokio::time::sleep(drain);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                joined = running.join_next() => match joined {
                    None => break,
                    Some(Err(e)) => tracing::error!(error = %e, "an attempt task panicked"),
                    Some(Ok(())) => {}
                },
                () = &mut deadline, if !hard_stop.is_cancelled() => {
                    tracing::warn!("drain deadline passed; releasing unfinished attempts");
                    hard_stop.cancel();
                }
            }
        }
        drop(done_tx);
        if let Err(e) = completer.await {
            tracing::error!(error = %e, "the completer panicked");
        }
        renewer_stop.cancel();
        if let Err(e) = renewer.await {
            tracing::error!(error = %e, "the lease renewer panicked");
        }
        beat_stop.cancel();
        if let Err(e) = beat.await {
            tracing::error!(error = %e, "heartbeat task panicked");
        }
        let mut conn = self.heartbeats;
        if let Err(e) = queue::worker_heartbeat_stop(&mut conn, &self.keys, self.process_id).await {
            tracing::warn!(error = %e, "cannot remove the worker heartbeat");
        }
        tracing::info!("workers stopped");
    }
}

/// Waits for a handler slot and runs the attempt. One claimed but not started when shutdown
/// begins (or whose lease is lost while it waits) does not start.
async fn run_attempt(
    worker: &Worker,
    claimed: Claimed,
    slots: &Arc<Semaphore>,
    pace: &Pace,
    lease_lost: &CancellationToken,
    shutdown: &CancellationToken,
    hard_stop: &CancellationToken,
) -> Finished {
    let not_started = |claimed: Claimed, ending: Ending| Finished {
        claimed,
        ending,
        duration_ms: 0,
    };
    let slot = tokio::select! {
        biased;
        () = shutdown.cancelled() => None,
        () = lease_lost.cancelled() => {
            pace.finished(None);
            return not_started(claimed, Ending::LeaseLost);
        }
        slot = slots.clone().acquire_owned() => slot.ok(),
    };
    let Some(slot) = slot else {
        pace.finished(None);
        return not_started(claimed, Ending::Interrupted);
    };
    let started = Instant::now();
    let finished = worker.execute(claimed, lease_lost, hard_stop).await;
    drop(slot);
    pace.finished(Some(started.elapsed()));
    finished
}

/// How long after a failed claim a worker keeps trying to settle it while the database cannot
/// be reached (other errors: three tries); past that the rescuer takes the attempts over.
const SETTLE_FOR: Duration = Duration::from_secs(600);

/// The pool's fetcher: takes deliveries and claims them, one claim at a time.
///
/// A claim whose commit failed here may have committed all the same (Postgres stopped between
/// its `COMMIT` and the answer). Its deliveries go back to the queue at once, for any process to
/// claim, and the claim is *settled* before this fetcher claims anything again (see
/// [`Worker::settle_unconfirmed`]): if it did commit, its attempts are released. Settling first
/// matters: if the claim did not commit, this fetcher may claim the returned deliveries itself,
/// and a settlement running after that claim would find the attempts held by this worker and
/// release the ones whose handlers are about to run (run twice: here and after the release).
pub struct Fetcher<'a> {
    worker: &'a Worker,
    leases: &'a Leases,
    unsettled: Option<Unsettled>,
}

/// A claim whose commit this worker did not hear about.
struct Unsettled {
    attempts: Vec<(TaskId, i32)>,
    since: Instant,
    other_failures: u32,
}

impl<'a> Fetcher<'a> {
    pub fn new(worker: &'a Worker, leases: &'a Leases) -> Fetcher<'a> {
        Fetcher {
            worker,
            leases,
            unsettled: None,
        }
    }

    /// One step: settles a claim whose commit failed, if any, then takes up to `max` deliveries
    /// and claims them. A delivery taken after shutdown began, or whose claim failed (the
    /// database is unreachable), goes back to the queue unstarted, so it does not wait on the
    /// processing list for the rescuer's orphan grace. Returns the claimed attempts; the caller
    /// holds their leases.
    pub async fn step(&mut self, max: usize, shutdown: &CancellationToken) -> Result<Vec<Claimed>> {
        self.settle().await?;
        let raws = self.worker.take(max).await?;
        if raws.is_empty() {
            return Ok(Vec::new());
        }
        if shutdown.is_cancelled() {
            return_all(self.worker, &raws).await?;
            return Ok(Vec::new());
        }
        match self.worker.claim(raws.clone()).await {
            Ok((claimed, _)) => Ok(claimed),
            Err(e) => {
                // if the claim did commit after all, the returned deliveries are duplicates,
                // which the next claim refuses
                // (undecodable entries were moved to the failed list already)
                let (decodable, attempts): (Vec<String>, Vec<(TaskId, i32)>) = raws
                    .into_iter()
                    .filter_map(|r| {
                        queue::Delivery::decode(&r).map(|d| (r, (d.task_id, d.attempt)))
                    })
                    .unzip();
                if let Err(r) = return_all(self.worker, &decodable).await {
                    tracing::warn!(error = %r, "cannot return deliveries whose claim failed; the rescuer will");
                }
                self.unsettled = Some(Unsettled {
                    attempts,
                    since: Instant::now(),
                    other_failures: 0,
                });
                Err(e)
            }
        }
    }

    /// At shutdown: settles the claim whose commit failed, if any, with one more try, so that
    /// its attempts (if it committed after all) are released now rather than left running in
    /// Postgres until their lease and the rescuer's grace for live owners pass. If this try
    /// fails too, they are left to the rescuer, and the log says so.
    pub async fn finish(mut self) {
        let Some(pending) = self.unsettled.as_ref() else {
            return;
        };
        let attempts = pending.attempts.len();
        if let Err(e) = self.settle().await {
            tracing::warn!(
                error = %e,
                attempts,
                "cannot settle a failed claim at shutdown; if it committed, its attempts run \
                 again once their lease runs out (the rescuer)"
            );
        }
    }

    /// Settles the claim whose commit failed, if any. An error leaves it unsettled (the step
    /// fails and is tried again after the loop's pause) until [`SETTLE_FOR`] has passed since
    /// the failed claim, or after three other errors; then it is given up.
    async fn settle(&mut self) -> Result<()> {
        let Some(mut pending) = self.unsettled.take() else {
            return Ok(());
        };
        let leases = self.leases;
        match self
            .worker
            .settle_unconfirmed(&pending.attempts, |k| leases.holds(k))
            .await
        {
            Ok(0) => Ok(()),
            Ok(n) => {
                tracing::warn!(
                    attempts = n,
                    "a claim committed although its commit failed here; its attempts were released"
                );
                Ok(())
            }
            Err(e) => {
                let keep = if e.is_unavailable() {
                    pending.since.elapsed() < SETTLE_FOR
                } else {
                    pending.other_failures += 1;
                    pending.other_failures < 3
                };
                if keep {
                    tracing::debug!(error = %e, "cannot settle a failed claim yet");
                    self.unsettled = Some(pending);
                } else {
                    tracing::error!(error = %e, "cannot settle a failed claim; the rescuer will take its attempts over");
                }
                Err(e)
            }
        }
    }
}

async fn return_all(worker: &Worker, raws: &[String]) -> Result<()> {
    let mut conn = worker.commands.clone();
    for raw in raws {
        queue::return_unstarted(&mut conn, &worker.keys, raw).await?;
    }
    Ok(())
}

/// Records finished attempts in batches until every sender is gone. A failed batch is tried
/// again a few times, then item by item, so one bad row or a passing database error does not
/// throw away the other outcomes. Attempts stay held (their leases renewed) until their outcome
/// is recorded or given up.
async fn complete_loop(
    worker: Arc<Worker>,
    mut done: mpsc::UnboundedReceiver<(Finished, OwnedSemaphorePermit)>,
    leases: Arc<Leases>,
) {
    while let Some(first) = done.recv().await {
        let mut batch = vec![first];
        while batch.len() < COMPLETE_BATCH {
            match done.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let (finished, permits): (Vec<Finished>, Vec<OwnedSemaphorePermit>) =
            batch.into_iter().unzip();
        let keys: Vec<(TaskId, i32)> = finished
            .iter()
            .map(|f| (f.claimed.ctx.task_id, f.claimed.ctx.attempt))
            .collect();
        record_with_retries(&worker, finished).await;
        leases.release(&keys);
        drop(permits);
    }
}

/// Records a batch of outcomes. While the database cannot be reached the batch is kept (the
/// claimed-and-unrecorded bound stops the fetcher meanwhile, so memory stays bounded) and tried
/// again with a growing pause: the handlers' leases are still renewed or, if not, left to this
/// process by the rescuers while its heartbeat is current. Any other failure is retried a few
/// times, then item by item, so one bad row does not throw away the other outcomes; an item that
/// still cannot be recorded is left to the rescuer (its lease expires once this process is
/// gone), which loses an attempt, never a task.
async fn record_with_retries(worker: &Worker, finished: Vec<Finished>) {
    let mut other_failures = 0u32;
    let mut pause = Duration::from_millis(100);
    let started = Instant::now();
    loop {
        match worker.complete(finished.clone()).await {
            Ok(_) => return,
            Err(e) if e.is_unavailable() && started.elapsed() < KEEP_OUTCOMES_FOR => {
                tracing::warn!(error = %e, attempts = finished.len(), "database unavailable; keeping outcomes to record later");
            }
            Err(e) => {
                other_failures += 1;
                tracing::warn!(error = %e, attempts = finished.len(), round = other_failures, "recording outcomes failed; retrying");
                if other_failures >= 3 {
                    break;
                }
            }
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(2));
    }
    for f in finished {
        let id = f.claimed.ctx.task_id;
        if let Err(e) = worker.complete(vec![f]).await {
            tracing::error!(task.id = %id, error = %e, "cannot record an outcome; the lease will expire");
        }
    }
}

async fn heartbeat_loop(
    mut conn: RedisConn,
    keys: Keys,
    process: Uuid,
    workers: usize,
    liveness: Arc<Liveness>,
    shutdown: CancellationToken,
) {
    loop {
        match queue::worker_heartbeat(&mut conn, &keys, process, workers, HEARTBEAT_TTL).await {
            Ok(()) => liveness.beat(),
            Err(e) => tracing::warn!(error = %e, "worker heartbeat failed"),
        }
        tokio::select! {
            () = tokio::time::sleep(HEARTBEAT_EVERY) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quick_handlers_are_claimed_in_large_batches_and_slow_ones_only_for_free_slots() {
        let unknown = Pace::new(5);
        assert_eq!(
            unknown.prefetch(),
            0,
            "nothing is prefetched before a handler finished"
        );
        assert_eq!(unknown.room(), 5);

        let pace = Pace::new(5);
        for _ in 0..200 {
            pace.claimed(1);
            pace.finished(Some(Duration::from_micros(50)));
        }
        assert_eq!(pace.prefetch(), MAX_PREFETCH);
        assert_eq!(pace.room(), 5 + MAX_PREFETCH);

        let slow = Pace::new(5);
        for _ in 0..200 {
            slow.claimed(1);
            slow.finished(Some(Duration::from_millis(200)));
        }
        assert_eq!(slow.prefetch(), 0);
        slow.claimed(5);
        assert_eq!(slow.room(), 0, "five running slow attempts leave no room");
    }

    #[test]
    fn quick_handlers_that_stop_finishing_stop_the_prefetch() {
        let pace = Pace::new(5);
        pace.claimed(1);
        pace.finished(Some(Duration::from_micros(50)));
        let finished = Duration::from_micros(pace.last_finished_us.load(Ordering::Relaxed));
        assert!(finished > Duration::ZERO, "the finish time is recorded");
        assert_eq!(pace.prefetch_at(finished + PREFETCH_WAIT), MAX_PREFETCH);
        assert_eq!(
            pace.prefetch_at(finished + PREFETCH_WAIT * 11),
            0,
            "nothing finished for a while: no prefetch"
        );
    }
}
