//! Reads that may be served by a streaming standby (`DATABASE_READ_URL`): the audit reads only
//! (the global log, task lists, histories, statistics). Writes, claims, the engine and every
//! read that decides a write stay on the primary, which is the only pool they are given.
//!
//! **Staleness.** Before each read the standby's replay lag is measured ([`replay_lag`]); the
//! read goes to the standby only when it is in recovery and at most `max_lag` behind, else to
//! the primary. Replay only moves forward, so what the read returns is at most that lag older
//! than the primary was when it was measured; the answer carries it ([`Source`]).
//!
//! **Commit-safe order.** A hot standby knows which of the primary's transactions are still
//! running (it replays their xids, and fills a gap in the xids it has seen as running until the
//! primary says otherwise), so `pg_current_snapshot()` there has an xmin no later than the
//! primary's when it wrote the WAL replayed so far: `event_log_horizon()` holds on the standby
//! as it does on the primary, and a reader of the global log skips nothing however it switches
//! between the two.

use sqlx::PgPool;
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::{Result, StoreError};

/// Where a read was served from, and how stale it may be.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Source {
    Primary,
    /// The standby, at most `lag` behind the primary.
    Replica {
        lag: Duration,
    },
}

impl Source {
    /// `primary` or `replica` (the `Arnela-Read-Source` header).
    pub fn name(self) -> &'static str {
        match self {
            Source::Primary => "primary",
            Source::Replica { .. } => "replica",
        }
    }

    /// How far behind the primary the answer may be, in milliseconds (0 from the primary;
    /// the `Arnela-Read-Lag-Ms` header).
    pub fn lag_ms(self) -> u64 {
        match self {
            Source::Primary => 0,
            Source::Replica { lag } => u64::try_from(lag.as_millis()).unwrap_or(u64::MAX),
        }
    }
}

/// The primary, and the standby when one is configured.
#[derive(Clone)]
pub struct Reads {
    primary: PgPool,
    replica: Option<Replica>,
    served: Arc<Served>,
}

/// Reads served so far by each server (for the metrics).
#[derive(Debug, Default)]
struct Served {
    replica: AtomicU64,
    primary: AtomicU64,
}

#[derive(Clone)]
struct Replica {
    pool: PgPool,
    max_lag: Duration,
    /// How long the lag measurement may take before the read goes to the primary.
    timeout: Duration,
    /// The last reason a read went to the primary (or that it did not), so that a standby
    /// that is down or behind is logged once when that starts and once when it ends, not at
    /// every request.
    state: Arc<AtomicU8>,
    /// The primary, to check once that the standby holds its database.
    primary: PgPool,
    /// [`Identity`] of the standby's database, once checked.
    identity: Arc<AtomicU8>,
}

/// Whether the standby was found to hold the primary's database ([`Replica::identity`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Identity {
    Unchecked = 0,
    Same = 1,
    Other = 2,
}

/// Whether the standby serves the audit reads now, and if not why ([`Replica::state`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum State {
    Serving = 0,
    Behind = 1,
    NotStandby = 2,
    Unreachable = 3,
    /// It holds another database than the primary's (not a standby of it): never read.
    OtherDatabase = 4,
}

impl Reads {
    /// Every read from the primary.
    pub fn primary(pool: PgPool) -> Reads {
        Reads {
            primary: pool,
            replica: None,
            served: Arc::default(),
        }
    }

    /// Reads from `replica` while it is at most `max_lag` behind; `timeout` bounds the lag's
    /// measurement.
    pub fn with_replica(
        primary: PgPool,
        replica: PgPool,
        max_lag: Duration,
        timeout: Duration,
    ) -> Reads {
        Reads {
            replica: Some(Replica {
                pool: replica,
                max_lag,
                timeout,
                state: Arc::new(AtomicU8::new(State::Serving as u8)),
                primary: primary.clone(),
                identity: Arc::new(AtomicU8::new(Identity::Unchecked as u8)),
            }),
            primary,
            served: Arc::default(),
        }
    }

    pub fn has_replica(&self) -> bool {
        self.replica.is_some()
    }

    /// Whether the standby holds another database than the primary's (the mismatch, naming
    /// both); `None` too when no standby is configured. Checked once (start-up asks first).
    pub async fn check_replica_database(&self) -> Result<Option<String>> {
        match &self.replica {
            Some(replica) => replica.check_database().await,
            None => Ok(None),
        }
    }

    /// The standby's state and lag now (for `/health`), when one is configured.
    pub async fn replica_state(&self) -> Option<(State, Option<Duration>)> {
        let replica = self.replica.as_ref()?;
        let (state, lag, _) = replica.measure().await;
        Some((state, lag))
    }

    /// Runs `read` on the standby when it may serve it, else (or when the standby fails while
    /// reading) on the primary. An error of the primary is returned.
    pub async fn read<T, F, Fut>(&self, read: F) -> Result<(T, Source)>
    where
        F: Fn(PgPool) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        if let Some(replica) = &self.replica {
            if let Some(lag) = replica.usable_lag().await {
                match read(replica.pool.clone()).await {
                    Ok(value) => {
                        self.served.replica.fetch_add(1, Ordering::Relaxed);
                        return Ok((value, Source::Replica { lag }));
                    }
                    Err(StoreError::Database(e)) => {
                        replica.enter(State::Unreachable, &e.to_string());
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        let value = read(self.primary.clone()).await?;
        self.served.primary.fetch_add(1, Ordering::Relaxed);
        Ok((value, Source::Primary))
    }

    /// Audit reads served so far: by the standby, by the primary.
    pub fn served(&self) -> (u64, u64) {
        (
            self.served.replica.load(Ordering::Relaxed),
            self.served.primary.load(Ordering::Relaxed),
        )
    }

    /// Runs `read` on the primary.
    pub async fn read_primary<T, F, Fut>(&self, read: F) -> Result<(T, Source)>
    where
        F: FnOnce(PgPool) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let value = read(self.primary.clone()).await?;
        self.served.primary.fetch_add(1, Ordering::Relaxed);
        Ok((value, Source::Primary))
    }
}

impl Replica {
    /// The standby's lag when a read may go there now.
    async fn usable_lag(&self) -> Option<Duration> {
        let (state, lag, why) = self.measure().await;
        self.enter(state, &why);
        lag.filter(|_| state == State::Serving)
    }

    /// Where reads may go now, the lag when it was measured, and why not the standby. The
    /// first time the standby answers, it is checked to hold the primary's database (start-up
    /// checks it too, but a standby down then is only checked here).
    async fn measure(&self) -> (State, Option<Duration>, String) {
        match tokio::time::timeout(self.timeout, self.check_database()).await {
            Err(_) => {
                let why = "its database was not checked in time".into();
                return (State::Unreachable, None, why);
            }
            Ok(Err(e)) => return (State::Unreachable, None, e.to_string()),
            Ok(Ok(Some(mismatch))) => return (State::OtherDatabase, None, mismatch),
            Ok(Ok(None)) => {}
        }
        match tokio::time::timeout(self.timeout, replay_lag(&self.pool)).await {
            Err(_) => (
                State::Unreachable,
                None,
                "the lag was not measured in time".into(),
            ),
            Ok(Err(e)) => (State::Unreachable, None, e.to_string()),
            Ok(Ok(None)) => (State::NotStandby, None, "it is not in recovery".into()),
            Ok(Ok(Some(lag))) if lag > self.max_lag => (
                State::Behind,
                Some(lag),
                format!("{} ms behind", lag.as_millis()),
            ),
            Ok(Ok(Some(lag))) => (State::Serving, Some(lag), String::new()),
        }
    }

    /// Whether the standby holds another database than the primary's (the mismatch), checked
    /// once: the answer is kept.
    async fn check_database(&self) -> Result<Option<String>> {
        match self.identity.load(Ordering::Relaxed) {
            x if x == Identity::Same as u8 => return Ok(None),
            x if x == Identity::Other as u8 => return Ok(Some("another database".into())),
            _ => {}
        }
        let mismatch = check_same_database(&self.primary, &self.pool).await?;
        let known = if mismatch.is_some() {
            Identity::Other
        } else {
            Identity::Same
        };
        self.identity.store(known as u8, Ordering::Relaxed);
        Ok(mismatch)
    }

    /// Logs a change of where reads go.
    fn enter(&self, state: State, why: &str) {
        let before = self.state.swap(state as u8, Ordering::Relaxed);
        if before == state as u8 {
            return;
        }
        if state == State::Serving {
            tracing::info!("the read replica serves the audit reads again");
        } else {
            tracing::warn!(
                reason = why,
                max_lag_ms = self.max_lag.as_millis() as u64,
                "the read replica cannot serve reads now; reading from the primary"
            );
        }
    }
}

/// How far the server behind `pool` is behind its primary: `None` when it is not a standby
/// (not in recovery: a primary, or a standby that was promoted). Zero when its WAL receiver runs
/// and it has replayed all the WAL it received; otherwise the age of the last transaction it
/// replayed (on the primary's clock, as the commit records carry it), which also covers a
/// standby that lost its primary and replays nothing. (A role without `pg_read_all_stats` sees
/// the receiver's process but not its status, so a running receiver counts as streaming.)
pub async fn replay_lag(pool: &PgPool) -> Result<Option<Duration>> {
    let row = sqlx::query!(
        r#"SELECT pg_is_in_recovery() AS "standby!",
                  (pg_last_wal_receive_lsn() IS NOT DISTINCT FROM pg_last_wal_replay_lsn()
                   AND EXISTS (SELECT 1 FROM pg_stat_wal_receiver
                               WHERE coalesce(status, 'streaming') = 'streaming')) AS "caught_up!",
                  EXTRACT(epoch FROM clock_timestamp() - pg_last_xact_replay_timestamp())::float8
                      AS "age""#
    )
    .fetch_one(pool)
    .await?;
    if !row.standby {
        return Ok(None);
    }
    if row.caught_up {
        return Ok(Some(Duration::ZERO));
    }
    // nothing replayed since the standby started: its age is unknown
    let age = row.age.unwrap_or(f64::INFINITY).max(0.0);
    Ok(Some(
        Duration::try_from_secs_f64(age).unwrap_or(Duration::MAX),
    ))
}

/// Checks that `replica` holds the same database as `primary` (a standby keeps its primary's
/// system identifier): reads from another database would be wrong, not stale.
pub async fn check_same_database(primary: &PgPool, replica: &PgPool) -> Result<Option<String>> {
    let (p, r) = (
        super::database_identity(primary).await?,
        super::database_identity(replica).await?,
    );
    let same = p.database == r.database
        && match (&p.system_identifier, &r.system_identifier) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        };
    Ok((!same).then(|| {
        format!(
            "DATABASE_READ_URL is database {} of system {}, but the primary is database {} of \
             system {}: a read replica must be a standby of the primary",
            r.database,
            r.system_identifier.as_deref().unwrap_or("(unknown)"),
            p.database,
            p.system_identifier.as_deref().unwrap_or("(unknown)")
        )
    }))
}
