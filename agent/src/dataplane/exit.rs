//! The client of an exit node: its internet traffic goes through the tunnel, the way wg-quick
//! does it for `AllowedIPs = 0.0.0.0/0`, with policy routing rather than by replacing the
//! default route:
//!
//! ```text
//! 5200: to <controller address> lookup main          the control connection stays direct
//! 5210: lookup main suppress_prefixlength 0           the host's own networks stay direct
//! 5220: not fwmark 51820 lookup 51820                 the rest goes to table 51820:
//!       table 51820: default dev <tunnel>             into the tunnel
//! ```
//!
//! The tunnel's own UDP socket carries fwmark 51820, so WireGuard's packets to its peers'
//! endpoints skip rule 5220 and leave by the host's default route. One exit node per host.

use std::io;
use std::net::IpAddr;

use ipnetwork::IpNetwork;

use super::netlink::{self, Rule};

/// The routing table of the tunnel's default routes, and the fwmark on its socket.
pub const EXIT_TABLE: u32 = 51820;
const PRIO_DIRECT: u32 = 5200;
const PRIO_MAIN: u32 = 5210;
const PRIO_TUNNEL: u32 = 5220;
const SRC_VALID_MARK: &str = "/proc/sys/net/ipv4/conf/all/src_valid_mark";

/// Which families go through an exit node, and the addresses that stay direct.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExitSpec {
    pub v4: bool,
    pub v6: bool,
    pub direct: Vec<IpAddr>,
}

/// The rules `spec` needs (none when it uses no exit node).
pub fn rules(spec: &ExitSpec) -> Vec<Rule> {
    let mut out = Vec::new();
    for v6 in [false, true] {
        if !(if v6 { spec.v6 } else { spec.v4 }) {
            continue;
        }
        let rule = |priority, table| Rule {
            v6,
            priority,
            table,
            dst: None,
            not_fwmark: None,
            suppress_prefixlen: None,
        };
        for ip in spec.direct.iter().filter(|ip| ip.is_ipv6() == v6) {
            let dst = IpNetwork::new(*ip, if v6 { 128 } else { 32 }).ok();
            out.push(Rule {
                dst,
                ..rule(PRIO_DIRECT, MAIN_TABLE)
            });
        }
        out.push(Rule {
            suppress_prefixlen: Some(0),
            ..rule(PRIO_MAIN, MAIN_TABLE)
        });
        out.push(Rule {
            not_fwmark: Some(EXIT_TABLE),
            ..rule(PRIO_TUNNEL, EXIT_TABLE)
        });
    }
    out
}

const MAIN_TABLE: u32 = 254;

fn default_route(v6: bool) -> IpNetwork {
    if v6 {
        "::/0".parse().unwrap_or_else(|_| unreachable!())
    } else {
        "0.0.0.0/0".parse().unwrap_or_else(|_| unreachable!())
    }
}

/// What this node set up to use an exit node, so it can be undone.
#[derive(Debug, Default)]
pub(super) struct Exit {
    spec: ExitSpec,
    index: u32,
    /// `src_valid_mark` as it was, if this node changed it.
    src_valid_mark: Option<String>,
}

impl Exit {
    /// Sends the families of `spec` through interface `index` (none: stop).
    pub(super) fn set(&mut self, index: u32, spec: ExitSpec) -> io::Result<()> {
        if self.spec == spec && self.index == index {
            return Ok(());
        }
        self.undo();
        if !spec.v4 && !spec.v6 {
            return Ok(());
        }
        // As wg-quick: replies to marked packets pass reverse-path filtering.
        if spec.v4 {
            let old = std::fs::read_to_string(SRC_VALID_MARK)?.trim().to_string();
            if old != "1" {
                std::fs::write(SRC_VALID_MARK, "1")?;
                self.src_valid_mark = Some(old);
            }
        }
        (self.spec, self.index) = (spec, index);
        for v6 in [false, true].into_iter().filter(|v6| self.family(*v6)) {
            netlink::replace_route_in(index, default_route(v6), EXIT_TABLE)?;
        }
        for r in rules(&self.spec) {
            // A rule left by a crashed run is taken as it is.
            netlink::add_rule(&r)?;
        }
        tracing::info!(
            v4 = self.spec.v4,
            v6 = self.spec.v6,
            "internet traffic goes through the exit node"
        );
        Ok(())
    }

    fn family(&self, v6: bool) -> bool {
        if v6 { self.spec.v6 } else { self.spec.v4 }
    }

    /// Removes the rules and routes, puts `src_valid_mark` back.
    pub(super) fn undo(&mut self) {
        for r in rules(&self.spec) {
            let _ = netlink::delete_rule(&r);
        }
        for v6 in [false, true].into_iter().filter(|v6| self.family(*v6)) {
            let _ = netlink::delete_route_in(self.index, default_route(v6), EXIT_TABLE);
        }
        if let Some(old) = self.src_valid_mark.take() {
            let _ = std::fs::write(SRC_VALID_MARK, old);
        }
        self.spec = ExitSpec::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_controller_stays_direct_the_hosts_networks_next_then_the_tunnel() {
        let spec = ExitSpec {
            v4: true,
            v6: false,
            direct: vec![
                "192.0.2.254".parse().unwrap(),
                "2001:db8::1".parse().unwrap(),
            ],
        };
        let r = rules(&spec);
        assert_eq!(r.len(), 3, "IPv4 only: {r:?}");
        assert_eq!(
            (r[0].priority, r[0].table, r[0].dst),
            (
                PRIO_DIRECT,
                MAIN_TABLE,
                Some("192.0.2.254/32".parse().unwrap())
            )
        );
        assert_eq!(
            (r[1].priority, r[1].suppress_prefixlen),
            (PRIO_MAIN, Some(0))
        );
        assert_eq!(
            (r[2].priority, r[2].table, r[2].not_fwmark),
            (PRIO_TUNNEL, EXIT_TABLE, Some(EXIT_TABLE))
        );
        assert!(rules(&ExitSpec::default()).is_empty());
        let both = rules(&ExitSpec { v6: true, ..spec });
        assert_eq!(both.iter().filter(|r| r.v6).count(), 3);
    }
}
