//! Network state → per-peer [`NetworkMap`]s and deltas. Pure: the cache feeds it store events
//! (`put_peer`, `delete_peer` with their revisions) and asks for a full map or the delta since a
//! revision an agent holds.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use canopy_proto::v1::{
    InboundRule, NetworkDelta, NetworkMap, NetworkRecord, PeerRecord, PolicyPart, RemotePeer,
};
use ipnetwork::IpNetwork;

use crate::model::Revision;
use crate::policy::compile::{self, Directory, Inbound, Visible};
use crate::policy::eval::PeerView;
use crate::policy::{Policy, Proto, Selector};

/// Removed peers remembered per network, so agents resuming from an older revision can get a delta.
const TOMBSTONES: usize = 1024;

#[derive(Clone, Debug, Default)]
struct Entry {
    record: PeerRecord,
    /// The revision that last changed the record, and the one that last changed its tags.
    rev: Revision,
    tags_rev: Revision,
    addresses: Vec<IpNetwork>,
}

impl Entry {
    fn view(&self) -> PeerView<'_> {
        PeerView {
            id: &self.record.id,
            tags: &self.record.tags,
            addresses: &self.addresses,
        }
    }
}

/// The policy in force and the one before it (so an agent one policy change behind gets a
/// delta of what changed for it).
#[derive(Clone, Debug, Default)]
struct Policies {
    current: Option<Arc<Policy>>,
    /// When `current` was set (0: never).
    rev: Revision,
    previous: Option<Arc<Policy>>,
    previous_rev: Revision,
}

#[derive(Clone, Debug, Default)]
pub struct NetState {
    pub network: NetworkRecord,
    peers: BTreeMap<String, Entry>,
    by_tag: HashMap<String, BTreeSet<String>>,
    /// Each live peer under the revision that last changed it: a delta since `base` reads only
    /// the entries after `base`, not every peer.
    by_revision: BTreeSet<(Revision, String)>,
    /// Removed peers, in revision order.
    tombstones: VecDeque<(Revision, String)>,
    /// Deltas can be computed from any base revision >= this.
    delta_floor: Revision,
    /// The last revision that changed this network's membership or policy.
    pub revision: Revision,
    policy: Policies,
}

/// What an agent holding `base` needs next.
#[derive(Clone, Debug, PartialEq)]
pub enum Update {
    Full(NetworkMap),
    Delta(NetworkDelta),
}

impl Directory for NetState {
    fn ids(&self) -> Vec<&str> {
        self.peers.keys().map(String::as_str).collect()
    }
    fn tagged(&self, tag: &str) -> Vec<&str> {
        let ids = self.by_tag.get(tag).into_iter().flatten();
        ids.map(String::as_str).collect()
    }
    fn has(&self, id: &str) -> bool {
        self.peers.contains_key(id)
    }
    fn inside(&self, net: &IpNetwork) -> Vec<&str> {
        let inside = |e: &&Entry| e.addresses.iter().any(|a| net.contains(a.ip()));
        self.peers
            .values()
            .filter(inside)
            .map(|e| e.record.id.as_str())
            .collect()
    }
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
        self.peers.get(id).map(|e| &e.record)
    }

    pub fn peer_count(&self) -> usize {
        self.peers.len()
    }

    pub fn put_peer(&mut self, peer: PeerRecord, rev: Revision) {
        let id = peer.id.clone();
        let mut tags_rev = rev;
        if let Some(old) = self.peers.remove(&id) {
            self.by_revision.remove(&(old.rev, id.clone()));
            if old.record.tags == peer.tags {
                tags_rev = old.tags_rev;
            }
            for t in &old.record.tags {
                self.untag(t, &id);
            }
        }
        for t in &peer.tags {
            self.by_tag.entry(t.clone()).or_default().insert(id.clone());
        }
        let addresses = peer
            .addresses
            .iter()
            .filter_map(|a| a.parse().ok())
            .collect();
        let entry = Entry {
            record: peer,
            rev,
            tags_rev,
            addresses,
        };
        self.peers.insert(id.clone(), entry);
        self.by_revision.insert((rev, id));
        self.revision = self.revision.max(rev);
    }

    fn untag(&mut self, tag: &str, id: &str) {
        if let Some(ids) = self.by_tag.get_mut(tag) {
            ids.remove(id);
            if ids.is_empty() {
                self.by_tag.remove(tag);
            }
        }
    }

    pub fn delete_peer(&mut self, id: &str, rev: Revision) {
        if let Some(old) = self.peers.remove(id) {
            self.by_revision.remove(&(old.rev, id.to_string()));
            for t in &old.record.tags {
                self.untag(t, id);
            }
            self.tombstones.push_back((rev, id.to_string()));
            if self.tombstones.len() > TOMBSTONES
                && let Some((r, _)) = self.tombstones.pop_front()
            {
                self.delta_floor = self.delta_floor.max(r);
            }
            self.revision = self.revision.max(rev);
        }
    }

    /// The network's policy from revision `rev` on (`None`: no policy, everyone reaches
    /// everyone).
    pub fn set_policy(&mut self, policy: Option<Policy>, rev: Revision) {
        let p = &mut self.policy;
        p.previous = p.current.take();
        p.previous_rev = p.rev;
        p.current = policy.map(Arc::new);
        p.rev = rev;
        self.revision = self.revision.max(rev);
    }

    /// Who `me` may exchange packets with under `policy` (everyone without one).
    fn visible(&self, policy: Option<&Policy>, me: &Entry) -> Visible {
        match policy {
            Some(p) => compile::part(p, self, &me.view()).visible,
            None => Visible::All,
        }
    }

    /// The ids `v` names, but `me`.
    fn ids_of(&self, v: Visible, me: &str) -> BTreeSet<String> {
        match v {
            Visible::All => self.peers.keys().filter(|id| *id != me).cloned().collect(),
            Visible::Some(ids) => ids,
        }
    }

    /// The full map as `self_id` sees it, stamped `at` (the revision the state reflects).
    pub fn full_map(&self, self_id: &str, at: Revision) -> Option<NetworkMap> {
        let me = self.peers.get(self_id)?;
        let current = self.policy.current.as_deref();
        let (peers, policy) = match current {
            None => {
                let others = self.peers.values().filter(|e| e.record.id != self_id);
                (others.map(|e| remote(&e.record)).collect(), None)
            }
            Some(p) => {
                let part = compile::part(p, self, &me.view());
                let ids = self.ids_of(part.visible, self_id);
                let visible = ids.iter().filter_map(|id| self.peers.get(id));
                (
                    visible.map(|e| remote(&e.record)).collect(),
                    Some(policy_part(&part.inbound)),
                )
            }
        };
        Some(NetworkMap {
            revision: at,
            network_id: self.network.id.clone(),
            network_name: self.network.name.clone(),
            peer_id: me.record.id.clone(),
            addresses: me.record.addresses.clone(),
            cidrs: self.network.cidrs.clone(),
            peers,
            policy,
        })
    }

    /// What an agent at `base` needs to reach revision `at`: a delta if the history covers it,
    /// else the full map. `None` if `self_id` is not (or no longer) a peer.
    pub fn update_since(&self, self_id: &str, base: Revision, at: Revision) -> Option<Update> {
        let me = self.peers.get(self_id)?;
        let pol = &self.policy;
        let policy_changed = pol.rev > base;
        let full = base <= 0
            || base < self.delta_floor
            || base > at
            // More than one policy change since `base`: what it holds is not remembered.
            || (policy_changed && pol.previous_rev > base)
            // Its own tags changed under a policy: its whole part may have.
            || (me.tags_rev > base && (pol.current.is_some() || policy_changed));
        if full {
            return self.full_map(self_id, at).map(Update::Full);
        }
        let current = pol.current.as_deref();
        let sees = |q: &Entry| current.is_none_or(|p| compile::sees(p, &me.view(), &q.view()));
        let mut upserted = Vec::new();
        let mut removed = Vec::new();
        for (_, id) in self.by_revision.range((base + 1, String::new())..) {
            match self.peers.get(id) {
                Some(q) if id != self_id && sees(q) => upserted.push(remote(&q.record)),
                // Hidden now. Unless the policy or its tags changed, it was hidden at `base`
                // too: nothing to say (an endpoint change of a peer it cannot see is silent).
                Some(q) if id != self_id && (policy_changed || q.tags_rev > base) => {
                    removed.push(id.clone());
                }
                _ => {}
            }
        }
        let first = self.tombstones.partition_point(|(rev, _)| *rev <= base);
        for (_, id) in self.tombstones.range(first..) {
            if !self.peers.contains_key(id) {
                removed.push(id.clone());
            }
        }
        if policy_changed {
            // Peers unchanged since `base` that the new policy shows or hides.
            let before = self.visible(pol.previous.as_deref(), me);
            let now = self.visible(current, me);
            // Everyone before and after (the common case of a "*" rule): nothing to compare.
            if before != Visible::All || now != Visible::All {
                let (before, now) = (self.ids_of(before, self_id), self.ids_of(now, self_id));
                let unchanged = |id: &&String| self.peers.get(*id).is_some_and(|q| q.rev <= base);
                for id in now.difference(&before).filter(unchanged) {
                    upserted.push(remote(&self.peers[id].record));
                }
                removed.extend(before.difference(&now).filter(unchanged).cloned());
            }
        }
        let policy = match (policy_changed, current) {
            (true, Some(p)) => Some(policy_part(&compile::part(p, self, &me.view()).inbound)),
            _ => None,
        };
        Some(Update::Delta(NetworkDelta {
            revision: at,
            base_revision: base,
            upserted,
            removed,
            policy_changed,
            policy,
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

/// A peer's inbound rules as the agent receives them.
fn policy_part(inbound: &[Inbound]) -> PolicyPart {
    let rule = |r: &Inbound| {
        let mut out = InboundRule {
            proto: match r.proto {
                Proto::Any => canopy_proto::v1::Protocol::Any,
                Proto::Tcp => canopy_proto::v1::Protocol::Tcp,
                Proto::Udp => canopy_proto::v1::Protocol::Udp,
                Proto::Icmp => canopy_proto::v1::Protocol::Icmp,
            } as i32,
            ports: r
                .ports
                .iter()
                .map(|p| canopy_proto::v1::PortRange {
                    first: u32::from(p.first),
                    last: u32::from(p.last),
                })
                .collect(),
            dst: r.dst.iter().map(ToString::to_string).collect(),
            ..Default::default()
        };
        for s in &r.from {
            match s {
                Selector::Any => out.from_any = true,
                Selector::Tag(t) => out.from_tags.push(t.clone()),
                Selector::Peer(id) => out.from_peers.push(id.clone()),
                Selector::Cidr(_) => {}
            }
        }
        out
    };
    PolicyPart {
        inbound: inbound.iter().map(rule).collect(),
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
        /// Peer i's tags become those of the bits (of a, b, c); i = 0 is the agent itself.
        Tag(u8, u8),
        /// The policy becomes POLICIES[i], or none.
        Policy(Option<usize>),
    }

    const POLICIES: [&str; 4] = [
        "tags = [\"a\", \"b\", \"c\"]\n[[rule]]\nfrom = [\"tag:a\"]\nto = [\"tag:b\"]\nproto = \"tcp\"\nports = [\"5432\"]\n",
        "tags = [\"a\", \"b\", \"c\"]\n[[rule]]\nfrom = [\"*\"]\nto = [\"tag:c\"]\n",
        "tags = [\"a\", \"b\", \"c\"]\n[[rule]]\nfrom = [\"peer_00\", \"tag:b\"]\nto = [\"100.64.0.0/29\"]\nproto = \"icmp\"\n",
        "",
    ];

    fn change() -> impl Strategy<Value = Change> {
        prop_oneof![
            (1u8..12, 0u8..3).prop_map(|(i, g)| Change::Put(i, g)),
            (1u8..12).prop_map(Change::Delete),
            (0u8..12, 0u8..8).prop_map(|(i, t)| Change::Tag(i, t)),
            proptest::option::of(0..POLICIES.len()).prop_map(Change::Policy),
        ]
    }

    fn apply(s: &mut NetState, c: &Change, rev: Revision) {
        match c {
            Change::Put(i, g) => {
                let mut p = peer(*i, *g);
                p.tags = s
                    .peer(&p.id)
                    .map(|old| old.tags.clone())
                    .unwrap_or_default();
                s.put_peer(p, rev);
            }
            Change::Delete(i) => s.delete_peer(&format!("peer_{i:02}"), rev),
            Change::Tag(i, bits) => {
                if let Some(mut p) = s.peer(&format!("peer_{i:02}")).cloned() {
                    p.tags = ["a", "b", "c"]
                        .iter()
                        .enumerate()
                        .filter(|(k, _)| bits & (1 << k) != 0)
                        .map(|(_, t)| t.to_string())
                        .collect();
                    s.put_peer(p, rev);
                }
            }
            Change::Policy(p) => {
                let policy = p.map(|i| crate::policy::parse(POLICIES[i]).unwrap());
                s.set_policy(policy, rev);
            }
        }
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
        /// For any history (peers joining, leaving, changing endpoints and tags, the policy
        /// changing), the update from any earlier revision applied to the map at that revision
        /// equals the full map now; and it is a delta unless the agent's own tags changed
        /// under a policy or the policy changed twice.
        #[test]
        fn delta_applied_to_old_map_equals_new_full_map(
            before in proptest::collection::vec(change(), 0..20),
            after in proptest::collection::vec(change(), 0..20),
        ) {
            let mut s = NetState::new(NetworkRecord::default(), 0);
            s.put_peer(peer(0, 0), 1);
            let mut rev = 1;
            for c in &before { rev += 1; apply(&mut s, c, rev); }
            let base = rev;
            let mut old = s.full_map("peer_00", base).unwrap();
            for c in &after { rev += 1; apply(&mut s, c, rev); }
            let now = s.full_map("peer_00", rev).unwrap();
            let policy_changes = after.iter().filter(|c| matches!(c, Change::Policy(_))).count();
            let own_tags = after.iter().any(|c| matches!(c, Change::Tag(0, _)));
            match s.update_since("peer_00", base, rev).unwrap() {
                Update::Delta(d) => {
                    apply_delta(&mut old, &d).unwrap();
                    prop_assert_eq!(old, now);
                }
                Update::Full(m) => {
                    prop_assert!(policy_changes > 1 || own_tags, "a full map for {after:?}");
                    prop_assert_eq!(m, now);
                }
            }
        }
    }

    #[test]
    fn a_policy_change_sends_each_agent_only_the_peers_it_gains_or_loses() {
        let mut s = NetState::new(NetworkRecord::default(), 0);
        let tags = ["a", "b", "c", "", "", "", "", ""];
        for i in 0..8u8 {
            let mut p = peer(i, 0);
            p.tags = (!tags[usize::from(i)].is_empty())
                .then(|| tags[usize::from(i)].to_string())
                .into_iter()
                .collect();
            s.put_peer(p, i64::from(i) + 1);
        }
        s.set_policy(Some(crate::policy::parse(POLICIES[0]).unwrap()), 10);
        // a → b on tcp/5432: peer_00 (a) sees only peer_01 (b).
        let m = s.full_map("peer_00", 10).unwrap();
        let ids: Vec<&str> = m.peers.iter().map(|p| p.peer_id.as_str()).collect();
        assert_eq!(ids, ["peer_01"]);
        assert_eq!(
            m.policy.unwrap().inbound.len(),
            0,
            "nobody may open anything on a"
        );
        let lone = s.full_map("peer_05", 10).unwrap();
        assert!(lone.peers.is_empty() && lone.policy.is_some());
        // Now everyone may reach c: peer_05 gains c only; peer_00 gains c, keeps b? no: loses b.
        s.set_policy(Some(crate::policy::parse(POLICIES[1]).unwrap()), 11);
        let Some(Update::Delta(d)) = s.update_since("peer_05", 10, 11) else {
            panic!("a delta");
        };
        let up: Vec<&str> = d.upserted.iter().map(|p| p.peer_id.as_str()).collect();
        assert_eq!((up, d.removed.len()), (vec!["peer_02"], 0));
        let Some(Update::Delta(d)) = s.update_since("peer_00", 10, 11) else {
            panic!("a delta");
        };
        let up: Vec<&str> = d.upserted.iter().map(|p| p.peer_id.as_str()).collect();
        assert_eq!(
            (up, d.removed),
            (vec!["peer_02"], vec!["peer_01".to_string()])
        );
        // An endpoint change of a peer peer_05 may not see reaches peer_05 as nothing.
        s.put_peer(peer(1, 2), 12);
        let Some(Update::Delta(d)) = s.update_since("peer_05", 11, 12) else {
            panic!("a delta");
        };
        assert!(d.upserted.is_empty() && !d.policy_changed);
        assert_eq!(
            d.removed,
            ["peer_01"],
            "(told again that it is not in its map: harmless)"
        );
    }
}
