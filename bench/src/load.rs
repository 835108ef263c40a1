//! The load generator for a running Arnela. It measures, against the service at
//! `--url` and its database:
//!
//! - single `POST /tasks` at several concurrencies (closed loop): requests/s, p50, p99;
//! - `POST /tasks/batch` with 100 and 1000 tasks: tasks/s;
//! - end to end: N tasks from the first `enqueued` event to the last terminal event (read from
//!   the event log, so both ends use the database's clock);
//! - enqueue → attempt start latency at a fixed offered rate (open loop: a batch of the tasks due
//!   is sent every 10 ms whatever the responses do);
//! - optionally a sustained stream at 80% of the end-to-end rate (`--stream-seconds`) and the
//!   end-to-end run again after `--churn` more tasks went through the same tables;
//! - the peak RSS of the service process (`VmHWM`), when its pid is given.
//!
//! It sends an admin token signed with `JWT_SECRET` (the service's secret) with every request.
//! It prints a table and, with `--json`, writes the figures as JSON. Benchmarks are not tests:
//! nothing here asserts a time.

use anyhow::{bail, Context};
use serde::Serialize;
use serde_json::json;
use sqlx::PgPool;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What to run (the options of `arnela-bench`).
#[derive(Debug, Clone, clap::Args)]
pub struct BenchOptions {
    /// The service's base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// The service's database (the bench reads the event log for timings).
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: String,
    /// Seconds per single-enqueue level (and of the latency run, at least 5).
    #[arg(long, default_value_t = 5)]
    pub seconds: u64,
    /// Concurrent connections of the single-enqueue levels.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32,64")]
    pub concurrency: Vec<usize>,
    /// Tasks in the end-to-end run.
    #[arg(long, default_value_t = 10_000)]
    pub tasks: usize,
    /// Offered rate of the latency run (tasks/s); 0 = half of the end-to-end rate measured.
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// The service's process id, to report its peak RSS.
    #[arg(long)]
    pub service_pid: Option<u32>,
    /// Only measure `GET /tasks/{id}/events` on the history the database already holds.
    #[arg(long)]
    pub history_only: bool,
    /// Only measure `GET /tasks/{id}`: uncached (`Cache-Control: no-cache`), cached, and cached
    /// while the tasks read are running (see [`reads`]).
    #[arg(long)]
    pub reads_only: bool,
    /// Only the end-to-end run (and the stream, churn and latency runs when asked for).
    #[arg(long)]
    pub end_to_end_only: bool,
    /// Concurrent readers of the read runs.
    #[arg(long, default_value_t = 16)]
    pub readers: usize,
    /// Seconds of the sustained stream offered at 80% of the end-to-end rate (0: skip).
    #[arg(long, default_value_t = 0)]
    pub stream_seconds: u64,
    /// Tasks pushed through the same tables before the end-to-end run is repeated (0: skip).
    #[arg(long, default_value_t = 0)]
    pub churn: usize,
    /// End-to-end runs, fresh and after the churn; each figure is their median (one run of
    /// 10,000 tasks lasts about a second, and single runs differ by a tenth on this machine).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
}

/// Latency figures of one level.
#[derive(Debug, Clone, Serialize)]
pub struct Level {
    pub concurrency: usize,
    pub requests: usize,
    pub per_second: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub errors: usize,
}

/// Everything measured.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Report {
    pub single_enqueue: Vec<Level>,
    pub batch_100_tasks_per_second: f64,
    pub batch_1000_tasks_per_second: f64,
    pub end_to_end_tasks: usize,
    pub end_to_end_seconds: f64,
    /// The median of `end_to_end_runs`.
    pub end_to_end_tasks_per_second: f64,
    /// Each end-to-end run's rate, in the order run.
    pub end_to_end_runs: Vec<f64>,
    pub start_latency_offered_rate: f64,
    pub start_latency_p50_ms: f64,
    pub start_latency_p99_ms: f64,
    pub service_peak_rss_mb: Option<f64>,
    /// The sustained stream: offered rate, tasks acknowledged, the age of the oldest task not
    /// yet finished when the offering stopped, how long the rest took to finish, and the
    /// enqueue → start latency of its tasks.
    pub stream_offered_rate: f64,
    pub stream_seconds: f64,
    pub stream_tasks: usize,
    pub stream_oldest_open_age_s: f64,
    pub stream_drained_after_s: f64,
    pub stream_start_p50_ms: f64,
    pub stream_start_p99_ms: f64,
    /// The end-to-end run repeated after `churn_tasks` more tasks went through the tables.
    pub churn_tasks: usize,
    pub churn_seconds: f64,
    /// The median of `end_to_end_after_churn_runs`.
    pub end_to_end_after_churn_tasks_per_second: f64,
    pub end_to_end_after_churn_runs: Vec<f64>,
    pub history_events_in_table: i64,
    pub history_requests: usize,
    pub history_p50_ms: f64,
    pub history_p99_ms: f64,
    pub reads: Vec<ReadRun>,
}

/// One run of `GET /tasks/{id}` reads.
#[derive(Debug, Clone, Serialize)]
pub struct ReadRun {
    pub name: String,
    pub readers: usize,
    pub requests: usize,
    pub per_second: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub errors: usize,
    /// Cache hits / (hits + misses) of the `task` key family during the run, from the service's
    /// `/metrics` (absent for the uncached run).
    pub hit_rate: Option<f64>,
}

fn task_body(i: usize) -> serde_json::Value {
    json!({"type": "send_sms", "payload": {"phone": "+34123456789", "message": format!("bench {i}")}})
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Runs every measurement in turn, sending `token` (an admin's bearer token) with every request.
pub async fn run(opts: &BenchOptions, token: &str) -> anyhow::Result<Report> {
    let mut bearer = reqwest::header::HeaderValue::try_from(format!("Bearer {token}"))
        .context("the bearer token is not a valid header value")?;
    bearer.set_sensitive(true);
    let client = reqwest::Client::builder()
        .default_headers(reqwest::header::HeaderMap::from_iter([(
            reqwest::header::AUTHORIZATION,
            bearer,
        )]))
        .pool_max_idle_per_host(256)
        .timeout(Duration::from_secs(30))
        .build()?;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect(&opts.database_url)
        .await
        .context("cannot connect to the service's database")?;
    let health = client.get(format!("{}/health/live", opts.url)).send().await;
    if !health.map(|r| r.status().is_success()).unwrap_or(false) {
        bail!("the service at {} does not answer /health/live", opts.url);
    }
    let mut report = Report::default();
    if opts.reads_only {
        reads(&client, &pool, opts, &mut report).await?;
        report.service_peak_rss_mb = opts.service_pid.and_then(peak_rss_mb);
        return Ok(report);
    }
    if opts.history_only {
        history(&client, &pool, &opts.url, &mut report).await?;
        report.service_peak_rss_mb = opts.service_pid.and_then(peak_rss_mb);
        return Ok(report);
    }

    let levels: &[usize] = if opts.end_to_end_only {
        &[]
    } else {
        &opts.concurrency
    };
    for &c in levels {
        let level =
            single_enqueue(&client, &opts.url, c, Duration::from_secs(opts.seconds)).await?;
        eprintln!(
            "single enqueue, {c} connections: {:.0} req/s",
            level.per_second
        );
        report.single_enqueue.push(level);
    }
    if !opts.end_to_end_only {
        report.batch_100_tasks_per_second = batch_enqueue(&client, &opts.url, 100, 20).await?;
        report.batch_1000_tasks_per_second = batch_enqueue(&client, &opts.url, 1000, 10).await?;
    }
    eprintln!(
        "batch enqueue: {:.0} tasks/s (100), {:.0} tasks/s (1000)",
        report.batch_100_tasks_per_second, report.batch_1000_tasks_per_second
    );
    // let the queue drain before the end-to-end run
    wait_idle(&pool, Duration::from_secs(300)).await?;

    let (secs, rate, runs) = end_to_end_runs(&client, &pool, opts).await?;
    report.end_to_end_tasks = opts.tasks;
    report.end_to_end_seconds = secs;
    report.end_to_end_tasks_per_second = rate;
    eprintln!(
        "end to end: {} tasks in {secs:.2} s = {rate:.0} tasks/s (median of {runs:.0?})",
        opts.tasks
    );
    report.end_to_end_runs = runs;

    // Half of what the system sustains end to end, offered in small batches every 10 ms.
    let offered = if opts.rate > 0.0 {
        opts.rate
    } else {
        (rate / 2.0).max(1.0)
    };
    let (p50, p99) = start_latency(
        &client,
        &pool,
        &opts.url,
        offered,
        Duration::from_secs(opts.seconds.max(5)),
    )
    .await?;
    report.start_latency_offered_rate = offered;
    report.start_latency_p50_ms = p50;
    report.start_latency_p99_ms = p99;
    eprintln!("enqueue -> start at {offered:.0}/s: p50 {p50:.1} ms, p99 {p99:.1} ms");

    if opts.stream_seconds > 0 {
        stream(
            &client,
            &pool,
            &opts.url,
            rate * 0.8,
            opts.stream_seconds,
            &mut report,
        )
        .await?;
    }
    if opts.churn > 0 {
        let started = Instant::now();
        churn(&client, &pool, &opts.url, opts.churn).await?;
        report.churn_tasks = opts.churn;
        report.churn_seconds = started.elapsed().as_secs_f64();
        let (secs, after, runs) = end_to_end_runs(&client, &pool, opts).await?;
        report.end_to_end_after_churn_tasks_per_second = after;
        eprintln!(
            "after {} more tasks ({:.0} s): end to end {} tasks in {secs:.2} s = {after:.0} tasks/s (median of {runs:.0?})",
            opts.churn, report.churn_seconds, opts.tasks
        );
        report.end_to_end_after_churn_runs = runs;
    }

    if !opts.end_to_end_only {
        history(&client, &pool, &opts.url, &mut report).await?;
    }
    report.service_peak_rss_mb = opts.service_pid.and_then(peak_rss_mb);
    Ok(report)
}

/// `GET /tasks/{id}` under three loads, each for `--seconds` with `--readers` closed-loop
/// readers picking ids uniformly at random:
///
/// 1. `uncached`: 2000 finished tasks, every request with `Cache-Control: no-cache` (Postgres);
/// 2. `cached`: the same tasks through the cache;
/// 3. `uncached_while_running` and `cached_while_running`: tasks enqueued at ~1000/s (batches
///    of 100) during the run, the readers polling the ones enqueued so far while the workers run
///    them; each event of a task invalidates its cached state, so this is the hit rate of
///    clients polling live tasks.
async fn reads(
    client: &reqwest::Client,
    pool: &PgPool,
    opts: &BenchOptions,
    report: &mut Report,
) -> anyhow::Result<()> {
    let url = opts.url.as_str();
    let run = Duration::from_secs(opts.seconds);
    let ids: Vec<uuid::Uuid> = batch_ids(client, url, 2000).await?;
    wait_idle(pool, Duration::from_secs(300)).await?;
    let ids = Arc::new(std::sync::RwLock::new(ids));

    for (name, bypass) in [("uncached", true), ("cached", false)] {
        let before = cache_counts(client, url).await;
        let mut r = read_run(client, url, ids.clone(), opts.readers, run, bypass).await?;
        r.name = name.into();
        if !bypass {
            r.hit_rate = hit_rate(before, cache_counts(client, url).await);
        }
        report.reads.push(r);
    }

    // polling tasks while they run, without and with the cache
    for (name, bypass) in [
        ("uncached_while_running", true),
        ("cached_while_running", false),
    ] {
        let live = Arc::new(std::sync::RwLock::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let feeder = {
            let (client, url, live, stop) =
                (client.clone(), url.to_owned(), live.clone(), stop.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(100));
                while !stop.load(Ordering::Relaxed) {
                    tick.tick().await;
                    let made = batch_ids(&client, &url, 100).await?;
                    live.write().expect("ids").extend(made);
                }
                Ok::<_, anyhow::Error>(())
            })
        };
        while live.read().expect("ids").is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let before = cache_counts(client, url).await;
        let mut r = read_run(client, url, live.clone(), opts.readers, run, bypass).await?;
        if !bypass {
            r.hit_rate = hit_rate(before, cache_counts(client, url).await);
        }
        r.name = name.into();
        stop.store(true, Ordering::Relaxed);
        feeder.await??;
        report.reads.push(r);
        wait_idle(pool, Duration::from_secs(300)).await?;
    }
    for r in &report.reads {
        eprintln!(
            "GET /tasks/{{id}} {}: {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms, hit rate {}",
            r.name,
            r.per_second,
            r.p50_ms,
            r.p99_ms,
            r.hit_rate
                .map_or("-".to_owned(), |h| format!("{:.1}%", h * 100.0))
        );
    }
    Ok(())
}

/// Enqueues `n` tasks with `POST /tasks/batch` (100 per request) and returns their ids.
async fn batch_ids(
    client: &reqwest::Client,
    url: &str,
    n: usize,
) -> anyhow::Result<Vec<uuid::Uuid>> {
    let mut ids = Vec::with_capacity(n);
    while ids.len() < n {
        let size = (n - ids.len()).min(100);
        let tasks: Vec<_> = (0..size).map(task_body).collect();
        let resp = client
            .post(format!("{url}/tasks/batch"))
            .json(&json!({ "tasks": tasks }))
            .send()
            .await?;
        if !resp.status().is_success() {
            bail!("batch enqueue answered {}", resp.status());
        }
        let body: serde_json::Value = resp.json().await?;
        for t in body["tasks"].as_array().into_iter().flatten() {
            if let Some(id) = t["id"].as_str() {
                ids.push(id.parse()?);
            }
        }
        if ids.is_empty() {
            bail!("the batch answer carries no task ids");
        }
    }
    Ok(ids)
}

async fn read_run(
    client: &reqwest::Client,
    url: &str,
    ids: Arc<std::sync::RwLock<Vec<uuid::Uuid>>>,
    readers: usize,
    run: Duration,
    bypass: bool,
) -> anyhow::Result<ReadRun> {
    let started = Instant::now();
    let mut handles = Vec::new();
    for _ in 0..readers.max(1) {
        let (client, url, ids) = (client.clone(), url.to_owned(), ids.clone());
        handles.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0usize;
            while started.elapsed() < run {
                let id = {
                    let ids = ids.read().expect("ids");
                    ids[rand::random_range(0..ids.len())]
                };
                let mut req = client.get(format!("{url}/tasks/{id}"));
                if bypass {
                    req = req.header("Cache-Control", "no-cache");
                }
                let t = Instant::now();
                let r = req.send().await?;
                let ok = r.status().is_success();
                r.bytes().await?;
                if ok {
                    lat.push(t.elapsed().as_secs_f64() * 1000.0);
                } else {
                    errors += 1;
                }
            }
            Ok::<_, anyhow::Error>((lat, errors))
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for h in handles {
        let (lat, e) = h.await??;
        all.extend(lat);
        errors += e;
    }
    let secs = started.elapsed().as_secs_f64();
    all.sort_by(f64::total_cmp);
    Ok(ReadRun {
        name: String::new(),
        readers,
        requests: all.len(),
        per_second: all.len() as f64 / secs,
        p50_ms: percentile(&all, 0.5),
        p99_ms: percentile(&all, 0.99),
        errors,
        hit_rate: None,
    })
}

/// Hits and misses of the `task` cache family from the service's `/metrics` (`None` if the
/// scrape fails).
async fn cache_counts(client: &reqwest::Client, url: &str) -> Option<(f64, f64)> {
    let text = client
        .get(format!("{url}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let value = |metric: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(metric) && l.contains("family=\"task\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    Some((value(CACHE_HITS_METRIC), value(CACHE_MISSES_METRIC)))
}

const CACHE_HITS_METRIC: &str = "arnela_cache_hits_total";
const CACHE_MISSES_METRIC: &str = "arnela_cache_misses_total";

fn hit_rate(before: Option<(f64, f64)>, after: Option<(f64, f64)>) -> Option<f64> {
    let ((h0, m0), (h1, m1)) = (before?, after?);
    let (hits, misses) = (h1 - h0, m1 - m0);
    (hits + misses > 0.0).then(|| hits / (hits + misses))
}

/// `GET /tasks/{id}/events` for 1000 tasks sampled from the table, 8 at a time.
async fn history(
    client: &reqwest::Client,
    pool: &PgPool,
    url: &str,
    report: &mut Report,
) -> anyhow::Result<()> {
    report.history_events_in_table =
        // the log is partitioned by month: the estimate is the partitions' sum
        sqlx::query_scalar(
            "SELECT coalesce(sum(greatest(c.reltuples, 0)), 0)::bigint FROM pg_inherits i \
             JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = 'task_events'::regclass",
        )
            .fetch_one(pool)
            .await?;
    let ids: Vec<uuid::Uuid> =
        sqlx::query_scalar("SELECT id FROM tasks TABLESAMPLE SYSTEM (5) LIMIT 1000")
            .fetch_all(pool)
            .await?;
    let ids = Arc::new(ids);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut handles = Vec::new();
    for _ in 0..8 {
        let (client, url, ids, next) = (client.clone(), url.to_owned(), ids.clone(), next.clone());
        handles.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(id) = ids.get(i) else { break };
                let t = Instant::now();
                let r = client
                    .get(format!("{url}/tasks/{id}/events"))
                    .send()
                    .await?;
                let ok = r.status().is_success();
                r.bytes().await?;
                if ok {
                    lat.push(t.elapsed().as_secs_f64() * 1000.0);
                }
            }
            Ok::<_, anyhow::Error>(lat)
        }));
    }
    let mut all = Vec::new();
    for h in handles {
        all.extend(h.await??);
    }
    all.sort_by(f64::total_cmp);
    report.history_requests = all.len();
    report.history_p50_ms = percentile(&all, 0.5);
    report.history_p99_ms = percentile(&all, 0.99);
    eprintln!(
        "GET /tasks/{{id}}/events with ~{} events stored: p50 {:.2} ms, p99 {:.2} ms",
        report.history_events_in_table, report.history_p50_ms, report.history_p99_ms
    );
    Ok(())
}

async fn single_enqueue(
    client: &reqwest::Client,
    url: &str,
    concurrency: usize,
    duration: Duration,
) -> anyhow::Result<Level> {
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut handles = Vec::new();
    for w in 0..concurrency {
        let (client, url, stop) = (client.clone(), format!("{url}/tasks"), stop.clone());
        handles.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0usize;
            let mut i = w * 1_000_000;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                match client.post(&url).json(&task_body(i)).send().await {
                    Ok(r) if r.status().as_u16() == 201 => {
                        latencies.push(t.elapsed().as_secs_f64() * 1000.0)
                    }
                    _ => errors += 1,
                }
                i += 1;
            }
            (latencies, errors)
        }));
    }
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    let mut errors = 0;
    for h in handles {
        let (l, e) = h.await?;
        all.extend(l);
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort_by(f64::total_cmp);
    Ok(Level {
        concurrency,
        requests: all.len(),
        per_second: all.len() as f64 / elapsed,
        p50_ms: percentile(&all, 0.50),
        p99_ms: percentile(&all, 0.99),
        errors,
    })
}

async fn batch_enqueue(
    client: &reqwest::Client,
    url: &str,
    size: usize,
    batches: usize,
) -> anyhow::Result<f64> {
    let body = json!({"tasks": (0..size).map(task_body).collect::<Vec<_>>()});
    let started = Instant::now();
    let mut handles = Vec::new();
    // two batches in flight at a time, as two producers would send them
    let per = batches.div_ceil(2);
    for _ in 0..2 {
        let (client, url, body) = (client.clone(), format!("{url}/tasks/batch"), body.clone());
        handles.push(tokio::spawn(async move {
            for _ in 0..per {
                let r = client.post(&url).json(&body).send().await?;
                if r.status().as_u16() != 201 {
                    bail!("batch enqueue answered {}", r.status());
                }
            }
            Ok(())
        }));
    }
    for h in handles {
        h.await??;
    }
    Ok((per * 2 * size) as f64 / started.elapsed().as_secs_f64())
}

/// `opts.runs` end-to-end runs of `opts.tasks` tasks, one after the other: the median run's
/// seconds and rate, and every run's rate.
async fn end_to_end_runs(
    client: &reqwest::Client,
    pool: &PgPool,
    opts: &BenchOptions,
) -> anyhow::Result<(f64, f64, Vec<f64>)> {
    let mut runs = Vec::with_capacity(opts.runs.max(1));
    for _ in 0..opts.runs.max(1) {
        runs.push(end_to_end(client, pool, &opts.url, opts.tasks).await?);
    }
    let rates: Vec<f64> = runs.iter().map(|&(_, rate)| rate).collect();
    runs.sort_by(|a, b| a.1.total_cmp(&b.1));
    let (secs, rate) = runs[runs.len() / 2];
    Ok((secs, rate, rates))
}

async fn end_to_end(
    client: &reqwest::Client,
    pool: &PgPool,
    url: &str,
    n: usize,
) -> anyhow::Result<(f64, f64)> {
    let since: i64 = sqlx::query_scalar("SELECT coalesce(max(position), 0) FROM task_events")
        .fetch_one(pool)
        .await?;
    let mut sent = 0;
    let mut ids = Vec::with_capacity(n);
    while sent < n {
        let size = (n - sent).min(1000);
        ids.extend(post_batch(client, url, sent..sent + size).await?);
        sent += size;
    }
    // the bench's tasks are the only ones: wait until nothing is open (a cheap query on the
    // outbox and the leases, polled often enough not to matter and seldom enough not to load the
    // server)
    wait_idle(pool, Duration::from_secs(600)).await?;
    let (first, last): (f64, f64) = sqlx::query_as(
        "SELECT extract(epoch FROM min(recorded_at))::float8, extract(epoch FROM max(recorded_at))::float8 \
         FROM task_events WHERE position > $1 AND task_id = ANY($2)",
    )
    .bind(since)
    .bind(&ids)
    .fetch_one(pool)
    .await?;
    let secs = last - first;
    Ok((secs, n as f64 / secs))
}

/// Offers `rate` tasks/s for `duration`, open loop: every 10 ms a batch of the tasks due by
/// then is sent (`POST /tasks/batch`, or `POST /tasks` for one), whatever earlier requests do.
/// Returns the ids the service acknowledged.
async fn offer(
    client: &reqwest::Client,
    url: &str,
    rate: f64,
    duration: Duration,
) -> anyhow::Result<Vec<uuid::Uuid>> {
    const TICK: Duration = Duration::from_millis(10);
    let started = Instant::now();
    let mut handles = Vec::new();
    let mut sent = 0usize;
    let mut tick = 0u32;
    while started.elapsed() < duration {
        tick += 1;
        tokio::time::sleep_until((started + TICK * tick).into()).await;
        let due = ((started.elapsed().as_secs_f64() * rate) as usize)
            .min((rate * duration.as_secs_f64()) as usize);
        if due <= sent {
            continue;
        }
        let (from, to) = (sent, due);
        sent = due;
        let client = client.clone();
        let url = url.to_owned();
        handles.push(tokio::spawn(async move {
            let ids: anyhow::Result<Vec<uuid::Uuid>> = async {
                if to - from == 1 {
                    let v: serde_json::Value = client
                        .post(format!("{url}/tasks"))
                        .json(&task_body(from))
                        .send()
                        .await?
                        .json()
                        .await?;
                    Ok(vec![v["id"].as_str().context("task id")?.parse()?])
                } else {
                    post_batch(&client, &url, from..to).await
                }
            }
            .await;
            ids.unwrap_or_default()
        }));
    }
    let mut ids = Vec::with_capacity(sent);
    for h in handles {
        ids.extend(h.await?);
    }
    Ok(ids)
}

/// Enqueues the bench tasks numbered `range` with one `POST /tasks/batch`; returns their ids.
async fn post_batch(
    client: &reqwest::Client,
    url: &str,
    range: std::ops::Range<usize>,
) -> anyhow::Result<Vec<uuid::Uuid>> {
    let body = json!({"tasks": range.map(task_body).collect::<Vec<_>>()});
    let v: serde_json::Value = client
        .post(format!("{url}/tasks/batch"))
        .json(&body)
        .send()
        .await?
        .json()
        .await?;
    v["tasks"]
        .as_array()
        .context("batch answer")?
        .iter()
        .map(|t| Ok(t["id"].as_str().context("task id")?.parse()?))
        .collect()
}

/// p50 and p99 of enqueue → attempt start (the `enqueued` and first `attempt_started` events'
/// commit-side times, both from the database's clock) over `ids`.
async fn start_latencies(pool: &PgPool, ids: &[uuid::Uuid]) -> anyhow::Result<(f64, f64)> {
    let mut lat: Vec<f64> = sqlx::query_scalar(
        "SELECT (extract(epoch FROM s.recorded_at - e.recorded_at) * 1000)::float8 \
         FROM task_events e JOIN task_events s ON s.task_id = e.task_id \
         WHERE e.task_id = ANY($1) AND e.event_type = 'enqueued' \
           AND s.event_type = 'attempt_started' AND s.sequence = 3",
    )
    .bind(ids)
    .fetch_all(pool)
    .await?;
    lat.sort_by(f64::total_cmp);
    Ok((percentile(&lat, 0.5), percentile(&lat, 0.99)))
}

async fn start_latency(
    client: &reqwest::Client,
    pool: &PgPool,
    url: &str,
    rate: f64,
    duration: Duration,
) -> anyhow::Result<(f64, f64)> {
    let ids = offer(client, url, rate, duration).await?;
    wait_idle(pool, Duration::from_secs(300)).await?;
    start_latencies(pool, &ids).await
}

/// A sustained stream at `rate` for `seconds`: how old the oldest unfinished task is when the
/// offering stops, and how long the rest take.
async fn stream(
    client: &reqwest::Client,
    pool: &PgPool,
    url: &str,
    rate: f64,
    seconds: u64,
    report: &mut Report,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let ids = offer(client, url, rate, Duration::from_secs(seconds)).await?;
    let offered_for = started.elapsed();
    let oldest: f64 = sqlx::query_scalar(
        "SELECT coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8 FROM tasks \
         WHERE id = ANY($1) AND status NOT IN ('succeeded', 'dead', 'cancelled')",
    )
    .bind(&ids)
    .fetch_one(pool)
    .await?;
    wait_idle(pool, Duration::from_secs(300)).await?;
    let (p50, p99) = start_latencies(pool, &ids).await?;
    report.stream_offered_rate = rate;
    report.stream_seconds = offered_for.as_secs_f64();
    report.stream_tasks = ids.len();
    report.stream_oldest_open_age_s = oldest;
    report.stream_drained_after_s = (started.elapsed() - offered_for).as_secs_f64();
    report.stream_start_p50_ms = p50;
    report.stream_start_p99_ms = p99;
    eprintln!(
        "stream at {rate:.0}/s for {seconds} s: {} tasks, oldest open at the end {oldest:.2} s, \
         start p50 {p50:.1} ms, p99 {p99:.1} ms",
        ids.len()
    );
    Ok(())
}

/// Pushes `n` tasks through the service as fast as it runs them (batches of 1000 from two
/// producers, at most 50,000 unfinished at a time), so the tables churn as in a long life.
async fn churn(client: &reqwest::Client, pool: &PgPool, url: &str, n: usize) -> anyhow::Result<()> {
    const BATCH: usize = 1000;
    const MAX_OPEN: i64 = 50_000;
    let body = json!({"tasks": (0..BATCH).map(task_body).collect::<Vec<_>>()});
    let mut sent = 0;
    let mut last_report = Instant::now();
    while sent < n {
        let open = open_tasks(pool).await?;
        if open > MAX_OPEN {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        let requests = futures::future::join_all(
            (0..2).map(|_| client.post(format!("{url}/tasks/batch")).json(&body).send()),
        )
        .await;
        for r in requests {
            let r = r?;
            if r.status().as_u16() != 201 {
                bail!("batch enqueue answered {}", r.status());
            }
        }
        sent += 2 * BATCH;
        if last_report.elapsed() > Duration::from_secs(10) {
            eprintln!("churn: {sent} of {n} tasks enqueued");
            last_report = Instant::now();
        }
    }
    wait_idle(pool, Duration::from_secs(600)).await
}

/// Tasks not finished, roughly: a waiting task has a delivery in the outbox and a running one a
/// lease (two small tables: `tasks` has no index on the status).
async fn open_tasks(pool: &PgPool) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM outbox) + (SELECT count(*) FROM task_leases)",
    )
    .fetch_one(pool)
    .await?)
}

async fn wait_idle(pool: &PgPool, limit: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        let open = open_tasks(pool).await?;
        if open == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{open} tasks still open after {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `VmHWM` of a process, in MB.
pub fn peak_rss_mb(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Rates as "a, b, c".
fn rates(runs: &[f64]) -> String {
    runs.iter()
        .map(|r| format!("{r:.0}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The report as a table.
pub fn table(r: &Report) -> String {
    let mut out = String::new();
    out.push_str("| measurement | result |\n|---|---|\n");
    for l in &r.single_enqueue {
        out.push_str(&format!(
            "| single POST /tasks, {} connections | {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms ({} errors) |\n",
            l.concurrency, l.per_second, l.p50_ms, l.p99_ms, l.errors
        ));
    }
    if !r.single_enqueue.is_empty() {
        out.push_str(&format!(
            "| POST /tasks/batch, 100 per batch | {:.0} tasks/s |\n| POST /tasks/batch, 1000 per batch | {:.0} tasks/s |\n",
            r.batch_100_tasks_per_second, r.batch_1000_tasks_per_second
        ));
        out.push_str(&format!(
            "| end to end, {} no-op tasks, median of {} runs | {:.0} tasks/s ({:.2} s; runs {}) |\n",
            r.end_to_end_tasks,
            r.end_to_end_runs.len(),
            r.end_to_end_tasks_per_second,
            r.end_to_end_seconds,
            rates(&r.end_to_end_runs)
        ));
        out.push_str(&format!(
            "| enqueue → attempt start at {:.0} tasks/s offered | p50 {:.1} ms, p99 {:.1} ms |\n",
            r.start_latency_offered_rate, r.start_latency_p50_ms, r.start_latency_p99_ms
        ));
    }
    if r.stream_tasks > 0 {
        out.push_str(&format!(
            "| sustained stream at {:.0} tasks/s for {:.0} s ({} tasks) | oldest unfinished at the end {:.2} s, all done {:.2} s later; start p50 {:.1} ms, p99 {:.1} ms |\n",
            r.stream_offered_rate,
            r.stream_seconds,
            r.stream_tasks,
            r.stream_oldest_open_age_s,
            r.stream_drained_after_s,
            r.stream_start_p50_ms,
            r.stream_start_p99_ms
        ));
    }
    if r.churn_tasks > 0 {
        out.push_str(&format!(
            "| end to end after {} more tasks ({:.0} s), median of {} runs | {:.0} tasks/s (runs {}) |\n",
            r.churn_tasks,
            r.churn_seconds,
            r.end_to_end_after_churn_runs.len(),
            r.end_to_end_after_churn_tasks_per_second,
            rates(&r.end_to_end_after_churn_runs)
        ));
    }
    if r.history_requests > 0 {
        out.push_str(&format!(
            "| GET /tasks/{{id}}/events, ~{} events stored ({} requests) | p50 {:.2} ms, p99 {:.2} ms |\n",
            r.history_events_in_table, r.history_requests, r.history_p50_ms, r.history_p99_ms
        ));
    }
    for read in &r.reads {
        out.push_str(&format!(
            "| GET /tasks/{{id}} {}, {} readers | {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms, hit rate {} ({} errors) |\n",
            read.name,
            read.readers,
            read.per_second,
            read.p50_ms,
            read.p99_ms,
            read.hit_rate.map_or("-".to_owned(), |h| format!("{:.1}%", h * 100.0)),
            read.errors
        ));
    }
    if let Some(mb) = r.service_peak_rss_mb {
        out.push_str(&format!("| service peak RSS | {mb:.1} MB |\n"));
    }
    out
}
