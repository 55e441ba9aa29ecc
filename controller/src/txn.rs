//! One way to retry: every read → decide → write operation of the controller runs through
//! [`retry`]. An attempt reads what it needs, decides, and commits one transaction conditioned
//! on the revisions it read; a lost race (`Ok(None)`) is retried after a jittered, growing
//! pause, within a bounded number of attempts and time. Kubernetes' `RetryOnConflict` and
//! etcd's STM have this shape.
//!
//! Attempts are closures returning a future (`|attempt| async move { … }`), which keeps the
//! operation's future `Send` for tonic.

use std::future::Future;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use canopy_proto::backoff::Backoff;

use crate::error::{Error, Result};

/// Process-wide counts for `/metrics`: operations run, attempts lost to a conflicting write,
/// operations that gave up, and the time operations took (microseconds, summed).
pub static STATS: Stats = Stats::new();

pub struct Stats {
    pub operations: AtomicU64,
    pub conflicts: AtomicU64,
    pub gave_up: AtomicU64,
    pub micros: AtomicU64,
}

impl Stats {
    const fn new() -> Self {
        Self {
            operations: AtomicU64::new(0),
            conflicts: AtomicU64::new(0),
            gave_up: AtomicU64::new(0),
            micros: AtomicU64::new(0),
        }
    }
    fn done(&self, start: Instant, conflicts: usize) {
        let us = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.operations.fetch_add(1, Relaxed);
        self.conflicts.fetch_add(conflicts as u64, Relaxed);
        self.micros.fetch_add(us, Relaxed);
    }
}

/// How many attempts an operation gets, and for how long, before it answers Unavailable.
#[derive(Clone, Copy, Debug)]
pub struct Budget {
    pub attempts: usize,
    pub time: Duration,
    /// The pause before a retry: 200 µs doubling to 10 ms, drawn uniformly below that bound
    /// ("full jitter"), so writers that collided do not collide again in step.
    pub pause: Backoff,
}

impl Default for Budget {
    fn default() -> Self {
        Self {
            attempts: 200,
            time: Duration::from_secs(10),
            pause: Backoff::full(Duration::from_micros(200), Duration::from_millis(10)),
        }
    }
}

/// Runs `attempt(n)` until it returns `Ok(Some(v))` (committed) or an error, retrying on
/// `Ok(None)` (a conflicting write won) with the default [`Budget`].
pub async fn retry<T, F, Fut>(what: &str, attempt: F) -> Result<T>
where
    F: FnMut(usize) -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    retry_with(Budget::default(), what, attempt).await
}

pub async fn retry_with<T, F, Fut>(budget: Budget, what: &str, mut attempt: F) -> Result<T>
where
    F: FnMut(usize) -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let start = Instant::now();
    for n in 0..budget.attempts.max(1) {
        if n > 0 {
            if start.elapsed() >= budget.time {
                break;
            }
            let retry = u32::try_from(n - 1).unwrap_or(u32::MAX);
            tokio::time::sleep(budget.pause.delay(retry)).await;
        }
        let outcome = attempt(n).await;
        if !matches!(outcome, Ok(None)) {
            STATS.done(start, n);
        }
        if let Some(v) = outcome? {
            if n > 0 {
                tracing::debug!(what, attempts = n + 1, "committed after conflicts");
            }
            return Ok(v);
        }
    }
    STATS.gave_up.fetch_add(1, Relaxed);
    tracing::warn!(what, "gave up after repeated conflicting writes");
    Err(Error::Unavailable(format!(
        "{what}: too many concurrent changes; try again"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn pauses_grow_to_the_cap() {
        let b = Budget::default().pause;
        assert_eq!(b.bound(0), Duration::from_micros(200));
        assert_eq!(b.bound(1), Duration::from_micros(400));
        assert_eq!(b.bound(4), Duration::from_micros(3200));
        assert_eq!(b.bound(50), Duration::from_millis(10));
    }

    #[tokio::test]
    async fn retries_conflicts_until_one_commits() {
        let calls = AtomicUsize::new(0);
        let calls = &calls;
        let v = retry("test", |n| async move {
            calls.fetch_add(1, Ordering::SeqCst);
            Ok((n == 3).then_some(n))
        })
        .await
        .unwrap();
        assert_eq!((v, calls.load(Ordering::SeqCst)), (3, 4));
    }

    #[tokio::test]
    async fn an_error_ends_at_once_and_a_spent_budget_is_unavailable() {
        let calls = AtomicUsize::new(0);
        let calls = &calls;
        let r: Result<()> = retry("test", |_| async move {
            calls.fetch_add(1, Ordering::SeqCst);
            Err(Error::NotFound("gone".into()))
        })
        .await;
        assert!(matches!(r, Err(Error::NotFound(_))));
        assert_eq!(calls.load(Ordering::SeqCst), 1);

        let budget = Budget {
            attempts: 5,
            ..Budget::default()
        };
        let r: Result<()> = retry_with(budget, "create thing", |_| async { Ok(None) }).await;
        match r {
            Err(Error::Unavailable(m)) => assert!(m.starts_with("create thing: too many"), "{m}"),
            other => panic!("{other:?}"),
        }
    }
}
