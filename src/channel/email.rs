//! E-mail (`send_email`) over SMTP (lettre) or the SendGrid v3 mail-send API.
//!
//! Every message has an HTML part and a plain-text alternative: a template renders both; a
//! literal `body` that contains HTML gets a text part made from it, and a plain-text body gets a
//! minimal HTML part. The recipient, subject and the provider's message id are recorded in the
//! success event (SMTP: the `Message-ID` this service sets, derived from the idempotency key, and
//! the server's reply; SendGrid: `X-Message-Id`). SendGrid receives the task id and idempotency
//! key as `custom_args`, so its event webhooks can be tied back to the task.
//!
//! SMTP replies are classified like HTTP statuses: 5xx (unknown mailbox, rejected, bad
//! credentials) is permanent, 4xx (greylisting, mailbox busy), timeouts and connection failures
//! are retryable.

use crate::telemetry;
use futures::future::BoxFuture;
use lettre::message::{header::ContentType, Mailbox, MultiPart, SinglePart};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::AsyncSmtpTransport;
use lettre::{AsyncTransport, Message, Tokio1Executor};
use reqwest::Url;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;
use tracing::Instrument;

use super::classify::{self, ProviderDetail};
use super::ratelimit::RateLimiter;
use super::template::{RenderedEmail, TemplateRef, Templates};
use super::{http_client, ChannelError};
use crate::config::channels::{EmailSettings, EmailTransport, SmtpTls};
use crate::worker::handler::{Handler, HandlerError, HandlerResult, TaskContext};
use crate::worker::log_channel::mask_email;
use secrecy::{ExposeSecret, SecretString};

/// Sends one task's e-mail.
pub struct EmailChannel {
    from: Mailbox,
    transport: Transport,
    templates: Arc<Templates>,
    limiter: RateLimiter,
}

enum Transport {
    Smtp(AsyncSmtpTransport<Tokio1Executor>),
    SendGrid {
        client: reqwest::Client,
        url: Url,
        api_key: SecretString,
    },
}

#[derive(Deserialize)]
struct SendGridErrors {
    #[serde(default)]
    errors: Vec<SendGridError>,
}

#[derive(Deserialize)]
struct SendGridError {
    message: Option<String>,
    field: Option<String>,
}

impl EmailChannel {
    pub fn new(
        settings: EmailSettings,
        templates: Arc<Templates>,
    ) -> Result<EmailChannel, ChannelError> {
        let address = settings.from.parse()?;
        let from = Mailbox::new(settings.from_name.clone(), address);
        let transport = match settings.transport {
            EmailTransport::Smtp(smtp) => {
                let builder = match smtp.tls {
                    SmtpTls::StartTls => {
                        AsyncSmtpTransport::<Tokio1Executor>::starttls_relay(&smtp.host)?
                    }
                    SmtpTls::Tls => AsyncSmtpTransport::<Tokio1Executor>::relay(&smtp.host)?,
                    SmtpTls::None => {
                        AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&smtp.host)
                    }
                };
                let mut builder = builder.port(smtp.port).timeout(Some(settings.timeout));
                if let Some(user) = smtp.username {
                    builder = builder.credentials(Credentials::new(
                        user,
                        smtp.password.expose_secret().to_owned(),
                    ));
                }
                Transport::Smtp(builder.build())
            }
            EmailTransport::SendGrid(sg) => {
                let mut url = sg.base_url.clone();
                url.path_segments_mut()
                    .map_err(|()| ChannelError::BaseUrl("SENDGRID_BASE_URL"))?
                    .pop_if_empty()
                    .extend(["v3", "mail", "send"]);
                Transport::SendGrid {
                    client: http_client(settings.timeout)?,
                    url,
                    api_key: sg.api_key,
                }
            }
        };
        Ok(EmailChannel {
            from,
            transport,
            templates,
            limiter: RateLimiter::new(settings.rate_limit),
        })
    }

    /// Replaces the rate limiter (the service gives every process one shared on Redis).
    pub fn with_limiter(mut self, limiter: RateLimiter) -> EmailChannel {
        self.limiter = limiter;
        self
    }

    pub fn name(&self) -> &'static str {
        match self.transport {
            Transport::Smtp(_) => "smtp",
            Transport::SendGrid { .. } => "sendgrid",
        }
    }

    async fn send(&self, task: &TaskContext) -> HandlerResult {
        let to = task
            .payload
            .get("to")
            .and_then(Value::as_str)
            .ok_or_else(|| HandlerError::permanent("payload has no recipient"))?;
        let content = match TemplateRef::of(&task.payload) {
            Some(t) => self.templates.email(t)?,
            None => literal(&task.payload)?,
        };
        let result = match &self.transport {
            Transport::Smtp(smtp) => self.smtp(smtp, task, to, &content).await,
            Transport::SendGrid {
                client,
                url,
                api_key,
            } => {
                self.sendgrid(client, url, api_key, task, to, &content)
                    .await
            }
        };
        let masked = mask_email(to);
        match &result {
            Ok(v) => tracing::info!(
                channel = self.name(),
                recipient = %masked,
                message_id = v["message_id"].as_str().unwrap_or_default(),
                "e-mail sent"
            ),
            Err(e) => tracing::warn!(
                channel = self.name(),
                recipient = %masked,
                error = classify::mask_in(classify::message_of(e).to_owned(), to, &masked),
                "e-mail not sent"
            ),
        }
        result.map(|mut v| {
            v["to"] = json!(to);
            v["subject"] = json!(content.subject);
            v
        })
    }

    async fn smtp(
        &self,
        smtp: &AsyncSmtpTransport<Tokio1Executor>,
        task: &TaskContext,
        to: &str,
        content: &RenderedEmail,
    ) -> HandlerResult {
        let to: Mailbox = to
            .parse()
            .map_err(|e| HandlerError::permanent(format!("smtp: invalid recipient: {e}")))?;
        // Stable across redeliveries of one attempt, distinct between attempts.
        let message_id = format!(
            "<{}.{}@{}>",
            task.task_id,
            task.attempt,
            self.from.email.domain()
        );
        let message = Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(content.subject.clone())
            .message_id(Some(message_id.clone()))
            .multipart(
                MultiPart::alternative()
                    .singlepart(
                        SinglePart::builder()
                            .header(ContentType::TEXT_PLAIN)
                            .body(content.text.clone()),
                    )
                    .singlepart(
                        SinglePart::builder()
                            .header(ContentType::TEXT_HTML)
                            .body(content.html.clone()),
                    ),
            )
            .map_err(|e| HandlerError::permanent(format!("smtp: cannot build the message: {e}")))?;
        let response = smtp
            .send(message)
            .instrument(telemetry::client_span("smtp", "send"))
            .await
            .map_err(|e| smtp_failure(&e))?;
        Ok(json!({
            "channel": "smtp",
            "message_id": message_id,
            "smtp_reply": format!("{} {}", response.code(), response.message().collect::<Vec<_>>().join(" ")),
        }))
    }

    async fn sendgrid(
        &self,
        client: &reqwest::Client,
        url: &Url,
        api_key: &SecretString,
        task: &TaskContext,
        to: &str,
        content: &RenderedEmail,
    ) -> HandlerResult {
        let mut from = json!({"email": self.from.email.to_string()});
        if let Some(name) = &self.from.name {
            from["name"] = json!(name);
        }
        let body = json!({
            "personalizations": [{
                "to": [{"email": to}],
                "custom_args": {
                    "arnela_task_id": task.task_id.to_string(),
                    "arnela_idempotency_key": task.idempotency_key,
                },
            }],
            "from": from,
            "subject": content.subject,
            // text/plain must come first.
            "content": [
                {"type": "text/plain", "value": content.text},
                {"type": "text/html", "value": content.html},
            ],
        });
        let request = client
            .post(url.clone())
            .bearer_auth(api_key.expose_secret())
            .json(&body);
        let response = async { telemetry::traced(request).send().await }
            .instrument(telemetry::client_span("sendgrid", "send mail"))
            .await
            .map_err(|e| classify::transport_failure("sendgrid", &e))?;
        let status = response.status();
        if status.is_success() {
            let id = response
                .headers()
                .get("x-message-id")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            return Ok(json!({"channel": "sendgrid", "message_id": id}));
        }
        let retry_after = classify::retry_after(response.headers(), chrono::Utc::now());
        let body = response.bytes().await.unwrap_or_default();
        let detail = serde_json::from_slice::<SendGridErrors>(&body)
            .map(|e| ProviderDetail {
                code: e.errors.iter().find_map(|e| e.field.clone()),
                message: Some(
                    e.errors
                        .iter()
                        .filter_map(|e| e.message.as_deref())
                        .collect::<Vec<_>>()
                        .join("; "),
                )
                .filter(|m| !m.is_empty()),
            })
            .unwrap_or_default();
        Err(classify::http_failure(
            "sendgrid",
            status,
            retry_after,
            &detail,
        ))
    }
}

impl Handler for EmailChannel {
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

/// 5xx replies and refusals of our own message are permanent; the rest may pass later.
fn smtp_failure(e: &lettre::transport::smtp::Error) -> HandlerError {
    let message = format!("smtp: {}", classify::truncate(&e.to_string(), 400));
    if e.is_permanent() || e.is_client() {
        HandlerError::permanent(message)
    } else {
        HandlerError::retryable(message)
    }
}

/// The parts of a literal `subject` + `body` message.
fn literal(payload: &Value) -> Result<RenderedEmail, HandlerError> {
    let text = |k: &str| {
        payload
            .get(k)
            .and_then(Value::as_str)
            .ok_or_else(|| HandlerError::permanent(format!("payload has no {k}")))
    };
    let subject = text("subject")?.to_owned();
    let body = text("body")?;
    let (html, text) = if looks_like_html(body) {
        (body.to_owned(), html_to_text(body)?)
    } else {
        (text_to_html(body), body.to_owned())
    };
    Ok(RenderedEmail {
        subject,
        text,
        html,
    })
}

fn looks_like_html(s: &str) -> bool {
    let lower = s.to_ascii_lowercase();
    [
        "<p", "<br", "<div", "<html", "<table", "<a ", "<strong", "<b>", "<ul", "<h1", "<h2",
        "<span",
    ]
    .iter()
    .any(|t| lower.contains(t))
}

/// Plain text as a minimal HTML document: escaped, paragraphs and line breaks kept.
fn text_to_html(text: &str) -> String {
    let escaped = text
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;");
    let paragraphs: Vec<String> = escaped
        .split("\n\n")
        .map(|p| format!("<p>{}</p>", p.trim().replace('\n', "<br>\n")))
        .collect();
    format!(
        "<!DOCTYPE html>\n<html>\n<head><meta charset=\"utf-8\"></head>\n<body>\n{}\n</body>\n</html>",
        paragraphs.join("\n")
    )
}

/// The readable text of an HTML body (html2text's plain rendering without decorations: markup
/// and styles dropped, paragraphs and line breaks kept, entities decoded), without trailing
/// white space on lines. A body it cannot render is a permanent failure of the task.
fn html_to_text(html: &str) -> Result<String, HandlerError> {
    let text = html2text::config::plain_no_decorate()
        .no_link_wrapping()
        .string_from_read(html.as_bytes(), 10_000)
        .map_err(|e| HandlerError::permanent(format!("the HTML body cannot be read: {e}")))?;
    // a non-breaking space is a space to a reader of plain text
    let lines: Vec<String> = text
        .lines()
        .map(|l| l.replace('\u{a0}', " ").trim_end().to_owned())
        .collect();
    Ok(lines.join("\n").trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_html_body_gets_a_text_alternative() {
        let html = "<html><head><style>p {color: red}</style></head><body><p>Hola Ana,</p><p>Su cita es el <b>lunes</b>&nbsp;a las 10:00.<br>Gracias &amp; hasta pronto</p></body></html>";
        assert_eq!(
            html_to_text(html).unwrap(),
            "Hola Ana,\n\nSu cita es el lunes a las 10:00.\nGracias & hasta pronto"
        );
        let r = literal(&json!({"subject": "Cita", "body": html})).unwrap();
        assert_eq!(r.html, html);
    }

    #[test]
    fn a_text_body_gets_an_escaped_html_part() {
        let r =
            literal(&json!({"subject": "Cita", "body": "Hola <Ana>,\n\nsu cita & más.\nAdiós"}))
                .unwrap();
        assert_eq!(r.text, "Hola <Ana>,\n\nsu cita & más.\nAdiós");
        assert!(
            r.html
                .contains("<p>Hola &lt;Ana&gt;,</p>\n<p>su cita &amp; más.<br>\nAdiós</p>"),
            "{}",
            r.html
        );
    }
}
