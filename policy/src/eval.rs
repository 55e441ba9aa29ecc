//! One question answered the slow, obvious way: may this peer send this packet to that one?
//! The reference the compiler is tested against, and what `canopy policy test` explains.

use std::net::IpAddr;

use ipnetwork::IpNetwork;

use super::{Policy, Proto, Rule, Selector};

/// A peer as the policy sees it.
#[derive(Clone, Copy, Debug)]
pub struct PeerView<'a> {
    pub id: &'a str,
    pub tags: &'a [String],
    /// Overlay addresses (host prefixes).
    pub addresses: &'a [IpNetwork],
    /// The prefixes of the sites it is a gateway to.
    pub routes: &'a [IpNetwork],
}

/// The first packet of a flow: its protocol (not `Any`), destination port (0 for icmp) and
/// destination address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Packet {
    pub proto: Proto,
    pub port: u16,
    pub dst: IpAddr,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The network has no policy: everything is allowed.
    NoPolicy,
    /// Allowed by the rule at this index.
    Allowed(usize),
    Denied,
}

impl Verdict {
    pub fn allowed(self) -> bool {
        !matches!(self, Verdict::Denied)
    }
}

/// Whether a `from` selector (or an auto-approver) takes `p`.
pub fn source_matches(s: &Selector, p: &PeerView<'_>) -> bool {
    match s {
        Selector::Any => true,
        Selector::Tag(t) => p.tags.iter().any(|x| x == t),
        Selector::Peer(id) => p.id == id,
        Selector::Cidr(_) => false,
    }
}

fn destination_matches(s: &Selector, p: &PeerView<'_>, dst: IpAddr) -> bool {
    match s {
        Selector::Cidr(net) => {
            net.contains(dst)
                && (p.addresses.iter().any(|a| a.ip() == dst)
                    || p.routes.iter().any(|r| r.contains(dst)))
        }
        other => source_matches(other, p),
    }
}

fn proto_and_port_match(r: &Rule, pkt: &Packet) -> bool {
    r.proto.covers(pkt.proto)
        && (r.ports.is_empty() || r.ports.iter().any(|p| p.contains(pkt.port)))
}

/// Whether `from` may send `pkt` to `to` (the first packet of a flow; replies always pass).
pub fn allows(
    policy: Option<&Policy>,
    from: &PeerView<'_>,
    to: &PeerView<'_>,
    pkt: &Packet,
) -> Verdict {
    let Some(policy) = policy else {
        return Verdict::NoPolicy;
    };
    policy
        .rules
        .iter()
        .position(|r| {
            r.from.iter().any(|s| source_matches(s, from))
                && r.to.iter().any(|s| destination_matches(s, to, pkt.dst))
                && proto_and_port_match(r, pkt)
        })
        .map_or(Verdict::Denied, Verdict::Allowed)
}

/// The answer and, in words, why: which rule allows it, or which rules came close and what
/// they allow instead.
pub fn explain(
    policy: Option<&Policy>,
    from: &PeerView<'_>,
    to: &PeerView<'_>,
    pkt: &Packet,
) -> (Verdict, Vec<String>) {
    let verdict = allows(policy, from, to, pkt);
    let Some(policy) = policy else {
        return (
            verdict,
            vec!["the network has no policy: every peer reaches every other".into()],
        );
    };
    let at = |r: &Rule| {
        if r.line > 0 {
            format!("{} (line {})", r.name, r.line)
        } else {
            r.name.clone()
        }
    };
    if let Verdict::Allowed(i) = verdict {
        return (
            verdict,
            vec![format!("allowed by {}", at(&policy.rules[i]))],
        );
    }
    let mut why = Vec::new();
    for r in &policy.rules {
        let src = r.from.iter().any(|s| source_matches(s, from));
        let dst = r.to.iter().any(|s| destination_matches(s, to, pkt.dst));
        if src && dst {
            let ports: Vec<String> = r.ports.iter().map(ToString::to_string).collect();
            let ports = if ports.is_empty() {
                String::new()
            } else {
                format!("/{}", ports.join(","))
            };
            why.push(format!(
                "{} matches both peers but allows {}{ports}, not {}/{}",
                at(r),
                r.proto,
                pkt.proto,
                pkt.port
            ));
        }
    }
    if why.is_empty() {
        why.push(format!(
            "no rule has `from` matching {} (tags {:?}) and `to` matching {} (tags {:?}) at {}",
            from.id, from.tags, to.id, to.tags, pkt.dst
        ));
    }
    why.push("a policy allows only what a rule allows (and replies)".into());
    (verdict, why)
}
