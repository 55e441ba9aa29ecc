//! Time for the controller's decisions: wall-clock time for token expiry, lease expiry,
//! retention, audit and record timestamps; monotonic time for rate limits and session pacing.
//! Read in one place, so a test moves time instead of sleeping for it.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The system clock, or (for tests) a manual one that moves only when told.
#[derive(Clone, Debug, Default)]
pub struct Clock(Option<Arc<Manual>>);

#[derive(Debug)]
struct Manual {
    /// Milliseconds since the Unix epoch now.
    ms: AtomicI64,
    /// Where it started: the wall-clock time and the monotonic instant it stands for.
    start_ms: i64,
    start: Instant,
}

impl Clock {
    pub fn system() -> Self {
        Self(None)
    }

    /// A manual clock starting at the system's time now.
    pub fn manual() -> Self {
        let start_ms = system_ms();
        Self(Some(Arc::new(Manual {
            ms: AtomicI64::new(start_ms),
            start_ms,
            start: Instant::now(),
        })))
    }

    /// Moves a manual clock forward (a system clock ignores this).
    pub fn advance(&self, by: Duration) {
        if let Some(m) = &self.0 {
            let by = i64::try_from(by.as_millis()).unwrap_or(i64::MAX);
            m.ms.fetch_add(by, Ordering::SeqCst);
        }
    }

    /// Milliseconds since the Unix epoch.
    pub fn now_ms(&self) -> i64 {
        match &self.0 {
            Some(m) => m.ms.load(Ordering::SeqCst),
            None => system_ms(),
        }
    }

    /// Monotonic time, for rate limits and pacing: a manual clock's moves with it.
    pub fn instant(&self) -> Instant {
        match &self.0 {
            Some(m) => {
                let moved = m.ms.load(Ordering::SeqCst).saturating_sub(m.start_ms);
                m.start + Duration::from_millis(u64::try_from(moved).unwrap_or(0))
            }
            None => Instant::now(),
        }
    }

    /// Seconds since the Unix epoch.
    pub fn now_unix(&self) -> i64 {
        self.now_ms().div_euclid(1000)
    }
}

fn system_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_told_and_shares_its_time_with_its_clones() {
        let c = Clock::manual();
        let t = c.now_ms();
        assert_eq!(c.now_ms(), t);
        let other = c.clone();
        other.advance(Duration::from_millis(1500));
        assert_eq!(c.now_ms(), t + 1500);
        assert_eq!(c.now_unix(), (t + 1500).div_euclid(1000));
        let i = c.instant();
        other.advance(Duration::from_secs(2));
        assert_eq!(
            c.instant() - i,
            Duration::from_secs(2),
            "monotonic time moves along"
        );
        let sys = Clock::system();
        sys.advance(Duration::from_secs(3600));
        assert!(
            (sys.now_ms() - system_ms()).abs() < 60_000,
            "the system clock is not moved"
        );
    }
}
