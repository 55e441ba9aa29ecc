//! The elected replica's jobs: expired join tokens, credentials removed peers left behind,
//! expired web console sessions, and audit entries past their plan's retention. Every write is fenced by the leader record.

use std::collections::HashSet;

use canopy_proto::v1::{GatewayLiveRecord, IndexRecord, JoinTokenRecord};
use prost::Message as _;

use super::{BackgroundConfig, LEADER_KEY};
use crate::keys;
use crate::store::{Compare, Op, Revision, Store, StoreError, Txn};

/// What one run of the jobs did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct JobReport {
    pub tokens_deleted: usize,
    pub credentials_deleted: usize,
    pub stale_gateways: usize,
    pub web_sessions_deleted: usize,
}

/// Runs the background jobs as the leader holding `fence`. Each write is fenced.
pub async fn run_jobs(
    store: &dyn Store,
    fence: Revision,
    now_ms: i64,
    cfg: &BackgroundConfig,
) -> Result<JobReport, StoreError> {
    let mut report = JobReport::default();
    let retention_s = cfg.expired_token_retention.as_secs() as i64;
    let tokens = store
        .range(format!("{}tokens/", keys::ROOT).as_bytes())
        .await?;
    for kv in &tokens.kvs {
        let Ok(t) = JoinTokenRecord::decode(kv.value.as_slice()) else {
            continue;
        };
        if t.expires_at_unix == 0 || t.expires_at_unix + retention_s > now_ms / 1000 {
            continue;
        }
        let mut txn = Txn::new()
            .when(Compare::unchanged(LEADER_KEY, fence))
            .when(Compare::unchanged(kv.key.clone(), kv.mod_revision))
            .then(Op::delete(kv.key.clone()));
        if let Ok(h) = <[u8; 32]>::try_from(t.secret_hash.as_slice()) {
            txn = txn.then(Op::delete(keys::tokenhash(&h)));
        }
        if !store.txn(txn).await?.succeeded {
            return Ok(report); // deposed (or the token changed): stop here
        }
        report.tokens_deleted += 1;
    }
    // Credentials first, peers after: an enrollment writes both at once, so a credential read
    // here whose peer existed then is in the later peer list (unless the peer was removed
    // since). Each deletion is also conditioned on the peer being absent *now*: a peer that
    // enrolled in between keeps its credential (this race once cut fresh agents off).
    let creds = store
        .range(format!("{}credentials/", keys::ROOT).as_bytes())
        .await?;
    let peers: HashSet<String> = store
        .range(keys::ALL_PEERS.as_bytes())
        .await?
        .kvs
        .iter()
        .filter_map(|kv| keys::parse_peer(&kv.key).map(|(n, p)| format!("{n}/{p}")))
        .collect();
    let keep_s = cfg.removed_credential_retention.as_secs() as i64;
    for kv in &creds.kvs {
        let Ok(idx) = IndexRecord::decode(kv.value.as_slice()) else {
            continue;
        };
        let mut txn = Txn::new()
            .when(Compare::unchanged(LEADER_KEY, fence))
            .when(Compare::unchanged(kv.key.clone(), kv.mod_revision))
            .then(Op::delete(kv.key.clone()));
        if idx.removed_at_unix != 0 {
            // A removed peer's entry: kept to tell its agent so, until the retention passes.
            if idx.removed_at_unix + keep_s > now_ms / 1000 {
                continue;
            }
        } else {
            if peers.contains(&idx.id) {
                continue;
            }
            let Some((net, peer)) = idx.id.split_once('/') else {
                continue;
            };
            txn = txn.when(Compare::absent(keys::peer(net, peer)));
        }
        if store.txn(txn).await?.succeeded {
            report.credentials_deleted += 1;
        }
    }
    report.stale_gateways = sweep_gateways(store, fence, now_ms).await?;
    report.web_sessions_deleted = sweep_web_sessions(store, fence, now_ms).await?;
    Ok(report)
}

/// Deletes web console sessions past their expiry (signed-out browsers delete their own).
async fn sweep_web_sessions(
    store: &dyn Store,
    fence: Revision,
    now_ms: i64,
) -> Result<usize, StoreError> {
    let mut swept = 0;
    let prefix = format!("{}websessions/", keys::ROOT);
    for kv in &store.range(prefix.as_bytes()).await?.kvs {
        let expired = canopy_proto::v1::WebSessionRecord::decode(kv.value.as_slice())
            .map_or(true, |s| s.expires_at_unix <= now_ms / 1000);
        if !expired {
            continue;
        }
        let txn = Txn::new()
            .when(Compare::unchanged(LEADER_KEY, fence))
            .when(Compare::unchanged(kv.key.clone(), kv.mod_revision))
            .then(Op::delete(kv.key.clone()));
        if store.txn(txn).await?.succeeded {
            swept += 1;
        }
    }
    Ok(swept)
}

/// Deletes the live records of gateways nobody renewed (the replica holding the session died):
/// their prefixes move to a live gateway.
async fn sweep_gateways(
    store: &dyn Store,
    fence: Revision,
    now_ms: i64,
) -> Result<usize, StoreError> {
    let mut swept = 0;
    for kv in &store.range(keys::ALL_GWLIVE.as_bytes()).await?.kvs {
        let Ok(rec) = GatewayLiveRecord::decode(kv.value.as_slice()) else {
            continue;
        };
        if !crate::service::gateways::is_stale(&rec, now_ms) {
            continue;
        }
        let txn = Txn::new()
            .when(Compare::unchanged(LEADER_KEY, fence))
            .when(Compare::unchanged(kv.key.clone(), kv.mod_revision))
            .then(Op::delete(kv.key.clone()));
        if store.txn(txn).await?.succeeded {
            tracing::info!(peer = %rec.peer_id, "swept a gateway's live record nobody renewed");
            swept += 1;
        }
    }
    Ok(swept)
}

/// How often the leader prunes audit logs: retention is counted in days, and each pass costs
/// one small read per tenant, so not every tick.
pub(super) const AUDIT_PRUNE_EVERY_MS: i64 = 3_600_000;

/// Deletes each tenant's audit entries older than its plan keeps them: one ranged delete per
/// tenant, from its first entry to the cutoff's key (keys sort by time), so the cost is the
/// entries deleted, never a read of the log. The self-managed default tenant has no record.
pub async fn prune_audit(
    store: &dyn Store,
    fence: Revision,
    now_ms: i64,
) -> Result<usize, StoreError> {
    let tenants = store
        .range(format!("{}tenants/", keys::ROOT).as_bytes())
        .await?;
    let mut plans: Vec<(String, crate::plans::Plan)> = tenants
        .kvs
        .iter()
        .filter_map(|kv| canopy_proto::v1::TenantRecord::decode(kv.value.as_slice()).ok())
        .map(|t| {
            let plan = crate::plans::Plan::parse(&t.plan).unwrap_or(crate::plans::Plan::Free);
            (t.id, plan)
        })
        .collect();
    plans.push((
        crate::service::DEFAULT_TENANT.to_string(),
        crate::plans::Plan::SelfManaged,
    ));
    let mut pruned = 0;
    for (tenant, plan) in plans {
        let keep_ms = i64::from(plan.audit_retention_days()) * 86_400_000;
        let cutoff = now_ms - keep_ms;
        if cutoff <= 0 {
            continue;
        }
        let first = format!("{}audit/{tenant}/", keys::ROOT);
        let end = format!("{first}{cutoff:020}");
        // Only write when there is something to delete: an idle log costs one small read.
        let oldest = store.first_key(first.as_bytes()).await?;
        if oldest.is_none_or(|k| k.as_slice() >= end.as_bytes()) {
            continue;
        }
        let txn = Txn::new()
            .when(Compare::unchanged(LEADER_KEY, fence))
            .then(Op::delete_range(first, end));
        if !store.txn(txn).await?.succeeded {
            break; // deposed
        }
        pruned += 1;
    }
    Ok(pruned)
}
