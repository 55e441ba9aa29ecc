//! A locked network's policy on this node: the tenant-signed document, compiled here into this
//! node's inbound rules with the signed tags of its peers, instead of the part the controller
//! compiled (which a compromised controller could widen).

use canopy_policy::compile::{self, Peers};
use canopy_policy::eval::PeerView;
use canopy_proto::lock::{self, Kind, Trust};
use canopy_proto::v1::{LockedPolicy, LockedRoute, NetworkMap, PolicyLock, PolicyPart};
use ipnetwork::IpNetwork;

/// The policy statement of `pl`, if a trusted key signed it for this document and network.
pub fn verify(trust: &Trust, network_id: &str, pl: &PolicyLock) -> Result<LockedPolicy, String> {
    let signed = pl.signed.as_ref().ok_or("the policy is not signed")?;
    let st: LockedPolicy = lock::verify(Kind::Policy, signed, &trust.key_set().keys)
        .map_err(|e| format!("the policy: {e}"))?;
    if st.network_id != network_id {
        return Err("the policy is another network's".into());
    }
    if st.text_sha256 != canopy_proto::sha256(pl.text.as_bytes()) {
        return Err("the policy's text is not the one signed".into());
    }
    Ok(st)
}

/// Host prefixes (addresses) and wider ones (routes) of a list of prefixes.
fn split(ips: &[String]) -> (Vec<IpNetwork>, Vec<IpNetwork>) {
    let nets = ips.iter().filter_map(|a| a.parse::<IpNetwork>().ok());
    nets.partition(|n| n.prefix() == if n.is_ipv4() { 32 } else { 128 })
}

/// This node as the policy sees it: its signed membership (tags, addresses) and the routes it
/// carries that are signed for its key; without a valid signature, no tags (fewer rules reach
/// it: fails closed) and the map's addresses.
fn me(trust: &Trust, map: &NetworkMap, now: i64) -> (Vec<String>, Vec<IpNetwork>, Vec<IpNetwork>) {
    let keys = &trust.key_set().keys;
    let delegation = map.self_delegation.as_ref();
    let signed = map
        .self_lock
        .as_ref()
        .and_then(|s| trust.membership(&map.network_id, s, delegation, now).ok())
        .filter(|m| m.peer_id == map.peer_id);
    let Some(m) = signed else {
        return (Vec::new(), split(&map.addresses).0, Vec::new());
    };
    let routes: Vec<String> = map
        .self_route_locks
        .iter()
        .filter_map(|s| lock::verify::<LockedRoute>(Kind::Route, s, keys).ok())
        .filter(|r| r.gateway_public_key == m.public_key && r.network_id == map.network_id)
        .map(|r| r.prefix)
        .filter(|p| map.routes.contains(p))
        .collect();
    (m.tags, split(&m.addresses).0, split(&routes).1)
}

/// This node's inbound rules under the signed document `text`, over the peers of `map`
/// (already admitted: their tags are the signed ones). A document that does not parse allows
/// nothing.
pub fn own_part(trust: &Trust, text: &str, map: &NetworkMap, now: i64) -> PolicyPart {
    let policy = canopy_policy::parse(text).unwrap_or_else(|e| {
        tracing::error!(error = %e, "the signed policy does not parse: it allows nothing");
        canopy_policy::Policy::deny_all()
    });
    let nets: Vec<(Vec<IpNetwork>, Vec<IpNetwork>)> =
        map.peers.iter().map(|p| split(&p.allowed_ips)).collect();
    let views = map.peers.iter().zip(&nets).map(|(p, (a, r))| PeerView {
        id: &p.peer_id,
        tags: &p.tags,
        addresses: a,
        routes: r,
    });
    let dir = Peers::new(views.collect());
    let (tags, addresses, routes) = me(trust, map, now);
    let me = PeerView {
        id: &map.peer_id,
        tags: &tags,
        addresses: &addresses,
        routes: &routes,
    };
    canopy_policy::wire::policy_part(&compile::part(&policy, &dir, &me).inbound)
}
