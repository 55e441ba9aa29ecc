//! Wall-clock time for the controller's decisions: token expiry, lease expiry, retention, audit
//! and record timestamps. Read in one place, so a test moves time instead of sleeping for it.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The system clock, or (for tests) a manual one that moves only when told.
#[derive(Clone, Debug, Default)]
pub struct Clock(Option<Arc<AtomicI64>>);

impl Clock {
    pub fn system() -> Self {
        Self(None)
    }

    /// A manual clock starting at the system's time now.
    pub fn manual() -> Self {
        Self(Some(Arc::new(AtomicI64::new(system_ms()))))
    }

    /// Moves a manual clock forward (a system clock ignores this).
    pub fn advance(&self, by: Duration) {
        if let Some(ms) = &self.0 {
            let by = i64::try_from(by.as_millis()).unwrap_or(i64::MAX);
            ms.fetch_add(by, Ordering::SeqCst);
        }
    }

    /// Milliseconds since the Unix epoch.
    pub fn now_ms(&self) -> i64 {
        match &self.0 {
            Some(ms) => ms.load(Ordering::SeqCst),
            None => system_ms(),
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
        let sys = Clock::system();
        sys.advance(Duration::from_secs(3600));
        assert!(
            (sys.now_ms() - system_ms()).abs() < 60_000,
            "the system clock is not moved"
        );
    }
}
