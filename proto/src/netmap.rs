//! What a [`NetworkDelta`] means: applying it to the map at `base_revision` gives the map at
//! `revision`. Shared by the controller (which computes deltas) and the agent (which applies them).

use crate::v1::{NetworkDelta, NetworkMap};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("delta from revision {delta_base} does not apply to a map at revision {map_revision}")]
pub struct RevisionMismatch {
    pub map_revision: i64,
    pub delta_base: i64,
}

/// Applies `delta` to `map` in place. `map.peers` is kept sorted by peer id (as the controller
/// sends it), so each change is a binary search, not a pass over every peer.
pub fn apply_delta(map: &mut NetworkMap, delta: &NetworkDelta) -> Result<(), RevisionMismatch> {
    if delta.base_revision != map.revision {
        return Err(RevisionMismatch {
            map_revision: map.revision,
            delta_base: delta.base_revision,
        });
    }
    for id in &delta.removed {
        if let Ok(i) = map.peers.binary_search_by(|p| p.peer_id.as_str().cmp(id)) {
            map.peers.remove(i);
        }
    }
    for u in &delta.upserted {
        match map.peers.binary_search_by(|p| p.peer_id.cmp(&u.peer_id)) {
            Ok(i) => map.peers[i] = u.clone(),
            Err(i) => map.peers.insert(i, u.clone()),
        }
    }
    if delta.policy_changed {
        map.policy.clone_from(&delta.policy);
    }
    map.revision = delta.revision;
    Ok(())
}

/// Puts a full map's peers in the order [`apply_delta`] relies on.
pub fn canonicalize(map: &mut NetworkMap) {
    map.peers.sort_by(|a, b| a.peer_id.cmp(&b.peer_id));
}
