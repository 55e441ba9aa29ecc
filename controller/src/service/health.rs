//! What agents say of their data plane (pure): path reports checked and merged (a session's
//! first is full, later ones deltas), handshake times moved into the controller's clock, and
//! the verdict `peer list` flags: online, with peers to reach, and no handshake with any.

use std::collections::BTreeMap;

use canopy_proto::v1::{PairPath, Paths};

use crate::error::{Error, Result};

/// Pairs one report (and one merged set) may hold: a network's size limit.
pub const MAX_PAIRS: usize = 4096;
/// No handshake with any peer for this long (WireGuard's REJECT_AFTER_TIME: every session is
/// dead by then, and agents keep theirs alive with keepalives) is a broken data plane.
pub const QUIET_SECS: i64 = 180;

/// A peer's data plane in short, from its merged path reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Health {
    /// The newest handshake with any peer (controller clock; 0: none).
    pub newest_handshake_unix: i64,
    pub pairs: u32,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub direct: u32,
    pub relayed: u32,
}

/// Checks a report's bounds: counts, string lengths, known paths.
pub fn check(report: &Paths) -> Result<()> {
    let bad = |what: &str| Error::InvalidArgument(format!("path report: {what}"));
    if report.pairs.len() > MAX_PAIRS || report.removed.len() > MAX_PAIRS {
        return Err(bad("too many peers"));
    }
    for p in &report.pairs {
        if p.peer_id.len() > 64 || p.via.len() > 64 || p.why.len() > 512 {
            return Err(bad("a field is too long"));
        }
        if !matches!(p.path.as_str(), "direct" | "relayed" | "none") {
            return Err(bad("path must be direct, relayed or none"));
        }
    }
    if report.removed.iter().any(|id| id.len() > 64) {
        return Err(bad("a field is too long"));
    }
    Ok(())
}

/// Applies a checked `report`, received at `now` (controller clock), to `held`: a full one
/// replaces it, a delta upserts and removes. Handshake times move into the controller's clock
/// (the report says what the agent's clock read); a report from an agent that sends only ages
/// (`last_handshake_secs`) is taken as of now.
pub fn merge(held: &mut BTreeMap<String, PairPath>, report: Paths, now: i64) -> Result<()> {
    if report.full {
        held.clear();
    }
    for id in &report.removed {
        held.remove(id);
    }
    let skew = if report.at_unix > 0 {
        now - report.at_unix
    } else {
        0
    };
    for mut p in report.pairs {
        p.last_handshake_unix = match (p.last_handshake_unix, p.last_handshake_secs) {
            (0, s) if s >= 0 && report.at_unix == 0 => now - s,
            (0, _) => 0,
            (t, _) => (t + skew).min(now),
        };
        held.insert(p.peer_id.clone(), p);
    }
    if held.len() > MAX_PAIRS {
        return Err(Error::InvalidArgument("path report: too many peers".into()));
    }
    Ok(())
}

/// The pairs as recorded and shown at `now`: ages from the handshake times.
pub fn aged(held: &BTreeMap<String, PairPath>, now: i64) -> Vec<PairPath> {
    held.values()
        .cloned()
        .map(|mut p| {
            p.last_handshake_secs = match p.last_handshake_unix {
                0 => -1,
                t => (now - t).max(0),
            };
            p
        })
        .collect()
}

pub fn summarize<'a>(pairs: impl IntoIterator<Item = &'a PairPath>) -> Health {
    let mut h = Health::default();
    for p in pairs {
        h.pairs += 1;
        h.newest_handshake_unix = h.newest_handshake_unix.max(p.last_handshake_unix);
        h.rx_bytes = h.rx_bytes.saturating_add(p.rx_bytes);
        h.tx_bytes = h.tx_bytes.saturating_add(p.tx_bytes);
        h.direct += u32::from(p.path == "direct");
        h.relayed += u32::from(p.path == "relayed");
    }
    h
}

/// How long a peer online since `opened` (its session) has had no handshake with any of its
/// peers, when that is [`QUIET_SECS`] or more; 0 when all is well or nothing can be said
/// (no report yet, no peers to reach).
pub fn quiet_secs(now: i64, opened: i64, h: Option<&Health>) -> i64 {
    let Some(h) = h.filter(|h| h.pairs > 0) else {
        return 0;
    };
    let since = if h.newest_handshake_unix > 0 {
        h.newest_handshake_unix
    } else {
        opened
    };
    match now - since {
        q if q >= QUIET_SECS => q,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(id: &str, hs: i64, rx: u64) -> PairPath {
        PairPath {
            peer_id: id.into(),
            path: "direct".into(),
            last_handshake_unix: hs,
            rx_bytes: rx,
            ..Default::default()
        }
    }

    fn report(full: bool, at: i64, pairs: Vec<PairPath>, removed: &[&str]) -> Paths {
        Paths {
            pairs,
            full,
            removed: removed.iter().map(|s| s.to_string()).collect(),
            at_unix: at,
        }
    }

    #[test]
    fn deltas_upsert_and_remove_and_a_full_report_replaces() {
        let mut held = BTreeMap::new();
        let full = report(true, 1000, vec![pair("a", 990, 1), pair("b", 0, 2)], &[]);
        merge(&mut held, full, 1000).unwrap();
        merge(
            &mut held,
            report(false, 1060, vec![pair("a", 1050, 5)], &["b"]),
            1060,
        )
        .unwrap();
        assert_eq!(held.len(), 1);
        assert_eq!(
            (held["a"].last_handshake_unix, held["a"].rx_bytes),
            (1050, 5)
        );
        merge(
            &mut held,
            report(true, 1100, vec![pair("c", 0, 0)], &[]),
            1100,
        )
        .unwrap();
        assert_eq!(held.keys().collect::<Vec<_>>(), ["c"]);
    }

    #[test]
    fn handshake_times_move_into_the_controllers_clock() {
        let mut held = BTreeMap::new();
        // The agent's clock is 500 s behind: its handshake 10 s before its report.
        merge(
            &mut held,
            report(true, 500, vec![pair("a", 490, 0)], &[]),
            1000,
        )
        .unwrap();
        assert_eq!(held["a"].last_handshake_unix, 990);
        assert_eq!(aged(&held, 1030)[0].last_handshake_secs, 40);
        // An agent that sends only ages.
        let mut old = pair("b", 0, 0);
        old.last_handshake_secs = 7;
        merge(&mut held, report(false, 0, vec![old], &[]), 2000).unwrap();
        assert_eq!(held["b"].last_handshake_unix, 1993);
        // A handshake "in the future" is now.
        merge(
            &mut held,
            report(false, 100, vec![pair("c", 200, 0)], &[]),
            3000,
        )
        .unwrap();
        assert_eq!(held["c"].last_handshake_unix, 3000);
    }

    #[test]
    fn too_many_pairs_are_refused_even_across_deltas() {
        let mut held = BTreeMap::new();
        let many = |from: usize| {
            (from..from + MAX_PAIRS)
                .map(|i| pair(&i.to_string(), 0, 0))
                .collect()
        };
        merge(&mut held, report(true, 1, many(0), &[]), 1).unwrap();
        assert!(merge(&mut held, report(false, 1, many(MAX_PAIRS), &[]), 1).is_err());
        let mut bad = report(false, 1, vec![pair("x", 0, 0)], &[]);
        bad.pairs[0].path = "teleport".into();
        assert!(check(&bad).is_err());
    }

    #[test]
    fn quiet_means_online_with_peers_and_no_handshake_for_three_minutes() {
        let h = |newest, pairs| Health {
            newest_handshake_unix: newest,
            pairs,
            ..Default::default()
        };
        let opened = 1000;
        assert_eq!(quiet_secs(1100, opened, None), 0, "no report yet");
        assert_eq!(
            quiet_secs(5000, opened, Some(&h(0, 0))),
            0,
            "no peers to reach"
        );
        assert_eq!(quiet_secs(1100, opened, Some(&h(0, 2))), 0, "just started");
        assert_eq!(
            quiet_secs(1200, opened, Some(&h(0, 2))),
            200,
            "never a handshake"
        );
        assert_eq!(quiet_secs(1200, opened, Some(&h(1100, 2))), 0);
        assert_eq!(quiet_secs(1400, opened, Some(&h(1100, 2))), 300);
        let s = summarize(&[pair("a", 5, 1), pair("b", 9, 2)]);
        assert_eq!((s.newest_handshake_unix, s.pairs, s.rx_bytes), (9, 2, 3));
        assert_eq!((s.direct, s.relayed), (2, 0));
    }
}
