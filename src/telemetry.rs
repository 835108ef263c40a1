//! Logs and traces. Logs go to standard error (text, or JSON with `LOG_FORMAT=json`), filtered
//! by `RUST_LOG`. Traces are exported with OpenTelemetry (OTLP over HTTP) when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set; otherwise no OpenTelemetry layer is installed and no
//! span is exported (the W3C context of each task is still kept, so its trace id is logged).
//!
//! A trace follows a task: the API's server span continues the request's `traceparent` (or
//! starts a trace), the task keeps the context of the enqueue ([`context_for_enqueue`]), every
//! attempt's span is a child of it ([`attempt_span`]), and provider calls are child spans of the
//! attempt that send `traceparent` onwards ([`client_span`], [`inject`]).

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use std::sync::OnceLock;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::domain::TraceContext;

/// The tracer provider while traces are exported.
static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// Whether spans are exported (the OpenTelemetry layer is installed).
pub fn active() -> bool {
    PROVIDER.get().is_some()
}

/// Flushes and stops the exporter when dropped (at the end of `main`).
pub struct Guard(());

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(p) = PROVIDER.get() {
            if let Err(e) = p.shutdown() {
                eprintln!("arnela: cannot flush the last spans: {e}");
            }
        }
    }
}

/// The log and trace variables, read before the settings (so that a settings error is logged).
#[derive(Debug, Clone, clap::Args)]
pub struct TelemetryVars {
    /// log filter (`tracing` directives, e.g. `info,arnela=debug`)
    #[arg(long, env, default_value = "info")]
    pub rust_log: String,
    /// `json` for one JSON object per line; otherwise text
    #[arg(long, env, default_value = "text")]
    pub log_format: String,
    /// export spans over OTLP/HTTP to this collector (see [Tracing](#tracing))
    #[arg(long, env)]
    pub otel_exporter_otlp_endpoint: Option<String>,
    /// `http/protobuf` or `http/json` (read by the OpenTelemetry SDK)
    #[arg(long, env, default_value = "http/protobuf")]
    pub otel_exporter_otlp_protocol: String,
    /// headers of the export requests, `name=value,…` (read by the OpenTelemetry SDK)
    #[arg(long, env)]
    pub otel_exporter_otlp_headers: Option<String>,
    /// the `service.name` of the spans
    #[arg(long, env, default_value = "arnela")]
    pub otel_service_name: String,
    /// milliseconds between span exports (read by the OpenTelemetry SDK)
    #[arg(long, env, default_value_t = 5000)]
    pub otel_bsp_schedule_delay: u64,
    /// the least level of exported spans, whatever `RUST_LOG` says
    #[arg(long, env, default_value = "info")]
    pub otel_span_level: String,
}

/// Installs the log output and, with `OTEL_EXPORTER_OTLP_ENDPOINT` set, the span exporter.
/// `RUST_LOG` filters the log lines only; the exporter takes spans at `info` and above
/// (`OTEL_SPAN_LEVEL` to change it), whatever the log level.
pub fn init(vars: &TelemetryVars) -> Guard {
    let filter = EnvFilter::try_new(&vars.rust_log).unwrap_or_else(|_| EnvFilter::new("info"));
    let json = vars.log_format == "json";
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = if json {
        fmt.json().with_filter(filter).boxed()
    } else {
        fmt.with_filter(filter).boxed()
    };
    let mut problem = None;
    let otel = vars
        .otel_exporter_otlp_endpoint
        .as_ref()
        .and_then(|_| match exporter(vars) {
            Ok(provider) => {
                let tracer = provider.tracer("arnela");
                opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
                let layer = tracing_opentelemetry::layer()
                    .with_tracer(tracer)
                    .with_filter(EnvFilter::new(&vars.otel_span_level));
                PROVIDER.set(provider).ok();
                Some(layer)
            }
            Err(e) => {
                problem = Some(e);
                None
            }
        });
    tracing_subscriber::registry().with(fmt).with(otel).init();
    if let Some(e) = problem {
        tracing::error!(error = %e, "cannot export traces (OTEL_EXPORTER_OTLP_ENDPOINT); running without");
    } else if active() {
        tracing::info!("exporting traces over OTLP");
    }
    Guard(())
}

fn exporter(vars: &TelemetryVars) -> anyhow::Result<SdkTracerProvider> {
    // The endpoint, protocol (`http/protobuf` or `http/json`), headers and timeout come from the
    // standard OTEL_EXPORTER_OTLP_* variables; the batch sizes and delay from OTEL_BSP_*.
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()?;
    let service = vars.otel_service_name.clone();
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service)
        .build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}

/// The trace context a task enqueued now keeps: while spans are exported, the current span's (a
/// child of the request's `traceparent`, or the root of a new trace, see [`server_span`]);
/// otherwise the request's own valid `traceparent`, or none (nothing is recorded, so nothing
/// is kept: no cost when tracing is off).
pub fn context_for_enqueue(
    traceparent: Option<&str>,
    tracestate: Option<&str>,
) -> Option<TraceContext> {
    let incoming = traceparent.and_then(|t| TraceContext::parse(t, tracestate));
    if active() {
        let cx = Span::current().context();
        let span = cx.span();
        let sc = span.span_context();
        if sc.is_valid() {
            let state = incoming.and_then(|i| i.tracestate);
            return Some(TraceContext::from_ids(
                u128::from_be_bytes(sc.trace_id().to_bytes()),
                u64::from_be_bytes(sc.span_id().to_bytes()),
                sc.is_sampled(),
                state,
            ));
        }
    }
    incoming
}

/// The trace context of a task no request enqueued (a schedule's slot): a new trace while spans
/// are exported, none otherwise.
pub fn context_for_new_trace() -> Option<TraceContext> {
    active().then(TraceContext::new_root)
}

/// The span of one attempt: its log lines carry the task, the attempt and the trace id, and
/// while spans are exported it is a child of the span that enqueued the task.
pub fn attempt_span(
    task_id: crate::domain::TaskId,
    task_type: crate::domain::TaskType,
    attempt: i32,
    trace: Option<&TraceContext>,
) -> Span {
    let span = tracing::info_span!(
        "attempt",
        otel.name = %format_args!("attempt {task_type}"),
        task.id = %task_id,
        task.r#type = %task_type,
        attempt,
        trace_id = trace.map_or("", TraceContext::trace_id),
    );
    if let (true, Some(t)) = (active(), trace) {
        let parent = TraceContextPropagator::new().extract(&Carrier(t));
        // the span is new: setting its parent cannot fail for having started
        span.set_parent(parent).ok();
    }
    span
}

/// A span for one call to a provider (`twilio`, `sendgrid`, `google_calendar`, `smtp`), a child
/// of the current attempt.
pub fn client_span(provider: &'static str, operation: &'static str) -> Span {
    tracing::info_span!(
        "provider call",
        otel.name = %format_args!("{provider} {operation}"),
        otel.kind = "client",
        provider,
    )
}

/// Adds `traceparent` (and `tracestate`) of the current span to an outgoing request, while
/// spans are exported.
pub fn inject(headers: &mut reqwest::header::HeaderMap) {
    if !active() {
        return;
    }
    let cx = Span::current().context();
    TraceContextPropagator::new().inject_context(&cx, &mut HeaderInjector(headers));
}

/// `request` with the current span's `traceparent` (see [`inject`]).
pub fn traced(request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
    if !active() {
        return request;
    }
    let mut headers = reqwest::header::HeaderMap::new();
    inject(&mut headers);
    request.headers(headers)
}

/// Middleware: while spans are exported, every request runs in a server span whose parent is
/// the request's `traceparent` (if valid). Costs nothing otherwise.
pub async fn server_span<E: poem::Endpoint>(
    ep: E,
    req: poem::Request,
) -> poem::Result<poem::Response> {
    use poem::IntoResponse;
    use tracing::Instrument;
    if !active() {
        return ep.call(req).await.map(IntoResponse::into_response);
    }
    let parent = TraceContextPropagator::new().extract(&RequestHeaders(req.headers()));
    let span = tracing::info_span!(
        "HTTP request",
        otel.name = %format_args!("{} {}", req.method(), req.uri().path()),
        otel.kind = "server",
        http.request.method = %req.method(),
        url.path = %req.uri().path(),
        http.response.status_code = tracing::field::Empty,
    );
    span.set_parent(parent).ok();
    let result = ep
        .call(req)
        .instrument(span.clone())
        .await
        .map(IntoResponse::into_response);
    let status = match &result {
        Ok(r) => r.status().as_u16(),
        Err(e) => e.status().as_u16(),
    };
    span.record("http.response.status_code", status);
    result
}

struct Carrier<'a>(&'a TraceContext);

impl Extractor for Carrier<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            "traceparent" => Some(&self.0.traceparent),
            "tracestate" => self.0.tracestate.as_deref(),
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        vec!["traceparent", "tracestate"]
    }
}

struct RequestHeaders<'a>(&'a poem::http::HeaderMap);

impl Extractor for RequestHeaders<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

struct HeaderInjector<'a>(&'a mut reqwest::header::HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            reqwest::header::HeaderName::from_bytes(key.as_bytes()),
            reqwest::header::HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}
