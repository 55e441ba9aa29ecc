//! Addresses, link state and routes through rtnetlink, as `ip` does it, without spawning `ip`
//! or parsing its text: one request per call on a short-lived `NETLINK_ROUTE` socket,
//! answered by an ACK (or an errno, returned as an `io::Error`) or by a dump.

use std::io;
use std::net::IpAddr;

use ipnetwork::IpNetwork;
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkMessage,
    NetlinkPayload,
};
use netlink_packet_route::address::{
    AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage, AddressScope,
};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkLayerType, LinkMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleFlags, RuleMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// Room for one read of a dump: the kernel fills up to a page per message batch.
const RECV_BUF: usize = 64 * 1024;
/// Messages read from one dump before giving up (a host with this many links or addresses is
/// not one we report endpoints from anyway).
const MAX_DUMP: usize = 100_000;

/// A network interface as the kernel lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// No link layer (`ARPHRD_NONE`): TUN devices, WireGuard, other overlays.
    pub tunnel: bool,
}

/// Sends one request; collects what the kernel answers until its ACK or the end of the dump.
fn request(msg: RouteNetlinkMessage, flags: u16) -> io::Result<Vec<RouteNetlinkMessage>> {
    let mut sock = Socket::new(NETLINK_ROUTE)?;
    sock.bind_auto()?;
    sock.connect(&SocketAddr::new(0, 0))?;
    let mut req = NetlinkMessage::from(msg);
    req.header.flags = NLM_F_REQUEST | flags;
    req.header.sequence_number = 1;
    req.finalize();
    let mut buf = vec![0; req.buffer_len()];
    req.serialize(&mut buf);
    sock.send(&buf, 0)?;

    let mut answers = Vec::new();
    let mut rbuf = vec![0u8; RECV_BUF];
    loop {
        let n = sock.recv(&mut &mut rbuf[..], 0)?;
        let mut at = 0;
        while at < n {
            let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&rbuf[at..n])
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            let len = msg.header.length as usize;
            match msg.payload {
                NetlinkPayload::Done(_) => return Ok(answers),
                NetlinkPayload::Error(e) => {
                    return match e.code {
                        Some(code) => Err(io::Error::from_raw_os_error(-code.get())),
                        None => Ok(answers),
                    };
                }
                NetlinkPayload::InnerMessage(m) if answers.len() < MAX_DUMP => answers.push(m),
                _ => {}
            }
            if len == 0 {
                break;
            }
            at += len;
        }
    }
}

/// Every interface: index, name, whether it is a tunnel.
pub fn links() -> io::Result<Vec<Link>> {
    let answers = request(
        RouteNetlinkMessage::GetLink(LinkMessage::default()),
        NLM_F_DUMP,
    )?;
    Ok(answers
        .into_iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewLink(l) => Some(l),
            _ => None,
        })
        .map(|l| Link {
            index: l.header.index,
            name: l
                .attributes
                .iter()
                .find_map(|a| match a {
                    LinkAttribute::IfName(n) => Some(n.clone()),
                    _ => None,
                })
                .unwrap_or_default(),
            tunnel: l.header.link_layer_type == LinkLayerType::None,
        })
        .collect())
}

/// The index of interface `name`.
pub fn link_index(name: &str) -> io::Result<u32> {
    links()?
        .into_iter()
        .find(|l| l.name == name)
        .map(|l| l.index)
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no interface {name}")))
}

/// Global-scope addresses, with the index of the interface each is on.
pub fn global_addresses() -> io::Result<Vec<(u32, IpAddr)>> {
    let answers = request(
        RouteNetlinkMessage::GetAddress(AddressMessage::default()),
        NLM_F_DUMP,
    )?;
    Ok(answers
        .into_iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewAddress(a) if a.header.scope == AddressScope::Universe => {
                let ip = a.attributes.iter().find_map(|at| match at {
                    AddressAttribute::Local(ip) => Some(*ip),
                    _ => None,
                });
                // IPv6 addresses carry IFA_ADDRESS only.
                let ip = ip.or_else(|| {
                    a.attributes.iter().find_map(|at| match at {
                        AddressAttribute::Address(ip) => Some(*ip),
                        _ => None,
                    })
                });
                ip.map(|ip| (a.header.index, ip))
            }
            _ => None,
        })
        .collect())
}

/// Adds `addr` (with its subnet's prefix) to interface `index`; IPv6 without duplicate address
/// detection (`nodad`), so it is usable at once.
pub fn add_address(index: u32, addr: IpNetwork) -> io::Result<()> {
    let mut m = AddressMessage::default();
    m.header.index = index;
    m.header.prefix_len = addr.prefix();
    m.header.family = family(addr.ip());
    // As `ip addr add` sends it: no peer, so local and address are the same; no broadcast.
    m.attributes.push(AddressAttribute::Local(addr.ip()));
    m.attributes.push(AddressAttribute::Address(addr.ip()));
    if addr.is_ipv6() {
        m.header.flags = AddressHeaderFlags::Nodad;
        m.attributes
            .push(AddressAttribute::Flags(AddressFlags::Nodad));
    }
    request(
        RouteNetlinkMessage::NewAddress(m),
        NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
    )
    .map(drop)
}

/// Sets interface `index` up.
pub fn set_up(index: u32) -> io::Result<()> {
    let mut m = LinkMessage::default();
    m.header.index = index;
    m.header.flags = LinkFlags::Up;
    m.header.change_mask = LinkFlags::Up;
    request(RouteNetlinkMessage::SetLink(m), NLM_F_ACK).map(drop)
}

/// The metric of the routes the agent installs: any route of the same prefix the host already
/// has (its LAN's, usually metric 0 for IPv4 and 256 for IPv6) wins over the overlay's, and a
/// more specific one wins anyway, so a site prefix never hides the host's own network (a
/// standby gateway keeps reaching its site directly). Replace and delete match on it, so
/// they never touch a route the agent did not make.
pub const ROUTE_METRIC: u32 = 4096;

fn route(index: u32, dest: IpNetwork) -> RouteMessage {
    route_in(index, dest, u32::from(RouteHeader::RT_TABLE_MAIN))
}

/// A route through interface `index` to `dest` in routing table `table`.
fn route_in(index: u32, dest: IpNetwork, table: u32) -> RouteMessage {
    let mut m = RouteMessage::default();
    m.header.address_family = family(dest.ip());
    m.header.destination_prefix_length = dest.prefix();
    match u8::try_from(table) {
        Ok(t) => m.header.table = t,
        Err(_) => {
            m.header.table = RouteHeader::RT_TABLE_UNSPEC;
            m.attributes.push(RouteAttribute::Table(table));
        }
    }
    m.header.protocol = RouteProtocol::Boot;
    m.header.scope = RouteScope::Link;
    m.header.kind = RouteType::Unicast;
    m.attributes
        .push(RouteAttribute::Destination(RouteAddress::from(
            dest.network(),
        )));
    m.attributes.push(RouteAttribute::Oif(index));
    m.attributes.push(RouteAttribute::Priority(ROUTE_METRIC));
    m
}

/// `ip route replace DEST dev INDEX metric ROUTE_METRIC`.
pub fn replace_route(index: u32, dest: IpNetwork) -> io::Result<()> {
    request(
        RouteNetlinkMessage::NewRoute(route(index, dest)),
        NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
    )
    .map(drop)
}

/// `ip route replace DEST dev INDEX table TABLE metric ROUTE_METRIC`.
pub fn replace_route_in(index: u32, dest: IpNetwork, table: u32) -> io::Result<()> {
    request(
        RouteNetlinkMessage::NewRoute(route_in(index, dest, table)),
        NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
    )
    .map(drop)
}

/// `ip route del DEST dev INDEX table TABLE metric ROUTE_METRIC`.
pub fn delete_route_in(index: u32, dest: IpNetwork, table: u32) -> io::Result<()> {
    request(
        RouteNetlinkMessage::DelRoute(route_in(index, dest, table)),
        NLM_F_ACK,
    )
    .map(drop)
}

/// A policy routing rule, as `ip rule` writes them: at `priority`, packets of one family
/// (to `dst` if given; not carrying `not_fwmark` if given) look up `table`, where a route of
/// prefix length `suppress_prefixlen` or shorter does not count.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub v6: bool,
    pub priority: u32,
    pub table: u32,
    pub dst: Option<IpNetwork>,
    pub not_fwmark: Option<u32>,
    pub suppress_prefixlen: Option<u32>,
}

fn rule_message(r: &Rule) -> RuleMessage {
    let mut m = RuleMessage::default();
    m.header.family = if r.v6 {
        AddressFamily::Inet6
    } else {
        AddressFamily::Inet
    };
    m.header.action = RuleAction::ToTable;
    m.header.table = RouteHeader::RT_TABLE_UNSPEC;
    m.attributes.push(RuleAttribute::Priority(r.priority));
    m.attributes.push(RuleAttribute::Table(r.table));
    if let Some(dst) = r.dst {
        m.header.dst_len = dst.prefix();
        m.attributes.push(RuleAttribute::Destination(dst.network()));
    }
    if let Some(mark) = r.not_fwmark {
        m.header.flags = RuleFlags::Invert;
        m.attributes.push(RuleAttribute::FwMark(mark));
        m.attributes.push(RuleAttribute::FwMask(u32::MAX));
    }
    if let Some(len) = r.suppress_prefixlen {
        m.attributes.push(RuleAttribute::SuppressPrefixLen(len));
    }
    m
}

/// `ip rule add …`; one that is there already is what we wanted.
pub fn add_rule(r: &Rule) -> io::Result<()> {
    match request(
        RouteNetlinkMessage::NewRule(rule_message(r)),
        NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
    ) {
        Err(e) if e.raw_os_error() == Some(nix::errno::Errno::EEXIST as i32) => Ok(()),
        other => other.map(drop),
    }
}

/// `ip rule del …`.
pub fn delete_rule(r: &Rule) -> io::Result<()> {
    request(RouteNetlinkMessage::DelRule(rule_message(r)), NLM_F_ACK).map(drop)
}

/// `ip route del DEST dev INDEX metric ROUTE_METRIC`.
pub fn delete_route(index: u32, dest: IpNetwork) -> io::Result<()> {
    request(RouteNetlinkMessage::DelRoute(route(index, dest)), NLM_F_ACK).map(drop)
}

fn family(ip: IpAddr) -> AddressFamily {
    match ip {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    }
}
