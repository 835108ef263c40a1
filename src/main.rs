//! The `arnela` binary: parse the command line, start telemetry, load settings, run.

use anyhow::Context;
use arnela::api::auth::Auth;
use arnela::app::{shutdown_signal, App, Roles};
use arnela::cli::{AuditCommand, Cli, Command};
use arnela::config::Settings;
use clap::Parser;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

/// jemalloc instead of glibc's malloc: allocation is a large part of the service's CPU per task
/// (README "Performance": the A/B figures, and the allocators and tunables tried before).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let (telemetry_vars, telemetry_problem) = match arnela::config::TelemetryVars::from_env() {
        Ok(vars) => (vars, None),
        Err(e) => (arnela::config::variables::defaults(), Some(e)),
    };
    // flushes the last spans when main returns
    let _telemetry = arnela::telemetry::init(&telemetry_vars);
    if let Some(e) = telemetry_problem {
        tracing::error!(error = %e, "a log or trace variable is wrong; using the defaults");
    }
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
/// Reads an exported copy of the checkpoints: JSON lines as `arnela audit checkpoints` prints.
fn read_checkpoints(
    path: &std::path::Path,
) -> anyhow::Result<Vec<arnela::store::checkpoints::Checkpoint>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, line)| {
            let view: arnela::api::events::CheckpointView = serde_json::from_str(line)
                .with_context(|| format!("{} line {}", path.display(), i + 1))?;
            view.try_into()
                .map_err(|m: String| anyhow::anyhow!("{} line {}: {m}", path.display(), i + 1))
        })
        .collect()
}

/// The trusted public key: `--public-key` / AUDIT_PUBLIC_KEY, else AUDIT_SIGNING_KEY's.
fn trusted_key(public_key: Option<String>) -> anyhow::Result<Option<[u8; 32]>> {
    Ok(match public_key {
        Some(k) => Some(
            arnela::domain::checkpoint::verifying_key(&k)
                .map_err(|m| anyhow::anyhow!("--public-key {m}"))?
                .to_bytes(),
        ),
        None => Settings::from_env()?
            .audit_signing_key
            .map(|k| k.verifying_key().to_bytes()),
    })
}

async fn audit_verify(
    pool: &sqlx::PgPool,
    task: Option<arnela::domain::TaskId>,
    json: bool,
    trusted: Option<[u8; 32]>,
    exported: Option<Vec<arnela::store::checkpoints::Checkpoint>>,
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
    // the checkpoints too (not for one task)
    let mut checkpoints = match task {
        None => {
            Some(arnela::store::checkpoints::verify(pool, trusted.as_ref().map(|k| &k[..])).await?)
        }
        Some(_) => None,
    };
    if let (Some(report), Some(exported)) = (checkpoints.as_mut(), exported) {
        let missing = arnela::store::checkpoints::compare_exported(pool, &exported).await?;
        report.broken.extend(missing);
    }
    let checkpoint_problems: &[String] = checkpoints.as_ref().map_or(&[], |c| &c.broken);
    let ok = report.ok() && broken_schedules.is_empty() && checkpoint_problems.is_empty();
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
            "checkpoints": checkpoints,
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
        for p in checkpoint_problems {
            println!("BROKEN: {p}");
        }
        if let Some(c) = &checkpoints {
            println!(
                "checkpoints: {} ({} task heads){}",
                c.checkpoints,
                c.heads,
                if c.checkpoints == 0 {
                    ", none written yet (AUDIT_SIGNING_KEY)"
                } else {
                    ""
                }
            );
        }
        if ok {
            println!(
                "ok: {} tasks, {} events, {} schedule events, every hash chain verifies ({seconds:.1} s)",
                report.tasks, report.events, schedule_events
            );
        } else {
            println!(
                "FAILED: {} of {} tasks and {} schedules have a broken chain; {} checkpoint problems",
                report.broken_total,
                report.tasks,
                broken_schedules.len(),
                checkpoint_problems.len()
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
        Command::Tasks { target, command } => {
            arnela::ops::run(target, command).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Settings => {
            use arnela::config::variables;
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            writeln!(out, "## Service\n\n{}", variables::service_table())?;
            writeln!(out, "## Channels\n\n{}", variables::channels_table())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Healthcheck { url } => {
            let url = match url {
                Some(u) => u,
                None => {
                    let port = arnela::config::ServiceVars::from_env()?.app_port;
                    format!("http://127.0.0.1:{port}/health/live")
                }
            };
            arnela::healthcheck::check(&url).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Migrate => {
            let pool = connect_owner().await?;
            arnela::store::migrate(&pool).await?;
            tracing::info!("migrations applied");
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit {
            command:
                AuditCommand::Verify {
                    task: _,
                    json,
                    public_key,
                    checkpoints: _,
                    archive,
                },
        } if !archive.is_empty() => {
            let trusted = trusted_key(public_key)?;
            let checks = arnela::archive::verify_files(&archive, trusted.as_ref().map(|k| &k[..]));
            Ok(report_archives(&checks, json, trusted.is_some()))
        }
        Command::Audit {
            command:
                AuditCommand::Verify {
                    task,
                    json,
                    public_key,
                    checkpoints,
                    archive: _,
                },
        } => {
            let exported = checkpoints.as_deref().map(read_checkpoints).transpose()?;
            let trusted = trusted_key(public_key)?;
            let pool = connect_db().await?;
            audit_verify(&pool, task, json, trusted, exported).await
        }
        Command::Audit {
            command: AuditCommand::VerifyCheckpoints { file, public_key },
        } => {
            let exported = read_checkpoints(&file)?;
            let trusted = trusted_key(public_key)?;
            if trusted.is_none() {
                eprintln!(
                    "warning: no --public-key (AUDIT_PUBLIC_KEY): each signature is checked \
                     against the key stored beside it, which proves nothing about who signed"
                );
            }
            let problems = arnela::store::checkpoints::verify_exported(
                &exported,
                trusted.as_ref().map(|k| &k[..]),
            );
            for p in &problems {
                println!("BROKEN: {p}");
            }
            if problems.is_empty() {
                let key = exported.last().map(|c| hex::encode(&c.public_key));
                println!(
                    "ok: {} checkpoints, each linked, hashed and signed{}",
                    exported.len(),
                    key.map_or(String::new(), |k| format!(" (key {k})"))
                );
                Ok(ExitCode::SUCCESS)
            } else {
                println!("FAILED: {} problems", problems.len());
                Ok(ExitCode::from(2))
            }
        }
        Command::Audit {
            command:
                AuditCommand::Archive {
                    before,
                    dir,
                    lock_timeout_secs,
                },
        } => {
            let key = Settings::from_env()?.audit_signing_key.ok_or_else(|| {
                anyhow::anyhow!("AUDIT_SIGNING_KEY is not set: archives are signed")
            })?;
            let pool = connect_owner().await?;
            let done = arnela::archive::archive_before(
                &pool,
                before,
                &dir,
                &key,
                Duration::from_secs(lock_timeout_secs.max(1)),
            )
            .await?;
            for a in &done {
                println!(
                    "archived {}: {} events of {} tasks, {} checkpoints, into {} (manifest {}); \
                     partition dropped, {} anchors kept",
                    a.partition,
                    a.events,
                    a.tasks,
                    a.checkpoints,
                    a.data_file.display(),
                    a.manifest_file.display(),
                    a.anchors
                );
            }
            if done.is_empty() {
                println!("no partition ends by {}", before.format("%Y-%m"));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit {
            command: AuditCommand::Restore { files, public_key },
        } => {
            let trusted = trusted_key(public_key)?;
            let pool = connect_owner().await?;
            let (checks, inserted) =
                arnela::archive::restore(&pool, &files, trusted.as_ref().map(|k| &k[..])).await?;
            if checks.iter().any(|c| !c.ok()) {
                return Ok(report_archives(&checks, false, trusted.is_some()));
            }
            println!(
                "restored {inserted} events from {} archives; check them with `arnela audit verify`",
                checks.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit {
            command: AuditCommand::Keygen,
        } => {
            let mut seed = [0u8; ed25519_dalek::SECRET_KEY_LENGTH];
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed)
                .map_err(|_| anyhow::anyhow!("the system's random source failed"))?;
            let key = ed25519_dalek::SigningKey::from_bytes(&seed);
            println!("AUDIT_SIGNING_KEY={}", hex::encode(key.to_bytes()));
            println!(
                "AUDIT_PUBLIC_KEY={}",
                hex::encode(key.verifying_key().to_bytes())
            );
            println!(
                "AUDIT_DATA_KEY={}",
                arnela::domain::sealing::MasterKey::generate_hex()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit {
            command: AuditCommand::Checkpoint,
        } => {
            let key = Settings::from_env()?
                .audit_signing_key
                .ok_or_else(|| anyhow::anyhow!("AUDIT_SIGNING_KEY is not set"))?;
            let pool = connect_db().await?;
            match arnela::store::checkpoints::write(&pool, &key).await? {
                Some(c) => println!("checkpoint {}: {} tasks", c.seq, c.tasks),
                None => println!("nothing new since the last checkpoint"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit {
            command: AuditCommand::Checkpoints,
        } => {
            let pool = connect_db().await?;
            for c in arnela::store::checkpoints::list(&pool).await? {
                let view = arnela::api::events::CheckpointView::from(c);
                println!("{}", serde_json::to_string(&view)?);
            }
            Ok(ExitCode::SUCCESS)
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

/// Prints what checking archives found; exit status 2 when any does not hold.
fn report_archives(
    checks: &[arnela::archive::ArchiveCheck],
    json: bool,
    trusted: bool,
) -> ExitCode {
    let ok = checks.iter().all(|c| c.ok());
    if json {
        let doc = serde_json::json!({ "ok": ok, "archives": checks });
        println!("{doc}");
    } else {
        if !trusted {
            eprintln!(
                "warning: no --public-key (AUDIT_PUBLIC_KEY): each manifest's signature is \
                 checked against the key written in it, which proves nothing about who signed"
            );
        }
        for c in checks {
            for p in &c.problems {
                println!("BROKEN: {}: {p}", c.file);
            }
            println!(
                "{}: {} ({}): {} events of {} tasks, {} checkpoints, {} checkpoint heads \
                 checked, {} chains continuing from an earlier archive",
                if c.ok() { "ok" } else { "FAILED" },
                c.file,
                c.partition,
                c.events,
                c.tasks,
                c.checkpoints,
                c.heads_checked,
                c.continued
            );
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    }
}

/// A small pool as the tables' owner (DB_MIGRATION_USER and DB_MIGRATION_PASSWORD, when the
/// service's own role is a runtime role), for `migrate`, `audit archive` and `audit restore`.
async fn connect_owner() -> anyhow::Result<sqlx::PgPool> {
    let settings = Settings::from_env()?;
    let database = &settings.database;
    let mut options = if database.route == arnela::store::Route::TransactionPooler {
        // the migrator holds a session lock, which a transaction pooler cannot keep
        database.listen_options()?.context(
            "DB_POOLER=transaction: set DATABASE_LISTEN_URL (straight to Postgres) for this \
             command, or point DATABASE_URL at Postgres itself",
        )?
    } else {
        database.connect_options()?
    };
    if let Some(user) = &database.migration_user {
        options = options
            .username(user)
            .password(secrecy::ExposeSecret::expose_secret(
                &database.migration_password,
            ));
    }
    Ok(arnela::store::connect(options, 2).await?)
}

/// A small pool for the one-shot database commands (`audit verify`, `audit checkpoint`).
async fn connect_db() -> anyhow::Result<sqlx::PgPool> {
    let settings = Settings::from_env()?;
    let database = &settings.database;
    Ok(arnela::store::connect_by(database.connect_options()?, 2, database.route).await?)
}
