//! What a [`NetworkDelta`] means: applying it to the map at `base_revision` gives the map at
//! `revision`. Shared by the controller (which computes deltas) and the agent (which applies them).

use crate::v1::{NetworkDelta, NetworkMap};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("delta from revision {delta_base} does not apply to a map at revision {map_revision}")]
pub struct RevisionMismatch {
    pub map_revision: i64,
    pub delta_base: i64,
}

/// Applies `delta` to `map` in place. Peers stay sorted by peer id.
pub fn apply_delta(map: &mut NetworkMap, delta: &NetworkDelta) -> Result<(), RevisionMismatch> {
    if delta.base_revision != map.revision {
        return Err(RevisionMismatch {
            map_revision: map.revision,
            delta_base: delta.base_revision,
        });
    }
    map.peers.retain(|p| {
        !delta.removed.contains(&p.peer_id)
            && !delta.upserted.iter().any(|u| u.peer_id == p.peer_id)
    });
    map.peers.extend(delta.upserted.iter().cloned());
    map.peers.sort_by(|a, b| a.peer_id.cmp(&b.peer_id));
    map.revision = delta.revision;
    Ok(())
}
