//! A peer's compiled part as agents receive it (`PolicyPart`).

use canopy_proto::v1::{InboundRule, PolicyPart};

use crate::compile::Inbound;
use crate::{Proto, Selector};

/// A peer's inbound rules as the agent receives them.
pub fn policy_part(inbound: &[Inbound]) -> PolicyPart {
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
