//! Allowed-IPs routing: longest-prefix match from an address to a peer, IPv4 and IPv6.
//!
//! One hash map per family keyed by (prefix length, masked address), and the list of prefix
//! lengths in use, probed from the longest down: a lookup costs one probe per distinct prefix
//! length (usually two or three: /32 hosts plus a few networks), however many peers there are.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::net::IpAddr;

use ipnetwork::IpNetwork;

/// A multiply-shift hasher: keys are already-masked addresses, no DoS concern (we choose them).
#[derive(Default)]
pub struct AddrHasher(u64);

impl Hasher for AddrHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u128(&mut self, v: u128) {
        self.0 = ((v as u64) ^ ((v >> 64) as u64).rotate_left(29) ^ self.0)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
    fn write_u8(&mut self, v: u8) {
        self.0 = (self.0 ^ u64::from(v)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type Map<T> = HashMap<(u8, u128), T, BuildHasherDefault<AddrHasher>>;

#[derive(Debug)]
struct Table<T> {
    /// Prefix lengths in use, longest first, with how many entries each has.
    lens: Vec<(u8, usize)>,
    map: Map<T>,
    bits: u8,
}

impl<T> Default for Table<T> {
    fn default() -> Self {
        Self {
            lens: Vec::new(),
            map: Map::default(),
            bits: 0,
        }
    }
}

fn mask(addr: u128, len: u8, bits: u8) -> u128 {
    if len == 0 {
        0
    } else {
        let shift = u32::from(bits - len);
        (addr >> shift) << shift
    }
}

impl<T: Clone + PartialEq> Table<T> {
    fn insert(&mut self, addr: u128, len: u8, v: T) -> Option<T> {
        let key = (len, mask(addr, len, self.bits));
        let old = self.map.insert(key, v);
        if old.is_none() {
            match self.lens.iter_mut().find(|(l, _)| *l == len) {
                Some((_, n)) => *n += 1,
                None => {
                    self.lens.push((len, 1));
                    self.lens.sort_by_key(|(len, _)| std::cmp::Reverse(*len));
                }
            }
        }
        old
    }

    fn remove(&mut self, addr: u128, len: u8) -> Option<T> {
        let old = self.map.remove(&(len, mask(addr, len, self.bits)))?;
        if let Some(i) = self.lens.iter().position(|(l, _)| *l == len) {
            self.lens[i].1 -= 1;
            if self.lens[i].1 == 0 {
                self.lens.remove(i);
            }
        }
        Some(old)
    }

    fn lookup(&self, addr: u128) -> Option<&T> {
        self.lens
            .iter()
            .find_map(|&(len, _)| self.map.get(&(len, mask(addr, len, self.bits))))
    }
}

/// Maps IP prefixes to values (peer indices); the longest matching prefix wins.
#[derive(Debug)]
pub struct AllowedIps<T> {
    v4: Table<T>,
    v6: Table<T>,
}

impl<T: Clone + PartialEq> Default for AllowedIps<T> {
    fn default() -> Self {
        Self {
            v4: Table {
                bits: 32,
                ..Table::default()
            },
            v6: Table {
                bits: 128,
                ..Table::default()
            },
        }
    }
}

fn split(net: &IpNetwork) -> (bool, u128, u8) {
    match net.network() {
        IpAddr::V4(a) => (true, u128::from(u32::from(a)), net.prefix()),
        IpAddr::V6(a) => (false, u128::from(a), net.prefix()),
    }
}

impl<T: Clone + PartialEq> AllowedIps<T> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Routes `net` to `v`; returns the value it routed to before, if any.
    pub fn insert(&mut self, net: &IpNetwork, v: T) -> Option<T> {
        let (v4, addr, len) = split(net);
        if v4 {
            self.v4.insert(addr, len, v)
        } else {
            self.v6.insert(addr, len, v)
        }
    }

    pub fn remove(&mut self, net: &IpNetwork) -> Option<T> {
        let (v4, addr, len) = split(net);
        if v4 {
            self.v4.remove(addr, len)
        } else {
            self.v6.remove(addr, len)
        }
    }

    /// Removes every prefix that routes to `v`.
    /// Removes `net` if it routes to `v` (and leaves another value's route alone): one
    /// probe, not a scan of every route.
    pub fn remove_if(&mut self, net: &IpNetwork, v: &T) -> bool {
        let (v4, addr, len) = split(net);
        let t = if v4 { &mut self.v4 } else { &mut self.v6 };
        if t.map.get(&(len, mask(addr, len, t.bits))) != Some(v) {
            return false;
        }
        t.remove(addr, len).is_some()
    }

    pub fn lookup(&self, ip: IpAddr) -> Option<&T> {
        match ip {
            IpAddr::V4(a) => self.v4.lookup(u128::from(u32::from(a))),
            IpAddr::V6(a) => self.v6.lookup(u128::from(a)),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.v4.map.is_empty() && self.v6.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn net(s: &str) -> IpNetwork {
        s.parse().unwrap()
    }

    #[test]
    fn longest_prefix_wins_in_both_families() {
        let mut t = AllowedIps::new();
        t.insert(&net("10.0.0.0/8"), 1);
        t.insert(&net("10.1.0.0/16"), 2);
        t.insert(&net("10.1.2.3/32"), 3);
        t.insert(&net("fd00::/8"), 4);
        t.insert(&net("fd00:1::/32"), 5);
        t.insert(&net("0.0.0.0/0"), 9);
        fn at(t: &AllowedIps<i32>, s: &str) -> Option<i32> {
            t.lookup(s.parse().unwrap()).copied()
        }
        assert_eq!(at(&t, "10.1.2.3"), Some(3));
        assert_eq!(at(&t, "10.1.2.4"), Some(2));
        assert_eq!(at(&t, "10.2.0.1"), Some(1));
        assert_eq!(at(&t, "192.0.2.1"), Some(9));
        assert_eq!(at(&t, "fd00:1::5"), Some(5));
        assert_eq!(at(&t, "fd00:2::5"), Some(4));
        assert_eq!(at(&t, "2001:db8::1"), None);
        assert!(
            !t.remove_if(&net("10.1.0.0/16"), &9),
            "another value's route stays"
        );
        assert!(t.remove_if(&net("10.1.0.0/16"), &2));
        assert_eq!(at(&t, "10.1.2.4"), Some(1));
        assert_eq!(t.remove(&net("10.1.2.3/32")), Some(3));
        assert_eq!(at(&t, "10.1.2.3"), Some(1));
    }

    #[test]
    fn inserting_a_prefix_again_moves_it() {
        let mut t = AllowedIps::new();
        assert_eq!(t.insert(&net("10.0.0.1/32"), 1), None);
        assert_eq!(t.insert(&net("10.0.0.1/32"), 2), Some(1));
        assert_eq!(t.lookup("10.0.0.1".parse().unwrap()), Some(&2));
    }

    fn arb_v4_net() -> impl Strategy<Value = IpNetwork> {
        (any::<u32>(), 0u8..=32).prop_map(|(a, l)| {
            let n = ipnetwork::Ipv4Network::new(a.into(), l).unwrap();
            IpNetwork::V4(ipnetwork::Ipv4Network::new(n.network(), l).unwrap())
        })
    }

    proptest! {
        /// Lookup agrees with a naive scan for the longest containing prefix.
        #[test]
        fn lookup_matches_a_naive_longest_prefix_scan(
            nets in proptest::collection::vec(arb_v4_net(), 0..40),
            probes in proptest::collection::vec(any::<u32>(), 1..50),
        ) {
            let mut t = AllowedIps::new();
            let mut model: Vec<(IpNetwork, usize)> = Vec::new();
            for (i, n) in nets.iter().enumerate() {
                t.insert(n, i);
                model.retain(|(m, _)| m != n);
                model.push((*n, i));
            }
            for p in probes {
                let ip = IpAddr::V4(p.into());
                let naive = model.iter().filter(|(n, _)| n.contains(ip)).max_by_key(|(n, _)| n.prefix()).map(|(_, v)| *v);
                prop_assert_eq!(t.lookup(ip).copied(), naive);
            }
        }
    }
}
