//! When to ask the controller for a hole punch, and why a peer is still relayed. Pure: the
//! agent feeds it what it sees every second.
//!
//! A peer reached through the relay is punched when either side has an outside address (a
//! NAT's mapping). A try that fails leaves conntrack entries in the NATs that a second try
//! would hit (Linux keeps an unanswered UDP entry 30 s, and a probe refreshes it), so the next
//! try waits [`FIRST_GAP`], then twice as long each time up to [`MAX_GAP`]. New outside
//! addresses on either side (a NAT relaxed, a roam) start over at once.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// The wait after a first failed try: longer than a Linux NAT keeps an unanswered UDP entry.
pub const FIRST_GAP: Duration = Duration::from_secs(40);
pub const MAX_GAP: Duration = Duration::from_secs(320);

/// One peer as the planner sees it.
pub struct PeerPath<'a> {
    pub key: [u8; 32],
    pub peer_id: &'a str,
    /// Reached through the relay now.
    pub relayed: bool,
    /// Its outside addresses, from the map.
    pub outside: &'a [String],
}

#[derive(Debug, Default)]
pub struct Planner {
    peers: HashMap<[u8; 32], Plan>,
    /// This node's outside addresses, as last given.
    mine: Vec<String>,
}

#[derive(Debug)]
struct Plan {
    /// Both sides' outside addresses when the plan was made.
    outside: Vec<String>,
    next: Instant,
    gap: Duration,
    tries: u32,
    last: Option<Instant>,
}

impl Planner {
    /// The peer ids to ask a punch for now. `mine`: this node's outside addresses.
    pub fn due(&mut self, now: Instant, mine: &[String], peers: &[PeerPath<'_>]) -> Vec<String> {
        self.mine = mine.to_vec();
        let relayed: HashMap<[u8; 32], &PeerPath<'_>> = peers
            .iter()
            .filter(|p| p.relayed)
            .map(|p| (p.key, p))
            .collect();
        self.peers.retain(|k, _| relayed.contains_key(k));
        let mut out = Vec::new();
        for (key, p) in relayed {
            if mine.is_empty() && p.outside.is_empty() {
                self.peers.remove(&key);
                continue;
            }
            let both: Vec<String> = mine.iter().chain(p.outside).cloned().collect();
            let plan = self.peers.entry(key).or_insert_with(|| Plan {
                outside: both.clone(),
                next: now,
                gap: FIRST_GAP,
                tries: 0,
                last: None,
            });
            if plan.outside != both {
                *plan = Plan {
                    outside: both,
                    next: now,
                    gap: FIRST_GAP,
                    tries: 0,
                    last: None,
                };
            }
            if now >= plan.next {
                out.push(p.peer_id.to_string());
                plan.tries += 1;
                plan.last = Some(now);
                plan.next = now + plan.gap;
                plan.gap = (plan.gap * 2).min(MAX_GAP);
            }
        }
        out.sort();
        out
    }

    /// Why peer `key` is relayed, for `status` ("" if it is not known to be).
    pub fn why(&self, key: &[u8; 32], outside: &[String], now: Instant) -> String {
        let Some(plan) = self.peers.get(key) else {
            return if self.mine.is_empty() && outside.is_empty() {
                "no outside address on either side to punch to (no STUN answer yet?)".into()
            } else {
                String::new()
            };
        };
        let ago = plan
            .last
            .map_or(0, |t| now.saturating_duration_since(t).as_secs());
        let next = plan.next.saturating_duration_since(now).as_secs();
        let to = if outside.is_empty() {
            "its NAT did not answer the probes of ours".to_string()
        } else {
            let addrs: Vec<SocketAddr> = outside.iter().filter_map(|a| a.parse().ok()).collect();
            format!("no answer from {addrs:?}")
        };
        format!(
            "punched {} time(s), last {ago} s ago: {to}; next try in {next} s",
            plan.tries
        )
    }
}

/// This node's outside addresses: where a STUN server saw its socket (`seen`), unless that is
/// one of its own addresses (no NAT), and the same address with the node's own port (a NAT
/// that keeps ports uses it towards a peer once the STUN mapping took another).
pub fn outside_of(local: &[String], seen: Option<SocketAddr>, port: u16) -> Vec<String> {
    let Some(seen) = seen.filter(|s| !local.contains(&s.to_string())) else {
        return Vec::new();
    };
    let mut out = vec![seen.to_string()];
    if seen.port() != port {
        out.push(SocketAddr::new(seen.ip(), port).to_string());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer<'a>(key: u8, relayed: bool, outside: &'a [String]) -> PeerPath<'a> {
        PeerPath {
            key: [key; 32],
            peer_id: ["peer_a", "peer_b", "peer_c"][usize::from(key)],
            relayed,
            outside,
        }
    }

    #[test]
    fn a_relayed_peer_is_punched_at_once_then_after_the_nat_forgot_the_last_try() {
        let mut p = Planner::default();
        let t = Instant::now();
        let theirs = vec!["198.51.100.2:4000".to_string()];
        let peers = [peer(0, true, &theirs), peer(1, false, &theirs)];
        assert_eq!(p.due(t, &[], &peers), ["peer_a"], "only the relayed one");
        assert!(p.due(t + Duration::from_secs(30), &[], &peers).is_empty());
        assert_eq!(p.due(t + FIRST_GAP, &[], &peers), ["peer_a"]);
        assert!(p.due(t + FIRST_GAP * 2, &[], &peers).is_empty(), "doubled");
        assert_eq!(p.due(t + FIRST_GAP * 3, &[], &peers), ["peer_a"]);
        let why = p.why(&[0; 32], &theirs, t + FIRST_GAP * 3);
        assert!(why.starts_with("punched 3 time(s), last 0 s ago"), "{why}");
    }

    #[test]
    fn new_outside_addresses_start_over_and_nothing_is_asked_without_any() {
        let mut p = Planner::default();
        let t = Instant::now();
        let none: Vec<String> = Vec::new();
        assert!(p.due(t, &[], &[peer(0, true, &none)]).is_empty());
        assert!(p.why(&[0; 32], &none, t).starts_with("no outside address"));
        let mine = vec!["203.0.113.1:51820".to_string()];
        assert_eq!(p.due(t, &mine, &[peer(0, true, &none)]), ["peer_a"]);
        let relaxed = vec!["203.0.113.1:40000".to_string()];
        let later = t + Duration::from_secs(1);
        assert_eq!(p.due(later, &relaxed, &[peer(0, true, &none)]), ["peer_a"]);
        // Direct now: forgotten; relayed again later: asked at once.
        assert!(p.due(later, &relaxed, &[peer(0, false, &none)]).is_empty());
        assert_eq!(p.due(later, &relaxed, &[peer(0, true, &none)]), ["peer_a"]);
    }

    #[test]
    fn the_outside_addresses_are_the_stun_answer_and_the_own_port_behind_a_nat_only() {
        let local = vec!["10.91.0.2:51820".to_string()];
        let seen = "198.51.100.2:40000".parse().ok();
        assert_eq!(
            outside_of(&local, seen, 51820),
            ["198.51.100.2:40000", "198.51.100.2:51820"]
        );
        let kept = "198.51.100.2:51820".parse().ok();
        assert_eq!(outside_of(&local, kept, 51820), ["198.51.100.2:51820"]);
        let public = vec!["198.51.100.2:51820".to_string()];
        assert!(outside_of(&public, kept, 51820).is_empty(), "no NAT");
        assert!(outside_of(&local, None, 51820).is_empty());
    }
}
