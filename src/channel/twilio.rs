//! SMS and WhatsApp through the Twilio Messages API.
//!
//! `POST {base}/2010-04-01/Accounts/{AccountSid}/Messages.json`, form-encoded `To`, `Body` and
//! `From` or `MessagingServiceSid`, with HTTP basic auth (account SID + auth token, or API key
//! SID + secret). WhatsApp addresses are `whatsapp:+<E.164>`. Twilio answers `201` with the
//! message `sid` and `status` (`queued`, `accepted`…), which are recorded in the success event.
//! Twilio takes no idempotency key: a retry after a timeout may send a second message, which is
//! why a timeout is only retried (by the engine's retry policy) and never repeated in place.

use crate::telemetry;
use futures::future::BoxFuture;
use reqwest::{StatusCode, Url};
use secrecy::ExposeSecret;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;
use tracing::Instrument;

use super::classify::{self, ProviderDetail};
use super::ratelimit::RateLimiter;
use super::template::{TemplateRef, Templates, TextMedium};
use super::{http_client, ChannelError};
use crate::config::channels::{TwilioSender, TwilioSettings};
use crate::worker::handler::{Handler, HandlerError, HandlerResult, TaskContext};
use crate::worker::log_channel::mask_phone;

/// Sends one task's SMS or WhatsApp message.
pub struct TwilioChannel {
    client: reqwest::Client,
    settings: TwilioSettings,
    medium: TextMedium,
    messages_url: Url,
    templates: Arc<Templates>,
    limiter: Arc<RateLimiter>,
}

#[derive(Deserialize)]
struct Created {
    sid: Option<String>,
    status: Option<String>,
}

#[derive(Deserialize)]
struct TwilioError {
    code: Option<Value>,
    message: Option<String>,
}

impl TwilioChannel {
    /// `limiter` is shared by every channel on the same Twilio account.
    pub fn new(
        settings: TwilioSettings,
        medium: TextMedium,
        templates: Arc<Templates>,
        limiter: Arc<RateLimiter>,
    ) -> Result<TwilioChannel, ChannelError> {
        let mut messages_url = settings.base_url.clone();
        messages_url
            .path_segments_mut()
            .map_err(|()| ChannelError::BaseUrl("TWILIO_BASE_URL"))?
            .pop_if_empty()
            .extend([
                "2010-04-01",
                "Accounts",
                &settings.account_sid,
                "Messages.json",
            ]);
        Ok(TwilioChannel {
            client: http_client(settings.timeout)?,
            settings,
            medium,
            messages_url,
            templates,
            limiter,
        })
    }

    fn name(&self) -> &'static str {
        match self.medium {
            TextMedium::Sms => "twilio_sms",
            TextMedium::Whatsapp => "twilio_whatsapp",
        }
    }

    fn address(&self, number: &str) -> String {
        match self.medium {
            TextMedium::Sms => number.to_owned(),
            TextMedium::Whatsapp => format!("whatsapp:{number}"),
        }
    }

    async fn send(&self, task: &TaskContext) -> HandlerResult {
        let phone = task
            .payload
            .get("phone")
            .and_then(Value::as_str)
            .ok_or_else(|| HandlerError::permanent("payload has no phone"))?;
        let body = match TemplateRef::of(&task.payload) {
            Some(t) => self.templates.text(t, self.medium)?,
            None => task
                .payload
                .get("message")
                .and_then(Value::as_str)
                .ok_or_else(|| HandlerError::permanent("payload has no message"))?
                .to_owned(),
        };
        let to = self.address(phone);
        let mut form = vec![("To", to.clone()), ("Body", body)];
        match &self.settings.sender {
            TwilioSender::From(number) => form.push(("From", self.address(number))),
            TwilioSender::MessagingService(sid) => form.push(("MessagingServiceSid", sid.clone())),
        }

        let masked = mask_phone(phone);
        let result = self.post(&form).await;
        match &result {
            Ok(v) => tracing::info!(
                channel = self.name(),
                recipient = %masked,
                message_sid = v["message_sid"].as_str().unwrap_or_default(),
                status = v["status"].as_str().unwrap_or_default(),
                "message sent"
            ),
            Err(e) => tracing::warn!(
                channel = self.name(),
                recipient = %masked,
                error = classify::mask_in(classify::message_of(e).to_owned(), phone, &masked),
                "message not sent"
            ),
        }
        result.map(|mut v| {
            v["to"] = Value::String(to);
            v
        })
    }

    async fn post(&self, form: &[(&str, String)]) -> HandlerResult {
        let request = self
            .client
            .post(self.messages_url.clone())
            .basic_auth(
                &self.settings.auth_user,
                Some(self.settings.auth_secret.expose_secret()),
            )
            .form(form);
        let response = async { telemetry::traced(request).send().await }
            .instrument(telemetry::client_span("twilio", "create message"))
            .await
            .map_err(|e| classify::transport_failure("twilio", &e))?;
        let status = response.status();
        let retry_after = classify::retry_after(response.headers(), chrono::Utc::now());
        let body = response.bytes().await.unwrap_or_default();
        if status.is_success() {
            // Twilio has accepted the message: a body we cannot read must not cause a resend.
            let created: Created = serde_json::from_slice(&body).unwrap_or(Created {
                sid: None,
                status: None,
            });
            return Ok(json!({
                "channel": self.name(),
                "message_sid": created.sid,
                "status": created.status,
            }));
        }
        Err(failure(status, retry_after, &body))
    }
}

/// Twilio's error body is `{"code": 21211, "message": "...", "more_info": "...", "status": 400}`.
/// The text is kept as Twilio wrote it (it goes to the audit event; logs mask the number).
fn failure(
    status: StatusCode,
    retry_after: Option<std::time::Duration>,
    body: &[u8],
) -> HandlerError {
    let detail = serde_json::from_slice::<TwilioError>(body)
        .map(|e| ProviderDetail {
            code: e.code.map(|c| match c {
                Value::String(s) => s,
                other => other.to_string(),
            }),
            message: e.message,
        })
        .unwrap_or_default();
    classify::http_failure("twilio", status, retry_after, &detail)
}

impl Handler for TwilioChannel {
    fn handle<'a>(&'a self, task: &'a TaskContext) -> BoxFuture<'a, HandlerResult> {
        Box::pin(self.send(task))
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
    fn the_provider_code_and_text_are_recorded() {
        let body = br#"{"code": 21211, "message": "The 'To' number +34123456789 is not a valid phone number.", "status": 400}"#;
        let e = failure(StatusCode::BAD_REQUEST, None, body);
        assert_eq!(
            e,
            HandlerError::permanent(
                "twilio: HTTP 400, code 21211: The 'To' number +34123456789 is not a valid phone number."
            )
        );
    }

    #[test]
    fn an_unreadable_error_body_still_classifies() {
        let e = failure(StatusCode::BAD_GATEWAY, None, b"<html>");
        assert_eq!(e, HandlerError::retryable("twilio: HTTP 502"));
    }
}
