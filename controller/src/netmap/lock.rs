//! What a locked network's maps carry besides: the tenant's signatures, so that agents check
//! every peer, route and the policy themselves; and unsigned peers left out of others' maps.

use canopy_proto::v1::{NetworkMap, PolicyLock, PolicyRecord, Signed};
use prost::Message as _;

use super::{Entry, NetState};

/// A stored policy record's text and signature, if it is signed (a delete's empty value: none).
pub fn policy_lock(value: &[u8]) -> Option<PolicyLock> {
    let r = PolicyRecord::decode(value).ok()?;
    let signed = r.lock?;
    Some(PolicyLock {
        text: r.text,
        signed: Some(signed),
    })
}

impl NetState {
    /// Whether the network's membership is tenant-signed.
    pub fn locked(&self) -> bool {
        self.network.lock.is_some()
    }

    /// Whether `e` is in other peers' maps: in a locked network, only once signed.
    pub(super) fn admitted(&self, e: &Entry) -> bool {
        !self.locked() || e.record.lock.is_some()
    }

    /// The policy's signature and text (a locked network's), as of the policy in force.
    pub fn set_policy_lock(&mut self, lock: Option<PolicyLock>) {
        self.policy_lock = lock;
    }

    /// The tenant's signatures of the routes `peer` carries as `prefixes`.
    pub(super) fn route_locks(&self, peer: &str, prefixes: &[String]) -> Vec<Signed> {
        let of = |prefix: &String| {
            let mine = self.routes.values().filter(|x| x.peer_id == peer);
            mine.filter(|x| &x.prefix == prefix)
                .find_map(|x| x.lock.clone())
        };
        prefixes.iter().filter_map(of).collect()
    }

    /// A full map's lock fields for `me`: the chain, the signed policy, its own membership and
    /// the routes it carries, as signed (nothing when not locked).
    pub(super) fn lock_fields(&self, me: &Entry) -> NetworkMap {
        if !self.locked() {
            return NetworkMap::default();
        }
        let routes: Vec<String> = me.routes.iter().map(ToString::to_string).collect();
        NetworkMap {
            lock: self.network.lock.clone(),
            policy_lock: self.policy_lock.clone(),
            self_lock: me.record.lock.clone(),
            self_delegation: me.record.lock_delegation.clone(),
            self_route_locks: self.route_locks(&me.record.id, &routes),
            ..Default::default()
        }
    }
}
