//! Prometheus metrics, kept and encoded by `prometheus-client`.
//!
//! One [`Metrics`] registry per application (a cheap clone of a shared handle, never a process
//! global, so tests can run many applications in one process), shared by the API, the relay,
//! the workers and any cache:
//!
//! - **per-process figures** are `prometheus-client` families recorded where things happen:
//!   HTTP requests by route template ([`Metrics::observe_http`], from the API middleware), relay
//!   batches ([`Metrics::observe_relay_batch`]), finished attempts ([`Metrics::observe_attempt`]),
//!   deliveries left on the queue for another deployment ([`Metrics::observe_skipped`]), and the
//!   counters of every registered [`CacheStats`] ([`Metrics::register_cache`]);
//! - **cluster figures** are read at scrape time by [`Collector`]s: queue depths and live
//!   workers from Redis ([`QueueCollector`]), the outbox backlog from Postgres
//!   ([`OutboxCollector`]), the age of the oldest waiting delivery from both
//!   ([`QueueAgeCollector`]). They are read asynchronously, before encoding, as [`Family`]
//!   values. A collector that fails or does not answer within the collect timeout does not fail
//!   the scrape: its families are left out, `arnela_scrape_source_up{source}` drops to 0 and
//!   `arnela_scrape_errors_total{source}` counts the failure; the error is logged once per
//!   outage (when the source goes down), and its recovery once.
//!
//! A scrape is encoded in the Prometheus text format 0.0.4 ([`Format::Prometheus`]) or in
//! OpenMetrics text ([`Format::OpenMetrics`]); both encoders are `prometheus-client`'s.
//!
//! Every label is bounded: methods, route templates (`/tasks/{id}`, never the raw path; requests
//! no route matched share `unmatched`), status codes, task types, outcomes, cache key
//! families, list names and collector sources. Never ids or raw URIs.

use crate::queue::RedisConn;
use futures::future::BoxFuture;
use prometheus_client::collector::Collector as Encoded;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family as Series;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Metric, Registry};
use sqlx::PgPool;
use std::collections::{BTreeMap, HashSet};

mod cluster;

pub use cluster::{
    OutboxCollector, ProjectionCollector, QueueAgeCollector, QueueCollector, ReplicaCollector,
};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::cache::CacheStats;
use crate::domain::TaskType;
use crate::queue::{Keys, QueueError};
use crate::store::StoreError;

/// The encodings a scrape is served in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    /// The Prometheus text format 0.0.4 (the default).
    #[default]
    Prometheus,
    /// OpenMetrics 1.0 text, ending with `# EOF`.
    OpenMetrics,
}

impl Format {
    /// The format a request's `Accept` header asks for: OpenMetrics when it names
    /// `application/openmetrics-text`, else the Prometheus text format.
    pub fn from_accept(accept: Option<&str>) -> Format {
        match accept {
            Some(a) if a.contains("application/openmetrics-text") => Format::OpenMetrics,
            _ => Format::Prometheus,
        }
    }

    /// The `Content-Type` of a scrape in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Prometheus => prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

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

/// A metric family read at scrape time: its name (counters end in `_total`), help text, type
/// and samples. Build one with [`Family::counter`], [`Family::gauge`] or [`Family::histogram`]
/// and add samples with [`Family::with`] / [`Family::with_histogram`].
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

    /// Why this family cannot be encoded as it is, if it cannot. The encoder trusts what it is
    /// given, and one malformed line fails a whole scrape in Prometheus, so families read from
    /// collectors are checked before they are encoded.
    fn problem(&self) -> Option<String> {
        if !valid_name(&self.name, true) {
            return Some(format!("invalid metric name {:?}", self.name));
        }
        if self.kind == Kind::Counter && !self.name.ends_with("_total") {
            return Some("a counter's name ends in `_total`".into());
        }
        let mut sets = HashSet::new();
        for s in &self.samples {
            let mut names: Vec<&str> = s.labels.iter().map(|(k, _)| k.as_str()).collect();
            if let Some(bad) = names
                .iter()
                .find(|n| !valid_name(n, false) || n.starts_with("__"))
            {
                return Some(format!("invalid label name {bad:?}"));
            }
            if self.kind == Kind::Histogram && names.contains(&"le") {
                return Some("a histogram cannot have an `le` label".into());
            }
            names.sort_unstable();
            if names.windows(2).any(|w| w[0] == w[1]) {
                return Some("a sample repeats a label name".into());
            }
            match (&s.value, self.kind) {
                (Value::Histogram(h), Kind::Histogram) => {
                    let ordered = h
                        .buckets
                        .windows(2)
                        .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1);
                    let finite = h.buckets.iter().all(|(b, _)| b.is_finite());
                    let within = h.buckets.last().is_none_or(|(_, c)| *c <= h.count);
                    if !(ordered && finite && within) {
                        return Some(
                            "histogram buckets need ascending finite bounds and cumulative \
                             counts up to the total count"
                                .into(),
                        );
                    }
                }
                (Value::Number(_), Kind::Counter | Kind::Gauge) => {}
                _ => return Some("a sample's value does not match the family's type".into()),
            }
            let mut set = s.labels.clone();
            set.sort();
            if !sets.insert(set) {
                return Some("two samples have the same labels".into());
            }
        }
        None
    }

    /// Encodes this family with `prometheus-client`'s encoder (counter names without their
    /// `_total`, which the encoder adds; histogram buckets as counts per bucket, which it sums).
    /// A family without samples is left out, as the registry's own empty families are.
    fn encode(&self, encoder: &mut DescriptorEncoder) -> std::fmt::Result {
        if self.samples.is_empty() {
            return Ok(());
        }
        let (name, kind) = match self.kind {
            Kind::Counter => (
                self.name.strip_suffix("_total").unwrap_or(&self.name),
                MetricType::Counter,
            ),
            Kind::Gauge => (self.name.as_str(), MetricType::Gauge),
            Kind::Histogram => (self.name.as_str(), MetricType::Histogram),
        };
        let mut family = encoder.encode_descriptor(name, &self.help, None, kind)?;
        for sample in &self.samples {
            let mut series = family.encode_family(&sample.labels)?;
            match (&sample.value, self.kind) {
                (Value::Number(v), Kind::Counter) => {
                    series.encode_counter::<NoLabelSet, f64, f64>(v, None)?
                }
                (Value::Number(v), _) => series.encode_gauge(v)?,
                (Value::Histogram(h), _) => {
                    let mut below = 0;
                    let mut per_bucket: Vec<(f64, u64)> = h
                        .buckets
                        .iter()
                        .map(|&(bound, cumulative)| {
                            let n = cumulative - below;
                            below = cumulative;
                            (bound, n)
                        })
                        .collect();
                    per_bucket.push((f64::INFINITY, h.count - below));
                    series.encode_histogram::<NoLabelSet>(h.sum, h.count, &per_bucket, None)?
                }
            }
        }
        Ok(())
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

/// Families read at one scrape, registered for that scrape's encoding only.
#[derive(Debug)]
struct ReadFamilies(Vec<Family>);

impl Encoded for ReadFamilies {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        self.0.iter().try_for_each(|f| f.encode(&mut encoder))
    }
}

/// Reads figures at scrape time (the cluster's view, from a shared store).
pub trait Collector: Send + Sync {
    /// What is read (`redis`, `postgres`): the `source` label of the scrape-status families.
    fn source(&self) -> &'static str;

    /// The families read now. An error leaves them out of this scrape.
    fn collect(&self) -> BoxFuture<'_, Result<Vec<Family>>>;
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLabels {
    method: &'static str,
    route: String,
    status: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AttemptLabels {
    r#type: &'static str,
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabel {
    source: &'static str,
}

type HistogramSeries<L> = Series<L, Histogram, fn() -> Histogram>;

fn http_histogram() -> Histogram {
    Histogram::new(HTTP_BUCKETS.iter().copied())
}

fn attempt_histogram() -> Histogram {
    Histogram::new(ATTEMPT_BUCKETS.iter().copied())
}

/// Why an enqueue left the deliveries of its new tasks to the relays
/// (`arnela_enqueue_deliveries_left_to_relays_total`, see [`crate::relay::Publisher`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeftToRelays {
    /// Redis unreachable, or the namespace serves another database.
    NamespaceUnavailable,
    /// The namespace has no seeded marker yet: the first relay or rescuer to set it re-publishes
    /// everything in transit, so a delivery pushed before would be pushed twice.
    NotSeeded,
    /// The push after the commit failed; the rows were given back to the relays.
    PushFailed,
}

impl LeftToRelays {
    pub const ALL: [LeftToRelays; 3] = [
        LeftToRelays::NamespaceUnavailable,
        LeftToRelays::NotSeeded,
        LeftToRelays::PushFailed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            LeftToRelays::NamespaceUnavailable => "namespace_unavailable",
            LeftToRelays::NotSeeded => "not_seeded",
            LeftToRelays::PushFailed => "push_failed",
        }
    }
}

/// This process's own families, all registered in [`Inner::registry`].
struct Own {
    http_requests: Series<HttpLabels, Counter>,
    http_latency: HistogramSeries<HttpLabels>,
    relay_batches: Histogram,
    relay_published: Counter,
    enqueue_published: Counter,
    enqueue_left: Series<ReasonLabel, Counter>,
    attempts: Series<AttemptLabels, Counter>,
    attempt_durations: HistogramSeries<AttemptLabels>,
    skipped: Series<ReasonLabel, Counter>,
    source_up: Series<SourceLabel, Gauge>,
    source_errors: Series<SourceLabel, Counter>,
}

/// The names of [`Own`]'s families and the cache families: a family read by a collector under
/// one of these names is left out (a second family of a name would fail the scrape).
const OWN_NAMES: &[&str] = &[
    "arnela_http_requests_total",
    "arnela_http_request_duration_seconds",
    "arnela_relay_batch_rows",
    "arnela_relay_deliveries_published_total",
    "arnela_enqueue_deliveries_published_total",
    "arnela_enqueue_deliveries_left_to_relays_total",
    "arnela_worker_attempts_total",
    "arnela_worker_attempt_duration_seconds",
    "arnela_deliveries_skipped_total",
    "arnela_scrape_source_up",
    "arnela_scrape_errors_total",
    "arnela_cache_hits_total",
    "arnela_cache_misses_total",
    "arnela_cache_errors_total",
    "arnela_cache_load_seconds_total",
    "arnela_cache_loads_total",
];

/// Registers `m` as `name` (the registry ends help texts with a full stop of its own).
fn register<M: Metric + Clone>(registry: &mut Registry, name: &str, help: &str, m: M) -> M {
    registry.register(name, help.strip_suffix('.').unwrap_or(help), m.clone());
    m
}

/// Registers a counter under its full series name, without the `_total` the encoder adds back.
fn counter<M: Metric + Clone>(registry: &mut Registry, name: &'static str, help: &str, m: M) -> M {
    let bare = name
        .strip_suffix("_total")
        .expect("a counter's name ends in _total");
    register(registry, bare, help, m)
}

fn gauge<M: Metric + Clone>(registry: &mut Registry, name: &'static str, help: &str, m: M) -> M {
    register(registry, name, help, m)
}

fn histogram<M: Metric + Clone>(
    registry: &mut Registry,
    name: &'static str,
    help: &str,
    m: M,
) -> M {
    register(registry, name, help, m)
}

impl Own {
    fn register(registry: &mut Registry) -> Own {
        let r = registry;
        let own = Own {
            http_requests: counter(
                r,
                "arnela_http_requests_total",
                "HTTP requests answered, by route template, method and status.",
                Series::default(),
            ),
            http_latency: histogram(
                r,
                "arnela_http_request_duration_seconds",
                "Time to answer an HTTP request (until the response head), by route template, \
                 method and status.",
                Series::new_with_constructor(http_histogram as fn() -> Histogram),
            ),
            relay_batches: histogram(
                r,
                "arnela_relay_batch_rows",
                "Outbox rows claimed per non-empty relay batch in this process.",
                Histogram::new(BATCH_BUCKETS.iter().copied()),
            ),
            relay_published: counter(
                r,
                "arnela_relay_deliveries_published_total",
                "Deliveries this process's relay pushed to the Redis queue.",
                Counter::default(),
            ),
            enqueue_published: counter(
                r,
                "arnela_enqueue_deliveries_published_total",
                "Deliveries this process's API pushed to the Redis queue as soon as their \
                 enqueue committed.",
                Counter::default(),
            ),
            enqueue_left: counter(
                r,
                "arnela_enqueue_deliveries_left_to_relays_total",
                "Tasks due now in enqueue requests that this process's API left to the relays, by \
                 reason: namespace_unavailable (Redis unreachable or serving another database), \
                 not_seeded (no relay or rescuer has seeded the namespace yet), push_failed (the \
                 push after the commit failed; the rows went back to the relays).",
                Series::default(),
            ),
            attempts: counter(
                r,
                "arnela_worker_attempts_total",
                "Attempts this process's workers finished, by task type and outcome.",
                Series::default(),
            ),
            attempt_durations: histogram(
                r,
                "arnela_worker_attempt_duration_seconds",
                "Handler run time of the attempts this process's workers finished, by task \
                 type and outcome.",
                Series::new_with_constructor(attempt_histogram as fn() -> Histogram),
            ),
            skipped: counter(
                r,
                "arnela_deliveries_skipped_total",
                "Deliveries this process's workers and rescuer did not work, by reason \
                 (task_not_found: the task is not in this database, put back on the queue; \
                 type_paused: its type is paused, given back to the outbox).",
                Series::default(),
            ),
            source_up: gauge(
                r,
                "arnela_scrape_source_up",
                "1 if the source answered the last scrape, 0 if its families were left out.",
                Series::default(),
            ),
            source_errors: counter(
                r,
                "arnela_scrape_errors_total",
                "Scrapes whose read of the source failed or timed out.",
                Series::default(),
            ),
        };
        // Every reason shows from the first scrape, at 0 until it happens.
        for reason in SkipReason::ALL {
            let _series = own.skipped.get_or_create(&ReasonLabel {
                reason: reason.as_str(),
            });
        }
        for reason in LeftToRelays::ALL {
            let _series = own.enqueue_left.get_or_create(&ReasonLabel {
                reason: reason.as_str(),
            });
        }
        own
    }
}

/// The counters of the registered caches, summed per key family at encoding time.
#[derive(Debug, Default)]
struct Caches(Mutex<Vec<Arc<CacheStats>>>);

impl Encoded for Caches {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let caches = self.0.lock().expect("metrics caches").clone();
        if caches.is_empty() {
            return Ok(());
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
        [hits, misses, errors, load_time, loads]
            .iter()
            .try_for_each(|f| f.encode(&mut encoder))
    }
}

struct Inner {
    registry: Registry,
    own: Own,
    caches: Arc<Caches>,
    collectors: Mutex<Vec<Arc<dyn Collector>>>,
    /// Sources whose last read failed (their outage is logged once).
    failing: Mutex<HashSet<&'static str>>,
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

impl Metrics {
    /// An empty registry with the default collect timeout.
    pub fn new() -> Metrics {
        Metrics::with_collect_timeout(DEFAULT_COLLECT_TIMEOUT)
    }

    /// An empty registry whose collectors each get `timeout` per scrape.
    pub fn with_collect_timeout(timeout: Duration) -> Metrics {
        let mut registry = Registry::default();
        let own = Own::register(&mut registry);
        let caches = Arc::new(Caches::default());
        registry.register_collector(Box::new(caches.clone()));
        Metrics {
            inner: Arc::new(Inner {
                registry,
                own,
                caches,
                collectors: Mutex::default(),
                failing: Mutex::default(),
                collect_timeout: timeout,
            }),
        }
    }

    /// A registry with the cluster collectors: queue depths and live workers from Redis, the
    /// outbox backlog from Postgres, the queue's oldest delivery age from both, the projected
    /// figures.
    pub fn for_cluster(pool: PgPool, redis: RedisConn, keys: Keys, timeout: Duration) -> Metrics {
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
            .0
            .lock()
            .expect("metrics caches")
            .push(stats);
    }

    /// Records one HTTP request: `method` is a bounded label (see the API's middleware),
    /// `route` the matched route template (`None`, or the empty template of the root nest, when
    /// no route matched).
    pub fn observe_http(
        &self,
        method: &'static str,
        route: Option<&str>,
        status: u16,
        elapsed: Duration,
    ) {
        let labels = HttpLabels {
            method,
            route: route
                .filter(|r| !r.is_empty())
                .unwrap_or("unmatched")
                .to_owned(),
            status,
        };
        let own = &self.inner.own;
        own.http_requests.get_or_create(&labels).inc();
        own.http_latency
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
    }

    /// Records one relay batch that claimed `rows` outbox rows and published `published`
    /// deliveries.
    pub fn observe_relay_batch(&self, rows: usize, published: usize) {
        let own = &self.inner.own;
        own.relay_batches.observe(rows as f64);
        own.relay_published.inc_by(published as u64);
    }

    /// Counts deliveries the API pushed right after their enqueue committed.
    pub fn observe_enqueue_published(&self, n: usize) {
        self.inner.own.enqueue_published.inc_by(n as u64);
    }

    /// Counts deliveries of new tasks the API left to the relays, for `reason`.
    pub fn observe_enqueue_left_to_relays(&self, reason: LeftToRelays, n: usize) {
        self.inner
            .own
            .enqueue_left
            .get_or_create(&ReasonLabel {
                reason: reason.as_str(),
            })
            .inc_by(n as u64);
    }

    /// Records one finished attempt. `outcome` is one of a fixed set (`succeeded`, `retrying`,
    /// `dead_lettered`, `released`, `fenced`, `cancelled`).
    pub fn observe_attempt(&self, task_type: TaskType, outcome: &'static str, elapsed: Duration) {
        let labels = AttemptLabels {
            r#type: task_type.as_str(),
            outcome,
        };
        let own = &self.inner.own;
        own.attempts.get_or_create(&labels).inc();
        own.attempt_durations
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
    }

    /// Counts `n` deliveries left on the queue for `reason`.
    pub fn observe_skipped(&self, reason: SkipReason, n: u64) {
        self.inner
            .own
            .skipped
            .get_or_create(&ReasonLabel {
                reason: reason.as_str(),
            })
            .inc_by(n);
    }

    /// Runs every collector (concurrently, each within the collect timeout) and encodes the
    /// scrape with their families. Never fails: a collector's failure is counted and logged.
    pub async fn scrape(&self, format: Format) -> String {
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
        self.render(format, extra)
    }

    fn source_answered(&self, source: &'static str) {
        if self
            .inner
            .failing
            .lock()
            .expect("metrics sources")
            .remove(source)
        {
            tracing::info!(source, "metrics: the source answers again");
        }
        self.inner
            .own
            .source_up
            .get_or_create(&SourceLabel { source })
            .set(1);
        // A source that never failed shows 0 errors.
        let _series = self
            .inner
            .own
            .source_errors
            .get_or_create(&SourceLabel { source });
    }

    fn source_failed(&self, source: &'static str, error: &MetricsError) {
        if self
            .inner
            .failing
            .lock()
            .expect("metrics sources")
            .insert(source)
        {
            tracing::warn!(source, error = %error, "metrics: cannot read the source; its families are left out of scrapes until it answers");
        }
        let own = &self.inner.own;
        own.source_up.get_or_create(&SourceLabel { source }).set(0);
        own.source_errors
            .get_or_create(&SourceLabel { source })
            .inc();
    }

    /// The scrape without running collectors: this process's families, then `extra`. A family
    /// of `extra` that is invalid or repeats a name already encoded is left out (and logged).
    pub fn render(&self, format: Format, extra: Vec<Family>) -> String {
        let mut seen: HashSet<String> = OWN_NAMES.iter().map(|n| (*n).to_owned()).collect();
        let extra: Vec<Family> = extra
            .into_iter()
            .filter(|family| {
                if let Some(problem) = family.problem() {
                    tracing::error!(family = %family.name, problem, "metrics: family left out");
                    return false;
                }
                if !seen.insert(family.name.clone()) {
                    tracing::error!(family = %family.name, "metrics: a second family of the same name left out");
                    return false;
                }
                true
            })
            .collect();
        let mut read = Registry::default();
        read.register_collector(Box::new(ReadFamilies(extra)));
        let mut out = String::new();
        let encoded = match format {
            Format::Prometheus => {
                use prometheus_client::encoding::prometheus_text::encode;
                encode(&mut out, &self.inner.registry).and_then(|()| encode(&mut out, &read))
            }
            Format::OpenMetrics => {
                use prometheus_client::encoding::text::{encode_eof, encode_registry};
                encode_registry(&mut out, &self.inner.registry)
                    .and_then(|()| encode_registry(&mut out, &read))
                    .and_then(|()| encode_eof(&mut out))
            }
        };
        // Writing to a String cannot fail, and every family was checked above.
        encoded.expect("encoding a scrape into a String");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The lines of `family` (its HELP, TYPE and series).
    fn lines_of(text: &str, family: &str) -> Vec<String> {
        text.lines()
            .filter(|l| {
                l.strip_prefix("# HELP ")
                    .or_else(|| l.strip_prefix("# TYPE "))
                    .unwrap_or(l)
                    .starts_with(family)
            })
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn a_read_histogram_encodes_cumulative_buckets_sum_and_count() {
        let text = Metrics::new().render(
            Format::Prometheus,
            vec![Family::histogram("x_seconds", "X.").with_histogram(
                &[("a", "b")],
                HistogramValue {
                    buckets: vec![(0.1, 1), (1.0, 3)],
                    count: 4,
                    sum: 4.25,
                },
            )],
        );
        assert_eq!(
            lines_of(&text, "x_seconds"),
            [
                "# HELP x_seconds X.",
                "# TYPE x_seconds histogram",
                "x_seconds_bucket{a=\"b\",le=\"0.1\"} 1",
                "x_seconds_bucket{a=\"b\",le=\"1\"} 3",
                "x_seconds_bucket{a=\"b\",le=\"+Inf\"} 4",
                "x_seconds_sum{a=\"b\"} 4.25",
                "x_seconds_count{a=\"b\"} 4",
            ]
        );
    }

    #[test]
    fn own_histograms_count_each_observation_in_its_bucket() {
        let m = Metrics::new();
        for ms in [3, 7, 7, 400] {
            m.observe_attempt(TaskType::SendSms, "succeeded", Duration::from_millis(ms));
        }
        let text = m.render(Format::Prometheus, Vec::new());
        let series = "arnela_worker_attempt_duration_seconds_bucket{type=\"send_sms\",outcome=\"succeeded\",";
        let bucket = |le: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{series}le=\"{le}\"}} ")))
                .unwrap_or_else(|| panic!("no bucket {le} in:\n{text}"))
                .to_owned()
        };
        assert_eq!(bucket("0.005"), "1");
        assert_eq!(bucket("0.01"), "3");
        assert_eq!(bucket("0.25"), "3");
        assert_eq!(bucket("0.5"), "4");
        assert_eq!(bucket("+Inf"), "4");
        assert!(
            text.contains(
                "arnela_worker_attempts_total{type=\"send_sms\",outcome=\"succeeded\"} 4\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn label_values_and_help_are_escaped() {
        let text = Metrics::new().render(
            Format::Prometheus,
            vec![Family::gauge("g", "back\\slash\nnew \"line\"").with(&[("v", "a\"b\\c\nd")], 1.5)],
        );
        assert_eq!(
            lines_of(&text, "g"),
            [
                "# HELP g back\\\\slash\\nnew \"line\"",
                "# TYPE g gauge",
                "g{v=\"a\\\"b\\\\c\\nd\"} 1.5",
            ]
        );
    }

    #[test]
    fn invalid_and_repeated_families_are_left_out() {
        let m = Metrics::new();
        let text = m.render(
            Format::Prometheus,
            vec![
                Family::gauge("bad-name", "x").with(&[], 1.0),
                Family::gauge("ok_gauge", "x").with(&[("1bad", "v")], 1.0),
                Family::counter("arnela_http_requests_total", "again"),
                Family::counter("no_suffix", "x").with(&[], 1.0),
                Family::histogram("h", "x").with(&[], 1.0),
                Family::gauge("fine", "x").with(&[("k", "v")], 2.0),
                Family::gauge("fine", "x").with(&[("k", "w")], 3.0),
                Family::gauge("twice", "x").with(&[], 1.0).with(&[], 2.0),
                Family::histogram("inf", "x").with_histogram(
                    &[],
                    HistogramValue {
                        buckets: vec![(1.0, 1), (f64::INFINITY, 2)],
                        count: 2,
                        sum: 3.0,
                    },
                ),
            ],
        );
        assert!(!text.contains("twice"), "{text}");
        assert!(!text.contains("# TYPE inf "), "{text}");
        assert!(!text.contains("bad-name"), "{text}");
        assert!(!text.contains("ok_gauge"), "{text}");
        assert!(!text.contains("again"), "{text}");
        assert!(!text.contains("no_suffix"), "{text}");
        assert!(!text.contains("# TYPE h "), "{text}");
        assert!(text.contains("fine{k=\"v\"} 2.0\n"), "{text}");
        assert!(!text.contains("fine{k=\"w\"}"), "{text}");
    }

    #[test]
    fn open_metrics_ends_with_eof_and_names_counters_without_total() {
        let m = Metrics::new();
        m.observe_skipped(SkipReason::TaskNotFound, 2);
        let text = m.render(Format::OpenMetrics, Vec::new());
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert!(
            text.contains("# TYPE arnela_deliveries_skipped counter\n"),
            "{text}"
        );
        assert!(
            text.contains("arnela_deliveries_skipped_total{reason=\"task_not_found\"} 2\n"),
            "{text}"
        );
        let plain = m.render(Format::Prometheus, Vec::new());
        assert!(!plain.contains("# EOF"), "{plain}");
        assert!(
            plain.contains("# TYPE arnela_deliveries_skipped_total counter\n"),
            "{plain}"
        );
    }

    #[test]
    fn the_accept_header_picks_the_format() {
        assert_eq!(Format::from_accept(None), Format::Prometheus);
        assert_eq!(
            Format::from_accept(Some("text/plain;version=0.0.4;q=0.5,*/*;q=0.1")),
            Format::Prometheus
        );
        assert_eq!(
            Format::from_accept(Some(
                "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
            )),
            Format::OpenMetrics
        );
    }
}
