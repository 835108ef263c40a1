//! `/metrics`: the scrape parses as Prometheus text, every family has its type, the figures
//! follow requests, the engine and the cache, a scrape without Redis still answers, and
//! `METRICS_ADDR` serves the scrape from any role.

use crate::common;

use arnela::cache::{keys, Cache, Ttl};
use arnela::domain::TaskType;
use arnela::metrics::{
    Family, Format, HistogramValue, Metrics, OutboxCollector, ProjectionCollector,
    QueueAgeCollector, QueueCollector,
};
use arnela::projector::{Projection, Projector};
use arnela::worker::handler::HandlerError;
use arnela::worker::Processed;
use common::engine::{config, engine, Engine, Script};
use common::process::{free_port, redis_server};
use common::{context_with, eventually, get, post, sms};
use openmetrics_parser::prometheus::parse_prometheus;
use openmetrics_parser::{MetricsExposition, PrometheusType, PrometheusValue};
use poem::test::TestClient;
use poem::Endpoint;
use sqlx::PgPool;
use std::sync::Arc;
use std::time::Duration;

type Exposition = MetricsExposition<PrometheusType, PrometheusValue>;

/// The API over the engine's Redis prefix, recording in the engine's registry (with the
/// cluster collectors the application adds).
fn api_over(e: &Engine) -> TestClient<impl Endpoint> {
    let mut ctx = context_with(e.pool.clone(), e.redis.clone(), e.keys.clone());
    e.metrics.add_collector(Arc::new(QueueCollector {
        redis: e.redis.clone(),
        keys: e.keys.clone(),
    }));
    e.metrics.add_collector(Arc::new(QueueAgeCollector {
        redis: e.redis.clone(),
        keys: e.keys.clone(),
        pool: e.pool.clone(),
    }));
    e.metrics.add_collector(Arc::new(OutboxCollector {
        pool: e.pool.clone(),
    }));
    e.metrics.add_collector(Arc::new(ProjectionCollector {
        pool: e.pool.clone(),
    }));
    ctx.metrics = e.metrics.clone();
    common::client_for(ctx)
}

/// Parses a scrape strictly (escaping, histogram structure, one TYPE per family).
fn parse(text: &str) -> Exposition {
    parse_prometheus(text).unwrap_or_else(|e| panic!("not valid Prometheus text ({e}):\n{text}"))
}

/// GETs `/metrics`, checks status and content type, and parses the body.
async fn scrape<E: Endpoint>(c: &TestClient<E>) -> Exposition {
    let resp = c.get("/metrics").send().await;
    resp.assert_status_is_ok();
    resp.assert_content_type("text/plain; version=0.0.4; charset=utf-8");
    parse(&resp.0.into_body().into_string().await.unwrap())
}

/// The value of the series of `family` whose labels include `labels` (counter or gauge), or
/// the observation count of a histogram series.
fn value(exp: &Exposition, family: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let f = exp.families.get(family)?;
    let sample = f.iter_samples().find(|s| {
        let set = s.get_labelset().expect("labels");
        labels
            .iter()
            .all(|(k, v)| set.get_label_value(k) == Some(*v))
    })?;
    Some(match &sample.value {
        PrometheusValue::Counter(c) => c.value.as_f64(),
        PrometheusValue::Gauge(g) => g.as_f64(),
        PrometheusValue::Histogram(h) => h.count.expect("histogram count") as f64,
        other => panic!("unexpected value {other:?}"),
    })
}

fn kind(exp: &Exposition, family: &str) -> PrometheusType {
    exp.families
        .get(family)
        .unwrap_or_else(|| panic!("family {family} is missing"))
        .family_type
        .clone()
}

/// Every label value of every series of `family`.
fn label_values(exp: &Exposition, family: &str, label: &str) -> Vec<String> {
    exp.families
        .get(family)
        .map(|f| {
            f.iter_samples()
                .filter_map(|s| {
                    s.get_labelset()
                        .expect("labels")
                        .get_label_value(label)
                        .map(str::to_owned)
                })
                .collect()
        })
        .unwrap_or_default()
}

#[sqlx::test]
async fn every_family_is_present_with_its_type(pool: PgPool) {
    let e = engine(pool.clone(), Script::answering(vec![]), config(0.0)).await;
    let cache = Cache::new(e.redis.clone(), e.keys.prefix());
    e.metrics.register_cache(cache.stats.clone());
    let c = api_over(&e);
    assert_eq!(post(&c, "/tasks", &sms("hello")).await.0, 201);
    e.relay_once().await;
    assert!(matches!(e.step().await, Processed::Succeeded(_)));
    let loaded: Result<u32, ()> = cache
        .get_or_set(&keys::client(1), Ttl::Short, || async { Ok(1) })
        .await;
    assert_eq!(loaded, Ok(1));

    let exp = scrape(&c).await;
    use PrometheusType::{Counter, Gauge, Histogram};
    for (family, expected) in [
        ("arnela_http_requests_total", Counter),
        ("arnela_http_request_duration_seconds", Histogram),
        ("arnela_relay_batch_rows", Histogram),
        ("arnela_relay_deliveries_published_total", Counter),
        ("arnela_worker_attempts_total", Counter),
        ("arnela_worker_attempt_duration_seconds", Histogram),
        ("arnela_cache_hits_total", Counter),
        ("arnela_cache_misses_total", Counter),
        ("arnela_cache_errors_total", Counter),
        ("arnela_cache_load_seconds_total", Counter),
        ("arnela_cache_loads_total", Counter),
        ("arnela_queue_depth", Gauge),
        ("arnela_workers_live", Gauge),
        ("arnela_queue_oldest_age_seconds", Gauge),
        ("arnela_outbox_backlog", Gauge),
        ("arnela_outbox_oldest_due_age_seconds", Gauge),
        ("arnela_failed_copies_waiting", Gauge),
        ("arnela_scrape_source_up", Gauge),
        ("arnela_scrape_errors_total", Counter),
    ] {
        assert_eq!(kind(&exp, family), expected, "{family}");
        assert!(
            exp.families[family].iter_samples().next().is_some(),
            "{family} has a series"
        );
    }
    for source in ["redis", "queue_age", "postgres"] {
        assert_eq!(
            value(&exp, "arnela_scrape_source_up", &[("source", source)]),
            Some(1.0)
        );
    }
}

#[sqlx::test]
async fn http_requests_are_counted_by_route_template_never_by_raw_path(pool: PgPool) {
    let e = engine(pool.clone(), Script::answering(vec![]), config(0.0)).await;
    let c = api_over(&e);
    let id = uuid::Uuid::new_v4();
    for _ in 0..2 {
        assert_eq!(get(&c, &format!("/tasks/{id}")).await.0, 404);
    }
    assert_eq!(get(&c, "/tasks/not-a-uuid").await.0, 400);
    assert_eq!(get(&c, "/no/such/route").await.0, 404);
    assert_eq!(get(&c, "/health/live").await.0, 200);

    let exp = scrape(&c).await;
    let requests = |route: &str, status: &str| {
        value(
            &exp,
            "arnela_http_requests_total",
            &[("method", "GET"), ("route", route), ("status", status)],
        )
    };
    assert_eq!(requests("/tasks/{id}", "404"), Some(2.0));
    assert_eq!(
        requests("/tasks/{id}", "400"),
        Some(1.0),
        "a bad path parameter still matched the route"
    );
    assert_eq!(requests("unmatched", "404"), Some(1.0));
    assert_eq!(requests("/health/live", "200"), Some(1.0));
    assert_eq!(
        value(
            &exp,
            "arnela_http_request_duration_seconds",
            &[("route", "/tasks/{id}"), ("status", "404")]
        ),
        Some(2.0),
        "the latency histogram counts the same requests"
    );
    let routes = label_values(&exp, "arnela_http_requests_total", "route");
    assert!(
        routes.iter().all(|r| !r.contains(&id.to_string())
            && !r.contains("not-a-uuid")
            && r != "/no/such/route"),
        "{routes:?}"
    );

    // the scrape itself is counted by the next one
    let exp = scrape(&c).await;
    assert_eq!(
        value(
            &exp,
            "arnela_http_requests_total",
            &[("route", "/metrics"), ("status", "200")]
        ),
        Some(1.0)
    );
}

#[sqlx::test]
async fn attempts_relay_batches_and_queue_depths_follow_the_engine(pool: PgPool) {
    let script = Script::answering(vec![Err(HandlerError::retryable("provider said 503"))]);
    let e = engine(pool.clone(), script, config(0.0)).await;
    let c = api_over(&e);
    common::enqueue_tasks(&pool, TaskType::SendSms, 3, 3).await;

    let exp = scrape(&c).await;
    assert_eq!(value(&exp, "arnela_outbox_backlog", &[]), Some(3.0));
    assert!(value(&exp, "arnela_outbox_oldest_due_age_seconds", &[]).unwrap() >= 0.0);
    assert_eq!(value(&exp, "arnela_failed_copies_waiting", &[]), Some(0.0));
    assert_eq!(value(&exp, "arnela_relay_batch_rows", &[]), Some(0.0));
    assert_eq!(
        value(&exp, "arnela_queue_depth", &[("list", "tasks")]),
        Some(0.0)
    );

    assert_eq!(e.relay_once().await, 3);
    let exp = scrape(&c).await;
    assert_eq!(value(&exp, "arnela_outbox_backlog", &[]), Some(0.0));
    assert_eq!(value(&exp, "arnela_relay_batch_rows", &[]), Some(1.0));
    assert_eq!(
        value(&exp, "arnela_relay_deliveries_published_total", &[]),
        Some(3.0)
    );
    assert_eq!(
        value(&exp, "arnela_queue_depth", &[("list", "tasks")]),
        Some(3.0),
        "the gauge reads Redis"
    );

    for _ in 0..3 {
        e.step().await;
    }
    let exp = scrape(&c).await;
    let attempts = |outcome: &str| {
        value(
            &exp,
            "arnela_worker_attempts_total",
            &[("type", "send_sms"), ("outcome", outcome)],
        )
    };
    assert_eq!(attempts("retrying"), Some(1.0));
    assert_eq!(attempts("succeeded"), Some(2.0));
    assert_eq!(
        value(
            &exp,
            "arnela_worker_attempt_duration_seconds",
            &[("type", "send_sms"), ("outcome", "succeeded")]
        ),
        Some(2.0)
    );
    for list in ["tasks", "processing", "failed"] {
        assert_eq!(
            value(&exp, "arnela_queue_depth", &[("list", list)]),
            Some(0.0),
            "{list}"
        );
    }
    assert_eq!(
        value(&exp, "arnela_outbox_backlog", &[]),
        Some(1.0),
        "the retry (due at once: no jitter) waits in the outbox for the relay"
    );
}

#[sqlx::test]
async fn queue_age_is_the_age_of_the_oldest_waiting_delivery_since_it_was_published(pool: PgPool) {
    let e = engine(pool.clone(), Script::answering(vec![]), config(0.0)).await;
    let c = api_over(&e);
    let age = |exp: &Exposition| value(exp, "arnela_queue_oldest_age_seconds", &[]);
    let queue_age_up =
        |exp: &Exposition| value(exp, "arnela_scrape_source_up", &[("source", "queue_age")]);

    let exp = scrape(&c).await;
    assert_eq!(age(&exp), Some(0.0), "an empty queue reads 0");

    // two deliveries on the queue: the one workers take next (the right end) published 90 s
    // ago, the other 10 s ago
    let ids = common::enqueue_tasks(&pool, TaskType::SendSms, 2, 3).await;
    assert_eq!(e.relay_once().await, 2);
    let mut conn = e.redis.clone();
    let next: String = redis::cmd("LINDEX")
        .arg(e.keys.tasks())
        .arg(-1)
        .query_async(&mut conn)
        .await
        .unwrap();
    let next = arnela::queue::Delivery::decode(&next).unwrap().task_id;
    let other = *ids.iter().find(|id| **id != next).unwrap();
    for (id, ago) in [(next, 90), (other, 10)] {
        sqlx::query(
            "UPDATE outbox SET published_at = now() - make_interval(secs => $2) \
             WHERE task_id = $1 AND published_at IS NOT NULL",
        )
        .bind(id)
        .bind(f64::from(ago))
        .execute(&pool)
        .await
        .unwrap();
    }
    let exp = scrape(&c).await;
    let oldest = age(&exp).expect("the family is present");
    assert!((90.0..200.0).contains(&oldest), "oldest age {oldest}");
    assert_eq!(queue_age_up(&exp), Some(1.0));

    // an entry that does not decode at the right end reads 0 without failing the source
    let _: () = redis::cmd("RPUSH")
        .arg(e.keys.tasks())
        .arg("not a delivery")
        .query_async(&mut conn)
        .await
        .unwrap();
    let exp = scrape(&c).await;
    assert_eq!(age(&exp), Some(0.0));
    assert_eq!(queue_age_up(&exp), Some(1.0));
    let _: Option<String> = redis::cmd("RPOP")
        .arg(e.keys.tasks())
        .query_async(&mut conn)
        .await
        .unwrap();

    // the worker takes the oldest: the other one is now the oldest
    assert!(matches!(e.step().await, Processed::Succeeded(_)));
    let exp = scrape(&c).await;
    let oldest = age(&exp).unwrap();
    assert!((10.0..90.0).contains(&oldest), "oldest age {oldest}");

    assert!(matches!(e.step().await, Processed::Succeeded(_)));
    let exp = scrape(&c).await;
    assert_eq!(age(&exp), Some(0.0), "the queue is empty again");
    assert_eq!(
        value(&exp, "arnela_queue_depth", &[("list", "tasks")]),
        Some(0.0)
    );
}

#[sqlx::test]
async fn cache_hits_misses_and_loads_are_counted_per_key_family(pool: PgPool) {
    let e = engine(pool.clone(), Script::answering(vec![]), config(0.0)).await;
    let cache = Cache::new(e.redis.clone(), e.keys.prefix());
    e.metrics.register_cache(cache.stats.clone());
    let c = api_over(&e);
    for _ in 0..3 {
        let v: Result<String, ()> = cache
            .get_or_set(&keys::client(7), Ttl::Short, || async { Ok("Ana".into()) })
            .await;
        assert_eq!(v.unwrap(), "Ana");
    }
    let v: Result<u32, ()> = cache
        .get_or_set(&keys::dashboard_stats(), Ttl::Short, || async { Ok(5) })
        .await;
    assert_eq!(v, Ok(5));

    let exp = scrape(&c).await;
    let count = |family: &str, key_family: &str| value(&exp, family, &[("family", key_family)]);
    assert_eq!(count("arnela_cache_misses_total", "client"), Some(1.0));
    assert_eq!(count("arnela_cache_hits_total", "client"), Some(2.0));
    assert_eq!(count("arnela_cache_errors_total", "client"), Some(0.0));
    assert_eq!(
        count("arnela_cache_misses_total", "stats:dashboard"),
        Some(1.0)
    );
    assert!(count("arnela_cache_load_seconds_total", "client").unwrap() >= 0.0);
    assert_eq!(value(&exp, "arnela_cache_loads_total", &[]), Some(2.0));
    assert!(
        label_values(&exp, "arnela_cache_hits_total", "family")
            .iter()
            .all(|f| !f.contains('7')),
        "key families, never keys"
    );
}

#[sqlx::test]
async fn a_scrape_without_redis_still_answers_with_the_postgres_families(pool: PgPool) {
    let port = free_port();
    let mut own = redis_server(port);
    let url = format!("redis://127.0.0.1:{port}");
    let redis = eventually(Duration::from_secs(10), "own redis", || {
        let info = redis::IntoConnectionInfo::into_connection_info(url.as_str()).unwrap();
        async move { arnela::queue::connect(info).await.ok() }
    })
    .await;
    let keys = arnela::queue::Keys::new(common::unique_prefix());
    let c = common::client_for(context_with(pool.clone(), redis, keys));
    let exp = scrape(&c).await;
    assert_eq!(value(&exp, "arnela_workers_live", &[]), Some(0.0));

    own.kill9();
    for scrapes in 1..=2 {
        let exp = scrape(&c).await;
        assert_eq!(value(&exp, "arnela_outbox_backlog", &[]), Some(0.0));
        assert!(
            !exp.families.contains_key("arnela_queue_depth")
                && !exp.families.contains_key("arnela_workers_live")
                && !exp.families.contains_key("arnela_queue_oldest_age_seconds"),
            "the Redis families are left out, not reported as 0"
        );
        assert_eq!(
            value(&exp, "arnela_scrape_source_up", &[("source", "redis")]),
            Some(0.0)
        );
        assert_eq!(
            value(&exp, "arnela_scrape_source_up", &[("source", "postgres")]),
            Some(1.0)
        );
        assert_eq!(
            value(&exp, "arnela_scrape_errors_total", &[("source", "redis")]),
            Some(f64::from(scrapes))
        );
    }
}

#[test]
fn extra_families_render_with_escaped_labels_and_valid_histograms() {
    let metrics = Metrics::new();
    let awkward = "quote \" backslash \\ newline \n end";
    let text = metrics.render(
        Format::Prometheus,
        vec![
            Family::counter("arnela_tasks_succeeded_total", "Tasks that succeeded.")
                .with(&[("type", "send_sms")], 5.0)
                .with(&[("type", awkward)], 1.0),
            Family::histogram(
                "arnela_task_attempt_seconds",
                "Attempt durations from events,\nprojected.",
            )
            .with_histogram(
                &[("type", "send_email")],
                HistogramValue {
                    buckets: vec![(0.5, 2), (1.0, 3)],
                    count: 4,
                    sum: 3.25,
                },
            ),
        ],
    );
    let exp = parse(&text);
    assert_eq!(
        value(&exp, "arnela_tasks_succeeded_total", &[("type", awkward)]),
        Some(1.0),
        "the label value reads back as written:\n{text}"
    );
    assert_eq!(
        value(
            &exp,
            "arnela_tasks_succeeded_total",
            &[("type", "send_sms")]
        ),
        Some(5.0)
    );
    let h = exp.families["arnela_task_attempt_seconds"]
        .iter_samples()
        .next()
        .unwrap()
        .value
        .clone();
    let PrometheusValue::Histogram(h) = h else {
        panic!("not a histogram: {h:?}")
    };
    assert_eq!(h.count, Some(4));
    assert_eq!(h.sum.map(|s| s.as_f64()), Some(3.25));
    let buckets: Vec<(f64, f64)> = h
        .buckets
        .iter()
        .map(|b| (b.upper_bound, b.count.as_f64()))
        .collect();
    assert_eq!(buckets, [(0.5, 2.0), (1.0, 3.0), (f64::INFINITY, 4.0)]);
    assert_eq!(
        exp.families["arnela_task_attempt_seconds"].help,
        "Attempt durations from events,\nprojected."
    );
}

#[sqlx::test]
async fn metrics_addr_serves_the_scrape_from_a_worker_only_process(pool: PgPool) {
    let port = free_port();
    let prefix = common::unique_prefix();
    let vars = [
        ("METRICS_ADDR", format!("127.0.0.1:{port}")),
        ("REDIS_URL", common::redis_url()),
        ("ARNELA_KEY_PREFIX", prefix),
        ("WORKERS", "2".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let settings = arnela::config::Settings::from_vars(&vars).unwrap();
    let app = Arc::new(arnela::app::App::from_parts(
        settings,
        pool,
        common::redis().await,
    ));
    let roles = arnela::app::Roles {
        api: false,
        relay: false,
        workers: true,
    };
    let running = {
        let app = app.clone();
        tokio::spawn(async move { app.run(roles, "127.0.0.1:0".parse().unwrap()).await })
    };

    let url = format!("http://127.0.0.1:{port}/metrics");
    let http = reqwest::Client::new();
    let (content_type, exp) = eventually(
        Duration::from_secs(10),
        "the metrics listener to report the workers",
        || {
            let req = http.get(&url);
            async move {
                let resp = req.send().await.ok()?;
                assert_eq!(resp.status(), 200);
                let ct = resp.headers()["content-type"].to_str().unwrap().to_owned();
                let exp = parse(&resp.text().await.unwrap());
                (value(&exp, "arnela_workers_live", &[]) == Some(2.0)).then_some((ct, exp))
            }
        },
    )
    .await;
    assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");
    assert_eq!(
        kind(&exp, "arnela_deliveries_skipped_total"),
        PrometheusType::Counter
    );

    // Prometheus's own Accept header gets OpenMetrics text, which parses as such.
    let resp = http
        .get(&url)
        .header(
            "accept",
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.headers()["content-type"],
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    let text = resp.text().await.unwrap();
    assert!(text.ends_with("# EOF\n"), "{text}");
    let open = openmetrics_parser::openmetrics::parse_openmetrics(&text)
        .unwrap_or_else(|e| panic!("not valid OpenMetrics ({e}):\n{text}"));
    let workers = open.families["arnela_workers_live"]
        .iter_samples()
        .next()
        .map(|s| s.value.clone());
    assert!(
        matches!(workers, Some(openmetrics_parser::OpenMetricsValue::Gauge(g)) if g.as_f64() == 2.0),
        "{workers:?}"
    );
    assert!(
        open.families.contains_key("arnela_deliveries_skipped"),
        "counters are named without _total in OpenMetrics:\n{text}"
    );

    let other = http
        .get(format!("http://127.0.0.1:{port}/tasks"))
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 404, "the listener serves /metrics only");

    app.shutdown.cancel();
    running.await.unwrap().unwrap();
}

#[sqlx::test]
async fn task_totals_and_durations_projected_from_the_log_follow_the_tasks(pool: PgPool) {
    // one permanent failure (dead letter), then successes
    let e = engine(
        pool.clone(),
        Script::answering(vec![Err(HandlerError::permanent("no such number"))]),
        config(0.0),
    )
    .await;
    let c = api_over(&e);
    let before = scrape(&c).await;
    assert_eq!(
        value(
            &before,
            "arnela_tasks_enqueued_total",
            &[("type", "send_sms")]
        ),
        None
    );
    common::enqueue_tasks(&pool, TaskType::SendSms, 5, 3).await;
    let mut finished = 0;
    while finished < 5 {
        e.relay_once().await;
        if matches!(
            e.step().await,
            Processed::Succeeded(_) | Processed::DeadLettered(_)
        ) {
            finished += 1;
        }
    }
    let totals = Projector::new(pool.clone(), Projection::Totals);
    let last: i64 = sqlx::query_scalar("SELECT max(position) FROM task_events")
        .fetch_one(&pool)
        .await
        .unwrap();
    eventually(
        Duration::from_secs(30),
        "the totals to be projected",
        || {
            let totals = &totals;
            async move { (totals.run_once().await.unwrap().position >= last).then_some(()) }
        },
    )
    .await;

    let exp = scrape(&c).await;
    let sms = [("type", "send_sms")];
    use PrometheusType::{Counter, Gauge, Histogram};
    for (family, expected) in [
        ("arnela_tasks_enqueued_total", Counter),
        ("arnela_tasks_succeeded_total", Counter),
        ("arnela_tasks_dead_total", Counter),
        ("arnela_task_attempts_failed_total", Counter),
        ("arnela_task_attempt_duration_seconds", Histogram),
        ("arnela_projector_lag_seconds", Gauge),
        ("arnela_projector_events_total", Counter),
    ] {
        assert_eq!(kind(&exp, family), expected, "{family}");
    }
    assert_eq!(value(&exp, "arnela_tasks_enqueued_total", &sms), Some(5.0));
    assert_eq!(value(&exp, "arnela_tasks_succeeded_total", &sms), Some(4.0));
    assert_eq!(value(&exp, "arnela_tasks_dead_total", &sms), Some(1.0));
    assert_eq!(
        value(&exp, "arnela_task_attempts_failed_total", &sms),
        Some(1.0)
    );
    let observed = |outcome: &str| {
        value(
            &exp,
            "arnela_task_attempt_duration_seconds",
            &[("type", "send_sms"), ("outcome", outcome)],
        )
    };
    assert_eq!(observed("succeeded"), Some(4.0));
    assert_eq!(observed("failed"), Some(1.0));
    assert_eq!(
        value(
            &exp,
            "arnela_projector_lag_seconds",
            &[("projector", "totals")]
        ),
        Some(0.0)
    );
    assert_eq!(
        value(
            &exp,
            "arnela_scrape_source_up",
            &[("source", "projections")]
        ),
        Some(1.0)
    );
}
