//! A per-provider request rate limit, so a burst of tasks does not trip the provider's own limit
//! (and turn into a wave of 429s).
//!
//! Requests are spaced evenly: each caller reserves the next free slot (`1 / rate` after the
//! previous one) under a short lock and then waits for it without holding the lock. A limiter is
//! shared by every channel that talks to the same provider account (Twilio SMS and WhatsApp share
//! one), and across the workers of a process. It is per process: N worker processes may send N
//! times the rate, so configure `rate / processes`.

use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// Spaces requests at most `per_second` apart; `0` means no limit.
#[derive(Debug)]
pub struct RateLimiter {
    interval: Option<Duration>,
    next_free: Mutex<Option<Instant>>,
}

impl RateLimiter {
    /// A limiter allowing `per_second` requests a second (fractions allowed; `0` = unlimited).
    pub fn new(per_second: f64) -> RateLimiter {
        let interval = (per_second.is_finite() && per_second > 0.0)
            .then(|| Duration::from_secs_f64(1.0 / per_second));
        RateLimiter {
            interval,
            next_free: Mutex::new(None),
        }
    }

    /// A limiter that never waits.
    pub fn unlimited() -> RateLimiter {
        RateLimiter::new(0.0)
    }

    /// Waits until this caller's slot has come.
    pub async fn acquire(&self) {
        if let Some(slot) = self.reserve(Instant::now()) {
            tokio::time::sleep_until(slot).await;
        }
    }

    /// Reserves the next slot at or after `now`; `None` when the caller may go at once.
    fn reserve(&self, now: Instant) -> Option<Instant> {
        let interval = self.interval?;
        // A poisoned lock only means another caller panicked between two plain assignments.
        let mut next = self.next_free.lock().unwrap_or_else(|p| p.into_inner());
        let slot = match *next {
            Some(t) if t > now => t,
            _ => now,
        };
        *next = Some(slot + interval);
        (slot > now).then_some(slot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_is_spaced_by_the_interval() {
        let limiter = RateLimiter::new(4.0);
        let now = Instant::now();
        let slots: Vec<Option<Instant>> = (0..4).map(|_| limiter.reserve(now)).collect();
        let ms = Duration::from_millis;
        assert_eq!(
            slots,
            [
                None,
                Some(now + ms(250)),
                Some(now + ms(500)),
                Some(now + ms(750))
            ]
        );
    }

    #[test]
    fn an_idle_limiter_lets_the_next_request_go_at_once() {
        let limiter = RateLimiter::new(2.0);
        let now = Instant::now();
        assert_eq!(limiter.reserve(now), None);
        assert_eq!(limiter.reserve(now + Duration::from_secs(5)), None);
    }

    #[test]
    fn zero_means_unlimited() {
        let limiter = RateLimiter::new(0.0);
        let now = Instant::now();
        assert!((0..100).all(|_| limiter.reserve(now).is_none()));
        assert!(RateLimiter::unlimited().reserve(now).is_none());
    }
}
