//! Delivery channels: the handlers that make tasks reach people and calendars.
//!
//! | task type | channel | provider |
//! |---|---|---|
//! | `send_email` | [`email`] | SMTP (lettre) or the SendGrid v3 mail-send API |
//! | `send_sms`, `send_whatsapp` | [`twilio`] | the Twilio Messages API |
//! | `sync_calendar` | [`google`] | the Google Calendar v3 events API, service-account token |
//!
//! A type whose provider is not configured goes to the `log` channel
//! ([`crate::worker::log_channel`]), which records what would be sent. [`crate::config::channels`]
//! reads the settings, [`template`] renders the clinic's messages, [`classify`] turns provider answers into
//! retryable or permanent failures, and [`ratelimit`] spaces requests to each provider.
//! [`build`] assembles one handler per task type; `App::registry` registers them.
//!
//! Handlers talk to providers over HTTPS with reqwest (rustls, no OpenSSL), each with its own
//! timeout; provider base URLs are configurable so that tests point them at local fakes.

pub mod classify;
pub mod email;
pub mod google;
pub mod ratelimit;
pub mod template;
pub mod twilio;

use futures::future::BoxFuture;
use std::sync::Arc;
use std::time::Duration;

pub use crate::config::channels::ChannelSettings;

use crate::domain::TaskType;
use crate::worker::handler::{Handler, HandlerError, HandlerResult, TaskContext};
use crate::worker::log_channel::LogChannel;
use ratelimit::RateLimiter;
use template::{Templates, TextMedium};

/// A channel that could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("cannot build the HTTP client: {0}")]
    Http(#[from] reqwest::Error),
    #[error("cannot set up SMTP: {0}")]
    Smtp(#[from] lettre::transport::smtp::Error),
    #[error("the sender address is not valid: {0}")]
    Address(#[from] lettre::address::AddressError),
    #[error("the Google service account key is not an RSA key in PEM format")]
    Key,
    #[error("{0} cannot be a base URL")]
    BaseUrl(&'static str),
    #[error("the message templates do not compile: {0}")]
    Template(String),
}

/// The handler of one task type, and the name of its channel (`smtp`, `sendgrid`, `twilio_sms`,
/// `twilio_whatsapp`, `google_calendar`, `log`, or `unavailable` when setting it up failed).
pub struct Channel {
    pub task_type: TaskType,
    pub name: &'static str,
    pub handler: Arc<dyn Handler>,
}

/// Where the rate limits live: on Redis under a key prefix (shared by every process, as the
/// service runs them), or in this process only.
pub enum RateScope {
    Cluster {
        conn: Box<crate::queue::RedisConn>,
        key_prefix: String,
    },
    Process,
}

impl RateScope {
    fn limiter(&self, per_second: f64, provider: &str) -> RateLimiter {
        match self {
            RateScope::Cluster { conn, key_prefix } => {
                RateLimiter::shared(per_second, (**conn).clone(), key_prefix, provider)
            }
            RateScope::Process => RateLimiter::new(per_second),
        }
    }
}

/// One handler per task type, as configured. Settings were validated at start-up, so setting a
/// channel up does not fail in practice; if it does, that type's tasks fail retryably with the
/// reason (and it is logged) rather than silently going to the log channel.
pub fn build(settings: &ChannelSettings, log: LogChannel, rates: &RateScope) -> Vec<Channel> {
    let log: Arc<dyn Handler> = Arc::new(log);
    let templates = Templates::new(settings.clinic_name.clone())
        .map(Arc::new)
        .map_err(|e| e.to_string());
    let twilio_limiter = Arc::new(rates.limiter(settings.twilio_rate_limit, "twilio"));
    TaskType::ALL
        .into_iter()
        .map(|task_type| {
            let name = settings.channel_name(task_type);
            if name == "log" {
                return Channel {
                    task_type,
                    name,
                    handler: log.clone(),
                };
            }
            let built: Result<Arc<dyn Handler>, ChannelError> = (|| {
                let templates = templates.clone().map_err(ChannelError::Template);
                Ok(match task_type {
                    TaskType::SendEmail => match &settings.email {
                        Some(s) => Arc::new(
                            email::EmailChannel::new(s.clone(), templates?)?
                                .with_limiter(rates.limiter(s.rate_limit, "email")),
                        ),
                        None => log.clone(),
                    },
                    TaskType::SendSms | TaskType::SendWhatsapp => {
                        let (s, medium) = if task_type == TaskType::SendSms {
                            (&settings.sms, TextMedium::Sms)
                        } else {
                            (&settings.whatsapp, TextMedium::Whatsapp)
                        };
                        match s {
                            Some(s) => Arc::new(twilio::TwilioChannel::new(
                                s.clone(),
                                medium,
                                templates?,
                                twilio_limiter.clone(),
                            )?),
                            None => log.clone(),
                        }
                    }
                    TaskType::SyncCalendar => match &settings.calendar {
                        Some(s) => Arc::new(
                            google::GoogleCalendarChannel::new(s.clone())?
                                .with_limiter(rates.limiter(s.rate_limit, "google_calendar")),
                        ),
                        None => log.clone(),
                    },
                })
            })();
            match built {
                Ok(handler) => Channel {
                    task_type,
                    name,
                    handler,
                },
                Err(e) => {
                    tracing::error!(task.r#type = %task_type, channel = name, error = %e, "cannot set up the delivery channel; its tasks will fail and be retried");
                    Channel {
                        task_type,
                        name: "unavailable",
                        handler: Arc::new(Unavailable {
                            reason: format!("{name} channel unavailable: {e}"),
                        }),
                    }
                }
            }
        })
        .collect()
}

/// The HTTP client of a provider: rustls, the provider's timeout, no redirects (an API does not
/// redirect, and a redirect must not carry credentials elsewhere).
pub(crate) fn http_client(timeout: Duration) -> Result<reqwest::Client, ChannelError> {
    Ok(reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(5)))
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("arnela/", env!("CARGO_PKG_VERSION")))
        .build()?)
}

/// Stands in for a channel that could not be set up: every task fails retryably.
struct Unavailable {
    reason: String,
}

impl Handler for Unavailable {
    fn handle<'a>(&'a self, _task: &'a TaskContext) -> BoxFuture<'a, HandlerResult> {
        Box::pin(async move { Err(HandlerError::retryable(self.reason.clone())) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_credentials_every_type_goes_to_the_log_channel() {
        let channels = build(
            &ChannelSettings::all_log(),
            LogChannel::default(),
            &RateScope::Process,
        );
        let names: Vec<(TaskType, &str)> = channels.iter().map(|c| (c.task_type, c.name)).collect();
        assert_eq!(names, TaskType::ALL.map(|t| (t, "log")).to_vec(),);
    }
}
