//! W3C trace context (`traceparent`, `tracestate`): the trace a task belongs to, carried from
//! the request that enqueued it to every attempt and provider call.

use serde::{Deserialize, Serialize};

/// Longest `tracestate` kept (the W3C limit); a longer or unprintable one is dropped.
pub const MAX_TRACESTATE: usize = 512;

/// A validated trace context.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceContext {
    /// `00-{trace id: 32 hex}-{parent id: 16 hex}-{flags: 2 hex}`, lowercase.
    pub traceparent: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracestate: Option<String>,
}

impl TraceContext {
    /// Reads the headers as the W3C recommendation says: an invalid `traceparent` is ignored
    /// (`None`: the caller starts a new trace); an invalid `tracestate` is dropped. A future
    /// version's header is read as version 00 when its first fields are well formed.
    pub fn parse(traceparent: &str, tracestate: Option<&str>) -> Option<TraceContext> {
        let t = traceparent.trim();
        let parts: Vec<&str> = t.split('-').collect();
        if parts.len() < 4 {
            return None;
        }
        let hex = |s: &str, n: usize| {
            s.len() == n
                && s.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        let (version, trace_id, parent_id, flags) = (parts[0], parts[1], parts[2], parts[3]);
        let known = version == "00";
        if !hex(version, 2) || version == "ff" || (known && parts.len() != 4) {
            return None;
        }
        if !hex(trace_id, 32) || trace_id.bytes().all(|b| b == b'0') {
            return None;
        }
        if !hex(parent_id, 16) || parent_id.bytes().all(|b| b == b'0') {
            return None;
        }
        if !hex(flags, 2) {
            return None;
        }
        let tracestate = tracestate
            .map(str::trim)
            .filter(|s| {
                !s.is_empty()
                    && s.len() <= MAX_TRACESTATE
                    && s.bytes().all(|b| (0x20..0x7f).contains(&b))
            })
            .map(str::to_owned);
        Some(TraceContext {
            traceparent: format!("00-{trace_id}-{parent_id}-{flags}"),
            tracestate,
        })
    }

    /// A new trace: random trace and parent ids, sampled.
    pub fn new_root() -> TraceContext {
        let trace: u128 = rand::random_range(1..=u128::MAX);
        let span: u64 = rand::random_range(1..=u64::MAX);
        TraceContext::from_ids(trace, span, true, None)
    }

    /// The context of span `span_id` in trace `trace_id`.
    pub fn from_ids(
        trace_id: u128,
        span_id: u64,
        sampled: bool,
        tracestate: Option<String>,
    ) -> TraceContext {
        TraceContext {
            traceparent: format!(
                "00-{trace_id:032x}-{span_id:016x}-{:02x}",
                u8::from(sampled)
            ),
            tracestate,
        }
    }

    /// The trace id (32 hex digits).
    pub fn trace_id(&self) -> &str {
        self.traceparent.get(3..35).unwrap_or("")
    }

    /// The id of the span the next span is a child of (16 hex digits).
    pub fn parent_id(&self) -> &str {
        self.traceparent.get(36..52).unwrap_or("")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_header_is_kept_with_its_state() {
        let t = TraceContext::parse(VALID, Some("congo=t61rcWkgMzE")).unwrap();
        assert_eq!(t.traceparent, VALID);
        assert_eq!(t.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(t.parent_id(), "00f067aa0ba902b7");
        assert_eq!(t.tracestate.as_deref(), Some("congo=t61rcWkgMzE"));
    }

    #[test]
    fn invalid_headers_are_ignored() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceContext::parse(bad, None), None, "{bad:?}");
        }
        // a later version with more fields is read as 00
        let t = TraceContext::parse(
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-comes",
            None,
        )
        .unwrap();
        assert_eq!(t.traceparent, VALID);
        // an unprintable state is dropped, the parent kept
        let t = TraceContext::parse(VALID, Some("a=\u{1}")).unwrap();
        assert_eq!(t.tracestate, None);
    }

    #[test]
    fn new_roots_are_valid_and_distinct() {
        let a = TraceContext::new_root();
        let b = TraceContext::new_root();
        assert_eq!(TraceContext::parse(&a.traceparent, None), Some(a.clone()));
        assert_ne!(a.trace_id(), b.trace_id());
    }
}
