//! Prometheus metrics in the text exposition format 0.0.4.
//!
//! One [`Metrics`] registry per application (a cheap clone of a shared handle, never a process
//! global, so tests can run many applications in one process), shared by the API, the relay,
//! the workers and any cache:
//!
//! - **per-process figures** are recorded where things happen: HTTP requests by route template
//!   ([`Metrics::observe_http`], from the API middleware), relay batches
//!   ([`Metrics::observe_relay_batch`]), finished attempts ([`Metrics::observe_attempt`]),
//!   deliveries left on the queue for another deployment ([`Metrics::observe_skipped`]), and
//!   the counters of every registered [`CacheStats`] ([`Metrics::register_cache`]);
//! - **cluster figures** are read at scrape time by [`Collector`]s: queue depths and live
//!   workers from Redis ([`QueueCollector`]), the outbox backlog from Postgres
//!   ([`OutboxCollector`]), the age of the oldest waiting delivery from both
//!   ([`QueueAgeCollector`]). A collector that fails or does not answer within the collect timeout
//!   does not fail the scrape: its families are left out, `arnela_scrape_source_up{source}`
//!   drops to 0 and `arnela_scrape_errors_total{source}` counts the failure; the error is
//!   logged once per outage (when the source goes down), and its recovery once.
//!
//! More families can be added in two ways: register a [`Collector`] with
//! [`Metrics::add_collector`] (read on every [`Metrics::scrape`]), or pass ready [`Family`]
//! values to [`Metrics::render`].
//!
//! Every label is bounded: methods, route templates (`/tasks/{id}`, never the raw path; requests
//! no route matched share `unmatched`), status codes, task types, outcomes, cache key
//! families, list names and collector sources. Never ids or raw URIs.
//!
//! The encoder is this module's own (a few dozen lines): `# HELP` and `# TYPE` once per family,
//! label values escaped (`\\`, `\"`, `\n`), help text escaped (`\\`, `\n`), histograms as
//! cumulative `_bucket{le}` series ending with `le="+Inf"`, then `_sum` and `_count`.

use futures::future::BoxFuture;
use redis::aio::ConnectionManager;
use sqlx::PgPool;
use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::cache::CacheStats;
use crate::domain::TaskType;
use crate::queue::{self, Delivery, Keys, QueueError};
use crate::store::{outbox, projection, StoreError};

/// The `Content-Type` of a scrape.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// How long a collector may take by default before its families are left out of a scrape.
pub const DEFAULT_COLLECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Request latency buckets, in seconds.
const HTTP_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Attempt duration buckets, in seconds (handlers call providers: up to minutes).
const ATTEMPT_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];
/// Relay batch sizes, in outbox rows (`RELAY_BATCH` is at most 10,000).
const BATCH_BUCKETS: &[f64] = &[
    1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
];

/// Why a delivery was left on the queue instead of being worked (the bounded `reason` label of
/// `arnela_deliveries_skipped_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SkipReason {
    /// Its task is not in this process's database: it was put back on the queue.
    TaskNotFound,
    /// Its task type is paused: it went back to the outbox, to be published on resume.
    TypePaused,
}

impl SkipReason {
    pub const ALL: [SkipReason; 2] = [SkipReason::TaskNotFound, SkipReason::TypePaused];

    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::TaskNotFound => "task_not_found",
            SkipReason::TypePaused => "type_paused",
        }
    }
}

/// Why a collector could not read its figures.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error("no answer within {0:?}")]
    TimedOut(Duration),
}

pub type Result<T, E = MetricsError> = std::result::Result<T, E>;

/// The type of a metric family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// A metric family ready to render: its name (counters end in `_total`), help text, type and
/// samples. Build one with [`Family::counter`], [`Family::gauge`] or [`Family::histogram`] and
/// add samples with [`Family::with`] / [`Family::with_histogram`].
#[derive(Debug, Clone, PartialEq)]
pub struct Family {
    pub name: String,
    pub help: String,
    pub kind: Kind,
    pub samples: Vec<Sample>,
}

/// One series of a family: its labels (bounded values only) and value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub labels: Vec<(String, String)>,
    pub value: Value,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// A counter's or a gauge's value.
    Number(f64),
    Histogram(HistogramValue),
}

/// A histogram's state: cumulative counts per upper bound (ascending, without `+Inf`, which is
/// `count`), the number of observations and their sum.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct HistogramValue {
    pub buckets: Vec<(f64, u64)>,
    pub count: u64,
    pub sum: f64,
}

impl Family {
    fn new(kind: Kind, name: &str, help: &str) -> Family {
        Family {
            name: name.to_owned(),
            help: help.to_owned(),
            kind,
            samples: Vec::new(),
        }
    }

    pub fn counter(name: &str, help: &str) -> Family {
        Family::new(Kind::Counter, name, help)
    }

    pub fn gauge(name: &str, help: &str) -> Family {
        Family::new(Kind::Gauge, name, help)
    }

    pub fn histogram(name: &str, help: &str) -> Family {
        Family::new(Kind::Histogram, name, help)
    }

    /// Adds a counter or gauge sample.
    pub fn with(mut self, labels: &[(&str, &str)], value: f64) -> Family {
        self.samples.push(Sample {
            labels: owned(labels),
            value: Value::Number(value),
        });
        self
    }

    /// Adds a histogram sample.
    pub fn with_histogram(mut self, labels: &[(&str, &str)], value: HistogramValue) -> Family {
        self.samples.push(Sample {
            labels: owned(labels),
            value: Value::Histogram(value),
        });
        self
    }

    /// Why this family cannot be rendered as it is, if it cannot.
    fn problem(&self) -> Option<String> {
        if !valid_name(&self.name, true) {
            return Some(format!("invalid metric name {:?}", self.name));
        }
        for s in &self.samples {
            for (name, _) in &s.labels {
                if !valid_name(name, false) || name.starts_with("__") {
                    return Some(format!("invalid label name {name:?}"));
                }
                if self.kind == Kind::Histogram && name == "le" {
                    return Some("a histogram cannot have an `le` label".into());
                }
            }
            let mut names: Vec<&str> = s.labels.iter().map(|(k, _)| k.as_str()).collect();
            names.sort_unstable();
            if names.windows(2).any(|w| w[0] == w[1]) {
                return Some("a sample repeats a label name".into());
            }
            let histogram = matches!(s.value, Value::Histogram(_));
            if histogram != (self.kind == Kind::Histogram) {
                return Some("a sample's value does not match the family's type".into());
            }
            if let Value::Histogram(h) = &s.value {
                let ordered = h
                    .buckets
                    .windows(2)
                    .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1);
                let finite = h.buckets.iter().all(|(b, _)| b.is_finite());
                let within = h.buckets.last().is_none_or(|(_, c)| *c <= h.count);
                if !(ordered && finite && within) {
                    return Some(
                        "histogram buckets need ascending finite bounds and cumulative counts \
                         up to the total count"
                            .into(),
                    );
                }
            }
        }
        let mut sets = HashSet::new();
        for s in &self.samples {
            let mut set = s.labels.clone();
            set.sort();
            if !sets.insert(set) {
                return Some("two samples have the same labels".into());
            }
        }
        None
    }
}

fn owned(labels: &[(&str, &str)]) -> Vec<(String, String)> {
    labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// `[a-zA-Z_:][a-zA-Z0-9_:]*` for metric names, the same without `:` for label names.
fn valid_name(name: &str, colons: bool) -> bool {
    let ok = |c: char, first: bool| {
        c.is_ascii_alphabetic()
            || c == '_'
            || (colons && c == ':')
            || (!first && c.is_ascii_digit())
    };
    let mut chars = name.chars();
    chars.next().is_some_and(|c| ok(c, true)) && chars.all(|c| ok(c, false))
}

/// Reads figures at scrape time (the cluster's view, from a shared store).
pub trait Collector: Send + Sync {
    /// What is read (`redis`, `postgres`): the `source` label of the scrape-status families.
    fn source(&self) -> &'static str;

    /// The families read now. An error leaves them out of this scrape.
    fn collect(&self) -> BoxFuture<'_, Result<Vec<Family>>>;
}

/// Observations of one histogram series.
#[derive(Debug, Clone)]
struct Histogram {
    bounds: &'static [f64],
    /// Observations per bucket (not cumulative); the last slot is above every bound.
    counts: Vec<u64>,
    sum: f64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
        }
    }

    fn observe(&mut self, v: f64) {
        let i = self
            .bounds
            .iter()
            .position(|b| v <= *b)
            .unwrap_or(self.bounds.len());
        self.counts[i] += 1;
        self.sum += v;
    }

    fn value(&self) -> HistogramValue {
        let mut running = 0;
        let buckets = self
            .bounds
            .iter()
            .zip(&self.counts)
            .map(|(b, c)| {
                running += c;
                (*b, running)
            })
            .collect();
        HistogramValue {
            buckets,
            count: self.counts.iter().sum(),
            sum: self.sum,
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct SourceState {
    failing: bool,
    errors: u64,
}

struct Inner {
    /// (route template, method, status) → latency.
    http: Mutex<BTreeMap<(String, &'static str, u16), Histogram>>,
    /// Rows per non-empty batch, and deliveries published.
    relay: Mutex<(Histogram, u64)>,
    /// (task type, outcome) → duration.
    attempts: Mutex<BTreeMap<(&'static str, &'static str), Histogram>>,
    /// Deliveries left on the queue, by reason.
    skipped: Mutex<BTreeMap<SkipReason, u64>>,
    caches: Mutex<Vec<Arc<CacheStats>>>,
    collectors: Mutex<Vec<Arc<dyn Collector>>>,
    sources: Mutex<BTreeMap<&'static str, SourceState>>,
    collect_timeout: Duration,
}

/// The metrics registry of one application. Clones share it.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// The bounded label of an HTTP method (`other` for extension methods).
fn method_label(method: &poem::http::Method) -> &'static str {
    use poem::http::Method;
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

impl Metrics {
    /// An empty registry with the default collect timeout.
    pub fn new() -> Metrics {
        Metrics::with_collect_timeout(DEFAULT_COLLECT_TIMEOUT)
    }

    /// An empty registry whose collectors each get `timeout` per scrape.
    pub fn with_collect_timeout(timeout: Duration) -> Metrics {
        Metrics {
            inner: Arc::new(Inner {
                http: Mutex::default(),
                relay: Mutex::new((Histogram::new(BATCH_BUCKETS), 0)),
                attempts: Mutex::default(),
                skipped: Mutex::default(),
                caches: Mutex::default(),
                collectors: Mutex::default(),
                sources: Mutex::default(),
                collect_timeout: timeout,
            }),
        }
    }

    /// A registry with the cluster collectors: queue depths and live workers from Redis, the
    /// outbox backlog from Postgres, the queue's oldest delivery age from both, the projected
    /// figures.
    pub fn for_cluster(
        pool: PgPool,
        redis: ConnectionManager,
        keys: Keys,
        timeout: Duration,
    ) -> Metrics {
        let metrics = Metrics::with_collect_timeout(timeout);
        metrics.add_collector(Arc::new(QueueCollector {
            redis: redis.clone(),
            keys: keys.clone(),
        }));
        metrics.add_collector(Arc::new(QueueAgeCollector {
            redis,
            keys,
            pool: pool.clone(),
        }));
        metrics.add_collector(Arc::new(OutboxCollector { pool: pool.clone() }));
        metrics.add_collector(Arc::new(ProjectionCollector { pool }));
        metrics
    }

    /// Adds a collector read on every scrape (its `source` should be unique).
    pub fn add_collector(&self, collector: Arc<dyn Collector>) {
        self.inner
            .collectors
            .lock()
            .expect("metrics collectors")
            .push(collector);
    }

    /// Exports a cache's counters (summed with the other registered caches per key family).
    pub fn register_cache(&self, stats: Arc<CacheStats>) {
        self.inner
            .caches
            .lock()
            .expect("metrics caches")
            .push(stats);
    }

    /// Records one HTTP request: `route` is the matched route template (`None`, or the empty
    /// template of the root nest, when no route matched).
    pub fn observe_http(
        &self,
        method: &poem::http::Method,
        route: Option<&str>,
        status: u16,
        elapsed: Duration,
    ) {
        let key = (
            route
                .filter(|r| !r.is_empty())
                .unwrap_or("unmatched")
                .to_owned(),
            method_label(method),
            status,
        );
        self.inner
            .http
            .lock()
            .expect("metrics http")
            .entry(key)
            .or_insert_with(|| Histogram::new(HTTP_BUCKETS))
            .observe(elapsed.as_secs_f64());
    }

    /// Records one relay batch that claimed `rows` outbox rows and published `published`
    /// deliveries.
    pub fn observe_relay_batch(&self, rows: usize, published: usize) {
        let mut relay = self.inner.relay.lock().expect("metrics relay");
        relay.0.observe(rows as f64);
        relay.1 += published as u64;
    }

    /// Records one finished attempt. `outcome` is one of a fixed set (`succeeded`, `retrying`,
    /// `dead_lettered`, `released`, `fenced`, `cancelled`).
    pub fn observe_attempt(&self, task_type: TaskType, outcome: &'static str, elapsed: Duration) {
        self.inner
            .attempts
            .lock()
            .expect("metrics attempts")
            .entry((task_type.as_str(), outcome))
            .or_insert_with(|| Histogram::new(ATTEMPT_BUCKETS))
            .observe(elapsed.as_secs_f64());
    }

    /// Counts `n` deliveries left on the queue for `reason`.
    pub fn observe_skipped(&self, reason: SkipReason, n: u64) {
        *self
            .inner
            .skipped
            .lock()
            .expect("metrics skipped")
            .entry(reason)
            .or_default() += n;
    }

    /// Runs every collector (concurrently, each within the collect timeout) and renders the
    /// scrape with their families. Never fails: a collector's failure is counted and logged.
    pub async fn scrape(&self) -> String {
        let collectors = self
            .inner
            .collectors
            .lock()
            .expect("metrics collectors")
            .clone();
        let timeout = self.inner.collect_timeout;
        let results = futures::future::join_all(collectors.iter().map(|c| async move {
            let read = match tokio::time::timeout(timeout, c.collect()).await {
                Ok(r) => r,
                Err(_) => Err(MetricsError::TimedOut(timeout)),
            };
            (c.source(), read)
        }))
        .await;
        let mut extra = Vec::new();
        for (source, read) in results {
            match read {
                Ok(families) => {
                    self.source_answered(source);
                    extra.extend(families);
                }
                Err(e) => self.source_failed(source, &e),
            }
        }
        self.render(&extra)
    }

    fn source_answered(&self, source: &'static str) {
        let mut sources = self.inner.sources.lock().expect("metrics sources");
        let state = sources.entry(source).or_default();
        if state.failing {
            tracing::info!(source, "metrics: the source answers again");
        }
        state.failing = false;
    }

    fn source_failed(&self, source: &'static str, error: &MetricsError) {
        let mut sources = self.inner.sources.lock().expect("metrics sources");
        let state = sources.entry(source).or_default();
        if !state.failing {
            tracing::warn!(source, error = %error, "metrics: cannot read the source; its families are left out of scrapes until it answers");
        }
        state.failing = true;
        state.errors += 1;
    }

    /// The scrape without running collectors: this process's families, then `extra`, then the
    /// scrape status. A family that is invalid or repeats a name already rendered is left out
    /// (and logged).
    pub fn render(&self, extra: &[Family]) -> String {
        let own = self.families();
        let status = self.status_families();
        let mut out = String::new();
        let mut seen = HashSet::new();
        for family in own.iter().chain(extra).chain(&status) {
            if let Some(problem) = family.problem() {
                tracing::error!(family = %family.name, problem, "metrics: family left out");
                continue;
            }
            if !seen.insert(family.name.as_str()) {
                tracing::error!(family = %family.name, "metrics: a second family of the same name left out");
                continue;
            }
            encode(&mut out, family);
        }
        out
    }

    /// This process's own families (without collectors or scrape status).
    fn families(&self) -> Vec<Family> {
        let mut families = Vec::new();

        let http = self.inner.http.lock().expect("metrics http").clone();
        let mut requests = Family::counter(
            "arnela_http_requests_total",
            "HTTP requests answered, by route template, method and status.",
        );
        let mut latency = Family::histogram(
            "arnela_http_request_duration_seconds",
            "Time to answer an HTTP request (until the response head), by route template, \
             method and status.",
        );
        for ((route, method, status), h) in &http {
            let status = status.to_string();
            let labels = [
                ("method", *method),
                ("route", route.as_str()),
                ("status", status.as_str()),
            ];
            let value = h.value();
            requests = requests.with(&labels, value.count as f64);
            latency = latency.with_histogram(&labels, value);
        }
        families.push(requests);
        families.push(latency);

        let (batches, published) = {
            let relay = self.inner.relay.lock().expect("metrics relay");
            (relay.0.value(), relay.1)
        };
        families.push(
            Family::histogram(
                "arnela_relay_batch_rows",
                "Outbox rows claimed per non-empty relay batch in this process.",
            )
            .with_histogram(&[], batches),
        );
        families.push(
            Family::counter(
                "arnela_relay_deliveries_published_total",
                "Deliveries this process's relay pushed to the Redis queue.",
            )
            .with(&[], published as f64),
        );

        let attempts = self
            .inner
            .attempts
            .lock()
            .expect("metrics attempts")
            .clone();
        let mut finished = Family::counter(
            "arnela_worker_attempts_total",
            "Attempts this process's workers finished, by task type and outcome.",
        );
        let mut durations = Family::histogram(
            "arnela_worker_attempt_duration_seconds",
            "Handler run time of the attempts this process's workers finished, by task type \
             and outcome.",
        );
        for ((task_type, outcome), h) in &attempts {
            let labels = [("type", *task_type), ("outcome", *outcome)];
            let value = h.value();
            finished = finished.with(&labels, value.count as f64);
            durations = durations.with_histogram(&labels, value);
        }
        families.push(finished);
        families.push(durations);

        let skipped = self.inner.skipped.lock().expect("metrics skipped").clone();
        families.push(SkipReason::ALL.iter().fold(
            Family::counter(
                "arnela_deliveries_skipped_total",
                "Deliveries this process's workers and rescuer did not work, by reason \
                 (task_not_found: the task is not in this database, put back on the queue; \
                 type_paused: its type is paused, given back to the outbox).",
            ),
            |family, reason| {
                let n = skipped.get(reason).copied().unwrap_or(0);
                family.with(&[("reason", reason.as_str())], n as f64)
            },
        ));

        families.extend(self.cache_families());
        families
    }

    /// The registered caches' counters, per key family (none when no cache is registered).
    fn cache_families(&self) -> Vec<Family> {
        let caches = self.inner.caches.lock().expect("metrics caches").clone();
        if caches.is_empty() {
            return Vec::new();
        }
        let mut by_family: BTreeMap<&'static str, [u64; 4]> = BTreeMap::new();
        let mut loads = 0u64;
        for stats in &caches {
            loads += stats.loads.load(std::sync::atomic::Ordering::Relaxed);
            for (family, counts) in stats.by_family.lock().expect("cache stats").iter() {
                let sum = by_family.entry(*family).or_default();
                for (s, c) in sum.iter_mut().zip(counts) {
                    *s += c;
                }
            }
        }
        let mut hits = Family::counter(
            "arnela_cache_hits_total",
            "Cache reads answered from Redis, by key family.",
        );
        let mut misses = Family::counter(
            "arnela_cache_misses_total",
            "Cache reads that found nothing and loaded the value, by key family.",
        );
        let mut errors = Family::counter(
            "arnela_cache_errors_total",
            "Cache reads or writes that failed (Redis unavailable, undecodable value), by key \
             family.",
        );
        let mut load_time = Family::counter(
            "arnela_cache_load_seconds_total",
            "Time spent in loaders after a miss or an error, by key family.",
        );
        for (family, [h, m, e, micros]) in &by_family {
            let labels = [("family", *family)];
            hits = hits.with(&labels, *h as f64);
            misses = misses.with(&labels, *m as f64);
            errors = errors.with(&labels, *e as f64);
            load_time = load_time.with(&labels, *micros as f64 / 1e6);
        }
        let loads = Family::counter(
            "arnela_cache_loads_total",
            "Loader calls, all key families together.",
        )
        .with(&[], loads as f64);
        vec![hits, misses, errors, load_time, loads]
    }

    /// Whether each collector's source answered the last scrape, and its failures so far.
    fn status_families(&self) -> Vec<Family> {
        let sources = self.inner.sources.lock().expect("metrics sources").clone();
        let mut up = Family::gauge(
            "arnela_scrape_source_up",
            "1 if the source answered the last scrape, 0 if its families were left out.",
        );
        let mut errors = Family::counter(
            "arnela_scrape_errors_total",
            "Scrapes whose read of the source failed or timed out.",
        );
        for (source, state) in &sources {
            let labels = [("source", *source)];
            up = up.with(&labels, if state.failing { 0.0 } else { 1.0 });
            errors = errors.with(&labels, state.errors as f64);
        }
        vec![up, errors]
    }
}

/// Queue depths and live workers, from Redis (source `redis`).
pub struct QueueCollector {
    pub redis: ConnectionManager,
    pub keys: Keys,
}

impl Collector for QueueCollector {
    fn source(&self) -> &'static str {
        "redis"
    }

    fn collect(&self) -> BoxFuture<'_, Result<Vec<Family>>> {
        Box::pin(async move {
            let mut conn = self.redis.clone();
            let (waiting, processing, failed) = queue::depths(&mut conn, &self.keys).await?;
            let workers = queue::live_workers(&mut conn, &self.keys).await?;
            let depth = Family::gauge(
                "arnela_queue_depth",
                "Entries on the Redis lists: tasks (waiting deliveries), processing (taken, \
                 not yet acknowledged), failed (dead-letter copies).",
            )
            .with(&[("list", "tasks")], waiting as f64)
            .with(&[("list", "processing")], processing as f64)
            .with(&[("list", "failed")], failed as f64);
            let live = Family::gauge(
                "arnela_workers_live",
                "Workers in every process whose heartbeat is current.",
            )
            .with(&[], workers as f64);
            Ok(vec![depth, live])
        })
    }
}

/// The outbox backlog, from Postgres (source `postgres`).
pub struct OutboxCollector {
    pub pool: PgPool,
}

impl Collector for OutboxCollector {
    fn source(&self) -> &'static str {
        "postgres"
    }

    fn collect(&self) -> BoxFuture<'_, Result<Vec<Family>>> {
        Box::pin(async move {
            let (rows, age) = outbox::backlog(&self.pool).await?;
            Ok(vec![
                Family::gauge(
                    "arnela_outbox_backlog",
                    "Outbox rows that are due and not yet published.",
                )
                .with(&[], rows as f64),
                Family::gauge(
                    "arnela_outbox_oldest_due_age_seconds",
                    "How long the oldest due, unpublished outbox row has waited (0 when none).",
                )
                .with(&[], age.max(0.0)),
            ])
        })
    }
}

/// How long the oldest delivery waiting on the Redis queue has been there (source `queue_age`):
/// the entry at the right end of `{prefix}:tasks` (where workers take from), aged from its
/// outbox row's `published_at` by Postgres's clock. An entry that does not decode, or whose
/// published row is gone (its task was cancelled or already claimed, or it belongs to another
/// database), reads 0, as does an empty queue. It reads both stores, so it has a source of its
/// own: sharing `redis` would count a failure twice and let a Postgres failure mark Redis down.
pub struct QueueAgeCollector {
    pub redis: ConnectionManager,
    pub keys: Keys,
    pub pool: PgPool,
}

impl Collector for QueueAgeCollector {
    fn source(&self) -> &'static str {
        "queue_age"
    }

    fn collect(&self) -> BoxFuture<'_, Result<Vec<Family>>> {
        Box::pin(async move {
            let mut conn = self.redis.clone();
            let oldest = queue::oldest_waiting(&mut conn, &self.keys).await?;
            let age = match oldest.as_deref().and_then(Delivery::decode) {
                Some(d) => outbox::published_age(&self.pool, d.task_id, d.attempt)
                    .await?
                    .unwrap_or(0.0),
                None => 0.0,
            };
            Ok(vec![Family::gauge(
                "arnela_queue_oldest_age_seconds",
                "How long the oldest delivery waiting on the Redis queue has been there (since \
                 its outbox row was published; 0 when the queue is empty).",
            )
            .with(&[], age.max(0.0))])
        })
    }
}

/// The cluster-wide figures the projectors derive from the event log (source `projections`):
/// task totals by type, attempt durations by type and outcome, and each projector's lag.
pub struct ProjectionCollector {
    pub pool: PgPool,
}

impl Collector for ProjectionCollector {
    fn source(&self) -> &'static str {
        "projections"
    }

    fn collect(&self) -> BoxFuture<'_, Result<Vec<Family>>> {
        Box::pin(async move {
            let totals = projection::totals(&self.pool).await?;
            let durations = projection::durations(&self.pool).await?;
            let checkpoints = projection::checkpoints(&self.pool).await?;
            let counter = |name: &str, help: &str, f: fn(&projection::TypeTotals) -> i64| {
                totals.iter().fold(Family::counter(name, help), |fam, t| {
                    fam.with(&[("type", t.task_type.as_str())], f(t) as f64)
                })
            };
            let mut families = vec![
                counter(
                    "arnela_tasks_enqueued_total",
                    "Tasks enqueued, by type (from the event log, cluster-wide).",
                    |t| t.enqueued,
                ),
                counter(
                    "arnela_tasks_succeeded_total",
                    "Tasks that finished successfully, by type (from the event log).",
                    |t| t.succeeded,
                ),
                counter(
                    "arnela_task_attempts_started_total",
                    "Attempts started, by type (from the event log).",
                    |t| t.attempts_started,
                ),
                counter(
                    "arnela_task_attempts_failed_total",
                    "Attempts that failed (retried or not), by type (from the event log).",
                    |t| t.attempts_failed,
                ),
                counter(
                    "arnela_tasks_retried_total",
                    "Retries scheduled after a failed attempt, by type (from the event log).",
                    |t| t.retries,
                ),
                counter(
                    "arnela_tasks_dead_total",
                    "Tasks dead-lettered (failed for good), by type (from the event log).",
                    |t| t.dead,
                ),
                counter(
                    "arnela_tasks_cancelled_total",
                    "Tasks cancelled by an operator, by type (from the event log).",
                    |t| t.cancelled,
                ),
            ];
            let mut histogram = Family::histogram(
                "arnela_task_attempt_duration_seconds",
                "Attempt durations by type and outcome (succeeded, failed), from the event log, \
                 cluster-wide.",
            );
            let mut series: std::collections::BTreeMap<
                (&str, &str),
                Vec<&projection::DurationBucket>,
            > = Default::default();
            for b in &durations {
                series
                    .entry((b.task_type.as_str(), b.outcome.as_str()))
                    .or_default()
                    .push(b);
            }
            for ((task_type, outcome), buckets) in series {
                let mut cumulative = 0u64;
                let mut value = HistogramValue {
                    buckets: Vec::new(),
                    count: 0,
                    sum: 0.0,
                };
                for bound in projection::DURATION_BOUNDS_MS {
                    cumulative += buckets
                        .iter()
                        .filter(|b| b.le_ms == bound)
                        .map(|b| b.count as u64)
                        .sum::<u64>();
                    value.buckets.push((bound as f64 / 1000.0, cumulative));
                }
                value.count = buckets.iter().map(|b| b.count as u64).sum();
                value.sum = buckets.iter().map(|b| b.sum_ms as f64).sum::<f64>() / 1000.0;
                histogram =
                    histogram.with_histogram(&[("type", task_type), ("outcome", outcome)], value);
            }
            families.push(histogram);
            families.push(checkpoints.iter().fold(
                Family::gauge(
                    "arnela_projector_lag_seconds",
                    "Age of the oldest committed event a projector has not applied (0 when caught \
                     up).",
                ),
                |fam, c| fam.with(&[("projector", c.name.as_str())], c.lag_seconds),
            ));
            families.push(checkpoints.iter().fold(
                Family::counter(
                    "arnela_projector_events_total",
                    "Events a projector has applied since it first ran.",
                ),
                |fam, c| fam.with(&[("projector", c.name.as_str())], c.events as f64),
            ));
            Ok(families)
        })
    }
}

/// Appends one family in the text format.
fn encode(out: &mut String, family: &Family) {
    let name = &family.name;
    line(out, format!("# HELP {name} {}", escape_help(&family.help)));
    line(out, format!("# TYPE {name} {}", family.kind.as_str()));
    for sample in &family.samples {
        match &sample.value {
            Value::Number(v) => {
                line(
                    out,
                    format!("{name}{} {}", labels(&sample.labels, None), number(*v)),
                );
            }
            Value::Histogram(h) => {
                for (bound, count) in &h.buckets {
                    let le = number(*bound);
                    line(
                        out,
                        format!("{name}_bucket{} {count}", labels(&sample.labels, Some(&le))),
                    );
                }
                line(
                    out,
                    format!(
                        "{name}_bucket{} {}",
                        labels(&sample.labels, Some("+Inf")),
                        h.count
                    ),
                );
                let plain = labels(&sample.labels, None);
                line(out, format!("{name}_sum{plain} {}", number(h.sum)));
                line(out, format!("{name}_count{plain} {}", h.count));
            }
        }
    }
}

fn line(out: &mut String, text: String) {
    out.push_str(&text);
    out.push('\n');
}

/// `{a="1",b="2"}` (with `le` last when given), or nothing without labels.
fn labels(pairs: &[(String, String)], le: Option<&str>) -> String {
    if pairs.is_empty() && le.is_none() {
        return String::new();
    }
    let mut parts: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape_label(v)))
        .collect();
    if let Some(le) = le {
        parts.push(format!("le=\"{le}\""));
    }
    format!("{{{}}}", parts.join(","))
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

/// A sample value as Prometheus reads it (`+Inf`, `-Inf`, `NaN`, or a decimal).
fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v == f64::INFINITY {
        "+Inf".into()
    } else if v == f64::NEG_INFINITY {
        "-Inf".into()
    } else {
        v.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_histogram_renders_cumulative_buckets_sum_and_count() {
        let mut h = Histogram::new(&[0.1, 1.0]);
        for v in [0.05, 0.5, 0.7, 3.0] {
            h.observe(v);
        }
        let mut out = String::new();
        encode(
            &mut out,
            &Family::histogram("x_seconds", "X.").with_histogram(&[("a", "b")], h.value()),
        );
        assert_eq!(
            out,
            "# HELP x_seconds X.\n# TYPE x_seconds histogram\n\
             x_seconds_bucket{a=\"b\",le=\"0.1\"} 1\n\
             x_seconds_bucket{a=\"b\",le=\"1\"} 3\n\
             x_seconds_bucket{a=\"b\",le=\"+Inf\"} 4\n\
             x_seconds_sum{a=\"b\"} 4.25\n\
             x_seconds_count{a=\"b\"} 4\n"
        );
    }

    #[test]
    fn label_values_and_help_are_escaped() {
        let mut out = String::new();
        encode(
            &mut out,
            &Family::gauge("g", "back\\slash\nnew \"line\"").with(&[("v", "a\"b\\c\nd")], 1.5),
        );
        assert_eq!(
            out,
            "# HELP g back\\\\slash\\nnew \"line\"\n# TYPE g gauge\ng{v=\"a\\\"b\\\\c\\nd\"} 1.5\n"
        );
    }

    #[test]
    fn special_values_use_the_formats_spelling() {
        assert_eq!(number(f64::NAN), "NaN");
        assert_eq!(number(f64::INFINITY), "+Inf");
        assert_eq!(number(f64::NEG_INFINITY), "-Inf");
        assert_eq!(number(3.0), "3");
        assert_eq!(number(0.0025), "0.0025");
    }

    #[test]
    fn invalid_and_repeated_families_are_left_out() {
        let m = Metrics::new();
        let text = m.render(&[
            Family::gauge("bad-name", "x").with(&[], 1.0),
            Family::gauge("ok_gauge", "x").with(&[("1bad", "v")], 1.0),
            Family::counter("arnela_http_requests_total", "again"),
            Family::histogram("h", "x").with(&[], 1.0),
            Family::gauge("fine", "x").with(&[("k", "v")], 2.0),
            Family::gauge("twice", "x").with(&[], 1.0).with(&[], 2.0),
            Family::histogram("inf", "x").with_histogram(
                &[],
                HistogramValue {
                    buckets: vec![(1.0, 1), (f64::INFINITY, 2)],
                    count: 2,
                    sum: 3.0,
                },
            ),
        ]);
        assert!(!text.contains("twice"), "{text}");
        assert!(!text.contains("# TYPE inf "), "{text}");
        assert!(!text.contains("bad-name"), "{text}");
        assert!(!text.contains("ok_gauge"), "{text}");
        assert!(!text.contains("again"), "{text}");
        assert!(!text.contains("# TYPE h "), "{text}");
        assert!(text.contains("fine{k=\"v\"} 2\n"), "{text}");
    }

    #[test]
    fn extension_methods_share_one_label() {
        let m = Metrics::new();
        let odd = poem::http::Method::from_bytes(b"BREW").unwrap();
        m.observe_http(&odd, None, 405, Duration::from_millis(1));
        let text = m.render(&[]);
        assert!(
            text.contains(
                "arnela_http_requests_total{method=\"other\",route=\"unmatched\",status=\"405\"} 1"
            ),
            "{text}"
        );
    }
}
