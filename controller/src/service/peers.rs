//! Peers as the console sees them: list, get, tag, remove.

use std::net::IpAddr;

use canopy_proto::v1::{Peer, PeerRecord};
use ipnetwork::IpNetwork;

use super::{Caller, Controller, decode, removed_credential};
use crate::error::{Error, Result};
use crate::keys;
use crate::store::{Compare, Op, Revision, Txn};

/// `tags` with `remove` taken out and `add` put in (once each, in order).
pub(super) fn retag(tags: &[String], add: &[String], remove: &[String]) -> Vec<String> {
    let mut out: Vec<String> = tags
        .iter()
        .filter(|t| !remove.contains(t))
        .cloned()
        .collect();
    for t in add {
        if !out.contains(t) {
            out.push(t.clone());
        }
    }
    out
}

impl Controller {
    /// A network's peers; with `paths`, how each reaches the others (its agent's last report).
    pub async fn list_peers(&self, c: &Caller, network: &str, paths: bool) -> Result<Vec<Peer>> {
        let (net, _) = self.resolve_network(c, network).await?;
        let prefixes = [
            keys::peers(&net.id).into_bytes(),
            keys::paths_of(&net.id).into_bytes(),
        ];
        let r = self
            .store
            .range_many(&prefixes[..1 + usize::from(paths)])
            .await?;
        let mut out = Vec::with_capacity(r.kvs.len());
        let mut reported = std::collections::HashMap::new();
        for kv in &r.kvs {
            if kv.key.starts_with(&prefixes[0]) {
                out.push(self.peer_view(&decode(kv)?));
            } else if let Some(peer) = kv.key.strip_prefix(prefixes[1].as_slice()) {
                let rec: canopy_proto::v1::PathsRecord = decode(kv)?;
                reported.insert(String::from_utf8_lossy(peer).into_owned(), rec);
            }
        }
        for p in &mut out {
            if let Some(rec) = reported.remove(&p.id) {
                self.with_paths(p, rec);
            }
        }
        out.sort_by_key(|p| ip_sort_key(&p.addresses));
        Ok(out)
    }

    pub(super) async fn find_peer(
        &self,
        c: &Caller,
        peer_id: &str,
    ) -> Result<(PeerRecord, Revision)> {
        if peer_id.is_empty() {
            return Err(Error::InvalidArgument("peer id is required".into()));
        }
        for net in self.network_records(&c.tenant).await? {
            if let Some(kv) = self
                .store
                .get(keys::peer(&net.id, peer_id).as_bytes())
                .await?
            {
                return Ok((decode(&kv)?, kv.mod_revision));
            }
        }
        Err(Error::NotFound(format!(
            "peer {} not found",
            canopy_proto::text::quoted(peer_id)
        )))
    }

    /// One peer, with how it reaches its peers (its agent's last report, from the store, so
    /// whichever replica holds its session).
    pub async fn get_peer(&self, c: &Caller, peer_id: &str) -> Result<Peer> {
        let rec = self.find_peer(c, peer_id).await?.0;
        let mut p = self.peer_view(&rec);
        let key = keys::paths(&rec.network_id, &rec.id);
        if let Some(kv) = self.store.get(key.as_bytes()).await? {
            self.with_paths(&mut p, decode(&kv)?);
        }
        Ok(p)
    }

    /// `p` with its agent's recorded paths, aged to now; and the summary from them, unless
    /// its live session here said more recently.
    fn with_paths(&self, p: &mut Peer, rec: canopy_proto::v1::PathsRecord) {
        let held = rec
            .pairs
            .into_iter()
            .map(|x| (x.peer_id.clone(), x))
            .collect();
        p.paths = super::health::aged(&held, self.now_unix());
        p.paths_at_unix = rec.at_unix;
        if self.sessions.health(&p.id).and_then(|(_, h)| h).is_none() {
            let h = super::health::summarize(&p.paths);
            (p.last_handshake_unix, p.rx_bytes, p.tx_bytes) =
                (h.newest_handshake_unix, h.rx_bytes, h.tx_bytes);
            (p.paths_direct, p.paths_relayed) = (h.direct, h.relayed);
        }
    }

    /// Adds and removes tags of a peer (an admin's word: agents cannot claim tags). Its
    /// network's policy applies to the new tags at once; agents whose part changes get it.
    pub async fn tag_peer(
        &self,
        c: &Caller,
        peer_id: &str,
        add: &[String],
        remove: &[String],
    ) -> Result<Peer> {
        c.require_admin()?;
        crate::model::validate_tags(add)?;
        crate::txn::retry("tag peer", |_| async move {
            let (mut p, rev) = self.find_peer(c, peer_id).await?;
            p.tags = retag(&p.tags, add, remove);
            crate::model::validate_tags(&p.tags)?;
            let key = keys::peer(&p.network_id, &p.id);
            let txn = Txn::new()
                .when(Compare::unchanged(key.clone(), rev))
                .then(Op::put(key, prost::Message::encode_to_vec(&p)));
            if self.store.txn(txn).await?.succeeded {
                tracing::info!(peer = %p.id, tags = ?p.tags, "peer tagged");
                return Ok(Some(self.peer_view(&p)));
            }
            Ok(None)
        })
        .await
    }

    /// Removes a peer: frees its addresses and invalidates its credential in one transaction.
    /// Its Sync stream is closed by the cache update that follows.
    pub async fn remove_peer(&self, c: &Caller, peer_id: &str) -> Result<()> {
        c.require_admin()?;
        crate::txn::retry("remove peer", |_| async move {
            let (p, rev) = self.find_peer(c, peer_id).await?;
            let routes = self
                .store
                .range(keys::routes(&p.network_id).as_bytes())
                .await?;
            let mut txn = Txn::new()
                .when(Compare::unchanged(keys::peer(&p.network_id, &p.id), rev))
                .then(Op::delete(keys::peer(&p.network_id, &p.id)))
                .then(Op::delete(keys::paths(&p.network_id, &p.id)))
                .then(Op::delete(keys::pubkey(&p.network_id, &p.public_key)))
                .then(Op::delete(keys::dnsname(&p.network_id, &p.dns_name)))
                .then(Op::put(keys::netdel(&p.network_id), p.id.clone()))
                .then(Op::put(keys::netpeers(&p.network_id), "recount"));
            for a in &p.addresses {
                if let Ok(net) = a.parse::<IpNetwork>() {
                    txn = txn.then(Op::delete(keys::ipam(&p.network_id, &net.ip())));
                }
            }
            if let Ok(h) = <[u8; 32]>::try_from(p.credential_hash.as_slice()) {
                txn = txn.then(Op::put(
                    keys::credential(&h),
                    removed_credential(&p.network_id, &p.id, self.now_unix()),
                ));
            }
            // The routes it carried go with it.
            for kv in &routes.kvs {
                let r: canopy_proto::v1::RouteRecord = decode(kv)?;
                if r.peer_id == p.id {
                    txn = txn.then(Op::delete(keys::route(&p.network_id, &r.id)));
                }
            }
            if self.store.txn(txn).await?.succeeded {
                tracing::info!(peer = %p.id, network = %p.network_id, "peer removed");
                return Ok(Some(()));
            }
            Ok(None)
        })
        .await
    }

    pub(super) fn peer_view(&self, p: &PeerRecord) -> Peer {
        let acked = self.sessions.get(&p.id);
        let (mut hs, mut rx, mut tx, mut quiet) = (0, 0, 0, 0);
        let mut summary = super::health::Health::default();
        if let Some((opened, h)) = self.sessions.health(&p.id) {
            quiet = super::health::quiet_secs(self.now_unix(), opened, h.as_ref());
            if let Some(h) = h {
                (hs, rx, tx, summary) = (h.newest_handshake_unix, h.rx_bytes, h.tx_bytes, h);
            }
        }
        Peer {
            id: p.id.clone(),
            network_id: p.network_id.clone(),
            public_key: p.public_key.clone(),
            addresses: p.addresses.clone(),
            hostname: p.hostname.clone(),
            tags: p.tags.clone(),
            endpoints: p.endpoints.clone(),
            created_at_unix: p.created_at_unix,
            online: acked.is_some(),
            acked_revision: acked.unwrap_or(0),
            exit_node: p.exit_node.clone(),
            outside: p.outside.clone(),
            dns_name: match self.cache.network(&p.network_id) {
                Some(n) => format!("{}.{}", crate::names::peer_name(p), crate::names::zone(&n)),
                None => crate::names::peer_name(p),
            },
            last_handshake_unix: hs,
            rx_bytes: rx,
            tx_bytes: tx,
            quiet_secs: quiet,
            paths_direct: summary.direct,
            paths_relayed: summary.relayed,
            lock_state: self.lock_state(p).to_string(),
            lock: p.lock.clone(),
            lock_refused: self.sessions.lock_refused(&p.id).unwrap_or(0),
            ..Default::default()
        }
    }
}

fn ip_sort_key(addrs: &[String]) -> Vec<IpAddr> {
    addrs
        .iter()
        .filter_map(|a| a.parse::<IpNetwork>().ok().map(|n| n.ip()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|t| t.to_string()).collect()
    }

    #[test]
    fn retagging_removes_then_adds_each_tag_once() {
        assert_eq!(
            retag(&v(&["web", "db"]), &v(&["ops", "web"]), &v(&["db"])),
            v(&["web", "ops"])
        );
        assert_eq!(
            retag(&v(&["a"]), &v(&["a"]), &v(&["a"])),
            v(&["a"]),
            "removed, then added back"
        );
        assert!(retag(&v(&["a"]), &[], &v(&["a", "zz"])).is_empty());
    }
}
