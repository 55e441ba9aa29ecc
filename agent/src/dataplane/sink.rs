//! What the agent makes of the controller's maps: the peers for the engine ([`MapPeers`],
//! pure) and the interface's addresses, and the [`MapSink`] that applies them to a
//! [`Dataplane`].

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;

use canopy_proto::v1::{InboundRule, NetworkDelta, NetworkMap, Protocol, RemotePeer};
use ipnetwork::IpNetwork;

use super::{Dataplane, ExitSpec, MANAGED_KEEPALIVE};
use crate::control::MapSink;
use crate::engine::PeerConfig;
use crate::engine::filter::{Allow, Proto};

/// Applies the controller's network maps to a [`Dataplane`].
pub struct ControllerSink {
    dp: Arc<Dataplane>,
    peers: MapPeers,
    /// As a gateway, masquerade overlay sources going into the site.
    masquerade: bool,
    /// Addresses that stay outside the tunnel when an exit node takes the internet traffic
    /// (the controllers').
    pub direct: Vec<std::net::IpAddr>,
}

impl ControllerSink {
    pub fn new(dp: Arc<Dataplane>, masquerade: bool) -> Self {
        Self {
            dp,
            peers: MapPeers::default(),
            masquerade,
            direct: Vec::new(),
        }
    }
}

/// Which families `map` sends through an exit node: a peer's allowed IPs hold the default
/// route (the controller puts it only in the map of a peer that chose that exit node), and
/// this node has an overlay address of that family to send from.
pub fn exit_spec(map: &NetworkMap, direct: &[std::net::IpAddr]) -> ExitSpec {
    let has = |route: &str| {
        map.peers
            .iter()
            .any(|p| p.allowed_ips.iter().any(|a| a == route))
    };
    let own = |v6: bool| {
        let mut addrs = map
            .addresses
            .iter()
            .filter_map(|a| a.parse::<IpNetwork>().ok());
        addrs.any(|a| a.is_ipv6() == v6)
    };
    ExitSpec {
        v4: has("0.0.0.0/0") && own(false),
        v6: has("::/0") && own(true),
        direct: direct.to_vec(),
    }
}

impl MapSink for ControllerSink {
    fn apply(
        &mut self,
        map: &NetworkMap,
        delta: Option<&NetworkDelta>,
    ) -> Result<(), crate::control::SinkError> {
        let (set, remove) = self.peers.changes(map, delta, &self.dp.peer_keys());
        let set = self.peers.with_candidates(map, set);
        self.dp.update_peers(set, &remove)?;
        self.dp.set_policy(policy_rules(map));
        let routes: Vec<IpNetwork> = map.routes.iter().filter_map(|r| r.parse().ok()).collect();
        if let Err(e) = self.dp.set_gateway(&routes, self.masquerade) {
            tracing::warn!(error = %e, routes = ?map.routes, "could not set up forwarding for the routes this node carries");
        }
        if let Err(e) = self.dp.set_exit(exit_spec(map, &self.direct)) {
            tracing::warn!(error = %e, "could not route internet traffic through the exit node");
        }
        Ok(())
    }
}

/// Where a peer may be reached: its own addresses in the order to try them, and its NAT's
/// outside addresses, probed only when the controller has both sides punch at once.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Candidates {
    pub direct: Vec<SocketAddr>,
    pub quiet: Vec<SocketAddr>,
}

/// Turns the controller's maps into peer changes for the engine: what to set and which keys to
/// remove. Pure (it remembers only what earlier maps said), so its rules are tested alone.
///
/// Endpoints: a peer new to the interface starts at the best of the controller's endpoints
/// (the first that parses, outside the prefixes routed into the tunnel); after that the engine
/// owns it (roaming, and probes of better candidates): a later map only updates the
/// candidates, so a working path (the relay, a NAT's remapped port) is never replaced by an
/// address from the list that may not work.
#[derive(Debug, Default)]
pub struct MapPeers {
    /// peer id → public key, to turn a delta's removed ids into keys.
    keys: HashMap<String, [u8; 32]>,
    /// The prefixes this node routes into the tunnel (sites behind gateways; not overlay
    /// hosts, not an exit node's default route, which WireGuard's own packets skip): an
    /// endpoint inside one is reached through another peer, the last choice.
    routed: Vec<IpNetwork>,
}

impl MapPeers {
    /// The changes `delta` makes (or, without one, the full `map` against the keys the
    /// interface has now, `current`): peers to set, keys to remove. `map` is the map after the
    /// delta.
    pub fn changes(
        &mut self,
        map: &NetworkMap,
        delta: Option<&NetworkDelta>,
        current: &[[u8; 32]],
    ) -> (Vec<PeerConfig>, Vec<[u8; 32]>) {
        let routed = routed_prefixes(map);
        let rerouted = routed != self.routed;
        self.routed = routed;
        let known: BTreeSet<[u8; 32]> = current.iter().copied().collect();
        let (mut set, remove): (Vec<PeerConfig>, Vec<[u8; 32]>) = match delta {
            Some(d) => {
                let remove = d
                    .removed
                    .iter()
                    .filter_map(|id| self.keys.remove(id))
                    .collect();
                let set = d
                    .upserted
                    .iter()
                    .filter_map(|p| self.config(p, &known))
                    .collect();
                (set, remove)
            }
            None => {
                let set: Vec<PeerConfig> = map
                    .peers
                    .iter()
                    .filter_map(|p| self.config(p, &known))
                    .collect();
                let keep: BTreeSet<[u8; 32]> = set.iter().map(|p| p.public_key).collect();
                let remove = current
                    .iter()
                    .filter(|k| !keep.contains(*k))
                    .copied()
                    .collect();
                self.keys.retain(|_, k| keep.contains(k));
                (set, remove)
            }
        };
        if rerouted {
            // A site prefix came or went: every peer's candidates are ordered again (an
            // endpoint inside a routed prefix goes last), not only those the delta names.
            let done: BTreeSet<[u8; 32]> = set.iter().map(|p| p.public_key).collect();
            let others = map.peers.iter().filter(|p| {
                <[u8; 32]>::try_from(p.public_key.as_slice()).is_ok_and(|k| !done.contains(&k))
            });
            let again: Vec<PeerConfig> = others.filter_map(|p| self.config(p, &known)).collect();
            set.extend(again);
        }
        (set, remove)
    }

    /// Each of `set` with its candidates from `map`: every endpoint the controller has for it,
    /// those outside the prefixes routed into the tunnel first, then its outside addresses
    /// (quiet: probed only in a hole punch).
    pub fn with_candidates(
        &self,
        map: &NetworkMap,
        set: Vec<PeerConfig>,
    ) -> Vec<(PeerConfig, Candidates)> {
        let by_key: HashMap<&[u8], &RemotePeer> = map
            .peers
            .iter()
            .map(|p| (p.public_key.as_slice(), p))
            .collect();
        set.into_iter()
            .map(|c| {
                let p = by_key.get(c.public_key.as_slice());
                let eps = p.map(|p| p.endpoints.as_slice());
                let outside = p.map(|p| p.outside.as_slice()).unwrap_or_default();
                let candidates = Candidates {
                    direct: self.candidates(eps.unwrap_or_default()),
                    quiet: outside.iter().filter_map(|e| e.parse().ok()).collect(),
                };
                (c, candidates)
            })
            .collect()
    }

    /// A peer's endpoints in the order to try them: outside the routed prefixes first.
    fn candidates(&self, endpoints: &[String]) -> Vec<SocketAddr> {
        let parsed = endpoints
            .iter()
            .filter_map(|e| e.parse::<SocketAddr>().ok());
        let (direct, routed): (Vec<SocketAddr>, Vec<SocketAddr>) =
            parsed.partition(|a| !self.routed.iter().any(|n| n.contains(a.ip())));
        direct.into_iter().chain(routed).collect()
    }

    /// A map peer as the engine takes it; `None` for a key that is not 32 bytes. Only a peer
    /// the interface does not have yet (`known`) gets an endpoint: the best candidate.
    fn config(&mut self, p: &RemotePeer, known: &BTreeSet<[u8; 32]>) -> Option<PeerConfig> {
        let key: [u8; 32] = p.public_key.as_slice().try_into().ok()?;
        let allowed_ips = p
            .allowed_ips
            .iter()
            .filter_map(|a| a.parse().ok())
            .collect();
        let endpoint = if known.contains(&key) {
            None
        } else {
            self.candidates(&p.endpoints).first().copied()
        };
        self.keys.insert(p.peer_id.clone(), key);
        Some(PeerConfig {
            public_key: key,
            preshared_key: None,
            endpoint,
            allowed_ips,
            persistent_keepalive: Some(MANAGED_KEEPALIVE),
        })
    }
}

/// The prefixes `map` routes into the tunnel that an endpoint could sit in: every peer's
/// allowed IPs but host addresses and default routes, sorted.
fn routed_prefixes(map: &NetworkMap) -> Vec<IpNetwork> {
    let all = map.peers.iter().flat_map(|p| &p.allowed_ips);
    let mut out: Vec<IpNetwork> = all
        .filter_map(|a| a.parse::<IpNetwork>().ok())
        .filter(|n| n.prefix() != 0 && n.prefix() < if n.is_ipv4() { 32 } else { 128 })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// What each peer of `map` may open on this node, by public key; `None` when the network has
/// no policy. A rule names its sources as "any", tags or peer ids: the map's peers are matched
/// against them here.
pub fn policy_rules(map: &NetworkMap) -> Option<HashMap<[u8; 32], Vec<Allow>>> {
    let part = map.policy.as_ref()?;
    // A rule without destinations is about this node's own addresses, never about a site it
    // forwards to.
    let own: Vec<IpNetwork> = map
        .addresses
        .iter()
        .filter_map(|a| a.parse().ok())
        .collect();
    let takes = |r: &InboundRule, p: &RemotePeer| {
        r.from_any
            || r.from_peers.contains(&p.peer_id)
            || r.from_tags.iter().any(|t| p.tags.contains(t))
    };
    // A rule this agent cannot read (a protocol from a newer controller) allows nothing.
    let allow = |r: &InboundRule| {
        let proto = match Protocol::try_from(r.proto).ok()? {
            Protocol::Any => Proto::Any,
            Protocol::Tcp => Proto::Tcp,
            Protocol::Udp => Proto::Udp,
            Protocol::Icmp => Proto::Icmp,
        };
        let port = |n: u32| u16::try_from(n).ok();
        let ports = r
            .ports
            .iter()
            .map(|p| Some((port(p.first)?, port(p.last)?)));
        let dst: Vec<IpNetwork> = r
            .dst
            .iter()
            .map(|d| d.parse().ok())
            .collect::<Option<_>>()?;
        Some(Allow {
            proto,
            ports: ports.collect::<Option<_>>()?,
            dst: if dst.is_empty() { own.clone() } else { dst },
        })
    };
    let mut out = HashMap::new();
    for p in &map.peers {
        let Ok(key) = <[u8; 32]>::try_from(p.public_key.as_slice()) else {
            continue;
        };
        let rules = part
            .inbound
            .iter()
            .filter(|r| takes(r, p))
            .filter_map(allow);
        out.insert(key, rules.collect());
    }
    Some(out)
}

/// The interface addresses for a controller map: each own address with its network's prefix.
pub fn map_addresses(map: &NetworkMap) -> Vec<IpNetwork> {
    let cidrs: Vec<IpNetwork> = map.cidrs.iter().filter_map(|c| c.parse().ok()).collect();
    map.addresses
        .iter()
        .filter_map(|a| a.parse::<IpNetwork>().ok())
        .filter_map(|a| {
            let prefix = cidrs
                .iter()
                .find(|c| c.contains(a.ip()))
                .map_or(a.prefix(), |c| c.prefix());
            IpNetwork::new(a.ip(), prefix).ok()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(id: &str, key: u8, endpoints: &[&str]) -> RemotePeer {
        RemotePeer {
            peer_id: id.into(),
            public_key: vec![key; 32],
            allowed_ips: vec![format!("100.64.0.{key}/32")],
            endpoints: endpoints.iter().map(|e| e.to_string()).collect(),
            ..Default::default()
        }
    }

    fn map(peers: Vec<RemotePeer>) -> NetworkMap {
        NetworkMap {
            peers,
            ..Default::default()
        }
    }

    #[test]
    fn a_full_map_sets_its_peers_and_removes_the_others() {
        let mut m = MapPeers::default();
        let full = map(vec![peer("a", 1, &["192.0.2.1:1"]), peer("bad", 2, &[])]);
        let mut full = full;
        full.peers[1].public_key = vec![2; 5];
        let (set, remove) = m.changes(&full, None, &[[9; 32]]);
        assert_eq!(set.len(), 1, "a key that is not 32 bytes is skipped");
        assert_eq!(set[0].public_key, [1; 32]);
        assert_eq!(
            set[0].endpoint,
            Some("192.0.2.1:1".parse().unwrap()),
            "new to the interface"
        );
        assert_eq!(set[0].allowed_ips, vec!["100.64.0.1/32".parse().unwrap()]);
        assert_eq!(remove, vec![[9; 32]], "a key the map no longer has");
    }

    #[test]
    fn only_a_new_peer_gets_an_endpoint_later_lists_only_change_its_candidates() {
        let mut m = MapPeers::default();
        let full = map(vec![peer("a", 1, &["nonsense", "192.0.2.1:1"])]);
        let (set, _) = m.changes(&full, None, &[]);
        assert_eq!(
            set[0].endpoint,
            Some("192.0.2.1:1".parse().unwrap()),
            "the first that parses"
        );
        let moved = map(vec![peer("a", 1, &["192.0.2.7:1"])]);
        let delta = NetworkDelta {
            upserted: moved.peers.clone(),
            ..Default::default()
        };
        let (set, _) = m.changes(&moved, Some(&delta), &[[1; 32]]);
        assert_eq!(set[0].endpoint, None, "the engine keeps the path it has");
        let mut moved = moved;
        moved.peers[0].outside = vec!["198.51.100.7:9".into()];
        let with = m.with_candidates(&moved, set);
        assert_eq!(
            with[0].1,
            Candidates {
                direct: vec!["192.0.2.7:1".parse().unwrap()],
                quiet: vec!["198.51.100.7:9".parse().unwrap()],
            },
            "a NAT's outside address is a quiet candidate"
        );
    }

    #[test]
    fn an_endpoint_inside_a_site_routed_through_the_tunnel_is_the_last_choice() {
        let mut m = MapPeers::default();
        // gw2 reports its site address first; no route to the site yet: taken as it comes.
        let gw2 = peer("gw2", 2, &["10.20.0.2:5", "192.0.2.3:5"]);
        let mut full = map(vec![peer("gw1", 1, &["192.0.2.2:5"]), gw2]);
        let (set, _) = m.changes(&full, None, &[]);
        assert_eq!(set[1].endpoint, Some("10.20.0.2:5".parse().unwrap()));
        // The site is routed through gw1 now: a delta names gw1 only, yet gw2's candidates
        // are ordered again, the address outside the site first (the engine probes it and
        // moves there).
        full.peers[0].allowed_ips.push("10.20.0.0/24".into());
        let delta = NetworkDelta {
            upserted: vec![full.peers[0].clone()],
            ..Default::default()
        };
        let (set, _) = m.changes(&full, Some(&delta), &[[1; 32], [2; 32]]);
        let with = m.with_candidates(&full, set);
        assert_eq!(with.len(), 2, "{with:?}");
        let gw2: Vec<String> = with[1].1.direct.iter().map(ToString::to_string).collect();
        assert_eq!(gw2, ["192.0.2.3:5", "10.20.0.2:5"]);
        // An exit node's default route is no reason to reorder: WireGuard's packets skip it.
        full.peers[0].allowed_ips.push("0.0.0.0/0".into());
        assert!(!routed_prefixes(&full).iter().any(|n| n.prefix() == 0));
    }

    #[test]
    fn a_delta_removes_peers_by_id() {
        let mut m = MapPeers::default();
        let full = map(vec![peer("a", 1, &[]), peer("b", 2, &[])]);
        m.changes(&full, None, &[]);
        let delta = NetworkDelta {
            removed: vec!["b".into(), "unknown".into()],
            ..Default::default()
        };
        let (set, remove) = m.changes(&full, Some(&delta), &[[1; 32], [2; 32]]);
        assert!(set.is_empty());
        assert_eq!(remove, vec![[2; 32]]);
    }

    #[test]
    fn policy_rules_go_to_the_peers_they_name_and_unreadable_rules_allow_nothing() {
        use canopy_proto::v1::{PolicyPart, PortRange};
        let mut web = peer("peer_web", 1, &[]);
        web.tags = vec!["web".into()];
        let other = peer("peer_other", 2, &[]);
        let mut m = map(vec![web, other]);
        assert!(policy_rules(&m).is_none(), "no policy: nothing to enforce");
        let rule = |tags: &[&str], proto: Protocol| InboundRule {
            from_tags: tags.iter().map(|t| t.to_string()).collect(),
            proto: proto as i32,
            ports: vec![PortRange {
                first: 5432,
                last: 5432,
            }],
            ..Default::default()
        };
        let mut unknown = rule(&["web"], Protocol::Tcp);
        unknown.proto = 99;
        m.policy = Some(PolicyPart {
            inbound: vec![
                rule(&["web"], Protocol::Tcp),
                unknown,
                rule(&["db"], Protocol::Udp),
            ],
        });
        let rules = policy_rules(&m).unwrap();
        assert_eq!(rules[&[1u8; 32]].len(), 1, "web: its one readable rule");
        assert_eq!(rules[&[1u8; 32]][0].ports, vec![(5432, 5432)]);
        assert!(
            rules[&[2u8; 32]].is_empty(),
            "a peer no rule names may open nothing"
        );
    }
}

#[cfg(test)]
mod exit_tests {
    use super::*;

    #[test]
    fn a_family_goes_to_the_exit_node_when_a_peer_carries_its_default_route_and_we_have_an_address()
    {
        let mut map = NetworkMap {
            addresses: vec!["100.64.0.2/32".into()],
            peers: vec![RemotePeer {
                allowed_ips: vec!["100.64.0.1/32".into(), "0.0.0.0/0".into(), "::/0".into()],
                ..Default::default()
            }],
            ..Default::default()
        };
        let direct = ["192.0.2.254".parse().unwrap()];
        let s = exit_spec(&map, &direct);
        assert!(
            s.v4 && !s.v6,
            "no IPv6 overlay address: IPv6 stays as it was"
        );
        assert_eq!(s.direct, direct);
        map.addresses.push("fd7a::2/128".into());
        assert!(exit_spec(&map, &direct).v6);
        map.peers[0].allowed_ips.truncate(1);
        let s = exit_spec(&map, &direct);
        assert!(!s.v4 && !s.v6, "no exit node chosen");
    }
}
