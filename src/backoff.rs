//! The one retry pause of the service's loops (relay, worker fetcher, projectors) after a failed
//! step: doubling from a base up to a cap, so a short outage is retried at once and a long one
//! costs a request every few seconds.

use std::time::Duration;

/// Doubling pauses: `base` after the first failure, `2 × base` after the second, ... at most
/// `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
}

impl Backoff {
    /// The pause of the loops that step on a database or Redis: 100 ms doubling to 5 s.
    pub const LOOP: Backoff = Backoff {
        base: Duration::from_millis(100),
        max: Duration::from_secs(5),
    };

    /// The pause after `failures` consecutive failed steps (none after none).
    pub fn delay(self, failures: u32) -> Duration {
        match failures {
            0 => Duration::ZERO,
            n => self
                .base
                .saturating_mul(2u32.saturating_pow((n - 1).min(30)))
                .min(self.max),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_double_up_to_the_cap() {
        let b = Backoff::LOOP;
        let ms: Vec<u128> = (0..9).map(|n| b.delay(n).as_millis()).collect();
        assert_eq!(ms, [0, 100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        assert_eq!(b.delay(u32::MAX), Duration::from_secs(5));
    }
}
