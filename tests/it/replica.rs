//! The audit reads from a read replica (`DATABASE_READ_URL`): a private primary and a streaming
//! standby made with `pg_basebackup`, started and stopped by the test.

use crate::common;
use arnela::store::replica::{self, Reads};
use arnela::store::{tasks, Tx};
use chrono::Utc;
use common::process::{free_port, PgServer};
use common::{client_for, eventually, new_sms, post, sms};
use poem::test::TestClient;
use poem::Endpoint;
use serde_json::Value;
use sqlx::PgPool;
use std::time::Duration;

/// A GET's status, body and the two read headers (source, lag in ms).
async fn read<E: Endpoint>(c: &TestClient<E>, path: &str) -> (u16, Value, String, u64) {
    let resp = c.get(path).send().await;
    let status = resp.0.status().as_u16();
    let header = |name: &str| {
        resp.0
            .headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_else(|| panic!("{path}: no {name} header"))
    };
    let source = header("arnela-read-source");
    let lag: u64 = header("arnela-read-lag-ms").parse().unwrap();
    let bytes = resp.0.into_body().into_vec().await.unwrap();
    (status, serde_json::from_slice(&bytes).unwrap(), source, lag)
}

async fn pool(url: &str) -> PgPool {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .acquire_timeout(Duration::from_secs(2))
        .connect(url)
        .await
        .unwrap()
}

/// Waits until the standby has replayed task `id`'s enqueue.
async fn replayed(standby: &PgPool, id: &str) {
    let id: uuid::Uuid = id.parse().unwrap();
    eventually(
        Duration::from_secs(30),
        "the standby replays it",
        || async move {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks WHERE id = $1")
                .bind(id)
                .fetch_one(standby)
                .await
                .unwrap();
            (n == 1).then_some(())
        },
    )
    .await
}

/// Task ids of a page of `/events`.
fn task_ids(page: &Value) -> Vec<String> {
    page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["task_id"].as_str().unwrap().to_owned())
        .collect()
}

/// The audit reads go to the standby and say so; the commit-safe horizon holds there (a
/// transaction left open on the primary holds the log back on the standby too); a standby
/// that is behind, stopped or missing a task the primary has is read around, on the primary;
/// writes keep going to the primary.
#[tokio::test]
async fn audit_reads_go_to_the_standby_within_its_lag_and_to_the_primary_otherwise() {
    let primary = PgServer::start(free_port());
    let primary_pool = pool(&primary.url()).await;
    arnela::store::migrate(&primary_pool).await.unwrap();
    arnela::store::retention::ensure_partitions(&primary_pool, Utc::now())
        .await
        .unwrap();
    let standby = PgServer::standby_of(&primary, free_port());
    let standby_pool = pool(&standby.url()).await;
    assert_eq!(
        replica::check_same_database(&primary_pool, &standby_pool)
            .await
            .unwrap(),
        None,
        "a standby holds its primary's database"
    );

    let mut ctx = common::context(primary_pool.clone()).await;
    ctx.reads = Reads::with_replica(
        primary_pool.clone(),
        arnela::store::connect_lazy(
            standby_pool.connect_options().as_ref().clone(),
            4,
            Duration::from_secs(1),
        ),
        Duration::from_millis(1500),
        Duration::from_secs(1),
    );
    ctx.metrics
        .add_collector(std::sync::Arc::new(arnela::metrics::ReplicaCollector {
            reads: ctx.reads.clone(),
        }));
    let c = client_for(ctx);

    // the enqueue goes to the primary; once replayed, the history is read from the standby
    let (status, first) = post(&c, "/tasks", &sms("first")).await;
    assert_eq!(status, 201, "{first}");
    let first = first["id"].as_str().unwrap().to_owned();
    replayed(&standby_pool, &first).await;
    let (status, history, source, lag) = read(&c, &format!("/tasks/{first}/events")).await;
    assert_eq!((status, source.as_str()), (200, "replica"), "{history}");
    assert!(lag <= 1500, "{lag}");
    assert_eq!(history[0]["type"], "enqueued", "{history}");
    let (status, list, source, _) = read(&c, "/tasks").await;
    assert_eq!((status, source.as_str()), (200, "replica"), "{list}");
    assert_eq!(list["items"][0]["id"], first.as_str());
    let (status, stats, source, _) = read(&c, "/stats").await;
    assert_eq!((status, source.as_str()), (200, "replica"), "{stats}");
    let (status, page, source, _) = read(&c, "/events?after=0").await;
    assert_eq!((status, source.as_str()), (200, "replica"), "{page}");
    assert_eq!(task_ids(&page), vec![first.clone()]);
    let (_, health) = common::get(&c, "/health").await;
    assert_eq!(health["read_replica"]["status"], "serving", "{health}");
    let metrics = c.get("/metrics").send().await.0.into_body();
    let metrics = metrics.into_string().await.unwrap();
    for line in [
        "arnela_read_replica_serving 1.0",
        "arnela_audit_reads_total{source=\"replica\"} 4.0",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line}:\n{metrics}");
    }
    let after = page["next_after"].as_i64().unwrap();

    // A transaction stays open on the primary with an event; a later one commits and the
    // standby replays it: the standby's log shows neither yet.
    let mut slow = Tx::begin(&primary_pool).await.unwrap();
    let late = tasks::enqueue(&mut slow, vec![new_sms("commits last")], Utc::now(), None)
        .await
        .unwrap();
    let late = late[0].task().id.to_string();
    let (status, early) = post(&c, "/tasks", &sms("commits first")).await;
    assert_eq!(status, 201, "{early}");
    let early = early["id"].as_str().unwrap().to_owned();
    replayed(&standby_pool, &early).await;
    let (status, page, source, _) = read(&c, &format!("/events?after={after}")).await;
    assert_eq!((status, source.as_str()), (200, "replica"), "{page}");
    assert!(
        task_ids(&page).is_empty(),
        "the open transaction holds the log back on the standby: {page}"
    );
    slow.commit().await.unwrap();
    let page = eventually(Duration::from_secs(30), "both events", || {
        let c = &c;
        async move {
            let (_, page, source, _) = read(c, &format!("/events?after={after}")).await;
            (source == "replica" && task_ids(&page).len() == 2).then_some(page)
        }
    })
    .await;
    assert_eq!(task_ids(&page), vec![late, early], "in position order");

    // Replay paused on the standby: once it is further behind than the limit, the reads go to
    // the primary, which has the newer task.
    sqlx::query("SELECT pg_wal_replay_pause()")
        .execute(&standby_pool)
        .await
        .unwrap();
    let (_, newer) = post(&c, "/tasks", &sms("while the standby is paused")).await;
    let newer = newer["id"].as_str().unwrap().to_owned();
    let (_, list, source, lag) =
        eventually(Duration::from_secs(30), "reads from the primary", || {
            let c = &c;
            async move {
                let r = read(c, "/tasks?limit=10").await;
                (r.2 == "primary").then_some(r)
            }
        })
        .await;
    assert_eq!((source.as_str(), lag), ("primary", 0));
    assert!(list.to_string().contains(&newer), "{list}");
    let (_, health) = common::get(&c, "/health").await;
    assert_eq!(health["read_replica"]["status"], "behind", "{health}");
    assert!(health["read_replica"]["lag_ms"].as_u64().unwrap() > 1500);
    let (status, history, source, _) = read(&c, &format!("/tasks/{newer}/events")).await;
    assert_eq!((status, source.as_str()), (200, "primary"), "{history}");
    // with a limit the paused standby is within, the list comes from the standby (without the
    // newer task, and saying how far behind it is), and the history the standby does not have
    // yet from the primary
    let mut patient = common::context(primary_pool.clone()).await;
    patient.reads = Reads::with_replica(
        primary_pool.clone(),
        standby_pool.clone(),
        Duration::from_secs(3600),
        Duration::from_secs(1),
    );
    let patient = client_for(patient);
    let (status, list, source, lag) = read(&patient, "/tasks?limit=10").await;
    assert_eq!((status, source.as_str()), (200, "replica"), "{list}");
    assert!(!list.to_string().contains(&newer), "{list}");
    assert!(lag > 1500, "{lag}");
    let (status, history, source, _) = read(&patient, &format!("/tasks/{newer}/events")).await;
    assert_eq!((status, source.as_str()), (200, "primary"), "{history}");
    sqlx::query("SELECT pg_wal_replay_resume()")
        .execute(&standby_pool)
        .await
        .unwrap();
    replayed(&standby_pool, &newer).await;
    eventually(Duration::from_secs(30), "the standby serves again", || {
        let c = &c;
        async move { (read(c, "/tasks").await.2 == "replica").then_some(()) }
    })
    .await;

    // The standby stopped: reads answer from the primary; writes never needed it.
    standby_pool.close().await;
    standby.stop();
    let (status, page, source, lag) = read(&c, "/events?after=0").await;
    assert_eq!(
        (status, source.as_str(), lag),
        (200, "primary", 0),
        "{page}"
    );
    assert_eq!(task_ids(&page).len(), 4);
    let (status, body) = post(&c, "/tasks", &sms("the standby is down")).await;
    assert_eq!(status, 201, "{body}");
    let (status, _, source, _) = read(&c, "/stats").await;
    assert_eq!((status, source.as_str()), (200, "primary"));
    let (status, health) = common::get(&c, "/health").await;
    assert_eq!(
        status, 200,
        "a stopped standby leaves the service healthy: {health}"
    );
    assert_eq!(health["read_replica"]["status"], "unreachable", "{health}");
}

/// `DATABASE_READ_URL` naming another database than the primary's (not a standby of it) stops
/// start-up with both named.
#[sqlx::test]
async fn a_read_url_of_another_database_is_refused(pool: PgPool) {
    let other = PgServer::start(free_port());
    let other_pool = self::pool(&other.url()).await;
    let mismatch = replica::check_same_database(&pool, &other_pool)
        .await
        .unwrap()
        .expect("another server's database is refused");
    assert!(
        mismatch.contains("a read replica must be a standby of the primary"),
        "{mismatch}"
    );
    // one that was down at start is checked when it first answers, and never read
    let reads = Reads::with_replica(
        pool.clone(),
        other_pool,
        Duration::from_secs(5),
        Duration::from_secs(1),
    );
    let (_, source) = reads
        .read(|pool| async move { arnela::store::events::global_log(&pool, 0, 10).await })
        .await
        .unwrap();
    assert_eq!(source, replica::Source::Primary);
    let (state, _) = reads.replica_state().await.unwrap();
    assert_eq!(state, replica::State::OtherDatabase);
}
