//! Records → what agents receive: a peer as a map carries it, a policy part.

use canopy_proto::v1::{PeerRecord, RemotePeer};

pub(super) use crate::policy::wire::policy_part;

pub(super) fn remote(p: &PeerRecord) -> RemotePeer {
    RemotePeer {
        peer_id: p.id.clone(),
        public_key: p.public_key.clone(),
        allowed_ips: p.addresses.clone(),
        endpoints: p.endpoints.clone(),
        outside: p.outside.clone(),
        hostname: p.hostname.clone(),
        tags: p.tags.clone(),
        dns_name: crate::names::peer_name(p),
        // Set by NetState for a locked network.
        lock: None,
        route_locks: Vec::new(),
        lock_delegation: None,
    }
}
