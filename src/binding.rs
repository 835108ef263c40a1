//! One Redis namespace serves one database (design invariant 8).
//!
//! Deliveries name a task id only; a process attached to another database than the one whose
//! relay filled `{prefix}:tasks` would find none of those tasks. So the namespace records which
//! database it serves, under `{prefix}:tasks:database`: the Postgres cluster's system identifier
//! and the database's name (JSON `{"system_identifier","database"}`; never a host, user or
//! password). It is set with `SET NX`:
//!
//! - at start ([`Binding::check`], from [`crate::app::App::build`]): a process whose database is
//!   not the one recorded refuses to start;
//! - with the seeded marker ([`Binding::mark_seeded`], by relays before every batch and rescuers
//!   every pass): after a Redis flush whoever re-seeds re-establishes the binding, and a
//!   namespace bound to another database is never marked seeded by this one;
//! - by workers before they take deliveries ([`Binding::verify`], re-read at most every
//!   [`VERIFY_EVERY`]).
//!
//! A mismatch found later (another deployment re-bound the namespace after a flush) makes each
//! of those steps return [`BindingError::Mismatch`] instead of working; their loops log it as an
//! error and try again, so the process resumes once an operator fixes the configuration or
//! deletes the key on purpose (after moving the database: the next process to start binds it).
//!
//! This process's identity is read once, on first use, and kept for the process's life.

use crate::queue::RedisConn;
use sqlx::PgPool;
use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::sync::OnceCell;

use crate::queue::{self, Keys, QueueError};
use crate::store::{self, DatabaseIdentity, StoreError};

/// How long a worker trusts its last look at the binding before it reads it again.
pub const VERIFY_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum BindingError {
    /// The namespace serves another database.
    #[error(
        "the Redis namespace {prefix:?} serves {bound}, but this process is connected to \
         {ours}; refusing to use it (if the database was moved on purpose, delete the key \
         {key} and restart)"
    )]
    Mismatch {
        prefix: String,
        key: String,
        bound: Described,
        ours: Described,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Queue(#[from] QueueError),
}

pub type Result<T, E = BindingError> = std::result::Result<T, E>;

/// A binding as the error message shows it: `database "x" of Postgres cluster 123`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Described(String);

impl Described {
    fn of(identity: &DatabaseIdentity) -> Described {
        let cluster = identity
            .system_identifier
            .as_deref()
            .unwrap_or("(system identifier unreadable)");
        Described(format!(
            "database {:?} of Postgres cluster {cluster}",
            identity.database
        ))
    }

    /// What the key holds, read as a binding if it is one.
    fn stored(value: &str) -> Described {
        match serde_json::from_str::<DatabaseIdentity>(value) {
            Ok(identity) => Described::of(&identity),
            Err(_) => Described(format!("an unreadable binding {value:?}")),
        }
    }
}

impl fmt::Display for Described {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The binding of one namespace to the database of one pool.
pub struct Binding {
    pool: PgPool,
    keys: Keys,
    /// This process's identity, serialized as stored in Redis.
    ours: OnceCell<(DatabaseIdentity, String)>,
    /// When the binding was last seen to be ours (for [`Binding::verify`]).
    verified: Mutex<Option<Instant>>,
}

impl Binding {
    /// Cheap: nothing is read until the binding is first used.
    pub fn new(pool: PgPool, keys: Keys) -> Binding {
        Binding {
            pool,
            keys,
            ours: OnceCell::new(),
            verified: Mutex::new(None),
        }
    }

    /// This process's database identity, and its stored form.
    pub async fn identity(&self) -> Result<&(DatabaseIdentity, String)> {
        self.ours
            .get_or_try_init(|| async {
                let identity = store::database_identity(&self.pool).await?;
                if identity.system_identifier.is_none() {
                    tracing::warn!(
                        database = %identity.database,
                        "cannot read pg_control_system(): the Redis binding records the database \
                         name only"
                    );
                }
                let stored = serde_json::to_string(&identity).expect("identities serialize");
                Ok((identity, stored))
            })
            .await
    }

    /// Binds the namespace if it is unbound; fails if it is bound to another database.
    pub async fn check(&self, conn: &mut RedisConn) -> Result<()> {
        let (_, ours) = self.identity().await?;
        let bound = queue::bind(conn, &self.keys, ours).await?;
        self.compare(&bound).await
    }

    /// [`Binding::check`] at most every [`VERIFY_EVERY`] while it succeeds (every call while it
    /// fails).
    pub async fn verify(&self, conn: &mut RedisConn) -> Result<()> {
        let fresh = self
            .verified
            .lock()
            .expect("binding verified")
            .is_some_and(|at| at.elapsed() < VERIFY_EVERY);
        if fresh {
            return Ok(());
        }
        self.check(conn).await
    }

    /// Sets the seeded marker (see [`queue::mark_seeded_bound`]) if the namespace is ours:
    /// whether it was missing (everything must be published again) and its value.
    pub async fn mark_seeded(&self, conn: &mut RedisConn) -> Result<(bool, Option<String>)> {
        let (_, ours) = self.identity().await?;
        let mark = queue::mark_seeded_bound(conn, &self.keys, ours).await?;
        self.compare(&mark.bound_to).await?;
        Ok((mark.reseeded, mark.epoch))
    }

    async fn compare(&self, bound: &str) -> Result<()> {
        let (identity, ours) = self.identity().await?;
        let mut verified = self.verified.lock().expect("binding verified");
        if bound == ours {
            *verified = Some(Instant::now());
            return Ok(());
        }
        *verified = None;
        Err(BindingError::Mismatch {
            prefix: self.keys.prefix().to_owned(),
            key: self.keys.database(),
            bound: Described::stored(bound),
            ours: Described::of(identity),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mismatch_names_both_databases_and_the_key() {
        let ours = DatabaseIdentity {
            system_identifier: Some("111".into()),
            database: "b".into(),
        };
        let theirs = serde_json::to_string(&DatabaseIdentity {
            system_identifier: Some("222".into()),
            database: "a".into(),
        })
        .unwrap();
        let e = BindingError::Mismatch {
            prefix: "arnela".into(),
            key: Keys::default().database(),
            bound: Described::stored(&theirs),
            ours: Described::of(&ours),
        };
        let text = e.to_string();
        assert!(
            text.contains(r#"database "a" of Postgres cluster 222"#),
            "{text}"
        );
        assert!(
            text.contains(r#"database "b" of Postgres cluster 111"#),
            "{text}"
        );
        assert!(text.contains("arnela:tasks:database"), "{text}");
    }
}
