//! The access policy in the data path: what a peer may open on this node ([`Allow`] rules, per
//! peer), and a connection tracker for the flows this node opened, whose replies always pass.
//! Sans-IO: packets and `now` in, a verdict out.
//!
//! Inbound packets (decrypted, from a peer) pass when they belong to a flow this node opened
//! or when one of the sending peer's rules allows them. A flow is this node's when its first
//! packet went out: a TCP SYN, or a UDP/ICMP packet that does not answer a flow the peer
//! opened (those are remembered as the peer's, so this node's answers never turn them into
//! its own). A peer's flows are checked against its rules at every packet, so a rule removed
//! stops them at the next one. ICMP errors pass (they open nothing and carry path MTU news).
//! Non-first IPv4 fragments carry no ports: only a rule without ports lets them in.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use ipnetwork::IpNetwork;

/// Flows tracked at most; beyond, new outbound flows go untracked (their replies are dropped
/// unless a rule allows them) until old ones expire.
pub const MAX_FLOWS: usize = 65_536;
/// How long a flow lives without a packet.
const TCP_IDLE: Duration = Duration::from_secs(300);
const UDP_IDLE: Duration = Duration::from_secs(60);
const ICMP_IDLE: Duration = Duration::from_secs(30);
/// How often expired flows are swept out.
const SWEEP_EVERY: Duration = Duration::from_secs(10);

const TCP: u8 = 6;
const UDP: u8 = 17;
const ICMP: u8 = 1;
const ICMPV6: u8 = 58;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Proto {
    Any,
    Tcp,
    Udp,
    Icmp,
}

/// What a peer may open on this node: packets of `proto` to `ports` (inclusive ranges; none:
/// every port) at one of `dst` (none: any address of this node).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allow {
    pub proto: Proto,
    pub ports: Vec<(u16, u16)>,
    pub dst: Vec<IpNetwork>,
}

impl Allow {
    /// Whether this rule lets `f` in (the reference [`Rules`] is tested against).
    pub fn admits(&self, f: &Flow) -> bool {
        let proto = match self.proto {
            Proto::Any => true,
            Proto::Tcp => f.proto == TCP,
            Proto::Udp => f.proto == UDP,
            Proto::Icmp => f.proto == ICMP || f.proto == ICMPV6,
        };
        proto
            && (self.ports.is_empty()
                || (f.has_ports
                    && self
                        .ports
                        .iter()
                        .any(|&(a, b)| (a..=b).contains(&f.dst_port))))
            && (self.dst.is_empty() || self.dst.iter().any(|n| n.contains(f.dst)))
    }
}

/// Ports as sorted, merged inclusive ranges: a lookup is a binary search.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
enum Ports {
    #[default]
    Closed,
    All,
    Some(Vec<(u16, u16)>),
}

impl Ports {
    fn open(&mut self, ranges: &[(u16, u16)]) {
        if ranges.is_empty() {
            *self = Ports::All;
            return;
        }
        match self {
            Ports::All => {}
            Ports::Closed => *self = Ports::Some(ranges.to_vec()),
            Ports::Some(v) => v.extend_from_slice(ranges),
        }
    }

    fn merge(&mut self) {
        if let Ports::Some(v) = self {
            v.sort_unstable();
            let mut out: Vec<(u16, u16)> = Vec::with_capacity(v.len());
            for &(a, b) in v.iter() {
                match out.last_mut() {
                    Some(last) if u32::from(a) <= u32::from(last.1) + 1 => last.1 = last.1.max(b),
                    _ => out.push((a, b)),
                }
            }
            *v = out;
        }
    }

    fn admits(&self, f: &Flow) -> bool {
        match self {
            Ports::Closed => false,
            Ports::All => true,
            Ports::Some(v) => {
                f.has_ports && {
                    let i = v.partition_point(|&(_, b)| b < f.dst_port);
                    v.get(i).is_some_and(|&(a, _)| a <= f.dst_port)
                }
            }
        }
    }
}

/// One peer's rules, compiled for the per-packet check: by protocol, ports merged into sorted
/// ranges (a binary search, however many rules); only rules limited to some of this node's
/// addresses stay a list.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rules {
    everything: bool,
    tcp: Ports,
    udp: Ports,
    icmp: bool,
    by_address: Vec<Allow>,
}

impl Rules {
    pub fn new(rules: &[Allow]) -> Self {
        let mut r = Rules::default();
        for a in rules {
            if !a.dst.is_empty() {
                r.by_address.push(a.clone());
                continue;
            }
            match a.proto {
                Proto::Any if a.ports.is_empty() => r.everything = true,
                Proto::Any => {
                    r.tcp.open(&a.ports);
                    r.udp.open(&a.ports);
                }
                Proto::Tcp => r.tcp.open(&a.ports),
                Proto::Udp => r.udp.open(&a.ports),
                // ICMP has no ports: a rule that names some admits nothing.
                Proto::Icmp => r.icmp |= a.ports.is_empty(),
            }
        }
        r.tcp.merge();
        r.udp.merge();
        r
    }

    /// Whether some rule lets `f` in.
    pub fn admits(&self, f: &Flow) -> bool {
        let quick = self.everything
            || match f.proto {
                TCP => self.tcp.admits(f),
                UDP => self.udp.admits(f),
                ICMP | ICMPV6 => self.icmp,
                _ => false,
            };
        quick || self.by_address.iter().any(|a| a.admits(f))
    }
}

/// The addressing of one packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow {
    pub proto: u8,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub src_port: u16,
    pub dst_port: u16,
    /// False for a non-first fragment and protocols without ports.
    pub has_ports: bool,
    /// An ICMP error (destination unreachable, time exceeded, packet too big, …).
    pub icmp_error: bool,
    /// A TCP SYN without ACK: the first packet of a connection.
    pub syn: bool,
}

/// Reads a packet's flow; `None` for one too short or not IP.
pub fn flow(pkt: &[u8]) -> Option<Flow> {
    match pkt.first()? >> 4 {
        4 if pkt.len() >= 20 => {
            let ihl = usize::from(pkt[0] & 0x0f) * 4;
            let proto = pkt[9];
            let src = IpAddr::V4(Ipv4Addr::new(pkt[12], pkt[13], pkt[14], pkt[15]));
            let dst = IpAddr::V4(Ipv4Addr::new(pkt[16], pkt[17], pkt[18], pkt[19]));
            let first_fragment = u16::from_be_bytes([pkt[6], pkt[7]]) & 0x1fff == 0;
            let l4 = if first_fragment { pkt.get(ihl..) } else { None };
            Some(with_l4(proto, src, dst, l4))
        }
        6 if pkt.len() >= 40 => {
            let src: [u8; 16] = pkt[8..24].try_into().ok()?;
            let dst: [u8; 16] = pkt[24..40].try_into().ok()?;
            let (src, dst) = (
                IpAddr::V6(Ipv6Addr::from(src)),
                IpAddr::V6(Ipv6Addr::from(dst)),
            );
            Some(with_l4(pkt[6], src, dst, pkt.get(40..)))
        }
        _ => None,
    }
}

fn with_l4(proto: u8, src: IpAddr, dst: IpAddr, l4: Option<&[u8]>) -> Flow {
    let mut f = Flow {
        proto,
        src,
        dst,
        src_port: 0,
        dst_port: 0,
        has_ports: false,
        icmp_error: false,
        syn: false,
    };
    let Some(l4) = l4 else {
        return f;
    };
    match proto {
        TCP | UDP if l4.len() >= 4 => {
            f.src_port = u16::from_be_bytes([l4[0], l4[1]]);
            f.dst_port = u16::from_be_bytes([l4[2], l4[3]]);
            f.has_ports = true;
            // SYN set, ACK clear.
            f.syn = proto == TCP && l4.get(13).is_some_and(|b| b & 0x12 == 0x02);
        }
        ICMP | ICMPV6 if l4.len() >= 8 => {
            let t = l4[0];
            f.icmp_error = if proto == ICMP {
                matches!(t, 3 | 11 | 12)
            } else {
                t < 128
            };
            // Echo request and reply: the identifier stands for both ports.
            if matches!((proto, t), (ICMP, 0 | 8) | (ICMPV6, 128 | 129)) {
                f.src_port = u16::from_be_bytes([l4[4], l4[5]]);
                f.dst_port = f.src_port;
            }
        }
        _ => {}
    }
    f
}

/// A flow as seen from this node: the peer, the protocol, this node's end and the other.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Key {
    peer: u32,
    proto: u8,
    local: IpAddr,
    remote: IpAddr,
    local_port: u16,
    remote_port: u16,
}

/// A fast hasher for flow keys (the addresses come from authenticated peers' packets or this
/// node's own; a flood of distinct keys is bounded by [`MAX_FLOWS`]).
#[derive(Default)]
struct FlowHasher(u64);

impl Hasher for FlowHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(5) ^ u64::from(b)).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
        }
    }
}

/// Who sent a flow's first packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Origin {
    Local,
    Peer,
}

/// Flows by peer, with who opened them, until they go idle.
#[derive(Debug, Default)]
pub struct Conntrack {
    flows: HashMap<Key, (Instant, Origin), BuildHasherDefault<FlowHasher>>,
    last_sweep: Option<Instant>,
}

fn idle(proto: u8) -> Duration {
    match proto {
        TCP => TCP_IDLE,
        UDP => UDP_IDLE,
        _ => ICMP_IDLE,
    }
}

impl Conntrack {
    pub fn len(&self) -> usize {
        self.flows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    /// Records a packet this node sends to `peer`. It opens a flow (whose replies then pass
    /// until it goes idle) unless it answers one: a TCP packet other than a SYN never opens
    /// one, nor does a packet in a flow the peer opened.
    pub fn outbound(&mut self, peer: u32, f: &Flow, now: Instant) {
        let key = Key {
            peer,
            proto: f.proto,
            local: f.src,
            remote: f.dst,
            local_port: f.src_port,
            remote_port: f.dst_port,
        };
        let until = now + idle(f.proto);
        if let Some((t, _)) = self.flows.get_mut(&key) {
            *t = until;
            return;
        }
        if f.proto == TCP && !f.syn {
            return;
        }
        self.insert(key, until, Origin::Local, now);
    }

    fn insert(&mut self, key: Key, until: Instant, origin: Origin, now: Instant) {
        if self.flows.len() >= MAX_FLOWS {
            self.sweep(now);
            if self.flows.len() >= MAX_FLOWS {
                return;
            }
        }
        self.flows.insert(key, (until, origin));
    }

    fn key_of_inbound(peer: u32, f: &Flow) -> Key {
        Key {
            peer,
            proto: f.proto,
            local: f.dst,
            remote: f.src,
            local_port: f.dst_port,
            remote_port: f.src_port,
        }
    }

    /// Whether a packet from `peer` is a reply in a flow this node opened.
    pub fn is_reply(&mut self, peer: u32, f: &Flow, now: Instant) -> bool {
        match self.flows.get_mut(&Self::key_of_inbound(peer, f)) {
            Some((t, Origin::Local)) if *t > now => {
                *t = now + idle(f.proto);
                true
            }
            _ => false,
        }
    }

    /// Records a packet from `peer` that a rule let in: the flow is the peer's, so this
    /// node's answers do not make it this node's.
    pub fn admitted(&mut self, peer: u32, f: &Flow, now: Instant) {
        let key = Self::key_of_inbound(peer, f);
        let until = now + idle(f.proto);
        match self.flows.get_mut(&key) {
            Some((t, _)) => *t = until,
            None => self.insert(key, until, Origin::Peer, now),
        }
    }

    /// Forgets idle flows, at most once per [`SWEEP_EVERY`] unless `now` forces it by being
    /// called when full.
    pub fn maybe_sweep(&mut self, now: Instant) {
        if self
            .last_sweep
            .is_none_or(|t| now.saturating_duration_since(t) >= SWEEP_EVERY)
        {
            self.sweep(now);
        }
    }

    fn sweep(&mut self, now: Instant) {
        self.flows.retain(|_, (t, _)| *t > now);
        self.last_sweep = Some(now);
    }

    /// Forgets every flow of `peer` (removed, or its key changed).
    pub fn forget_peer(&mut self, peer: u32) {
        self.flows.retain(|k, _| k.peer != peer);
    }
}

/// Whether an inbound packet `f` from `peer` passes: an ICMP error, allowed by one of the
/// peer's `rules` (then remembered as the peer's flow), or a reply to one this node opened.
pub fn admits(ct: &mut Conntrack, peer: u32, rules: &Rules, f: &Flow, now: Instant) -> bool {
    if f.icmp_error {
        return true;
    }
    if rules.admits(f) {
        // A TCP flow is never this node's unless it sent the SYN: nothing to remember.
        if f.proto != TCP {
            ct.admitted(peer, f, now);
        }
        return true;
    }
    ct.is_reply(peer, f, now)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{ipv4, ipv6};

    fn tcp4(src: &str, dst: &str, sport: u16, dport: u16) -> Vec<u8> {
        segment(src, dst, sport, dport, 0x10) // ACK
    }

    fn syn4(src: &str, dst: &str, sport: u16, dport: u16) -> Vec<u8> {
        segment(src, dst, sport, dport, 0x02)
    }

    fn segment(src: &str, dst: &str, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
        let mut l4 = sport.to_be_bytes().to_vec();
        l4.extend(dport.to_be_bytes());
        l4.extend([0u8; 16]);
        l4[13] = flags;
        let mut p = ipv4(src, dst, &l4);
        p[9] = TCP;
        p
    }

    fn ping4(src: &str, dst: &str, kind: u8, id: u16) -> Vec<u8> {
        let mut l4 = vec![kind, 0, 0, 0];
        l4.extend(id.to_be_bytes());
        l4.extend([0, 1]);
        let mut p = ipv4(src, dst, &l4);
        p[9] = ICMP;
        p
    }

    fn none() -> Rules {
        Rules::new(&[])
    }

    proptest::proptest! {
        /// The compiled rules let in exactly what checking each rule would.
        #[test]
        fn compiled_rules_admit_what_the_rules_admit(
            rules in proptest::collection::vec(
                (0..4usize, proptest::collection::vec((0u16..60, 0u16..8), 0..3), proptest::bool::ANY),
                0..6,
            ),
            probes in proptest::collection::vec((0..4usize, 0u16..70, proptest::bool::ANY, proptest::bool::ANY), 1..40),
        ) {
            let protos = [Proto::Any, Proto::Tcp, Proto::Udp, Proto::Icmp];
            let rules: Vec<Allow> = rules
                .into_iter()
                .map(|(p, ports, narrow)| Allow {
                    proto: protos[p],
                    ports: ports.into_iter().map(|(a, n)| (a, a + n)).collect(),
                    dst: if narrow { vec!["10.0.0.1/32".parse().unwrap()] } else { vec![] },
                })
                .collect();
            let compiled = Rules::new(&rules);
            for (p, port, has_ports, to_one) in probes {
                let f = Flow {
                    proto: [TCP, UDP, ICMP, 47][p],
                    src: "10.0.0.9".parse().unwrap(),
                    dst: if to_one { "10.0.0.1" } else { "10.0.0.2" }.parse().unwrap(),
                    src_port: 1,
                    dst_port: port,
                    // Only TCP and UDP packets carry ports (a non-first fragment does not).
                    has_ports: has_ports && p < 2,
                    icmp_error: false,
                    syn: false,
                };
                proptest::prop_assert_eq!(compiled.admits(&f), rules.iter().any(|r| r.admits(&f)), "{:?} {:?}", f, rules);
            }
        }
    }

    #[test]
    fn flows_are_read_from_ipv4_and_ipv6_tcp_udp_and_icmp() {
        let f = flow(&tcp4("10.0.0.1", "10.0.0.2", 40000, 5432)).unwrap();
        assert_eq!(
            (f.proto, f.src_port, f.dst_port, f.has_ports),
            (TCP, 40000, 5432, true)
        );
        let mut l4 = 53u16.to_be_bytes().to_vec();
        l4.extend(5353u16.to_be_bytes());
        l4.extend([0u8; 4]);
        let f = flow(&ipv6("fd00::1", "fd00::2", &l4)).unwrap();
        assert_eq!(
            (f.proto, f.src_port, f.dst_port),
            (UDP, 53, 5353),
            "ipv6() builds UDP"
        );
        let f = flow(&ping4("10.0.0.1", "10.0.0.2", 8, 77)).unwrap();
        assert_eq!((f.proto, f.src_port, f.icmp_error), (ICMP, 77, false));
        assert!(
            flow(&ping4("10.0.0.1", "10.0.0.2", 3, 0))
                .unwrap()
                .icmp_error
        );
        let mut frag = tcp4("10.0.0.1", "10.0.0.2", 1, 2);
        frag[7] = 10; // fragment offset 80 bytes: no ports here
        assert!(!flow(&frag).unwrap().has_ports);
        assert!(flow(&[0x45, 0, 0]).is_none() && flow(&[0x10; 40]).is_none());
    }

    #[test]
    fn replies_to_flows_this_node_opened_pass_and_others_need_a_rule() {
        let now = Instant::now();
        let mut ct = Conntrack::default();
        let web_to_db = flow(&syn4("10.0.0.1", "10.0.0.2", 40000, 5432)).unwrap();
        let reply = flow(&tcp4("10.0.0.2", "10.0.0.1", 5432, 40000)).unwrap();
        assert!(
            !admits(&mut ct, 7, &none(), &reply, now),
            "nothing opened yet"
        );
        ct.outbound(7, &web_to_db, now);
        assert!(admits(&mut ct, 7, &none(), &reply, now));
        assert!(
            !admits(&mut ct, 8, &none(), &reply, now),
            "the same packet from another peer"
        );
        let db_opens = flow(&tcp4("10.0.0.2", "10.0.0.1", 5432, 22)).unwrap();
        assert!(!admits(&mut ct, 7, &none(), &db_opens, now));
        let ssh = Allow {
            proto: Proto::Tcp,
            ports: vec![(22, 22)],
            dst: vec![],
        };
        assert!(admits(
            &mut ct,
            7,
            &Rules::new(std::slice::from_ref(&ssh)),
            &db_opens,
            now
        ));
        let elsewhere = Allow {
            dst: vec!["10.0.0.9/32".parse().unwrap()],
            ..ssh
        };
        assert!(!admits(
            &mut ct,
            7,
            &Rules::new(&[elsewhere]),
            &db_opens,
            now
        ));
        // Idle past its timeout, the flow is gone.
        assert!(!admits(
            &mut ct,
            7,
            &none(),
            &reply,
            now + TCP_IDLE + Duration::from_secs(1)
        ));
        // Pings: the echo id ties the reply to the request.
        ct.outbound(7, &flow(&ping4("10.0.0.1", "10.0.0.2", 8, 5)).unwrap(), now);
        assert!(admits(
            &mut ct,
            7,
            &none(),
            &flow(&ping4("10.0.0.2", "10.0.0.1", 0, 5)).unwrap(),
            now
        ));
        assert!(!admits(
            &mut ct,
            7,
            &none(),
            &flow(&ping4("10.0.0.2", "10.0.0.1", 8, 5)).unwrap(),
            now + ICMP_IDLE * 2
        ));
    }

    #[test]
    fn answering_a_peers_flow_never_makes_it_this_nodes_own() {
        let now = Instant::now();
        let mut ct = Conntrack::default();
        let pg = Allow {
            proto: Proto::Any,
            ports: vec![(5432, 5432)],
            dst: vec![],
        };
        // TCP: the peer's SYN is let in by the rule; this node's answers are not SYNs.
        let syn = flow(&syn4("10.0.0.1", "10.0.0.2", 40000, 5432)).unwrap();
        assert!(admits(
            &mut ct,
            7,
            &Rules::new(std::slice::from_ref(&pg)),
            &syn,
            now
        ));
        ct.outbound(
            7,
            &flow(&tcp4("10.0.0.2", "10.0.0.1", 5432, 40000)).unwrap(),
            now,
        );
        let next = flow(&tcp4("10.0.0.1", "10.0.0.2", 40000, 5432)).unwrap();
        assert!(
            !admits(&mut ct, 7, &none(), &next, now),
            "without the rule, the flow stops"
        );
        // UDP: the same, by remembering the peer opened it.
        let mut udp = syn;
        udp.proto = UDP;
        assert!(admits(
            &mut ct,
            7,
            &Rules::new(std::slice::from_ref(&pg)),
            &udp,
            now
        ));
        let answer = Flow {
            src: udp.dst,
            dst: udp.src,
            src_port: udp.dst_port,
            dst_port: udp.src_port,
            ..udp
        };
        ct.outbound(7, &answer, now);
        assert!(!admits(&mut ct, 7, &none(), &udp, now));
        // A mid-stream TCP packet this node sends opens nothing either.
        let stray = flow(&tcp4("10.0.0.2", "10.0.0.3", 1000, 2000)).unwrap();
        ct.outbound(7, &stray, now);
        let back = flow(&tcp4("10.0.0.3", "10.0.0.2", 2000, 1000)).unwrap();
        assert!(!admits(&mut ct, 7, &none(), &back, now));
    }

    #[test]
    fn the_tracker_holds_a_bounded_number_of_flows() {
        let now = Instant::now();
        let mut ct = Conntrack::default();
        for i in 0..(MAX_FLOWS + 100) {
            let port = u16::try_from(i % 65_000).unwrap();
            let host = format!("10.1.{}.{}", i / 65_000, 1);
            ct.outbound(1, &flow(&syn4("10.0.0.1", &host, port, 80)).unwrap(), now);
        }
        assert_eq!(ct.len(), MAX_FLOWS);
        // Once they are idle, a sweep makes room.
        let later = now + TCP_IDLE * 2;
        ct.outbound(
            1,
            &flow(&syn4("10.0.0.1", "10.9.9.9", 1, 80)).unwrap(),
            later,
        );
        assert_eq!(ct.len(), 1);
    }
}
