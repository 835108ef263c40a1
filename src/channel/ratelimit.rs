//! A per-provider request rate limit, so a burst of tasks does not trip the provider's own limit
//! (and turn into a wave of 429s).
//!
//! Requests are spaced evenly, at most one per `1 / rate`. The limit is **cluster-wide** when
//! the limiter has Redis (as the service's limiters do): every process takes its turns from one
//! key, `{prefix}:ratelimit:{provider}`, holding the earliest time the next request may go (a
//! GCRA with no burst, decided by one script on Redis's clock). Without Redis (tests, tools) it
//! is per process. A limiter is shared by every channel that talks to the same provider account
//! (Twilio SMS and WhatsApp share one).
//!
//! A caller that has to wait reserves nothing: it sleeps until the next free time and asks
//! again. So a caller that stops waiting (its attempt was cancelled, its lease lost) leaves no
//! slot behind that would delay everyone after it. The worker waits for the slot **before** the
//! handler's time limit starts (see [`crate::worker::handler::Handler::slot`]), so a low
//! provider rate with many workers makes attempts wait, not time out.

use crate::queue::RedisConn;
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// Takes the next turn if it has come: returns 0, or how many milliseconds remain until it
/// comes (nothing is reserved then).
const TURN: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local interval = tonumber(ARGV[1])
local next_free = tonumber(redis.call('GET', KEYS[1]) or '0')
if next_free > now then
  return next_free - now
end
redis.call('SET', KEYS[1], now + interval, 'PX', interval + 60000)
return 0
"#;

enum Backend {
    /// The earliest time the next request of this process may go.
    Local(Mutex<Option<Instant>>),
    /// One key on Redis for every process.
    Redis(Box<Shared>),
}

struct Shared {
    conn: RedisConn,
    key: String,
    script: redis::Script,
}

/// Spaces requests at most `per_second` apart; `0` means no limit.
pub struct RateLimiter {
    interval: Option<Duration>,
    backend: Backend,
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scope = match &self.backend {
            Backend::Local(_) => "process",
            Backend::Redis(_) => "cluster",
        };
        f.debug_struct("RateLimiter")
            .field("interval", &self.interval)
            .field("scope", &scope)
            .finish()
    }
}

fn interval_of(per_second: f64) -> Option<Duration> {
    (per_second.is_finite() && per_second > 0.0)
        .then(|| Duration::from_secs_f64(1.0 / per_second).max(Duration::from_millis(1)))
}

impl RateLimiter {
    /// A per-process limiter allowing `per_second` requests a second (fractions allowed; `0` =
    /// unlimited).
    pub fn new(per_second: f64) -> RateLimiter {
        RateLimiter {
            interval: interval_of(per_second),
            backend: Backend::Local(Mutex::new(None)),
        }
    }

    /// A cluster-wide limiter: every process with the same `key_prefix` and `provider` shares
    /// the rate.
    pub fn shared(
        per_second: f64,
        conn: RedisConn,
        key_prefix: &str,
        provider: &str,
    ) -> RateLimiter {
        RateLimiter {
            interval: interval_of(per_second),
            backend: Backend::Redis(Box::new(Shared {
                conn,
                key: format!("{key_prefix}:ratelimit:{provider}"),
                script: redis::Script::new(TURN),
            })),
        }
    }

    /// A limiter that never waits.
    pub fn unlimited() -> RateLimiter {
        RateLimiter::new(0.0)
    }

    /// Waits until this caller's turn has come, and takes it. Dropping the future while it
    /// waits gives up nothing but the wait. A Redis error is returned (the caller decides:
    /// the worker fails the attempt retryably).
    pub async fn acquire(&self) -> Result<(), redis::RedisError> {
        let Some(interval) = self.interval else {
            return Ok(());
        };
        loop {
            let wait = match &self.backend {
                Backend::Local(next) => take_local(next, interval, Instant::now()),
                Backend::Redis(shared) => {
                    let mut c = shared.conn.clone();
                    let ms: u64 = shared
                        .script
                        .key(&shared.key)
                        .arg(interval.as_millis().max(1) as u64)
                        .invoke_async(&mut c)
                        .await?;
                    (ms > 0).then(|| Duration::from_millis(ms))
                }
            };
            match wait {
                None => return Ok(()),
                Some(d) => tokio::time::sleep(d).await,
            }
        }
    }
}

/// Takes the turn at `now` if it has come (`None`), else says how long until it comes.
fn take_local(next: &Mutex<Option<Instant>>, interval: Duration, now: Instant) -> Option<Duration> {
    // A poisoned lock only means another caller panicked between two plain assignments.
    let mut next = next.lock().unwrap_or_else(|p| p.into_inner());
    match *next {
        Some(t) if t > now => Some(t - now),
        _ => {
            *next = Some(now + interval);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn turns_are_spaced_by_the_interval() {
        let next = Mutex::new(None);
        let t0 = Instant::now();
        assert_eq!(take_local(&next, ms(250), t0), None);
        assert_eq!(take_local(&next, ms(250), t0), Some(ms(250)));
        assert_eq!(take_local(&next, ms(250), t0 + ms(100)), Some(ms(150)));
        assert_eq!(take_local(&next, ms(250), t0 + ms(250)), None);
        assert_eq!(take_local(&next, ms(250), t0 + ms(260)), Some(ms(240)));
    }

    #[test]
    fn a_caller_that_waits_reserves_nothing() {
        let next = Mutex::new(None);
        let t0 = Instant::now();
        assert_eq!(take_local(&next, ms(1000), t0), None);
        // ten callers ask while the turn has not come, and give up
        for _ in 0..10 {
            assert_eq!(take_local(&next, ms(1000), t0 + ms(100)), Some(ms(900)));
        }
        // the next caller goes when the interval has passed, not ten intervals later
        assert_eq!(take_local(&next, ms(1000), t0 + ms(1000)), None);
    }

    #[tokio::test]
    async fn zero_means_unlimited() {
        for _ in 0..100 {
            RateLimiter::new(0.0).acquire().await.unwrap();
        }
        RateLimiter::unlimited().acquire().await.unwrap();
        assert_eq!(RateLimiter::new(0.0).interval, None);
    }
}
