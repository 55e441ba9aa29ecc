//! What the agent tells the controller of its paths (pure): the whole set first in a session,
//! then only what changed.

use std::collections::HashMap;

use canopy_proto::v1::{PairPath, Paths};

/// This host's clock, in Unix seconds.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Handshake times that moved less than this are the same handshake (they are computed from
/// ages, so they wobble by a second).
const SAME_HANDSHAKE_SECS: i64 = 2;

/// Whether the controller should hear of `now` after `before`.
fn changed(before: &PairPath, now: &PairPath) -> bool {
    before.path != now.path
        || before.via != now.via
        || before.why != now.why
        || before.rx_bytes != now.rx_bytes
        || before.tx_bytes != now.tx_bytes
        || (before.last_handshake_unix - now.last_handshake_unix).abs() > SAME_HANDSHAKE_SECS
}

/// The report that brings a controller holding `sent` (`None`: nothing yet this session) to
/// `pairs`, taken at `now` (this host's clock); `None` when there is nothing to say. Returns
/// what the controller then holds.
pub fn paths_delta(
    sent: Option<&HashMap<String, PairPath>>,
    pairs: &[PairPath],
    now: i64,
) -> Option<(Paths, HashMap<String, PairPath>)> {
    let held: HashMap<String, PairPath> = pairs
        .iter()
        .map(|p| (p.peer_id.clone(), p.clone()))
        .collect();
    let Some(sent) = sent else {
        let report = Paths {
            pairs: pairs.to_vec(),
            full: true,
            removed: Vec::new(),
            at_unix: now,
        };
        return Some((report, held));
    };
    let upserts: Vec<PairPath> = pairs
        .iter()
        .filter(|p| sent.get(&p.peer_id).is_none_or(|b| changed(b, p)))
        .cloned()
        .collect();
    let mut removed: Vec<String> = sent
        .keys()
        .filter(|id| !held.contains_key(*id))
        .cloned()
        .collect();
    removed.sort();
    if upserts.is_empty() && removed.is_empty() {
        return None;
    }
    // What the controller holds: what it had, with these applied (an unchanged pair keeps the
    // version it has, so small wobbles cannot add up unseen).
    let mut after = sent.clone();
    after.retain(|id, _| held.contains_key(id));
    after.extend(upserts.iter().map(|p| (p.peer_id.clone(), p.clone())));
    let report = Paths {
        pairs: upserts,
        full: false,
        removed,
        at_unix: now,
    };
    Some((report, after))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(id: &str, hs: i64, tx: u64) -> PairPath {
        PairPath {
            peer_id: id.into(),
            path: "direct".into(),
            last_handshake_unix: hs,
            tx_bytes: tx,
            ..Default::default()
        }
    }

    #[test]
    fn a_session_starts_full_then_sends_only_changes() {
        let first = [pair("a", 100, 1), pair("b", 100, 1)];
        let (r, held) = paths_delta(None, &first, 100).unwrap();
        assert!(r.full && r.pairs.len() == 2);
        // b's handshake wobbles by a second: nothing to say.
        let same = [pair("a", 100, 1), pair("b", 101, 1)];
        assert!(paths_delta(Some(&held), &same, 160).is_none());
        // a sent bytes, c is new, b is gone.
        let next = [pair("a", 100, 9), pair("c", 0, 0)];
        let (r, held) = paths_delta(Some(&held), &next, 220).unwrap();
        assert!(!r.full);
        let ids: Vec<&str> = r.pairs.iter().map(|p| p.peer_id.as_str()).collect();
        assert_eq!(ids, ["a", "c"]);
        assert_eq!(r.removed, ["b"]);
        assert_eq!(r.at_unix, 220);
        assert_eq!(held.len(), 2);
    }

    #[test]
    fn wobbles_do_not_add_up_unseen() {
        let (_, held) = paths_delta(None, &[pair("a", 100, 0)], 100).unwrap();
        let (mut held, mut moved) = (held, 0);
        for hs in [102, 104, 106] {
            if let Some((_, h)) = paths_delta(Some(&held), &[pair("a", hs, 0)], hs) {
                held = h;
                moved += 1;
            }
        }
        assert!(moved >= 1, "a handshake 6 s later is reported");
        assert_eq!(held["a"].last_handshake_unix, 104, "against what was sent");
    }
}
