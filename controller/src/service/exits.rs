//! Exit nodes: a gateway with an exit route (0.0.0.0/0, ::/0) in force carries the internet
//! traffic of the peers that chose it (`canopy peer set-exit-node`, or the agent's
//! `--exit-node`); no other peer routes anything there.

use canopy_proto::v1::{Peer, PeerRecord, RouteRecord};

use super::{AgentIdentity, Caller, Controller, decode};
use crate::error::{Error, Result};
use crate::keys;
use crate::store::{Compare, Op, Txn};

/// The peer id `name` (a peer id or hostname; empty or "none": no exit node) names as `me`'s
/// exit node, among a network's `peers` and `routes`: another peer that advertises an exit
/// route.
pub fn pick_exit(
    peers: &[PeerRecord],
    routes: &[RouteRecord],
    me: &str,
    name: &str,
) -> Result<String> {
    if name.is_empty() || name == "none" {
        return Ok(String::new());
    }
    let quoted = canopy_proto::text::quoted(name);
    let p = peers
        .iter()
        .find(|p| p.id == name)
        .or_else(|| peers.iter().find(|p| p.hostname == name))
        .ok_or_else(|| Error::NotFound(format!("no peer {quoted} in this network")))?;
    if p.id == me {
        return Err(Error::InvalidArgument(
            "a peer cannot be its own exit node".into(),
        ));
    }
    if !routes
        .iter()
        .any(|r| r.peer_id == p.id && r.prefix.ends_with("/0"))
    {
        return Err(Error::FailedPrecondition(format!(
            "{quoted} is not an exit node: route 0.0.0.0/0 (or ::/0) through it first"
        )));
    }
    Ok(p.id.clone())
}

impl Controller {
    /// Sends peer `peer_id`'s internet traffic through exit node `exit` (empty: none).
    pub async fn set_exit_node(&self, c: &Caller, peer_id: &str, exit: &str) -> Result<Peer> {
        c.require_admin()?;
        let (p, _) = self.find_peer(c, peer_id).await?;
        let p = self.write_exit_node(&p.network_id, &p.id, exit).await?;
        Ok(self.peer_view(&p))
    }

    /// The exit node an agent asked for in its Hello (`--exit-node`). One it cannot have is
    /// logged and left as it was: the session goes on.
    pub async fn take_exit_node(&self, id: &AgentIdentity, exit: &str) {
        let current = self.cache.peer(&id.network_id, &id.peer_id);
        if current.is_some_and(|p| p.exit_node == exit) {
            return;
        }
        if let Err(e) = self
            .write_exit_node(&id.network_id, &id.peer_id, exit)
            .await
        {
            tracing::warn!(peer = %id.peer_id, exit = %canopy_proto::text::escape(exit), error = %e, "the exit node the agent asked for was not set");
        }
    }

    async fn write_exit_node(
        &self,
        network: &str,
        peer_id: &str,
        exit: &str,
    ) -> Result<PeerRecord> {
        crate::txn::retry("set exit node", |_| async move {
            let peers = self.store.range(keys::peers(network).as_bytes()).await?;
            let routes = self.store.range(keys::routes(network).as_bytes()).await?;
            let records: Vec<PeerRecord> = peers.kvs.iter().map(decode).collect::<Result<_>>()?;
            let route_records: Vec<RouteRecord> =
                routes.kvs.iter().map(decode).collect::<Result<_>>()?;
            let chosen = pick_exit(&records, &route_records, peer_id, exit)?;
            let Some(kv) = peers
                .kvs
                .iter()
                .find(|kv| keys::parse_peer(&kv.key).is_some_and(|(_, p)| p == peer_id))
            else {
                return Err(Error::NotFound(format!("peer {peer_id} not found")));
            };
            let mut p: PeerRecord = decode(kv)?;
            if p.exit_node == chosen {
                return Ok(Some(p));
            }
            p.exit_node = chosen;
            let key = keys::peer(network, peer_id);
            let mut txn = Txn::new()
                .when(Compare::unchanged(key.clone(), kv.mod_revision))
                .then(Op::put(key, prost::Message::encode_to_vec(&p)));
            // The exit node's routes as read: withdrawn meanwhile, pick again.
            for r in routes.kvs.iter() {
                txn = txn.when(Compare::unchanged(r.key.clone(), r.mod_revision));
            }
            if self.store.txn(txn).await?.succeeded {
                tracing::info!(peer = %p.id, exit = %p.exit_node, "exit node set");
                return Ok(Some(p));
            }
            Ok(None)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(id: &str, host: &str) -> PeerRecord {
        PeerRecord {
            id: id.into(),
            hostname: host.into(),
            ..Default::default()
        }
    }

    #[test]
    fn an_exit_node_is_another_peer_with_an_exit_route() {
        let peers = [
            peer("peer_a", "laptop"),
            peer("peer_x", "exit1"),
            peer("peer_s", "site"),
        ];
        let route = |gw: &str, prefix: &str| RouteRecord {
            peer_id: gw.into(),
            prefix: prefix.into(),
            ..Default::default()
        };
        let routes = [
            route("peer_x", "0.0.0.0/0"),
            route("peer_s", "10.20.0.0/16"),
        ];
        assert_eq!(
            pick_exit(&peers, &routes, "peer_a", "exit1").unwrap(),
            "peer_x"
        );
        assert_eq!(
            pick_exit(&peers, &routes, "peer_a", "peer_x").unwrap(),
            "peer_x"
        );
        assert_eq!(pick_exit(&peers, &routes, "peer_a", "none").unwrap(), "");
        assert_eq!(pick_exit(&peers, &routes, "peer_a", "").unwrap(), "");
        let e = pick_exit(&peers, &routes, "peer_a", "site").unwrap_err();
        assert!(matches!(e, Error::FailedPrecondition(_)), "{e}");
        let e = pick_exit(&peers, &routes, "peer_x", "exit1").unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
        let e = pick_exit(&peers, &routes, "peer_a", "nobody").unwrap_err();
        assert!(matches!(e, Error::NotFound(_)), "{e}");
    }
}
