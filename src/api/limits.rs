//! The limits that hold before any operation runs, so no client can make the service hold
//! memory or tasks it has not authorised:
//!
//! - **connections**: at most `HTTP_MAX_CONNECTIONS` open at once; the next one is accepted when
//!   one closes (the kernel's backlog holds it meanwhile), see [`LimitedAcceptor`];
//! - **requests in flight**: at most `HTTP_MAX_IN_FLIGHT` operations run at once; the next gets
//!   503 `overloaded` with `Retry-After` at once (the health reports and `/metrics` are not
//!   counted, so an overloaded instance still answers its orchestrator and its operators);
//! - **body memory**: the bodies being read by all requests together hold at most
//!   `HTTP_BODY_BUDGET_MB`; a request whose body would pass it gets 503 `overloaded` (one
//!   producer with many large requests cannot make the service hold gigabytes);
//! - **bodies**: never read ahead. A body is read only by the operation that takes one, after
//!   routing and after the bearer token is checked; a request whose announced `Content-Length`
//!   is over `MAX_BODY_BYTES` is refused with 413 at once, a chunked body as soon as it passes;
//!   a body that does not arrive within `HTTP_BODY_TIMEOUT_SECS` is refused with 408;
//! - **idle connections** are closed after `HTTP_IDLE_TIMEOUT_SECS` without a byte.
//!
//! `/metrics` shows the open connections, the requests in flight, both limits and the refusals
//! by reason.

use futures::StreamExt;
use poem::http::StatusCode;
use poem::listener::Acceptor;
use poem::web::Json;
use poem::web::{LocalAddr, RemoteAddr};
use poem::{Body, Endpoint, IntoResponse, Request, Response};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::error::{ErrorBody, ErrorCode, RETRY_AFTER_SECS};
use crate::metrics::{Collector, Family};

/// Paths outside the in-flight limit: what an orchestrator or a scraper must always reach.
const UNLIMITED: [&str; 4] = ["/health/live", "/health/ready", "/health", "/metrics"];

/// The HTTP limits of one listener and their counters. Clones share them.
#[derive(Clone)]
pub struct HttpLimits {
    inner: Arc<Inner>,
}

struct Inner {
    max_connections: usize,
    connections: Arc<Semaphore>,
    open: AtomicUsize,
    max_in_flight: usize,
    in_flight: Arc<Semaphore>,
    max_body: usize,
    body_timeout: Duration,
    /// KiB of request bodies held at once, by every request together.
    body_budget: Arc<Semaphore>,
    body_budget_kib: usize,
    refused_overloaded: AtomicU64,
    refused_too_large: AtomicU64,
    refused_timeout: AtomicU64,
}

impl std::fmt::Debug for HttpLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpLimits")
            .field("max_connections", &self.inner.max_connections)
            .field("max_in_flight", &self.inner.max_in_flight)
            .field("max_body", &self.inner.max_body)
            .field("body_timeout", &self.inner.body_timeout)
            .finish()
    }
}

impl HttpLimits {
    pub fn new(
        max_connections: usize,
        max_in_flight: usize,
        max_body: usize,
        body_timeout: Duration,
    ) -> HttpLimits {
        HttpLimits::with_body_budget(
            max_connections,
            max_in_flight,
            max_body,
            body_timeout,
            DEFAULT_BODY_BUDGET,
        )
    }

    /// Limits with `body_budget` bytes for the bodies of all requests together.
    pub fn with_body_budget(
        max_connections: usize,
        max_in_flight: usize,
        max_body: usize,
        body_timeout: Duration,
        body_budget: usize,
    ) -> HttpLimits {
        let body_budget_kib = body_budget.div_ceil(1024).max(1);
        HttpLimits {
            inner: Arc::new(Inner {
                body_budget: Arc::new(Semaphore::new(body_budget_kib)),
                body_budget_kib,
                max_connections,
                connections: Arc::new(Semaphore::new(max_connections)),
                open: AtomicUsize::new(0),
                max_in_flight,
                in_flight: Arc::new(Semaphore::new(max_in_flight)),
                max_body,
                body_timeout,
                refused_overloaded: AtomicU64::new(0),
                refused_too_large: AtomicU64::new(0),
                refused_timeout: AtomicU64::new(0),
            }),
        }
    }

    pub fn max_body(&self) -> usize {
        self.inner.max_body
    }

    /// Requests running now (counted ones).
    pub fn in_flight(&self) -> usize {
        self.inner.max_in_flight - self.inner.in_flight.available_permits()
    }

    /// Bytes of request bodies held now (in KiB steps).
    pub fn body_bytes_held(&self) -> usize {
        (self.inner.body_budget_kib - self.inner.body_budget.available_permits()) * 1024
    }

    /// Connections open now.
    pub fn open_connections(&self) -> usize {
        self.inner.open.load(Ordering::Relaxed)
    }

    /// The families of `/metrics`.
    pub fn collector(&self) -> Arc<dyn Collector> {
        Arc::new(self.clone())
    }
}

impl Collector for HttpLimits {
    fn source(&self) -> &'static str {
        "http"
    }

    fn collect(&self) -> futures::future::BoxFuture<'_, crate::metrics::Result<Vec<Family>>> {
        let i = &self.inner;
        let refused = |r: &AtomicU64| r.load(Ordering::Relaxed) as f64;
        let families = vec![
            Family::gauge(
                "arnela_http_connections",
                "HTTP connections open now, and the most allowed at once.",
            )
            .with(&[("state", "open")], self.open_connections() as f64)
            .with(&[("state", "limit")], i.max_connections as f64),
            Family::gauge(
                "arnela_http_in_flight",
                "HTTP requests running now (health reports and /metrics not counted), and the most allowed.",
            )
            .with(&[("state", "running")], self.in_flight() as f64)
            .with(&[("state", "limit")], i.max_in_flight as f64),
            Family::counter(
                "arnela_http_refused_total",
                "HTTP requests refused before their operation ran, by reason.",
            )
            .with(&[("reason", "overloaded")], refused(&i.refused_overloaded))
            .with(&[("reason", "body_too_large")], refused(&i.refused_too_large))
            .with(&[("reason", "body_timeout")], refused(&i.refused_timeout)),
        ];
        Box::pin(async move { Ok(families) })
    }
}

/// The default budget of request-body memory for all requests together (64 MiB).
pub const DEFAULT_BODY_BUDGET: usize = 64 * 1024 * 1024;

/// What happened to a request's body while the operation read it.
#[derive(Default)]
struct BodyOutcome {
    too_large: std::sync::atomic::AtomicBool,
    timed_out: std::sync::atomic::AtomicBool,
    over_budget: std::sync::atomic::AtomicBool,
    /// The budget this body holds, returned when the request ends.
    held: std::sync::Mutex<Option<OwnedSemaphorePermit>>,
}

fn refusal(status: StatusCode, code: ErrorCode, message: String) -> Response {
    let mut resp = Json(ErrorBody::new(code, message))
        .with_status(status)
        .into_response();
    if status == StatusCode::SERVICE_UNAVAILABLE {
        resp.headers_mut()
            .insert("retry-after", RETRY_AFTER_SECS.into());
    }
    resp
}

/// The operations that read a request body (all `POST`): the enqueues and the bulk actions on
/// dead letters.
const BODY_PATHS: [&str; 5] = [
    "/tasks",
    "/tasks/batch",
    "/dead-letters/retry",
    "/dead-letters/cancel",
    "/schedules",
];

/// Whether the operation `method path` reads a JSON body: the POSTs of [`BODY_PATHS`] and a
/// schedule's PATCH.
fn reads_body(method: &poem::http::Method, path: &str) -> bool {
    (method == poem::http::Method::POST && BODY_PATHS.contains(&path))
        || (method == poem::http::Method::PATCH && path.starts_with("/schedules/"))
}

/// Middleware: the in-flight limit and the body limits (see the module docs).
pub async fn guard<E: Endpoint>(
    ep: E,
    mut req: Request,
    limits: HttpLimits,
) -> poem::Result<Response> {
    let i = &limits.inner;
    let _permit = if UNLIMITED.contains(&req.uri().path()) {
        None
    } else {
        match i.in_flight.clone().try_acquire_owned() {
            Ok(p) => Some(p),
            Err(_) => {
                i.refused_overloaded.fetch_add(1, Ordering::Relaxed);
                return Ok(refusal(
                    StatusCode::SERVICE_UNAVAILABLE,
                    ErrorCode::Overloaded,
                    format!(
                        "{} requests are running, the most this instance takes at once; retry shortly",
                        i.max_in_flight
                    ),
                ));
            }
        }
    };
    let too_large = || {
        i.refused_too_large.fetch_add(1, Ordering::Relaxed);
        refusal(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::PayloadTooLarge,
            format!(
                "the request body is larger than the limit of {} bytes",
                i.max_body
            ),
        )
    };
    let announced = req
        .headers()
        .get(poem::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    // Only these operations read a body; elsewhere an announced one is never read.
    if !reads_body(req.method(), req.uri().path()) {
        // nothing will read the body: no wrapper to pay for
        return ep.call(req).await.map(IntoResponse::into_response);
    }
    if announced.is_some_and(|n| n > i.max_body as u64) {
        return Ok(too_large());
    }

    // The body as the operation will read it: counted, bounded, and due within the timeout.
    let outcome = Arc::new(BodyOutcome::default());
    let body = req.take_body().into_bytes_stream();
    let deadline = tokio::time::Instant::now() + i.body_timeout;
    let max = i.max_body;
    let budget = i.body_budget.clone();
    let seen = outcome.clone();
    let limited = futures::stream::unfold(
        (body, 0usize, seen, false),
        move |(mut body, read, seen, done)| {
            let budget = budget.clone();
            async move {
                if done {
                    return None;
                }
                match tokio::time::timeout_at(deadline, body.next()).await {
                    Err(_) => {
                        seen.timed_out.store(true, Ordering::Relaxed);
                        let e = io::Error::new(
                            io::ErrorKind::TimedOut,
                            "the body did not arrive in time",
                        );
                        Some((Err(e), (body, read, seen, true)))
                    }
                    Ok(None) => None,
                    Ok(Some(Err(e))) => Some((Err(e), (body, read, seen, true))),
                    Ok(Some(Ok(chunk))) => {
                        let held_kib = read.div_ceil(1024);
                        let read = read + chunk.len();
                        // the size first: an oversized body is a 413 whatever the load
                        if read > max {
                            seen.too_large.store(true, Ordering::Relaxed);
                            let e =
                                io::Error::new(io::ErrorKind::InvalidData, "the body is too large");
                            return Some((Err(e), (body, read, seen, true)));
                        }
                        // the budget holds the bytes read so far, in KiB, whatever the chunks'
                        // sizes: tiny chunks cannot spend it faster than their bytes
                        let more =
                            u32::try_from(read.div_ceil(1024) - held_kib).unwrap_or(u32::MAX);
                        if more > 0 {
                            match budget.clone().try_acquire_many_owned(more) {
                                Ok(permit) => {
                                    let mut held = seen.held.lock().expect("body budget");
                                    match held.as_mut() {
                                        Some(all) => all.merge(permit),
                                        None => *held = Some(permit),
                                    }
                                }
                                Err(_) => {
                                    seen.over_budget.store(true, Ordering::Relaxed);
                                    let e = io::Error::new(
                                        io::ErrorKind::OutOfMemory,
                                        "body budget spent",
                                    );
                                    return Some((Err(e), (body, read, seen, true)));
                                }
                            }
                        }
                        Some((Ok(chunk), (body, read, seen, false)))
                    }
                }
            }
        },
    );
    req.set_body(Body::from_bytes_stream(limited));

    let result = ep.call(req).await.map(IntoResponse::into_response);
    if outcome.over_budget.load(Ordering::Relaxed) {
        i.refused_overloaded.fetch_add(1, Ordering::Relaxed);
        return Ok(refusal(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Overloaded,
            format!(
                "the request bodies being read already hold {} MiB, the most this instance \
                 holds at once; retry shortly",
                i.body_budget_kib / 1024
            ),
        ));
    }
    if outcome.too_large.load(Ordering::Relaxed) {
        return Ok(too_large());
    }
    if outcome.timed_out.load(Ordering::Relaxed) {
        i.refused_timeout.fetch_add(1, Ordering::Relaxed);
        return Ok(refusal(
            StatusCode::REQUEST_TIMEOUT,
            ErrorCode::RequestTimeout,
            format!(
                "the request body did not arrive within {} s",
                i.body_timeout.as_secs()
            ),
        ));
    }
    result
}

/// An acceptor that holds at most the limit's connections open: it accepts the next one only
/// when a permit is free, and each connection returns its permit when it closes.
pub struct LimitedAcceptor<A> {
    inner: A,
    limits: HttpLimits,
}

impl<A> LimitedAcceptor<A> {
    pub fn new(inner: A, limits: HttpLimits) -> Self {
        LimitedAcceptor { inner, limits }
    }
}

impl<A: Acceptor> Acceptor for LimitedAcceptor<A> {
    type Io = Counted<A::Io>;

    fn local_addr(&self) -> Vec<LocalAddr> {
        self.inner.local_addr()
    }

    async fn accept(
        &mut self,
    ) -> io::Result<(Self::Io, LocalAddr, RemoteAddr, poem::http::uri::Scheme)> {
        let permit = self
            .limits
            .inner
            .connections
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| io::Error::other("the connection limit was closed"))?;
        let (io, local, remote, scheme) = self.inner.accept().await?;
        self.limits.inner.open.fetch_add(1, Ordering::Relaxed);
        Ok((
            Counted {
                io,
                _permit: permit,
                limits: self.limits.clone(),
            },
            local,
            remote,
            scheme,
        ))
    }
}

/// A connection holding its permit.
pub struct Counted<T> {
    io: T,
    _permit: OwnedSemaphorePermit,
    limits: HttpLimits,
}

impl<T> Drop for Counted<T> {
    fn drop(&mut self) {
        self.limits.inner.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}
