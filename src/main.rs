//! The `arnela` binary: parse the command line, start telemetry, load settings, run.

use anyhow::Context;
use arnela::api::auth::{Auth, Role};
use arnela::app::{shutdown_signal, App, Roles};
use arnela::cli::{AuditCommand, Cli, Command};
use arnela::config::Settings;
use clap::Parser;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    // flushes the last spans when main returns
    let _telemetry = arnela::telemetry::init();
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("arnela: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `arnela audit verify`: every chain (tasks and schedules) or one task's; every broken link is
/// printed (text or `--json`), and the exit status is 2 when any is found.
async fn audit_verify(
    pool: &sqlx::PgPool,
    task: Option<uuid::Uuid>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    use std::io::{IsTerminal, Write};
    let started = std::time::Instant::now();
    let report = match task {
        Some(id) => arnela::store::audit::verify_task(pool, id)
            .await?
            .ok_or_else(|| anyhow::anyhow!("task {id} has no events and no projection row"))?,
        None => {
            let terminal = std::io::stderr().is_terminal() && !json;
            let mut last_shown = std::time::Instant::now();
            arnela::store::audit::verify(pool, |p| {
                if terminal && last_shown.elapsed() >= Duration::from_millis(500) {
                    last_shown = std::time::Instant::now();
                    let rate = p.events as f64 / started.elapsed().as_secs_f64().max(0.001);
                    eprint!(
                        "\rverified {} tasks, {} events ({rate:.0} events/s), {} broken   ",
                        p.tasks, p.events, p.broken
                    );
                    std::io::stderr().flush().ok();
                }
            })
            .await?
        }
    };
    // schedules' change logs are checked with the whole log (not for one task)
    let (schedule_events, broken_schedules) = match task {
        None => arnela::store::schedules::verify(pool).await?,
        Some(_) => (0, Vec::new()),
    };
    let ok = report.ok() && broken_schedules.is_empty();
    let seconds = started.elapsed().as_secs_f64();
    if json {
        let doc = serde_json::json!({
            "ok": ok,
            "tasks": report.tasks,
            "events": report.events,
            "schedule_events": schedule_events,
            "broken_total": report.broken_total,
            "broken": report.broken,
            "broken_schedules": broken_schedules,
            "seconds": seconds,
        });
        println!("{doc}");
    } else {
        if std::io::stderr().is_terminal() && task.is_none() {
            eprintln!();
        }
        for b in &report.broken {
            println!(
                "BROKEN: task {} event {}: {}",
                b.task_id, b.sequence, b.reason
            );
        }
        if report.broken_total > report.broken.len() as u64 {
            println!(
                "... and {} more broken tasks",
                report.broken_total - report.broken.len() as u64
            );
        }
        for b in &broken_schedules {
            println!(
                "BROKEN: schedule {} event {}: {}",
                b.schedule_id, b.sequence, b.reason
            );
        }
        if ok {
            println!(
                "ok: {} tasks, {} events, {} schedule events, every hash chain verifies ({seconds:.1} s)",
                report.tasks, report.events, schedule_events
            );
        } else {
            println!(
                "FAILED: {} of {} tasks and {} schedules have a broken chain",
                report.broken_total,
                report.tasks,
                broken_schedules.len()
            );
        }
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Openapi { output } => {
            let spec = arnela::api::spec_json();
            match output {
                Some(path) => std::fs::write(&path, spec + "\n")
                    .with_context(|| format!("cannot write {}", path.display()))?,
                None => println!("{spec}"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Token {
            role,
            ttl,
            subject,
            tenant,
            patterns,
        } => {
            if ttl > role.max_ttl() {
                anyhow::bail!(
                    "a {role} token may live at most {} days; ask for a shorter --ttl",
                    role.max_ttl().as_secs() / 86_400
                );
            }
            let auth = Auth::new(&Settings::jwt_secret_from_env()?)?;
            let token = if patterns {
                auth.mint_with_patterns(role, ttl, &subject, tenant.as_deref())
            } else {
                auth.mint_for(role, ttl, &subject, tenant.as_deref())
            };
            println!("{token}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench { options, json } => {
            // The load generator acts as an admin for the run's length (and a margin).
            let auth = Auth::new(&Settings::jwt_secret_from_env()?)?;
            let token = auth.mint(Role::Admin, Duration::from_secs(24 * 3600), "bench");
            let report = arnela::bench::run(&options, &token).await?;
            println!("{}", arnela::bench::table(&report));
            if let Some(path) = json {
                std::fs::write(&path, serde_json::to_string_pretty(&report)?)
                    .with_context(|| format!("cannot write {}", path.display()))?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Tasks { target, command } => {
            arnela::ops::run(target, command).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Healthcheck { url } => {
            let url = match url {
                Some(u) => u,
                None => {
                    let port = std::env::var("APP_PORT").unwrap_or_else(|_| "8080".into());
                    format!("http://127.0.0.1:{port}/health/live")
                }
            };
            arnela::healthcheck::check(&url).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Migrate => {
            // the tables' owner, when the service's own role is a runtime role
            let settings = Settings::from_env()?;
            let mut options = settings.database.connect_options()?;
            if let Ok(user) = std::env::var("DB_MIGRATION_USER") {
                if !user.trim().is_empty() {
                    options = options.username(user.trim());
                    let password = std::env::var("DB_MIGRATION_PASSWORD").unwrap_or_default();
                    options = options.password(&password);
                }
            }
            let pool = arnela::store::connect(options, 2).await?;
            arnela::store::migrate(&pool).await?;
            tracing::info!("migrations applied");
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit {
            command: AuditCommand::Verify { task, json },
        } => {
            let pool = connect_db().await?;
            audit_verify(&pool, task, json).await
        }
        Command::Serve | Command::Api | Command::Relay | Command::Worker => {
            let roles = match cli.command {
                Command::Serve => Roles::ALL,
                Command::Api => Roles {
                    api: true,
                    relay: false,
                    workers: false,
                },
                Command::Relay => Roles {
                    api: false,
                    relay: true,
                    workers: false,
                },
                _ => Roles {
                    api: false,
                    relay: false,
                    workers: true,
                },
            };
            let settings = Settings::from_env()?;
            let addr = SocketAddr::from(([0, 0, 0, 0], settings.port));
            let app = App::build(settings).await?;
            let token = app.shutdown.clone();
            tokio::spawn(async move {
                shutdown_signal().await;
                token.cancel();
            });
            let result = app.run(roles, addr).await;
            app.close().await;
            result?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// A small pool for the one-shot database commands (`migrate`, `audit verify`).
async fn connect_db() -> anyhow::Result<sqlx::PgPool> {
    let settings = Settings::from_env()?;
    Ok(arnela::store::connect(settings.database.connect_options()?, 2).await?)
}
