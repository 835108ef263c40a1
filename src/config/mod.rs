//! Typed settings from the environment (and a `.env` file), validated once at start-up.
//!
//! The variable names are the ones the clinic's deployments already set (`APP_*`, `DB_*`,
//! `REDIS_*`, `JWT_SECRET`); `DATABASE_URL` and `REDIS_URL` override the parts. Anything missing
//! or malformed stops start-up with one message naming the variable. Secrets are held in
//! [`SecretString`]s (`secrecy`): their `Debug` never shows the value, and their memory is
//! zeroed when they are dropped.

use reqwest::Url;
use secrecy::{ExposeSecret, SecretString};
use sqlx::postgres::{PgConnectOptions, PgSslMode};
use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

pub mod channels;
pub mod variables;

pub use channels::ChannelSettings;
pub use variables::{ServiceVars, TelemetryVars};

/// A setting that is missing or wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("configuration error in {var}: {message}")]
pub struct ConfigError {
    pub var: String,
    pub message: String,
}

fn err(var: &str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        var: var.to_owned(),
        message: message.into(),
    }
}

/// A provider URL: http(s), and https in production.
fn parse_url(var: &'static str, value: &str, production: bool) -> Result<Url, ConfigError> {
    let url = Url::parse(value).map_err(|_| err(var, "is not a valid URL"))?;
    match url.scheme() {
        "https" => Ok(url),
        "http" if !production => Ok(url),
        "http" => Err(err(var, "must be an https:// URL in production")),
        _ => Err(err(var, "must be an http:// or https:// URL")),
    }
}

/// Which kind of deployment this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppEnv {
    Development,
    Test,
    Production,
}

/// Postgres connection settings.
#[derive(Debug, Clone)]
pub struct DatabaseSettings {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: SecretString,
    pub name: String,
    pub ssl_mode: PgSslMode,
    /// The certificate authority that signed the server's certificate (`DB_SSLROOTCERT`, a PEM
    /// file), for `DB_SSLMODE=verify-ca` or `verify-full`.
    pub ssl_root_cert: Option<String>,
    /// `DATABASE_URL`, when set, replaces the parts above.
    pub url: Option<SecretString>,
    pub max_connections: u32,
    /// How `DATABASE_URL` reaches Postgres (`DB_POOLER=transaction`: through a transaction
    /// pooler).
    pub route: crate::store::Route,
    /// A direct connection for the relays' `LISTEN` (`DATABASE_LISTEN_URL`).
    pub listen_url: Option<SecretString>,
    /// A streaming standby for the audit reads (`DATABASE_READ_URL`), and how far behind it may
    /// be before a read goes to the primary instead (`DATABASE_READ_MAX_LAG_MS`).
    pub read_url: Option<SecretString>,
    pub read_max_lag: Duration,
    /// The tables' owner (`DB_MIGRATION_USER`, `DB_MIGRATION_PASSWORD`), for the commands that
    /// change the schema or the log's partitions; unset: the service's own role.
    pub migration_user: Option<String>,
    pub migration_password: SecretString,
}

impl DatabaseSettings {
    pub fn connect_options(&self) -> Result<PgConnectOptions, ConfigError> {
        let options = match url_options("DATABASE_URL", self.url.as_ref())? {
            Some(options) => options,
            None => {
                let o = PgConnectOptions::new()
                    .host(&self.host)
                    .port(self.port)
                    .username(&self.user)
                    .database(&self.name)
                    .ssl_mode(self.ssl_mode);
                let o = match &self.ssl_root_cert {
                    Some(path) => o.ssl_root_cert(path),
                    None => o,
                };
                if self.password.expose_secret().is_empty() {
                    o
                } else {
                    o.password(self.password.expose_secret())
                }
            }
        };
        Ok(options.application_name("arnela"))
    }

    /// The standby's connection (`DATABASE_READ_URL`), when one is set.
    pub fn read_options(&self) -> Result<Option<PgConnectOptions>, ConfigError> {
        let options = url_options("DATABASE_READ_URL", self.read_url.as_ref())?;
        Ok(options.map(|o| o.application_name("arnela-reads")))
    }

    /// The direct connection for `LISTEN` (`DATABASE_LISTEN_URL`), when one is set.
    pub fn listen_options(&self) -> Result<Option<PgConnectOptions>, ConfigError> {
        let options = url_options("DATABASE_LISTEN_URL", self.listen_url.as_ref())?;
        Ok(options.map(|o| o.application_name("arnela-listen")))
    }
}

/// The options of the `postgres://` URL in variable `var`, when it is set.
fn url_options(
    var: &str,
    url: Option<&SecretString>,
) -> Result<Option<PgConnectOptions>, ConfigError> {
    let Some(url) = url else {
        return Ok(None);
    };
    let u = url.expose_secret();
    if !(u.starts_with("postgres://") || u.starts_with("postgresql://")) {
        return Err(err(var, "must be a postgres:// URL"));
    }
    PgConnectOptions::from_str(u)
        .map(Some)
        .map_err(|_| err(var, "is not a valid postgres:// URL"))
}

/// Redis connection settings.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    pub host: String,
    pub port: u16,
    /// An ACL user (`REDIS_USERNAME`); absent: the default user.
    pub username: Option<String>,
    pub password: SecretString,
    pub db: i64,
    /// `REDIS_URL`, when set, replaces the parts above.
    pub url: Option<SecretString>,
    /// Prefix of every key (`arnela` gives `arnela:tasks`); lets tests and tenants share a server.
    pub key_prefix: String,
    /// TLS to Redis (`REDIS_TLS=true`; a `rediss://` URL says so by itself).
    pub tls: bool,
    /// The CA (PEM file) that signed Redis's certificate, when not one the system trusts
    /// (`REDIS_CA_CERT`).
    pub ca_cert: Option<String>,
    /// The address is one node of a Redis Cluster (`REDIS_CLUSTER`); `key_prefix` then carries a
    /// hash tag.
    pub cluster: bool,
    /// Delivery lists per namespace (`QUEUE_SHARDS`), see [`crate::queue::keys`].
    pub queue_shards: usize,
}

impl RedisSettings {
    /// The connection and the CA to trust; reads `REDIS_CA_CERT`.
    pub fn target(&self) -> Result<crate::queue::RedisTarget, ConfigError> {
        let root_cert = self
            .ca_cert
            .as_ref()
            .map(|path| {
                std::fs::read(path)
                    .map_err(|e| err("REDIS_CA_CERT", format!("cannot read {path:?}: {e}")))
            })
            .transpose()?;
        Ok(crate::queue::RedisTarget {
            info: self.connection_info()?,
            root_cert,
            cluster: self.cluster,
            seeds: self.cluster_seeds()?,
        })
    }

    /// The key names: the prefix with its queue shards.
    pub fn keys(&self) -> crate::queue::Keys {
        crate::queue::Keys::new(self.key_prefix.clone()).with_shards(self.queue_shards)
    }

    /// The URLs `REDIS_URL` holds: with `REDIS_CLUSTER=true`, several nodes separated by commas;
    /// otherwise the one URL as written.
    fn urls<'a>(&self, url: &'a str) -> impl Iterator<Item = &'a str> {
        let several = self.cluster && url.contains(',');
        let parts: Vec<&str> = if several {
            url.split(',').map(str::trim).collect()
        } else {
            vec![url]
        };
        parts.into_iter()
    }

    /// The cluster nodes `REDIS_URL` names after the first (tried when the first does not
    /// answer).
    pub fn cluster_seeds(&self) -> Result<Vec<redis::ConnectionInfo>, ConfigError> {
        use redis::IntoConnectionInfo;
        let Some(url) = &self.url else {
            return Ok(Vec::new());
        };
        self.urls(url.expose_secret())
            .skip(1)
            .map(|u| {
                u.into_connection_info()
                    .map_err(|_| err("REDIS_URL", "is not a valid list of redis:// URLs"))
            })
            .collect()
    }

    pub fn connection_info(&self) -> Result<redis::ConnectionInfo, ConfigError> {
        use redis::IntoConnectionInfo;
        match &self.url {
            Some(url) => self
                .urls(url.expose_secret())
                .next()
                .unwrap_or_default()
                .into_connection_info()
                .map_err(|_| err("REDIS_URL", "is not a valid redis:// URL")),
            None => {
                let addr = if self.tls {
                    redis::ConnectionAddr::TcpTls {
                        host: self.host.clone(),
                        port: self.port,
                        insecure: false,
                        tls_params: None,
                    }
                } else {
                    redis::ConnectionAddr::Tcp(self.host.clone(), self.port)
                };
                let mut handshake = redis::RedisConnectionInfo::default()
                    .set_db(self.db)
                    .set_protocol(redis::ProtocolVersion::RESP2);
                if let Some(user) = &self.username {
                    handshake = handshake.set_username(user);
                }
                if !self.password.expose_secret().is_empty() {
                    handshake = handshake.set_password(self.password.expose_secret());
                }
                let info = addr
                    .into_connection_info()
                    .map_err(|_| err("REDIS_HOST", "is not a valid address"))?;
                Ok(info.set_redis_settings(handshake))
            }
        }
    }
}

/// Settings of the relay, the workers and the rescuer.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    /// Workers in this process (`WORKERS`, default 5).
    pub workers: usize,
    /// How long a claimed attempt is held without a heartbeat (`WORKER_LEASE_SECS`, 30).
    pub lease: Duration,
    /// Default handler time limit (`HANDLER_TIMEOUT_SECS`, 30); per type with
    /// `HANDLER_TIMEOUT_SEND_EMAIL_SECS` and the like.
    pub handler_timeout: Duration,
    pub handler_timeouts: Vec<(crate::domain::TaskType, Duration)>,
    /// How long running handlers may finish after SIGTERM (`DRAIN_TIMEOUT_SECS`, 25).
    pub drain: Duration,
    /// Backoff ceiling of the first retry (`RETRY_BASE_MS`, 1000) and cap (`RETRY_CAP_MS`, 600000).
    pub retry_base_ms: i64,
    pub retry_cap_ms: i64,
    /// Outbox rows per relay batch (`RELAY_BATCH`, 500) and the polling fallback (`RELAY_POLL_MS`, 500).
    pub relay_batch: i64,
    pub relay_poll: Duration,
    /// Rescuer pass interval (`RESCUER_INTERVAL_MS`, 1000), grace before a processing entry is
    /// judged (`ORPHAN_GRACE_SECS`, 30) and the age after which a published delivery missing
    /// from Redis is published again (`REPUBLISH_AFTER_SECS`, 10).
    pub rescuer_interval: Duration,
    pub orphan_grace: Duration,
    pub republish_after: Duration,
    /// How long a live worker process has to record an attempt whose lease ran out, counted
    /// from when the rescuer reaches Postgres again (`LIVE_OWNER_GRACE_SECS`, 120).
    pub live_owner_grace: Duration,
    /// Simulated provider latency of the log channel (`LOG_CHANNEL_DELAY_MS`, 0).
    pub log_channel_delay: Duration,
    /// How often an idle projector looks for new events (`PROJECTOR_INTERVAL_MS`, 100): the
    /// bound on how long a cached read can lag behind a committed event.
    pub projector_interval: Duration,
    /// Longest sleep of the scheduler between steps (`SCHEDULER_POLL_MS`, 1000): how soon a
    /// schedule created or resumed by another process is seen. Due slots wake it sooner.
    pub scheduler_poll: Duration,
}

/// All settings of the service.
#[derive(Debug, Clone)]
pub struct Settings {
    pub app_env: AppEnv,
    pub port: u16,
    pub database: DatabaseSettings,
    pub redis: RedisSettings,
    pub jwt_secret: SecretString,
    /// Earlier secrets whose tokens are still accepted while they are rolled
    /// (`JWT_PREVIOUS_SECRETS`, comma-separated; empty by default).
    pub jwt_previous: Vec<SecretString>,
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    /// Most HTTP connections open at once (`HTTP_MAX_CONNECTIONS`, 1024).
    pub http_max_connections: usize,
    /// Most API requests running at once (`HTTP_MAX_IN_FLIGHT`, 256).
    pub http_max_in_flight: usize,
    /// Bytes of request bodies held at once by all requests together (`HTTP_BODY_BUDGET_MB`, 64).
    pub http_body_budget: usize,
    /// Time a request body has to arrive in full (`HTTP_BODY_TIMEOUT_SECS`, 30).
    pub http_body_timeout: Duration,
    /// An HTTP connection without a byte for this long is closed (`HTTP_IDLE_TIMEOUT_SECS`, 60).
    pub http_idle_timeout: Duration,
    /// How far ahead a task's `run_at` may be (`SCHEDULE_HORIZON_DAYS`, 366).
    pub schedule_horizon: chrono::Duration,
    /// How long `/health` waits for each dependency (and a scrape for each scrape-time read).
    pub health_timeout: Duration,
    /// `METRICS_ADDR`: when set, every role also serves `/metrics` on this address (for
    /// processes without the API, e.g. workers); unset by default.
    pub metrics_addr: Option<std::net::SocketAddr>,
    pub engine: EngineSettings,
    /// Signs the log's checkpoints (`AUDIT_SIGNING_KEY`, 64 hex digits: an Ed25519 seed; made
    /// with `arnela audit keygen`). Unset: no checkpoints are written.
    pub audit_signing_key: Option<ed25519_dalek::SigningKey>,
    /// How often a checkpoint is written (`AUDIT_CHECKPOINT_SECS`, 60).
    pub audit_checkpoint_interval: Duration,
    /// How long a finished task's projection row is kept after its last change
    /// (`RETENTION_FINISHED_TASKS_DAYS`; 0, the default, keeps it forever). Its history stays in
    /// the log until that month is archived.
    pub retention_finished_tasks: Option<chrono::Duration>,
    /// How often the maintenance loop runs: next months' log partitions, retention
    /// (`MAINTENANCE_INTERVAL_SECS`, 3600).
    pub maintenance_interval: Duration,
    /// Wraps the tasks' data keys (`AUDIT_DATA_KEY`, 64 hex digits; made with
    /// `arnela audit keygen`). Set: the personal fields of new tasks are stored sealed and can
    /// be erased (`POST /tasks/{id}/erase`). Unset: they are stored as they came.
    pub audit_data_key: Option<std::sync::Arc<crate::domain::sealing::MasterKey>>,
    /// The delivery channels (`EMAIL_*`, `SMTP_*`, `SENDGRID_*`, `TWILIO_*`, `GOOGLE_*`).
    pub channels: ChannelSettings,
}

/// Secrets published in the seed document or examples: never acceptable in production.
const KNOWN_DEFAULT_SECRETS: &[&str] = &[
    "arnela_secure_pass_2024",
    "arnela_redis_pass_2024",
    "your_jwt_secret_key_change_in_production",
    "secret",
    "password",
    "changeme",
];

impl Settings {
    /// Reads `.env` (if present) and then the process environment.
    pub fn from_env() -> Result<Settings, ConfigError> {
        Settings::from_vars(&env_vars()?)
    }

    /// Only `JWT_SECRET` (checked as [`Settings::from_env`] checks it in production, and required
    /// here in every environment), for commands that sign tokens and connect to nothing.
    pub fn jwt_secret_from_env() -> Result<SecretString, ConfigError> {
        Settings::jwt_secret_from_vars(&env_vars()?)
    }

    /// `JWT_SECRET` from a map of variables; see [`Settings::jwt_secret_from_env`].
    pub fn jwt_secret_from_vars(
        vars: &HashMap<String, String>,
    ) -> Result<SecretString, ConfigError> {
        let v: ServiceVars = variables::parse(vars)?;
        let secret = SecretString::from(v.jwt_secret.unwrap_or_default());
        if v.app_env == AppEnv::Production {
            check_production_secret("JWT_SECRET", &secret, 32)?;
        } else if secret.expose_secret().is_empty() {
            return Err(err("JWT_SECRET", "is required to sign tokens"));
        }
        Ok(secret)
    }

    /// Builds settings from a map of variables (the environment, in tests a literal map): each
    /// value parsed as [`ServiceVars`] and [`variables::ChannelVars`] declare it, then the checks
    /// that involve several values or the deployment.
    pub fn from_vars(vars: &HashMap<String, String>) -> Result<Settings, ConfigError> {
        let v: ServiceVars = variables::parse(vars)?;
        let engine = engine_settings(&v)?;
        let app_env = v.app_env;
        let production = app_env == AppEnv::Production;

        let database = DatabaseSettings {
            host: v.db_host,
            port: v.db_port,
            user: v.db_user,
            password: SecretString::from(v.db_password.unwrap_or_default()),
            name: v.db_name,
            ssl_mode: v.db_sslmode,
            ssl_root_cert: v.db_sslrootcert,
            url: v.database_url.map(SecretString::from),
            max_connections: v.db_max_connections,
            route: if v.db_pooler == "transaction" {
                crate::store::Route::TransactionPooler
            } else {
                crate::store::Route::Direct
            },
            listen_url: v.database_listen_url.map(SecretString::from),
            read_url: v.database_read_url.map(SecretString::from),
            read_max_lag: Duration::from_millis(v.database_read_max_lag_ms),
            migration_user: v.db_migration_user,
            migration_password: SecretString::from(v.db_migration_password.unwrap_or_default()),
        };
        if database.url.is_some() && database.ssl_root_cert.is_some() {
            return Err(err(
                "DB_SSLROOTCERT",
                "DATABASE_URL is set: give the CA in it instead (sslrootcert=...)",
            ));
        }
        database.connect_options()?;
        database.read_options()?;
        database.listen_options()?;

        let redis = RedisSettings {
            host: v.redis_host,
            port: v.redis_port,
            username: v.redis_username,
            password: SecretString::from(v.redis_password.unwrap_or_default()),
            db: v.redis_db,
            url: v.redis_url.map(SecretString::from),
            // on a cluster, keys used together must share a slot: one hash tag for them all
            key_prefix: if v.redis_cluster {
                crate::queue::keys::tagged(&v.arnela_key_prefix)
            } else {
                v.arnela_key_prefix
            },
            tls: v.redis_tls,
            ca_cert: v.redis_ca_cert,
            cluster: v.redis_cluster,
            queue_shards: v.queue_shards,
        };
        if redis.cluster && redis.db != 0 {
            return Err(err(
                "REDIS_DB",
                "a Redis Cluster has only database 0: leave REDIS_DB unset with REDIS_CLUSTER=true",
            ));
        }
        if redis.cluster && redis.connection_info()?.redis_settings().db() != 0 {
            return Err(err(
                "REDIS_URL",
                "names a database other than 0, which a Redis Cluster does not have",
            ));
        }
        let tls_url = redis
            .url
            .as_ref()
            .is_some_and(|u| u.expose_secret().starts_with("rediss://"));
        if redis.url.is_some() && redis.tls && !tls_url {
            return Err(err(
                "REDIS_TLS",
                "REDIS_URL is set: write it as rediss:// for TLS instead",
            ));
        }
        if redis.ca_cert.is_some() && !redis.tls && !tls_url {
            return Err(err(
                "REDIS_CA_CERT",
                "is only used with TLS: set REDIS_TLS=true or a rediss:// REDIS_URL",
            ));
        }
        redis.connection_info()?;
        redis.cluster_seeds()?;

        let jwt_secret = SecretString::from(v.jwt_secret.unwrap_or_default());
        let jwt_previous: Vec<SecretString> = v
            .jwt_previous_secrets
            .as_deref()
            .map(|v| {
                v.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(SecretString::from)
                    .collect()
            })
            .unwrap_or_default();
        if production {
            check_production_secret("JWT_SECRET", &jwt_secret, 32)?;
            for previous in &jwt_previous {
                check_production_secret("JWT_PREVIOUS_SECRETS", previous, 32)?;
            }
            if database.url.is_none() {
                check_production_secret("DB_PASSWORD", &database.password, 12)?;
            }
            if redis.url.is_none() {
                check_production_secret("REDIS_PASSWORD", &redis.password, 12)?;
            }
        }

        let max_body_bytes = v.max_body_bytes;
        if v.http_body_budget_mb.saturating_mul(1024 * 1024) < max_body_bytes {
            return Err(err(
                "HTTP_BODY_BUDGET_MB",
                "must hold at least one body of MAX_BODY_BYTES",
            ));
        }
        let channels = ChannelSettings::from_vars(vars, app_env)?;
        let audit_signing_key = v
            .audit_signing_key
            .as_deref()
            .map(crate::domain::checkpoint::signing_key)
            .transpose()
            .map_err(|m| err("AUDIT_SIGNING_KEY", m))?;
        let audit_data_key = v
            .audit_data_key
            .as_deref()
            .map(crate::domain::sealing::MasterKey::from_hex)
            .transpose()
            .map_err(|m| err("AUDIT_DATA_KEY", m))?
            .map(std::sync::Arc::new);
        let retention_days = v.retention_finished_tasks_days;
        Ok(Settings {
            app_env,
            port: v.app_port,
            database,
            redis,
            jwt_secret,
            jwt_previous,
            max_body_bytes,
            schedule_horizon: chrono::Duration::days(v.schedule_horizon_days),
            http_max_connections: v.http_max_connections,
            http_max_in_flight: v.http_max_in_flight,
            http_body_budget: v.http_body_budget_mb.saturating_mul(1024 * 1024),
            http_body_timeout: Duration::from_secs(v.http_body_timeout_secs.clamp(1, 3600)),
            http_idle_timeout: Duration::from_secs(v.http_idle_timeout_secs.clamp(1, 24 * 3600)),
            health_timeout: Duration::from_millis(v.health_timeout_ms),
            metrics_addr: v.metrics_addr,
            engine,
            audit_signing_key,
            audit_checkpoint_interval: Duration::from_secs(v.audit_checkpoint_secs),
            retention_finished_tasks: (retention_days > 0)
                .then(|| chrono::Duration::days(retention_days)),
            maintenance_interval: Duration::from_secs(v.maintenance_interval_secs.clamp(1, 86_400)),
            audit_data_key,
            channels,
        })
    }
}

impl ServiceVars {
    /// The service's variables from `.env` and the environment, each checked alone (for the
    /// commands that need one of them, such as `healthcheck` its port).
    pub fn from_env() -> Result<ServiceVars, ConfigError> {
        variables::parse(&env_vars()?)
    }
}

impl TelemetryVars {
    /// The log and trace variables from `.env` and the environment.
    pub fn from_env() -> Result<TelemetryVars, ConfigError> {
        variables::parse(&env_vars()?)
    }
}

/// `.env` (if present) and then the process environment.
fn env_vars() -> Result<HashMap<String, String>, ConfigError> {
    // A missing .env is normal; a malformed one is an error worth stopping for.
    match dotenvy::dotenv() {
        Ok(_) => {}
        Err(e) if e.not_found() => {}
        Err(e) => return Err(err(".env", e.to_string())),
    }
    with_files(std::env::vars().collect())
}

/// The settings that may be read from a file with `NAME_FILE`: the secrets.
pub const FILE_SECRETS: [&str; 15] = [
    "JWT_SECRET",
    "JWT_PREVIOUS_SECRETS",
    "DB_PASSWORD",
    "DATABASE_URL",
    "DATABASE_LISTEN_URL",
    "DATABASE_READ_URL",
    "REDIS_PASSWORD",
    "REDIS_URL",
    "SMTP_PASSWORD",
    "SENDGRID_API_KEY",
    "TWILIO_AUTH_TOKEN",
    "TWILIO_API_KEY_SECRET",
    "GOOGLE_SERVICE_ACCOUNT_JSON",
    "AUDIT_SIGNING_KEY",
    "AUDIT_DATA_KEY",
];

/// Fills each secret `NAME` of [`FILE_SECRETS`] from the file `NAME_FILE` names (Docker
/// secrets, Kubernetes secret volumes), so no secret needs to sit in the environment. Giving
/// both is an error; one trailing line break of the file is dropped.
pub fn with_files(
    mut vars: HashMap<String, String>,
) -> Result<HashMap<String, String>, ConfigError> {
    let files: Vec<(String, String)> = FILE_SECRETS
        .iter()
        .filter_map(|name| {
            let path = vars.get(&format!("{name}_FILE"))?;
            (!path.trim().is_empty()).then(|| ((*name).to_owned(), path.clone()))
        })
        .collect();
    for (name, path) in files {
        if vars.get(&name).is_some_and(|v| !v.trim().is_empty()) {
            return Err(err(
                "a *_FILE variable",
                format!("{name}_FILE and {name} are both set; give one of them"),
            ));
        }
        let content = std::fs::read_to_string(path.trim()).map_err(|e| {
            err(
                "a *_FILE variable",
                format!("{name}_FILE: cannot read {:?}: {e}", path.trim()),
            )
        })?;
        let value = content
            .strip_suffix('\n')
            .map(|v| v.strip_suffix('\r').unwrap_or(v))
            .unwrap_or(&content);
        vars.insert(name, value.to_owned());
    }
    Ok(vars)
}

fn engine_settings(v: &ServiceVars) -> Result<EngineSettings, ConfigError> {
    use crate::domain::TaskType;
    let handler_timeouts = [
        (TaskType::SendEmail, v.handler_timeout_send_email_secs),
        (TaskType::SendSms, v.handler_timeout_send_sms_secs),
        (TaskType::SendWhatsapp, v.handler_timeout_send_whatsapp_secs),
        (TaskType::SyncCalendar, v.handler_timeout_sync_calendar_secs),
    ]
    .into_iter()
    .filter_map(|(t, secs)| Some((t, Duration::from_secs(secs?))))
    .collect();
    if v.retry_cap_ms < v.retry_base_ms {
        return Err(err("RETRY_CAP_MS", "must be at least RETRY_BASE_MS"));
    }
    let millis = Duration::from_millis;
    Ok(EngineSettings {
        workers: usize::from(v.workers),
        lease: Duration::from_secs(v.worker_lease_secs),
        handler_timeout: Duration::from_secs(v.handler_timeout_secs),
        handler_timeouts,
        drain: Duration::from_secs(v.drain_timeout_secs),
        retry_base_ms: v.retry_base_ms,
        retry_cap_ms: v.retry_cap_ms,
        relay_batch: v.relay_batch,
        relay_poll: millis(v.relay_poll_ms).max(millis(10)),
        rescuer_interval: millis(v.rescuer_interval_ms).max(millis(50)),
        orphan_grace: Duration::from_secs(v.orphan_grace_secs),
        republish_after: Duration::from_secs(v.republish_after_secs),
        live_owner_grace: Duration::from_secs(v.live_owner_grace_secs),
        log_channel_delay: millis(v.log_channel_delay_ms),
        projector_interval: millis(v.projector_interval_ms).max(millis(10)),
        scheduler_poll: millis(v.scheduler_poll_ms).max(millis(10)),
    })
}

fn check_production_secret(
    var: &'static str,
    secret: &SecretString,
    min_len: usize,
) -> Result<(), ConfigError> {
    if secret.expose_secret().is_empty() {
        return Err(err(var, "is required when APP_ENV=production"));
    }
    let lower = secret.expose_secret().to_ascii_lowercase();
    if KNOWN_DEFAULT_SECRETS.contains(&lower.as_str()) || lower.starts_with("change-me") {
        return Err(err(var, "is a published default; set a real secret"));
    }
    if secret.expose_secret().len() < min_len {
        return Err(err(
            var,
            format!("must be at least {min_len} characters in production"),
        ));
    }
    Ok(())
}

/// Environment variables from pairs (for tests of settings).
#[cfg(test)]
pub(crate) fn vars(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_enough_for_development() {
        let s = Settings::from_vars(&vars(&[])).unwrap();
        assert_eq!(s.app_env, AppEnv::Development);
        assert_eq!((s.port, s.database.port, s.redis.port), (8080, 5432, 6379));
        assert_eq!(s.redis.key_prefix, "arnela");
        assert_eq!(s.metrics_addr, None);
    }

    #[test]
    fn secrets_are_read_from_files() {
        let dir = std::env::temp_dir().join(format!("arnela-secrets-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("jwt");
        std::fs::write(&file, "k3y-0f-at-least-thirty-two-characters!!\n").unwrap();
        let path = file.to_str().unwrap();
        let filled = with_files(vars(&[
            ("JWT_SECRET_FILE", path),
            ("REDIS_USERNAME", "arnela"),
        ]))
        .unwrap();
        let s = Settings::from_vars(&filled).unwrap();
        assert_eq!(
            s.jwt_secret.expose_secret(),
            "k3y-0f-at-least-thirty-two-characters!!"
        );
        assert_eq!(
            s.redis
                .connection_info()
                .unwrap()
                .redis_settings()
                .username(),
            Some("arnela")
        );
        let both = with_files(vars(&[("JWT_SECRET_FILE", path), ("JWT_SECRET", "x")]));
        assert!(both.unwrap_err().message.contains("both set"));
        let missing = with_files(vars(&[("DB_PASSWORD_FILE", "/nonexistent/secret")]));
        assert!(missing.unwrap_err().message.contains("DB_PASSWORD_FILE"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn debug_output_shows_no_secret() {
        let secrets = [
            ("JWT_SECRET", "jwt-value-of-at-least-thirty-two-chars"),
            ("DB_PASSWORD", "db-password-value"),
            ("REDIS_PASSWORD", "redis-password-value"),
            ("DATABASE_URL", "postgres://u:url-password@db/arnela"),
        ];
        let s = Settings::from_vars(&vars(&secrets)).unwrap();
        let shown = format!("{s:?}");
        assert!(shown.contains("REDACTED"), "{shown}");
        for needle in [
            "jwt-value",
            "db-password-value",
            "redis-password-value",
            "url-password",
        ] {
            assert!(!shown.contains(needle), "{needle} is shown in {shown}");
        }
    }

    #[test]
    fn a_cluster_tags_the_prefix_and_takes_several_nodes() {
        let s = Settings::from_vars(&vars(&[
            ("REDIS_CLUSTER", "true"),
            ("REDIS_URL", "redis://10.0.0.1:7000, redis://10.0.0.2:7000"),
            ("QUEUE_SHARDS", "3"),
        ]))
        .unwrap();
        assert_eq!(s.redis.key_prefix, "{arnela}");
        assert_eq!(s.redis.keys().tasks(), "{arnela}:tasks");
        assert_eq!(s.redis.keys().shards(), 3);
        let target = s.redis.target().unwrap();
        assert!(target.cluster);
        assert_eq!(target.info.addr().to_string(), "10.0.0.1:7000");
        let seeds: Vec<String> = target.seeds.iter().map(|i| i.addr().to_string()).collect();
        assert_eq!(seeds, ["10.0.0.2:7000"]);
        // one server: the prefix is kept, a list of URLs is not a URL
        let one = Settings::from_vars(&vars(&[])).unwrap();
        assert_eq!(one.redis.keys().tasks(), "arnela:tasks");
        let e =
            Settings::from_vars(&vars(&[("REDIS_URL", "redis://a:1,redis://b:2")])).unwrap_err();
        assert_eq!(e.var, "REDIS_URL", "{e}");
        for (var, value) in [
            ("REDIS_DB", "1"),
            ("REDIS_URL", "redis://a:1,http://b"),
            ("REDIS_URL", "redis://a:1/2"),
        ] {
            let e =
                Settings::from_vars(&vars(&[("REDIS_CLUSTER", "true"), (var, value)])).unwrap_err();
            assert_eq!(e.var, var, "{e}");
        }
        let e = Settings::from_vars(&vars(&[("QUEUE_SHARDS", "0")])).unwrap_err();
        assert_eq!(e.var, "QUEUE_SHARDS", "{e}");
    }

    #[test]
    fn metrics_addr_is_a_socket_address() {
        let s = Settings::from_vars(&vars(&[("METRICS_ADDR", "0.0.0.0:9464")])).unwrap();
        assert_eq!(s.metrics_addr, Some("0.0.0.0:9464".parse().unwrap()));
    }

    #[test]
    fn a_bad_value_names_its_variable() {
        for (var, value) in [
            ("APP_PORT", "eighty"),
            ("DB_PORT", "99999"),
            ("REDIS_DB", "42"),
            ("APP_ENV", "staging"),
            ("DB_SSLMODE", "sometimes"),
            ("DATABASE_URL", "mysql://x"),
            ("REDIS_URL", "http://x"),
            ("METRICS_ADDR", "9464"),
            ("ARNELA_KEY_PREFIX", "arn*la"),
            ("REDIS_CA_CERT", "/etc/ssl/ca.pem"),
        ] {
            let e = Settings::from_vars(&vars(&[(var, value)])).unwrap_err();
            assert_eq!(e.var, var, "{e}");
        }
        let e = Settings::from_vars(&vars(&[("REDIS_URL", "redis://x"), ("REDIS_TLS", "true")]))
            .unwrap_err();
        assert_eq!(e.var, "REDIS_TLS", "{e}");
        let e = Settings::from_vars(&vars(&[
            ("DATABASE_URL", "postgres://x/y"),
            ("DB_SSLROOTCERT", "/ca.pem"),
        ]))
        .unwrap_err();
        assert_eq!(e.var, "DB_SSLROOTCERT", "{e}");
    }

    #[test]
    fn production_refuses_missing_and_default_secrets() {
        let strong = "k3y-0f-at-least-thirty-two-characters!!";
        let base = [
            ("APP_ENV", "production"),
            ("DB_PASSWORD", "a-strong-db-password"),
            ("REDIS_PASSWORD", "a-strong-redis-password"),
            ("JWT_SECRET", strong),
            ("ALLOW_LOG_CHANNEL", "true"),
        ];
        assert!(Settings::from_vars(&vars(&base)).is_ok());
        let missing = Settings::from_vars(&vars(&base[..3])).unwrap_err();
        assert_eq!(missing.var, "JWT_SECRET");
        let mut seeded = vars(&base);
        seeded.insert("REDIS_PASSWORD".into(), "arnela_redis_pass_2024".into());
        assert_eq!(
            Settings::from_vars(&seeded).unwrap_err().var,
            "REDIS_PASSWORD"
        );
        let mut short = vars(&base);
        short.insert("JWT_SECRET".into(), "short".into());
        assert_eq!(Settings::from_vars(&short).unwrap_err().var, "JWT_SECRET");
    }

    #[test]
    fn secrets_do_not_show_in_debug_output() {
        let s = Settings::from_vars(&vars(&[
            ("DB_PASSWORD", "hunter2-db"),
            ("REDIS_PASSWORD", "hunter2-redis"),
            ("JWT_SECRET", "hunter2-jwt"),
            ("DATABASE_URL", "postgres://u:hunter2-url@h/db"),
        ]))
        .unwrap();
        let shown = format!("{s:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
    }

    #[test]
    fn urls_override_the_parts() {
        let s = Settings::from_vars(&vars(&[
            ("DATABASE_URL", "postgres://u@db.internal:6543/x"),
            ("REDIS_URL", "redis://:pw@cache.internal:6380/2"),
        ]))
        .unwrap();
        let pg = s.database.connect_options().unwrap();
        assert_eq!((pg.get_host(), pg.get_port()), ("db.internal", 6543));
        let r = s.redis.connection_info().unwrap();
        assert_eq!(r.redis_settings().db(), 2);
    }
}
