//! Builds the application without starting it: settings → pools → roles. Owns the shutdown
//! token. Tests build it against their own database and key prefix and bind port 0.

use crate::queue::RedisConn;
use anyhow::Context;
use poem::listener::{Acceptor, Listener, TcpAcceptor, TcpListener};
use secrecy::ExposeSecret;
use sqlx::PgPool;
use std::net::SocketAddr;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

use crate::api::{self, ApiContext};
use crate::binding::Binding;
use crate::cache::Cache;
use crate::config::Settings;
use crate::domain::RetryPolicy;
use crate::metrics::Metrics;
use crate::projector::{Projection, Projector};
use crate::queue::{self, Keys};
use crate::relay::{Relay, RelayConfig};
use crate::rescuer::{Rescuer, RescuerConfig};
use crate::scheduler::Scheduler;
use crate::store;
use crate::worker::handler::Registry;
use crate::worker::log_channel::LogChannel;
use crate::worker::{WorkerConfig, WorkerPool};

/// Which parts of the system this process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Roles {
    pub api: bool,
    pub relay: bool,
    /// The worker pool and a rescuer.
    pub workers: bool,
}

impl Roles {
    pub const ALL: Roles = Roles {
        api: true,
        relay: true,
        workers: true,
    };
}

/// A built, not yet running, application.
pub struct App {
    pub settings: Settings,
    pub pool: PgPool,
    /// Where the audit reads go: the primary, or a standby (`DATABASE_READ_URL`).
    pub reads: store::replica::Reads,
    /// Where the relays `LISTEN` for new outbox rows.
    pub listen: crate::relay::Listen,
    pub redis: RedisConn,
    pub keys: Keys,
    pub shutdown: CancellationToken,
    pub waker: store::outbox::OutboxWaker,
    /// The cache under `{prefix}:cache:` (the API's hot reads, the invalidation projector).
    pub cache: Cache,
    /// The metrics registry shared by every role of this process.
    pub metrics: Metrics,
    /// What this process's pushes of dead-letter copies met (its workers and its rescuer).
    pub failed_pushes: crate::dead_letters::Refusals,
    /// The HTTP API's connection, in-flight and body limits.
    pub http_limits: api::limits::HttpLimits,
}

impl App {
    /// Connects to Postgres and Redis, checks that the Redis namespace serves this database
    /// (before anything is written to either) and applies migrations.
    pub async fn build(settings: Settings) -> anyhow::Result<App> {
        let pg = settings.database.connect_options()?;
        let route = settings.database.route;
        let pool = store::connect_by(pg, settings.database.max_connections, route)
            .await
            .context("cannot connect to Postgres (check DB_* or DATABASE_URL)")?;
        if route == store::Route::TransactionPooler {
            check_pooled_session(&pool).await?;
        }
        let redis = queue::connect(settings.redis.target()?)
            .await
            .context("cannot connect to Redis (check REDIS_* or REDIS_URL)")?;
        let keys = settings.redis.keys();
        check_binding(&pool, &redis, &keys).await?;
        check_shards(&redis, &keys).await?;
        check_role_and_schema(
            &pool,
            settings.app_env == crate::config::AppEnv::Production,
            route,
        )
        .await?;
        check_data_key(&pool, settings.audit_data_key.as_deref()).await?;
        // this month's and the next months' partitions of the log, before anything is appended
        store::retention::ensure_partitions(&pool, chrono::Utc::now())
            .await
            .context("cannot make the event log's monthly partitions")?;
        let reads = connect_replica(&settings, &pool).await?;
        let listen = match settings.database.listen_options()? {
            Some(direct) => {
                crate::relay::Listen::Direct(store::connect_lazy(direct, 1, Duration::from_secs(5)))
            }
            None if route == store::Route::TransactionPooler => {
                tracing::info!(
                    "DB_POOLER=transaction without DATABASE_LISTEN_URL: the relays poll for new \
                     outbox rows every RELAY_POLL_MS instead of listening"
                );
                crate::relay::Listen::Off
            }
            None => crate::relay::Listen::Pool,
        };
        let mut app = App::from_parts(settings, pool, redis);
        if let Some(reads) = reads {
            app.metrics
                .add_collector(std::sync::Arc::new(crate::metrics::ReplicaCollector {
                    reads: reads.clone(),
                }));
            app.reads = reads;
        }
        app.listen = listen;
        Ok(app)
    }

    /// An application over existing connections (tests bring their own database).
    pub fn from_parts(settings: Settings, pool: PgPool, redis: RedisConn) -> App {
        let keys = settings.redis.keys();
        let waker = store::outbox::OutboxWaker::spawn(pool.clone(), Duration::from_millis(2));
        let cache = Cache::new(redis.clone(), &settings.redis.key_prefix);
        let metrics = Metrics::for_cluster(
            pool.clone(),
            redis.clone(),
            keys.clone(),
            settings.health_timeout,
        );
        metrics.register_cache(cache.stats.clone());
        let http_limits = api::limits::HttpLimits::with_body_budget(
            settings.http_max_connections,
            settings.http_max_in_flight,
            settings.max_body_bytes,
            settings.http_body_timeout,
            settings.http_body_budget,
        );
        metrics.add_collector(http_limits.collector());
        App {
            http_limits,
            waker,
            cache,
            metrics,
            failed_pushes: Default::default(),
            settings,
            reads: store::replica::Reads::primary(pool.clone()),
            listen: crate::relay::Listen::Pool,
            pool,
            redis,
            keys,
            shutdown: CancellationToken::new(),
        }
    }

    /// What the API needs; fails without a `JWT_SECRET` (no token could be verified).
    pub fn api_context(&self) -> Result<ApiContext, api::auth::AuthError> {
        let auth =
            api::auth::Auth::rotating(&self.settings.jwt_secret, &self.settings.jwt_previous)?;
        Ok(ApiContext {
            pool: self.pool.clone(),
            reads: self.reads.clone(),
            redis: self.redis.clone(),
            keys: self.keys.clone(),
            health_timeout: self.settings.health_timeout,
            limits: self.http_limits.clone(),
            schedule_horizon: self.settings.schedule_horizon,
            channels: crate::domain::TaskType::ALL
                .into_iter()
                .map(|t| {
                    let name = self.settings.channels.channel_name(t);
                    (t.as_str().to_owned(), name.to_owned())
                })
                .collect(),
            waker: self.waker.clone(),
            publisher: crate::relay::Publisher::new(
                self.pool.clone(),
                self.redis.clone(),
                self.keys.clone(),
                self.waker.clone(),
                self.metrics.clone(),
            ),
            cache: self.cache.clone(),
            auth,
            metrics: self.metrics.clone(),
            data_key: self.settings.audit_data_key.clone(),
        })
    }

    /// The projectors every process runs (instances of one projector take turns, see
    /// [`crate::projector`]).
    pub fn projectors(&self) -> Vec<Projector> {
        vec![
            Projector::new(self.pool.clone(), Projection::Totals)
                .with_stats_cache(self.cache.clone()),
            Projector::new(
                self.pool.clone(),
                Projection::CacheInvalidation(Box::new(self.cache.clone())),
            ),
        ]
    }

    /// Serves the HTTP API on `addr` until the shutdown token is cancelled. Returns the bound
    /// address through `bound` as soon as it listens (port 0 picks a free one).
    pub async fn serve_api(
        &self,
        addr: SocketAddr,
        bound: Option<tokio::sync::oneshot::Sender<SocketAddr>>,
    ) -> anyhow::Result<()> {
        let ctx = self.api_context()?;
        let (acceptor, local) = bind(addr).await?;
        tracing::info!(addr = %local, "HTTP API listening; Swagger UI at /docs");
        if let Some(tx) = bound {
            // The receiver may have gone away; the server runs regardless.
            tx.send(local).ok();
        }
        let shutdown = self.shutdown.clone();
        let acceptor = api::limits::LimitedAcceptor::new(acceptor, ctx.limits.clone());
        poem::Server::new_with_acceptor(acceptor)
            .idle_timeout(self.settings.http_idle_timeout)
            .run_with_graceful_shutdown(
                api::endpoint(ctx),
                async move { shutdown.cancelled().await },
                Some(Duration::from_secs(10)),
            )
            .await
            .context("HTTP server failed")
    }

    /// Serves `/metrics` alone on `addr` (the `METRICS_ADDR` listener) until the shutdown token
    /// is cancelled. Returns the bound address through `bound` as soon as it listens.
    pub async fn serve_metrics(
        &self,
        addr: SocketAddr,
        bound: Option<tokio::sync::oneshot::Sender<SocketAddr>>,
    ) -> anyhow::Result<()> {
        let (acceptor, local) = bind(addr).await?;
        if let Some(tx) = bound {
            // The receiver may have gone away; the server runs regardless.
            tx.send(local).ok();
        }
        self.serve_metrics_on(acceptor, local).await
    }

    async fn serve_metrics_on(
        &self,
        acceptor: TcpAcceptor,
        local: SocketAddr,
    ) -> anyhow::Result<()> {
        tracing::info!(addr = %local, "metrics listening at /metrics");
        let shutdown = self.shutdown.clone();
        poem::Server::new_with_acceptor(acceptor)
            .run_with_graceful_shutdown(
                api::metrics::standalone(self.metrics.clone()),
                async move { shutdown.cancelled().await },
                Some(Duration::from_secs(5)),
            )
            .await
            .context("metrics server failed")
    }

    /// The handlers of this build: each task type's configured delivery channel, or the log
    /// channel where none is configured. Says at start-up which channel each type uses.
    pub fn registry(&self) -> Registry {
        let e = &self.settings.engine;
        let log = LogChannel {
            delay: e.log_channel_delay,
        };
        let mut registry = Registry::new().with_default_timeout(e.handler_timeout);
        let rates = crate::channel::RateScope::Cluster {
            conn: Box::new(self.redis.clone()),
            key_prefix: self.keys.prefix().to_owned(),
        };
        for c in crate::channel::build(&self.settings.channels, log, &rates) {
            if c.name == "log" {
                tracing::warn!(task.r#type = %c.task_type, channel = c.name, "delivery channel: not configured, messages are logged and not sent");
            } else {
                tracing::info!(task.r#type = %c.task_type, channel = c.name, "delivery channel");
            }
            registry = registry.register(c.task_type, c.handler);
        }
        for (t, timeout) in &e.handler_timeouts {
            registry = registry.with_timeout(*t, *timeout);
        }
        registry
    }

    pub fn worker_config(&self) -> WorkerConfig {
        let e = &self.settings.engine;
        WorkerConfig {
            lease: e.lease,
            retry: RetryPolicy {
                base_ms: e.retry_base_ms,
                cap_ms: e.retry_cap_ms,
            },
            data_key: self.settings.audit_data_key.clone(),
            ..WorkerConfig::default()
        }
    }

    pub fn relay(&self) -> Relay {
        let e = &self.settings.engine;
        Relay::new(
            self.pool.clone(),
            self.redis.clone(),
            self.keys.clone(),
            RelayConfig {
                batch: e.relay_batch,
                poll: e.relay_poll,
            },
        )
        .with_metrics(self.metrics.clone())
        .with_listen(self.listen.clone())
    }

    /// The scheduler (run by every process with the relay role).
    pub fn scheduler(&self) -> Scheduler {
        Scheduler::new(
            self.pool.clone(),
            self.waker.clone(),
            self.settings.engine.scheduler_poll,
        )
        .with_data_key(self.settings.audit_data_key.clone())
    }

    /// The maintenance loop (run by every process with the relay role).
    pub fn maintenance(&self) -> crate::maintenance::Maintenance {
        crate::maintenance::Maintenance {
            pool: self.pool.clone(),
            retention: self.settings.retention_finished_tasks,
            interval: self.settings.maintenance_interval,
        }
    }

    pub fn rescuer(&self) -> Rescuer {
        let e = &self.settings.engine;
        let worker = self.worker_config();
        Rescuer::new(
            self.pool.clone(),
            self.redis.clone(),
            self.keys.clone(),
            RescuerConfig {
                interval: e.rescuer_interval,
                grace: e.orphan_grace,
                republish_after: e.republish_after,
                live_owner_grace: e.live_owner_grace,
                retry: worker.retry,
                jitter: worker.jitter,
                ..RescuerConfig::default()
            },
        )
        .with_metrics(self.metrics.clone())
        .with_failed_pushes(self.failed_pushes.clone())
    }

    /// Runs the given roles until the shutdown token is cancelled, then stops them in order:
    /// the API stops taking requests, the relay stops, workers drain (up to the drain
    /// deadline). Returns when all have stopped. With `METRICS_ADDR` set, `/metrics` is also
    /// served there, whatever the roles (a listener that cannot bind fails the start).
    pub async fn run(&self, roles: Roles, addr: SocketAddr) -> anyhow::Result<()> {
        if roles.api {
            // Refuse at once, before any other role starts, if the API could not verify tokens.
            self.api_context()?;
            if self.settings.jwt_secret.expose_secret().len() < 32 {
                tracing::warn!("JWT_SECRET is shorter than 32 characters (refused in production)");
            }
            if self.settings.audit_data_key.is_none() {
                tracing::warn!(
                    "AUDIT_DATA_KEY is not set: personal fields of new tasks are stored as they \
                     come and cannot be erased (README, \"Audit\")"
                );
            }
        }
        let metrics_listener = match self.settings.metrics_addr {
            Some(a) => Some(bind(a).await?),
            None => None,
        };
        let metrics_server = async {
            match metrics_listener {
                Some((acceptor, local)) => self.serve_metrics_on(acceptor, local).await,
                None => Ok(()),
            }
        };
        let mut set = tokio::task::JoinSet::new();
        if roles.workers {
            let e = &self.settings.engine;
            let pool = WorkerPool::build(
                e.workers,
                self.pool.clone(),
                self.settings.redis.target()?,
                self.keys.clone(),
                self.registry(),
                self.worker_config(),
            )
            .await
            .context("cannot start the workers")?;
            let pool = pool
                .with_metrics(self.metrics.clone())
                .with_failed_pushes(self.failed_pushes.clone());
            tracing::info!(workers = e.workers, "workers started");
            let shutdown = self.shutdown.clone();
            let drain = e.drain;
            set.spawn(async move {
                pool.run(shutdown, drain).await;
                Ok::<(), anyhow::Error>(())
            });
            let rescuer = self.rescuer();
            let shutdown = self.shutdown.clone();
            set.spawn(async move {
                rescuer.run(shutdown).await;
                Ok(())
            });
        }
        for projector in self.projectors() {
            let shutdown = self.shutdown.clone();
            let idle = self.settings.engine.projector_interval;
            set.spawn(async move {
                projector.run(shutdown, idle).await;
                Ok(())
            });
        }
        if let (true, Some(key)) = (roles.relay, &self.settings.audit_signing_key) {
            let checkpointer = crate::checkpointer::Checkpointer {
                pool: self.pool.clone(),
                key: key.clone(),
                interval: self.settings.audit_checkpoint_interval,
            };
            let shutdown = self.shutdown.clone();
            set.spawn(async move {
                checkpointer.run(shutdown).await;
                Ok(())
            });
        }
        if roles.relay {
            let maintenance = self.maintenance();
            let shutdown = self.shutdown.clone();
            set.spawn(async move {
                maintenance.run(shutdown).await;
                Ok(())
            });
            let scheduler = self.scheduler();
            let shutdown = self.shutdown.clone();
            set.spawn(async move {
                scheduler.run(shutdown).await;
                Ok(())
            });
            let relay = self.relay();
            let shutdown = self.shutdown.clone();
            set.spawn(async move {
                relay.run(shutdown).await;
                Ok(())
            });
        }
        let api = async {
            if roles.api {
                self.serve_api(addr, None).await
            } else {
                self.shutdown.cancelled().await;
                Ok(())
            }
        };
        // Both return on shutdown; either failing stops everything else.
        let (api_result, metrics_result) = tokio::join!(
            async {
                let r = api.await;
                self.shutdown.cancel();
                r
            },
            async {
                let r = metrics_server.await;
                if r.is_err() {
                    self.shutdown.cancel();
                }
                r
            }
        );
        self.shutdown.cancel();
        while let Some(joined) = set.join_next().await {
            match joined {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!(error = %e, "a role failed"),
                Err(e) => tracing::error!(error = %e, "a role panicked"),
            }
        }
        api_result.and(metrics_result)
    }

    /// Closes the pools (after every role has stopped).
    pub async fn close(self) {
        self.pool.close().await;
    }
}

/// Behind a transaction pooler the session settings cannot come with the connection: warns
/// when the role or database does not set them.
async fn check_pooled_session(pool: &PgPool) -> anyhow::Result<()> {
    let missing = store::session_settings_missing(pool)
        .await
        .context("cannot read the session settings")?;
    if !missing.is_empty() {
        tracing::warn!(
            missing = %missing.join(", "),
            "DB_POOLER=transaction: the sessions lack the service's planner settings, and on \
             churning queue tables Postgres may then scan whole tables; set them on the \
             service's role (ALTER ROLE … SET …; README, \"PgBouncer\")"
        );
    }
    Ok(())
}

/// The standby of `DATABASE_READ_URL`, checked to hold the primary's database. It need not be
/// up: while it is not, the reads go to the primary.
async fn connect_replica(
    settings: &Settings,
    primary: &PgPool,
) -> anyhow::Result<Option<store::replica::Reads>> {
    let Some(options) = settings.database.read_options()? else {
        return Ok(None);
    };
    let replica = store::connect_lazy(
        options,
        settings.database.max_connections,
        settings.health_timeout,
    );
    let reads = store::replica::Reads::with_replica(
        primary.clone(),
        replica,
        settings.database.read_max_lag,
        settings.health_timeout,
    );
    match reads.check_replica_database().await {
        Ok(None) => {}
        Ok(Some(mismatch)) => anyhow::bail!(mismatch),
        Err(e) => tracing::warn!(
            error = %e,
            "cannot reach the read replica (DATABASE_READ_URL) yet; reading from the primary until it answers"
        ),
    }
    Ok(Some(reads))
}

/// Binds the Redis namespace to this database if it is unbound; fails, naming both databases,
/// if it serves another one (see [`crate::binding`]).
async fn check_binding(pool: &PgPool, redis: &RedisConn, keys: &Keys) -> anyhow::Result<()> {
    let binding = Binding::new(pool.clone(), keys.clone());
    binding
        .check(&mut redis.clone())
        .await
        .context("refusing to start")?;
    let (identity, _) = binding.identity().await?;
    tracing::info!(
        database = %identity.database,
        system_identifier = identity.system_identifier.as_deref().unwrap_or("unreadable"),
        key = %keys.database(),
        "the Redis namespace serves this database"
    );
    Ok(())
}

/// Refuses to start with another `QUEUE_SHARDS` than the namespace's other processes: deliveries
/// would wait on lists this process never reads, and its rescuer would publish again deliveries
/// it looks for on the wrong shard.
async fn check_shards(redis: &RedisConn, keys: &Keys) -> anyhow::Result<()> {
    let bound = queue::bind_shards(&mut redis.clone(), keys)
        .await
        .context("cannot read the namespace's queue shards")?;
    if bound != keys.shards() {
        anyhow::bail!(
            "refusing to start: the Redis namespace {:?} runs {bound} queue shard(s) ({}), but \
             QUEUE_SHARDS is {}; every process of a deployment must use the same value (to change \
             it, let the queue drain, stop every process, delete {} and start them again)",
            keys.prefix(),
            keys.shard_count(),
            keys.shards(),
            keys.shard_count()
        );
    }
    Ok(())
}

/// Refuses, in production, a role that could rewrite the event log (a superuser, or the log's
/// owner, who may disable its triggers): the service runs as a member of `arnela_runtime` and
/// the migrations as the owner (`arnela migrate`). Applies pending migrations outside
/// production; in production they must have been applied by `arnela migrate` first.
/// Refuses to start without `AUDIT_DATA_KEY` when the database holds sealed tasks, or with a
/// key that does not open them: such a process would run those tasks with their personal fields
/// unreadable (dead-lettering them) and seal new ones under a key nobody else holds.
async fn check_data_key(
    pool: &PgPool,
    key: Option<&crate::domain::sealing::MasterKey>,
) -> anyhow::Result<()> {
    let mut conn = pool.acquire().await?;
    let Some((task, wrapped)) = store::data_keys::any(&mut conn).await? else {
        return Ok(());
    };
    match key {
        None => anyhow::bail!(
            "this database holds tasks sealed with AUDIT_DATA_KEY (task {task} and others): set \
             AUDIT_DATA_KEY to the key they were sealed with"
        ),
        Some(k) if k.unwrap(&wrapped, task).is_err() => anyhow::bail!(
            "AUDIT_DATA_KEY does not open the data key of task {task}: it is not the key this \
             database's tasks were sealed with"
        ),
        Some(_) => Ok(()),
    }
}

async fn check_role_and_schema(
    pool: &PgPool,
    production: bool,
    route: store::Route,
) -> anyhow::Result<()> {
    let powers = store::role_powers(pool)
        .await
        .context("cannot read the database role's privileges")?;
    let what = if powers.superuser {
        Some("a superuser")
    } else if powers.owns_log {
        Some("the owner of the event log")
    } else {
        None
    };
    if let (true, Some(what)) = (production, what) {
        anyhow::bail!(
            "refusing to start in production as database role {:?}, which is {what}: it could \
             disable the event log's triggers and rewrite history. Run the migrations as the \
             owner (`arnela migrate` with DB_MIGRATION_USER and DB_MIGRATION_PASSWORD) and the \
             service as a role that is a member of arnela_runtime (README, \"Audit\")",
            powers.role
        );
    }
    if let Some(what) = what {
        tracing::warn!(role = %powers.role, "the service's database role is {what} (refused in production)");
    }
    if !store::autovacuum_runs(pool)
        .await
        .context("cannot read the server's autovacuum setting")?
    {
        tracing::warn!(
            "autovacuum is off on this Postgres server: the outbox, task_leases and tasks tables \
             keep their dead rows and the engine slows down as they grow; turn it on \
             (autovacuum = on) or vacuum them on a schedule (README, \"Postgres\")"
        );
    }
    let pending = store::pending_migrations(pool)
        .await
        .context("cannot read the applied migrations")?;
    if pending.is_empty() {
        return Ok(());
    }
    if route == store::Route::TransactionPooler {
        // the migrator holds a session lock, which a transaction pooler cannot keep
        anyhow::bail!(
            "{} database migrations are not applied (first: {}); behind a transaction pooler \
             run `arnela migrate` first (it connects straight to Postgres by \
             DATABASE_LISTEN_URL)",
            pending.len(),
            pending[0]
        );
    }
    if production || !powers.may_migrate {
        anyhow::bail!(
            "{} database migrations are not applied (first: {}); run `arnela migrate` with the \
             owner's credentials (DB_MIGRATION_USER, DB_MIGRATION_PASSWORD) first",
            pending.len(),
            pending[0]
        );
    }
    store::migrate(pool)
        .await
        .context("cannot apply database migrations")
}

/// Listens on `addr` (port 0 picks a free one); returns the acceptor and the bound address.
async fn bind(addr: SocketAddr) -> anyhow::Result<(TcpAcceptor, SocketAddr)> {
    let acceptor = TcpListener::bind(addr)
        .into_acceptor()
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    let local = acceptor
        .local_addr()
        .first()
        .and_then(|a| a.as_socket_addr().copied())
        .unwrap_or(addr);
    Ok((acceptor, local))
}

/// Resolves when SIGTERM or ctrl-c arrives.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for ctrl-c");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("ctrl-c received; shutting down"),
        _ = term => tracing::info!("SIGTERM received; shutting down"),
    }
}
