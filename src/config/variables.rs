//! Every environment variable the service reads, declared once: its name, type, default and
//! meaning are the clap declarations below (`#[arg(long, env)]`, the doc comment is the
//! meaning). The settings are parsed from them ([`parse`]), `arnela settings` prints them, and
//! README's two settings tables are generated from them ([`markdown`]; `tests/it/settings_doc.rs`
//! fails when the README differs).
//!
//! What clap checks here is the form of one value (a number, a port, a known name); what
//! involves several values or the deployment (production's secrets, a half-configured channel)
//! is checked where the typed settings are built, in [`super`] and [`super::channels`].

use clap::error::{ContextKind, ContextValue};
use clap::{ArgAction, Args, Command, FromArgMatches};
use sqlx::postgres::PgSslMode;
use std::collections::HashMap;
use std::str::FromStr;

use super::{AppEnv, ConfigError};
pub use crate::telemetry::TelemetryVars;

/// The service's variables: README's "Configuration" table, with [`TelemetryVars`].
#[derive(Debug, Clone, Args)]
pub struct ServiceVars {
    /// `development`, `test` or `production`
    #[arg(long, env, default_value = "development")]
    pub app_env: AppEnv,
    /// HTTP port
    #[arg(long, env, default_value_t = 8080)]
    pub app_port: u16,

    /// Postgres host; `DATABASE_URL` overrides it and the next four
    #[arg(long, env, default_value = "localhost")]
    pub db_host: String,
    /// Postgres port
    #[arg(long, env, default_value_t = 5432)]
    pub db_port: u16,
    /// Postgres role of the service
    #[arg(long, env, default_value = "postgres")]
    pub db_user: String,
    /// its password (required, ≥ 12 characters, in production unless `DATABASE_URL` is set)
    #[arg(long, env)]
    pub db_password: Option<String>,
    /// the database
    #[arg(long, env, default_value = "arnela_db")]
    pub db_name: String,
    /// `disable`, `allow`, `prefer`, `require`, `verify-ca` or `verify-full`
    #[arg(long, env, default_value = "prefer", value_parser = ssl_mode)]
    pub db_sslmode: PgSslMode,
    /// the CA (PEM file) that signed the Postgres server's certificate: with `DB_SSLMODE=verify-full` the service checks both the chain and that the certificate names `DB_HOST` (use it whenever Postgres is reached over a network you do not control)
    #[arg(long, env)]
    pub db_sslrootcert: Option<String>,
    /// `postgres://…`: replaces `DB_HOST` … `DB_SSLMODE`
    #[arg(long, env)]
    pub database_url: Option<String>,
    /// the role `arnela migrate` (and `audit archive` / `restore`) logs in as, instead of `DB_USER` (or `DATABASE_URL`'s user): the owner of the tables (see [Audit](#audit)); no other command reads it, and it cannot be given as `_FILE`
    #[arg(long, env)]
    pub db_migration_user: Option<String>,
    /// that role's password
    #[arg(long, env)]
    pub db_migration_password: Option<String>,
    /// pool size
    #[arg(long, env, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    pub db_max_connections: u32,
    /// what `DATABASE_URL` (or `DB_HOST`) reaches: `none` (Postgres itself), or a pooler in `session` or `transaction` mode: `transaction` sends no session settings when connecting and `LISTEN`s only on `DATABASE_LISTEN_URL` (see [PgBouncer](#pgbouncer))
    #[arg(long, env, default_value = "none", value_parser = ["none", "session", "transaction"])]
    pub db_pooler: String,
    /// `postgres://…` straight to Postgres, for the relays' `LISTEN` (and, with `DB_POOLER=transaction`, for `arnela migrate`); unset: `LISTEN` on a connection of the pool, or with `DB_POOLER=transaction` nowhere (the relays poll every `RELAY_POLL_MS`)
    #[arg(long, env)]
    pub database_listen_url: Option<String>,
    /// `postgres://…` of a streaming standby of the same database: the audit reads (`GET /events`, `GET /tasks`, `GET /tasks/{id}/events`, `GET /stats`) go there, with the same pool size (see [Read replica](#read-replica)); unset: every read goes to the primary
    #[arg(long, env)]
    pub database_read_url: Option<String>,
    /// a read goes to the primary instead when the standby is further behind than this, unreachable or not in recovery
    #[arg(long, env, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    pub database_read_max_lag_ms: u64,

    /// Redis host; `REDIS_URL` overrides it and the next four
    #[arg(long, env, default_value = "localhost")]
    pub redis_host: String,
    /// Redis port
    #[arg(long, env, default_value_t = 6379)]
    pub redis_port: u16,
    /// an ACL user; absent: the default user
    #[arg(long, env)]
    pub redis_username: Option<String>,
    /// its password (required, ≥ 12 characters, in production unless `REDIS_URL` is set)
    #[arg(long, env)]
    pub redis_password: Option<String>,
    /// the database number, 0 to 15
    #[arg(long, env, default_value_t = 0, value_parser = clap::value_parser!(i64).range(0..=15))]
    pub redis_db: i64,
    /// `redis://…` or `rediss://…`: replaces `REDIS_HOST` … `REDIS_DB`
    #[arg(long, env)]
    pub redis_url: Option<String>,
    /// TLS to Redis (a `rediss://` `REDIS_URL` turns it on by itself)
    #[arg(long, env, default_value_t = false, action = ArgAction::Set, value_parser = boolish())]
    pub redis_tls: bool,
    /// the CA (PEM file) that signed Redis's certificate when the system does not trust it; the certificate must name `REDIS_HOST`
    #[arg(long, env)]
    pub redis_ca_cert: Option<String>,
    /// prefix of every Redis key; with `REDIS_CLUSTER=true` a prefix without a hash tag gets one (`arnela` becomes `{arnela}`, giving `{arnela}:tasks`)
    #[arg(long, env, default_value = "arnela", value_parser = key_prefix)]
    pub arnela_key_prefix: String,
    /// Redis is a cluster: `REDIS_URL` (or `REDIS_HOST`/`REDIS_PORT`) names one of its nodes, or several separated by commas, tried in turn at start; the others are discovered ([Redis Cluster](#redis-cluster))
    #[arg(long, env, default_value_t = false, action = ArgAction::Set, value_parser = boolish())]
    pub redis_cluster: bool,
    /// delivery lists per namespace: each task's deliveries go to the list of a hash of its id and workers take from every list in turn; on a cluster each list has its own hash tag, so more shards use more masters. Every process of a deployment must use the same value ([Redis Cluster](#redis-cluster))
    #[arg(long, env, default_value_t = 1, value_parser = at_least_one)]
    pub queue_shards: usize,

    /// signs and verifies the API's bearer tokens ([Access](#access)); `serve` and `api` refuse to start without it (any value in development, ≥ 32 characters in production)
    #[arg(long, env)]
    pub jwt_secret: Option<String>,
    /// earlier JWT secrets whose tokens are still accepted during a rotation (comma-separated; ≥ 32 characters each in production)
    #[arg(long, env)]
    pub jwt_previous_secrets: Option<String>,

    /// largest request body (413 above: at once when `Content-Length` says so, else as soon as a chunked body passes it); one task's payload is limited to 64 KiB
    #[arg(long, env, default_value_t = 8 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// HTTP connections open at once; the next is accepted when one closes
    #[arg(long, env, default_value_t = 1024, value_parser = at_least_one)]
    pub http_max_connections: usize,
    /// API requests running at once; beyond it 503 `overloaded` with `Retry-After` (the health reports and `/metrics` always answer)
    #[arg(long, env, default_value_t = 256, value_parser = at_least_one)]
    pub http_max_in_flight: usize,
    /// request-body memory of all requests together; a body that would pass it gets 503 `overloaded` with `Retry-After` (at least `MAX_BODY_BYTES`)
    #[arg(long, env, default_value_t = 64)]
    pub http_body_budget_mb: usize,
    /// time a request body has to arrive in full (408 `request_timeout` after it); 1 to 3600
    #[arg(long, env, default_value_t = 30)]
    pub http_body_timeout_secs: u64,
    /// an HTTP connection without a byte for this long is closed; 1 to 86400
    #[arg(long, env, default_value_t = 60)]
    pub http_idle_timeout_secs: u64,
    /// how far ahead `run_at` may be, 1 to 3660; a `run_at` in the past counts as now, so no task can jump ahead of the tasks already waiting
    #[arg(long, env, default_value_t = crate::domain::task::DEFAULT_SCHEDULE_HORIZON_DAYS,
          value_parser = clap::value_parser!(i64).range(1..=3660))]
    pub schedule_horizon_days: i64,
    /// per-dependency timeout of `/health`, and of each scrape-time read of `/metrics`
    #[arg(long, env, default_value_t = 1000)]
    pub health_timeout_ms: u64,
    /// an address such as `0.0.0.0:9464`: every role (`serve`, `api`, `relay`, `worker`) also serves `/metrics` there, without auth (keep it on a private network)
    #[arg(long, env)]
    pub metrics_addr: Option<std::net::SocketAddr>,

    /// attempts running at once per process (worker slots), 1 to 1000
    #[arg(long, env, default_value_t = 5, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub workers: u16,
    /// lease of a claimed attempt (renewed every third), at least 2
    #[arg(long, env, default_value_t = 30, value_parser = clap::value_parser!(u64).range(2..))]
    pub worker_lease_secs: u64,
    /// handler time limit
    #[arg(long, env, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    pub handler_timeout_secs: u64,
    /// `send_email`'s handler time limit, instead of `HANDLER_TIMEOUT_SECS`
    #[arg(long, env, value_parser = clap::value_parser!(u64).range(1..))]
    pub handler_timeout_send_email_secs: Option<u64>,
    /// `send_sms`'s handler time limit
    #[arg(long, env, value_parser = clap::value_parser!(u64).range(1..))]
    pub handler_timeout_send_sms_secs: Option<u64>,
    /// `send_whatsapp`'s handler time limit
    #[arg(long, env, value_parser = clap::value_parser!(u64).range(1..))]
    pub handler_timeout_send_whatsapp_secs: Option<u64>,
    /// `sync_calendar`'s handler time limit
    #[arg(long, env, value_parser = clap::value_parser!(u64).range(1..))]
    pub handler_timeout_sync_calendar_secs: Option<u64>,
    /// how long running handlers may finish after SIGTERM
    #[arg(long, env, default_value_t = 25, value_parser = clap::value_parser!(u64).range(1..))]
    pub drain_timeout_secs: u64,
    /// backoff ceiling of the first retry
    #[arg(long, env, default_value_t = 1000, value_parser = clap::value_parser!(i64).range(0..))]
    pub retry_base_ms: i64,
    /// backoff cap, at least `RETRY_BASE_MS`
    #[arg(long, env, default_value_t = 600_000, value_parser = clap::value_parser!(i64).range(0..))]
    pub retry_cap_ms: i64,
    /// outbox rows per relay batch, 1 to 10000
    #[arg(long, env, default_value_t = 500, value_parser = clap::value_parser!(i64).range(1..=10_000))]
    pub relay_batch: i64,
    /// the relay's polling fallback (at least 10)
    #[arg(long, env, default_value_t = 500)]
    pub relay_poll_ms: u64,
    /// rescuer pass interval (at least 50)
    #[arg(long, env, default_value_t = 1000)]
    pub rescuer_interval_ms: u64,
    /// age at which a processing entry is examined
    #[arg(long, env, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    pub orphan_grace_secs: u64,
    /// age after which a published delivery missing from Redis (`…:tasks:transit`) is published again
    #[arg(long, env, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub republish_after_secs: u64,
    /// how long a worker process with a current heartbeat has, once the rescuer reaches Postgres again, to record an attempt whose lease ran out (say during an outage) before another process's rescuer takes the attempt over
    #[arg(long, env, default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..))]
    pub live_owner_grace_secs: u64,
    /// simulated provider latency of the `log` channel
    #[arg(long, env, default_value_t = 0)]
    pub log_channel_delay_ms: u64,
    /// how often an idle projector reads the event log (bounds how stale a cached read can be; at least 10)
    #[arg(long, env, default_value_t = 100)]
    pub projector_interval_ms: u64,
    /// longest sleep of the scheduler: how soon a schedule created or resumed by another process is seen (due slots wake it on time; at least 10)
    #[arg(long, env, default_value_t = 1000)]
    pub scheduler_poll_ms: u64,

    /// Ed25519 seed (64 hex digits, `arnela audit keygen`) that signs a checkpoint of the event log every `AUDIT_CHECKPOINT_SECS` (see [Audit](#audit)); unset: no checkpoints
    #[arg(long, env)]
    pub audit_signing_key: Option<String>,
    /// seconds between checkpoints
    #[arg(long, env, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    pub audit_checkpoint_secs: u64,
    /// days a finished task (succeeded, dead, cancelled) keeps its row in `tasks` after its last change; then it moves to `retired_tasks` without its payload, idempotency key and last error (see [Audit](#audit), "Retention of finished tasks"); 0 keeps every row
    #[arg(long, env, default_value_t = 0, value_parser = clap::value_parser!(i64).range(0..=36_600))]
    pub retention_finished_tasks_days: i64,
    /// how often every process with the relay role makes the event log's next monthly partitions and applies the retention above (1 to 86400)
    #[arg(long, env, default_value_t = 3600)]
    pub maintenance_interval_secs: u64,
    /// master key (64 hex digits, `arnela audit keygen`) that wraps each task's data key; set: the personal fields of new tasks are stored sealed and can be erased (see [Audit](#audit), "Erasure"); unset: stored as they come (a warning at start)
    #[arg(long, env)]
    pub audit_data_key: Option<String>,
}

/// The delivery channels' variables: README's "Channel configuration" table.
#[derive(Debug, Clone, Args)]
pub struct ChannelVars {
    /// production may run a type on the `log` channel
    #[arg(long, env, default_value_t = false, action = ArgAction::Set, value_parser = boolish())]
    pub allow_log_channel: bool,
    /// the clinic's name in the templates
    #[arg(long, env, default_value = "Arnela")]
    pub clinic_name: String,

    /// `smtp`, `sendgrid` or `log`; unset: the one whose variables are set (`SMTP_HOST` or `SENDGRID_API_KEY`), else `log`
    #[arg(long, env, value_parser = ["smtp", "sendgrid", "log"])]
    pub email_transport: Option<String>,
    /// sender address (required for e-mail)
    #[arg(long, env)]
    pub email_from: Option<String>,
    /// sender display name
    #[arg(long, env)]
    pub email_from_name: Option<String>,
    /// per request or SMTP command
    #[arg(long, env, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub email_timeout_ms: u64,
    /// e-mails a second (`0`: no limit)
    #[arg(long, env, default_value_t = 10.0, value_parser = rate)]
    pub email_rate_limit_per_sec: f64,
    /// SMTP server
    #[arg(long, env)]
    pub smtp_host: Option<String>,
    /// SMTP port; unset: 587 (`starttls`), 465 (`tls`), 25 (`none`)
    #[arg(long, env)]
    pub smtp_port: Option<u16>,
    /// `starttls` (required, not opportunistic), `tls`, or `none` (not in production)
    #[arg(long, env, default_value = "starttls", value_parser = ["starttls", "tls", "none"])]
    pub smtp_tls: String,
    /// SMTP AUTH user, together with `SMTP_PASSWORD` or not at all
    #[arg(long, env)]
    pub smtp_username: Option<String>,
    /// SMTP AUTH password
    #[arg(long, env)]
    pub smtp_password: Option<String>,
    /// SendGrid's API key
    #[arg(long, env)]
    pub sendgrid_api_key: Option<String>,
    /// SendGrid's endpoint
    #[arg(long, env, default_value = super::channels::SENDGRID_BASE_URL)]
    pub sendgrid_base_url: String,

    /// the Twilio account, `AC…`
    #[arg(long, env)]
    pub twilio_account_sid: Option<String>,
    /// its auth token (or give an API key, preferred: the next two)
    #[arg(long, env)]
    pub twilio_auth_token: Option<String>,
    /// an API key, `SK…`
    #[arg(long, env)]
    pub twilio_api_key_sid: Option<String>,
    /// that API key's secret
    #[arg(long, env)]
    pub twilio_api_key_secret: Option<String>,
    /// SMS sender: an E.164 number (or give `TWILIO_SMS_MESSAGING_SERVICE_SID`)
    #[arg(long, env)]
    pub twilio_sms_from: Option<String>,
    /// SMS sender: a messaging service, `MG…`
    #[arg(long, env)]
    pub twilio_sms_messaging_service_sid: Option<String>,
    /// WhatsApp sender: an E.164 number (or give `TWILIO_WHATSAPP_MESSAGING_SERVICE_SID`)
    #[arg(long, env)]
    pub twilio_whatsapp_from: Option<String>,
    /// WhatsApp sender: a messaging service, `MG…`
    #[arg(long, env)]
    pub twilio_whatsapp_messaging_service_sid: Option<String>,
    /// Twilio's endpoint, shared by SMS and WhatsApp
    #[arg(long, env, default_value = super::channels::TWILIO_BASE_URL)]
    pub twilio_base_url: String,
    /// per Twilio request
    #[arg(long, env, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub twilio_timeout_ms: u64,
    /// Twilio requests a second, SMS and WhatsApp together (`0`: no limit)
    #[arg(long, env, default_value_t = 10.0, value_parser = rate)]
    pub twilio_rate_limit_per_sec: f64,

    /// path of the Google service account's JSON key (or give `GOOGLE_SERVICE_ACCOUNT_JSON`)
    #[arg(long, env)]
    pub google_service_account_file: Option<String>,
    /// the service account's JSON key itself
    #[arg(long, env)]
    pub google_service_account_json: Option<String>,
    /// the calendar, shared with the service account ("make changes to events")
    #[arg(long, env)]
    pub google_calendar_id: Option<String>,
    /// user to act for (domain-wide delegation)
    #[arg(long, env)]
    pub google_impersonate_user: Option<String>,
    /// time zone of appointments that name none
    #[arg(long, env, default_value = "Europe/Madrid")]
    pub google_calendar_time_zone: String,
    /// invitation e-mails to attendees: `all`, `externalOnly` or `none`
    #[arg(long, env, default_value = "none", value_parser = ["all", "externalOnly", "none"])]
    pub google_calendar_send_updates: String,
    /// length of an appointment without an end, 1 to 1440
    #[arg(long, env, default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..=1440))]
    pub google_appointment_minutes: u32,
    /// Google Calendar's endpoint
    #[arg(long, env, default_value = super::channels::GOOGLE_CALENDAR_BASE_URL)]
    pub google_calendar_base_url: String,
    /// the token endpoint; unset: the key's `token_uri`
    #[arg(long, env)]
    pub google_token_url: Option<String>,
    /// per Google request
    #[arg(long, env, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub google_timeout_ms: u64,
    /// Google requests a second (`0`: no limit)
    #[arg(long, env, default_value_t = 5.0, value_parser = rate)]
    pub google_rate_limit_per_sec: f64,
}

fn boolish() -> clap::builder::BoolishValueParser {
    clap::builder::BoolishValueParser::new()
}

fn ssl_mode(value: &str) -> Result<PgSslMode, String> {
    PgSslMode::from_str(value).map_err(|_| {
        "must be one of disable, allow, prefer, require, verify-ca, verify-full".to_owned()
    })
}

fn key_prefix(value: &str) -> Result<String, String> {
    if value.contains(|c: char| c.is_whitespace() || matches!(c, '*' | '?' | '[' | ']' | '\\')) {
        return Err("must not contain white space or the glob characters * ? [ ] \\".into());
    }
    Ok(value.to_owned())
}

fn at_least_one(value: &str) -> Result<usize, String> {
    match value.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err("must be a whole number, at least 1".into()),
    }
}

fn rate(value: &str) -> Result<f64, String> {
    match value.parse::<f64>() {
        Ok(r) if r.is_finite() && r >= 0.0 => Ok(r),
        _ => Err("must be a number of requests per second ≥ 0 (0: no limit)".into()),
    }
}

impl FromStr for AppEnv {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "development" | "dev" => Ok(AppEnv::Development),
            "test" => Ok(AppEnv::Test),
            "production" | "prod" => Ok(AppEnv::Production),
            _ => Err("must be one of development, test, production".to_owned()),
        }
    }
}

/// The variables of `T` as clap arguments, each named by its variable.
pub fn command<T: Args>() -> Command {
    T::augment_args(Command::new("arnela").no_binary_name(true))
}

/// The variable an argument of [`command`] reads.
fn variable(arg: &clap::Arg) -> Option<String> {
    arg.get_env().map(|e| e.to_string_lossy().into_owned())
}

/// Every variable `T` declares.
pub fn names<T: Args>() -> Vec<String> {
    command::<T>()
        .get_arguments()
        .filter_map(variable)
        .collect()
}

/// Parses `T` from a map of variables (the environment with `.env` and the `*_FILE` secrets, or
/// a literal map in tests). A value is trimmed, and an empty one counts as unset. Only the map is
/// read: the declarations' `env` documents the variable, the map supplies it.
pub fn parse<T: Args + FromArgMatches>(vars: &HashMap<String, String>) -> Result<T, ConfigError> {
    let command = command::<T>();
    let mut args = Vec::new();
    for arg in command.get_arguments() {
        let (Some(var), Some(long)) = (variable(arg), arg.get_long()) else {
            continue;
        };
        if let Some(value) = vars.get(&var).map(|v| v.trim()).filter(|v| !v.is_empty()) {
            args.push(format!("--{long}={value}"));
        }
    }
    let mut parser = command.clone().mut_args(|a| a.env(None));
    let matches = parser
        .try_get_matches_from_mut(args)
        .map_err(|e| config_error(&command, &e))?;
    T::from_arg_matches(&matches).map_err(|e| config_error(&command, &e))
}

/// `T` with every variable unset.
pub fn defaults<T: Args + FromArgMatches>() -> T {
    parse(&HashMap::new()).expect("every declared default parses")
}

/// A clap error as the settings report one: the variable, and what is wrong with its value.
fn config_error(command: &Command, e: &clap::Error) -> ConfigError {
    let text = |kind| match e.get(kind) {
        Some(ContextValue::String(s)) => Some(s.clone()),
        _ => None,
    };
    let var = text(ContextKind::InvalidArg)
        .and_then(|shown| {
            let long = shown
                .trim_start_matches('-')
                .split([' ', '='])
                .next()?
                .to_owned();
            command
                .get_arguments()
                .find(|a| a.get_long() == Some(long.as_str()))
                .and_then(variable)
        })
        .unwrap_or_else(|| "the environment".to_owned());
    let cause = std::error::Error::source(e)
        .map(|c| c.to_string())
        .or_else(|| match e.get(ContextKind::ValidValue) {
            Some(ContextValue::Strings(valid)) => {
                Some(format!("must be one of {}", valid.join(", ")))
            }
            _ => None,
        })
        .unwrap_or_else(|| e.kind().to_string());
    let message = match text(ContextKind::InvalidValue) {
        Some(value) => format!("{value:?} is not valid: {cause}"),
        None => cause,
    };
    ConfigError { var, message }
}

/// A settings table as README writes it: one row per variable, in declaration order.
pub fn markdown(commands: &[Command]) -> String {
    let mut out = String::from("| variable | default | meaning |\n|---|---|---|\n");
    for arg in commands.iter().flat_map(|c| c.get_arguments()) {
        let Some(var) = variable(arg) else { continue };
        let defaults: Vec<String> = arg
            .get_default_values()
            .iter()
            .map(|d| format!("`{}`", d.to_string_lossy()))
            .collect();
        let default = if defaults.is_empty() {
            "–".to_owned()
        } else {
            defaults.join(" ")
        };
        let meaning = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
        out.push_str(&format!("| `{var}` | {default} | {meaning} |\n"));
    }
    out
}

/// README's "Configuration" table.
pub fn service_table() -> String {
    markdown(&[command::<ServiceVars>(), command::<TelemetryVars>()])
}

/// README's "Channel configuration" table.
pub fn channels_table() -> String {
    markdown(&[command::<ChannelVars>()])
}

/// Every variable a table documents.
pub fn documented() -> Vec<String> {
    let mut all = names::<ServiceVars>();
    all.extend(names::<TelemetryVars>());
    all.extend(names::<ChannelVars>());
    all
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::vars as map;

    #[test]
    fn values_are_trimmed_and_empty_ones_are_unset() {
        let v: ServiceVars = parse(&map(&[("APP_PORT", " 9090 "), ("DB_HOST", "")])).unwrap();
        assert_eq!((v.app_port, v.db_host.as_str()), (9090, "localhost"));
    }

    #[test]
    fn an_error_names_the_variable_and_the_value() {
        let e = parse::<ServiceVars>(&map(&[("WORKERS", "0")])).unwrap_err();
        assert_eq!(e.var, "WORKERS");
        assert!(e.message.contains("\"0\""), "{e}");
        let e = parse::<ChannelVars>(&map(&[("SMTP_TLS", "maybe")])).unwrap_err();
        assert_eq!(e.var, "SMTP_TLS");
        assert!(e.message.contains("starttls"), "{e}");
        let e = parse::<ServiceVars>(&map(&[("REDIS_TLS", "perhaps")])).unwrap_err();
        assert_eq!(e.var, "REDIS_TLS", "{e}");
    }

    #[test]
    fn the_process_environment_is_not_read_by_parse() {
        // CI sets DATABASE_URL; a literal map without it must not see it.
        let v: ServiceVars = parse(&map(&[])).unwrap();
        assert_eq!(v.database_url, None);
    }

    #[test]
    fn every_variable_is_named_once() {
        let all = documented();
        let unique: std::collections::BTreeSet<&String> = all.iter().collect();
        assert_eq!(unique.len(), all.len());
        assert!(all.len() > 90, "{all:?}");
    }
}
