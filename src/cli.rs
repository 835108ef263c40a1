//! The command line: one binary, one subcommand per role or operator task.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use uuid::Uuid;

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
    /// Auditor tools.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Measure a running service: enqueue rates and latencies, end-to-end throughput, start
    /// latency at a fixed offered rate, peak RSS (see `bench/run.sh` for the full comparison).
    Bench {
        /// The service's base URL.
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        url: String,
        /// The service's database (the bench reads the event log for timings).
        #[arg(long, env = "DATABASE_URL")]
        database_url: String,
        /// Seconds per single-enqueue level (and of the latency run, at least 5).
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Concurrent connections of the single-enqueue levels.
        #[arg(long, value_delimiter = ',', default_value = "1,8,32,64")]
        concurrency: Vec<usize>,
        /// Tasks in the end-to-end run.
        #[arg(long, default_value_t = 10_000)]
        tasks: usize,
        /// Offered rate of the latency run (tasks/s); 0 = half the lower of the end-to-end and
        /// single-enqueue rates.
        #[arg(long, default_value_t = 0.0)]
        rate: f64,
        /// The service's process id, to report its peak RSS.
        #[arg(long)]
        service_pid: Option<u32>,
        /// Also write the figures as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Only measure `GET /tasks/{id}/events` on the history the database already holds.
        #[arg(long)]
        history_only: bool,
    },
    /// Exit 0 if the local API answers /health/live (for container health checks).
    Healthcheck {
        /// The URL to check; default http://127.0.0.1:$APP_PORT/health/live.
        #[arg(long)]
        url: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Re-check every task's hash chain (or one task's) and name the first broken link.
    Verify {
        /// Only this task.
        #[arg(long)]
        task: Option<Uuid>,
    },
}
