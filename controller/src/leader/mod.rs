//! Background work on one elected replica, with fenced writes.
//!
//! Election is a lease record at [`LEADER_KEY`] (holder, expiry), taken and renewed by
//! compare-and-swap, so it works the same on every store backend. The record's mod revision
//! after this replica's last renewal is its *fence*: every background write is a transaction
//! conditioned on the record being unchanged, so a replica that was deposed while it paused (its
//! lease ran out and another took it) cannot write. Expiry uses wall-clock time: replicas' clocks
//! must agree to well within the lease (NTP).
//!
//! Jobs: delete join tokens that expired longer ago than the retention, and clean up what removed
//! peers can leave behind when a removal races an enrollment (credential index entries that
//! point at no peer).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use canopy_proto::v1::LeaderRecord;
use prost::Message as _;

mod jobs;
use jobs::AUDIT_PRUNE_EVERY_MS;
pub use jobs::{JobReport, prune_audit, run_jobs};

use crate::store::{Compare, Op, Revision, Store, StoreError, Txn};

pub const LEADER_KEY: &str = "/canopy/v1/leader";

#[derive(Clone, Debug)]
pub struct BackgroundConfig {
    /// How long a leader's lease lasts without renewal.
    pub lease: Duration,
    /// How often to renew (or try to take) the lease and run the jobs.
    pub tick: Duration,
    /// How long an expired join token stays listed before it is deleted.
    pub expired_token_retention: Duration,
    /// How long a removed peer's credential entry is kept: within it, its agent is told it was
    /// removed; after it, the agent is only refused (and keeps retrying with backoff).
    pub removed_credential_retention: Duration,
}

impl Default for BackgroundConfig {
    fn default() -> Self {
        Self {
            lease: Duration::from_secs(15),
            tick: Duration::from_secs(5),
            expired_token_retention: Duration::from_secs(3600),
            removed_credential_retention: Duration::from_secs(30 * 24 * 3600),
        }
    }
}

/// What this replica should do about the lease next (not to be confused with a tenant's
/// subscription plan, `plans::Plan`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseStep {
    /// Take the lease: the record is absent (0) or expired (at this revision).
    Acquire(Revision),
    /// Renew our own lease (at this revision).
    Renew(Revision),
    /// Someone else holds a live lease.
    Follow,
}

pub fn lease_step(me: &str, current: Option<(&LeaderRecord, Revision)>, now_ms: i64) -> LeaseStep {
    match current {
        None => LeaseStep::Acquire(0),
        Some((r, rev)) if r.holder == me => LeaseStep::Renew(rev),
        Some((r, rev)) if r.expires_at_unix_ms <= now_ms => LeaseStep::Acquire(rev),
        Some(_) => LeaseStep::Follow,
    }
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

pub struct Elector {
    store: Arc<dyn Store>,
    pub me: String,
    lease: Duration,
}

impl Elector {
    pub fn new(store: Arc<dyn Store>, me: String, lease: Duration) -> Self {
        Self { store, me, lease }
    }

    /// One round of election at `now_ms`: `Some(fence)` while this replica leads.
    pub async fn round(&self, now_ms: i64) -> Result<Option<Revision>, StoreError> {
        let kv = self.store.get(LEADER_KEY.as_bytes()).await?;
        let current = kv.as_ref().map(|kv| {
            (
                LeaderRecord::decode(kv.value.as_slice()).unwrap_or_default(),
                kv.mod_revision,
            )
        });
        let expected =
            match lease_step(&self.me, current.as_ref().map(|(r, rev)| (r, *rev)), now_ms) {
                LeaseStep::Acquire(rev) | LeaseStep::Renew(rev) => rev,
                LeaseStep::Follow => return Ok(None),
            };
        let rec = LeaderRecord {
            holder: self.me.clone(),
            expires_at_unix_ms: now_ms + self.lease.as_millis() as i64,
        };
        let r = self
            .store
            .txn(
                Txn::new()
                    .when(Compare::unchanged(LEADER_KEY, expected))
                    .then(Op::put(LEADER_KEY, rec.encode_to_vec())),
            )
            .await?;
        Ok(r.succeeded.then_some(r.revision))
    }

    /// Gives the lease up (on shutdown), if it is still ours at `fence`.
    pub async fn release(&self, fence: Revision) {
        let _ = self
            .store
            .txn(
                Txn::new()
                    .when(Compare::unchanged(LEADER_KEY, fence))
                    .then(Op::delete(LEADER_KEY)),
            )
            .await;
    }
}

/// Elects and runs the jobs every tick until `shutdown`; releases the lease on the way out.
pub async fn run(
    store: Arc<dyn Store>,
    me: String,
    cfg: BackgroundConfig,
    clock: crate::clock::Clock,
    leading: Arc<AtomicBool>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let elector = Elector::new(store.clone(), me, cfg.lease);
    let mut tick = tokio::time::interval(cfg.tick);
    let mut fence = None;
    let mut next_audit_prune = 0i64;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = &mut shutdown => break,
        }
        let now = clock.now_ms();
        match elector.round(now).await {
            Ok(Some(f)) => {
                if !leading.swap(true, Ordering::SeqCst) {
                    tracing::info!(replica = %elector.me, "this replica now runs background work");
                }
                fence = Some(f);
                match run_jobs(store.as_ref(), f, now, &cfg).await {
                    Ok(r) if r != JobReport::default() => tracing::info!(
                        tokens = r.tokens_deleted,
                        credentials = r.credentials_deleted,
                        "background cleanup"
                    ),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "background jobs failed"),
                }
                if now >= next_audit_prune {
                    match prune_audit(store.as_ref(), f, now).await {
                        Ok(0) => {}
                        Ok(n) => tracing::info!(tenants = n, "audit logs pruned"),
                        Err(e) => tracing::warn!(error = %e, "audit pruning failed"),
                    }
                    next_audit_prune = now + AUDIT_PRUNE_EVERY_MS;
                }
            }
            Ok(None) => {
                if leading.swap(false, Ordering::SeqCst) {
                    tracing::info!(replica = %elector.me, "another replica runs background work now");
                }
                fence = None;
            }
            Err(e) => {
                // Cannot confirm the lease: stop acting as leader until we can.
                leading.store(false, Ordering::SeqCst);
                fence = None;
                tracing::warn!(error = %e, "leader election failed");
            }
        }
    }
    if let Some(f) = fence {
        elector.release(f).await;
    }
    leading.store(false, Ordering::SeqCst);
}

#[cfg(test)]
mod tests;
