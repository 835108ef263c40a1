//! The HTTP API (poem-openapi): one API struct per resource, one response enum per operation,
//! errors mapped in [`error`], access control in [`auth`]. Swagger UI is served at `/docs`, the
//! spec at `/openapi.json`, the Prometheus scrape at `/metrics` ([`metrics`]), the operator
//! console at `/ui` ([`ui`]).

pub mod auth;
pub mod contract;
pub mod error;
pub mod events;
pub mod health;
pub mod limits;
pub mod metrics;
pub mod model;
pub mod operations;
pub mod schedules;
pub mod spec;
pub mod stats;
pub mod tasks;
pub mod ui;

use crate::queue::RedisConn;
use poem::middleware::Tracing;
use poem::{Endpoint, EndpointExt, Route};
use poem_openapi::OpenApiService;
use sqlx::PgPool;
use std::time::Duration;

use crate::queue::Keys;

/// What the operations need.
#[derive(Clone)]
pub struct ApiContext {
    pub pool: PgPool,
    /// Where the audit reads go: the primary, or a standby ([`crate::store::replica`]).
    pub reads: crate::store::replica::Reads,
    pub redis: RedisConn,
    pub keys: Keys,
    pub health_timeout: Duration,
    /// Connections, requests in flight, body size and body read time (see [`limits`]).
    pub limits: limits::HttpLimits,
    /// How far ahead a task's `run_at` may be.
    pub schedule_horizon: chrono::Duration,
    /// The delivery channel of each task type (`log` where none is configured), for `/health`.
    pub channels: std::collections::BTreeMap<String, String>,
    /// Wakes the relays after an enqueue commits.
    pub waker: crate::store::outbox::OutboxWaker,
    /// Publishes the deliveries of new tasks due now, after their enqueue commits.
    pub publisher: crate::relay::Publisher,
    /// Hot reads (a task's state, the statistics), invalidated by the projector.
    pub cache: crate::cache::Cache,
    /// Verifies the bearer tokens.
    pub auth: auth::Auth,
    /// This application's metrics registry (shared with its relay, workers and caches).
    pub metrics: crate::metrics::Metrics,
    /// Seals personal fields of new tasks and opens them on reads (`AUDIT_DATA_KEY`).
    pub data_key: Option<std::sync::Arc<crate::domain::sealing::MasterKey>>,
}

impl ApiContext {
    /// Opens the sealed personal fields of tasks before they are shown (see
    /// [`crate::store::data_keys::open_tasks`]).
    pub async fn open_tasks(
        &self,
        tasks: &mut [crate::domain::Task],
    ) -> Result<(), crate::store::StoreError> {
        let mut conn = self.pool.acquire().await?;
        crate::store::data_keys::open_tasks(&mut conn, self.data_key.as_deref(), tasks).await
    }

    /// [`ApiContext::open_tasks`] for one task.
    pub async fn open_task(
        &self,
        task: crate::domain::Task,
    ) -> Result<crate::domain::Task, crate::store::StoreError> {
        let mut tasks = [task];
        self.open_tasks(&mut tasks).await?;
        let [task] = tasks;
        Ok(task)
    }

    /// Opens the sealed parts of events before they are shown.
    pub async fn open_events(
        &self,
        events: &mut [crate::store::events::StoredEvent],
    ) -> Result<(), crate::store::StoreError> {
        let mut conn = self.pool.acquire().await?;
        crate::store::data_keys::open_events(&mut conn, self.data_key.as_deref(), events).await
    }
}

type Apis = (
    tasks::TasksApi,
    events::EventsApi,
    stats::StatsApi,
    operations::OperationsApi,
    schedules::SchedulesApi,
    health::HealthApi,
    metrics::MetricsApi,
);

fn service<T: poem_openapi::OpenApi>(apis: T) -> OpenApiService<T, ()> {
    OpenApiService::new(apis, "Arnela task processor", env!("CARGO_PKG_VERSION"))
        .description(
            "Event-sourced task processor with a persistent outbox: enqueue e-mail, SMS, \
             WhatsApp and calendar tasks, and audit every step each task took.",
        )
        .server("/")
}

/// The OpenAPI document the code produces (JSON, pretty-printed); `openapi/openapi.json` holds
/// the committed copy.
pub fn spec_json() -> String {
    spec::refine(&service(SpecOnly).spec())
}

/// The served APIs' description without their handlers: the spec depends on the types only,
/// so it can be produced without connecting to anything.
struct SpecOnly;

impl poem_openapi::OpenApi for SpecOnly {
    fn meta() -> Vec<poem_openapi::registry::MetaApi> {
        <Apis as poem_openapi::OpenApi>::meta()
    }

    fn register(registry: &mut poem_openapi::registry::Registry) {
        <Apis as poem_openapi::OpenApi>::register(registry);
    }

    fn add_routes(
        self,
        _route_table: &mut std::collections::HashMap<
            String,
            std::collections::HashMap<poem::http::Method, poem::endpoint::BoxEndpoint<'static>>,
        >,
    ) {
    }
}

/// The whole HTTP application.
pub fn endpoint(ctx: ApiContext) -> impl Endpoint {
    let limits = ctx.limits.clone();
    let auth = ctx.auth.clone();
    let registry = ctx.metrics.clone();
    let routes = metrics::routes();
    let apis = (
        tasks::TasksApi { ctx: ctx.clone() },
        events::EventsApi { ctx: ctx.clone() },
        stats::StatsApi { ctx: ctx.clone() },
        operations::OperationsApi { ctx: ctx.clone() },
        schedules::SchedulesApi { ctx: ctx.clone() },
        health::HealthApi { ctx: ctx.clone() },
        metrics::MetricsApi { ctx },
    );
    let api = service(apis);
    // Swagger UI embeds the document; it gets the refined one.
    let produced = api.spec();
    let document = spec::refine(&produced);
    let docs = api.swagger_ui_html().replace(&produced, &document);
    Route::new()
        .nest("/", api)
        .nest("/ui", ui::routes())
        .at(
            "/docs",
            poem::endpoint::make_sync(move |_| poem::web::Html(docs.clone())),
        )
        .at(
            "/openapi.json",
            poem::endpoint::make_sync(move |_| {
                poem::Response::builder()
                    .content_type("application/json")
                    .body(document.clone())
            }),
        )
        .data(auth)
        .around(move |ep, req| limits::guard(ep, req, limits.clone()))
        .around(error::json_errors)
        .around(move |ep, req| metrics::track(ep, req, registry.clone(), routes.clone()))
        .with(Tracing)
        .around(crate::telemetry::server_span)
}
