//! Shared test fixtures: a Redis connection under a key prefix unique to the test, the API
//! bound to the test's own database (and a fixed `JWT_SECRET`, with tokens of every role), and
//! polling helpers (no fixed sleeps).

#![allow(dead_code)]

use arnela::api::auth::{Auth, Role};
use arnela::api::{self, ApiContext};
use arnela::queue::Keys;
use arnela::queue::RedisConn;
use poem::test::TestClient;
use poem::Endpoint;
use sqlx::PgPool;
use std::future::Future;
use std::time::Duration;

/// The tests' Redis: the node of [`redis_cluster`] when set, else `TEST_REDIS_URL` or the
/// machine's server.
pub fn redis_url() -> String {
    redis_cluster().unwrap_or_else(|| {
        std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
    })
}

/// A node of the Redis Cluster the tests run against instead of the single server
/// (`TEST_REDIS_CLUSTER=redis://127.0.0.1:7000`; `.ci/run` runs the engine and cache suites so).
pub fn redis_cluster() -> Option<String> {
    std::env::var("TEST_REDIS_CLUSTER").ok()
}

/// Where the tests' Redis is: the cluster when [`redis_cluster`] names one, else the server.
pub fn redis_target() -> arnela::queue::RedisTarget {
    let (url, cluster) = match redis_cluster() {
        Some(node) => (node, true),
        None => (redis_url(), false),
    };
    let mut target = arnela::queue::RedisTarget::from(
        redis::IntoConnectionInfo::into_connection_info(url).expect("redis url"),
    );
    target.cluster = cluster;
    target
}

pub async fn redis() -> RedisConn {
    arnela::queue::connect(redis_target())
        .await
        .expect("redis is running")
}

/// A key prefix no other test uses (with a hash tag on a cluster, as `REDIS_CLUSTER` gives).
pub fn unique_prefix() -> String {
    let prefix = format!("test-{}", uuid::Uuid::new_v4().simple());
    if redis_cluster().is_some() {
        arnela::queue::keys::tagged(&prefix)
    } else {
        prefix
    }
}

/// Deletes the test's own keys (never anything else on the shared server).
pub async fn delete_prefix(prefix: &str) {
    let mut c = redis().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:*"))
        .query_async(&mut c)
        .await
        .unwrap();
    if !keys.is_empty() {
        redis::cmd("DEL")
            .arg(&keys)
            .query_async::<()>(&mut c)
            .await
            .unwrap();
    }
}

/// The `JWT_SECRET` of every API the tests build or start.
pub const JWT_SECRET: &str = "test-jwt-secret-of-more-than-32-characters";

/// Signs and verifies with [`JWT_SECRET`].
pub fn auth() -> Auth {
    Auth::new(&secrecy::SecretString::from(JWT_SECRET)).expect("a non-empty secret")
}

/// A token of `role` valid for an hour (subject `test-<role>`).
pub fn token(role: Role) -> String {
    auth().mint(role, Duration::from_secs(3600), &format!("test-{role}"))
}

/// The `Authorization` header value carrying a token of `role`.
pub fn bearer(role: Role) -> String {
    format!("Bearer {}", token(role))
}

pub async fn context(pool: PgPool) -> ApiContext {
    context_with(pool, redis().await, Keys::new(unique_prefix()))
}

/// The API context over a given Redis connection and key prefix; its metrics read the queue
/// and the outbox at scrape time, as the application's do.
pub fn context_with(pool: PgPool, redis: RedisConn, keys: Keys) -> ApiContext {
    let timeout = Duration::from_millis(1000);
    let metrics =
        arnela::metrics::Metrics::for_cluster(pool.clone(), redis.clone(), keys.clone(), timeout);
    let cache = arnela::cache::Cache::new(redis.clone(), keys.prefix());
    metrics.register_cache(cache.stats.clone());
    let waker = arnela::store::outbox::OutboxWaker::spawn(pool.clone(), Duration::from_millis(2));
    let publisher = arnela::relay::Publisher::new(
        pool.clone(),
        redis.clone(),
        keys.clone(),
        waker.clone(),
        metrics.clone(),
    );
    ApiContext {
        metrics,
        publisher,
        pool: pool.clone(),
        reads: arnela::store::replica::Reads::primary(pool.clone()),
        cache,
        redis,
        keys,
        health_timeout: timeout,
        limits: arnela::api::limits::HttpLimits::new(
            1024,
            256,
            1024 * 1024,
            Duration::from_secs(30),
        ),
        schedule_horizon: chrono::Duration::days(366),
        channels: Default::default(),
        waker,
        auth: auth(),
        // every API test runs with personal fields sealed, as a production deployment does
        data_key: Some(std::sync::Arc::new(data_key())),
    }
}

/// Seeds the context's namespace as a relay's first batch would (binding and seeded marker):
/// from then on its enqueues publish the tasks due now themselves.
pub async fn seed(ctx: &ApiContext) {
    let binding = arnela::binding::Binding::new(ctx.pool.clone(), ctx.keys.clone());
    binding.mark_seeded(&mut ctx.redis.clone()).await.unwrap();
}

/// The master key the tests seal personal fields with (`AUDIT_DATA_KEY`).
pub const DATA_KEY_HEX: &str = "5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a";

pub fn data_key() -> arnela::domain::sealing::MasterKey {
    arnela::domain::sealing::MasterKey::from_hex(DATA_KEY_HEX).unwrap()
}

/// The API over the test's database, every request sent with an admin token.
pub async fn client(pool: PgPool) -> TestClient<impl Endpoint> {
    client_for(context(pool).await)
}

/// The API over `ctx`, every request sent with an admin token.
pub fn client_for(ctx: ApiContext) -> TestClient<impl Endpoint> {
    TestClient::new(api::endpoint(ctx)).default_header("authorization", bearer(Role::Admin))
}

/// Polls `check` until it returns `Some`, failing the test after `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Makes the lease of task `id` run out a second ago, as a stalled worker's would: in its row
/// and in `task_leases`, where the rescuer looks for expired leases.
pub async fn expire_lease(pool: &PgPool, id: arnela::domain::TaskId) {
    sqlx::query(
        "WITH t AS (UPDATE tasks SET lease_expires_at = now() - interval '1 second' \
                    WHERE id = $1 RETURNING id, lease_expires_at) \
         UPDATE task_leases l SET expires_at = t.lease_expires_at FROM t WHERE l.task_id = t.id",
    )
    .bind(id)
    .execute(pool)
    .await
    .unwrap();
}

/// Row counts of the three tables enqueue writes.
pub async fn counts(pool: &PgPool) -> (i64, i64, i64) {
    let q = |t: &str| format!("SELECT count(*) FROM {t}");
    let tasks: i64 = sqlx::query_scalar(&q("tasks"))
        .fetch_one(pool)
        .await
        .unwrap();
    let events: i64 = sqlx::query_scalar(&q("task_events"))
        .fetch_one(pool)
        .await
        .unwrap();
    let outbox: i64 = sqlx::query_scalar(&q("outbox"))
        .fetch_one(pool)
        .await
        .unwrap();
    (tasks, events, outbox)
}

/// A valid SMS task to enqueue through the store.
pub fn new_sms(message: &str) -> arnela::domain::NewTask {
    new_task(
        arnela::domain::TaskType::SendSms,
        serde_json::json!({"phone": "+34123456789", "message": message}),
    )
}

/// A task of `task_type` with a valid `payload`, as the store takes it (three attempts, due now).
pub fn new_task(
    task_type: arnela::domain::TaskType,
    payload: serde_json::Value,
) -> arnela::domain::NewTask {
    arnela::domain::NewTask {
        task_type,
        payload: arnela::domain::validate_payload(task_type, payload).unwrap(),
        max_attempts: 3,
        run_at: chrono::Utc::now(),
        idempotency_key: None,
        invalidates: Vec::new(),
        owner: String::new(),
        trace: None,
    }
}

pub fn sms(message: &str) -> serde_json::Value {
    serde_json::json!({
        "type": "send_sms",
        "payload": {"phone": "+34123456789", "message": message},
    })
}

/// Sends a request and returns the status and the JSON body (`Null` for an empty one).
/// Waits up to 60 s until the service at `base` (`http://127.0.0.1:PORT`) answers
/// `/health/live`.
pub async fn until_live(base: &str) {
    let http = reqwest::Client::new();
    eventually(Duration::from_secs(60), "the service to answer", || {
        let req = http.get(format!("{base}/health/live"));
        async move { req.send().await.ok().filter(|r| r.status().is_success()) }
    })
    .await;
}

pub async fn call<E: Endpoint>(
    client: &TestClient<E>,
    method: poem::http::Method,
    path: &str,
    body: Option<&serde_json::Value>,
) -> (u16, serde_json::Value) {
    let mut req = client.request(method, path);
    if let Some(b) = body {
        req = req.body_json(b);
    }
    let resp = req.send().await;
    let status = resp.0.status().as_u16();
    let bytes = resp.0.into_body().into_vec().await.expect("body");
    let json = if bytes.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(&bytes)))
    };
    (status, json)
}

pub async fn post<E: Endpoint>(
    client: &TestClient<E>,
    path: &str,
    body: &serde_json::Value,
) -> (u16, serde_json::Value) {
    call(client, poem::http::Method::POST, path, Some(body)).await
}

pub async fn get<E: Endpoint>(client: &TestClient<E>, path: &str) -> (u16, serde_json::Value) {
    call(client, poem::http::Method::GET, path, None).await
}

/// A `postgres://` URL for the test's own database (for spawned processes).
pub fn database_url(pool: &PgPool) -> String {
    let o = pool.connect_options();
    format!(
        "postgres://{}@{}:{}/{}",
        o.get_username(),
        o.get_host(),
        o.get_port(),
        o.get_database().expect("test database name")
    )
}

pub mod engine {
    //! The delivery engine assembled from its one-step parts, with a scripted handler.

    use arnela::domain::{RetryPolicy, TaskType};
    use arnela::queue::RedisConn;
    use arnela::queue::{self, Keys};
    use arnela::relay::{Relay, RelayConfig};
    use arnela::rescuer::{Rescuer, RescuerConfig};
    use arnela::worker::handler::{Handler, HandlerResult, Registry, TaskContext};
    use arnela::worker::{Processed, Worker, WorkerConfig, WorkerStats};
    use futures::future::BoxFuture;
    use sqlx::PgPool;
    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;
    use tokio_util::sync::CancellationToken;

    /// Answers from a script (then succeeds), remembering every call; optionally waits for a
    /// gate to open before answering.
    #[derive(Default)]
    pub struct Script {
        pub outcomes: Mutex<VecDeque<HandlerResult>>,
        pub calls: Mutex<Vec<(arnela::domain::TaskId, i32, String)>>,
        pub gate: Option<Arc<tokio::sync::Semaphore>>,
        pub delay: Option<Duration>,
    }

    impl Script {
        pub fn answering(outcomes: Vec<HandlerResult>) -> Arc<Script> {
            Arc::new(Script {
                outcomes: Mutex::new(outcomes.into()),
                ..Script::default()
            })
        }

        pub fn calls(&self) -> Vec<(arnela::domain::TaskId, i32, String)> {
            self.calls.lock().unwrap().clone()
        }
    }

    impl Handler for Script {
        fn handle<'a>(&'a self, task: &'a TaskContext) -> BoxFuture<'a, HandlerResult> {
            Box::pin(async move {
                self.calls.lock().unwrap().push((
                    task.task_id,
                    task.attempt,
                    task.idempotency_key.clone(),
                ));
                if let Some(gate) = &self.gate {
                    gate.acquire().await.expect("gate open").forget();
                }
                if let Some(d) = self.delay {
                    tokio::time::sleep(d).await;
                }
                let next = self.outcomes.lock().unwrap().pop_front();
                next.unwrap_or_else(|| Ok(serde_json::json!({"provider_id": "ok"})))
            })
        }
    }

    pub struct Engine {
        pub pool: PgPool,
        pub keys: Keys,
        pub redis: RedisConn,
        pub relay: Relay,
        pub rescuer: Rescuer,
        pub worker: Worker,
        pub stats: Arc<WorkerStats>,
        /// The registry the relay and the worker record in.
        pub metrics: arnela::metrics::Metrics,
        pub shutdown: CancellationToken,
        pub hard_stop: CancellationToken,
    }

    pub fn config(jitter: f64) -> WorkerConfig {
        WorkerConfig {
            lease: Duration::from_secs(30),
            block: Duration::from_millis(200),
            retry: RetryPolicy {
                base_ms: 1000,
                cap_ms: 60_000,
            },
            jitter: Arc::new(move || jitter),
            // the engine tests run with sealed payloads, as the API tests do
            data_key: Some(Arc::new(super::data_key())),
        }
    }

    pub async fn engine(pool: PgPool, script: Arc<Script>, config: WorkerConfig) -> Engine {
        engine_with(pool, registry(script), config).await
    }

    pub fn registry(script: Arc<Script>) -> Registry {
        let mut r = Registry::new().with_default_timeout(Duration::from_secs(5));
        for t in TaskType::ALL {
            r = r.register(t, script.clone());
        }
        r
    }

    pub async fn engine_with(pool: PgPool, registry: Registry, config: WorkerConfig) -> Engine {
        let keys = Keys::new(super::unique_prefix());
        let redis = super::redis().await;
        let stats = Arc::new(WorkerStats::default());
        let metrics = arnela::metrics::Metrics::new();
        // one process: its worker and its rescuer share what the failed list's pushes meet
        let failed_pushes = arnela::dead_letters::Refusals::default();
        let blocking = queue::connect_with_timeout(super::redis_target(), Duration::from_secs(5))
            .await
            .unwrap();
        let worker = Worker::new(
            pool.clone(),
            blocking,
            keys.clone(),
            Arc::new(registry),
            config.clone(),
            stats.clone(),
        )
        .with_metrics(metrics.clone())
        .with_failed_pushes(failed_pushes.clone());
        Engine {
            relay: Relay::new(
                pool.clone(),
                redis.clone(),
                keys.clone(),
                RelayConfig {
                    batch: 100,
                    poll: Duration::from_millis(50),
                },
            )
            .with_metrics(metrics.clone()),
            rescuer: Rescuer::new(
                pool.clone(),
                redis.clone(),
                keys.clone(),
                RescuerConfig {
                    grace: Duration::ZERO,
                    retry: config.retry,
                    jitter: config.jitter.clone(),
                    ..RescuerConfig::default()
                },
            )
            .with_failed_pushes(failed_pushes),
            pool,
            keys,
            redis,
            worker,
            stats,
            metrics,
            shutdown: CancellationToken::new(),
            hard_stop: CancellationToken::new(),
        }
    }

    impl Engine {
        pub async fn step(&self) -> Processed {
            self.worker
                .process_next(&self.shutdown, &self.hard_stop)
                .await
                .expect("worker step")
        }

        pub async fn relay_once(&self) -> usize {
            self.relay.run_once().await.expect("relay batch").published
        }

        pub async fn len(&self, key: String) -> i64 {
            let mut c = self.redis.clone();
            redis::cmd("LLEN")
                .arg(key)
                .query_async(&mut c)
                .await
                .unwrap()
        }

        pub async fn range(&self, key: String) -> Vec<String> {
            let mut c = self.redis.clone();
            redis::cmd("LRANGE")
                .arg(key)
                .arg(0)
                .arg(-1)
                .query_async(&mut c)
                .await
                .unwrap()
        }

        /// Event types of a task's history, in order.
        pub async fn history(&self, id: arnela::domain::TaskId) -> Vec<String> {
            sqlx::query_scalar(
                "SELECT event_type FROM task_events WHERE task_id = $1 ORDER BY sequence",
            )
            .bind(id)
            .fetch_all(&self.pool)
            .await
            .unwrap()
        }

        pub async fn events(&self, id: arnela::domain::TaskId) -> Vec<(String, serde_json::Value)> {
            sqlx::query_as(
                "SELECT event_type, data FROM task_events WHERE task_id = $1 ORDER BY sequence",
            )
            .bind(id)
            .fetch_all(&self.pool)
            .await
            .unwrap()
        }

        pub async fn status(&self, id: arnela::domain::TaskId) -> String {
            sqlx::query_scalar("SELECT status FROM tasks WHERE id = $1")
                .bind(id)
                .fetch_one(&self.pool)
                .await
                .unwrap()
        }

        /// Waits until task `id` is running (its attempt claimed).
        pub async fn until_running(&self, id: arnela::domain::TaskId) {
            super::eventually(Duration::from_secs(10), "the attempt to start", || async {
                (self.status(id).await == "running").then_some(())
            })
            .await;
        }
    }
}

pub mod process {
    //! Real `arnela` processes and a Redis server of the test's own.

    use std::process::{Child, Command, Stdio};

    /// A child process killed (SIGKILL) when dropped, so a failing test leaves nothing behind.
    pub struct Proc {
        pub child: Child,
        pub name: String,
    }

    impl Proc {
        pub fn kill9(&mut self) {
            self.child.kill().ok();
            self.child.wait().ok();
        }

        /// Sends SIGTERM and waits for the exit status.
        pub fn terminate(&mut self) -> std::process::ExitStatus {
            Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .status()
                .expect("kill runs");
            self.child.wait().expect("child exits")
        }
    }

    impl Drop for Proc {
        fn drop(&mut self) {
            self.kill9();
        }
    }

    /// Starts `arnela <role>` against the given database, Redis and key prefix, with the tests'
    /// `JWT_SECRET` (call its API with `common::bearer(..)`) and short engine intervals, so that
    /// tests do not wait on the production defaults.
    pub fn arnela(
        role: &str,
        database_url: &str,
        redis_url: &str,
        prefix: &str,
        extra: &[(&str, &str)],
    ) -> Proc {
        spawn(
            arnela_command(role, database_url, redis_url, prefix, extra),
            role,
        )
    }

    /// The command [`arnela`] runs: [`command`] with the tests' short intervals and `extra`.
    pub fn arnela_command(
        role: &str,
        database_url: &str,
        redis_url: &str,
        prefix: &str,
        extra: &[(&str, &str)],
    ) -> Command {
        let mut cmd = command(role, database_url, redis_url, prefix);
        cmd.env("DB_MAX_CONNECTIONS", "8")
            .env("RELAY_POLL_MS", "50")
            .env("RESCUER_INTERVAL_MS", "200")
            .env("RETRY_BASE_MS", "50");
        for (k, v) in extra {
            cmd.env(k, v);
        }
        cmd
    }

    /// The command line of `arnela <role>` with only what connects it (database, Redis, key
    /// prefix, the tests' `JWT_SECRET`): every engine setting keeps its default.
    pub fn command(role: &str, database_url: &str, redis_url: &str, prefix: &str) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_arnela"));
        cmd.arg(role)
            .env("DATABASE_URL", database_url)
            .env("REDIS_URL", redis_url)
            .env("ARNELA_KEY_PREFIX", prefix)
            .env("APP_ENV", "test")
            .env("JWT_SECRET", super::JWT_SECRET)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        if super::redis_cluster().as_deref() == Some(redis_url) {
            cmd.env("REDIS_CLUSTER", "true");
        }
        cmd
    }

    /// Runs `cmd` (an `arnela audit` command line, see [`command`]) with `verify` and fails the
    /// test, with what it printed, unless every chain verifies.
    pub fn assert_audit_verifies(mut cmd: Command) {
        let out = cmd
            .arg("verify")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .expect("arnela audit verify runs");
        assert!(
            out.status.success(),
            "arnela audit verify: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Spawns `cmd` as a [`Proc`] named `name`.
    pub fn spawn(mut cmd: Command, name: &str) -> Proc {
        let child = cmd.spawn().expect("the arnela binary starts");
        Proc {
            child,
            name: name.to_owned(),
        }
    }

    /// Runs `cmd` until it exits, for at most `limit` (then kills it and fails the test);
    /// returns its exit status and what it wrote to standard error.
    pub fn run_to_exit(
        mut cmd: Command,
        limit: std::time::Duration,
    ) -> (std::process::ExitStatus, String) {
        let path = std::env::temp_dir().join(format!("arnela-stderr-{}", uuid::Uuid::new_v4()));
        let file = std::fs::File::create(&path).expect("a stderr file");
        let child = cmd.stderr(file).spawn().expect("the command starts");
        let mut proc = Proc {
            child,
            name: "run_to_exit".into(),
        };
        let started = std::time::Instant::now();
        let status = loop {
            if let Some(status) = proc.child.try_wait().expect("try_wait") {
                break status;
            }
            assert!(
                started.elapsed() < limit,
                "the process was still running after {limit:?}"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        let stderr = std::fs::read_to_string(&path).unwrap_or_default();
        std::fs::remove_file(&path).ok();
        (status, stderr)
    }

    /// A PostgreSQL server of the test's own (initdb in a temporary directory, run as the
    /// `postgres` user), so a test can stop and start it. Stopped and removed when dropped.
    pub struct PgServer {
        pub port: u16,
        dir: std::path::PathBuf,
    }

    fn as_postgres(args: &[&str]) -> Command {
        let bin = pg_bin();
        let mut cmd = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]);
            c.arg(format!("{bin}/{}", args[0]));
            c
        } else {
            Command::new(format!("{bin}/{}", args[0]))
        };
        cmd.args(&args[1..])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        cmd
    }

    /// A new directory for a server's data, owned by `postgres` when the tests run as root.
    fn server_dir() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("arnela-pg-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        if is_root() {
            let ok = Command::new("chown")
                .args(["postgres:postgres", dir.to_str().unwrap()])
                .status()
                .unwrap()
                .success();
            assert!(ok, "chown of the data directory");
        }
        dir
    }

    /// Whether the tests run as root (servers then run as `postgres`).
    pub fn is_root() -> bool {
        Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            .unwrap_or(false)
    }

    /// The directory of `initdb` and `pg_ctl` (`pg_config --bindir`).
    fn pg_bin() -> String {
        let out = Command::new("pg_config")
            .arg("--bindir")
            .output()
            .expect("pg_config is installed");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    impl PgServer {
        pub fn start(port: u16) -> PgServer {
            let dir = server_dir();
            let data = dir.join("data");
            let ok = as_postgres(&[
                "initdb",
                "-D",
                data.to_str().unwrap(),
                "-U",
                "postgres",
                "-A",
                "trust",
                "--no-sync",
            ])
            .status()
            .unwrap()
            .success();
            assert!(ok, "initdb");
            let server = PgServer { port, dir };
            server.resume();
            server
        }

        /// A streaming hot standby of `primary` (`pg_basebackup -R`), started on `port`.
        pub fn standby_of(primary: &PgServer, port: u16) -> PgServer {
            let dir = server_dir();
            let data = dir.join("data");
            let ok = as_postgres(&[
                "pg_basebackup",
                "-h",
                "127.0.0.1",
                "-p",
                &primary.port.to_string(),
                "-U",
                "postgres",
                "-D",
                data.to_str().unwrap(),
                "-R",
                "-X",
                "stream",
                "--no-sync",
            ])
            .status()
            .unwrap()
            .success();
            assert!(ok, "pg_basebackup");
            let server = PgServer { port, dir };
            server.resume();
            server
        }

        fn data(&self) -> String {
            self.dir.join("data").to_str().unwrap().to_owned()
        }

        /// Starts (again) the server and waits until it accepts connections.
        pub fn resume(&self) {
            let opts = format!(
                "-p {} -c listen_addresses=127.0.0.1 -k {} -c fsync=off -c max_connections=100",
                self.port,
                self.dir.to_str().unwrap()
            );
            let log = self.dir.join("log").to_str().unwrap().to_owned();
            let ok = as_postgres(&[
                "pg_ctl",
                "-D",
                &self.data(),
                "-o",
                &opts,
                "-l",
                &log,
                "-w",
                "start",
            ])
            .status()
            .unwrap()
            .success();
            assert!(ok, "pg_ctl start");
        }

        /// Turns TLS on with the given certificate and key (PEM files), and restarts.
        pub fn enable_tls(&self, cert: &std::path::Path, key: &std::path::Path) {
            let data = std::path::PathBuf::from(self.data());
            for (from, to) in [(cert, "server.crt"), (key, "server.key")] {
                std::fs::copy(from, data.join(to)).unwrap();
                let path = data.join(to);
                let path = path.to_str().unwrap();
                if is_root() {
                    Command::new("chown")
                        .args(["postgres:postgres", path])
                        .status()
                        .unwrap();
                }
                Command::new("chmod").args(["600", path]).status().unwrap();
            }
            use std::io::Write;
            let mut conf = std::fs::OpenOptions::new()
                .append(true)
                .open(data.join("postgresql.conf"))
                .unwrap();
            writeln!(
                conf,
                "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'"
            )
            .unwrap();
            self.stop();
            self.resume();
        }

        /// Stops the server at once (`-m immediate`: like a crash).
        pub fn stop(&self) {
            as_postgres(&[
                "pg_ctl",
                "-D",
                &self.data(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ])
            .status()
            .unwrap();
        }

        pub fn url(&self) -> String {
            format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
        }
    }

    impl Drop for PgServer {
        fn drop(&mut self) {
            self.stop();
            std::fs::remove_dir_all(&self.dir).ok();
        }
    }

    pub fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    /// A connection to the Redis server on `port` once it accepts one (within 10 s).
    pub async fn connect_when_up(port: u16) -> arnela::queue::RedisConn {
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
        super::eventually(
            std::time::Duration::from_secs(10),
            "own redis to accept connections",
            || {
                let client = client.clone();
                async move {
                    redis::aio::ConnectionManager::new(client)
                        .await
                        .ok()
                        .map(Into::into)
                }
            },
        )
        .await
    }

    /// A Redis server of the test's own (it may be flushed or stopped).
    pub fn redis_server(port: u16) -> Proc {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server is installed");
        Proc {
            child,
            name: "redis-server".into(),
        }
    }
}

pub mod smtp {
    //! A small SMTP server on 127.0.0.1 that keeps what it is sent (no TLS; AUTH PLAIN/LOGIN are
    //! accepted and recorded). Started by the test that needs it.

    use std::sync::{Arc, Mutex};
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    use tokio::net::{TcpListener, TcpStream};

    /// One message as the sink received it.
    #[derive(Debug, Clone, Default)]
    pub struct Received {
        pub auth: Option<String>,
        pub mail_from: String,
        pub rcpt_to: Vec<String>,
        /// The DATA section, dot-unstuffed, CRLF line ends.
        pub data: String,
    }

    #[derive(Clone)]
    pub struct Sink {
        pub port: u16,
        messages: Arc<Mutex<Vec<Received>>>,
        rcpt_reply: Arc<Mutex<String>>,
    }

    impl Sink {
        pub async fn start() -> Sink {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let sink = Sink {
                port: listener.local_addr().unwrap().port(),
                messages: Arc::default(),
                rcpt_reply: Arc::new(Mutex::new("250 2.1.5 OK".into())),
            };
            let s = sink.clone();
            tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let s = s.clone();
                    tokio::spawn(async move { s.session(stream).await.ok() });
                }
            });
            sink
        }

        /// The reply to every following `RCPT TO` (e.g. `550 5.1.1 no such user`).
        pub fn reply_to_recipients_with(&self, reply: &str) {
            *self.rcpt_reply.lock().unwrap() = reply.to_owned();
        }

        pub fn messages(&self) -> Vec<Received> {
            self.messages.lock().unwrap().clone()
        }

        async fn session(&self, stream: TcpStream) -> std::io::Result<()> {
            let (r, mut w) = stream.into_split();
            let mut r = BufReader::new(r);
            w.write_all(b"220 sink.test ESMTP\r\n").await?;
            let mut current = Received::default();
            let mut line = String::new();
            loop {
                line.clear();
                if r.read_line(&mut line).await? == 0 {
                    return Ok(());
                }
                let cmd = line.trim_end().to_owned();
                let upper = cmd.to_ascii_uppercase();
                let reply: String = if upper.starts_with("EHLO") {
                    "250-sink.test\r\n250-AUTH PLAIN LOGIN\r\n250-8BITMIME\r\n250 SMTPUTF8".into()
                } else if upper.starts_with("HELO") || upper == "NOOP" {
                    "250 OK".into()
                } else if upper.starts_with("AUTH PLAIN ") {
                    current.auth = Some(cmd[11..].to_owned());
                    "235 2.7.0 Authentication successful".into()
                } else if upper.starts_with("MAIL FROM:") {
                    current.mail_from = cmd[10..].to_owned();
                    "250 2.1.0 OK".into()
                } else if upper.starts_with("RCPT TO:") {
                    let reply = self.rcpt_reply.lock().unwrap().clone();
                    if reply.starts_with('2') {
                        current.rcpt_to.push(cmd[8..].to_owned());
                    }
                    reply
                } else if upper == "DATA" {
                    w.write_all(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                        .await?;
                    let mut data = String::new();
                    loop {
                        line.clear();
                        if r.read_line(&mut line).await? == 0 {
                            return Ok(());
                        }
                        if line == ".\r\n" || line == ".\n" {
                            break;
                        }
                        data.push_str(line.strip_prefix('.').unwrap_or(&line));
                    }
                    current.data = data;
                    let auth = current.auth.clone();
                    self.messages
                        .lock()
                        .unwrap()
                        .push(std::mem::take(&mut current));
                    current.auth = auth;
                    "250 2.0.0 Ok: queued as SINK1".into()
                } else if upper == "RSET" {
                    let auth = current.auth.take();
                    current = Received {
                        auth,
                        ..Received::default()
                    };
                    "250 OK".into()
                } else if upper == "QUIT" {
                    w.write_all(b"221 2.0.0 Bye\r\n").await?;
                    return Ok(());
                } else {
                    "502 5.5.2 Command not recognized".into()
                };
                w.write_all(format!("{reply}\r\n").as_bytes()).await?;
            }
        }
    }
}

pub mod logs {
    //! Captures what the code logs (every level) into a buffer, for this thread only.

    use std::io::Write;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    pub struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Captured {
        pub fn text(&self) -> String {
            String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
        }
    }

    pub struct Writer(Arc<Mutex<Vec<u8>>>);

    impl Write for Writer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
        type Writer = Writer;

        fn make_writer(&'a self) -> Writer {
            Writer(self.0.clone())
        }
    }

    /// Logs of this thread go to the returned buffer until the guard is dropped.
    pub fn capture() -> (Captured, tracing::subscriber::DefaultGuard) {
        // With a single registered dispatcher, tracing decides whether a callsite is enabled
        // from the thread that reaches it first; another test's thread (without a subscriber)
        // would then switch the callsite off for this one too. A second, silent dispatcher makes
        // tracing ask every dispatcher instead.
        static SILENT: std::sync::OnceLock<tracing::Dispatch> = std::sync::OnceLock::new();
        SILENT.get_or_init(|| tracing::Dispatch::new(tracing::subscriber::NoSubscriber::default()));
        let captured = Captured::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(captured.clone())
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .finish();
        (captured, tracing::subscriber::set_default(subscriber))
    }
}

/// Enqueues `n` tasks of `task_type` through the store (1000 per transaction), returning their
/// ids in order.
pub async fn enqueue_tasks(
    pool: &PgPool,
    task_type: arnela::domain::TaskType,
    n: usize,
    max_attempts: i32,
) -> Vec<arnela::domain::TaskId> {
    use arnela::domain::{validate_payload, NewTask, TaskType};
    let payload = |i: usize| match task_type {
        TaskType::SendEmail => {
            serde_json::json!({"to": "a@b.es", "subject": format!("s{i}"), "body": "b"})
        }
        TaskType::SyncCalendar => {
            serde_json::json!({"event_id": format!("e{i}"), "action": "delete"})
        }
        _ => serde_json::json!({"phone": "+34123456789", "message": format!("m{i}")}),
    };
    let mut ids = Vec::with_capacity(n);
    for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
        let mut tx = arnela::store::Tx::begin(pool).await.unwrap();
        let news = chunk
            .iter()
            .map(|&i| NewTask {
                task_type,
                payload: validate_payload(task_type, payload(i)).unwrap(),
                max_attempts,
                run_at: chrono::Utc::now(),
                idempotency_key: None,
                invalidates: Vec::new(),
                // the tenant of `token(Role::Producer)`
                owner: "test-producer".into(),
                trace: None,
            })
            .collect();
        let made = arnela::store::tasks::enqueue(&mut tx, news, chrono::Utc::now(), None)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        ids.extend(made.iter().map(|m| m.task().id));
    }
    ids
}

/// Every event of the first ten of `ids`, per task in sequence order, for a failure message.
pub async fn histories(pool: &PgPool, ids: &[impl Into<arnela::domain::TaskId> + Copy]) -> String {
    let ids: Vec<arnela::domain::TaskId> = ids.iter().map(|&id| id.into()).collect();
    let rows: Vec<(
        arnela::domain::TaskId,
        String,
        serde_json::Value,
        chrono::DateTime<chrono::Utc>,
    )> = sqlx::query_as(
        "SELECT task_id, event_type, data, recorded_at FROM task_events \
             WHERE task_id = ANY($1) ORDER BY task_id, sequence",
    )
    .bind(&ids)
    .fetch_all(pool)
    .await
    .unwrap();
    let mut per_task: std::collections::BTreeMap<arnela::domain::TaskId, Vec<String>> =
        Default::default();
    for (id, t, data, at) in rows {
        per_task
            .entry(id)
            .or_default()
            .push(format!("{} {t} {data}", at.format("%H:%M:%S%.3f")));
    }
    let mut out = String::new();
    for id in ids.iter().take(10) {
        let events = per_task.remove(id).unwrap_or_default();
        out.push_str(&format!("\n{id}:\n  {}", events.join("\n  ")));
    }
    out
}

/// Runs `sql` (binding `id` as `$1`) on the event log with its append-only trigger disabled, as
/// an owner tampering with history would.
pub async fn tamper(pool: &sqlx::PgPool, sql: &str, id: impl Into<arnela::domain::TaskId>) {
    let mut conn = pool.acquire().await.unwrap();
    sqlx::query("ALTER TABLE task_events DISABLE TRIGGER task_events_append_only")
        .execute(&mut *conn)
        .await
        .unwrap();
    sqlx::query(sql)
        .bind(id.into())
        .execute(&mut *conn)
        .await
        .unwrap();
    sqlx::query("ALTER TABLE task_events ENABLE TRIGGER task_events_append_only")
        .execute(&mut *conn)
        .await
        .unwrap();
}

/// A login role of the test's own, member of `arnela_runtime` (dropped by [`drop_role`]).
pub async fn runtime_role(pool: &sqlx::PgPool) -> String {
    let role = format!("rt_{}", uuid::Uuid::new_v4().simple());
    sqlx::query(&format!("CREATE ROLE {role} LOGIN IN ROLE arnela_runtime"))
        .execute(pool)
        .await
        .unwrap();
    role
}

pub async fn drop_role(pool: &sqlx::PgPool, role: &str) {
    sqlx::query(&format!("DROP ROLE IF EXISTS {role}"))
        .execute(pool)
        .await
        .unwrap();
}

/// The test's database as `role` (the local server trusts loopback connections).
pub async fn pool_as(pool: &sqlx::PgPool, role: &str) -> sqlx::PgPool {
    let options = pool.connect_options().as_ref().clone().username(role);
    arnela::store::connect(options, 2).await.unwrap()
}
