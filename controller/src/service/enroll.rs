//! Enrollment: a join token, a public key and a credential become a peer with addresses.

use std::collections::HashSet;
use std::net::IpAddr;

use canopy_proto::v1::{EnrollResponse, IndexRecord, JoinTokenRecord, NetworkRecord, PeerRecord};
use prost::Message;
use rand::seq::IndexedRandom as _;

use super::tokens::check_token_usable;
use super::{Controller, decode, now_unix};
use crate::error::{Error, Result};
use crate::model;
use crate::secret::{self, Secret};
use crate::store::{Compare, Op, Revision, Txn};
use crate::{ipam, keys};

impl Controller {
    /// Enrolls a node: checks the join token, claims one address per network CIDR, counts the
    /// token use and creates the peer, all in one transaction (retried on conflict).
    pub async fn enroll(
        &self,
        token: &str,
        public_key: &[u8],
        hostname: &str,
        listen_port: u32,
        proposed_credential: &str,
    ) -> Result<EnrollResponse> {
        let key = model::validate_public_key(public_key)?;
        model::validate_hostname(hostname)?;
        if listen_port > u32::from(u16::MAX) {
            return Err(Error::InvalidArgument(format!(
                "listen port {listen_port} is out of range"
            )));
        }
        if !token.starts_with(secret::JOIN_TOKEN) {
            return Err(Error::Unauthenticated(
                "that is not a join token (join tokens start with 'cjt_')".into(),
            ));
        }
        let token_hash = &Secret::from_string(token.to_string()).hash();
        let credential = &if proposed_credential.is_empty() {
            Secret::generate(secret::CREDENTIAL)
        } else if secret::well_formed(proposed_credential, secret::CREDENTIAL) {
            Secret::from_string(proposed_credential.to_string())
        } else {
            return Err(Error::InvalidArgument(
                "credential must be 'cpc_' and 43 base64url characters".into(),
            ));
        };
        crate::txn::retry("enroll", |attempt| async move {
            let idx = self
                .store
                .get(keys::tokenhash(token_hash).as_bytes())
                .await?
                .ok_or_else(|| Error::Unauthenticated("join token is not valid".into()))?;
            let index = decode::<IndexRecord>(&idx)?.id;
            let (tenant, token_id) = index
                .split_once('/')
                .ok_or_else(|| Error::Internal("malformed join token index".into()))?;
            let tok_key = keys::token(tenant, token_id);
            let tok_kv = self
                .store
                .get(tok_key.as_bytes())
                .await?
                .ok_or_else(|| Error::Unauthenticated("join token is not valid".into()))?;
            let (tok, tok_rev): (JoinTokenRecord, Revision) =
                (decode(&tok_kv)?, tok_kv.mod_revision);
            let net_key = keys::network(&tok.tenant_id, &tok.network_id);
            let net_kv =
                self.store.get(net_key.as_bytes()).await?.ok_or_else(|| {
                    Error::NotFound("the token's network has been deleted".into())
                })?;
            let net: NetworkRecord = decode(&net_kv)?;
            let pubkey_key = keys::pubkey(&net.id, &key);
            if let Some(kv) = self.store.get(pubkey_key.as_bytes()).await? {
                // The same key and credential again: an enrollment whose answer was lost.
                // Give it back (nothing is written, no token use is spent).
                let peer_id = decode::<IndexRecord>(&kv)?.id;
                if !proposed_credential.is_empty()
                    && let Some(p) = self.store.get(keys::peer(&net.id, &peer_id).as_bytes()).await?
                    && decode::<PeerRecord>(&p)?.credential_hash == credential.hash()
                {
                    tracing::info!(peer = %peer_id, network = %net.id, "enrollment retried; answering it again");
                    let map = self.map_from_store(&net, &peer_id).await?;
                    return Ok(Some(EnrollResponse {
                        peer_id,
                        network_id: net.id,
                        credential: credential.expose().to_string(),
                        map: Some(map),
                    }));
                }
                return Err(Error::AlreadyExists(format!(
                    "this public key is already a peer of network {}",
                    canopy_proto::text::quoted(&net.name)
                )));
            }
            check_token_usable(&tok, now_unix())?;
            // A credential the agent proposed must be new (a removed peer's, too).
            let cred_key = keys::credential(&credential.hash());
            if self.store.get(cred_key.as_bytes()).await?.is_some() {
                return Err(Error::AlreadyExists(
                    "this credential is already in use; make a new one".into(),
                ));
            }
            let used: HashSet<IpAddr> = self
                .store
                .range(keys::ipams(&net.id).as_bytes())
                .await?
                .kvs
                .iter()
                .filter_map(|kv| kv.key.rsplit(|b| *b == b'/').next())
                .filter_map(|k| std::str::from_utf8(k).ok()?.parse().ok())
                .collect();
            let mut addresses = Vec::new();
            // The plan's peer quota, counted under a per-network version key the enrollment is
            // conditioned on (only when the plan has a quota: no extra contention otherwise),
            // and the tenant as it is now (suspension, plan change, deletion).
            let tenant = self.tenant_guard(&tok.tenant_id).await?;
            let plan = tenant.plan;
            let mut txn = Txn::new()
                .when(tenant.compare)
                .when(Compare::unchanged(tok_key.clone(), tok_rev))
                .when(Compare::unchanged(net_key.clone(), net_kv.mod_revision))
                .when(Compare::absent(pubkey_key.clone()));
            let limit = plan.quotas().peers_per_network;
            if limit != u32::MAX {
                // netpeers/<net> holds the peer count an enrollment left; a removal writes
                // "recount" there, and then (or for a key from before counts) the peers are
                // counted once. Either way the write is conditioned on the key's revision.
                let ver_key = keys::netpeers(&net.id);
                let ver = self.store.get(ver_key.as_bytes()).await?;
                let ver_rev = ver.as_ref().map_or(0, |kv| kv.mod_revision);
                let counted = ver
                    .as_ref()
                    .and_then(|kv| std::str::from_utf8(&kv.value).ok()?.parse::<u64>().ok());
                let count = match counted {
                    Some(n) => n,
                    None => self
                        .store
                        .range(keys::peers(&net.id).as_bytes())
                        .await?
                        .kvs
                        .len() as u64,
                };
                if count >= u64::from(limit) {
                    return Err(Error::ResourceExhausted(format!(
                        "the {} plan allows {limit} peers per network",
                        plan.name()
                    )));
                }
                txn = txn
                    .when(Compare::unchanged(ver_key.clone(), ver_rev))
                    .then(Op::put(ver_key, (count + 1).to_string()));
            }
            let peer_id = secret::new_id("peer_");
            for cidr in net.cidrs.iter().filter_map(|c| model::parse_cidr(c).ok()) {
                // The lowest free address: a lost race re-reads and takes the next one (a failed
                // transaction costs no fsync). Only under heavy contention spread over a few.
                let want = if attempt < 8 { 1 } else { 16 };
                let free = ipam::free_hosts(&cidr, &used, want);
                let ip = *free.choose(&mut rand::rng()).ok_or_else(|| {
                    Error::ResourceExhausted(format!(
                        "network {} has no free address left in {cidr}",
                        canopy_proto::text::quoted(&net.name)
                    ))
                })?;
                let k = keys::ipam(&net.id, &ip);
                txn = txn.when(Compare::absent(k.clone())).then(Op::put(
                    k,
                    IndexRecord {
                        id: peer_id.clone(),
                        ..Default::default()
                    }
                    .encode_to_vec(),
                ));
                addresses.push(model::host_prefix(ip));
            }
            let mut tok2 = tok.clone();
            tok2.uses += 1;
            let peer = PeerRecord {
                id: peer_id.clone(),
                tenant_id: tok.tenant_id.clone(),
                network_id: net.id.clone(),
                public_key: key.to_vec(),
                addresses,
                hostname: hostname.to_string(),
                tags: tok.tags.clone(),
                endpoints: Vec::new(),
                created_at_unix: now_unix(),
                credential_hash: credential.hash().to_vec(),
                join_token_id: tok.id.clone(),
            };
            txn = txn
                .then(Op::put(tok_key, tok2.encode_to_vec()))
                .then(Op::put(keys::peer(&net.id, &peer_id), peer.encode_to_vec()))
                .then(Op::put(
                    pubkey_key,
                    IndexRecord {
                        id: peer_id.clone(),
                        ..Default::default()
                    }
                    .encode_to_vec(),
                ))
                .when(Compare::absent(cred_key.clone()))
                .then(Op::put(
                    cred_key,
                    IndexRecord {
                        id: format!("{}/{}", net.id, peer_id),
                        ..Default::default()
                    }
                    .encode_to_vec(),
                ));
            let r = self.store.txn(txn).await?;
            if !r.succeeded {
                return Ok(None);
            }
            tracing::info!(peer = %peer_id, network = %net.id, addresses = ?peer.addresses, "peer enrolled");
            self.audit(
                &tok.tenant_id,
                &tok.id,
                "peer.enroll",
                &peer_id,
                &format!("{} {}", hostname, peer.addresses.join(",")),
            )
            .await;
            // The map as of the enrollment's revision, read from the store (the cache may lag).
            let map = self.map_from_store(&net, &peer_id).await?;
            Ok(Some(EnrollResponse {
                peer_id,
                network_id: net.id,
                credential: credential.expose().to_string(),
                map: Some(map),
            }))
        })
        .await
    }

    async fn map_from_store(
        &self,
        net: &NetworkRecord,
        peer_id: &str,
    ) -> Result<canopy_proto::v1::NetworkMap> {
        let r = self.store.range(keys::peers(&net.id).as_bytes()).await?;
        let mut state = crate::netmap::NetState::new(net.clone(), r.revision);
        for kv in &r.kvs {
            state.put_peer(decode(kv)?, kv.mod_revision);
        }
        state
            .full_map(peer_id, r.revision)
            .ok_or_else(|| Error::NotFound("peer was removed".into()))
    }
}
