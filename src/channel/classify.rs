//! What a provider's answer means for the task, decided in one place for the HTTP providers.
//!
//! - 2xx: success (the caller reads the body).
//! - 408, 429 and 5xx: retryable, after the provider's `Retry-After` if it sent one.
//! - any other 4xx (bad number, invalid address, unauthorised, not found): permanent, with the
//!   provider's own code and message recorded.
//! - timeouts and connection failures: retryable.
//!
//! Provider-specific exceptions (Google's 403 `rateLimitExceeded`, a 409 on an idempotent create,
//! a 404 on a delete) are handled by each channel before it falls back to [`http_failure`].
//! Messages never contain credentials: request URLs are stripped from transport errors and
//! provider texts are cut to [`MAX_DETAIL_CHARS`]. Provider texts are kept as written (they may
//! quote the recipient, which audit events show unmasked); channels mask the recipient with
//! [`mask_in`] when they log a failure.

use chrono::{DateTime, Utc};
use reqwest::header::{HeaderMap, RETRY_AFTER};
use reqwest::StatusCode;
use std::time::Duration;

use crate::worker::handler::HandlerError;

/// The longest provider text copied into an error message.
pub const MAX_DETAIL_CHARS: usize = 300;
/// The longest `Retry-After` honoured (a provider asking for more is asked again after this).
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(6 * 3600);

/// The provider's own explanation of a refusal, parsed from its error body.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProviderDetail {
    pub code: Option<String>,
    pub message: Option<String>,
}

/// Does this status mean "try again later"?
pub fn is_retryable_status(status: StatusCode) -> bool {
    status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
        || status.is_server_error()
}

/// The failure for a non-success HTTP answer.
pub fn http_failure(
    provider: &str,
    status: StatusCode,
    retry_after: Option<Duration>,
    detail: &ProviderDetail,
) -> HandlerError {
    let mut message = format!("{provider}: HTTP {}", status.as_u16());
    if let Some(code) = &detail.code {
        message.push_str(&format!(", code {code}"));
    }
    if let Some(text) = &detail.message {
        message.push_str(": ");
        message.push_str(&truncate(text, MAX_DETAIL_CHARS));
    }
    if is_retryable_status(status) || !status.is_client_error() {
        HandlerError::Retryable {
            message,
            retry_after,
        }
    } else {
        HandlerError::Permanent { message }
    }
}

/// The failure for a request that got no HTTP answer (timeout, refused connection, TLS, a body
/// that could not be read). Always retryable: the provider may not have seen the request at all.
pub fn transport_failure(provider: &str, e: &reqwest::Error) -> HandlerError {
    let what = if e.is_timeout() {
        "request timed out".to_owned()
    } else if e.is_connect() {
        "cannot connect".to_owned()
    } else if e.is_body() || e.is_decode() {
        "cannot read the answer".to_owned()
    } else {
        // Without the URL: it can carry account identifiers.
        let mut text = String::from("request failed");
        let mut source = std::error::Error::source(e);
        if let Some(s) = source.take() {
            text.push_str(&format!(" ({})", truncate(&s.to_string(), 120)));
        }
        text
    };
    HandlerError::retryable(format!("{provider}: {what}"))
}

/// Reads `Retry-After` (seconds or an HTTP date), capped at [`MAX_RETRY_AFTER`].
pub fn retry_after(headers: &HeaderMap, now: DateTime<Utc>) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    let wait = match value.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => {
            let at = DateTime::parse_from_rfc2822(value).ok()?;
            (at.with_timezone(&Utc) - now)
                .to_std()
                .unwrap_or(Duration::ZERO)
        }
    };
    Some(wait.min(MAX_RETRY_AFTER))
}

/// Replaces `recipient` in `text` by `masked` (provider texts often quote the number or address).
pub fn mask_in(text: String, recipient: &str, masked: &str) -> String {
    if recipient.is_empty() {
        text
    } else {
        text.replace(recipient, masked)
    }
}

/// At most `max` characters of `s`, with an ellipsis when cut.
pub fn truncate(s: &str, max: usize) -> String {
    let s = s.trim();
    if s.chars().count() <= max {
        s.to_owned()
    } else {
        let mut cut: String = s.chars().take(max).collect();
        cut.push('…');
        cut
    }
}

/// The message of a failure, whatever its kind.
pub fn message_of(e: &HandlerError) -> &str {
    match e {
        HandlerError::Retryable { message, .. } | HandlerError::Permanent { message } => message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    fn detail(code: &str, message: &str) -> ProviderDetail {
        ProviderDetail {
            code: Some(code.into()),
            message: Some(message.into()),
        }
    }

    #[test]
    fn client_errors_are_permanent_with_the_provider_code() {
        for status in [400, 401, 403, 404, 422] {
            let e = http_failure(
                "twilio",
                StatusCode::from_u16(status).unwrap(),
                None,
                &detail("21211", "Invalid 'To' Phone Number"),
            );
            assert_eq!(
                e,
                HandlerError::permanent(format!(
                    "twilio: HTTP {status}, code 21211: Invalid 'To' Phone Number"
                ))
            );
        }
    }

    #[test]
    fn throttling_and_server_errors_are_retryable_after_the_providers_wait() {
        let wait = Some(Duration::from_secs(7));
        for status in [408, 429, 500, 502, 503] {
            let e = http_failure(
                "sendgrid",
                StatusCode::from_u16(status).unwrap(),
                wait,
                &ProviderDetail::default(),
            );
            assert_eq!(
                e,
                HandlerError::Retryable {
                    message: format!("sendgrid: HTTP {status}"),
                    retry_after: wait
                }
            );
        }
    }

    #[test]
    fn retry_after_is_read_as_seconds_or_a_date_and_capped() {
        let now = DateTime::parse_from_rfc3339("2026-01-01T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(RETRY_AFTER, HeaderValue::from_str(v).unwrap());
            retry_after(&h, now)
        };
        assert_eq!(with("30"), Some(Duration::from_secs(30)));
        assert_eq!(
            with("Thu, 01 Jan 2026 10:01:00 GMT"),
            Some(Duration::from_secs(60))
        );
        assert_eq!(with("Thu, 01 Jan 2026 09:00:00 GMT"), Some(Duration::ZERO));
        assert_eq!(with("99999999"), Some(MAX_RETRY_AFTER));
        assert_eq!(with("soon"), None);
        assert_eq!(retry_after(&HeaderMap::new(), now), None);
    }

    #[test]
    fn long_provider_texts_are_cut() {
        let e = http_failure(
            "google",
            StatusCode::BAD_REQUEST,
            None,
            &ProviderDetail {
                code: None,
                message: Some("x".repeat(1000)),
            },
        );
        assert!(message_of(&e).chars().count() < MAX_DETAIL_CHARS + 30);
        assert!(message_of(&e).ends_with('…'));
    }

    #[test]
    fn recipients_are_masked_in_provider_texts() {
        assert_eq!(
            mask_in("bad number +34123456789".into(), "+34123456789", "+34***"),
            "bad number +34***"
        );
    }
}
