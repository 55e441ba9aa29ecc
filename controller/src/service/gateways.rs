//! Which gateways are live. The replica holding a gateway's Sync session records it in the
//! store (`gwlive/<network>/<peer>`) once the agent has acknowledged its map, so every replica
//! picks the same gateway for a prefix (see `NetState::pick_primaries`): a live one, the
//! longest live first.
//!
//! Damping: a session that ends leaves the record for [`LIVE_GRACE`], so an agent that
//! reconnects (to this replica or another) keeps its standing and nothing moves; a gateway
//! that comes back after that is live *since then*, so it does not take its prefixes back
//! from the one that stood in, and a flapping one never wins. A replica that dies leaves
//! records nobody renews: the leader sweeps them after [`LIVE_STALE`].

use std::time::Duration;

use canopy_proto::v1::GatewayLiveRecord;
use prost::Message as _;

use super::{AgentIdentity, Controller, decode};
use crate::error::Result;
use crate::keys;
use crate::store::{Compare, Op, Txn};

/// How often the holding replica renews a live record.
pub const LIVE_RENEW: Duration = Duration::from_secs(10);
/// A record not renewed for this long is swept by the leader (its replica is gone).
pub const LIVE_STALE: Duration = Duration::from_secs(30);
/// How long a gateway whose session ended keeps its prefixes: its agent may be reconnecting.
pub const LIVE_GRACE: Duration = Duration::from_secs(5);

/// The record a session writes over `old` (if any) at `now_ms`: live since the old record's
/// time if there is one (a reconnect within the grace, or a take-over from another replica),
/// else since now.
pub fn renewed(
    old: Option<&GatewayLiveRecord>,
    peer: &str,
    holder: &str,
    now_ms: i64,
) -> GatewayLiveRecord {
    GatewayLiveRecord {
        peer_id: peer.to_string(),
        online_since_unix_ms: old.map_or(now_ms, |o| o.online_since_unix_ms),
        renewed_unix_ms: now_ms,
        holder: holder.to_string(),
    }
}

/// Whether the leader may sweep `rec` at `now_ms`: nobody renewed it for [`LIVE_STALE`].
pub fn is_stale(rec: &GatewayLiveRecord, now_ms: i64) -> bool {
    now_ms - rec.renewed_unix_ms >= LIVE_STALE.as_millis() as i64
}

impl Controller {
    /// Records (or renews) that gateway `id`'s agent is live through session `holder`.
    pub async fn gateway_live(&self, id: &AgentIdentity, holder: &str) -> Result<()> {
        let key = keys::gwlive(&id.network_id, &id.peer_id);
        crate::txn::retry("gateway live", |_| {
            let key = key.clone();
            async move {
                let kv = self.store.get(key.as_bytes()).await?;
                let old = kv.as_ref().map(decode::<GatewayLiveRecord>).transpose()?;
                let rec = renewed(old.as_ref(), &id.peer_id, holder, self.clock.now_ms());
                let txn = Txn::new()
                    .when(Compare::unchanged(
                        key.clone(),
                        kv.map_or(0, |k| k.mod_revision),
                    ))
                    .then(Op::put(key, rec.encode_to_vec()));
                Ok(self.store.txn(txn).await?.succeeded.then_some(()))
            }
        })
        .await
    }

    /// Session `holder` of gateway `id` ended: after [`LIVE_GRACE`], unless another session
    /// took the record over, the gateway is no longer live and its prefixes move.
    pub fn gateway_gone(&self, id: &AgentIdentity, holder: String) {
        let (ctl, id) = (self.clone(), id.clone());
        tokio::spawn(async move {
            tokio::time::sleep(LIVE_GRACE).await;
            if let Err(e) = ctl.release_live(&id, &holder).await {
                tracing::warn!(peer = %id.peer_id, error = %e, "could not release a gateway's live record; the leader sweeps it");
            }
        });
    }

    async fn release_live(&self, id: &AgentIdentity, holder: &str) -> Result<()> {
        let key = keys::gwlive(&id.network_id, &id.peer_id);
        crate::txn::retry("gateway gone", |_| {
            let key = key.clone();
            async move {
                let Some(kv) = self.store.get(key.as_bytes()).await? else {
                    return Ok(Some(()));
                };
                if decode::<GatewayLiveRecord>(&kv)?.holder != holder {
                    return Ok(Some(())); // a newer session holds it
                }
                let txn = Txn::new()
                    .when(Compare::unchanged(key.clone(), kv.mod_revision))
                    .then(Op::delete(key));
                if self.store.txn(txn).await?.succeeded {
                    tracing::info!(peer = %id.peer_id, "gateway offline; its prefixes move to another gateway if one is live");
                    return Ok(Some(()));
                }
                Ok(None)
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_renewal_keeps_the_time_the_gateway_came_up_and_a_stale_record_is_swept() {
        let first = renewed(None, "gw", "s1", 1_000);
        assert_eq!(first.online_since_unix_ms, 1_000);
        let again = renewed(Some(&first), "gw", "s2", 11_000);
        assert_eq!(
            (again.online_since_unix_ms, again.renewed_unix_ms),
            (1_000, 11_000)
        );
        assert_eq!(again.holder, "s2", "a new session takes the record over");
        assert!(!is_stale(&again, 40_999));
        assert!(is_stale(&again, 41_000));
    }
}
