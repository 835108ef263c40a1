//! `/health`: 200 with the seed's shape when both dependencies answer, 503 when one does not,
//! and back to 200 when it returns.

use crate::common;

use arnela::api::ApiContext;
use arnela::queue::Keys;
use common::process::{arnela, connect_when_up, free_port, redis_server, PgServer};
use common::{client_for, context, database_url, eventually, get};
use sqlx::PgPool;
use std::time::Duration;

#[sqlx::test]
async fn health_is_200_with_the_known_shape_when_both_answer(pool: PgPool) {
    let c = client_for(context(pool).await);
    let (status, body) = get(&c, "/health").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "healthy");
    assert_eq!(body["database"], "connected");
    assert_eq!(body["redis"], "connected");
    for k in ["tasks_processed", "tasks_failed", "active_workers"] {
        assert!(body["workers"][k].is_i64(), "workers.{k} in {body}");
    }
    assert_eq!(get(&c, "/health/ready").await.0, 200);
    assert_eq!(get(&c, "/health/live").await.0, 200);
}

#[tokio::test]
async fn health_is_503_while_postgres_is_stopped_and_recovers() {
    let pg = PgServer::start(free_port());
    let pool = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(Duration::from_millis(500))
        .connect(&pg.url())
        .await
        .unwrap();
    arnela::store::migrate(&pool).await.unwrap();
    let c = client_for(context(pool).await);
    assert_eq!(get(&c, "/health").await.0, 200);

    pg.stop();
    let (status, body) = get(&c, "/health").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["status"], "unhealthy");
    assert_eq!(body["database"], "disconnected");
    assert_eq!(body["dependencies"]["database"]["status"], "disconnected");
    assert_eq!(body["redis"], "connected");
    assert_eq!(get(&c, "/health/ready").await.0, 503);
    assert_eq!(
        get(&c, "/health/live").await.0,
        200,
        "liveness does not depend on Postgres"
    );
    // The API itself answers 503 rather than 500 while the database is away.
    let (status, err) = get(&c, "/tasks").await;
    assert_eq!(
        (status, err["code"].as_str()),
        (503, Some("database_unavailable"))
    );

    pg.resume();
    eventually(Duration::from_secs(20), "health to recover", || {
        let c = &c;
        async move { (get(c, "/health").await.0 == 200).then_some(()) }
    })
    .await;
    assert_eq!(get(&c, "/health/ready").await.0, 200);
    assert_eq!(get(&c, "/tasks").await.0, 200);
}

/// The service's own pool hands out a connection used less than 500 ms ago without testing it:
/// a request that gets one whose session Postgres ended (terminated, or the server gone) is a
/// 503, never a 500, and the pool heals.
#[tokio::test]
async fn a_pooled_connection_that_postgres_dropped_gives_503_not_500() {
    let pg = PgServer::start(free_port());
    let options: sqlx::postgres::PgConnectOptions = pg.url().parse().unwrap();
    let pool = arnela::store::connect(options.application_name("arnela-pool"), 1)
        .await
        .unwrap();
    arnela::store::migrate(&pool).await.unwrap();
    let c = client_for(context(pool).await);
    assert_eq!(get(&c, "/tasks").await.0, 200);

    // the session ends with FATAL 57P01, which the next statement on it reads
    let admin = sqlx::postgres::PgPool::connect(&pg.url()).await.unwrap();
    let ended: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE application_name = 'arnela-pool') t",
    )
    .fetch_one(&admin)
    .await
    .unwrap();
    assert_eq!(ended, 1);
    let (status, err) = get(&c, "/tasks").await;
    assert_eq!(
        (status, err["code"].as_str()),
        (503, Some("database_unavailable")),
        "{err}"
    );
    assert_eq!(get(&c, "/tasks").await.0, 200, "a new session replaced it");
    admin.close().await;

    pg.stop();
    let (status, err) = get(&c, "/tasks").await;
    assert_eq!(
        (status, err["code"].as_str()),
        (503, Some("database_unavailable")),
        "{err}"
    );

    pg.resume();
    eventually(Duration::from_secs(20), "the API to answer again", || {
        let c = &c;
        async move {
            let (status, body) = get(c, "/tasks").await;
            assert_ne!(status, 500, "{body}");
            (status == 200).then_some(())
        }
    })
    .await;
}

#[sqlx::test]
async fn health_reports_depths_backlog_projectors_and_dependency_latency(pool: PgPool) {
    let ctx = context(pool.clone()).await;
    let c = client_for(ctx.clone());
    common::enqueue_tasks(&pool, arnela::domain::TaskType::SendSms, 3, 3).await;
    let projector =
        arnela::projector::Projector::new(pool.clone(), arnela::projector::Projection::Totals);
    // (other tests' open transactions may hold the log's horizon back for a moment)
    eventually(
        Duration::from_secs(30),
        "the projector to read the 3 events",
        || {
            let projector = &projector;
            async move { (projector.run_once().await.unwrap().events > 0).then_some(()) }
        },
    )
    .await;
    let (status, body) = get(&c, "/health").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["queues"]["tasks"], 0);
    assert_eq!(body["queues"]["processing"], 0);
    assert_eq!(body["queues"]["failed"], 0);
    assert_eq!(body["outbox"]["backlog"], 3, "{body}");
    assert!(body["outbox"]["oldest_due_age_seconds"].as_f64().unwrap() >= 0.0);
    assert_eq!(body["projectors"][1]["name"], "totals");
    assert_eq!(body["projectors"][1]["events"], 3);
    assert_eq!(body["projectors"][1]["lag_seconds"], 0.0);
    // the other has not run: it lags by the age of the oldest event
    assert_eq!(body["projectors"][0]["name"], "cache_invalidation");
    assert_eq!(body["projectors"][0]["events"], 0);
    assert!(body["projectors"][0]["lag_seconds"].as_f64().unwrap() > 0.0);
    for dep in ["database", "redis"] {
        assert_eq!(body["dependencies"][dep]["status"], "connected");
        assert!(body["dependencies"][dep]["latency_ms"].as_f64().unwrap() >= 0.0);
    }
    // the relay moves the backlog to Redis: the depth shows it
    let relay = arnela::relay::Relay::new(
        pool.clone(),
        ctx.redis.clone(),
        ctx.keys.clone(),
        Default::default(),
    );
    relay.run_once().await.unwrap();
    let (_, body) = get(&c, "/health").await;
    assert_eq!(body["queues"]["tasks"], 3);
    assert_eq!(body["outbox"]["backlog"], 0);

    let (status, ready) = get(&c, "/health/ready").await;
    assert_eq!(status, 200);
    assert_eq!(
        ready,
        serde_json::json!({"status": "healthy", "database": "connected", "redis": "connected"}),
        "readiness says only what an orchestrator needs"
    );
}

/// Tasks that succeeded and that were dead-lettered, counted in the log.
async fn log_outcomes(pool: &PgPool) -> (i64, i64) {
    sqlx::query_as(
        "SELECT count(*) FILTER (WHERE event_type = 'attempt_succeeded'), \
                count(*) FILTER (WHERE event_type = 'dead_lettered') FROM task_events",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Waits until `total` tasks have ended (succeeded or dead).
async fn wait_finished(pool: &PgPool, total: i64) {
    eventually(Duration::from_secs(60), "every task to finish", || async {
        let n: i64 =
            sqlx::query_scalar("SELECT count(*) FROM tasks WHERE status IN ('succeeded', 'dead')")
                .fetch_one(pool)
                .await
                .unwrap();
        (n == total).then_some(())
    })
    .await;
}

async fn health_of(http: &reqwest::Client, port: u16) -> Option<serde_json::Value> {
    let resp = http
        .get(format!("http://127.0.0.1:{port}/health"))
        .header(
            "authorization",
            common::bearer(arnela::api::auth::Role::Auditor),
        )
        .send()
        .await
        .ok()?;
    resp.json().await.ok()
}

#[sqlx::test]
async fn health_counters_are_cluster_totals_across_worker_processes_and_restarts(pool: PgPool) {
    let db = database_url(&pool);
    let prefix = common::unique_prefix();
    let redis = common::redis_url();
    // SMS go to a Twilio that refuses connections: with one attempt, each is dead-lettered
    let failing_sms = [
        ("TWILIO_BASE_URL", "http://127.0.0.1:1"),
        ("TWILIO_ACCOUNT_SID", "AC0123"),
        ("TWILIO_AUTH_TOKEN", "token"),
        ("TWILIO_SMS_FROM", "+34910000000"),
        ("TWILIO_TIMEOUT_MS", "500"),
    ];
    let api_port = free_port();
    let api_port_s = api_port.to_string();
    let mut api_proc = arnela("api", &db, &redis, &prefix, &[("APP_PORT", &api_port_s)]);
    let _relay = arnela("relay", &db, &redis, &prefix, &[]);
    let _w1 = arnela("worker", &db, &redis, &prefix, &failing_sms);
    let mut w2 = arnela("worker", &db, &redis, &prefix, &failing_sms);

    let emails = common::enqueue_tasks(&pool, arnela::domain::TaskType::SendEmail, 30, 3).await;
    let sms = common::enqueue_tasks(&pool, arnela::domain::TaskType::SendSms, 10, 1).await;
    let total = (emails.len() + sms.len()) as i64;
    wait_finished(&pool, total).await;
    assert_eq!(log_outcomes(&pool).await, (30, 10));

    let http = reqwest::Client::new();
    let counters = |body: &serde_json::Value| {
        (
            body["workers"]["tasks_processed"].as_i64(),
            body["workers"]["tasks_failed"].as_i64(),
        )
    };
    let body = eventually(
        Duration::from_secs(30),
        "health to count every outcome",
        || {
            let http = &http;
            async move {
                let body = health_of(http, api_port).await?;
                (counters(&body) == (Some(30), Some(10))).then_some(body)
            }
        },
    )
    .await;
    assert_eq!(body["workers"]["active_workers"], 10, "{body}");
    assert_eq!(body["workers"]["processes"].as_array().unwrap().len(), 2);

    // restart the API and kill a worker: the totals come from the log, not from memory
    assert!(api_proc.terminate().success());
    w2.kill9();
    let api_port = free_port();
    let api_port_s = api_port.to_string();
    let _api_again = arnela("api", &db, &redis, &prefix, &[("APP_PORT", &api_port_s)]);
    let _w3 = arnela("worker", &db, &redis, &prefix, &failing_sms);
    common::enqueue_tasks(&pool, arnela::domain::TaskType::SendEmail, 5, 3).await;
    wait_finished(&pool, total + 5).await;
    let expected = log_outcomes(&pool).await;
    assert_eq!(expected, (35, 10));
    eventually(
        Duration::from_secs(30),
        "health to match the log after restarts",
        || {
            let http = &http;
            async move {
                let body = health_of(http, api_port).await?;
                (counters(&body) == (Some(35), Some(10))).then_some(())
            }
        },
    )
    .await;
}

#[sqlx::test]
async fn health_is_503_while_redis_is_down_and_recovers(pool: PgPool) {
    let port = free_port();
    let mut own = redis_server(port);
    let redis = connect_when_up(port).await;
    let keys = Keys::new(common::unique_prefix());
    let waker = arnela::store::outbox::OutboxWaker::spawn(pool.clone(), Duration::from_millis(2));
    let ctx = ApiContext {
        publisher: arnela::relay::Publisher::new(
            pool.clone(),
            redis.clone(),
            keys.clone(),
            waker.clone(),
            Default::default(),
        ),
        pool: pool.clone(),
        reads: arnela::store::replica::Reads::primary(pool.clone()),
        redis: redis.clone(),
        keys,
        health_timeout: Duration::from_millis(500),
        limits: arnela::api::limits::HttpLimits::new(
            1024,
            256,
            1024,
            std::time::Duration::from_secs(30),
        ),
        schedule_horizon: chrono::Duration::days(366),
        channels: Default::default(),
        waker,
        cache: arnela::cache::Cache::new(redis.clone(), "health-test"),
        auth: common::auth(),
        metrics: Default::default(),
        data_key: None,
    };
    let c = client_for(ctx);
    assert_eq!(get(&c, "/health").await.0, 200);

    own.kill9();
    let (status, body) = get(&c, "/health").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(
        (body["database"].as_str(), body["redis"].as_str()),
        (Some("connected"), Some("disconnected"))
    );

    let _again = redis_server(port);
    eventually(Duration::from_secs(20), "health to recover", || {
        let c = &c;
        async move { (get(c, "/health").await.0 == 200).then_some(()) }
    })
    .await;
}

#[sqlx::test]
async fn active_workers_come_from_live_heartbeats(pool: PgPool) {
    let ctx = context(pool.clone()).await;
    let keys = ctx.keys.clone();
    let c = client_for(ctx);
    let (_, body) = get(&c, "/health").await;
    assert_eq!(body["workers"]["active_workers"], 0);

    let info = redis::IntoConnectionInfo::into_connection_info(common::redis_url()).unwrap();
    let registry = arnela::worker::handler::Registry::new();
    let mut handles = Vec::new();
    let shutdown = tokio_util::sync::CancellationToken::new();
    for n in [3, 4] {
        let workers = arnela::worker::WorkerPool::build(
            n,
            pool.clone(),
            info.clone(),
            keys.clone(),
            registry.clone(),
            Default::default(),
        )
        .await
        .unwrap();
        handles.push(tokio::spawn(
            workers.run(shutdown.clone(), Duration::from_secs(1)),
        ));
    }
    eventually(
        Duration::from_secs(20),
        "two processes' workers to be counted",
        || {
            let c = &c;
            async move {
                let (_, body) = get(c, "/health").await;
                (body["workers"]["active_workers"] == 7).then_some(())
            }
        },
    )
    .await;
    shutdown.cancel();
    for h in handles {
        h.await.unwrap();
    }
    let (_, body) = get(&c, "/health").await;
    assert_eq!(
        body["workers"]["active_workers"], 0,
        "a clean stop withdraws the heartbeat"
    );
}

/// Reading the live processes prunes the expired heartbeats from both the set and the counts,
/// and keeps the current ones (one script: a heartbeat renewed meanwhile is never pruned).
#[tokio::test]
async fn expired_heartbeats_are_pruned_and_live_ones_kept() {
    let mut redis = common::redis().await;
    let keys = Keys::new(common::unique_prefix());
    let (gone, live) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    arnela::queue::worker_heartbeat(&mut redis, &keys, gone, 3, Duration::ZERO)
        .await
        .unwrap();
    arnela::queue::worker_heartbeat(&mut redis, &keys, live, 4, Duration::from_secs(60))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;

    let processes = arnela::queue::live_processes(&mut redis, &keys)
        .await
        .unwrap();
    assert_eq!(processes, [(live.to_string(), 4)]);
    let (score, count): (Option<f64>, Option<i64>) = redis::pipe()
        .zscore(keys.workers(), gone.to_string())
        .hget(keys.worker_counts(), gone.to_string())
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(
        (score, count),
        (None, None),
        "the expired one is gone from both"
    );
    assert_eq!(
        arnela::queue::live_workers(&mut redis, &keys)
            .await
            .unwrap(),
        4
    );
}

#[sqlx::test]
async fn health_names_the_channel_of_each_task_type(pool: PgPool) {
    // no provider credentials: every type is on the log channel, and /health says so
    let vars = [("JWT_SECRET".to_owned(), common::JWT_SECRET.to_owned())].into();
    let settings = arnela::config::Settings::from_vars(&vars).unwrap();
    let app = arnela::app::App::from_parts(settings, pool, common::redis().await);
    let c = client_for(app.api_context().unwrap());
    let (_, body) = get(&c, "/health").await;
    for t in ["send_email", "send_sms", "send_whatsapp", "sync_calendar"] {
        assert_eq!(body["channels"][t], "log", "{body}");
    }
}

/// `REDIS_USERNAME` logs in as a Redis ACL user (with `REDIS_PASSWORD`, which may come from
/// `REDIS_PASSWORD_FILE`).
#[tokio::test]
async fn an_acl_user_logs_in_with_redis_username() {
    let user = format!("arnela-test-{}", uuid::Uuid::new_v4().simple());
    let password = "an-acl-password-for-this-test";
    let mut admin = common::redis().await;
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg(&user)
        .arg("on")
        .arg(format!(">{password}"))
        .arg("~*")
        .arg("&*")
        .arg("+@all")
        .query_async(&mut admin)
        .await
        .unwrap();
    let file = std::env::temp_dir().join(format!("{user}.secret"));
    std::fs::write(&file, format!("{password}\n")).unwrap();
    let vars: std::collections::HashMap<String, String> = [
        ("REDIS_HOST", "127.0.0.1".to_owned()),
        ("REDIS_USERNAME", user.clone()),
        ("REDIS_PASSWORD_FILE", file.display().to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let settings =
        arnela::config::Settings::from_vars(&arnela::config::with_files(vars).unwrap()).unwrap();
    let mut conn = arnela::queue::connect(settings.redis.connection_info().unwrap())
        .await
        .unwrap();
    let who: String = redis::cmd("ACL")
        .arg("WHOAMI")
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: () = redis::cmd("ACL")
        .arg("DELUSER")
        .arg(&user)
        .query_async(&mut admin)
        .await
        .unwrap();
    std::fs::remove_file(&file).unwrap();
    assert_eq!(who, user);
}

/// A certificate authority and a server certificate for 127.0.0.1 signed by it, made with
/// openssl in `dir`; returns (ca, cert, key).
fn certificates(dir: &std::path::Path) -> [std::path::PathBuf; 3] {
    let run = |args: &[&str]| {
        let ok = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .expect("openssl is installed")
            .success();
        assert!(ok, "openssl {args:?}");
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=arnela-test-ca",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    std::fs::write(
        dir.join("ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "2",
        "-extfile",
        "ext",
    ]);
    [
        dir.join("ca.crt"),
        dir.join("server.crt"),
        dir.join("server.key"),
    ]
}

/// `DB_SSLMODE=verify-full` with `DB_SSLROOTCERT`: the service connects over TLS to a server
/// whose certificate its CA signed, and refuses one signed by another.
#[tokio::test]
async fn postgres_over_tls_is_verified_with_db_sslrootcert() {
    let dir = tempfile::tempdir().unwrap();
    let [ca, cert, key] = certificates(dir.path());
    let other = tempfile::tempdir().unwrap();
    let [other_ca, _, _] = certificates(other.path());
    let port = free_port();
    let pg = PgServer::start(port);
    pg.enable_tls(&cert, &key);
    let settings = |root: &std::path::Path| {
        let vars: std::collections::HashMap<String, String> = [
            ("DB_HOST", "127.0.0.1".to_owned()),
            ("DB_PORT", port.to_string()),
            ("DB_USER", "postgres".to_owned()),
            ("DB_NAME", "postgres".to_owned()),
            ("DB_SSLMODE", "verify-full".to_owned()),
            ("DB_SSLROOTCERT", root.display().to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        arnela::config::Settings::from_vars(&vars).unwrap()
    };
    let good = settings(&ca);
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect_with(good.database.connect_options().unwrap())
        .await
        .expect("a verified TLS connection");
    let ssl: bool = sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(ssl, "the connection uses TLS");
    pool.close().await;
    let bad = settings(&other_ca);
    let refused = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(bad.database.connect_options().unwrap())
        .await;
    assert!(refused.is_err(), "a certificate of another CA is refused");
}

/// Redis over TLS (`REDIS_TLS=true` with `REDIS_CA_CERT`, or a `rediss://` URL): the service
/// connects to a server whose certificate its CA signed, and refuses one signed by another.
#[tokio::test]
async fn redis_over_tls_is_verified_with_redis_ca_cert() {
    let dir = tempfile::tempdir().unwrap();
    let [ca, cert, key] = certificates(dir.path());
    let other = tempfile::tempdir().unwrap();
    let [other_ca, _, _] = certificates(other.path());
    let port = free_port();
    let mut server = std::process::Command::new("redis-server")
        .args([
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--tls-cert-file",
            cert.to_str().unwrap(),
            "--tls-key-file",
            key.to_str().unwrap(),
            "--tls-ca-cert-file",
            ca.to_str().unwrap(),
            "--tls-auth-clients",
            "no",
            "--requirepass",
            "a-tls-test-password",
            "--save",
            "",
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("redis-server is installed");
    let settings = |root: &std::path::Path| {
        let vars: std::collections::HashMap<String, String> = [
            ("REDIS_HOST", "127.0.0.1".to_owned()),
            ("REDIS_PORT", port.to_string()),
            ("REDIS_TLS", "true".to_owned()),
            ("REDIS_CA_CERT", root.display().to_string()),
            ("REDIS_PASSWORD", "a-tls-test-password".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        arnela::config::Settings::from_vars(&vars).unwrap()
    };
    let good = settings(&ca).redis.target().unwrap();
    let mut conn = eventually(Duration::from_secs(10), "a TLS connection", || {
        let good = good.clone();
        async move { arnela::queue::connect(good).await.ok() }
    })
    .await;
    let pong: String = redis::cmd("PING").query_async(&mut conn).await.unwrap();
    assert_eq!(pong, "PONG");
    let refused = arnela::queue::connect(settings(&other_ca).redis.target().unwrap()).await;
    server.kill().unwrap();
    server.wait().unwrap();
    assert!(refused.is_err(), "a certificate of another CA is refused");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_healthcheck_command_passes_on_a_2xx_answer_only() {
    use wiremock::matchers::path;
    use wiremock::{Mock, MockServer, ResponseTemplate};
    let server = MockServer::start().await;
    Mock::given(path("/health/live"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&server)
        .await;
    Mock::given(path("/down"))
        .respond_with(ResponseTemplate::new(503))
        .mount(&server)
        .await;
    let check = |url: String| {
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_arnela"))
                .args(["healthcheck", "--url", &url])
                .env("RUST_LOG", "warn")
                .output()
                .unwrap()
        })
    };
    let ok = check(format!("{}/health/live", server.uri()))
        .await
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let down = check(format!("{}/down", server.uri())).await.unwrap();
    assert!(!down.status.success());
    assert!(String::from_utf8_lossy(&down.stderr).contains("answered 503"));
    // nothing listening
    let closed = check(format!("http://127.0.0.1:{}/health/live", free_port()))
        .await
        .unwrap();
    assert!(!closed.status.success());
    assert!(String::from_utf8_lossy(&closed.stderr).contains("cannot reach"));
}
