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
use poem_openapi::{ApiResponse, Enum, Object};

use super::auth::Denied;
use crate::domain::task::InvalidTransition;
use crate::domain::FieldError;
use crate::store::StoreError;

/// The machine-readable code of every error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum, serde::Serialize, serde::Deserialize)]
#[oai(rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// 400: the request could not be read (malformed JSON, a wrong type, a bad parameter).
    MalformedRequest,
    /// 401: no valid bearer token.
    Unauthorized,
    /// 403: the token's role may not use the operation.
    Forbidden,
    /// 404: no such task, or no such route.
    NotFound,
    /// 405: the route exists but not with this method.
    MethodNotAllowed,
    /// 409: the idempotency key was used for a different request.
    IdempotencyConflict,
    /// 409: the task's status does not allow the operation.
    InvalidTransition,
    /// 409: the task changed while the request was processed; retry it.
    ConcurrentUpdate,
    /// 408: the request body did not arrive in time.
    RequestTimeout,
    /// 409: a requeue would give the task more attempts than a task may have in all (100).
    AttemptBudgetExhausted,
    /// 409: the task's personal fields were stored without a data key (before
    /// `AUDIT_DATA_KEY` was set), so they cannot be erased.
    NotErasable,
    /// 413: the body is larger than the limit.
    PayloadTooLarge,
    /// 415: the body is not `application/json`.
    UnsupportedMediaType,
    /// 422: a field is not acceptable; `field` and `reason` say which and why.
    ValidationFailed,
    /// 500: an unexpected failure (logged by the service).
    Internal,
    /// 503: the database is unavailable; retry after `Retry-After` seconds.
    DatabaseUnavailable,
    /// 503: the instance runs as many requests as it takes at once; retry after `Retry-After`
    /// seconds.
    Overloaded,
}

/// Why a field was refused (with `validation_failed`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum, serde::Serialize, serde::Deserialize)]
#[oai(rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum FieldReason {
    Required,
    InvalidType,
    InvalidFormat,
    InvalidValue,
    InvalidLength,
    InvalidCombination,
    OutOfRange,
    TooLong,
    TooLarge,
    TooMany,
    UnknownField,
}

impl FieldReason {
    /// The reason named by a [`FieldError`]'s code (its serde name).
    pub fn of(code: &str) -> Option<FieldReason> {
        use serde::de::IntoDeserializer;
        let code: serde::de::value::StrDeserializer<'_, serde::de::value::Error> =
            code.into_deserializer();
        serde::Deserialize::deserialize(code).ok()
    }
}

/// What a token's holder may do: `producer` (enqueue, read its tenant's tasks), `auditor` (read
/// everything), `admin` (everything, including requeue and cancel).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum, serde::Serialize, serde::Deserialize)]
#[oai(
    rename = "Role",
    rename_all = "snake_case",
    remote = "super::auth::Role"
)]
#[serde(rename_all = "snake_case")]
pub enum RoleName {
    Producer,
    Auditor,
    Admin,
}

/// The body of every error response.
#[derive(Debug, Clone, PartialEq, Eq, Object, serde::Serialize, serde::Deserialize)]
pub struct ErrorBody {
    pub code: ErrorCode,
    /// What was wrong, for people.
    pub message: String,
    /// The offending input field, when one field is to blame (e.g. `payload.to`,
    /// `tasks[3].payload.phone`).
    #[oai(skip_serializing_if_is_none)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    #[oai(skip_serializing_if_is_none)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<FieldReason>,
    /// With `forbidden`: the roles that may use the operation.
    #[oai(skip_serializing_if_is_none)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub roles: Option<Vec<RoleName>>,
}

impl ErrorBody {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ErrorBody {
        ErrorBody {
            code,
            message: message.into(),
            field: None,
            reason: None,
            roles: None,
        }
    }
}

/// How long a client should wait after a 503 before trying again, in seconds.
pub const RETRY_AFTER_SECS: u32 = 5;

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
    /// The request body did not arrive within the body timeout.
    #[oai(status = 408)]
    RequestTimeout(Json<ErrorBody>),
    /// The request conflicts with the current state: an idempotency key used for a different
    /// request, or an operation the task's status does not allow.
    #[oai(status = 409)]
    Conflict(Json<ErrorBody>),
    /// The request body is larger than the configured limit.
    #[oai(status = 413)]
    PayloadTooLarge(Json<ErrorBody>),
    /// The body is not JSON: `Content-Type` is missing or not `application/json`.
    #[oai(status = 415)]
    UnsupportedMediaType(Json<ErrorBody>),
    /// The request was read but a field is not acceptable; `field` names it.
    #[oai(status = 422)]
    Unprocessable(Json<ErrorBody>),
    /// An unexpected failure; the cause is logged, not returned.
    #[oai(status = 500)]
    Internal(Json<ErrorBody>),
    /// The database is unavailable, or the instance runs as many requests as it takes at once;
    /// try again after `Retry-After` seconds.
    #[oai(status = 503)]
    Unavailable(
        Json<ErrorBody>,
        /// Seconds to wait before trying again.
        #[oai(header = "Retry-After")]
        u32,
    ),
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::BadRequest(Json(ErrorBody::new(ErrorCode::MalformedRequest, message)))
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::NotFound(Json(ErrorBody::new(ErrorCode::NotFound, message)))
    }

    /// A 422 naming the field.
    pub fn field(e: FieldError) -> ApiError {
        let reason = FieldReason::of(e.code);
        if reason.is_none() {
            tracing::error!(
                code = e.code,
                "a field error has a reason the API does not document"
            );
        }
        ApiError::Unprocessable(Json(ErrorBody {
            code: ErrorCode::ValidationFailed,
            message: format!("{}: {}", e.field, e.message),
            field: Some(e.field),
            reason: Some(reason.unwrap_or(FieldReason::InvalidValue)),
            roles: None,
        }))
    }

    /// The same error with its field prefixed, e.g. `tasks[3].`.
    pub fn within(self, prefix: &str) -> ApiError {
        let prefixed = |mut body: ErrorBody| {
            if let Some(f) = body.field.take() {
                if body.message.starts_with(&f) {
                    body.message = format!("{prefix}{}", body.message);
                }
                body.field = Some(format!("{prefix}{f}"));
            }
            Json(body)
        };
        match self {
            ApiError::Unprocessable(Json(body)) => ApiError::Unprocessable(prefixed(body)),
            ApiError::Forbidden(Json(body)) => ApiError::Forbidden(prefixed(body)),
            other => other,
        }
    }

    /// Logs the cause and returns an opaque 500.
    pub fn internal(cause: &dyn std::fmt::Display) -> ApiError {
        tracing::error!(error = %cause, "request failed");
        ApiError::Internal(Json(ErrorBody::new(
            ErrorCode::Internal,
            "an unexpected error occurred; it has been logged",
        )))
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(..) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Unavailable(..) => StatusCode::SERVICE_UNAVAILABLE,
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
        ApiError::Conflict(Json(ErrorBody::new(
            ErrorCode::InvalidTransition,
            e.to_string(),
        )))
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(id) => ApiError::not_found(format!("task {id} not found")),
            StoreError::IdempotencyConflict { key, existing } => {
                ApiError::Conflict(Json(ErrorBody {
                    code: ErrorCode::IdempotencyConflict,
                    message: format!(
                        "idempotency key {key:?} is already used by task {existing} for a different request"
                    ),
                    field: Some("idempotency_key".into()),
                    reason: None,
                    roles: None,
                }))
            }
            StoreError::VersionConflict { .. } => ApiError::Conflict(Json(ErrorBody::new(
                ErrorCode::ConcurrentUpdate,
                "the task changed while the request was processed; retry it",
            ))),
            StoreError::Transition(t) => t.into(),
            StoreError::NotErasable(id) => ApiError::Conflict(Json(ErrorBody::new(
                ErrorCode::NotErasable,
                format!(
                    "task {id} was stored without a data key (before AUDIT_DATA_KEY was set): \
                     its personal data cannot be erased"
                ),
            ))),
            StoreError::AttemptBudget { used, max, .. } => {
                ApiError::Conflict(Json(ErrorBody::new(
                    ErrorCode::AttemptBudgetExhausted,
                    format!(
                        "the task has had {used} attempts and may have at most {max} in all: \
                         requeue it with at most {} attempts",
                        (max - used).max(0)
                    ),
                )))
            }
            // a cancelled statement (57014: `statement_timeout`, `pg_cancel_backend`) is an
            // answer, not an outage
            StoreError::Database(db)
                if crate::store::is_unavailable(&db)
                    && db.as_database_error().and_then(|d| d.code()).as_deref() != Some("57014") =>
            {
                tracing::warn!(error = %db, "database unavailable");
                ApiError::Unavailable(
                    Json(ErrorBody::new(
                        ErrorCode::DatabaseUnavailable,
                        "the database is unavailable; try again later",
                    )),
                    RETRY_AFTER_SECS,
                )
            }
            other => ApiError::internal(&other),
        }
    }
}

/// The machine-readable code of an error poem raised by itself.
fn code_for(status: StatusCode) -> ErrorCode {
    match status {
        StatusCode::UNAUTHORIZED => ErrorCode::Unauthorized,
        StatusCode::FORBIDDEN => ErrorCode::Forbidden,
        StatusCode::NOT_FOUND => ErrorCode::NotFound,
        StatusCode::METHOD_NOT_ALLOWED => ErrorCode::MethodNotAllowed,
        StatusCode::PAYLOAD_TOO_LARGE => ErrorCode::PayloadTooLarge,
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ErrorCode::UnsupportedMediaType,
        StatusCode::UNPROCESSABLE_ENTITY => ErrorCode::ValidationFailed,
        StatusCode::SERVICE_UNAVAILABLE => ErrorCode::DatabaseUnavailable,
        s if s.is_server_error() => ErrorCode::Internal,
        _ => ErrorCode::MalformedRequest,
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

/// The statuses an operation's failures may have: the spec documents exactly these, and
/// `tests/it/openapi.rs` checks that each is reached and no other.
pub trait Statuses: Send + Sync + 'static {
    const LIST: &'static [u16];
}

/// Declares the failure statuses of one operation.
macro_rules! statuses {
    ($($(#[$doc:meta])* $name:ident: [$($status:literal),*];)*) => {
        $(
            $(#[$doc])*
            pub struct $name;

            impl Statuses for $name {
                const LIST: &'static [u16] = &[$($status),*];
            }
        )*
    };
}

statuses! {
    /// `POST /tasks` and `POST /tasks/batch`.
    EnqueueFailures: [400, 401, 403, 408, 409, 413, 415, 422, 500, 503];
    /// `GET /tasks` and `GET /events`.
    ListFailures: [400, 401, 403, 500, 503];
    /// `GET /tasks/{id}`: every role may read a task.
    TaskFailures: [400, 401, 404, 500, 503];
    /// `GET /tasks/{id}/events`.
    HistoryFailures: [400, 401, 403, 404, 500, 503];
    /// `POST /tasks/{id}/retry` and `POST /tasks/{id}/cancel`.
    OperatorFailures: [400, 401, 403, 404, 409, 500, 503];
    /// `GET /stats` and `GET /task-types`.
    StatsFailures: [401, 403, 500, 503];
    /// `GET /whoami`: every role may ask, and nothing is read.
    WhoamiFailures: [401, 500];
    /// `POST /task-types/{type}/pause` and `.../resume`.
    TypeFailures: [400, 401, 403, 500, 503];
    /// `POST /dead-letters/retry` and `POST /dead-letters/cancel` (a JSON body).
    BulkFailures: [400, 401, 403, 408, 413, 415, 422, 500, 503];
    /// `GET /tasks/{id}/verify`.
    VerifyFailures: [400, 401, 403, 404, 500, 503];
    /// `POST /schedules` (a JSON body).
    CreateScheduleFailures: [400, 401, 403, 408, 413, 415, 422, 500, 503];
    /// `PATCH /schedules/{id}` (a JSON body).
    UpdateScheduleFailures: [400, 401, 403, 404, 408, 413, 415, 422, 500, 503];
    /// `GET /schedules/{id}`, its events, pause, resume and `DELETE`.
    ScheduleFailures: [400, 401, 403, 404, 500, 503];
}

/// The failure of an operation whose documented statuses are `S`. An [`ApiError`] of another
/// status is a bug: it is logged and answered as a 500.
pub struct Failure<S> {
    error: ApiError,
    statuses: std::marker::PhantomData<fn() -> S>,
}

impl<S: Statuses> ApiResponse for Failure<S> {
    fn meta() -> poem_openapi::registry::MetaResponses {
        let mut meta = ApiError::meta();
        meta.responses
            .retain(|r| r.status.is_some_and(|s| S::LIST.contains(&s)));
        meta
    }

    fn register(registry: &mut poem_openapi::registry::Registry) {
        ApiError::register(registry);
    }
}

impl<S: Statuses> IntoResponse for Failure<S> {
    fn into_response(self) -> Response {
        self.error.into_response()
    }
}

impl<S: Statuses> From<Failure<S>> for poem::Error {
    fn from(f: Failure<S>) -> poem::Error {
        poem::Error::from_response(f.into_response())
    }
}

impl<S: Statuses> From<ApiError> for Failure<S> {
    fn from(error: ApiError) -> Self {
        let status = error.status().as_u16();
        let error = if S::LIST.contains(&status) {
            error
        } else {
            ApiError::internal(&format!(
                "an operation failed with status {status}, which its documentation does not list: {error:?}"
            ))
        };
        Failure {
            error,
            statuses: std::marker::PhantomData,
        }
    }
}

macro_rules! into_failure {
    ($($source:ty),*) => {
        $(
            impl<S: Statuses> From<$source> for Failure<S> {
                fn from(e: $source) -> Self {
                    ApiError::from(e).into()
                }
            }
        )*
    };
}

into_failure!(FieldError, Denied, InvalidTransition, StoreError);
