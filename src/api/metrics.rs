//! `/metrics`: the Prometheus scrape of this process (see [`crate::metrics`]), and the HTTP
//! middleware that counts the API's requests by route template.

use poem::http::Method;
use poem::PathPattern;
use poem::{Endpoint, IntoResponse, Request, Response};
use poem_openapi::payload::PlainText;
use poem_openapi::{ApiResponse, OpenApi, OperationId, Tags};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use super::auth::{BearerAuth, Denied, Role};
use super::ApiContext;
use crate::metrics::{Format, Metrics};

#[derive(Tags)]
enum ApiTags {
    /// Prometheus metrics for operators.
    Metrics,
}

#[derive(ApiResponse)]
pub enum MetricsResponse {
    /// The scrape in the Prometheus text format 0.0.4. A dependency that cannot be read is left
    /// out (its families are missing, `arnela_scrape_source_up{source}` is 0); the scrape itself
    /// still answers 200.
    #[oai(
        status = 200,
        content_type = "text/plain; version=0.0.4; charset=utf-8"
    )]
    Scrape(PlainText<String>),
}

pub struct MetricsApi {
    pub ctx: ApiContext,
}

#[OpenApi(tag = "ApiTags::Metrics")]
impl MetricsApi {
    /// Prometheus metrics
    ///
    /// This process's HTTP, relay, worker and cache figures, and the cluster's queue depths,
    /// outbox backlog and live workers read at scrape time, and the cluster-wide task totals and
    /// attempt durations projected from the event log. The README lists every family. The
    /// `METRICS_ADDR` listener serves the same scrape without a token.
    ///
    /// Roles: auditor, admin.
    #[oai(path = "/metrics", method = "get", operation_id = "metrics")]
    async fn metrics(&self, auth: BearerAuth) -> Result<MetricsResponse, Denied> {
        auth.require(&[Role::Auditor])?;
        Ok(MetricsResponse::Scrape(PlainText(
            self.ctx.metrics.scrape(Format::Prometheus).await,
        )))
    }
}

/// The path template of each operation as the spec writes it (`get_task` → `/tasks/{id}`):
/// the `route` label of the API's requests.
pub type Routes = Arc<HashMap<&'static str, String>>;

/// The routes of the served operations.
pub fn routes() -> Routes {
    let mut map = HashMap::new();
    for api in <super::Apis as OpenApi>::meta() {
        for path in api.paths {
            for op in path.operations {
                if let Some(id) = op.operation_id {
                    map.insert(id, path.path.clone());
                }
            }
        }
    }
    Arc::new(map)
}

/// Middleware: records every request's route, method, status and latency. The route is the
/// operation's path template from the spec (`/tasks/{id}`), else the router's pattern (for
/// `/docs`, `/openapi.json`), else `unmatched`. Put it outside the error mapping so the status
/// is the one the client gets.
pub async fn track<E: Endpoint>(
    ep: E,
    req: Request,
    metrics: Metrics,
    routes: Routes,
) -> poem::Result<Response> {
    let method = req.method().clone();
    let started = Instant::now();
    let result = ep.call(req).await.map(IntoResponse::into_response);
    let (operation, pattern, status) = match &result {
        Ok(resp) => (
            resp.data::<OperationId>(),
            resp.data::<PathPattern>(),
            resp.status(),
        ),
        Err(err) => (
            err.data::<OperationId>(),
            err.data::<PathPattern>(),
            err.status(),
        ),
    };
    let route = operation
        .and_then(|id| routes.get(id.0))
        .map(String::as_str)
        .or(pattern.map(|p| &*p.0));
    metrics.observe_http(
        method_label(&method),
        route,
        status.as_u16(),
        started.elapsed(),
    );
    result
}

/// The bounded label of an HTTP method (`other` for extension methods).
fn method_label(method: &Method) -> &'static str {
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

/// A server of `/metrics` alone (the `METRICS_ADDR` listener): no API, no auth; meant for a
/// private network. It answers in OpenMetrics text when the `Accept` header asks for it (as
/// Prometheus does), else in the Prometheus text format 0.0.4.
pub fn standalone(metrics: Metrics) -> impl Endpoint {
    poem::Route::new().at(
        "/metrics",
        poem::get(poem::endpoint::make(move |req: Request| {
            let metrics = metrics.clone();
            let format = Format::from_accept(
                req.headers()
                    .get(poem::http::header::ACCEPT)
                    .and_then(|v| v.to_str().ok()),
            );
            async move {
                let body = metrics.scrape(format).await;
                Response::builder()
                    .content_type(format.content_type())
                    .body(body)
            }
        })),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extension_methods_share_one_label() {
        let odd = Method::from_bytes(b"BREW").unwrap();
        assert_eq!(method_label(&odd), "other");
        assert_eq!(method_label(&Method::PATCH), "PATCH");
    }
}
