//! The service through a real PgBouncer in transaction mode (`DB_POOLER=transaction`): the
//! enqueue → run → history path, `LISTEN` on the direct connection (`DATABASE_LISTEN_URL`) and
//! polling without it. PgBouncer ≥ 1.21 must be on the PATH (`ci/pgbouncer.sh` installs it).

use crate::common;
use common::process::{arnela_command, free_port, is_root, spawn, Proc};
use common::{database_url, eventually};
use serde_json::{json, Value};
use sqlx::PgPool;
use std::process::{Command, Stdio};
use std::time::Duration;

/// A PgBouncer of the test's own in front of one database of the machine's Postgres, with
/// fewer server sessions than the service has connections, so transactions share them.
struct Bouncer {
    port: u16,
    dir: tempfile::TempDir,
    _process: Proc,
}

const SERVER_SESSIONS: u32 = 3;

impl Bouncer {
    fn start(database: &str) -> Bouncer {
        let version = Command::new("pgbouncer")
            .arg("--version")
            .output()
            .expect("pgbouncer ≥ 1.21 on the PATH (bash ci/pgbouncer.sh installs it)");
        let version = String::from_utf8_lossy(&version.stdout).to_string();
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        std::fs::write(dir.path().join("users.txt"), "\"postgres\" \"\"\n").unwrap();
        let ini = format!(
            "[databases]\n\
             {database} = host=127.0.0.1 port=5432 dbname={database}\n\
             [pgbouncer]\n\
             listen_addr = 127.0.0.1\n\
             listen_port = {port}\n\
             unix_socket_dir =\n\
             auth_type = trust\n\
             auth_file = {users}\n\
             admin_users = postgres\n\
             pool_mode = transaction\n\
             max_prepared_statements = 200\n\
             default_pool_size = {SERVER_SESSIONS}\n\
             max_client_conn = 200\n\
             stats_period = 1\n",
            users = dir.path().join("users.txt").display(),
        );
        let config = dir.path().join("pgbouncer.ini");
        std::fs::write(&config, ini).unwrap();
        let log = std::fs::File::create(dir.path().join("pgbouncer.log")).unwrap();
        let mut cmd = Command::new("pgbouncer");
        if is_root() {
            // PgBouncer will not run as root; it switches to this user itself
            cmd.args(["-u", "postgres"]);
        }
        cmd.arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let process = spawn(cmd, "pgbouncer");
        let bouncer = Bouncer {
            port,
            dir,
            _process: process,
        };
        let up = (0..100).any(|_| {
            std::thread::sleep(Duration::from_millis(50));
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        assert!(up, "{version} did not start: {}", bouncer.log());
        bouncer
    }

    fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("pgbouncer.log")).unwrap_or_default()
    }

    /// Transactions PgBouncer has passed to the database (its admin console's `SHOW STATS`).
    fn transactions(&self, database: &str) -> i64 {
        let out = Command::new("psql")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args([
                "-U",
                "postgres",
                "-A",
                "-F",
                "|",
                "pgbouncer",
                "-c",
                "SHOW STATS",
            ])
            .output()
            .unwrap();
        let stats = String::from_utf8_lossy(&out.stdout).to_string();
        let mut lines = stats.lines();
        let header: Vec<&str> = lines.next().unwrap_or_default().split('|').collect();
        let column = header
            .iter()
            .position(|c| *c == "total_xact_count")
            .unwrap_or_else(|| panic!("SHOW STATS: {stats}"));
        lines
            .find_map(|line| {
                let cols: Vec<&str> = line.split('|').collect();
                (cols[0] == database).then(|| cols[column].parse().unwrap())
            })
            .unwrap_or_else(|| panic!("no stats for {database}: {stats}"))
    }
}

/// Starts `serve` through the pooler on a free port and waits until it answers.
async fn serve(pooled: &str, prefix: &str, extra: &[(&str, &str)]) -> (Proc, String) {
    let port = free_port().to_string();
    let mut env = vec![("DB_POOLER", "transaction"), ("APP_PORT", port.as_str())];
    env.extend_from_slice(extra);
    let process = spawn(
        arnela_command("serve", pooled, &common::redis_url(), prefix, &env),
        "serve",
    );
    let base = format!("http://127.0.0.1:{port}");
    common::until_live(&base).await;
    (process, base)
}

/// Enqueues `n` SMS tasks (one alone, the rest in a batch) and waits until every one has
/// succeeded; returns their ids.
async fn run_tasks(base: &str, pool: &PgPool, n: usize) -> Vec<String> {
    let http = reqwest::Client::new();
    let producer = common::token(arnela::api::auth::Role::Producer);
    let one = http
        .post(format!("{base}/tasks"))
        .bearer_auth(&producer)
        .json(&common::sms("alone"))
        .send()
        .await
        .unwrap();
    assert_eq!(one.status(), 201);
    let mut ids = vec![one.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned()];
    let batch: Vec<Value> = (1..n).map(|i| common::sms(&format!("#{i}"))).collect();
    let many = http
        .post(format!("{base}/tasks/batch"))
        .bearer_auth(&producer)
        .json(&json!({ "tasks": batch }))
        .send()
        .await
        .unwrap();
    assert_eq!(many.status(), 201);
    let body: Value = many.json().await.unwrap();
    ids.extend(
        body["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["id"].as_str().unwrap().to_owned()),
    );
    assert_eq!(ids.len(), n, "{body}");
    let uuids: Vec<uuid::Uuid> = ids.iter().map(|i| i.parse().unwrap()).collect();
    eventually(Duration::from_secs(60), "every task to succeed", || {
        let (pool, uuids) = (pool.clone(), uuids.clone());
        async move {
            let done: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM tasks WHERE id = ANY($1) AND status = 'succeeded'",
            )
            .bind(&uuids)
            .fetch_one(&pool)
            .await
            .unwrap();
            (done == uuids.len() as i64).then_some(())
        }
    })
    .await;
    ids
}

#[sqlx::test]
async fn the_service_runs_through_pgbouncer_in_transaction_mode(pool: PgPool) {
    let direct = database_url(&pool);
    let database = pool.connect_options().get_database().unwrap().to_owned();
    // the planner settings cannot come with a pooled connection: they are set on the database
    for (name, value) in arnela::store::SESSION_SETTINGS {
        sqlx::raw_sql(&format!(
            "ALTER DATABASE \"{database}\" SET {name} = '{value}'"
        ))
        .execute(&pool)
        .await
        .unwrap();
    }
    let bouncer = Bouncer::start(&database);
    let pooled = bouncer.url(&database);
    let options: sqlx::postgres::PgConnectOptions = pooled.parse().unwrap();
    let through = arnela::store::connect_by(options, 2, arnela::store::Route::TransactionPooler)
        .await
        .unwrap();
    assert_eq!(
        arnela::store::session_settings_missing(&through)
            .await
            .unwrap(),
        Vec::<String>::new(),
        "the database's settings reach pooled sessions"
    );
    through.close().await;

    // serve and a second worker process through the pooler, each with 8 connections over the
    // pooler's 3 server sessions; the relay listens on the direct connection
    let prefix = common::unique_prefix();
    let before = bouncer.transactions(&database);
    let (serve_process, base) = serve(&pooled, &prefix, &[("DATABASE_LISTEN_URL", &direct)]).await;
    let worker = spawn(
        arnela_command(
            "worker",
            &pooled,
            &common::redis_url(),
            &prefix,
            &[("DB_POOLER", "transaction")],
        ),
        "worker",
    );
    let ids = run_tasks(&base, &pool, 200).await;
    // (PgBouncer's statistics are updated every second)
    eventually(
        Duration::from_secs(10),
        "the engine's transactions counted by the pooler",
        || async { (bouncer.transactions(&database) - before > 600).then_some(()) },
    )
    .await;
    let listening: Vec<String> = sqlx::query_scalar(
        "SELECT query FROM pg_stat_activity
         WHERE datname = current_database() AND application_name = 'arnela-listen'",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(
        listening.iter().any(|q| q.starts_with("LISTEN")),
        "the relay listens on its direct connection: {listening:?}"
    );

    // the history and the global log read back through the pooler
    let http = reqwest::Client::new();
    let auditor = common::token(arnela::api::auth::Role::Auditor);
    let history: Value = http
        .get(format!("{base}/tasks/{}/events", ids[0]))
        .bearer_auth(&auditor)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let types: Vec<&str> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        [
            "enqueued",
            "dispatched",
            "attempt_started",
            "attempt_succeeded"
        ],
        "{history}"
    );
    let once: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT task_id FROM task_events
         WHERE event_type = 'attempt_succeeded' GROUP BY task_id HAVING count(*) = 1) t",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(once, 200, "each task ran once");
    let verify = Command::new(env!("CARGO_BIN_EXE_arnela"))
        .args(["audit", "verify"])
        .env("DATABASE_URL", &pooled)
        .env("DB_POOLER", "transaction")
        .env("APP_ENV", "test")
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );

    // without DATABASE_LISTEN_URL the relay polls, and nothing LISTENs through the pooler
    drop(serve_process);
    drop(worker);
    let (_serve, base) = serve(&pooled, &prefix, &[]).await;
    run_tasks(&base, &pool, 20).await;
    let listeners: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity
         WHERE datname = current_database() AND query LIKE 'LISTEN%'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(listeners, 0);
    assert!(
        !bouncer.log().contains("prepared statement"),
        "{}",
        bouncer.log()
    );
    common::delete_prefix(&prefix).await;
}

/// Behind a transaction pooler the service does not apply migrations itself (the migrator's
/// session lock would not hold), and `arnela migrate` goes straight to Postgres.
#[sqlx::test(migrations = false)]
async fn migrations_behind_a_transaction_pooler_go_straight_to_postgres(pool: PgPool) {
    let direct = database_url(&pool);
    let database = pool.connect_options().get_database().unwrap().to_owned();
    let bouncer = Bouncer::start(&database);
    let pooled = bouncer.url(&database);
    let prefix = common::unique_prefix();
    let cmd = arnela_command(
        "serve",
        &pooled,
        &common::redis_url(),
        &prefix,
        &[("DB_POOLER", "transaction")],
    );
    let (status, stderr) = common::process::run_to_exit(cmd, Duration::from_secs(60));
    assert!(!status.success());
    assert!(stderr.contains("run `arnela migrate` first"), "{stderr}");

    let migrate = |listen: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_arnela"));
        cmd.arg("migrate")
            .env("DATABASE_URL", &pooled)
            .env("DB_POOLER", "transaction")
            .env("APP_ENV", "test");
        if let Some(url) = listen {
            cmd.env("DATABASE_LISTEN_URL", url);
        }
        cmd.output().unwrap()
    };
    let refused = migrate(None);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("DATABASE_LISTEN_URL"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let done = migrate(Some(&direct));
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    assert!(arnela::store::pending_migrations(&pool)
        .await
        .unwrap()
        .is_empty());
    common::delete_prefix(&prefix).await;
}
