//! Address allocation within a network's CIDR. Pure: picks candidates; the store's
//! create-if-absent transaction on `/canopy/v1/ipam/<network>/<address>` makes the claim race-free.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnetwork::IpNetwork;

/// How many host addresses the network can hand out (IPv4 skips network and broadcast;
/// IPv6 skips the subnet-router anycast address `::0`).
pub fn capacity(net: &IpNetwork) -> u128 {
    let bits = if net.is_ipv4() { 32 } else { 128 } - u32::from(net.prefix());
    let size = if bits >= 128 {
        u128::MAX
    } else {
        1u128 << bits
    };
    if net.is_ipv4() {
        size.saturating_sub(2)
    } else {
        size.saturating_sub(1)
    }
}

/// The `n`-th assignable host (0-based), or `None` past the end of the range.
pub fn nth_host(net: &IpNetwork, n: u128) -> Option<IpAddr> {
    if n >= capacity(net) {
        return None;
    }
    let offset = n + 1;
    Some(match net.network() {
        IpAddr::V4(base) => IpAddr::V4(Ipv4Addr::from(u32::from(base) + offset as u32)),
        IpAddr::V6(base) => IpAddr::V6(Ipv6Addr::from(u128::from(base) + offset)),
    })
}

/// Up to `want` free addresses in ascending order, skipping `used`.
pub fn free_hosts(net: &IpNetwork, used: &HashSet<IpAddr>, want: usize) -> Vec<IpAddr> {
    let mut out = Vec::with_capacity(want);
    let mut n = 0u128;
    while out.len() < want {
        match nth_host(net, n) {
            Some(ip) if !used.contains(&ip) => out.push(ip),
            Some(_) => {}
            None => break,
        }
        n += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn net(s: &str) -> IpNetwork {
        s.parse().unwrap()
    }

    #[test]
    fn ipv4_skips_network_and_broadcast() {
        let n = net("100.64.0.0/30");
        assert_eq!(capacity(&n), 2);
        assert_eq!(nth_host(&n, 0), Some("100.64.0.1".parse().unwrap()));
        assert_eq!(nth_host(&n, 1), Some("100.64.0.2".parse().unwrap()));
        assert_eq!(nth_host(&n, 2), None);
    }

    #[test]
    fn ipv6_starts_after_the_anycast_address() {
        let n = net("fd7a:1::/64");
        assert_eq!(nth_host(&n, 0), Some("fd7a:1::1".parse().unwrap()));
        assert_eq!(capacity(&net("fd7a::/126")), 3);
    }

    #[test]
    fn a_full_range_has_no_free_host() {
        let n = net("10.0.0.0/30");
        let used: HashSet<_> = (0..2).filter_map(|i| nth_host(&n, i)).collect();
        assert!(free_hosts(&n, &used, 1).is_empty());
    }

    proptest! {
        /// Handing out addresses one by one never repeats one and never leaves the CIDR.
        #[test]
        fn allocation_never_repeats_and_stays_in_range(prefix in 24u8..=30, taken in proptest::collection::vec(0u128..64, 0..20)) {
            let n = IpNetwork::new("10.9.0.0".parse().unwrap(), prefix).unwrap();
            let mut used: HashSet<IpAddr> = taken.iter().filter_map(|&i| nth_host(&n, i)).collect();
            let start = used.len();
            while let Some(&ip) = free_hosts(&n, &used, 1).first() {
                prop_assert!(n.contains(ip));
                prop_assert!(ip != n.network() && ip != n.broadcast());
                prop_assert!(used.insert(ip), "address handed out twice");
            }
            prop_assert_eq!(used.len() as u128, capacity(&n));
            prop_assert!(used.len() >= start);
        }
    }
}
