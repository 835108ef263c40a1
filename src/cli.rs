//! The command line: one binary, one subcommand per role or operator task.

use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "arnela",
    version,
    about = "Arnela event-sourced task processor"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run everything in one process: the HTTP API, the outbox relay, the workers and the rescuer.
    Serve,
    /// Run the HTTP API only.
    Api,
    /// Run the outbox relay only.
    Relay,
    /// Run the worker pool (and a rescuer) only.
    Worker,
    /// Apply the database migrations and exit.
    Migrate,
    /// Print the OpenAPI document (or write it to a file).
    Openapi {
        /// Write to this file instead of standard output.
        #[arg(long)]
        output: Option<PathBuf>,
    },
    /// Print a bearer token for the HTTP API, signed with JWT_SECRET (connects to nothing).
    Token {
        /// What the holder may do: producer, auditor or admin.
        #[arg(long)]
        role: crate::api::auth::Role,
        /// How long the token is valid, e.g. 3600s, 30m, 12h or 7d (at most 366d).
        #[arg(long, value_parser = crate::api::auth::parse_ttl)]
        ttl: std::time::Duration,
        /// Who holds it (the token's `sub`, recorded as who requeued or cancelled a task).
        #[arg(long, default_value = "cli")]
        subject: String,
        /// The tenant the holder acts for: a producer reads and deduplicates only its tenant's
        /// tasks (default: the subject).
        #[arg(long)]
        tenant: Option<String>,
        /// The holder may declare glob patterns in a task's `invalidates` (admins always may).
        #[arg(long)]
        patterns: bool,
    },
    /// Operator commands against a running service: list, show, retry, cancel, bulk actions
    /// on dead letters, pause and resume task types, follow the event log.
    Tasks {
        #[command(flatten)]
        target: crate::ops::Target,
        #[command(subcommand)]
        command: crate::ops::TasksCommand,
    },
    /// Auditor tools.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Exit 0 if the local API answers /health/live (for container health checks).
    Healthcheck {
        /// The URL to check; default http://127.0.0.1:$APP_PORT/health/live.
        #[arg(long)]
        url: Option<String>,
    },
    /// Print every setting (environment variable) with its default and meaning, as README's
    /// Markdown tables.
    Settings,
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Re-check every hash chain (tasks and schedules), or one task's, and name every broken
    /// link; exits 2 if any. Reads in pages of 1,000 tasks, each in a short transaction.
    Verify {
        /// Only this task.
        #[arg(long)]
        task: Option<crate::domain::TaskId>,
        /// Print the report as one JSON document.
        #[arg(long)]
        json: bool,
        /// The Ed25519 public key (64 hex digits) every checkpoint must be signed with; default
        /// the public key of AUDIT_SIGNING_KEY when that is set.
        #[arg(long, env = "AUDIT_PUBLIC_KEY")]
        public_key: Option<String>,
        /// An exported copy of the checkpoints (`arnela audit checkpoints > FILE`): each must
        /// still be in the database, unchanged.
        #[arg(long, value_name = "FILE")]
        checkpoints: Option<PathBuf>,
        /// Check archives instead, without any database (`arnela audit archive` wrote them;
        /// the data file or its manifest, repeated oldest first to link chains across them).
        #[arg(long, value_name = "FILE", num_args = 1.., conflicts_with_all = ["task", "checkpoints"])]
        archive: Vec<PathBuf>,
    },
    /// Archive the event log's months before `--before` (e.g. 2026-06): write each closed
    /// monthly partition, with the checkpoints naming its events, to a signed
    /// `.jsonl.zst` file and manifest in `--dir`, verify them, then drop the partition. Runs as
    /// the tables' owner (DB_MIGRATION_USER, as `arnela migrate`) and needs AUDIT_SIGNING_KEY.
    Archive {
        /// The first month kept (YYYY-MM); every month before it is archived.
        #[arg(long, value_parser = parse_month)]
        before: chrono::DateTime<chrono::Utc>,
        /// Where the archive files go.
        #[arg(long, default_value = "archives")]
        dir: PathBuf,
        /// How long to wait for the log's lock when dropping a partition, in seconds.
        #[arg(long, default_value_t = 10)]
        lock_timeout_secs: u64,
    },
    /// Verify archives and put their events back into the database DATABASE_URL names (a
    /// scratch database, migrated), where `arnela audit verify` then checks them; runs as the
    /// tables' owner (DB_MIGRATION_USER).
    Restore {
        /// The archives (data files or manifests), oldest first.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// The Ed25519 public key (64 hex digits) every manifest must be signed with.
        #[arg(long, env = "AUDIT_PUBLIC_KEY")]
        public_key: Option<String>,
    },
    /// Check an exported copy of the checkpoints without the database: numbering, links, hashes
    /// and signatures; exits 2 if any does not hold.
    VerifyCheckpoints {
        /// The export: JSON lines as `arnela audit checkpoints` prints them.
        file: PathBuf,
        /// The Ed25519 public key (64 hex digits) every checkpoint must be signed with.
        #[arg(long, env = "AUDIT_PUBLIC_KEY")]
        public_key: Option<String>,
    },
    /// Print a new AUDIT_SIGNING_KEY, its public key, and a new AUDIT_DATA_KEY (connects to
    /// nothing).
    Keygen,
    /// Write a checkpoint of the log now (signed with AUDIT_SIGNING_KEY).
    Checkpoint,
    /// Print every checkpoint as JSON lines, for an auditor to keep outside the database.
    Checkpoints,
}

/// `YYYY-MM`: the first instant of that month, UTC.
pub fn parse_month(s: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    let day = chrono::NaiveDate::parse_from_str(&format!("{}-01", s.trim()), "%Y-%m-%d")
        .map_err(|_| format!("{s:?} is not a month (YYYY-MM)"))?;
    Ok(crate::store::retention::Partition::of(
        day.and_hms_opt(0, 0, 0).expect("midnight").and_utc(),
    )
    .starts_at)
}
