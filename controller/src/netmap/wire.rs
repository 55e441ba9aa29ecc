//! Records → what agents receive: a peer as a map carries it, a policy part.

use canopy_proto::v1::{InboundRule, PeerRecord, PolicyPart, RemotePeer};

use crate::policy::compile::Inbound;
use crate::policy::{Proto, Selector};

pub(super) fn remote(p: &PeerRecord) -> RemotePeer {
    RemotePeer {
        peer_id: p.id.clone(),
        public_key: p.public_key.clone(),
        allowed_ips: p.addresses.clone(),
        endpoints: p.endpoints.clone(),
        outside: p.outside.clone(),
        hostname: p.hostname.clone(),
        tags: p.tags.clone(),
        dns_name: crate::names::peer_name(p),
        // Set by NetState for a locked network.
        lock: None,
        route_locks: Vec::new(),
    }
}

/// A peer's inbound rules as the agent receives them.
pub(super) fn policy_part(inbound: &[Inbound]) -> PolicyPart {
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
