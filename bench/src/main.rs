//! `arnela-bench`: the load generator of `bench/run.sh`, a binary of its own so that the
//! service's library holds only the service. It measures a running Arnela (see [`load`]) and
//! prints a table; `--json FILE` also writes the figures as JSON.

use anyhow::Context;
use arnela::api::auth::{Auth, Role};
use arnela::config::Settings;
use clap::Parser;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

mod load;

/// Measure a running service: enqueue rates and latencies, end-to-end throughput, start latency
/// at a fixed offered rate, peak RSS (see `bench/run.sh` for the full comparison).
#[derive(Debug, Parser)]
#[command(name = "arnela-bench", version)]
struct Cli {
    #[command(flatten)]
    options: load::BenchOptions,
    /// Also write the figures as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    // The load generator acts as an admin for the run's length (and a margin), with a token
    // signed with the service's JWT_SECRET.
    let auth = Auth::new(&Settings::jwt_secret_from_env()?)?;
    let token = auth.mint(Role::Admin, Duration::from_secs(24 * 3600), "bench");
    let report = load::run(&cli.options, &token).await?;
    println!("{}", load::table(&report));
    if let Some(path) = cli.json {
        std::fs::write(&path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}
