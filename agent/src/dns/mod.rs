//! The agent's resolver for its network's zone (pure part): a [`Zone`] built from the map, and
//! [`answer`], one DNS message in, one out. Authoritative for the zone only: names outside it
//! are REFUSED, nothing is forwarded. Messages are parsed and built by `hickory-proto`.
//! The sockets and the registration with the system's resolver are in [`serve`].

pub mod serve;
pub mod system;

use std::collections::HashMap;
use std::net::IpAddr;

use canopy_proto::v1::NetworkMap;
use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, SOA};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use ipnetwork::IpNetwork;

/// Seconds answers may be cached, positive and negative: a peer that joins resolves, and one
/// that leaves stops resolving, within a second even through a caching stub resolver.
pub const TTL: u32 = 1;

/// The largest UDP answer we send (the DNS flag day's safe size), whatever EDNS offers.
const UDP_MAX: u16 = 1232;

/// A network's zone as one map says it: every peer's name → its overlay addresses.
#[derive(Clone, Debug)]
pub struct Zone {
    origin: Name,
    soa: Record,
    names: HashMap<Name, Vec<IpAddr>>,
}

/// How the question came: the answer's size limit differs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

impl Zone {
    /// The zone of `map`: this node and each peer under `dns_domain`, with their overlay
    /// addresses (a peer's allowed IPs that are host addresses inside the network's CIDRs, not
    /// the routes it carries). `None` when the map has no zone (an older controller) or an
    /// invalid one. Names that are not a single valid label are left out.
    pub fn from_map(map: &NetworkMap) -> Option<Zone> {
        let origin = Name::from_ascii(format!("{}.", map.dns_domain))
            .ok()?
            .to_lowercase();
        if map.dns_domain.is_empty() || origin.num_labels() == 0 {
            return None;
        }
        let cidrs: Vec<IpNetwork> = map.cidrs.iter().filter_map(|c| c.parse().ok()).collect();
        let hosts = |addrs: &[String]| -> Vec<IpAddr> {
            let host = |n: &IpNetwork| n.prefix() == if n.is_ipv4() { 32 } else { 128 };
            addrs
                .iter()
                .filter_map(|a| a.parse::<IpNetwork>().ok())
                .filter(|n| host(n) && cidrs.iter().any(|c| c.contains(n.ip())))
                .map(|n| n.ip())
                .collect()
        };
        let mut names: HashMap<Name, Vec<IpAddr>> = HashMap::new();
        let own = (map.dns_name.as_str(), hosts(&map.addresses));
        let peers = map
            .peers
            .iter()
            .map(|p| (p.dns_name.as_str(), hosts(&p.allowed_ips)));
        for (label, addrs) in std::iter::once(own).chain(peers) {
            if let Some(name) = child(&origin, label) {
                let held = names.entry(name).or_default();
                held.extend(addrs);
                held.sort();
                held.dedup();
            }
        }
        let soa = soa_record(&origin, map.revision);
        Some(Zone { origin, soa, names })
    }

    /// The zone's name, without the trailing dot ("prod.canopy").
    pub fn domain(&self) -> String {
        self.origin.to_ascii().trim_end_matches('.').to_string()
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

/// `label.origin`, if `label` is one DNS label of letters, digits and '-'.
fn child(origin: &Name, label: &str) -> Option<Name> {
    let ok = !label.is_empty()
        && label.len() <= 63
        && label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if !ok {
        return None;
    }
    Name::from_ascii(label)
        .ok()?
        .append_domain(origin)
        .ok()
        .map(|n| n.to_lowercase())
}

fn soa_record(origin: &Name, revision: i64) -> Record {
    let admin = Name::from_ascii("hostmaster")
        .ok()
        .and_then(|h| h.append_domain(origin).ok())
        .unwrap_or_else(|| origin.clone());
    // The serial is the map's revision (mod 2^32): it moves with every change.
    let serial = (revision as u64 & u64::from(u32::MAX)) as u32;
    let soa = SOA::new(origin.clone(), admin, serial, 3600, 600, 86400, TTL);
    Record::from_rdata(origin.clone(), TTL, RData::SOA(soa))
}

/// The answer to one DNS message, or `None` when it gets none (a response, or not even a
/// header). `zone` is `None` before the first map: then everything is REFUSED.
pub fn answer(zone: Option<&Zone>, packet: &[u8], transport: Transport) -> Option<Vec<u8>> {
    let query = match Message::from_vec(packet) {
        Ok(q) => q,
        Err(_) => return format_error(packet),
    };
    if query.metadata.message_type != MessageType::Query {
        return None;
    }
    let mut out = Message::response(query.metadata.id, query.metadata.op_code);
    out.metadata.recursion_desired = query.metadata.recursion_desired;
    out.metadata.checking_disabled = query.metadata.checking_disabled;
    let limit = match (transport, &query.edns) {
        (Transport::Tcp, _) => u16::MAX,
        (Transport::Udp, Some(e)) => e.max_payload().clamp(512, UDP_MAX),
        (Transport::Udp, None) => 512,
    };
    if query.edns.is_some() {
        let mut e = Edns::new();
        e.set_max_payload(UDP_MAX);
        out.set_edns(e);
    }
    out.metadata.response_code = if query.metadata.op_code != OpCode::Query {
        ResponseCode::NotImp
    } else if query.queries.len() != 1 {
        ResponseCode::FormErr
    } else {
        out.add_query(query.queries[0].clone());
        match zone {
            Some(z) => lookup(z, &query.queries[0], &mut out),
            None => ResponseCode::Refused,
        }
    };
    let bytes = out.to_vec().ok()?;
    if bytes.len() <= usize::from(limit) {
        return Some(bytes);
    }
    out.truncate().to_vec().ok()
}

/// Fills `out` with what the zone says of `q`; returns the response code.
fn lookup(z: &Zone, q: &hickory_proto::op::Query, out: &mut Message) -> ResponseCode {
    let name = q.name().to_lowercase();
    if !z.origin.zone_of(&name) || !matches!(q.query_class(), DNSClass::IN | DNSClass::ANY) {
        // Not ours, and we forward nothing.
        return ResponseCode::Refused;
    }
    out.metadata.authoritative = true;
    let addrs = if name == z.origin {
        if q.query_type() == RecordType::SOA {
            out.add_answer(z.soa.clone());
            return ResponseCode::NoError;
        }
        &[][..]
    } else {
        match z.names.get(&name) {
            Some(a) => a.as_slice(),
            None => {
                out.add_authority(z.soa.clone());
                return ResponseCode::NXDomain;
            }
        }
    };
    let wanted = |ip: &&IpAddr| match q.query_type() {
        RecordType::A => ip.is_ipv4(),
        RecordType::AAAA => ip.is_ipv6(),
        RecordType::ANY => true,
        _ => false,
    };
    for ip in addrs.iter().filter(wanted) {
        let data = match ip {
            IpAddr::V4(v4) => RData::A(A(*v4)),
            IpAddr::V6(v6) => RData::AAAA(AAAA(*v6)),
        };
        // The owner name as asked (keeps a 0x20-randomised question's case).
        out.add_answer(Record::from_rdata(q.name().clone(), TTL, data));
    }
    if out.answers.is_empty() {
        // The name exists, without records of that type.
        out.add_authority(z.soa.clone());
    }
    ResponseCode::NoError
}

/// FORMERR for a query whose header is readable but whose body is not; nothing otherwise.
fn format_error(packet: &[u8]) -> Option<Vec<u8>> {
    if packet.len() < 12 || packet[2] & 0x80 != 0 {
        return None;
    }
    let id = u16::from_be_bytes([packet[0], packet[1]]);
    let op = OpCode::from_u8((packet[2] >> 3) & 0x0f);
    Message::error_msg(id, op, ResponseCode::FormErr)
        .to_vec()
        .ok()
}

#[cfg(test)]
mod tests;
