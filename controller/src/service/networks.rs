//! Networks: create (quota, name, overlap), list, resolve by id or name, delete with all they hold.

use canopy_proto::v1::{IndexRecord, Network, NetworkRecord, PeerRecord};
use ipnetwork::IpNetwork;
use prost::Message;

use super::{Caller, Controller, decode, removed_credential};
use crate::error::{Error, Result};
use crate::keys;
use crate::model;
use crate::plans::Plan;
use crate::secret;
use crate::store::{Compare, Op, Revision, Txn};

impl Controller {
    pub async fn create_network(
        &self,
        c: &Caller,
        name: &str,
        cidrs: &[String],
    ) -> Result<Network> {
        c.require_admin()?;
        model::validate_network_name(name)?;
        let nets = &model::parse_cidrs(cidrs)?;
        crate::txn::retry("create network", |_| async move {
            // The plan as of now, and the version key the count is read under: the create is
            // conditioned on both, so a plan change or another create that commits first makes
            // this attempt re-read.
            let tenant = self.tenant_guard(&c.tenant).await?;
            let ver = self.store.get(keys::netsver(&c.tenant).as_bytes()).await?;
            let ver_rev = ver.as_ref().map_or(0, |kv| kv.mod_revision);
            let existing = self.network_records(&c.tenant).await?;
            check_new_network(tenant.plan, &existing, name, nets)?;
            let rec = NetworkRecord {
                id: secret::new_id("net_"),
                tenant_id: c.tenant.clone(),
                name: name.to_string(),
                cidrs: nets.iter().map(|n| n.to_string()).collect(),
                created_at_unix: self.now_unix(),
                dns_domain: String::new(),
                lock: None,
            };
            let name_key = keys::netname(&c.tenant, name);
            let r = self
                .store
                .txn(
                    Txn::new()
                        .when(tenant.compare)
                        .when(Compare::unchanged(keys::netsver(&c.tenant), ver_rev))
                        .when(Compare::absent(name_key.clone()))
                        .then(Op::put(
                            keys::network(&c.tenant, &rec.id),
                            rec.encode_to_vec(),
                        ))
                        .then(Op::put(
                            name_key,
                            IndexRecord {
                                id: rec.id.clone(),
                                ..Default::default()
                            }
                            .encode_to_vec(),
                        ))
                        .then(Op::put(keys::netsver(&c.tenant), rec.id.clone())),
                )
                .await?;
            if r.succeeded {
                tracing::info!(network = %rec.id, name, tenant = %c.tenant, "network created");
                return Ok(Some(network_view(&rec, r.revision)));
            }
            Ok(None)
        })
        .await
    }

    pub(crate) async fn network_records(&self, tenant: &str) -> Result<Vec<NetworkRecord>> {
        let r = self.store.range(keys::networks(tenant).as_bytes()).await?;
        r.kvs.iter().map(decode).collect()
    }

    pub async fn list_networks(&self, c: &Caller) -> Result<Vec<Network>> {
        let mut out: Vec<Network> = self
            .network_records(&c.tenant)
            .await?
            .iter()
            .map(|n| network_view(n, self.cache.network_revision(&n.id).unwrap_or(0)))
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Finds a tenant's network by id or name. Another tenant's network is NotFound, exactly
    /// like a missing one.
    pub async fn resolve_network(
        &self,
        c: &Caller,
        reference: &str,
    ) -> Result<(NetworkRecord, Revision)> {
        if reference.is_empty() {
            return Err(Error::InvalidArgument(
                "network id or name is required".into(),
            ));
        }
        let not_found = || {
            Error::NotFound(format!(
                "network {} not found",
                canopy_proto::text::quoted(reference)
            ))
        };
        let id = if reference.starts_with("net_") {
            reference.to_string()
        } else {
            let kv = self
                .store
                .get(keys::netname(&c.tenant, reference).as_bytes())
                .await?
                .ok_or_else(not_found)?;
            decode::<IndexRecord>(&kv)?.id
        };
        let kv = self
            .store
            .get(keys::network(&c.tenant, &id).as_bytes())
            .await?
            .ok_or_else(not_found)?;
        Ok((decode(&kv)?, kv.mod_revision))
    }

    pub async fn get_network(&self, c: &Caller, reference: &str) -> Result<Network> {
        let (n, _) = self.resolve_network(c, reference).await?;
        Ok(network_view(
            &n,
            self.cache.network_revision(&n.id).unwrap_or(0),
        ))
    }

    /// Puts the network's peer names under `domain` (empty: back to NAME.canopy). Every agent
    /// gets a full map with the new zone.
    pub async fn set_network_dns(
        &self,
        c: &Caller,
        reference: &str,
        domain: &str,
    ) -> Result<Network> {
        c.require_admin()?;
        let domain = match domain {
            "" => String::new(),
            d => crate::names::check_zone(d).map_err(Error::InvalidArgument)?,
        };
        let domain = &domain;
        crate::txn::retry("set network dns", |_| async move {
            let (mut net, net_rev) = self.resolve_network(c, reference).await?;
            net.dns_domain.clone_from(domain);
            let key = keys::network(&c.tenant, &net.id);
            let txn = Txn::new()
                .when(Compare::unchanged(key.clone(), net_rev))
                .then(Op::put(key, net.encode_to_vec()));
            let r = self.store.txn(txn).await?;
            if r.succeeded {
                tracing::info!(network = %net.id, zone = %crate::names::zone(&net), "network DNS zone set");
                return Ok(Some(network_view(&net, r.revision)));
            }
            Ok(None)
        })
        .await
    }

    /// Deletes a network with its peers, addresses and join tokens, in one transaction.
    pub async fn delete_network(&self, c: &Caller, reference: &str) -> Result<u32> {
        c.require_admin()?;
        crate::txn::retry("delete network", |_| async move {
            let (net, net_rev) = self.resolve_network(c, reference).await?;
            let peers = self.store.range(keys::peers(&net.id).as_bytes()).await?;
            let tokens = self.token_records(&c.tenant).await?;
            let mut txn = Txn::new()
                .when(Compare::unchanged(
                    keys::network(&c.tenant, &net.id),
                    net_rev,
                ))
                .then(Op::delete(keys::network(&c.tenant, &net.id)))
                .then(Op::delete(keys::netname(&c.tenant, &net.name)))
                .then(Op::put(keys::netsver(&c.tenant), net.id.clone()))
                .then(Op::delete_prefix(keys::peers(&net.id)))
                .then(Op::delete_prefix(keys::ipams(&net.id)))
                .then(Op::delete_prefix(keys::pubkeys(&net.id)))
                .then(Op::delete_prefix(keys::dnsnames(&net.id)))
                .then(Op::delete(keys::netdel(&net.id)))
                .then(Op::delete(keys::policy(&net.id)))
                .then(Op::delete(keys::punch(&net.id)))
                .then(Op::delete_prefix(keys::paths_of(&net.id)))
                .then(Op::delete_prefix(keys::routes(&net.id)))
                .then(Op::delete_prefix(keys::gwlives(&net.id)))
                .then(Op::delete(keys::netpeers(&net.id)));
            for kv in &peers.kvs {
                let p: PeerRecord = decode(kv)?;
                if let Ok(h) = <[u8; 32]>::try_from(p.credential_hash.as_slice()) {
                    txn = txn.then(Op::put(
                        keys::credential(&h),
                        removed_credential(&net.id, &p.id, self.now_unix()),
                    ));
                }
            }
            for (t, _) in tokens.iter().filter(|(t, _)| t.network_id == net.id) {
                txn = txn.then(Op::delete(keys::token(&c.tenant, &t.id)));
                if let Ok(h) = <[u8; 32]>::try_from(t.secret_hash.as_slice()) {
                    txn = txn.then(Op::delete(keys::tokenhash(&h)));
                }
            }
            if self.store.txn(txn).await?.succeeded {
                tracing::info!(network = %net.id, peers = peers.kvs.len(), "network deleted");
                return Ok(Some(peers.kvs.len() as u32));
            }
            Ok(None)
        })
        .await
    }
}

/// Whether a network `name` with `nets` may join the tenant's `existing` ones under `plan`:
/// within the quota, a new name, no CIDR overlapping another network's.
pub(super) fn check_new_network(
    plan: Plan,
    existing: &[NetworkRecord],
    name: &str,
    nets: &[IpNetwork],
) -> Result<()> {
    let limit = plan.quotas().networks;
    if existing.len() as u64 >= u64::from(limit) {
        return Err(Error::ResourceExhausted(format!(
            "the {} plan allows {limit} networks",
            plan.name()
        )));
    }
    for other in existing {
        if other.name == name {
            return Err(Error::AlreadyExists(format!(
                "network {} already exists",
                canopy_proto::text::quoted(name)
            )));
        }
        for theirs in other.cidrs.iter().filter_map(|s| model::parse_cidr(s).ok()) {
            if let Some(mine) = nets.iter().find(|n| model::overlaps(n, &theirs)) {
                return Err(Error::FailedPrecondition(format!(
                    "{mine} overlaps {theirs} of network {}",
                    canopy_proto::text::quoted(&other.name)
                )));
            }
        }
    }
    Ok(())
}

fn network_view(n: &NetworkRecord, revision: Revision) -> Network {
    Network {
        id: n.id.clone(),
        name: n.name.clone(),
        cidrs: n.cidrs.clone(),
        created_at_unix: n.created_at_unix,
        revision,
        dns_domain: crate::names::zone(n),
        locked: n.lock.is_some(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn existing(name: &str, cidr: &str) -> NetworkRecord {
        NetworkRecord {
            name: name.into(),
            cidrs: vec![cidr.into()],
            ..Default::default()
        }
    }

    #[test]
    fn a_new_network_needs_room_a_new_name_and_its_own_addresses() {
        let nets = |s: &str| vec![s.parse::<IpNetwork>().unwrap()];
        let have = vec![existing("prod", "100.64.0.0/24")];
        assert!(check_new_network(Plan::Free, &have, "dev", &nets("100.64.1.0/24")).is_ok());
        let e = check_new_network(Plan::Free, &have, "prod", &nets("100.64.1.0/24"));
        assert!(matches!(e, Err(Error::AlreadyExists(_))), "{e:?}");
        let e = check_new_network(Plan::Free, &have, "dev", &nets("100.64.0.128/25"));
        assert_eq!(
            e.unwrap_err().to_string(),
            "100.64.0.128/25 overlaps 100.64.0.0/24 of network \"prod\""
        );
        let full: Vec<NetworkRecord> = (0..Plan::Free.quotas().networks)
            .map(|i| existing(&format!("n{i}"), &format!("10.{i}.0.0/16")))
            .collect();
        let e = check_new_network(Plan::Free, &full, "more", &nets("100.64.9.0/24"));
        assert!(matches!(e, Err(Error::ResourceExhausted(_))), "{e:?}");
    }
}
