//! Routes to sites: a prefix behind a gateway peer. Every peer of the network sends the prefix
//! through the gateway (it becomes part of the gateway's allowed IPs and the hosts' routing
//! tables); the gateway forwards it into its site.

use canopy_proto::v1::{Route, RouteRecord};
use ipnetwork::IpNetwork;
use prost::Message as _;

use super::{Caller, Controller, decode};
use crate::error::{Error, Result};
use crate::keys;
use crate::model;
use crate::store::{Compare, Op, Txn};

/// Routes in one network, at most.
pub const MAX_ROUTES: usize = 256;

/// Whether `prefix` may be routed through a gateway of a network on `cidrs` that has
/// `existing` routes: a routable unicast range (not the default route: exit nodes are not
/// routes yet), outside the network's own addresses, not already carried by this gateway.
pub(super) fn check_route(
    prefix: &str,
    cidrs: &[String],
    existing: &[RouteRecord],
    gateway: &str,
) -> Result<IpNetwork> {
    let net = model::parse_cidr(prefix)?;
    for c in cidrs.iter().filter_map(|c| c.parse::<IpNetwork>().ok()) {
        if c.is_ipv4() == net.is_ipv4() && (c.contains(net.network()) || net.contains(c.network()))
        {
            return Err(Error::InvalidArgument(format!(
                "{net} overlaps the network's own {c}: a route leads outside the overlay"
            )));
        }
    }
    if existing
        .iter()
        .any(|r| r.peer_id == gateway && r.prefix == net.to_string())
    {
        return Err(Error::AlreadyExists(format!(
            "{gateway} already carries {net}"
        )));
    }
    if existing.len() >= MAX_ROUTES {
        return Err(Error::ResourceExhausted(format!(
            "at most {MAX_ROUTES} routes per network"
        )));
    }
    Ok(net)
}

impl Controller {
    async fn route_records(&self, network_id: &str) -> Result<Vec<(RouteRecord, i64)>> {
        let r = self
            .store
            .range(keys::routes(network_id).as_bytes())
            .await?;
        r.kvs
            .iter()
            .map(|kv| Ok((decode::<RouteRecord>(kv)?, kv.mod_revision)))
            .collect()
    }

    fn route_view(&self, r: &RouteRecord) -> Route {
        let primary = self.cache.route_is_primary(&r.network_id, &r.id);
        Route {
            id: r.id.clone(),
            network_id: r.network_id.clone(),
            peer_id: r.peer_id.clone(),
            prefix: r.prefix.clone(),
            primary,
            created_at_unix: r.created_at_unix,
        }
    }

    /// Routes `prefix` through peer `peer_id` (the site's gateway).
    pub async fn advertise_route(&self, c: &Caller, peer_id: &str, prefix: &str) -> Result<Route> {
        c.require_admin()?;
        crate::txn::retry("advertise route", |_| async move {
            let (peer, peer_rev) = self.find_peer(c, peer_id).await?;
            let (net, net_rev) = self.resolve_network(c, &peer.network_id).await?;
            let existing: Vec<RouteRecord> =
                self.route_records(&net.id).await?.into_iter().map(|(r, _)| r).collect();
            let prefix = check_route(prefix, &net.cidrs, &existing, &peer.id)?;
            let rec = RouteRecord {
                id: crate::secret::new_id("route_"),
                network_id: net.id.clone(),
                peer_id: peer.id.clone(),
                prefix: prefix.to_string(),
                created_at_unix: self.now_unix(),
            };
            let key = keys::route(&net.id, &rec.id);
            let txn = Txn::new()
                .when(Compare::unchanged(keys::peer(&net.id, &peer.id), peer_rev))
                .when(Compare::unchanged(keys::network(&c.tenant, &net.id), net_rev))
                .when(Compare::absent(key.clone()))
                .then(Op::put(key, rec.encode_to_vec()));
            if self.store.txn(txn).await?.succeeded {
                tracing::info!(route = %rec.id, prefix = %rec.prefix, gateway = %rec.peer_id, "route advertised");
                // The oldest route of a prefix carries it: this one, if it is the first.
                let primary = !existing.iter().any(|r| r.prefix == rec.prefix);
                return Ok(Some(Route { primary, ..self.route_view(&rec) }));
            }
            Ok(None)
        })
        .await
    }

    pub async fn list_routes(&self, c: &Caller, network: &str) -> Result<Vec<Route>> {
        let (net, _) = self.resolve_network(c, network).await?;
        let mut out: Vec<Route> = self
            .route_records(&net.id)
            .await?
            .iter()
            .map(|(r, _)| self.route_view(r))
            .collect();
        out.sort_by(|a, b| (&a.prefix, a.created_at_unix).cmp(&(&b.prefix, b.created_at_unix)));
        Ok(out)
    }

    /// Withdraws a route: peers stop sending its prefix through that gateway at once.
    pub async fn remove_route(&self, c: &Caller, route_id: &str) -> Result<Route> {
        c.require_admin()?;
        crate::txn::retry("remove route", |_| async move {
            for net in self.network_records(&c.tenant).await? {
                let key = keys::route(&net.id, route_id);
                let Some(kv) = self.store.get(key.as_bytes()).await? else {
                    continue;
                };
                let rec: RouteRecord = decode(&kv)?;
                let txn = Txn::new()
                    .when(Compare::unchanged(key.clone(), kv.mod_revision))
                    .then(Op::delete(key));
                if self.store.txn(txn).await?.succeeded {
                    tracing::info!(route = %rec.id, "route removed");
                    return Ok(Some(Route {
                        primary: false,
                        ..self.route_view(&rec)
                    }));
                }
                return Ok(None);
            }
            Err(Error::NotFound(format!(
                "route {} not found",
                canopy_proto::text::quoted(route_id)
            )))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(gw: &str, prefix: &str) -> RouteRecord {
        RouteRecord {
            peer_id: gw.into(),
            prefix: prefix.into(),
            ..Default::default()
        }
    }

    #[test]
    fn routes_are_checked_against_the_network_and_the_gateways_others() {
        let cidrs = ["100.64.0.0/24".to_string(), "fd7a::/64".to_string()];
        assert!(check_route("10.20.0.0/16", &cidrs, &[], "gw").is_ok());
        assert!(check_route("fd99::/48", &cidrs, &[], "gw").is_ok());
        let e = check_route("100.64.0.128/25", &cidrs, &[], "gw").unwrap_err();
        assert!(e.to_string().contains("overlaps the network's own"), "{e}");
        let e = check_route("100.0.0.0/8", &cidrs, &[], "gw").unwrap_err();
        assert!(
            e.to_string().contains("overlaps"),
            "a route around the network: {e}"
        );
        assert!(
            check_route("0.0.0.0/0", &cidrs, &[], "gw").is_err(),
            "no exit nodes yet"
        );
        assert!(
            check_route("10.20.0.1/16", &cidrs, &[], "gw").is_err(),
            "host bits"
        );
        let e =
            check_route("10.20.0.0/16", &cidrs, &[route("gw", "10.20.0.0/16")], "gw").unwrap_err();
        assert!(matches!(e, Error::AlreadyExists(_)));
        assert!(
            check_route(
                "10.20.0.0/16",
                &cidrs,
                &[route("gw", "10.20.0.0/16")],
                "gw2"
            )
            .is_ok(),
            "a second gateway: HA"
        );
    }
}
