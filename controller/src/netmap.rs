//! Network state → per-peer [`NetworkMap`]s and deltas. Pure: the cache feeds it store events
//! (`put_peer`, `delete_peer` with their revisions) and asks for a full map or the delta since a
//! revision an agent holds.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use canopy_proto::v1::{NetworkDelta, NetworkMap, NetworkRecord, PeerRecord, RemotePeer};

use crate::model::Revision;

/// Removed peers remembered per network, so agents resuming from an older revision can get a delta.
const TOMBSTONES: usize = 1024;

#[derive(Clone, Debug, Default)]
pub struct NetState {
    pub network: NetworkRecord,
    peers: BTreeMap<String, (PeerRecord, Revision)>,
    /// Each live peer under the revision that last changed it: a delta since `base` reads only
    /// the entries after `base`, not every peer.
    by_revision: BTreeSet<(Revision, String)>,
    /// Removed peers, in revision order.
    tombstones: VecDeque<(Revision, String)>,
    /// Deltas can be computed from any base revision >= this.
    delta_floor: Revision,
    /// The last revision that changed this network's membership.
    pub revision: Revision,
}

/// What an agent holding `base` needs next.
#[derive(Clone, Debug, PartialEq)]
pub enum Update {
    Full(NetworkMap),
    Delta(NetworkDelta),
}

impl NetState {
    pub fn new(network: NetworkRecord, floor: Revision) -> Self {
        Self {
            network,
            delta_floor: floor,
            revision: floor,
            ..Default::default()
        }
    }

    pub fn peer(&self, id: &str) -> Option<&PeerRecord> {
        self.peers.get(id).map(|(p, _)| p)
    }

    pub fn peer_count(&self) -> usize {
        self.peers.len()
    }

    pub fn put_peer(&mut self, peer: PeerRecord, rev: Revision) {
        let id = peer.id.clone();
        if let Some((_, old)) = self.peers.insert(id.clone(), (peer, rev)) {
            self.by_revision.remove(&(old, id.clone()));
        }
        self.by_revision.insert((rev, id));
        self.revision = self.revision.max(rev);
    }

    pub fn delete_peer(&mut self, id: &str, rev: Revision) {
        if let Some((_, old)) = self.peers.remove(id) {
            self.by_revision.remove(&(old, id.to_string()));
            self.tombstones.push_back((rev, id.to_string()));
            if self.tombstones.len() > TOMBSTONES
                && let Some((r, _)) = self.tombstones.pop_front()
            {
                self.delta_floor = self.delta_floor.max(r);
            }
            self.revision = self.revision.max(rev);
        }
    }

    /// The full map as `self_id` sees it, stamped `at` (the revision the state reflects).
    pub fn full_map(&self, self_id: &str, at: Revision) -> Option<NetworkMap> {
        let (me, _) = self.peers.get(self_id)?;
        Some(NetworkMap {
            revision: at,
            network_id: self.network.id.clone(),
            network_name: self.network.name.clone(),
            peer_id: me.id.clone(),
            addresses: me.addresses.clone(),
            cidrs: self.network.cidrs.clone(),
            peers: self
                .peers
                .values()
                .filter(|(p, _)| p.id != self_id)
                .map(|(p, _)| remote(p))
                .collect(),
        })
    }

    /// What an agent at `base` needs to reach revision `at`: a delta if the history covers it,
    /// else the full map. `None` if `self_id` is not (or no longer) a peer.
    pub fn update_since(&self, self_id: &str, base: Revision, at: Revision) -> Option<Update> {
        if !self.peers.contains_key(self_id) {
            return None;
        }
        if base <= 0 || base < self.delta_floor || base > at {
            return self.full_map(self_id, at).map(Update::Full);
        }
        let upserted = self
            .by_revision
            .range((base + 1, String::new())..)
            .filter(|(_, id)| id != self_id)
            .filter_map(|(_, id)| self.peers.get(id))
            .map(|(p, _)| remote(p))
            .collect();
        let first = self.tombstones.partition_point(|(rev, _)| *rev <= base);
        let removed = self
            .tombstones
            .range(first..)
            .filter(|(_, id)| !self.peers.contains_key(id))
            .map(|(_, id)| id.clone())
            .collect();
        Some(Update::Delta(NetworkDelta {
            revision: at,
            base_revision: base,
            upserted,
            removed,
        }))
    }
}

fn remote(p: &PeerRecord) -> RemotePeer {
    RemotePeer {
        peer_id: p.id.clone(),
        public_key: p.public_key.clone(),
        allowed_ips: p.addresses.clone(),
        endpoints: p.endpoints.clone(),
        hostname: p.hostname.clone(),
        tags: p.tags.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use canopy_proto::netmap::apply_delta;
    use proptest::prelude::*;

    fn peer(i: u8, endpoint_gen: u8) -> PeerRecord {
        PeerRecord {
            id: format!("peer_{i:02}"),
            public_key: vec![i; 32],
            addresses: vec![format!("100.64.0.{}/32", u16::from(i) + 1)],
            endpoints: vec![format!("192.0.2.{i}:{}", 51820 + u16::from(endpoint_gen))],
            ..Default::default()
        }
    }

    #[derive(Clone, Debug)]
    enum Change {
        Put(u8, u8),
        Delete(u8),
    }

    fn change() -> impl Strategy<Value = Change> {
        prop_oneof![
            (1u8..12, 0u8..3).prop_map(|(i, g)| Change::Put(i, g)),
            (1u8..12).prop_map(Change::Delete),
        ]
    }

    #[test]
    fn a_removed_peer_gets_no_map() {
        let mut s = NetState::new(NetworkRecord::default(), 0);
        s.put_peer(peer(0, 0), 1);
        s.delete_peer("peer_00", 2);
        assert_eq!(s.update_since("peer_00", 1, 2), None);
    }

    #[test]
    fn a_base_older_than_the_tombstone_history_gets_a_full_map() {
        let mut s = NetState::new(NetworkRecord::default(), 0);
        s.put_peer(peer(0, 0), 1);
        let mut rev = 1;
        for i in 0..(TOMBSTONES + 5) {
            rev += 1;
            let mut p = peer(1, 0);
            p.id = format!("tmp_{i}");
            s.put_peer(p.clone(), rev);
            rev += 1;
            s.delete_peer(&p.id, rev);
        }
        assert!(matches!(
            s.update_since("peer_00", 2, rev),
            Some(Update::Full(_))
        ));
        assert!(matches!(
            s.update_since("peer_00", rev - 2, rev),
            Some(Update::Delta(_))
        ));
    }

    proptest! {
        /// For any history, the delta from any earlier revision applied to the map at that
        /// revision equals the full map now.
        #[test]
        fn delta_applied_to_old_map_equals_new_full_map(
            before in proptest::collection::vec(change(), 0..20),
            after in proptest::collection::vec(change(), 0..20),
        ) {
            let mut s = NetState::new(NetworkRecord::default(), 0);
            s.put_peer(peer(0, 0), 1);
            let mut rev = 1;
            let apply = |s: &mut NetState, c: &Change, rev: Revision| match c {
                Change::Put(i, g) => s.put_peer(peer(*i, *g), rev),
                Change::Delete(i) => s.delete_peer(&format!("peer_{i:02}"), rev),
            };
            for c in &before { rev += 1; apply(&mut s, c, rev); }
            let base = rev;
            let mut old = s.full_map("peer_00", base).unwrap();
            for c in &after { rev += 1; apply(&mut s, c, rev); }
            let Some(Update::Delta(d)) = s.update_since("peer_00", base, rev) else {
                panic!("expected a delta");
            };
            apply_delta(&mut old, &d).unwrap();
            prop_assert_eq!(old, s.full_map("peer_00", rev).unwrap());
        }
    }
}
