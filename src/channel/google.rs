//! Google Calendar (`sync_calendar`): the Calendar v3 events API with a service account.
//!
//! **Token.** The service account signs a JWT (RS256; `iss` = the account, `scope` =
//! `calendar.events`, `aud` = the token URL, one hour) and trades it at the token endpoint for an
//! access token (`grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer`). The token is cached
//! and shared by every worker of the process until [`TOKEN_REFRESH_MARGIN`] before it expires;
//! one worker fetches while the others wait for it. A 401 from the Calendar API drops the cached
//! token and the request is made once more with a new one.
//!
//! **Idempotence.** The Google event id is derived from the task's `event_id` (the clinic's
//! appointment id): `hex(sha256("arnela:" + event_id))`, which uses only characters Google allows
//! in event ids. So every action on one appointment addresses the same Google event:
//! - `create` inserts the event with that id; `409 Conflict` means an earlier attempt (or a
//!   create whose answer timed out) already made it, and the event is then overwritten with the
//!   requested content, so a retried create leaves one event, as requested.
//! - `update` replaces the event (PUT); if it does not exist it is inserted.
//! - `delete` deletes it; `404` or `410 Gone` means it is already gone: success.
//!
//! **Time zones.** `appointment_data.starts_at` (and `ends_at`) are RFC 3339 with an offset, or
//! a local date-time without one; either way the event carries `time_zone` (or
//! `GOOGLE_CALENDAR_TIME_ZONE`), which Google uses for local times and for display.

use crate::telemetry;
use chrono::{DateTime, Duration as ChronoDuration, Utc};
use futures::future::BoxFuture;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::{Method, StatusCode, Url};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument;

use super::classify::{self, ProviderDetail};
use super::ratelimit::RateLimiter;
use super::{http_client, ChannelError};
use crate::config::channels::GoogleSettings;
use crate::domain::appointment::Appointment;
use crate::worker::handler::{Handler, HandlerError, HandlerResult, TaskContext};
use secrecy::{ExposeSecret, SecretString};

/// The OAuth scope asked for: events of calendars the account can write to.
pub const SCOPE: &str = "https://www.googleapis.com/auth/calendar.events";
/// A cached token is replaced this long before it expires.
pub const TOKEN_REFRESH_MARGIN: Duration = Duration::from_secs(60);
/// Lifetime asked for in the JWT assertion (Google's maximum).
const ASSERTION_LIFETIME_SECS: i64 = 3600;

/// The wall clock of the token cache (injected in tests).
pub type Clock = Arc<dyn Fn() -> DateTime<Utc> + Send + Sync>;

/// The Google event id of a clinic appointment id.
pub fn calendar_event_id(event_id: &str) -> String {
    hex::encode(Sha256::digest(format!("arnela:{event_id}").as_bytes()))
}

struct CachedToken {
    token: SecretString,
    expires_at: DateTime<Utc>,
}

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    scope: &'a str,
    aud: &'a str,
    iat: i64,
    exp: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    sub: Option<&'a str>,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    expires_in: Option<i64>,
}

#[derive(Deserialize)]
struct OAuthError {
    error: Option<String>,
    error_description: Option<String>,
}

#[derive(Deserialize)]
struct ApiErrorBody {
    error: ApiError,
}

#[derive(Deserialize)]
struct ApiError {
    message: Option<String>,
    status: Option<String>,
    #[serde(default)]
    errors: Vec<ApiErrorItem>,
}

#[derive(Deserialize)]
struct ApiErrorItem {
    reason: Option<String>,
}

/// Keeps one calendar in step with the clinic's appointments.
pub struct GoogleCalendarChannel {
    client: reqwest::Client,
    settings: GoogleSettings,
    key: EncodingKey,
    events_url: Url,
    token: tokio::sync::Mutex<Option<CachedToken>>,
    clock: Clock,
    limiter: RateLimiter,
}

/// What a Calendar API call answered.
struct Answer {
    status: StatusCode,
    retry_after: Option<Duration>,
    body: Value,
}

impl GoogleCalendarChannel {
    async fn take_turn(&self) -> Result<(), HandlerError> {
        self.limiter
            .acquire()
            .await
            .map_err(|e| HandlerError::retryable(format!("rate limiter unavailable: {e}")))
    }

    /// Replaces the rate limiter (the service gives every process one shared on Redis).
    pub fn with_limiter(mut self, limiter: RateLimiter) -> GoogleCalendarChannel {
        self.limiter = limiter;
        self
    }

    pub fn new(settings: GoogleSettings) -> Result<GoogleCalendarChannel, ChannelError> {
        let key = EncodingKey::from_rsa_pem(settings.private_key.expose_secret().as_bytes())
            .map_err(|_| ChannelError::Key)?;
        let mut events_url = settings.calendar_base_url.clone();
        events_url
            .path_segments_mut()
            .map_err(|()| ChannelError::BaseUrl("GOOGLE_CALENDAR_BASE_URL"))?
            .pop_if_empty()
            .extend(["calendars", &settings.calendar_id, "events"]);
        Ok(GoogleCalendarChannel {
            client: http_client(settings.timeout)?,
            limiter: RateLimiter::new(settings.rate_limit),
            settings,
            key,
            events_url,
            token: tokio::sync::Mutex::new(None),
            clock: Arc::new(Utc::now),
        })
    }

    /// Replaces the clock of the token cache.
    pub fn with_clock(mut self, clock: Clock) -> GoogleCalendarChannel {
        self.clock = clock;
        self
    }

    async fn sync(&self, task: &TaskContext) -> HandlerResult {
        let p = &task.payload;
        let event_id = p
            .get("event_id")
            .and_then(Value::as_str)
            .ok_or_else(|| HandlerError::permanent("payload has no event_id"))?;
        let action = p.get("action").and_then(Value::as_str).unwrap_or_default();
        let google_id = calendar_event_id(event_id);
        let outcome = match action {
            "create" => {
                let event = self.event(event_id, &google_id, p.get("appointment_data"))?;
                self.create(&google_id, &event).await
            }
            "update" => {
                let event = self.event(event_id, &google_id, p.get("appointment_data"))?;
                self.update(&google_id, &event).await
            }
            "delete" => self.delete(&google_id).await,
            other => Err(HandlerError::permanent(format!(
                "unknown calendar action {other:?}"
            ))),
        };
        match &outcome {
            Ok((what, _)) => tracing::info!(
                channel = "google_calendar",
                action,
                calendar_event_id = %google_id,
                outcome = what,
                "calendar synchronised"
            ),
            Err(e) => tracing::warn!(
                channel = "google_calendar",
                action,
                calendar_event_id = %google_id,
                error = classify::message_of(e),
                "calendar not synchronised"
            ),
        }
        let (what, body) = outcome?;
        Ok(json!({
            "channel": "google_calendar",
            "action": action,
            "calendar_event_id": google_id,
            "outcome": what,
            "html_link": body.get("htmlLink"),
        }))
    }

    async fn create(&self, id: &str, event: &Value) -> Result<(&'static str, Value), HandlerError> {
        let a = self
            .call(
                Method::POST,
                self.events_url.clone(),
                Some(event),
                Turn::Taken,
            )
            .await?;
        match a.status {
            s if s.is_success() => Ok(("created", a.body)),
            // Made by an earlier attempt whose answer was lost, or deleted earlier (Google keeps
            // cancelled events): bring it to the requested state.
            StatusCode::CONFLICT => {
                let b = self
                    .call(Method::PUT, self.event_url(id), Some(event), Turn::Take)
                    .await?;
                if b.status.is_success() {
                    Ok(("already_existed", b.body))
                } else {
                    Err(api_failure(&b))
                }
            }
            _ => Err(api_failure(&a)),
        }
    }

    async fn update(&self, id: &str, event: &Value) -> Result<(&'static str, Value), HandlerError> {
        let a = self
            .call(Method::PUT, self.event_url(id), Some(event), Turn::Taken)
            .await?;
        match a.status {
            s if s.is_success() => Ok(("updated", a.body)),
            StatusCode::NOT_FOUND => {
                let b = self
                    .call(
                        Method::POST,
                        self.events_url.clone(),
                        Some(event),
                        Turn::Take,
                    )
                    .await?;
                if b.status.is_success() {
                    Ok(("created", b.body))
                } else {
                    Err(api_failure(&b))
                }
            }
            _ => Err(api_failure(&a)),
        }
    }

    async fn delete(&self, id: &str) -> Result<(&'static str, Value), HandlerError> {
        let a = self
            .call(Method::DELETE, self.event_url(id), None, Turn::Taken)
            .await?;
        match a.status {
            s if s.is_success() => Ok(("deleted", Value::Null)),
            StatusCode::NOT_FOUND | StatusCode::GONE => Ok(("already_deleted", Value::Null)),
            _ => Err(api_failure(&a)),
        }
    }

    fn event_url(&self, id: &str) -> Url {
        let mut url = self.events_url.clone();
        if let Ok(mut segments) = url.path_segments_mut() {
            segments.push(id);
        }
        url
    }

    /// One Calendar API request (rate limited, authorised; once more with a new token on 401).
    /// The first request of an attempt goes on the turn the worker waited for
    /// ([`Handler::slot`]); any further one takes a turn of its own.
    async fn call(
        &self,
        method: Method,
        mut url: Url,
        body: Option<&Value>,
        turn: Turn,
    ) -> Result<Answer, HandlerError> {
        url.query_pairs_mut()
            .append_pair("sendUpdates", &self.settings.send_updates);
        if turn == Turn::Take {
            self.take_turn().await?;
        }
        let mut response = self.send(&method, &url, body).await?;
        if response.status() == StatusCode::UNAUTHORIZED {
            // Revoked or expired early: the cached token is no good.
            *self.token.lock().await = None;
            self.take_turn().await?;
            response = self.send(&method, &url, body).await?;
        }
        let status = response.status();
        let retry_after = classify::retry_after(response.headers(), Utc::now());
        let bytes = response.bytes().await.unwrap_or_default();
        Ok(Answer {
            status,
            retry_after,
            body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        })
    }

    async fn send(
        &self,
        method: &Method,
        url: &Url,
        body: Option<&Value>,
    ) -> Result<reqwest::Response, HandlerError> {
        let token = self.access_token().await?;
        let mut request = self
            .client
            .request(method.clone(), url.clone())
            .bearer_auth(token.expose_secret());
        if let Some(b) = body {
            request = request.json(b);
        }
        async { telemetry::traced(request).send().await }
            .instrument(telemetry::client_span("google_calendar", "event"))
            .await
            .map_err(|e| classify::transport_failure("google calendar", &e))
    }

    /// The cached access token, or a new one.
    async fn access_token(&self) -> Result<SecretString, HandlerError> {
        let mut cached = self.token.lock().await;
        let now = (self.clock)();
        if let Some(t) = cached.as_ref() {
            if now + margin() < t.expires_at {
                return Ok(t.token.clone());
            }
        }
        let fresh = self.fetch_token(now).await?;
        let token = fresh.token.clone();
        *cached = Some(fresh);
        Ok(token)
    }

    async fn fetch_token(&self, now: DateTime<Utc>) -> Result<CachedToken, HandlerError> {
        let s = &self.settings;
        let claims = Claims {
            iss: &s.client_email,
            scope: SCOPE,
            aud: s.token_url.as_str(),
            iat: now.timestamp(),
            exp: now.timestamp() + ASSERTION_LIFETIME_SECS,
            sub: s.subject.as_deref(),
        };
        let mut header = Header::new(Algorithm::RS256);
        header.kid = s.private_key_id.clone();
        let assertion = jsonwebtoken::encode(&header, &claims, &self.key)
            .map_err(|_| HandlerError::permanent("google oauth: cannot sign the assertion"))?;
        let response = self
            .client
            .post(s.token_url.clone())
            .form(&[
                ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
                ("assertion", assertion.as_str()),
            ])
            .send()
            .await
            .map_err(|e| classify::transport_failure("google oauth", &e))?;
        let status = response.status();
        let retry_after = classify::retry_after(response.headers(), Utc::now());
        let bytes = response.bytes().await.unwrap_or_default();
        if status.is_success() {
            let token: TokenResponse = serde_json::from_slice(&bytes).map_err(|_| {
                HandlerError::retryable("google oauth: the token answer has no access_token")
            })?;
            tracing::debug!(channel = "google_calendar", "access token fetched");
            return Ok(CachedToken {
                token: SecretString::from(token.access_token),
                expires_at: now + ChronoDuration::seconds(token.expires_in.unwrap_or(3600)),
            });
        }
        let detail = serde_json::from_slice::<OAuthError>(&bytes)
            .map(|e| ProviderDetail {
                code: e.error,
                message: e.error_description,
            })
            .unwrap_or_default();
        Err(classify::http_failure(
            "google oauth",
            status,
            retry_after,
            &detail,
        ))
    }

    /// The Calendar event of an appointment.
    fn event(
        &self,
        event_id: &str,
        google_id: &str,
        data: Option<&Value>,
    ) -> Result<Value, HandlerError> {
        let data = data.ok_or_else(|| HandlerError::permanent("appointment_data is required"))?;
        // Checked at enqueue; checked again here for tasks enqueued before that check existed.
        let a = Appointment::parse("appointment_data", data)
            .map_err(|e| HandlerError::permanent(e.to_string()))?;
        let time_zone = a.time_zone.as_deref().unwrap_or(&self.settings.time_zone);
        let end = a.ends_at.unwrap_or_else(|| {
            let minutes = a
                .duration_minutes
                .unwrap_or(i64::from(self.settings.appointment_minutes));
            a.starts_at.plus_minutes(minutes)
        });
        let mut event = json!({
            "id": google_id,
            "summary": a.summary.as_deref().unwrap_or("Cita"),
            "start": {"dateTime": a.starts_at.to_string(), "timeZone": time_zone},
            "end": {"dateTime": end.to_string(), "timeZone": time_zone},
            "status": "confirmed",
            "extendedProperties": {"private": {"arnela_event_id": event_id}},
        });
        if let Some(d) = &a.description {
            event["description"] = json!(d);
        }
        if let Some(l) = &a.location {
            event["location"] = json!(l);
        }
        if !a.attendees.is_empty() {
            event["attendees"] =
                Value::Array(a.attendees.iter().map(|e| json!({"email": e})).collect());
        }
        Ok(event)
    }
}

fn margin() -> ChronoDuration {
    ChronoDuration::from_std(TOKEN_REFRESH_MARGIN).unwrap_or_else(|_| ChronoDuration::seconds(60))
}

/// Whether a Calendar request still has to take its turn with the rate limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Turn {
    /// The worker took it before the attempt's time limit started.
    Taken,
    Take,
}

/// The failure of a Calendar API answer. Google signals rate limits with 403 and a reason.
fn api_failure(a: &Answer) -> HandlerError {
    let parsed = serde_json::from_value::<ApiErrorBody>(a.body.clone()).ok();
    let reason = parsed
        .as_ref()
        .and_then(|b| b.error.errors.iter().find_map(|e| e.reason.clone()));
    let detail = ProviderDetail {
        code: reason
            .clone()
            .or_else(|| parsed.as_ref().and_then(|b| b.error.status.clone())),
        message: parsed.and_then(|b| b.error.message),
    };
    let throttled = a.status == StatusCode::FORBIDDEN
        && matches!(
            reason.as_deref(),
            Some("rateLimitExceeded" | "userRateLimitExceeded" | "quotaExceeded")
        );
    let failure = classify::http_failure("google calendar", a.status, a.retry_after, &detail);
    if throttled {
        return HandlerError::Retryable {
            message: classify::message_of(&failure).to_owned(),
            retry_after: a.retry_after,
        };
    }
    failure
}

impl Handler for GoogleCalendarChannel {
    fn handle<'a>(&'a self, task: &'a TaskContext) -> BoxFuture<'a, HandlerResult> {
        Box::pin(self.sync(task))
    }

    fn slot<'a>(&'a self, _task: &'a TaskContext) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            self.limiter
                .acquire()
                .await
                .map_err(|e| HandlerError::retryable(format!("rate limiter unavailable: {e}")))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_ids_are_stable_and_use_only_characters_google_allows() {
        let id = calendar_event_id("appointment-42");
        assert_eq!(id, calendar_event_id("appointment-42"));
        assert_ne!(id, calendar_event_id("appointment-43"));
        assert_eq!(id.len(), 64);
        assert!(id.chars().all(|c| matches!(c, '0'..='9' | 'a'..='v')));
    }

    #[test]
    fn google_rate_limits_on_403_are_retryable() {
        let answer = |status: u16, reason: &str| Answer {
            status: StatusCode::from_u16(status).unwrap(),
            retry_after: None,
            body: json!({"error": {"code": status, "message": "m", "errors": [{"reason": reason}]}}),
        };
        assert!(matches!(
            api_failure(&answer(403, "rateLimitExceeded")),
            HandlerError::Retryable { .. }
        ));
        assert_eq!(
            api_failure(&answer(403, "forbiddenForServiceAccounts")),
            HandlerError::permanent(
                "google calendar: HTTP 403, code forbiddenForServiceAccounts: m"
            )
        );
    }
}
