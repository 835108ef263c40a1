//! HTTP errors, mapped in one place.
//!
//! Every operation returns [`ApiError`] for its failures: a 4xx says exactly what was wrong in a
//! machine-readable [`ErrorBody`]; a 5xx is opaque to the client and its cause is logged once,
//! here. [`json_errors`] turns the errors poem raises before an operation runs (a malformed body,
//! a bad path parameter, an unknown route, a body over the size limit, a missing bearer token)
//! into the same body.

use poem::http::StatusCode;
use poem::{Endpoint, IntoResponse, Request, Response};
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object};

use super::auth::Denied;
use crate::domain::task::InvalidTransition;
use crate::domain::FieldError;
use crate::store::StoreError;

/// The body of every error response.
#[derive(Debug, Clone, PartialEq, Eq, Object, serde::Serialize, serde::Deserialize)]
pub struct ErrorBody {
    /// Stable, machine-readable code, e.g. `validation_failed`, `not_found`,
    /// `idempotency_conflict`, `invalid_transition`, `malformed_request`, `payload_too_large`,
    /// `unauthorized`, `forbidden`.
    pub code: String,
    /// What was wrong, for people.
    pub message: String,
    /// The offending input field, when one field is to blame (e.g. `payload.to`,
    /// `tasks[3].payload.phone`).
    #[oai(skip_serializing_if_is_none)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// A finer code for `field`, e.g. `required`, `invalid_format`, `too_long`, `unknown_field`.
    #[oai(skip_serializing_if_is_none)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl ErrorBody {
    pub fn new(code: &str, message: impl Into<String>) -> ErrorBody {
        ErrorBody {
            code: code.to_owned(),
            message: message.into(),
            field: None,
            reason: None,
        }
    }
}

/// The failures of every operation.
#[derive(Debug, ApiResponse)]
pub enum ApiError {
    /// The request could not be read: malformed JSON, a wrong type, a bad path or query
    /// parameter.
    #[oai(status = 400)]
    BadRequest(Json<ErrorBody>),
    /// No valid bearer token: it is missing, malformed, expired or not signed with this
    /// service's secret.
    #[oai(status = 401)]
    Unauthorized(
        Json<ErrorBody>,
        /// `Bearer`, with `error="invalid_token"` when a token was sent but refused.
        #[oai(header = "WWW-Authenticate")]
        String,
    ),
    /// The token is valid but its role may not use this operation.
    #[oai(status = 403)]
    Forbidden(Json<ErrorBody>),
    /// No such task.
    #[oai(status = 404)]
    NotFound(Json<ErrorBody>),
    /// The request conflicts with the current state: an idempotency key used for a different
    /// request, or an operation the task's status does not allow.
    #[oai(status = 409)]
    Conflict(Json<ErrorBody>),
    /// The request body is larger than the configured limit.
    #[oai(status = 413)]
    PayloadTooLarge(Json<ErrorBody>),
    /// The request was read but a field is not acceptable; `field` names it.
    #[oai(status = 422)]
    Unprocessable(Json<ErrorBody>),
    /// An unexpected failure; the cause is logged, not returned.
    #[oai(status = 500)]
    Internal(Json<ErrorBody>),
    /// A dependency (the database) is unavailable; try again later.
    #[oai(status = 503)]
    Unavailable(Json<ErrorBody>),
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::BadRequest(Json(ErrorBody::new("malformed_request", message)))
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::NotFound(Json(ErrorBody::new("not_found", message)))
    }

    /// A 422 naming the field.
    pub fn field(e: FieldError) -> ApiError {
        ApiError::Unprocessable(Json(ErrorBody {
            code: "validation_failed".into(),
            message: format!("{}: {}", e.field, e.message),
            field: Some(e.field),
            reason: Some(e.code.to_owned()),
        }))
    }

    /// The same error with its field prefixed, e.g. `tasks[3].`.
    pub fn within(self, prefix: &str) -> ApiError {
        match self {
            ApiError::Unprocessable(Json(mut body)) => {
                if let Some(f) = body.field.take() {
                    body.message = format!("{prefix}{}", body.message);
                    body.field = Some(format!("{prefix}{f}"));
                }
                ApiError::Unprocessable(Json(body))
            }
            other => other,
        }
    }

    /// Logs the cause and returns an opaque 500.
    pub fn internal(cause: &dyn std::fmt::Display) -> ApiError {
        tracing::error!(error = %cause, "request failed");
        ApiError::Internal(Json(ErrorBody::new(
            "internal",
            "an unexpected error occurred; it has been logged",
        )))
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(..) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

impl From<FieldError> for ApiError {
    fn from(e: FieldError) -> Self {
        ApiError::field(e)
    }
}

impl From<Denied> for ApiError {
    fn from(e: Denied) -> Self {
        match e {
            Denied::Unauthorized(body, challenge) => ApiError::Unauthorized(body, challenge),
            Denied::Forbidden(body) => ApiError::Forbidden(body),
        }
    }
}

impl From<InvalidTransition> for ApiError {
    fn from(e: InvalidTransition) -> Self {
        ApiError::Conflict(Json(ErrorBody::new("invalid_transition", e.to_string())))
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(id) => ApiError::not_found(format!("task {id} not found")),
            StoreError::IdempotencyConflict { key, existing } => {
                ApiError::Conflict(Json(ErrorBody {
                    code: "idempotency_conflict".into(),
                    message: format!(
                        "idempotency key {key:?} is already used by task {existing} for a different request"
                    ),
                    field: Some("idempotency_key".into()),
                    reason: None,
                }))
            }
            StoreError::VersionConflict { .. } => ApiError::Conflict(Json(ErrorBody::new(
                "concurrent_update",
                "the task changed while the request was processed; retry it",
            ))),
            StoreError::Transition(t) => t.into(),
            StoreError::Database(db) if is_unavailable(&db) => {
                tracing::warn!(error = %db, "database unavailable");
                ApiError::Unavailable(Json(ErrorBody::new(
                    "database_unavailable",
                    "the database is unavailable; try again later",
                )))
            }
            other => ApiError::internal(&other),
        }
    }
}

fn is_unavailable(e: &sqlx::Error) -> bool {
    matches!(
        e,
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_)
    )
}

/// The machine-readable code of an error poem raised by itself.
fn code_for(status: StatusCode) -> &'static str {
    match status {
        StatusCode::BAD_REQUEST => "malformed_request",
        StatusCode::UNAUTHORIZED => "unauthorized",
        StatusCode::FORBIDDEN => "forbidden",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::UNPROCESSABLE_ENTITY => "validation_failed",
        s if s.is_server_error() => "internal",
        _ => "error",
    }
}

/// Middleware: every error leaves as a JSON [`ErrorBody`].
pub async fn json_errors<E: Endpoint>(ep: E, req: Request) -> poem::Result<Response> {
    match ep.call(req).await {
        Ok(resp) => Ok(resp.into_response()),
        Err(err) => {
            let status = err.status();
            let mut resp = err.into_response();
            if status == StatusCode::UNAUTHORIZED && !is_json_response(&resp) {
                // The security scheme found no bearer token (or another scheme, e.g. `Basic`).
                let extensions = std::mem::take(resp.extensions_mut());
                let mut denied = Denied::missing().into_response();
                *denied.extensions_mut() = extensions;
                return Ok(denied);
            }
            if is_json_response(&resp) {
                return Ok(resp);
            }
            // keep what the router recorded (the matched route template, for metrics)
            let extensions = std::mem::take(resp.extensions_mut());
            let message = if status.is_server_error() {
                tracing::error!(%status, "unhandled error");
                "an unexpected error occurred; it has been logged".to_owned()
            } else {
                let text = resp.into_body().into_string().await.unwrap_or_default();
                if text.is_empty() {
                    status.canonical_reason().unwrap_or("error").to_owned()
                } else {
                    text
                }
            };
            let body = ErrorBody::new(code_for(status), message);
            let mut json = poem::web::Json(body).with_status(status).into_response();
            *json.extensions_mut() = extensions;
            Ok(json)
        }
    }
}

fn is_json_response(resp: &Response) -> bool {
    resp.content_type()
        .is_some_and(|ct| ct.starts_with("application/json"))
}

/// Middleware: refuses request bodies over `max` bytes with 413, whether the size is announced
/// by `Content-Length` or only found by reading a chunked body.
pub async fn limit_body<E: Endpoint>(
    ep: E,
    mut req: Request,
    max: usize,
) -> poem::Result<Response> {
    use tokio::io::AsyncReadExt;
    let too_large = || {
        poem::Error::from_string(
            format!("the request body is larger than the limit of {max} bytes"),
            StatusCode::PAYLOAD_TOO_LARGE,
        )
    };
    let announced = req
        .headers()
        .get(poem::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match announced {
        Some(n) if n > max as u64 => return Err(too_large()),
        Some(_) => {}
        None if req
            .headers()
            .contains_key(poem::http::header::TRANSFER_ENCODING) =>
        {
            let mut buf = Vec::new();
            req.take_body()
                .into_async_read()
                .take(max as u64 + 1)
                .read_to_end(&mut buf)
                .await
                .map_err(|e| poem::Error::from_string(e.to_string(), StatusCode::BAD_REQUEST))?;
            if buf.len() > max {
                return Err(too_large());
            }
            req.set_body(buf);
        }
        None => {}
    }
    ep.call(req).await.map(IntoResponse::into_response)
}
