//! Postgres unreachable for longer than a lease while handlers finish, with real processes:
//! `arnela relay` and two `arnela worker`s (the second one's rescuer could take the first one's
//! attempts over) on a Postgres cluster and a Redis server of the test's own, sending SMS to a
//! fake Twilio that answers after a few seconds. Postgres is stopped (immediate mode) while
//! attempts are in flight and started again after more than a lease (the default 30 s, or 5 s
//! with the rescuers' grace for live owners shortened to 10 s and an outage past both). Afterwards
//! every task has succeeded exactly once, Twilio got exactly one message per task, and no
//! attempt was recorded as `lease_expired`: the outcomes were kept and recorded when Postgres
//! came back, and no attempt whose outcome was known ran again.

use crate::common;

use arnela::domain::TaskType;
use chrono::{DateTime, Utc};
use common::process::{command, free_port, redis_server, spawn, PgServer, Proc};
use reqwest::Url;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};
use uuid::Uuid;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, Request, ResponseTemplate};

/// How long Twilio takes to answer each message (so attempts are in flight when Postgres stops).
const SMS_DELAY: Duration = Duration::from_secs(3);
/// Handler slots of the first worker process and of the second (the default).
const WORKERS: usize = 20;
const SECOND_WORKERS: usize = 5;
/// The default lease (`WORKER_LEASE_SECS`, 30 s), which the processes keep.
const DEFAULT_LEASE: Duration = Duration::from_secs(30);
/// How long after Postgres is back every task must have succeeded: the orphan grace (30 s, for
/// deliveries a fetcher took but could not claim while Postgres was down) + a rescuer interval +
/// a relay poll + the handlers still to run, with margin.
const RECOVERY: Duration = Duration::from_secs(75);

/// One run: how many SMS tasks, how long Postgres stays down, and whether every attempt claimed
/// when it stopped can finish its handler before it is back.
struct Scenario {
    tasks: usize,
    outage: Duration,
    finish_in_outage: bool,
    /// The lease of every process (`WORKER_LEASE_SECS`) and, if not the default, the rescuers'
    /// grace for live owners (`LIVE_OWNER_GRACE_SECS`).
    lease: Duration,
    live_owner_grace: Option<Duration>,
}

const TWILIO_MESSAGES: &str = "/2010-04-01/Accounts/AC0123/Messages.json";

/// The processes of the run; each writes its log to a file of `dir`.
struct Cluster {
    dir: PathBuf,
    db: String,
    redis: String,
    prefix: String,
    twilio: String,
    /// Settings of every process beside the defaults.
    settings: Vec<(&'static str, String)>,
}

impl Cluster {
    /// Starts `arnela <role>` with the default engine settings (rescuer, orphan grace) and the
    /// scenario's, SMS going to the fake Twilio.
    fn start(&self, role: &str, name: &str, workers: usize) -> Proc {
        let log = std::fs::File::create(self.dir.join(format!("{name}.log"))).unwrap();
        let mut cmd = command(role, &self.db, &self.redis, &self.prefix);
        cmd.envs(self.settings.iter().map(|(k, v)| (k, v)))
            .env("RUST_LOG", "info")
            .env("WORKERS", workers.to_string())
            .env("TWILIO_BASE_URL", &self.twilio)
            .env("TWILIO_ACCOUNT_SID", "AC0123")
            .env("TWILIO_AUTH_TOKEN", "twilio-auth-token")
            .env("TWILIO_SMS_FROM", "+34910000000")
            .env("TWILIO_RATE_LIMIT_PER_SEC", "0")
            .stderr(Stdio::from(log));
        spawn(cmd, name)
    }

    /// The last lines of every process's log, for a failure message.
    fn logs(&self) -> String {
        let mut files: Vec<_> = std::fs::read_dir(&self.dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        let mut out = format!("\nlogs in {}", self.dir.display());
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(20)..];
            out.push_str(&format!(
                "\n--- {} ({} lines, last {}):\n{}",
                name_of(&f),
                lines.len(),
                tail.len(),
                tail.join("\n")
            ));
        }
        out
    }
}

fn name_of(f: &Path) -> String {
    f.file_name().unwrap().to_string_lossy().into_owned()
}

/// The `Body` of a message sent to the fake Twilio (the task's unique `message`).
fn body_of(req: &Request) -> String {
    let form = String::from_utf8(req.body.clone()).unwrap();
    Url::parse(&format!("http://form/?{form}"))
        .unwrap()
        .query_pairs()
        .find(|(k, _)| k == "Body")
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

/// Messages Twilio received, per body.
async fn sent_per_body(twilio: &MockServer) -> HashMap<String, usize> {
    let mut sent = HashMap::new();
    for req in twilio.received_requests().await.unwrap() {
        if req.url.path() == TWILIO_MESSAGES {
            *sent.entry(body_of(&req)).or_insert(0) += 1;
        }
    }
    sent
}

/// Worker processes whose heartbeat is in Redis.
async fn live_worker_processes(redis: &mut redis::aio::ConnectionManager, prefix: &str) -> usize {
    redis::cmd("ZCARD")
        .arg(format!("{prefix}:workers"))
        .query_async(redis)
        .await
        .unwrap_or(0)
}

/// The attempts running now: task, attempt, owner.
async fn running(pool: &sqlx::PgPool) -> Vec<(Uuid, i32, Uuid)> {
    sqlx::query_as(
        "SELECT id, attempts, lease_owner FROM tasks \
         WHERE status = 'running' AND lease_owner IS NOT NULL",
    )
    .fetch_all(pool)
    .await
    .unwrap_or_default()
}

/// One task's attempts in the log.
#[derive(sqlx::FromRow)]
struct Tally {
    task_id: arnela::domain::TaskId,
    started: i64,
    succeeded: i64,
    lease_expired: i64,
    other_failures: i64,
    succeeded_at: Option<DateTime<Utc>>,
}

impl Tally {
    /// One attempt, which succeeded.
    fn once(&self) -> bool {
        (
            self.started,
            self.succeeded,
            self.lease_expired,
            self.other_failures,
        ) == (1, 1, 0, 0)
    }
}

async fn tally(pool: &sqlx::PgPool) -> HashMap<arnela::domain::TaskId, Tally> {
    let rows: Vec<Tally> = sqlx::query_as(
        "SELECT task_id, \
                count(*) FILTER (WHERE event_type = 'attempt_started') AS started, \
                count(*) FILTER (WHERE event_type = 'attempt_succeeded') AS succeeded, \
                count(*) FILTER (WHERE event_type = 'attempt_failed' \
                                   AND data->>'kind' = 'lease_expired') AS lease_expired, \
                count(*) FILTER (WHERE event_type = 'attempt_failed' \
                                   AND data->>'kind' <> 'lease_expired') AS other_failures, \
                min(recorded_at) FILTER (WHERE event_type = 'attempt_succeeded') AS succeeded_at \
         FROM task_events GROUP BY task_id",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    rows.into_iter().map(|t| (t.task_id, t)).collect()
}

/// More attempts claimed than slots (the first claims of a process are sized for quick
/// handlers), Postgres down for longer than the lease: the handlers of every claimed attempt run
/// and finish during the outage, their leases expire in the database, and the other process's
/// rescuer leaves them alone because their owner's heartbeat is current.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outcomes_finished_while_postgres_is_down_past_the_lease_are_recorded_once_and_never_rerun()
{
    run(Scenario {
        tasks: 60,
        outage: Duration::from_secs(40),
        finish_in_outage: true,
        lease: DEFAULT_LEASE,
        live_owner_grace: None,
    })
    .await;
}

/// As above, with Postgres down for longer than the lease and the rescuers' grace for live
/// owners together (5 s and 10 s here, 30 s and 120 s by default): when it is back, every
/// lease that ran out during the outage is older than the grace, and the owners still get the
/// whole grace, counted from the rescuers' reconnection, to record what they kept; no rescuer
/// takes their attempts over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outcomes_kept_through_an_outage_longer_than_the_live_owner_grace_are_recorded_once() {
    run(Scenario {
        tasks: 60,
        outage: Duration::from_secs(25),
        finish_in_outage: true,
        lease: Duration::from_secs(5),
        live_owner_grace: Some(Duration::from_secs(10)),
    })
    .await;
}

/// More tasks than the processes' slots, Postgres down for 10 s (shorter than the lease): some
/// handlers finish during the outage, some after it. Tasks not claimed before the stop wait in
/// Redis or, if a fetcher took them and could not claim them, are published again by the
/// rescuers after the orphan grace (30 s; which of the two happens depends on timing, the
/// summary says); either way each runs once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_outage_with_a_backlog_in_redis_loses_and_repeats_nothing() {
    run(Scenario {
        tasks: 100,
        outage: Duration::from_secs(10),
        finish_in_outage: false,
        lease: DEFAULT_LEASE,
        live_owner_grace: None,
    })
    .await;
}

async fn run(scenario: Scenario) {
    let Scenario {
        tasks,
        outage,
        finish_in_outage,
        lease,
        live_owner_grace,
    } = scenario;
    let mut settings = vec![("WORKER_LEASE_SECS", lease.as_secs().to_string())];
    if let Some(grace) = live_owner_grace {
        assert!(
            outage > lease + grace,
            "the outage outlasts the lease and the grace"
        );
        settings.push(("LIVE_OWNER_GRACE_SECS", grace.as_secs().to_string()));
    }
    let test_started = Instant::now();
    let pg = Arc::new(PgServer::start(free_port()));
    let redis_port = free_port();
    let _redis_server = redis_server(redis_port);
    let redis_url = format!("redis://127.0.0.1:{redis_port}");
    let redis_client = redis::Client::open(redis_url.clone()).unwrap();
    let mut redis = common::eventually(Duration::from_secs(10), "own redis", || {
        let c = redis_client.clone();
        async move { redis::aio::ConnectionManager::new(c).await.ok() }
    })
    .await;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(5))
        .connect(&pg.url())
        .await
        .unwrap();
    arnela::store::migrate(&pool).await.unwrap();

    let twilio = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(TWILIO_MESSAGES))
        .respond_with(
            ResponseTemplate::new(201)
                .set_body_json(serde_json::json!({"sid": "SM0123", "status": "queued"}))
                .set_delay(SMS_DELAY),
        )
        .mount(&twilio)
        .await;

    let dir = std::env::temp_dir().join(format!("arnela-outage-{}", Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let cluster = Cluster {
        dir,
        db: pg.url(),
        redis: redis_url,
        prefix: common::unique_prefix(),
        twilio: twilio.uri(),
        settings,
    };
    let _relay = cluster.start("relay", "relay", 1);
    let mut first = cluster.start("worker", "worker-1", WORKERS);
    let mut second = cluster.start("worker", "worker-2", SECOND_WORKERS);
    let prefix = cluster.prefix.clone();
    let both_up = tokio::time::timeout(Duration::from_secs(30), async {
        while live_worker_processes(&mut redis, &prefix).await < 2 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        both_up.is_ok(),
        "both worker processes announced{}",
        cluster.logs()
    );

    let ids = common::enqueue_tasks(&pool, TaskType::SendSms, tasks, 3).await;
    // Stop Postgres once the first process's slots are busy: those handlers are waiting for
    // Twilio and finish while Postgres is down.
    let in_flight = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let now = running(&pool).await;
            let at_twilio = twilio.received_requests().await.unwrap().len();
            if now.len() >= WORKERS && at_twilio >= WORKERS {
                return now;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{WORKERS} handlers running{}", cluster.logs()));
    let owners: HashMap<Uuid, usize> = in_flight.iter().fold(HashMap::new(), |mut m, r| {
        *m.entry(r.2).or_insert(0) += 1;
        m
    });
    let stop_began = Utc::now();
    let server = pg.clone();
    tokio::task::spawn_blocking(move || server.stop())
        .await
        .unwrap();
    let stopped = Instant::now();
    let sent_before_stop = twilio.received_requests().await.unwrap().len();

    tokio::time::sleep_until((stopped + outage).into()).await;
    // Every handler in flight has finished (Twilio answered each) while Postgres was down.
    let sent_during_outage = twilio.received_requests().await.unwrap().len();
    let server = pg.clone();
    tokio::task::spawn_blocking(move || server.resume())
        .await
        .unwrap();
    let resumed = Instant::now();
    let resumed_at = Utc::now();
    let down_for = resumed - stopped;
    if outage > lease {
        assert!(
            down_for > lease,
            "the outage ({down_for:?}) outlasted a lease renewed just before it"
        );
    }
    for p in [&mut first, &mut second] {
        assert!(
            p.child.try_wait().unwrap().is_none(),
            "{} is still running{}",
            p.name,
            cluster.logs()
        );
    }

    let deadline = resumed + RECOVERY;
    loop {
        let left: Vec<Uuid> = sqlx::query_scalar(
            "SELECT id FROM tasks WHERE status <> 'succeeded' ORDER BY id LIMIT 10",
        )
        .fetch_all(&pool)
        .await
        .unwrap_or_else(|_| vec![Uuid::nil()]);
        if left.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            panic!(
                "tasks not succeeded {RECOVERY:?} after Postgres came back:{}{}",
                common::histories(&pool, &left).await,
                cluster.logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let recovered_in = resumed.elapsed();

    // Exactly one attempt and one success per task; no attempt expired.
    let tally = tally(&pool).await;
    let not_once: Vec<arnela::domain::TaskId> = ids
        .iter()
        .filter(|id| !tally.get(id).is_some_and(Tally::once))
        .copied()
        .collect();
    assert!(
        not_once.is_empty(),
        "{} tasks without exactly one attempt_started and one attempt_succeeded (and no failure):{}{}",
        not_once.len(),
        common::histories(&pool, &not_once).await,
        cluster.logs()
    );
    let lease_expired: i64 = tally.values().map(|t| t.lease_expired).sum();
    assert_eq!(lease_expired, 0, "no attempt was recorded as lease_expired");

    // The attempts in flight when Postgres stopped ran once; those that had not finished before
    // the stop (a handler may end between the snapshot and the stop) had their outcomes kept and
    // recorded after Postgres came back.
    let attempts: HashMap<Uuid, i32> =
        sqlx::query_as::<_, (Uuid, i32)>("SELECT id, attempts FROM tasks")
            .fetch_all(&pool)
            .await
            .unwrap()
            .into_iter()
            .collect();
    let mut kept = 0;
    for (id, attempt, _) in &in_flight {
        assert_eq!(attempts[id], *attempt, "task {id} ran one attempt");
        let at = tally[&arnela::domain::TaskId::from(*id)]
            .succeeded_at
            .unwrap();
        if at < stop_began {
            continue;
        }
        assert!(
            at >= resumed_at - chrono::Duration::seconds(1),
            "the success of {id} was recorded at {at}, after Postgres came back at {resumed_at}"
        );
        kept += 1;
    }
    assert!(
        kept >= WORKERS,
        "the outcomes of the {WORKERS} handlers at Twilio when Postgres stopped were kept \
         ({kept} of {} attempts in flight)",
        in_flight.len()
    );

    // Twilio got each message exactly once.
    let sent = sent_per_body(&twilio).await;
    let mut twice: Vec<(String, usize)> = sent
        .iter()
        .filter(|(_, n)| **n != 1)
        .map(|(b, n)| (b.clone(), *n))
        .collect();
    twice.sort();
    assert!(twice.is_empty(), "messages sent more than once: {twice:?}");
    let total_sent: usize = sent.values().sum();
    assert_eq!(
        total_sent,
        tasks,
        "one message per task ({} distinct)",
        sent.len()
    );
    // No new attempt can be claimed while Postgres is down (a claim is a transaction), and a
    // worker claims ahead of its free slots only for handlers it has measured as quick, so the
    // handlers that run through the outage are the ones in flight at the stop: their outcomes
    // being recorded after it (`kept` above) is what shows they ran on.
    if finish_in_outage {
        assert!(
            sent_during_outage >= in_flight.len(),
            "the {} attempts in flight finished while Postgres was down ({sent_during_outage} sent)",
            in_flight.len()
        );
    }

    let logs: Vec<(String, String)> = std::fs::read_dir(&cluster.dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            (name_of(&p), std::fs::read_to_string(&p).unwrap_or_default())
        })
        .collect();
    let count_in = |needle: &str| -> usize {
        logs.iter()
            .map(|(_, text)| text.matches(needle).count())
            .sum()
    };
    eprintln!(
        "outage: {tasks} SMS tasks, Postgres stopped (immediate) with {} attempts claimed \
         ({} per worker process; {kept} of their successes recorded after Postgres came back) for {:.1} s (lease {lease:?}); Twilio had {} \
         requests at the stop and {} when Postgres came back; all succeeded {:.1} s after; \
         duplicates: 0 (one attempt_started, one attempt_succeeded and one Twilio message per \
         task), lease_expired: 0; logs: {} 'keeping outcomes' warnings, {} 'lease renewal \
         failed', {} deliveries taken but never claimed re-published; test {:.0} s",
        in_flight.len(),
        owners
            .values()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join(" + "),
        down_for.as_secs_f64(),
        sent_before_stop,
        sent_during_outage,
        recovered_in.as_secs_f64(),
        count_in("keeping outcomes to record later"),
        count_in("lease renewal failed"),
        count_in("delivery taken but never claimed"),
        test_started.elapsed().as_secs_f64()
    );
    drop(first);
    drop(second);
    std::fs::remove_dir_all(&cluster.dir).ok();
}
