//! Postgres persistence: the only module that speaks SQL.
//!
//! - [`events`]: appends to `task_events` with an expected version and the hash chain, and reads
//!   the per-task history and the commit-safe global log;
//! - [`tasks`]: the transactional enqueue (event + projection + outbox in one statement), the
//!   current-state queries and keyset listing;
//! - [`transition`]: the one path of every state change after enqueue (relay, claim,
//!   completion, rescuer, operator): lock, decide, record, and the outbox changes derived from
//!   the events;
//! - [`outbox`]: deliveries waiting to be published or in transit;
//! - [`pauses`]: task types an operator paused;
//! - [`projection`]: projector checkpoints and the read models projected from the log;
//! - [`audit`]: re-checks the hash chains;
//! - [`checkpoints`]: the signed checkpoints of the log;
//! - [`retention`]: the log's monthly partitions and the retirement of finished tasks;
//! - [`archive`]: reading, removing and restoring archived months of the log;
//! - [`replica`]: the audit reads a streaming standby may serve, and how stale they may be;
//! - [`database_identity`]: which database this is (the Redis namespace is bound to it).
//!
//! Writers take a [`Tx`] so that every event, the projection row it changes and the outbox row
//! that carries the task commit together or not at all.

pub mod archive;
pub mod audit;
pub mod checkpoints;
pub mod data_keys;
pub mod events;
pub mod failed_copies;
pub mod operator;
pub mod outbox;
pub mod pauses;
pub mod projection;
pub mod replica;
pub mod retention;
pub mod schedules;
pub mod tasks;
pub mod transition;
mod types;

use crate::domain::TaskId;
use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Postgres, Transaction};
use std::time::Duration;
use uuid::Uuid;

use crate::domain::task::InvalidTransition;

/// Migrations embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Everything that can go wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("task {0} not found")]
    NotFound(Uuid),
    /// Another writer appended to the task since it was read.
    #[error("task {task_id} changed concurrently (expected version {expected})")]
    VersionConflict { task_id: TaskId, expected: i32 },
    /// The idempotency key is already used by a task with a different request.
    #[error("idempotency key {key:?} is already used by task {existing} with a different request")]
    IdempotencyConflict { key: String, existing: TaskId },
    #[error(transparent)]
    Transition(#[from] InvalidTransition),
    /// A requeue would give the task more attempts than a task may have.
    #[error("task {task_id} has had {used} attempts; a task may have at most {max}")]
    AttemptBudget {
        task_id: TaskId,
        used: i32,
        max: i32,
    },
    /// The task's personal fields were stored as they came (before `AUDIT_DATA_KEY` was set):
    /// erasing them would mean rewriting the append-only log.
    #[error("task {0} was stored without a data key: its personal data cannot be erased")]
    NotErasable(TaskId),
    /// A stored row that cannot be read back (an unknown event type, a bad status).
    #[error("corrupt row: {0}")]
    Corrupt(String),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// A transaction that also counts the events appended in it: each event's global position is
/// `(transaction id << 20) + n` (see the first migration), so a transaction may append at most
/// [`MAX_EVENTS_PER_TX`] events.
pub struct Tx {
    inner: Conn,
    appended: i64,
    /// The position of slot 0 and the start time of this transaction, once read.
    base: Option<(i64, DateTime<Utc>)>,
}

enum Conn {
    Transaction(Transaction<'static, Postgres>),
    /// No explicit transaction: each statement commits by itself. Only for callers whose only
    /// write is one statement (it is atomic on its own), saving the BEGIN and COMMIT round trips.
    Autocommit(sqlx::pool::PoolConnection<Postgres>),
}

/// Events one transaction may append (the low 20 bits of a position).
pub const MAX_EVENTS_PER_TX: i64 = 1 << 20;

impl Tx {
    pub async fn begin(pool: &PgPool) -> Result<Tx> {
        Ok(Tx {
            inner: Conn::Transaction(pool.begin().await?),
            appended: 0,
            base: None,
        })
    }

    /// A transaction whose loss in a crash is harmless because it is replayed: a relay batch
    /// (its rows stay unpublished and are pushed again; the claim refuses the duplicate) or a
    /// projector step (its checkpoint stays behind and the same events are applied again). It
    /// commits without waiting for the WAL to reach the disk (`synchronous_commit = off`):
    /// Postgres flushes it within a fraction of a second, and any later durable commit, such as
    /// the claim of a delivery it published, flushes it first (the WAL is written in order).
    pub async fn begin_replayable(pool: &PgPool) -> Result<Tx> {
        Tx::begin_with(pool, &[("synchronous_commit", "off")]).await
    }

    /// A transaction for a read of a whole table (the audit, the counts per status): it plans
    /// with sequential and bitmap scans allowed again (see [`SESSION_SETTINGS`]), which is what
    /// such a read needs.
    pub async fn begin_scan(pool: &PgPool) -> Result<Tx> {
        Tx::begin_with(
            pool,
            &[("enable_seqscan", "on"), ("enable_bitmapscan", "on")],
        )
        .await
    }

    /// A transaction with these settings for its duration, set in one statement.
    async fn begin_with(pool: &PgPool, settings: &[(&str, &str)]) -> Result<Tx> {
        let mut tx = Tx::begin(pool).await?;
        let (names, values): (Vec<&str>, Vec<&str>) = settings.iter().copied().unzip();
        sqlx::query!(
            "SELECT set_config(s.name, s.value, true)
             FROM UNNEST($1::text[], $2::text[]) AS s(name, value)",
            &names as &[&str],
            &values as &[&str]
        )
        .fetch_all(tx.conn())
        .await?;
        Ok(tx)
    }

    /// A connection without an explicit transaction (see `Conn::Autocommit`): for a caller
    /// that writes with a single statement.
    pub async fn autocommit(pool: &PgPool) -> Result<Tx> {
        Ok(Tx {
            inner: Conn::Autocommit(pool.acquire().await?),
            appended: 0,
            base: None,
        })
    }

    pub async fn commit(self) -> Result<()> {
        if let Conn::Transaction(t) = self.inner {
            t.commit().await?;
        }
        Ok(())
    }

    /// Rolls back now. Dropping a `Tx` also rolls back, but only when its connection is next
    /// used: until then the transaction stays open on the server with its locks.
    pub async fn rollback(self) -> Result<()> {
        if let Conn::Transaction(t) = self.inner {
            t.rollback().await?;
        }
        Ok(())
    }

    pub fn conn(&mut self) -> &mut sqlx::PgConnection {
        match &mut self.inner {
            Conn::Transaction(t) => t,
            Conn::Autocommit(c) => c,
        }
    }

    /// The position of slot 0 of this transaction and its start time (`now()`, which
    /// `recorded_at` is), read once: hash version 2 of the events it appends covers both. Slot
    /// `n` is at the position `base + n` (see [`Tx::reserve`]).
    pub(crate) async fn placement_base(&mut self) -> Result<(i64, DateTime<Utc>)> {
        if let Some(base) = self.base {
            return Ok(base);
        }
        if matches!(self.inner, Conn::Autocommit(_)) {
            // each statement would be a transaction of its own, with a position of its own
            return Err(StoreError::Corrupt(
                "events appended outside a transaction must be hashed in their statement".into(),
            ));
        }
        let row = sqlx::query!(r#"SELECT event_position(0) AS "position!", now() AS "now!""#)
            .fetch_one(self.conn())
            .await?;
        let base = (row.position, row.now);
        self.base = Some(base);
        Ok(base)
    }

    /// Records the placement base read by a statement of this transaction that had to run
    /// anyway (`event_position(0)` and `now()`).
    pub(crate) fn set_placement_base(&mut self, position_base: i64, now: DateTime<Utc>) {
        debug_assert!(matches!(self.inner, Conn::Transaction(_)));
        self.base = Some((position_base, now));
    }

    /// Reserves `n` position slots and returns the first.
    pub(crate) fn reserve(&mut self, n: usize) -> i64 {
        let first = self.appended;
        self.appended += n as i64;
        assert!(
            self.appended <= MAX_EVENTS_PER_TX,
            "one transaction appended more than {MAX_EVENTS_PER_TX} events"
        );
        first
    }
}

/// Planner settings of the service's sessions. Every statement the service runs reads or writes
/// rows by key, or an ordered index range with a limit (the relay's due rows, a page of the log,
/// a projector's batch), in tables that stay in cache. Postgres plans them from statistics, and
/// on queue tables that churn thousands of rows a second those are always stale (or absent where
/// autovacuum is off): it then picks a sequential scan of the whole `tasks` or `outbox` table,
/// or a bitmap scan of the whole log past a cursor followed by a sort, for a batch of a few
/// hundred rows, and every batch costs time in proportion to the table. So:
///
/// - `random_page_cost` 1.1, the usual value for data in memory or on SSDs;
/// - sequential and bitmap scans only where no index can answer (they stay possible: a
///   disabled plan type is only made expensive). The few reads of a whole table run in
///   [`Tx::begin_scan`], which allows them again.
pub const SESSION_SETTINGS: [(&str, &str); 3] = [
    ("random_page_cost", "1.1"),
    ("enable_seqscan", "off"),
    ("enable_bitmapscan", "off"),
];

/// What a connection reaches: Postgres (or a pooler in session mode, which keeps a server
/// session per connection), or a pooler in transaction mode, which hands each transaction to
/// any server session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Direct,
    /// PgBouncer ≥ 1.21 with `pool_mode = transaction` and `max_prepared_statements` > 0 (it
    /// re-prepares the named statements of the pool's statement cache on whichever server
    /// session runs them). No startup `options` go through it: the [`SESSION_SETTINGS`] must
    /// be set on the role or database ([`session_settings_missing`]).
    TransactionPooler,
}

/// Connects to Postgres with a pool of `max_connections` (sessions get [`SESSION_SETTINGS`]).
pub async fn connect(options: PgConnectOptions, max_connections: u32) -> Result<PgPool> {
    connect_by(options, max_connections, Route::Direct).await
}

/// Connects with a pool of `max_connections` by `route`.
pub async fn connect_by(
    options: PgConnectOptions,
    max_connections: u32,
    route: Route,
) -> Result<PgPool> {
    let options = match route {
        Route::Direct => options.options(SESSION_SETTINGS),
        // PgBouncer refuses startup parameters it does not know (`options`,
        // `extra_float_digits`) unless told to ignore them, and would then drop them
        Route::TransactionPooler => options.extra_float_digits(None),
    };
    let pool = pool_options(max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(options)
        .await?;
    Ok(pool)
}

/// A connection used this recently is handed out without a test round trip.
const TESTED_IF_IDLE_FOR: Duration = Duration::from_millis(500);

/// The pool's settings: a connection idle for longer than [`TESTED_IF_IDLE_FOR`] is tested with
/// a round trip before it is handed out (a dead one is replaced); a more recent one is not,
/// because the pool already tested it when it was released. sqlx's default tests every
/// acquisition: two round trips beside the statement of a single `POST /tasks`, about a fifth of
/// the API's CPU. A connection that dies within that window (Postgres restarted in less than
/// half a second) fails its next statement once and is then closed.
fn pool_options(max_connections: u32) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for > TESTED_IF_IDLE_FOR {
                    sqlx::Connection::ping(conn).await?;
                }
                Ok(true)
            })
        })
}

/// The [`SESSION_SETTINGS`] a session of `pool` does not have (behind a transaction pooler they
/// come from `ALTER ROLE … SET` or `ALTER DATABASE … SET`, not from the connection).
pub async fn session_settings_missing(pool: &PgPool) -> Result<Vec<String>> {
    let (names, wanted): (Vec<&str>, Vec<&str>) = SESSION_SETTINGS.iter().copied().unzip();
    let missing = sqlx::query_scalar!(
        r#"SELECT s.name || ' = ' || s.wanted AS "setting!"
           FROM UNNEST($1::text[], $2::text[]) AS s(name, wanted)
           WHERE current_setting(s.name) <> s.wanted"#,
        &names as &[&str],
        &wanted as &[&str]
    )
    .fetch_all(pool)
    .await?;
    Ok(missing)
}

/// A pool that connects when first used, waiting at most `acquire_timeout` for a connection
/// (the read replica's: while it is down, a read goes to the primary without waiting long).
pub fn connect_lazy(
    options: PgConnectOptions,
    max_connections: u32,
    acquire_timeout: Duration,
) -> PgPool {
    pool_options(max_connections)
        .acquire_timeout(acquire_timeout)
        .connect_lazy_with(options.options(SESSION_SETTINGS))
}

/// The database could not be reached (connection refused or lost, pool timed out) or is shutting
/// down or restarting: worth trying again later, unlike an error the database answered with.
pub fn is_unavailable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::WorkerCrashed => true,
        // connection exceptions (08) and a server shutting down or restarting (57), as a
        // pooled connection reports at its next statement after Postgres went away
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|c| c.starts_with("08") || c.starts_with("57")),
        _ => false,
    }
}

/// One round trip: whether Postgres answers (for `/health`).
pub async fn ping(pool: &PgPool) -> Result<()> {
    sqlx::query!("SELECT 1 AS one").fetch_one(pool).await?;
    Ok(())
}

/// Applies the embedded migrations.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await
}

/// A `REPEATABLE READ` transaction (read-only when `read_only`): every statement in it sees
/// one snapshot, for reads that must agree with each other (a verify page, a checkpoint).
pub async fn begin_snapshot(
    pool: &PgPool,
    read_only: bool,
) -> Result<Transaction<'static, Postgres>> {
    let mut tx = pool.begin().await?;
    let sql = if read_only {
        "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"
    } else {
        "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ"
    };
    sqlx::query(sql).execute(&mut *tx).await?;
    Ok(tx)
}

/// The migrations of this build not yet applied to the database (all of them on a new one).
pub async fn pending_migrations(pool: &PgPool) -> Result<Vec<i64>> {
    let table = sqlx::query_scalar!("SELECT to_regclass('_sqlx_migrations')::text")
        .fetch_one(pool)
        .await?;
    let applied: Vec<i64> = match table {
        Some(_) => {
            // not checked: the table is sqlx's own, made by the first migration run
            sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
                .fetch_all(pool)
                .await?
        }
        None => Vec::new(),
    };
    Ok(MIGRATOR
        .iter()
        .map(|m| m.version)
        .filter(|v| !applied.contains(v))
        .collect())
}

/// What the connected role may do to the event log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolePowers {
    pub role: String,
    pub superuser: bool,
    /// It owns `task_events` (or acts as a role that does): it could disable the log's
    /// triggers and rewrite history. False before the first migration.
    pub owns_log: bool,
    /// It may create the schema's tables (run the migrations).
    pub may_migrate: bool,
}

/// The connected role's powers over the event log (see [`RolePowers`]).
pub async fn role_powers(pool: &PgPool) -> Result<RolePowers> {
    let row = sqlx::query!(
        r#"SELECT current_user::text AS "role!", r.rolsuper AS "superuser!",
                  coalesce((SELECT pg_has_role(current_user, c.relowner, 'USAGE')
                            FROM pg_class c WHERE c.oid = to_regclass('task_events')), false)
                    AS "owns_log!",
                  r.rolsuper OR has_schema_privilege(current_schema(), 'CREATE')
                    AS "may_migrate!"
           FROM pg_roles r WHERE r.rolname = current_user"#
    )
    .fetch_one(pool)
    .await?;
    let (role, superuser, owns_log, may_migrate) =
        (row.role, row.superuser, row.owns_log, row.may_migrate);
    Ok(RolePowers {
        role,
        superuser,
        owns_log,
        may_migrate,
    })
}

/// Whether the server runs autovacuum. `tasks` and the queue tables (`outbox`, `task_leases`)
/// are updated or emptied at every transition; their per-table vacuum thresholds (migrations 3
/// and 7) work only when autovacuum runs, else their dead rows pile up and every claim and
/// rescuer pass reads through them (measured: 617,000 dead outbox rows beside 50,000 live ones
/// after 300,000 tasks).
pub async fn autovacuum_runs(pool: &PgPool) -> Result<bool> {
    Ok(
        sqlx::query_scalar!(r#"SELECT current_setting('autovacuum')::bool AS "on!""#)
            .fetch_one(pool)
            .await?,
    )
}

/// Which database a pool is connected to: the cluster's system identifier (from
/// `pg_control_system()`, the same on a streaming replica promoted in its place, different for a
/// new cluster or a dump restored elsewhere) and the database's name. No host, user or password.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DatabaseIdentity {
    /// `None` where the role may not execute `pg_control_system()` (it is executable by every
    /// role by default; a hosting provider may revoke it).
    pub system_identifier: Option<String>,
    pub database: String,
}

/// Reads the identity of the database the pool is connected to.
pub async fn database_identity(pool: &PgPool) -> Result<DatabaseIdentity> {
    let full = sqlx::query!(
        r#"SELECT system_identifier::text AS "id!", current_database()::text AS "database!"
           FROM pg_control_system()"#
    )
    .fetch_one(pool)
    .await
    .map(|r| (r.id, r.database));
    match full {
        Ok((id, database)) => Ok(DatabaseIdentity {
            system_identifier: Some(id),
            database,
        }),
        // insufficient_privilege: fall back to the database's name alone
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42501") => {
            let database = sqlx::query_scalar!(r#"SELECT current_database()::text AS "database!""#)
                .fetch_one(pool)
                .await?;
            Ok(DatabaseIdentity {
                system_identifier: None,
                database,
            })
        }
        Err(e) => Err(e.into()),
    }
}
