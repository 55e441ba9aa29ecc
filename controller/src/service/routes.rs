//! Routes to sites: a prefix behind a gateway peer. Every peer of the network sends the prefix
//! through the gateway (it becomes part of the gateway's allowed IPs and the hosts' routing
//! tables); the gateway forwards it into its site.

use canopy_proto::v1::{Route, RouteRecord};
use ipnetwork::IpNetwork;
use prost::Message as _;

use super::{AgentIdentity, Caller, Controller, decode};
use crate::error::{Error, Result};
use crate::keys;
use crate::model;
use crate::store::{Compare, Op, Txn};

/// Routes in one network, at most.
pub const MAX_ROUTES: usize = 256;

/// Whether `prefix` may be routed through a gateway of a network on `cidrs` that has
/// `existing` routes: an exit route (0.0.0.0/0 or ::/0: only peers that choose this exit node
/// use it), or a routable unicast range outside the network's own addresses; not already
/// carried by this gateway.
pub(super) fn check_route(
    prefix: &str,
    cidrs: &[String],
    existing: &[RouteRecord],
    gateway: &str,
) -> Result<IpNetwork> {
    let net = route_prefix(prefix)?;
    let exit = net.prefix() == 0;
    for c in cidrs.iter().filter_map(|c| c.parse::<IpNetwork>().ok()) {
        if exit {
            break;
        }
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

/// A route's prefix: a network address (no host bits), from a single host (/32, /128) up to
/// the whole internet (an exit route); otherwise a routable unicast range.
fn route_prefix(prefix: &str) -> Result<IpNetwork> {
    let quoted = canopy_proto::text::quoted(prefix);
    let net: IpNetwork = match prefix.trim() {
        p if p.contains('/') => p.parse().map_err(|_| {
            Error::InvalidArgument(format!("{quoted} is not a CIDR (like 10.20.0.0/16)"))
        })?,
        _ => {
            return Err(Error::InvalidArgument(format!(
                "{quoted} is not a CIDR (like 10.20.0.0/16)"
            )));
        }
    };
    if net.network() != net.ip() {
        return Err(Error::InvalidArgument(format!(
            "{prefix} has host bits set; did you mean {}/{}?",
            net.network(),
            net.prefix()
        )));
    }
    if net.prefix() != 0 && !model::is_routable_unicast(&net) {
        return Err(Error::InvalidArgument(format!(
            "{net} is a special-purpose range (loopback, link-local, multicast, …), not a site"
        )));
    }
    Ok(net)
}

impl Controller {
    pub(super) async fn route_records(&self, network_id: &str) -> Result<Vec<(RouteRecord, i64)>> {
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
        let state = match self.cache.route_state(&r.network_id, &r.id) {
            // The cache may not hold a route just written: the record says what it is.
            "pending" if !r.pending => "approved",
            s => s,
        };
        Route {
            id: r.id.clone(),
            network_id: r.network_id.clone(),
            peer_id: r.peer_id.clone(),
            prefix: r.prefix.clone(),
            primary,
            created_at_unix: r.created_at_unix,
            state: state.to_string(),
            from_agent: r.from_agent,
            gateway_live: self.cache.gateway_live(&r.network_id, &r.peer_id),
            lock: r.lock.clone(),
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
                pending: false,
                from_agent: false,
                lock: None,
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
                // (An exit route is nobody's primary: each client opts into it.)
                let exit = prefix.prefix() == 0;
                let primary = !exit && !existing.iter().any(|r| r.prefix == rec.prefix);
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
        let rec = self.change_route(c, route_id, |_| None).await?;
        tracing::info!(route = %rec.id, "route removed");
        Ok(Route {
            primary: false,
            ..self.route_view(&rec)
        })
    }

    /// Puts a route the gateway's agent advertised into force.
    pub async fn approve_route(&self, c: &Caller, route_id: &str) -> Result<Route> {
        c.require_admin()?;
        let rec = self
            .change_route(c, route_id, |r| {
                Some(RouteRecord {
                    pending: false,
                    ..r.clone()
                })
            })
            .await?;
        tracing::info!(route = %rec.id, "route approved");
        Ok(self.route_view(&rec))
    }

    /// Replaces route `route_id` of one of the caller's networks with what `change` makes of
    /// it (`None`: deletes it), compare-and-swap; returns the new record (or the deleted one).
    async fn change_route(
        &self,
        c: &Caller,
        route_id: &str,
        change: impl Fn(&RouteRecord) -> Option<RouteRecord>,
    ) -> Result<RouteRecord> {
        let change = &change;
        crate::txn::retry("change route", |_| async move {
            for net in self.network_records(&c.tenant).await? {
                let key = keys::route(&net.id, route_id);
                let Some(kv) = self.store.get(key.as_bytes()).await? else {
                    continue;
                };
                let rec: RouteRecord = decode(&kv)?;
                let new = change(&rec);
                let txn = Txn::new().when(Compare::unchanged(key.clone(), kv.mod_revision));
                let txn = match &new {
                    Some(n) => txn.then(Op::put(key, n.encode_to_vec())),
                    None => txn.then(Op::delete(key)),
                };
                if self.store.txn(txn).await?.succeeded {
                    return Ok(Some(new.unwrap_or(rec)));
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

    /// Takes the prefixes gateway `id`'s agent advertises (its Hello): each one not yet a
    /// route of this gateway becomes a pending route, and a route it advertised before but
    /// not now is withdrawn. A prefix the network cannot route is skipped and logged (the
    /// agent checked what it could alone). Routes made by an admin are left alone.
    pub async fn take_advertised(&self, id: &AgentIdentity, prefixes: &[String]) -> Result<()> {
        if prefixes.len() > MAX_ADVERTISED {
            return Err(Error::InvalidArgument(format!(
                "at most {MAX_ADVERTISED} advertised routes per agent"
            )));
        }
        crate::txn::retry("advertised routes", |_| async move {
            let (peer_key, net_id) = (keys::peer(&id.network_id, &id.peer_id), &id.network_id);
            let Some(peer_kv) = self.store.get(peer_key.as_bytes()).await? else {
                return Ok(Some(())); // removed meanwhile: the session ends on its own
            };
            // A network's CIDRs never change: the cache's copy is the record's.
            let Some(cidrs) = self.cache.network(net_id).map(|n| n.cidrs) else {
                return Ok(Some(()));
            };
            let existing = self.route_records(net_id).await?;
            let mine = |r: &RouteRecord| r.peer_id == id.peer_id;
            let mut txn = Txn::new().when(Compare::unchanged(peer_key, peer_kv.mod_revision));
            let mut changed = false;
            for (r, rev) in existing.iter().filter(|(r, _)| mine(r) && r.from_agent) {
                if !prefixes.contains(&r.prefix) {
                    let key = keys::route(net_id, &r.id);
                    txn = txn.when(Compare::unchanged(key.clone(), *rev)).then(Op::delete(key));
                    changed = true;
                }
            }
            let records: Vec<RouteRecord> = existing.iter().map(|(r, _)| r.clone()).collect();
            for p in prefixes {
                let prefix = match check_route(p, &cidrs, &records, &id.peer_id) {
                    Ok(prefix) => prefix,
                    Err(Error::AlreadyExists(_)) => continue,
                    Err(e) => {
                        tracing::warn!(peer = %id.peer_id, prefix = %canopy_proto::text::escape(p), error = %e, "an advertised route was not taken");
                        continue;
                    }
                };
                let rec = RouteRecord {
                    id: agent_route_id(&id.peer_id, &prefix),
                    network_id: net_id.clone(),
                    peer_id: id.peer_id.clone(),
                    prefix: prefix.to_string(),
                    created_at_unix: self.now_unix(),
                    pending: true,
                    from_agent: true,
                    lock: None,
                };
                let key = keys::route(net_id, &rec.id);
                txn = txn.when(Compare::absent(key.clone())).then(Op::put(key, rec.encode_to_vec()));
                changed = true;
            }
            if !changed || self.store.txn(txn).await?.succeeded {
                return Ok(Some(()));
            }
            Ok(None)
        })
        .await
    }
}

/// Routes one agent may advertise.
pub const MAX_ADVERTISED: usize = 64;

/// The id of the route gateway `peer`'s agent advertises for `prefix`: the same every time, so
/// two sessions racing to create it make one record.
fn agent_route_id(peer: &str, prefix: &IpNetwork) -> String {
    let h = canopy_proto::sha256(format!("{peer} {prefix}").as_bytes());
    let hex: String = h[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("route_{hex}")
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
            check_route("0.0.0.0/0", &cidrs, &[], "gw").is_ok(),
            "an exit route"
        );
        assert!(check_route("::/0", &cidrs, &[], "gw").is_ok());
        assert!(
            check_route("10.0.0.0/0", &cidrs, &[], "gw").is_err(),
            "host bits"
        );
        assert!(
            check_route("10.20.0.5/32", &cidrs, &[], "gw").is_ok(),
            "one host"
        );
        for special in [
            "127.0.0.0/8",
            "169.254.0.0/16",
            "224.0.0.0/4",
            "fe80::/64",
            "ten",
        ] {
            assert!(
                check_route(special, &cidrs, &[], "gw").is_err(),
                "{special}"
            );
        }
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
