//! The operator console: a page, a script and a style sheet compiled into the binary and served
//! at `/ui` (nothing is fetched from elsewhere, so it works with the network cut). The page holds
//! no data: it signs in with a bearer token kept in the browser session and calls the API, so
//! every role rule of the API applies to it unchanged.

use poem::http::{header, StatusCode};
use poem::{handler, Response, Route};

const INDEX: &str = include_str!("../../ui/index.html");
const SCRIPT: &str = include_str!("../../ui/app.js");
const STYLE: &str = include_str!("../../ui/app.css");

/// Same-origin only: no inline script, no framing, no outside connections.
const POLICY: &str = "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; \
                      base-uri 'none'; form-action 'self'";

fn asset(content_type: &str, body: &'static str) -> Response {
    Response::builder()
        .status(StatusCode::OK)
        .content_type(content_type)
        .header(header::CONTENT_SECURITY_POLICY, POLICY)
        .header(header::X_CONTENT_TYPE_OPTIONS, "nosniff")
        .header(header::REFERRER_POLICY, "no-referrer")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(body)
}

#[handler]
fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX)
}

#[handler]
fn script() -> Response {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

#[handler]
fn style() -> Response {
    asset("text/css; charset=utf-8", STYLE)
}

/// `/ui` (and `/ui/`), `/ui/app.js`, `/ui/app.css`.
pub fn routes() -> Route {
    Route::new()
        .at("/", index)
        .at("/app.js", script)
        .at("/app.css", style)
}
