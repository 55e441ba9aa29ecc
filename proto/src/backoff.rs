//! Exponential backoff with jitter, the one used everywhere something waits to try again: an
//! agent reconnecting, a controller transaction that lost a race, the cache re-listing.

use std::time::Duration;

use rand::Rng as _;

/// How far below the bound a delay may fall.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Jitter {
    /// Anywhere in [0, bound]: writers that collided spread out the most.
    Full,
    /// In [bound/2, bound]: a client never comes back much sooner than the bound says.
    Equal,
}

/// The bound before attempt `n` (0-based) is `min · 2^n`, at most `max`; the delay is drawn
/// below it as `jitter` says.
#[derive(Clone, Copy, Debug)]
pub struct Backoff {
    pub min: Duration,
    pub max: Duration,
    pub jitter: Jitter,
}

impl Backoff {
    pub const fn equal(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max,
            jitter: Jitter::Equal,
        }
    }

    pub const fn full(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max,
            jitter: Jitter::Full,
        }
    }

    pub fn bound(&self, n: u32) -> Duration {
        self.min.saturating_mul(1u32 << n.min(20)).min(self.max)
    }

    pub fn delay(&self, n: u32) -> Duration {
        let bound = self.bound(n);
        let low = match self.jitter {
            Jitter::Full => 0.0,
            Jitter::Equal => 0.5,
        };
        bound.mul_f64(rand::rng().random_range(low..=1.0))
    }
}

impl Default for Backoff {
    /// An agent reconnecting: 250 ms doubling to 30 s, never under half the bound.
    fn default() -> Self {
        Self::equal(Duration::from_millis(250), Duration::from_secs(30))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_to_the_cap_within_their_jitter() {
        for b in [
            Backoff::equal(Duration::from_millis(100), Duration::from_secs(2)),
            Backoff::full(Duration::from_micros(200), Duration::from_millis(10)),
        ] {
            for n in 0..40 {
                let bound = b.min.saturating_mul(1 << n.min(16)).min(b.max);
                assert_eq!(b.bound(n), bound);
                let low = if b.jitter == Jitter::Equal {
                    bound / 2
                } else {
                    Duration::ZERO
                };
                let d = b.delay(n);
                assert!(
                    d >= low && d <= bound,
                    "attempt {n}: {d:?} outside [{low:?}, {bound:?}]"
                );
            }
        }
        assert_eq!(Backoff::default().bound(100), Duration::from_secs(30));
    }
}
