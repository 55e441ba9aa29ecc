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
/// every port) at one of `dst` (none: any destination — the agent fills in this node's own
/// addresses, so a rule never covers a site the node forwards to).
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
mod tests;
