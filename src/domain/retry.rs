//! The retry policy: exponential backoff with full jitter and a cap.
//!
//! The delay before attempt `n + 1` is a uniform draw from `[0, min(cap, base * 2^(n-1))]`
//! ("full jitter"), so retries of many tasks that failed together spread out instead of
//! arriving together. A provider's own `Retry-After` wins when it is longer. The caller passes
//! the random draw in, so the policy is deterministic under test.

use std::sync::Arc;
use std::time::Duration;

use super::task::RetryDecision;

/// Source of the uniform draw in `[0, 1)` for the jitter (injected in tests).
pub type Jitter = Arc<dyn Fn() -> f64 + Send + Sync>;

/// Backoff settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// The ceiling of the first retry's delay.
    pub base_ms: i64,
    /// No delay is ever longer than this.
    pub cap_ms: i64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            base_ms: 1_000,
            cap_ms: 10 * 60 * 1_000,
        }
    }
}

impl RetryPolicy {
    /// When to deliver the next attempt after `failed_attempt` failed: the delay drawn with
    /// `jitter`, at least the handler's `retry_after` (a provider's `Retry-After`).
    pub fn decision(
        &self,
        failed_attempt: i32,
        jitter: &Jitter,
        retry_after: Option<Duration>,
    ) -> RetryDecision {
        let requested = retry_after.map(|d| d.as_millis().min(i64::MAX as u128) as i64);
        RetryDecision::RetryAfterMs(self.delay_ms(failed_attempt, jitter(), requested))
    }

    /// The ceiling of the delay after `failed_attempt` (1-based) failed.
    pub fn ceiling_ms(&self, failed_attempt: i32) -> i64 {
        let exp = failed_attempt.clamp(1, 63) as u32 - 1;
        self.base_ms
            .checked_mul(1_i64.checked_shl(exp).unwrap_or(i64::MAX))
            .unwrap_or(i64::MAX)
            .min(self.cap_ms)
    }

    /// The delay after `failed_attempt` failed, given `unit` drawn uniformly from `[0, 1)` and
    /// the handler's requested minimum (a provider's `Retry-After`), if any.
    pub fn delay_ms(&self, failed_attempt: i32, unit: f64, requested_ms: Option<i64>) -> i64 {
        let unit = if unit.is_finite() {
            unit.clamp(0.0, 1.0)
        } else {
            0.0
        };
        let jittered = (self.ceiling_ms(failed_attempt) as f64 * unit).round() as i64;
        match requested_ms {
            Some(r) => jittered.max(r.clamp(0, self.cap_ms)),
            None => jittered,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ceiling_doubles_until_the_cap() {
        let p = RetryPolicy {
            base_ms: 1000,
            cap_ms: 5000,
        };
        let ceilings: Vec<i64> = (1..=5).map(|n| p.ceiling_ms(n)).collect();
        assert_eq!(ceilings, [1000, 2000, 4000, 5000, 5000]);
        assert_eq!(p.ceiling_ms(10_000), 5000);
    }

    #[test]
    fn full_jitter_spans_zero_to_the_ceiling() {
        let p = RetryPolicy {
            base_ms: 1000,
            cap_ms: 60_000,
        };
        assert_eq!(p.delay_ms(3, 0.0, None), 0);
        assert_eq!(p.delay_ms(3, 0.5, None), 2000);
        assert_eq!(p.delay_ms(3, 1.0, None), 4000);
        assert_eq!(p.delay_ms(3, f64::NAN, None), 0);
    }

    #[test]
    fn a_provider_retry_after_is_honoured_up_to_the_cap() {
        let p = RetryPolicy {
            base_ms: 1000,
            cap_ms: 60_000,
        };
        assert_eq!(p.delay_ms(1, 0.1, Some(30_000)), 30_000);
        assert_eq!(p.delay_ms(1, 0.1, Some(999_999)), 60_000);
        assert_eq!(p.delay_ms(1, 1.0, Some(10)), 1000);
    }
}
