//! A policy and a network's peers → one peer's own part: the peers it may exchange packets
//! with (either direction; the others are left out of its map) and the inbound rules that
//! apply to it, with sources still as selectors (the map carries every visible peer's id and
//! tags, so the agent resolves them). A part costs O(rules + visible peers) to build, so a
//! policy or tag change rebuilds each agent's part on its own and sends what differs.

use std::collections::{BTreeSet, HashMap};

use ipnetwork::IpNetwork;

use super::eval::PeerView;
use super::{Policy, PortRange, Proto, Selector};

/// A rule as the receiving peer enforces it: packets from peers matching `from` (any, a tag,
/// a peer id), of `proto` to `ports` (empty: all), to `dst` (empty: any of its addresses).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Inbound {
    pub from: Vec<Selector>,
    pub proto: Proto,
    pub ports: Vec<PortRange>,
    pub dst: Vec<IpNetwork>,
}

/// The peers one peer may exchange packets with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Visible {
    /// Every peer (a rule about it names "*" on the other side).
    All,
    Some(BTreeSet<String>),
}

/// One peer's part of the policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerPart {
    pub me: String,
    pub visible: Visible,
    /// What others may open on it, in rule order.
    pub inbound: Vec<Inbound>,
}

/// Where the compiler finds peers by selector: the cache's network state, or [`Peers`].
pub trait Directory {
    /// Every peer's id.
    fn ids(&self) -> Vec<&str>;
    /// The ids of the peers with tag `tag`.
    fn tagged(&self, tag: &str) -> Vec<&str>;
    fn has(&self, id: &str) -> bool;
    /// The ids of the peers with an address inside `net`.
    fn inside(&self, net: &IpNetwork) -> Vec<&str>;
}

/// Adds the ids of the peers `s` selects to `out`.
fn select(dir: &dyn Directory, s: &Selector, out: &mut BTreeSet<String>) {
    let ids = match s {
        Selector::Any => dir.ids(),
        Selector::Tag(t) => dir.tagged(t),
        Selector::Peer(id) => dir.has(id).then_some(id.as_str()).into_iter().collect(),
        Selector::Cidr(net) => dir.inside(net),
    };
    out.extend(ids.into_iter().map(str::to_string));
}

/// A list of peers indexed for selector lookups.
#[derive(Debug)]
pub struct Peers<'a> {
    all: Vec<PeerView<'a>>,
    by_tag: HashMap<&'a str, Vec<usize>>,
    by_id: HashMap<&'a str, usize>,
}

impl<'a> Peers<'a> {
    pub fn new(all: Vec<PeerView<'a>>) -> Self {
        let mut by_tag: HashMap<&str, Vec<usize>> = HashMap::new();
        let mut by_id = HashMap::new();
        for (i, p) in all.iter().enumerate() {
            by_id.insert(p.id, i);
            for t in p.tags {
                by_tag.entry(t.as_str()).or_default().push(i);
            }
        }
        Self { all, by_tag, by_id }
    }

    pub fn get(&self, id: &str) -> Option<&PeerView<'a>> {
        self.by_id.get(id).map(|&i| &self.all[i])
    }
}

impl Directory for Peers<'_> {
    fn ids(&self) -> Vec<&str> {
        self.all.iter().map(|p| p.id).collect()
    }
    fn tagged(&self, tag: &str) -> Vec<&str> {
        let found = self.by_tag.get(tag).map(Vec::as_slice).unwrap_or_default();
        found.iter().map(|&i| self.all[i].id).collect()
    }
    fn has(&self, id: &str) -> bool {
        self.by_id.contains_key(id)
    }
    fn inside(&self, net: &IpNetwork) -> Vec<&str> {
        let inside = |p: &&PeerView<'_>| reaches(p, net);
        self.all.iter().filter(inside).map(|p| p.id).collect()
    }
}

/// Whether selector `s` (of a rule's `from` or `to`) takes `p`.
fn takes(s: &Selector, p: &PeerView<'_>) -> bool {
    match s {
        Selector::Any => true,
        Selector::Tag(t) => p.tags.iter().any(|x| x == t),
        Selector::Peer(id) => p.id == id,
        Selector::Cidr(net) => reaches(p, net),
    }
}

/// Whether a packet to somewhere in `net` may end at `p`: one of its addresses is inside, or
/// a route it advertises overlaps it (it is a gateway to part of `net`).
pub fn reaches(p: &PeerView<'_>, net: &IpNetwork) -> bool {
    p.addresses.iter().any(|a| net.contains(a.ip())) || p.routes.iter().any(|r| overlap(r, net))
}

/// The smaller of two prefixes if one holds the other (their intersection), else `None`.
fn intersection(a: &IpNetwork, b: &IpNetwork) -> Option<IpNetwork> {
    if a.is_ipv4() != b.is_ipv4() {
        None
    } else if a.prefix() >= b.prefix() && b.contains(a.network()) {
        Some(*a)
    } else if b.prefix() >= a.prefix() && a.contains(b.network()) {
        Some(*b)
    } else {
        None
    }
}

fn overlap(a: &IpNetwork, b: &IpNetwork) -> bool {
    intersection(a, b).is_some()
}

/// Where in `net` packets may end at `p`: its addresses inside, and the parts of its routes
/// inside (never more than it has or forwards to, however wide `net` is).
fn destinations(p: &PeerView<'_>, net: &IpNetwork) -> Vec<IpNetwork> {
    let own = p.addresses.iter().filter_map(|a| {
        let host = IpNetwork::new(a.ip(), if a.is_ipv4() { 32 } else { 128 }).ok()?;
        intersection(&host, net)
    });
    let routed = p.routes.iter().filter_map(|r| intersection(r, net));
    own.chain(routed).collect()
}

/// Whether `a` and `b` may exchange packets at all (a rule lets one open something on the
/// other): O(rules), for the one peer a change is about.
pub fn sees(policy: &Policy, a: &PeerView<'_>, b: &PeerView<'_>) -> bool {
    a.id != b.id
        && policy.rules.iter().any(|r| {
            let one_way = |x: &PeerView<'_>, y: &PeerView<'_>| {
                r.from.iter().any(|s| takes(s, x)) && r.to.iter().any(|s| takes(s, y))
            };
            one_way(a, b) || one_way(b, a)
        })
}

/// `me`'s part of `policy` among the peers of `dir` (`me` may be one of them; it never sees
/// itself). Each distinct selector is looked up once, and none when one is "*": the cost is
/// O(rules + visible peers), not O(rules × peers).
pub fn part(policy: &Policy, dir: &dyn Directory, me: &PeerView<'_>) -> PeerPart {
    let mut sources: BTreeSet<&Selector> = BTreeSet::new();
    let mut inbound = Vec::new();
    for r in &policy.rules {
        // The CIDRs of `to` that take me restrict the destination to my addresses and routed
        // prefixes inside them; any other selector that takes me takes all my addresses (and
        // none of the sites behind me: a site is reached only by a rule naming its prefix).
        let mut whole = false;
        let mut dst = Vec::new();
        for s in &r.to {
            match s {
                Selector::Cidr(net) if takes(s, me) => dst.extend(destinations(me, net)),
                _ if takes(s, me) => whole = true,
                _ => {}
            }
        }
        if whole || !dst.is_empty() {
            inbound.push(Inbound {
                from: r.from.clone(),
                proto: r.proto,
                ports: r.ports.clone(),
                dst: if whole { Vec::new() } else { dst },
            });
            sources.extend(r.from.iter());
        }
        if r.from.iter().any(|s| takes(s, me)) {
            sources.extend(r.to.iter());
        }
    }
    inbound.dedup();
    let visible = if sources.contains(&Selector::Any) {
        Visible::All
    } else {
        let mut ids = BTreeSet::new();
        for s in sources {
            select(dir, s, &mut ids);
        }
        ids.remove(me.id);
        Visible::Some(ids)
    };
    PeerPart {
        me: me.id.to_string(),
        visible,
        inbound,
    }
}

impl PeerPart {
    /// Whether it may exchange packets with peer `id`.
    pub fn sees(&self, id: &str) -> bool {
        id != self.me
            && match &self.visible {
                Visible::All => true,
                Visible::Some(ids) => ids.contains(id),
            }
    }

    /// The ids of the peers of `dir` it may exchange packets with.
    pub fn ids(&self, dir: &dyn Directory) -> BTreeSet<String> {
        match &self.visible {
            Visible::All => dir
                .ids()
                .into_iter()
                .filter(|id| *id != self.me)
                .map(str::to_string)
                .collect(),
            Visible::Some(ids) => ids.clone(),
        }
    }

    /// Whether this part lets `from` open `pkt` (`from` must be visible): what the agent does
    /// for the first packet of a flow.
    pub fn admits(&self, from: &PeerView<'_>, pkt: &super::eval::Packet) -> bool {
        self.sees(from.id)
            && self.inbound.iter().any(|r| {
                r.from.iter().any(|s| takes(s, from))
                    && r.proto.covers(pkt.proto)
                    && (r.ports.is_empty() || r.ports.iter().any(|p| p.contains(pkt.port)))
                    && (r.dst.is_empty() || r.dst.iter().any(|n| n.contains(pkt.dst)))
            })
    }
}
