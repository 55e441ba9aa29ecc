//! Admission pacing for new Sync sessions: a token bucket. When many agents reconnect at once
//! (a controller restart, a network blip), sessions beyond the rate are told to come back
//! later (`retry-after-ms`, jittered), so the controller does the expensive part (TLS, auth,
//! a full map) for a bounded number of agents at a time. Pure: time is passed in.

use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Option<Instant>,
}

impl TokenBucket {
    /// `rate` admissions per second on average, up to `burst` at once.
    pub fn new(rate: u32, burst: u32) -> Self {
        Self::with_rate(f64::from(rate.max(1)), burst)
    }

    /// `rate` admissions per second (may be below one), up to `burst` at once.
    pub fn with_rate(rate: f64, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            rate: rate.max(1e-6),
            burst,
            tokens: burst,
            last: None,
        }
    }

    /// Admits one, or says how long until a token is due.
    pub fn admit(&mut self, now: Instant) -> Result<(), Duration> {
        if let Some(last) = self.last {
            let dt = now.saturating_duration_since(last).as_secs_f64();
            self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        }
        self.last = Some(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
        }
    }

    /// Whether the bucket has refilled completely by `now` (nothing to remember).
    pub fn is_full(&self, now: Instant) -> bool {
        self.last.is_none_or(|l| {
            self.tokens + now.saturating_duration_since(l).as_secs_f64() * self.rate >= self.burst
        })
    }

    /// A retry-after for a refused session: spread over about the time the current burst
    /// needs to drain, so a storm of retries does not arrive together again.
    pub fn retry_after(&self, due: Duration, jitter: f64) -> Duration {
        let drain = Duration::from_secs_f64(self.burst / self.rate);
        due + drain.mul_f64(jitter.clamp(0.0, 1.0)) + Duration::from_millis(50)
    }
}

/// A token bucket per key (a tenant, a source address), in bounded memory: buckets that have
/// refilled are forgotten, and when `max_keys` busy buckets exist a new key is refused rather
/// than remembered (a flood of distinct keys cannot grow it).
#[derive(Debug)]
pub struct KeyedLimiter {
    rate: f64,
    burst: u32,
    max_keys: usize,
    buckets: std::collections::HashMap<String, TokenBucket>,
}

impl KeyedLimiter {
    pub fn new(rate_per_sec: f64, burst: u32, max_keys: usize) -> Self {
        Self {
            rate: rate_per_sec,
            burst,
            max_keys: max_keys.max(1),
            buckets: std::collections::HashMap::new(),
        }
    }

    /// Counts one event of `key` at `now`: admitted, or how long until it would be.
    pub fn admit(&mut self, key: &str, now: Instant) -> Result<(), Duration> {
        if !self.buckets.contains_key(key) && self.buckets.len() >= self.max_keys {
            self.buckets.retain(|_, b| !b.is_full(now));
            if self.buckets.len() >= self.max_keys {
                return Err(Duration::from_secs_f64(1.0 / self.rate));
            }
        }
        let (rate, burst) = (self.rate, self.burst);
        self.buckets
            .entry(key.to_string())
            .or_insert_with(|| TokenBucket::with_rate(rate, burst))
            .admit(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_a_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10, 5);
        for _ in 0..5 {
            assert!(b.admit(t0).is_ok());
        }
        let due = b.admit(t0).unwrap_err();
        assert!(due <= Duration::from_millis(100), "{due:?}");
        assert!(
            b.admit(t0 + Duration::from_millis(100)).is_ok(),
            "one token per 100 ms"
        );
        assert!(b.admit(t0 + Duration::from_millis(100)).is_err());
        // Tokens never exceed the burst, however long it was idle.
        let later = t0 + Duration::from_secs(60);
        assert_eq!((0..10).filter(|_| b.admit(later).is_ok()).count(), 5);
    }

    #[test]
    fn keyed_limits_are_per_key_and_memory_is_bounded() {
        let t0 = Instant::now();
        let mut l = KeyedLimiter::new(1.0, 2, 3);
        assert!(l.admit("a", t0).is_ok() && l.admit("a", t0).is_ok());
        assert!(l.admit("a", t0).is_err(), "a's burst is spent");
        assert!(l.admit("b", t0).is_ok(), "b has its own bucket");
        assert!(l.admit("c", t0).is_ok());
        assert!(
            l.admit("d", t0).is_err(),
            "three busy keys: a fourth is refused, not remembered"
        );
        assert!(l.buckets.len() <= 3);
        let later = t0 + Duration::from_secs(10);
        assert!(
            l.admit("d", later).is_ok(),
            "refilled buckets are forgotten"
        );
    }

    #[test]
    fn retry_after_spreads_over_the_drain_time() {
        let b = TokenBucket::new(100, 200);
        let lo = b.retry_after(Duration::ZERO, 0.0);
        let hi = b.retry_after(Duration::ZERO, 1.0);
        assert!(
            lo < Duration::from_millis(100) && hi >= Duration::from_secs(2),
            "{lo:?} {hi:?}"
        );
    }
}
