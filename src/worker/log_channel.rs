//! The `log` channel: records what would be sent instead of sending it. Used where no provider
//! is configured (development, the compose stack) and for load tests, where `delay` simulates a
//! provider's latency.

use futures::future::BoxFuture;
use serde_json::json;
use std::time::Duration;

use super::handler::{Handler, HandlerResult, TaskContext};
use crate::domain::TaskType;

/// Logs each message (recipients masked) and reports success.
#[derive(Debug, Clone, Default)]
pub struct LogChannel {
    pub delay: Duration,
}

impl Handler for LogChannel {
    fn handle<'a>(&'a self, task: &'a TaskContext) -> BoxFuture<'a, HandlerResult> {
        Box::pin(async move {
            if !self.delay.is_zero() {
                tokio::time::sleep(self.delay).await;
            }
            let p = &task.payload;
            let text = |k: &str| p.get(k).and_then(|v| v.as_str()).unwrap_or_default();
            let (recipient, what) = match task.task_type {
                TaskType::SendEmail => (mask_email(text("to")), text("subject").chars().count()),
                TaskType::SendSms | TaskType::SendWhatsapp => {
                    (mask_phone(text("phone")), text("message").chars().count())
                }
                TaskType::SyncCalendar => (text("event_id").to_owned(), 0),
            };
            tracing::info!(
                channel = "log",
                task.id = %task.task_id,
                task.r#type = %task.task_type,
                attempt = task.attempt,
                recipient = %recipient,
                chars = what,
                "would send"
            );
            Ok(json!({
                "channel": "log",
                "message_id": format!("log-{}", task.idempotency_key),
            }))
        })
    }
}

/// `ana.garcia@clinic.es` → `a***@clinic.es`.
pub fn mask_email(s: &str) -> String {
    match s.split_once('@') {
        Some((local, domain)) => {
            let first: String = local.chars().take(1).collect();
            format!("{first}***@{domain}")
        }
        None => "***".into(),
    }
}

/// `+34123456789` → `+34*****789`.
pub fn mask_phone(s: &str) -> String {
    let chars: Vec<char> = s.chars().collect();
    if chars.len() <= 6 {
        return "***".into();
    }
    let head: String = chars[..3].iter().collect();
    let tail: String = chars[chars.len() - 3..].iter().collect();
    format!("{head}{}{tail}", "*".repeat(chars.len() - 6))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recipients_are_masked() {
        assert_eq!(mask_email("ana.garcia@clinic.es"), "a***@clinic.es");
        assert_eq!(mask_email("nope"), "***");
        assert_eq!(mask_phone("+34123456789"), "+34******789");
        assert_eq!(mask_phone("+3412"), "***");
    }
}
