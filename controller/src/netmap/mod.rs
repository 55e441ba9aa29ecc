//! Network state → per-peer [`NetworkMap`]s and deltas. Pure: the cache feeds it store events
//! (`put_peer`, `delete_peer` with their revisions) and asks for a full map or the delta since a
//! revision an agent holds.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use canopy_proto::v1::{
    NetworkDelta, NetworkMap, NetworkRecord, PeerRecord, RemotePeer, RouteRecord,
};
use ipnetwork::IpNetwork;

use crate::model::Revision;
use crate::policy::Policy;
use crate::policy::compile::{self, Directory, Visible};
use crate::policy::eval::PeerView;
use wire::{policy_part, remote};

mod lock;
mod wire;

pub use lock::policy_lock;

/// Removed peers remembered per network, so agents resuming from an older revision can get a delta.
const TOMBSTONES: usize = 1024;

#[derive(Clone, Debug, Default)]
struct Entry {
    record: PeerRecord,
    /// The revision that last changed the record (or the prefixes it carries), the one that
    /// last changed its tags, and the one that last changed the routes it advertises.
    rev: Revision,
    tags_rev: Revision,
    routes_rev: Revision,
    /// The revision that last changed its choice of exit node.
    exit_rev: Revision,
    addresses: Vec<IpNetwork>,
    /// The prefixes it advertises (carried or standing by), sorted.
    routes: Vec<IpNetwork>,
}

impl Entry {
    fn view(&self) -> PeerView<'_> {
        PeerView {
            id: &self.record.id,
            tags: &self.record.tags,
            addresses: &self.addresses,
            routes: &self.routes,
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
    /// The last revision that changed what every map says of the network itself (its zone).
    network_rev: Revision,
    policy: Policies,
    routes: BTreeMap<String, RouteRecord>,
    /// Gateways whose agent is live (a `gwlive/` record), by id: since when (ms).
    live: HashMap<String, i64>,
    /// The routes in force: prefix → (gateway, route id); see [`NetState::pick_primaries`].
    primaries: BTreeMap<String, (String, String)>,
    /// A locked network's policy as the tenant signed it.
    policy_lock: Option<canopy_proto::v1::PolicyLock>,
}

/// What an agent holding `base` needs next.
#[derive(Clone, Debug, PartialEq)]
pub enum Update {
    Full(Box<NetworkMap>),
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
        let inside = |e: &&Entry| compile::reaches(&e.view(), net);
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

    /// The network's record as of `rev`: a new DNS zone or lock goes to every agent (a full
    /// map).
    pub fn set_network(&mut self, network: NetworkRecord, rev: Revision) {
        let lock_changed = network.lock != self.network.lock;
        if network.dns_domain != self.network.dns_domain || lock_changed {
            self.network_rev = rev;
            self.revision = rev;
        }
        self.network = network;
        if lock_changed {
            // Unsigned routes leave force (or enter it, were the lock ever lifted).
            let gateways: BTreeSet<String> =
                self.routes.values().map(|r| r.peer_id.clone()).collect();
            for g in gateways {
                self.set_advertised(&g, rev);
            }
            self.refresh_primaries(rev);
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
        let (mut tags_rev, mut routes_rev, mut routes) = (rev, 0, Vec::new());
        // Set or cleared now (a new peer without one has none to tell).
        let mut exit_rev = if peer.exit_node.is_empty() { 0 } else { rev };
        let new = match self.peers.remove(&id) {
            Some(old) => {
                self.by_revision.remove(&(old.rev, id.clone()));
                if old.record.tags == peer.tags {
                    tags_rev = old.tags_rev;
                }
                exit_rev = if old.record.exit_node == peer.exit_node {
                    old.exit_rev
                } else {
                    rev
                };
                (routes_rev, routes) = (old.routes_rev, old.routes);
                for t in &old.record.tags {
                    self.untag(t, &id);
                }
                false
            }
            None => true,
        };
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
            routes_rev,
            exit_rev,
            addresses,
            routes,
        };
        self.peers.insert(id.clone(), entry);
        self.by_revision.insert((rev, id.clone()));
        self.revision = self.revision.max(rev);
        let tags_changed = tags_rev == rev;
        if (new || tags_changed) && self.routes.values().any(|r| r.peer_id == id) {
            // A gateway the routes named before it was known (a re-list's order), or whose
            // tags may auto-approve its routes now, or not any more.
            self.set_advertised(&id, rev);
            self.refresh_primaries(rev);
        }
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
            // Another gateway may take over its prefixes.
            self.refresh_primaries(rev);
        }
    }

    /// Adds (or replaces) a route at revision `rev`.
    pub fn put_route(&mut self, route: RouteRecord, rev: Revision) {
        let gateway = route.peer_id.clone();
        if let Some(old) = self.routes.insert(route.id.clone(), route)
            && old.peer_id != gateway
        {
            self.set_advertised(&old.peer_id, rev);
        }
        self.set_advertised(&gateway, rev);
        self.refresh_primaries(rev);
        self.revision = self.revision.max(rev);
    }

    pub fn delete_route(&mut self, id: &str, rev: Revision) {
        if let Some(old) = self.routes.remove(id) {
            self.set_advertised(&old.peer_id, rev);
            self.refresh_primaries(rev);
            self.revision = self.revision.max(rev);
        }
    }

    /// Gateway `peer`'s agent is live since `since` (ms), or (`None`) not any more. Returns
    /// whether that moved a prefix to another gateway (else no map changes).
    pub fn set_live(&mut self, peer: &str, since: Option<i64>, rev: Revision) -> bool {
        let changed = match since {
            Some(t) => self.live.insert(peer.to_string(), t) != Some(t),
            None => self.live.remove(peer).is_some(),
        };
        changed && self.refresh_primaries(rev)
    }

    /// Whether route `r` is in force: made or approved by an admin, or auto-approved by the
    /// policy for its gateway.
    fn in_force(&self, r: &RouteRecord) -> bool {
        if self.locked() && r.lock.is_none() {
            return false;
        }
        if !r.pending {
            return true;
        }
        let (Some(p), Some(gw)) = (self.policy.current.as_deref(), self.peers.get(&r.peer_id))
        else {
            return false;
        };
        r.prefix
            .parse()
            .is_ok_and(|prefix| p.auto_approves(&prefix, &gw.view()))
    }

    /// Whether route `id` is in force, and how: "approved", "auto-approved" or "pending".
    pub fn route_state(&self, id: &str) -> &'static str {
        match self.routes.get(id) {
            Some(r) if !r.pending => "approved",
            Some(r) if self.in_force(r) => "auto-approved",
            _ => "pending",
        }
    }

    /// Recomputes the prefixes `peer` advertises (after one of its routes, its tags or the
    /// policy changed): its own map and its policy view follow.
    fn set_advertised(&mut self, peer: &str, rev: Revision) {
        let mut routes: Vec<IpNetwork> = self
            .routes
            .values()
            .filter(|r| r.peer_id == peer && self.in_force(r))
            .filter_map(|r| r.prefix.parse().ok())
            .collect();
        routes.sort();
        routes.dedup();
        if let Some(e) = self.peers.get_mut(peer)
            && e.routes != routes
        {
            self.by_revision.remove(&(e.rev, peer.to_string()));
            e.routes = routes;
            e.rev = rev;
            e.routes_rev = rev;
            self.by_revision.insert((rev, peer.to_string()));
        }
    }

    /// The routes in force: per prefix, among the routes whose gateway is a peer, a live
    /// gateway before one that is not; among live ones the longest live (so a gateway that
    /// comes back does not take its prefixes back, and one that flaps never wins); then the
    /// oldest route, then the lowest id. Pure over the state, so every replica picks the same.
    fn pick_primaries(&self) -> BTreeMap<String, (String, String)> {
        let rank = |r: &RouteRecord| {
            let live = self.live.get(&r.peer_id);
            (
                live.is_none(),
                live.copied().unwrap_or(0),
                r.created_at_unix,
            )
        };
        let mut best: BTreeMap<String, &RouteRecord> = BTreeMap::new();
        // Exit routes (a /0) are no one's by default: each client opts into one exit node.
        let shared = |r: &&RouteRecord| !r.prefix.ends_with("/0");
        for r in self
            .routes
            .values()
            .filter(|r| self.peers.contains_key(&r.peer_id) && self.in_force(r))
            .filter(shared)
        {
            match best.get(&r.prefix) {
                Some(b) if (rank(b), &b.id) <= (rank(r), &r.id) => {}
                _ => {
                    best.insert(r.prefix.clone(), r);
                }
            }
        }
        best.into_iter()
            .map(|(p, r)| (p, (r.peer_id.clone(), r.id.clone())))
            .collect()
    }

    /// Whether route `id` carries its prefix now.
    pub fn is_primary(&self, id: &str) -> bool {
        self.primaries.values().any(|(_, r)| r == id)
    }

    /// The prefixes `peer`'s agent advertised (routes made from its Hello), sorted.
    pub fn agent_prefixes(&self, peer: &str) -> Vec<String> {
        let mut out: Vec<String> = self
            .routes
            .values()
            .filter(|r| r.peer_id == peer && r.from_agent)
            .map(|r| r.prefix.clone())
            .collect();
        out.sort();
        out
    }

    /// Whether gateway `peer`'s agent is live (it has a `gwlive/` record).
    pub fn is_live(&self, peer: &str) -> bool {
        self.live.contains_key(peer)
    }

    /// Whether `peer` advertises any route (its agent's liveness then matters).
    pub fn is_gateway(&self, peer: &str) -> bool {
        self.peers.get(peer).is_some_and(|e| !e.routes.is_empty())
    }

    /// The prefixes `peer` carries now.
    fn routes_of(&self, peer: &str) -> Vec<String> {
        let p = self.primaries.iter();
        p.filter(|(_, (g, _))| g == peer)
            .map(|(prefix, _)| prefix.clone())
            .collect()
    }

    /// Picks the routes in force again and marks the gateways whose carried prefixes changed
    /// as changed at `rev` (their entries in every map carry them as allowed IPs). Returns
    /// whether any did.
    fn refresh_primaries(&mut self, rev: Revision) -> bool {
        let after = self.pick_primaries();
        let before = std::mem::replace(&mut self.primaries, after);
        let after = &self.primaries;
        let mut gateways = BTreeSet::new();
        for prefix in before.keys().chain(after.keys()) {
            let (b, a) = (
                before.get(prefix).map(|x| &x.0),
                after.get(prefix).map(|x| &x.0),
            );
            if b != a {
                gateways.extend(b.cloned());
                gateways.extend(a.cloned());
            }
        }
        for id in &gateways {
            if let Some(e) = self.peers.get_mut(id) {
                self.by_revision.remove(&(e.rev, id.clone()));
                e.rev = rev;
                self.by_revision.insert((rev, id.clone()));
            }
        }
        if !gateways.is_empty() {
            self.revision = self.revision.max(rev);
        }
        !gateways.is_empty()
    }

    /// A peer as `me`'s map carries it: its addresses, the prefixes it carries, and its exit
    /// routes if it is `me`'s exit node.
    fn remote(&self, me: &Entry, p: &Entry) -> RemotePeer {
        let mut r = remote(&p.record);
        let mut carried = self.routes_of(&p.record.id);
        if me.record.exit_node == p.record.id {
            let exits = p.routes.iter().filter(|n| n.prefix() == 0);
            carried.extend(exits.map(ToString::to_string));
        }
        if self.locked() {
            r.lock.clone_from(&p.record.lock);
            r.lock_delegation.clone_from(&p.record.lock_delegation);
            r.route_locks = self.route_locks(&p.record.id, &carried);
        }
        r.allowed_ips.extend(carried);
        r
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
        // Its auto-approvals may put routes into force or out of it.
        let gateways: BTreeSet<String> = self.routes.values().map(|r| r.peer_id.clone()).collect();
        for g in gateways {
            self.set_advertised(&g, rev);
        }
        self.refresh_primaries(rev);
    }

    /// Whether `b` is in `a`'s map (both are peers; the policy lets them exchange packets).
    pub fn sees(&self, a: &str, b: &str) -> bool {
        match (self.peers.get(a), self.policy.current.as_deref()) {
            (Some(me), p) if a != b && self.peers.contains_key(b) => {
                p.is_none_or(|p| compile::part(p, self, &me.view()).sees(b))
            }
            _ => false,
        }
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
                let others = others.filter(|e| self.admitted(e));
                (others.map(|e| self.remote(me, e)).collect(), None)
            }
            Some(p) => {
                let part = compile::part(p, self, &me.view());
                let ids = self.ids_of(part.visible, self_id);
                let visible = ids.iter().filter_map(|id| self.peers.get(id));
                let visible = visible.filter(|e| self.admitted(e));
                (
                    visible.map(|e| self.remote(me, e)).collect(),
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
            routes: me.routes.iter().map(ToString::to_string).collect(),
            dns_domain: crate::names::zone(&self.network),
            dns_name: crate::names::peer_name(&me.record),
            ..self.lock_fields(me)
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
            || (me.tags_rev > base && (pol.current.is_some() || policy_changed))
            // The routes it advertises changed: a full map says which (and its policy part).
            || me.routes_rev > base
            // Its exit node changed: which peer carries 0.0.0.0/0 for it.
            || me.exit_rev > base
            // The network's zone or lock changed.
            || self.network_rev > base
            // A locked network's policy: the agent compiles its part from the signed text.
            || (policy_changed && self.locked());
        if full {
            return self
                .full_map(self_id, at)
                .map(|m| Update::Full(Box::new(m)));
        }
        let current = pol.current.as_deref();
        let sees = |q: &Entry| {
            self.admitted(q) && current.is_none_or(|p| compile::sees(p, &me.view(), &q.view()))
        };
        let mut upserted = Vec::new();
        let mut removed = Vec::new();
        for (_, id) in self.by_revision.range((base + 1, String::new())..) {
            match self.peers.get(id) {
                Some(q) if id != self_id && sees(q) => upserted.push(self.remote(me, q)),
                // Hidden now. Unless the policy or its tags changed, it was hidden at `base`
                // too: nothing to say (an endpoint change of a peer it cannot see is silent).
                Some(q)
                    if id != self_id
                        && (policy_changed || q.tags_rev > base || q.routes_rev > base) =>
                {
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
                    if self.admitted(&self.peers[id]) {
                        upserted.push(self.remote(me, &self.peers[id]));
                    }
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

#[cfg(test)]
mod tests;
